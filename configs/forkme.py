"""Template: fine-tune PaliGemma 2 on YOUR OWN JSONL folder. Copy this file, then edit what the comments say.

    cp configs/forkme.py configs/mytask.py        # then edit configs/mytask.py
    paligemma-ft train --config configs/mytask.py --workdir runs/mytask \\
        --config.data_dir=~/data/mytask --config.tokenizer=~/data/paligemma_tokenizer.model

The folder (big_vision's JSONL layout):

    mytask/
      train.jsonl      one JSON object per line:
                       {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "a dog on a red sofa"}
      val.jsonl        same format; "suffix" may also be a list of references: ["a dog", "a brown dog"]
      images/...       paths in "image" are relative to the folder (paths leaving it are refused)

`prefix` is the prompt (PaliGemma's task prefixes: "caption en", "answer en <question>", "detect <thing>",
"ocr", ...); a line without one gets `input.prefix`. `suffix` is the target text. Lines that cannot be used
(bad JSON, missing image, empty suffix) are skipped; `paligemma-ft inspect --config ...` lists them with file and
line. Set `input.bad_input="error"` to stop at the first one instead (the message names file and line).

A folder with the fine-tuning colab's file names (`data_train90.jsonl`, `data_val10.jsonl`, as longcap100):
    --config.train_file=data_train90.jsonl --config.val_file=data_val10.jsonl

Defaults follow big_vision's `transfers/forkme.py` template (PaliGemma 2 3B, 224 px, Adam, lr 1e-5, batch 32,
text length 128); set `total_steps` from your data size. `--config.data_dir` is required: without it the run
stops when it opens the data, naming `input.data.path`.

Memory and speed: `paligemma-ft plan --config configs/forkme.py --device H100 --policies` (your GPU or TPU; extra
overrides as for `train`) sizes the step in the target's compute dtype (bfloat16 on GPUs and TPUs) under each
rematerialization policy and names the lightest that fits: none > dots > dots_with_no_batch_dims_saveable > full
(big_vision's default: least memory, about a third more compute). Set it with the override `plan` prints.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the template's config (big_vision key names). `arg` is unused."""
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds the dropout RNG and any random init.

    # --- EDIT: where your data is -----------------------------------------------------------------------------
    c.data_dir = config_dict.placeholder(str)  # Required: your folder (or pass --config.data_dir=DIR).
    c.local_keys = ("train_file", "val_file")  # This file's own keys (the library reads neither).
    c.train_file = "train.jsonl"  # Training file, relative to data_dir.
    c.val_file = "val.jsonl"  # Validation file, relative to data_dir.
    train_path = c.get_ref("data_dir") + "/" + c.get_ref("train_file")  # Follows the overrides above.
    val_path = c.get_ref("data_dir") + "/" + c.get_ref("val_file")

    # --- EDIT: which PaliGemma ------------------------------------------------------------------------------
    # Other sizes/resolutions: "pg2_3b_448" + ".../paligemma2-3b-pt-448/1", "pg2_10b_224" + ...; PaliGemma 1:
    # "pg1_3b_224" + "kaggle:google/paligemma/jax/paligemma-3b-pt-224/1". The table: docs/kaggle.md.
    c.model_name_or_preset = "pg2_3b_224"  # Architecture (paligemma_ft.model.presets); "" infers it from weights.
    c.model = dict()  # Per-tower overrides, e.g. dict(llm=dict(dropout=0.1)).
    c.model_init = "kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224/1"  # Or a .npz, a run's workdir.
    c.tokenizer = "paligemma_tokenizer.model"  # Path of PaliGemma's SentencePiece model (docs/kaggle.md).

    # --- EDIT: how examples are read ------------------------------------------------------------------------
    c.input = dict(
        data=dict(source="jsonl", path=train_path),
        prefix="caption en",  # Prompt for lines without a "prefix".
        lowercase=False,  # True lower-cases targets and references (the colab does, for captions).
        res=224,  # Image side in pixels; must match the model (224 / 448 / 896).
        text_len=128,  # Tokens for prefix + suffix; longer examples are cut (counted in the report).
        batch_size=32,  # Global batch; must be divisible by the number of devices on the data axis.
        shuffle_seed=0,  # Shuffle order (reshuffled every epoch).
        num_workers=2,  # Image-reading threads; raise for large images or fast accelerators.
        bad_input="skip",  # "skip" unusable lines, or stop with an "error" naming the first one.
    )

    # --- EDIT: how long and how fast ------------------------------------------------------------------------
    c.total_steps = 500  # Set to epochs * len(train.jsonl) / batch_size (big_vision's forkme: 15 epochs).
    c.optax_name = "scale_by_adam"  # Or "big_vision.sgd", "momentum", "adafactor".
    c.optax = dict(b2=0.999)  # Optimizer arguments (every big_vision PaliGemma config sets b2 = 0.999).
    c.lr = 1e-5  # Peak learning rate; try 3e-6 ... 3e-5.
    c.wd = 3e-7  # Decoupled weight decay (multiplied by the schedule, not the lr) on `.*/kernel$` only.
    c.grad_clip_norm = 1.0  # Clip the global gradient norm.
    c.label_smoothing = 0.0  # 0.1 - 0.3 helps some tasks (big_vision's screen2words, refcoco).
    c.grad_accum_steps = 1  # Micro-batches per step: the same update with 1/n of the activation memory.
    sched = dict(decay_type="cosine", warmup_percent=0.05)  # Linear warmup over 5 % of the steps, then cosine.
    # Which parameters train: ordered (regex, schedule | None) rules, first full match wins, None freezes.
    c.schedule = [
        ("img/.*", sched),  # The SigLIP image encoder; None freezes it (saves memory; often fine).
        ("llm/.*", sched),  # Gemma; ("llm/layers/attn/.*", sched) before a ("llm/.*", None) trains attention only.
    ]
    c.trainable_dtype = "float32"  # Storage dtype of trained parameters.
    c.frozen_dtype = None  # Storage dtype of frozen ones: None = float32; "bfloat16" halves their memory.

    # --- Devices and checkpoints ----------------------------------------------------------------------------
    c.mesh = [("data", -1)]  # All devices on one data axis.
    c.sharding_strategy = [(".*", 'fsdp(axis="data")')]  # Parameters and optimizer state split FSDP-style.
    c.ckpt_steps = 200  # Resumable checkpoint interval in steps (and at the end).
    c.keep_ckpts = 2  # Checkpoints kept on disk (the latest ones).

    # --- EDIT: evaluation on val.jsonl (at step 0 and at the end; `log_steps` / `log_percent` add more) -----
    c.evals = dict(
        # Teacher-forced loss and perplexity: works for every task.
        val_loss=dict(
            type="perplexity", data=dict(source="jsonl", path=val_path), batch_size=8, log_percent=0.1
        ),  # Also every 10 % of the run (cheap: no decoding).
        # Decoded predictions scored as captions (CIDEr, BLEU, ROUGE-L), with a predictions JSONL and an HTML
        # gallery in workdir/eval. For question answering use type="vqa"; for "detect ..." use type="detection".
        val=dict(
            type="caption",
            data=dict(source="jsonl", path=val_path),
            batch_size=8,
            max_decode_len=64,
            sampler="greedy",
            bootstrap=1000,
        ),
    )
    return c
