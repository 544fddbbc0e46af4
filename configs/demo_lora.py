"""The offline demo with LoRA: the shipped `builtin:demo` model learns long captions through low-rank adapters.

    paligemma-ft train --config configs/demo_lora.py --workdir runs/demo_lora

The same task as configs/demo.py (full fine-tuning): generated shapes scenes whose long captions ("a large red
circle in the top left and a small blue square in the bottom right") the model never saw. Here the pretrained
weights stay frozen, bit for bit; rank-8 adapters on every attention and MLP weight of both towers train instead
(about 9 % of the parameters of this tiny model; on PaliGemma 2 3B the same rank on the LLM is 0.4 %). The run
writes `params.npz` (the base with the adapters merged, loadable anywhere a checkpoint is), `adapters.npz` (the
adapters alone, with the base's identity) and `peft/` (a PEFT adapter for the Hugging Face export of the base).

QLoRA: add `--config.lora.quant=nf4` (4-bit NormalFloat base) or `int8`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the LoRA demo's config (configs/demo.py's keys plus `lora`)."""
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model_name_or_preset = ""  # "" = the architecture is read from model_init's parameter shapes.
    c.model = dict()  # Overrides of the model's `img` / `llm` keys.
    c.model_init = "builtin:demo"  # The base the adapters train on (kept frozen).
    c.tokenizer = "builtin:tiny"

    c.lora = dict(
        rank=8,  # r: adapter rank; 0 turns LoRA off.
        alpha=16.0,  # The update is scaled by alpha / rank (PEFT's lora_alpha).
        dropout=0.0,  # Dropout on the adapters' inputs, in training only.
        targets=["llm/layers/.*", "img/Transformer/.*"],  # Ordered regexes over weight names (first match).
        base_dtype="float32",  # Storage dtype of the frozen base ("bfloat16" on GPUs/TPUs).
        quant="none",  # "none", "int8" or "nf4": store the frozen base quantized (QLoRA).
    )

    # Training data: generated scenes with long captions (seed 0; the pretraining used seed 1).
    c.input = dict(
        data=dict(source="shapes", n=2000, seed=0, task="long_caption", image_size=64),
        prefix="caption en",
        res=64,
        text_len=48,  # Prefix + separator + caption + EOS; longer rows are cut (and counted).
        batch_size=16,
        shuffle_seed=0,
        num_workers=0,
    )

    c.total_steps = 300
    c.optax_name = "scale_by_adam"
    c.lr = 3e-3  # Adapters start from zero and are few: a higher rate than full fine-tuning's 1e-3.
    c.wd = 0.0
    c.grad_clip_norm = 1.0
    c.label_smoothing = 0.0
    c.schedule = dict(decay_type="cosine", warmup_percent=0.05)  # Applies to the adapters (the base is frozen).
    c.grad_accum_steps = 1
    c.trainable_dtype = "float32"  # The adapters train in float32.
    c.frozen_dtype = None  # Superseded by lora.base_dtype.
    c.compilation_cache_dir = ""

    c.mesh = [("data", -1)]
    c.sharding_strategy = [(".*", "replicate")]
    c.ckpt_steps = 100
    c.keep_ckpts = 2

    # Caption metrics on 128 held-out scenes at step 0, step 150 and the end (examples 100 000+ of seed 0).
    c.evals = dict(
        val=dict(
            type="caption",
            batch_size=64,
            max_decode_len=40,
            log_steps=150,
            bootstrap=0,
            data=dict(source="shapes", n=128, seed=0, task="long_caption", image_size=64, offset=100_000),
        ),
    )
    return c
