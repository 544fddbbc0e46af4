"""Every metric refuses predictions and references that describe different examples, naming the ids."""

import pytest

from paligemma_ft.evaluate import caption_metrics, detection_metrics, vqa_metrics

METRICS = [
    (caption_metrics, "a red circle", ["a red circle"]),
    (vqa_metrics, "two", ["two"]),
    (detection_metrics, "<loc0000><loc0000><loc0512><loc0512> circle", "<loc0000><loc0000><loc0512><loc0512> circle"),
]


@pytest.mark.parametrize("metric, pred, ref", METRICS, ids=lambda m: getattr(m, "__name__", ""))
def test_different_ids_are_named(metric, pred, ref):
    with pytest.raises(ValueError, match=r"without references \['b'\], without prediction \['c'\]"):
        metric({"a": pred, "b": pred}, {"a": ref, "c": ref})


@pytest.mark.parametrize("metric, pred, ref", METRICS, ids=lambda m: getattr(m, "__name__", ""))
def test_no_examples_is_an_error_naming_the_metric(metric, pred, ref):
    with pytest.raises(ValueError, match=f"{metric.__name__}: no examples to score"):
        metric({}, {})
