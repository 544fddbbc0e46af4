"""The offline detection demo: fine-tune the shipped demo model to find shapes and write their boxes.

    paligemma-ft train --config configs/demo_detect.py --workdir runs/demo_detect

Model: `builtin:demo` (see configs/demo.py), pretrained only to caption shapes scenes: it has never written a
`<loc>` token, so at step 0 it answers "detect circle" with a caption and its detection mAP is 0. The demo teaches
it PaliGemma's detection format on 4 000 generated scenes:

    prefix "detect circle"  ->  suffix "<loc0512><loc0384><loc0639><loc0512> circle ; <loc...>x4 circle"

(y0 x0 y1 x1, each round(v * 1023) of the coordinate normalised to the image; one object per shape of the asked
kind, joined by " ; "). The scenes are made easier to localize for a model this small: at most 2 shapes, with
positions and sides on an 8-pixel grid (`snap=8`, the model's patch size), so a coordinate takes one of a few
values. Two evaluators score 128 held-out scenes at steps 0, 300 and 600 with COCO's box AP (`ap50`, `map`), the
format-validity rate (`well_formed_rate`) and the empty-output rate: `val` decodes freely, `val_constrained` with
the detection grammar (paligemma_ft/constrain.py), which makes every output parse. Each writes predictions, an
HTML gallery and a PNG contact sheet (references green, predictions red) to `runs/demo_detect/eval/`.

Segmentation (`task="segment"`) needs big_vision's mask codec vae-oid.npz, which is not shipped: with the file in
place, `--config.input.data.task=segment --config.evals.val.type=segmentation` (and the same for `val_constrained`,
whose `constrain` becomes "segment") trains and scores masks the same way, but slower (16 more tokens per object).
"""

import ml_collections

SHAPES = dict(source="shapes", seed=0, task="detect", image_size=64, max_shapes=2, snap=8)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the detection demo's config (big_vision key names where big_vision has one)."""
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model_name_or_preset = ""  # "" = the architecture is read from model_init's parameter shapes.
    c.model = dict()  # Overrides of the model's `img` / `llm` keys.
    c.model_init = "builtin:demo"  # The caption-pretrained demo model (paligemma_ft/assets/demo.npz).
    c.tokenizer = "builtin:tiny"  # Has PaliGemma's <loc0000>..<loc1023> and <seg000>..<seg127> pieces.

    # Training data: 4 000 generated scenes (seed 0; the caption pretraining used seed 1).
    c.input = dict(
        data=dict(SHAPES, n=4000),
        prefix="detect circle",  # Unused: every shapes example has its own "detect <kind>" prefix.
        res=64,
        text_len=32,  # Prefix + separator + up to 2 objects of 5-6 tokens + EOS.
        batch_size=16,
        shuffle_seed=0,
        num_workers=0,
    )

    c.total_steps = 600
    c.optax_name = "scale_by_adam"
    c.lr = 1e-3  # A small model and new tokens: a high rate (the caption demo's).
    c.wd = 0.0
    c.grad_clip_norm = 1.0
    c.label_smoothing = 0.0
    c.schedule = dict(decay_type="cosine", warmup_percent=0.05)  # Every parameter trains.
    c.grad_accum_steps = 1
    c.trainable_dtype = "float32"
    c.frozen_dtype = None
    c.compilation_cache_dir = ""  # e.g. "~/.cache/paligemma_ft_xla" to reuse compiled steps across runs.

    c.mesh = [("data", -1)]
    c.sharding_strategy = [(".*", "replicate")]
    c.ckpt_steps = 200
    c.keep_ckpts = 2

    # 128 held-out scenes (examples 100 000+ of seed 0), at steps 0, 300 and 600.
    val_data = dict(SHAPES, n=128, offset=100_000)
    c.evals = dict(
        val=dict(type="detection", batch_size=64, max_decode_len=24, log_steps=300, data=val_data),
        val_constrained=dict(
            type="detection",
            batch_size=64,
            max_decode_len=24,
            log_steps=300,
            constrain="detect",  # Only <loc> tokens in box slots, then a label, ";" or EOS: every output parses.
            data=val_data,
        ),
    )
    return c
