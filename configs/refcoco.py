"""Referring expressions (RefCOCO-style): find the one object a sentence describes, as `<loc>` tokens (and masks).

    paligemma-ft train --config configs/refcoco.py --workdir runs/refcoco \\
        --config.data_dir=~/data/refcoco --config.tokenizer=~/data/paligemma_tokenizer.model

`data_dir` holds `train.jsonl`, `val.jsonl` and the images (and masks) they name; one line per expression, the
sentence as the prefix and its object as the only box, in pixels of the image file:

    {"image": "images/COCO_train2014_000000581857.jpg", "prefix": "the lady with the blue shirt",
     "boxes": [{"xyxy": [103.9, 300.0, 238.2, 477.4], "mask": "masks/581857_1.png"}]}

The target is big_vision's RefCOCO format (its `refcoco_seg` transfer): the box's four `<loc>` tokens, y first,
and no label: `<loc0500><loc0120><loc0930><loc0460>`. Evaluation (type "refexp") takes the first box of each
output and reports big_vision's `boxacc` (`acc50`: IoU >= 0.5, `acc75`), the mean IoU and the format-validity and
empty-output rates.

`configs/refcoco.py:seg` trains segmentation instead, as big_vision's `refcoco_seg`: 16 `<seg>` tokens follow the
box (the mask cropped to the box, encoded by the VQ-VAE mask codec `vae-oid.npz`, `input.data.codec`), and the
evaluator also reports `miou` (the first predicted mask, pasted at image resolution, against the ground truth).
Every line then needs a `mask` (a PNG, nonzero = the object) and the codec file must exist before training starts.

Hyper-parameters follow big_vision's `refcoco_seg` at 448 px: Adam b2 0.999, lr 1e-5, no weight decay, label
smoothing 0.3, gradient clipping 1.0, cosine with 5 % warmup, batch 64, text length 48; about 5 passes over
RefCOCO's ~120k training expressions. `--config.data_dir` is required.
"""

import ml_collections
from ml_collections import config_dict

VARIANTS = ("det", "seg")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the referring-expression config; `arg` is "det" (boxes, the default) or "seg" (boxes and masks)."""
    variant = arg or "det"
    if variant not in VARIANTS:
        raise ValueError(f"configs/refcoco.py:{arg}: unknown variant; use configs/refcoco.py or configs/refcoco.py:seg")
    task = "segment" if variant == "seg" else "detect"
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds the dropout RNG and any random init.

    # --- Data: a JSONL folder -------------------------------------------------------------------------------
    c.data_dir = config_dict.placeholder(str)  # Required: folder with train.jsonl, val.jsonl and the images.
    data_dir = c.get_ref("data_dir")
    c.local_keys = ("train_file", "val_file")  # This file's own keys (the library reads neither).
    c.train_file = "train.jsonl"  # File names inside data_dir.
    c.val_file = "val.jsonl"

    # --- Model ----------------------------------------------------------------------------------------------
    c.model_name_or_preset = "pg2_3b_448"  # Architecture (paligemma_ft.model.presets); big_vision uses 448 px.
    c.model = dict()  # Per-tower overrides; no dropout (the default), as big_vision's refcoco_seg at 448 px.
    c.model_init = "kaggle:google/paligemma-2/jax/paligemma2-3b-pt-448/1"  # Pretrained weights (docs/kaggle.md).
    c.tokenizer = "paligemma_tokenizer.model"  # PaliGemma's SentencePiece model (with <loc>/<seg> pieces).

    data = dict(
        source="jsonl_boxes",  # JSONL rows with `boxes` (data/annotations.py).
        coords="pixel",  # Boxes in pixels of the image file ("normalized": fractions of the image side).
        task=task,  # "detect": <loc> x4; "segment": <loc> x4 + <seg> x16 (needs the codec).
        codec="oi",  # The mask codec for "segment": oi = ~/.cache/paligemma_ft/vae-oid.npz, or a path.
    )

    # --- Input pipeline -------------------------------------------------------------------------------------
    c.input = dict(
        data=dict(data, path=data_dir + "/" + c.get_ref("train_file"), order="listed"),
        prefix="detect",  # Unused: every line has its sentence as the prefix.
        res=448,  # Image side in pixels; must match the model.
        text_len=48,  # big_vision's refcoco_seg length: sentence + separator + 20 location/mask tokens + EOS.
        batch_size=64,  # Global batch.
        shuffle_seed=0,
        num_workers=8,
    )

    # --- Optimization ---------------------------------------------------------------------------------------
    c.total_steps = 9_400  # ~5 passes over ~120k expressions at batch 64.
    c.optax_name = "scale_by_adam"
    c.optax = dict(b2=0.999)
    c.lr = 1e-5  # Peak learning rate (big_vision's refcoco_seg at 448 px).
    c.wd = 0.0  # No weight decay.
    c.grad_clip_norm = 1.0  # Clip the global gradient norm.
    c.label_smoothing = 0.3  # big_vision's refcoco_seg smooths the targets.
    c.grad_accum_steps = 1  # Micro-batches per step.
    c.schedule = dict(decay_type="cosine", warmup_percent=0.05)  # Every parameter trains.
    c.trainable_dtype = "float32"  # Storage dtype of trained parameters.
    c.frozen_dtype = None  # Storage dtype of frozen ones (none here).

    # --- Devices and checkpoints ----------------------------------------------------------------------------
    c.mesh = [("data", -1)]
    c.sharding_strategy = [(".*", 'fsdp(axis="data")')]
    c.ckpt_steps = 1000
    c.keep_ckpts = 2

    # --- Evaluation on val.jsonl (at step 0, every 2000 steps and at the end) ---------------------------------
    c.evals = dict(
        val=dict(
            type="refexp",  # acc50 / acc75 of the first box (big_vision's boxacc), mean IoU, validity.
            data=dict(data, path=data_dir + "/" + c.get_ref("val_file")),
            batch_size=64,
            max_decode_len=24 if task == "segment" else 8,  # 4 <loc> (+ 16 <seg>) tokens, then EOS.
            constrain="refseg" if task == "segment" else "refexp",  # Every output parses (paligemma_ft/constrain.py).
            codec="oi" if task == "segment" else "",  # Masks are scored when a codec is given (miou).
            log_steps=2000,
        ),
    )
    return c
