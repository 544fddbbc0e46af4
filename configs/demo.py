"""The offline demo: fine-tune the small pretrained PaliGemma shipped with the package on a task it never saw.

    paligemma-ft train --config configs/demo.py --workdir runs/demo

Model: `builtin:demo` (paligemma_ft/assets/demo.npz, ~2 MB): a PaliGemma 1 layout (ViT 3 x 96 over 8 x 8 patches of
64 x 64 images, Gemma 3 x 128 with multi-query attention, the 1 664-piece tiny tokenizer), trained by
`scripts/make_demo_model.py` to caption generated shapes scenes ("a red circle and a blue square"). It has never
seen long captions. The demo teaches it to write them (the same `caption en` prompt, but "a large red circle in the
top left and a small blue square in the bottom right": sizes and positions it was never asked for) on 2 000
generated scenes, and scores CIDEr, BLEU and ROUGE-L on 128 held-out scenes before and after. Every field can be
overridden, e.g. `--config.total_steps=50` or `--config.input.batch_size=8`.

Memory and speed: `paligemma-ft plan --config configs/demo.py --device H100 --policies` (your GPU or TPU; extra
overrides as for `train`) sizes the step in the target's compute dtype (bfloat16 on GPUs and TPUs) under each
rematerialization policy and names the lightest that fits: none > dots > dots_with_no_batch_dims_saveable > full
(big_vision's default: least memory, about a third more compute). Set it with the override `plan` prints.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the demo's config (big_vision key names where big_vision has one)."""
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model_name_or_preset = ""  # "" = the architecture is read from model_init's parameter shapes.
    c.model = dict()  # Overrides of the model's `img` / `llm` keys, e.g. dict(llm=dict(dropout=0.1)).
    c.model_init = "builtin:demo"  # Or a .npz, another run's workdir, or kaggle:<handle>.
    c.tokenizer = "builtin:tiny"

    # Training data: generated scenes with long captions (seed 0; the pretraining used seed 1).
    c.input = dict(
        data=dict(source="shapes", n=2000, seed=0, task="long_caption", image_size=64),
        prefix="caption en",  # Used where an example has no prefix of its own (shapes examples have one).
        res=64,
        text_len=48,  # Prefix + separator + caption + EOS; longer rows are cut (and counted).
        batch_size=16,
        shuffle_seed=0,
        num_workers=0,
    )

    c.total_steps = 300
    c.optax_name = "scale_by_adam"
    c.lr = 1e-3
    c.wd = 0.0
    c.grad_clip_norm = 1.0
    c.label_smoothing = 0.0
    c.schedule = dict(decay_type="cosine", warmup_percent=0.05)  # Every parameter trains (no None rule).
    c.grad_accum_steps = 1  # Micro-batches per step: the same update with 1/n of the activation memory.
    c.trainable_dtype = "float32"  # Storage dtype of trained parameters.
    c.frozen_dtype = None  # Storage dtype of frozen ones (e.g. "float16"); None = float32.
    c.compilation_cache_dir = ""  # e.g. "~/.cache/paligemma_ft_xla": reuse compiled steps across runs.

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
