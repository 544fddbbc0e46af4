"""COCO captions: fine-tune PaliGemma 2 3B (224 px) on train2017's captions, CIDEr on val2017.

    paligemma-ft train --config configs/coco_captions.py --workdir runs/coco \\
        --config.data_dir=~/data/coco --config.tokenizer=~/data/paligemma_tokenizer.model

`data_dir` holds COCO 2017 as distributed on cocodataset.org:

    coco/
      annotations/captions_train2017.json   annotations/captions_val2017.json
      train2017/*.jpg                        val2017/*.jpg

Training reads one example per caption annotation; evaluation reads one example per val2017 image with all its
captions (about 5) as references, and scores the decoded captions with CIDEr (and BLEU-1..4, ROUGE-L).

Hyper-parameters follow big_vision's `transfers/cococap.py` at its recommended setting (lr 1e-5, wd 1e-6, Adam
b2 0.999, gradient clipping 1.0, cosine schedule with 5 % warmup, batch 256, text length 32, beam search with 2
beams for evaluation). It trains every parameter, which needs accelerator memory for a 3B model with Adam (a TPU
slice or several large GPUs); on one GPU, freeze the image encoder (`schedule`) or lower `input.batch_size`.
`--config.data_dir` is required: without it the run stops when it opens the data, naming the missing path.

Memory and speed: `paligemma-ft plan --config configs/coco_captions.py --device H100 --policies` (your GPU or TPU; extra
overrides as for `train`) sizes the step in the target's compute dtype (bfloat16 on GPUs and TPUs) under each
rematerialization policy and names the lightest that fits: none > dots > dots_with_no_batch_dims_saveable > full
(big_vision's default: least memory, about a third more compute). Set it with the override `plan` prints.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the COCO captioning config (big_vision key names). `arg` is unused."""
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds the dropout RNG and any random init.

    # --- Data: COCO 2017 layout -----------------------------------------------------------------------------
    c.data_dir = config_dict.placeholder(str)  # Required: folder with annotations/, train2017/, val2017/.
    data_dir = c.get_ref("data_dir")  # Paths below follow `--config.data_dir`.

    # --- Model ----------------------------------------------------------------------------------------------
    c.model_name_or_preset = "pg2_3b_224"  # Architecture (paligemma_ft.model.presets).
    c.model = dict()  # Per-tower overrides of the preset.
    c.model_init = "kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224/1"  # Pretrained weights (docs/kaggle.md).
    c.tokenizer = "paligemma_tokenizer.model"  # Path of PaliGemma's SentencePiece model.

    # --- Input pipeline -------------------------------------------------------------------------------------
    c.input = dict(
        data=dict(
            source="coco",
            annotations=data_dir + "/annotations/captions_train2017.json",
            image_dir=data_dir + "/train2017",
        ),
        prefix="caption en",  # PaliGemma's captioning prompt.
        lowercase=False,  # Keep COCO's casing (the CIDEr tokenizer lower-cases anyway).
        res=224,  # Image side in pixels; must match the model.
        text_len=32,  # big_vision's cococap length: COCO captions are short.
        batch_size=256,  # Global batch.
        shuffle_seed=0,  # Shuffle order (reshuffled every epoch).
        num_workers=8,  # JPEG decoding threads: COCO images are large.
    )

    # --- Optimization ---------------------------------------------------------------------------------------
    # About one pass over train2017's ~592k captions; big_vision's cococap trains 5 epochs over ~113k images
    # (one random caption each), a similar number of examples.
    c.total_steps = 2_300
    c.optax_name = "scale_by_adam"
    c.optax = dict(b2=0.999)
    c.lr = 1e-5  # Peak learning rate (big_vision's sweep: 1e-5).
    c.wd = 1e-6  # Decoupled weight decay on `.*/kernel$` (the ViT's kernels; Gemma has none).
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

    # --- Evaluation on val2017 (at step 0 and at the end; `log_steps` / `log_percent` add more) ----------------
    c.evals = dict(
        val=dict(
            type="coco_caption",  # big_vision's name; CIDEr (the metric COCO reports), BLEU-1..4, ROUGE-L.
            data=dict(
                source="coco",
                annotations=data_dir + "/annotations/captions_val2017.json",
                image_dir=data_dir + "/val2017",
            ),
            batch_size=64,  # Images decoded at once.
            max_decode_len=32,  # Caption tokens.
            sampler="beam(2)",  # big_vision's cococap decodes with 2 beams.
            bootstrap=1000,  # Resamples for the 95 % confidence intervals (0 turns them off).
        ),
    )
    return c
