"""Visual question answering: fine-tune PaliGemma 2 3B (224 px) on question/answer pairs, VQA accuracy on val.

    paligemma-ft train --config configs/vqa.py --workdir runs/vqa \\
        --config.data_dir=~/data/myvqa --config.tokenizer=~/data/paligemma_tokenizer.model

JSONL (the default): `data_dir` holds `train.jsonl`, `val.jsonl` and the images they name, e.g.

    {"image": "images/17.jpg", "prefix": "answer en what colour is the bus?", "suffix": "red"}
    {"image": "images/18.jpg", "prefix": "answer en how many dogs are there?", "suffix": ["2", "two", "2"]}

The prefix is PaliGemma's VQA prompt, "answer en " + the question. A list suffix gives several references (VQAv2
has 10 answers per question): training uses the first, evaluation scores against all of them.

TFDS (`--config configs/vqa.py:tfds`): records of a prepared TFDS dataset (array_record files, read without
TensorFlow) with `--config.tfds_name=NAME`; `data_dir` is then the TFDS data folder (default: TFDS's own). The
`fields` map names the image, question and answers features. The question feature is used verbatim as the
prompt: the data pipeline has no prompt template, so "answer en " is not prepended to TFDS questions.

Metrics (type "vqa", big_vision's `transfers/vqa`): exact match against the first answer (`acc`) and any answer
(`acc_any`), the VQAv2 accuracy (`vqav2_acc`) and ANLS (`anls`). Hyper-parameters follow big_vision's VQA transfer
configs (Adam b2 0.999, lr 1e-5, gradient clipping 1.0, cosine with 5 % warmup, text length 32); batch 64 and
`total_steps` are a starting point to set from your data size.

Memory and speed: `paligemma-ft plan --config configs/vqa.py --device H100 --policies` (your GPU or TPU; extra
overrides as for `train`) sizes the step in the target's compute dtype (bfloat16 on GPUs and TPUs) under each
rematerialization policy and names the lightest that fits: none > dots > dots_with_no_batch_dims_saveable > full
(big_vision's default: least memory, about a third more compute). Set it with the override `plan` prints.
"""

import ml_collections
from ml_collections import config_dict

SOURCES = ("jsonl", "tfds")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the VQA config; `arg` picks the data source: "jsonl" (default) or "tfds"."""
    source = arg or "jsonl"
    if source not in SOURCES:
        raise ValueError(f"configs/vqa.py:{arg}: unknown variant; use configs/vqa.py (JSONL) or configs/vqa.py:tfds")
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds the dropout RNG and any random init.

    # --- Data -----------------------------------------------------------------------------------------------
    # JSONL: the folder with train.jsonl / val.jsonl (required). TFDS: the TFDS data folder (None: TFDS's default).
    c.data_dir = config_dict.placeholder(str)
    if source == "jsonl":
        train_data = dict(source="jsonl", path=c.get_ref("data_dir") + "/train.jsonl")
        val_data = dict(source="jsonl", path=c.get_ref("data_dir") + "/val.jsonl")
    else:
        c.local_keys = ("tfds_name", "train_split", "val_split", "fields")  # This variant's own keys.
        c.tfds_name = config_dict.placeholder(str)  # Required: the registered dataset name[:version].
        c.train_split = "train"  # TFDS split strings, e.g. "train[:90%]".
        c.val_split = "validation"
        c.fields = dict(image="image", prefix="question", suffix="answers")  # Feature names ("/" descends).
        train_data, val_data = (
            dict(
                source="tfds",
                name=c.get_ref("tfds_name"),
                split=c.get_ref(split),
                data_dir=c.get_ref("data_dir"),
                fields=c.get_ref("fields"),
            )
            for split in ("train_split", "val_split")
        )

    # --- Model ----------------------------------------------------------------------------------------------
    c.model_name_or_preset = "pg2_3b_224"  # Architecture (paligemma_ft.model.presets).
    c.model = dict()  # Per-tower overrides of the preset.
    c.model_init = "kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224/1"  # Pretrained weights (docs/kaggle.md).
    c.tokenizer = "paligemma_tokenizer.model"  # Path of PaliGemma's SentencePiece model.

    # --- Input pipeline -------------------------------------------------------------------------------------
    c.input = dict(
        data=train_data,
        prefix="answer en",  # Prompt for examples without a prefix (questions should carry their own).
        lowercase=False,  # The vqa evaluator compares case-insensitively anyway.
        res=224,  # Image side in pixels; must match the model (448 / 896 help text-heavy images).
        text_len=32,  # Question + answer tokens (big_vision's VQA configs: 32; 48 for long questions).
        batch_size=64,  # Global batch.
        shuffle_seed=0,  # Shuffle order (reshuffled every epoch).
        num_workers=4,  # Image-reading threads.
    )

    # --- Optimization ---------------------------------------------------------------------------------------
    c.total_steps = 2_000  # Set to epochs * examples / batch_size (big_vision's VQA configs: 1 - 10 epochs).
    c.optax_name = "scale_by_adam"
    c.optax = dict(b2=0.999)
    c.lr = 1e-5  # Peak learning rate (big_vision's VQA sweeps: 3e-6 ... 1e-5).
    c.wd = 0.0  # Decoupled weight decay on `.*/kernel$` (big_vision's vqav2 uses 3e-7).
    c.grad_clip_norm = 1.0  # Clip the global gradient norm.
    c.label_smoothing = 0.0  # One-hot targets.
    c.grad_accum_steps = 1  # Micro-batches per step: the same update with 1/n of the activation memory.
    c.schedule = dict(decay_type="cosine", warmup_percent=0.05)  # One schedule: every parameter trains.
    c.trainable_dtype = "float32"  # Storage dtype of trained parameters.
    c.frozen_dtype = None  # Storage dtype of frozen ones (none here); None = float32.

    # --- Devices and checkpoints ----------------------------------------------------------------------------
    c.mesh = [("data", -1)]
    c.sharding_strategy = [(".*", 'fsdp(axis="data")')]
    c.ckpt_steps = 500  # Resumable checkpoint interval in steps (and at the end).
    c.keep_ckpts = 2  # Checkpoints kept on disk (the latest ones).

    # --- Evaluation (at step 0 and at the end; `log_steps` / `log_percent` add more) ---------------------------
    c.evals = dict(
        val=dict(
            type="vqa",  # acc, acc_any, vqav2_acc, anls.
            data=val_data,
            batch_size=64,  # Questions decoded at once.
            max_decode_len=16,  # Answers are short.
            sampler="greedy",
        ),
    )
    return c
