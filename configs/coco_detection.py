"""COCO detection: fine-tune PaliGemma 2 3B (448 px) to write COCO's boxes as `<loc>` tokens, box mAP on val2017.

    paligemma-ft train --config configs/coco_detection.py --workdir runs/coco_det \\
        --config.data_dir=~/data/coco --config.tokenizer=~/data/paligemma_tokenizer.model

`data_dir` holds COCO 2017 as distributed on cocodataset.org:

    coco/
      annotations/instances_train2017.json   annotations/instances_val2017.json
      train2017/*.jpg                         val2017/*.jpg

Each image with at least one (non-crowd) object is one training example: the prefix names the categories present,
the suffix lists every object as PaliGemma's detection text (data/localization.py):

    "detect dog ; person"  ->  "<loc0102><loc0031><loc0911><loc0555> person ; <loc0400><loc0420><loc0999><loc0870> dog"

with each coordinate round(v * 1023) of the box normalised to the image (y first), objects in a new random order
every epoch (`order="random"`: the model must find them all, not learn a position in a list). Evaluation reads
every val2017 image once, prompts with the categories present (`prompt_labels="present"`; "all" lists all 80), and
reports COCO's box AP (`map` = mAP@[.5:.95], `ap50`, `ap75`), the format-validity and empty-output rates, a
predictions JSONL, an HTML gallery and a PNG contact sheet. Outputs carry no confidence scores, so AP ranks boxes
by their position in the output (evaluate/detection.py). Decoding is constrained (`constrain="detect"`): every
output parses. Bad annotations (boxes outside the image, empty boxes, unknown categories) skip their image and are
listed with the annotation id in `bad_input.jsonl`.

There is no detection transfer config in big_vision; the numbers follow its RefCOCO and captioning transfers
(Adam b2 0.999, lr 1e-5, gradient clipping 1.0, cosine with 5 % warmup, 448 px for small objects). About 10
epochs over the ~117k training images at batch 64. Long object lists are cut at `text_len` (and counted).
`--config.data_dir` is required.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the COCO detection config (big_vision key names). `arg` is unused."""
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds the dropout RNG and any random init.

    # --- Data: COCO 2017 layout -----------------------------------------------------------------------------
    c.data_dir = config_dict.placeholder(str)  # Required: folder with annotations/, train2017/, val2017/.
    data_dir = c.get_ref("data_dir")  # Paths below follow `--config.data_dir`.

    # --- Model ----------------------------------------------------------------------------------------------
    c.model_name_or_preset = "pg2_3b_448"  # Architecture (paligemma_ft.model.presets).
    c.model = dict()  # Per-tower overrides of the preset.
    c.model_init = "kaggle:google/paligemma-2/jax/paligemma2-3b-pt-448/1"  # Pretrained weights (docs/kaggle.md).
    c.tokenizer = "paligemma_tokenizer.model"  # PaliGemma's SentencePiece model (with <loc>/<seg> pieces).

    # --- Input pipeline -------------------------------------------------------------------------------------
    c.input = dict(
        data=dict(
            source="coco_instances",  # Boxes (and masks) from an instances file: data/annotations.py.
            annotations=data_dir + "/annotations/instances_train2017.json",
            image_dir=data_dir + "/train2017",
            task="detect",  # "segment" adds 16 <seg> tokens per object (needs vae-oid.npz: input.data.codec).
            order="random",  # Objects in a new order every epoch ("listed": as annotated, "area": largest first).
            prompt_labels="present",  # The prefix names the categories present in the image.
        ),
        prefix="detect",  # Unused: every example gets "detect <its labels>".
        res=448,  # Image side in pixels; must match the model.
        text_len=192,  # ~7 tokens per object + the prompt: about 20 objects; longer rows are cut and counted.
        batch_size=64,  # Global batch.
        shuffle_seed=0,  # Shuffle order (reshuffled every epoch).
        num_workers=8,  # JPEG decoding threads: COCO images are large.
    )

    # --- Optimization ---------------------------------------------------------------------------------------
    c.total_steps = 18_000  # ~10 epochs of ~117k images at batch 64.
    c.optax_name = "scale_by_adam"
    c.optax = dict(b2=0.999)
    c.lr = 1e-5  # Peak learning rate.
    c.wd = 0.0  # No weight decay (as big_vision's RefCOCO transfer).
    c.grad_clip_norm = 1.0  # Clip the global gradient norm.
    c.label_smoothing = 0.0  # One-hot targets.
    c.grad_accum_steps = 1  # Micro-batches per step: the same update with 1/n of the activation memory.
    c.schedule = dict(decay_type="cosine", warmup_percent=0.05)  # One schedule: every parameter trains.
    c.trainable_dtype = "float32"  # Storage dtype of trained parameters.
    c.frozen_dtype = None  # Storage dtype of frozen ones (none here); None = float32.

    # --- Devices and checkpoints ----------------------------------------------------------------------------
    c.mesh = [("data", -1)]
    c.sharding_strategy = [(".*", 'fsdp(axis="data")')]
    c.ckpt_steps = 1000  # Resumable checkpoint interval in steps (and at the end).
    c.keep_ckpts = 2  # Checkpoints kept on disk (the latest ones).

    # --- Evaluation on val2017 (at step 0, every 3000 steps and at the end) -----------------------------------
    c.evals = dict(
        val=dict(
            type="detection",  # Box AP at IoU 0.5:0.95 (COCO's), validity and empty-output rates.
            data=dict(
                source="coco_instances",
                annotations=data_dir + "/annotations/instances_val2017.json",
                image_dir=data_dir + "/val2017",
                task="detect",
                order="listed",
            ),
            batch_size=64,  # Images decoded at once.
            max_decode_len=192,  # Output tokens: room for about 25 objects.
            constrain="detect",  # Grammar-constrained decoding: every output parses (paligemma_ft/constrain.py).
            log_steps=3000,
        ),
    )
    return c
