"""Trains the small pretrained PaliGemma shipped as `builtin:demo` (paligemma_ft/assets/demo.npz).

    python scripts/make_demo_model.py [--steps 3000] [--workdir /tmp/demo_pretrain]

It is trained by the toolkit's own trainer (`paligemma_ft.training.loop.run`) on generated shapes scenes with their
short
captions ("caption en" -> "a red circle and a blue square"), from a random init of the `demo` preset (64 px,
PaliGemma 1 layout, the tiny tokenizer). The demo (`configs/demo.py`) then fine-tunes it on a task it has never
seen. The result is written in big_vision's `.npz` layout, stored as float16 to keep the package small.
Takes about 10 minutes on a 2-core CPU; the evaluation at the end prints the captioning quality reached.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil

import numpy as np

from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.training import loop as train

ASSET = pathlib.Path(__file__).resolve().parents[1] / "paligemma_ft" / "assets" / "demo.npz"
TRAIN_SEED, VAL_OFFSET = 1, 100_000  # Scenes the demo's fine-tuning data (seed 0) never shows.


def pretrain_config(steps: int) -> dict:
    """The pretraining recipe: Adam, cosine schedule, captions of shapes scenes at 64 px."""
    data = dict(source="shapes", n=50_000, seed=TRAIN_SEED, task="caption", image_size=64)
    return dict(
        seed=0,
        model_name_or_preset="demo",
        model_init="",
        tokenizer="builtin:tiny",
        input=dict(data=data, prefix="caption en", res=64, text_len=32, batch_size=32, shuffle_seed=0, num_workers=0),
        total_steps=steps,
        optax_name="scale_by_adam",
        lr=2e-3,
        wd=1e-4,
        grad_clip_norm=1.0,
        schedule=dict(decay_type="cosine", warmup_percent=0.03),
        mesh=[("data", -1)],
        sharding_strategy=[(".*", "replicate")],
        ckpt_steps=1000,
        evals=dict(
            val=dict(
                type="caption",
                batch_size=64,
                max_decode_len=32,
                bootstrap=0,
                data=dict(source="shapes", n=256, seed=TRAIN_SEED, task="caption", image_size=64, offset=VAL_OFFSET),
            )
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--workdir", default="/tmp/demo_pretrain")
    parser.add_argument("--out", default=str(ASSET))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    metrics = train.run(pretrain_config(args.steps), args.workdir)
    print({k: round(v, 4) for k, v in metrics.items() if k.startswith("val/")})
    params = ckpt_lib.load_params(pathlib.Path(args.workdir) / "params.npz")
    import jax  # noqa: PLC0415

    params = jax.tree.map(lambda x: np.asarray(x, np.float16), params)
    ckpt_lib.save_params(args.out, params)
    print(f"wrote {args.out} ({pathlib.Path(args.out).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
