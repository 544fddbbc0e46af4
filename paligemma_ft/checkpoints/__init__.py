"""Checkpoints: big_vision .npz files, orbax training state, Hugging Face and Kaggle."""
