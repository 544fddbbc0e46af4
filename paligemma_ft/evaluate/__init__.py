"""Evaluation: metrics for captions, VQA and detection, evaluators chosen by name, predictions and galleries.

    from paligemma_ft.evaluate import make_evaluator
    ev = make_evaluator("val_cap", {"type": "caption", "bootstrap": 1000})
    metrics = ev.run(predictor, batches, outdir=workdir, step=step)  # {"cider": ..., "n": 37.0, ...}

pycocoevalcap (the `eval` extra) is imported only when caption metrics are computed.
"""

from paligemma_ft.evaluate.caption import caption_metrics, tokenize_caption
from paligemma_ft.evaluate.detection import (
    Box,
    average_precision,
    detection_metrics,
    encode_box,
    encode_detections,
    iou,
    parse_detections,
)
from paligemma_ft.evaluate.evaluators import (
    CaptionEvaluator,
    DetectionEvaluator,
    Evaluator,
    PerplexityEvaluator,
    Predictor,
    VqaEvaluator,
    evaluator_type,
    make_evaluator,
)
from paligemma_ft.evaluate.report import write_gallery_html, write_predictions_jsonl
from paligemma_ft.evaluate.vqa import anls, exact_match, normalize_vqa_answer, vqa_accuracy, vqa_metrics

__all__ = [
    "Box",
    "CaptionEvaluator",
    "DetectionEvaluator",
    "Evaluator",
    "PerplexityEvaluator",
    "Predictor",
    "VqaEvaluator",
    "anls",
    "average_precision",
    "caption_metrics",
    "detection_metrics",
    "encode_box",
    "encode_detections",
    "evaluator_type",
    "exact_match",
    "iou",
    "make_evaluator",
    "normalize_vqa_answer",
    "parse_detections",
    "tokenize_caption",
    "vqa_accuracy",
    "vqa_metrics",
    "write_gallery_html",
    "write_predictions_jsonl",
]
