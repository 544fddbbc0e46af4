"""big_vision's fine-tuning colab as a config: PaliGemma 2 3B at 224 px learns long captions from longcap100.

    paligemma-ft train --config configs/longcap100.py --workdir runs/longcap100 \\
        --config.data_dir=~/data/longcap100 --config.tokenizer=~/data/paligemma_tokenizer.model

The colab's recipe (reference section 6), unchanged:
  * model: PaliGemma 2 3B, 224 px (`pg2_3b_224`, final-logit soft-cap 0), weights from Kaggle
    (`paligemma2-3b-pt-224.b16.npz`; see docs/kaggle.md for credentials and the licence);
  * trainable: only the LLM's attention weights (`llm/layers/attn/{q,kv,attn_vec}_einsum`), stored in float32;
    everything else frozen and stored in float16 (the colab targets a 16 GB T4);
  * plain SGD (no momentum, no clipping, no weight decay), lr 0.03, cosine schedule with 10 % warmup: the lr is
    0.005 at step 1, 0.03 at step 6 and about 2e-5 at step 64 (the colab evaluates a 65-step schedule at steps
    1..64, reproduced by `schedule_step_offset=1`);
  * batch 8, 64 steps, sequence length 128, captions lower-cased, prefix "caption en";
  * parameters sharded FSDP-style over a ("data",) mesh;
  * greedy captioning of the validation file (up to 128 tokens) every 16 steps, scored with CIDEr.

Data: the longcap100 folder (`gsutil cp -r gs://longcap100/ .` gives `data_train90.jsonl`, `data_val10.jsonl`
and the images they name, relative to the folder). `--config.data_dir` is required: without it the run stops
when it opens the data, naming `input.data.path`.

Tokenizer: PaliGemma's SentencePiece model is not in the Kaggle bundle; download it once from
https://storage.googleapis.com/big_vision/paligemma_tokenizer.model and point `--config.tokenizer` at it.

To try the config on a laptop with the shipped demo model instead of the 3B one:
    --config.model_init=builtin:demo --config.tokenizer=builtin:tiny --config.model_name_or_preset="" \\
    --config.input.res=64

Memory and speed: `paligemma-ft plan --config configs/longcap100.py --device H100 --policies` (your GPU or TPU; extra
overrides as for `train`) sizes the step in the target's compute dtype (bfloat16 on GPUs and TPUs) under each
rematerialization policy and names the lightest that fits: none > dots > dots_with_no_batch_dims_saveable > full
(big_vision's default: least memory, about a third more compute). Set it with the override `plan` prints.
"""

import ml_collections
from ml_collections import config_dict

TRAIN_FILE = "data_train90.jsonl"  # 90 examples.
VAL_FILE = "data_val10.jsonl"  # 10 examples.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the colab recipe (big_vision key names). `arg` is unused (there are no variants)."""
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds the dropout RNG (the model has no dropout here) and a random init (unused: weights load).

    # --- Data: one folder, file names as in gs://longcap100 -------------------------------------------------
    c.data_dir = config_dict.placeholder(str)  # Required: the longcap100 folder (`~` is expanded).
    data_dir = c.get_ref("data_dir")  # Paths below follow `--config.data_dir` when it is overridden.

    # --- Model ----------------------------------------------------------------------------------------------
    c.model_name_or_preset = "pg2_3b_224"  # Gemma 2 2B + SigLIP So400m/14 at 224 px (paligemma_ft.model.presets).
    c.model = dict()  # Overrides of the preset's `img` / `llm` keys (none: the preset is the colab's model).
    # A Kaggle handle (downloaded once into kagglehub's cache), a local .npz, a run's workdir, or builtin:demo.
    c.model_init = "kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224/1"
    c.tokenizer = "paligemma_tokenizer.model"  # Path of PaliGemma's SentencePiece model (see the docstring).

    # --- Input pipeline -------------------------------------------------------------------------------------
    c.input = dict(
        data=dict(source="jsonl", path=data_dir + "/" + TRAIN_FILE),  # Images are relative to the JSONL's folder.
        prefix="caption en",  # The colab's prompt (for lines without a "prefix" of their own).
        lowercase=True,  # The colab lower-cases the target captions (the references too, for scoring).
        res=224,  # Image side in pixels; must match the model (64 for builtin:demo).
        # The colab's SEQLEN. Prompts hold 128 tokens; training rows 128 + 1 (big_vision's trainer convention; the
        # colab's rows are 128), which differs only for captions longer than about 120 tokens.
        text_len=128,
        batch_size=8,  # Global batch, split over the mesh's data axis.
        shuffle_seed=0,  # Shuffle order of the training examples (reshuffled every epoch).
        num_workers=2,  # Image-reading threads.
    )

    # --- Optimization: plain SGD on the attention weights ----------------------------------------------------
    c.total_steps = 64  # 512 examples at batch 8 (about 5.7 passes over the 90 training images).
    c.optax_name = "big_vision.sgd"  # Identity transform: the update is -lr * schedule * gradient.
    c.optax = dict()  # Arguments of the optimizer (plain SGD has none).
    c.lr = 0.03  # Peak learning rate.
    c.wd = 0.0  # No weight decay.
    c.grad_clip_norm = None  # No gradient clipping.
    c.label_smoothing = 0.0  # One-hot targets.
    c.grad_accum_steps = 1  # Micro-batches per step: the same update with 1/n of the activation memory.
    sched = dict(decay_type="cosine", warmup_percent=0.10)  # round(0.1 * 65) = 6 warmup steps (banker's rounding).
    # Ordered (regex, schedule | None) rules over parameter names, first full match wins; None freezes. As in the
    # colab, a name outside `llm/` and `img/` is an error, not silently frozen.
    c.schedule = [
        ("llm/layers/attn/.*", sched),  # q_einsum, kv_einsum, attn_vec_einsum of every layer: trained.
        ("llm/.*", None),  # The rest of Gemma (embedder, MLPs, norms): frozen.
        ("img/.*", None),  # The whole SigLIP image encoder and its projection: frozen.
    ]
    # The update with count c uses the schedule at c + 1 of a 65-step schedule, exactly the colab's lr sequence
    # (never 0: the first update already has lr 0.005).
    c.schedule_step_offset = 1
    c.trainable_dtype = "float32"  # Storage dtype of trained parameters.
    c.frozen_dtype = "float16"  # Storage dtype of frozen parameters (T4 GPUs have no bfloat16).

    # --- Devices --------------------------------------------------------------------------------------------
    c.mesh = [("data", -1)]  # One axis over all devices.
    c.sharding_strategy = [(".*", 'fsdp(axis="data")')]  # Every tensor > 4 MiB split over "data" (FSDP).
    c.ckpt_steps = 32  # Resumable checkpoint every 32 steps (and at the end).
    c.keep_ckpts = 2  # Checkpoints kept on disk (the latest ones).

    # --- Evaluation (at step 0 and at the end; `log_steps` / `log_percent` add more) ---------------------------
    c.evals = dict(
        val=dict(
            type="caption",  # CIDEr, BLEU-1..4, ROUGE-L against the lower-cased reference.
            data=dict(source="jsonl", path=data_dir + "/" + VAL_FILE),
            batch_size=4,  # The colab's prediction batch.
            max_decode_len=128,  # Long captions.
            sampler="greedy",
            bootstrap=1000,  # Resamples for the 95 % confidence intervals (0 turns them off).
            log_steps=16,  # Also every 16 steps, as the colab: 5 evaluations in all (steps 0, 16, 32, 48, 64).
        ),
    )
    return c
