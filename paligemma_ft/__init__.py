"""paligemma_ft: fine-tune PaliGemma 1 and 2 in JAX, compatible with big_vision's checkpoints and numerics."""

__version__ = "0.1.0"
