"""Detection: the `<loc>` parser on hand-made and random outputs, IoU and AP with hand-computed values."""

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from paligemma_ft.evaluate.detection import (
    Box,
    average_precision,
    detection_metrics,
    encode_box,
    encode_detections,
    iou,
    parse_detections,
)


def locs(*bins):
    return "".join(f"<loc{b:04d}>" for b in bins)


def test_parse_well_formed():
    text = f"{locs(0, 0, 1023, 1023)} cat ; {locs(100, 200, 300, 400)}  Big   dog "
    boxes, ok = parse_detections(text)
    assert ok
    assert boxes == [Box("cat", 0.0, 0.0, 1.0, 1.0), Box("Big dog", 100 / 1023, 200 / 1023, 300 / 1023, 400 / 1023)]


@pytest.mark.parametrize(
    "text, n_boxes, ok",
    [
        ("", 0, True),  # Nothing detected.
        ("   ", 0, True),
        ("hello world", 0, False),  # Garbage.
        ("<loc0100><loc0200><loc0300> cat", 0, False),  # Partial loc group.
        (f"{locs(100, 200, 300, 400)} cat ; <loc0100><loc02", 1, False),  # Truncated second object.
        (f"{locs(500, 100, 400, 200)} cat", 0, False),  # y1 < y0.
        (f"{locs(100, 300, 200, 300)} cat", 0, False),  # x1 == x0: empty box.
        (f"{locs(100, 200, 1024, 400)} cat", 0, False),  # Bin beyond 1023.
        ("<loc01000><loc0200><loc0300><loc0400> cat", 0, False),  # Five digits.
        (f"{locs(100, 200, 300, 400)}", 0, False),  # Missing label.
        (f"{locs(100, 200, 300, 400)} cat ;", 1, False),  # Trailing separator: an empty segment.
        (f"junk {locs(100, 200, 300, 400)} cat", 0, False),  # Text before the locations.
        (f"{locs(100, 200, 300, 400)} cat {locs(1, 2, 3, 4)} dog", 0, False),  # Missing separator.
        (f"{locs(100, 200, 300, 400)}<seg012><seg127> cat", 1, True),  # Segmentation tokens are skipped.
        ("<loc0100><loc0200><loc0300><loc0400> ; ; <eos>", 0, False),
    ],
)
def test_parse_malformed_never_crashes(text, n_boxes, ok):
    boxes, got_ok = parse_detections(text)
    assert (len(boxes), got_ok) == (n_boxes, ok)


def test_loc_bins_option():
    boxes, ok = parse_detections(f"{locs(100, 200, 1500, 2000)} cat", loc_bins=2048)
    assert ok and boxes[0].y1 == pytest.approx(1500 / 2047)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "<loc0000>",
                "<loc0512>",
                "<loc1023>",
                "<loc9999>",
                "<loc12>",
                " cat",
                "dog",
                " ; ",
                ";",
                "<seg001>",
                "<eos>",
                " ",
                "<",
                ">",
                "loc",
                "\n",
            ]
        ),
        max_size=14,
    )
)
def test_parse_random_token_soup(pieces):
    boxes, ok = parse_detections("".join(pieces))
    assert isinstance(ok, bool)
    for b in boxes:
        assert 0.0 <= b.y0 < b.y1 <= 1.0 and 0.0 <= b.x0 < b.x1 <= 1.0 and b.label


def test_encode_box_rounds_and_clips():
    assert encode_box(Box("cat", 0.5, 0.0, 1.0, 0.25)) == "<loc0512><loc0000><loc1023><loc0256> cat"  # 511.5->512
    assert encode_box(Box("dog", -0.1, 0.1, 1.2, 0.9)) == "<loc0000><loc0102><loc1023><loc0921> dog"
    boxes = [Box("cat", 100 / 1023, 200 / 1023, 300 / 1023, 400 / 1023), Box("dog", 0.0, 0.0, 1.0, 1.0)]
    text = encode_detections(boxes)
    assert text == f"{locs(100, 200, 300, 400)} cat ; {locs(0, 0, 1023, 1023)} dog"
    parsed, ok = parse_detections(text)
    assert ok and parsed == boxes


def test_iou_by_hand():
    a = Box("x", 0.0, 0.0, 0.5, 0.5)
    assert iou(a, Box("y", 0.25, 0.25, 0.75, 0.75)) == pytest.approx(0.0625 / 0.4375)  # 1/7
    assert iou(a, a) == 1.0
    assert iou(a, Box("x", 0.5, 0.5, 1.0, 1.0)) == 0.0  # Touching corners.
    assert iou(a, Box("x", 0.0, 0.0, 0.5, 1.0)) == pytest.approx(0.5)  # Contained, half the area.


A = Box("cat", 0.0, 0.0, 0.5, 0.5)
A_NEAR = Box("cat", 0.0, 0.0, 0.5, 0.45)  # IoU 0.9 with A.
C = Box("cat", 0.5, 0.5, 1.0, 1.0)
FAR = Box("cat", 0.6, 0.0, 0.9, 0.3)  # IoU 0 with A and C.


def test_average_precision_by_hand():
    assert average_precision([[A_NEAR]], [[A]]) == 1.0
    # Two ground-truth cats, one found: recall 0.5 at precision 1 -> 51 of the 101 recall points (0 .. 0.5).
    assert average_precision([[A_NEAR, FAR], []], [[A], [C]]) == pytest.approx(51 / 101)
    # A false positive ranked before the true positive: precision 0.5 at recall 1 -> 0.5 everywhere.
    assert average_precision([[FAR, A_NEAR]], [[A]]) == pytest.approx(0.5)
    # IoU 1/7 is below 0.5 (a miss) but above 0.1.
    quarter = Box("cat", 0.25, 0.25, 0.75, 0.75)
    assert average_precision([[quarter]], [[A]], 0.5) == 0.0
    assert average_precision([[quarter]], [[A]], 0.1) == 1.0
    # Labels are averaged: cat perfect, dog missed; a bird that is not in the ground truth is ignored.
    dog = Box("Dog", 0.5, 0.5, 1.0, 1.0)
    bird = Box("bird", 0.5, 0.5, 1.0, 1.0)
    assert average_precision([[A_NEAR, bird]], [[A, dog]]) == pytest.approx(0.5)
    assert average_precision([[A_NEAR, Box("dog ", 0.5, 0.5, 1.0, 1.0)]], [[A, dog]]) == 1.0  # Label case.
    assert average_precision([[A]], [[]]) != average_precision([[A]], [[]])  # nan without ground truth.


def test_average_precision_ranks_by_position_in_output():
    # Image 0 finds its cat as its 2nd box; image 1's only box (1st) is a false cat. Ranked by position, the
    # false positive comes first: precision 0.5 at recall 0.5 -> 0.5 on 51 recall points.
    preds = [[Box("dog", 0.0, 0.5, 0.5, 1.0), A_NEAR], [FAR]]
    gts = [[A], [C]]
    assert average_precision(preds, gts) == pytest.approx(0.5 * 51 / 101)


def test_each_ground_truth_matches_once():
    # Two predictions on the same single ground truth: the second is a false positive.
    assert average_precision([[A_NEAR, A]], [[A]]) == 1.0  # Precision 1 at recall 1 is reached first.
    assert average_precision([[A_NEAR, A], [C]], [[A], [C, C]]) == pytest.approx(67 / 101)  # TP, TP, FP; recall 2/3.


def test_detection_metrics_split():
    full = locs(0, 0, 1023, 1023)
    preds = {
        "a": f"{full} cat",  # Exact.
        "b": f"{locs(0, 0, 634, 1023)} dog",  # IoU 634/1023 = 0.6197 with the full box.
        "c": "garbage",
        "d": f"{full} cat ; <loc01",  # One good box, one malformed segment.
    }
    refs = {"a": [f"{full} cat"], "b": [f"{full} dog"], "c": [f"{full} cat"], "d": [f"{full} cat"]}
    out = detection_metrics(preds, refs)
    assert out["n"] == 4 and out["malformed_segments"] == 2
    assert out["well_formed_rate"] == pytest.approx(0.5)
    per = out["per_example"]
    assert per["a"]["iou"] == 1.0 and per["b"]["iou"] == pytest.approx(634 / 1023) and per["c"]["iou"] == 0.0
    assert (per["c"]["n_pred"], per["c"]["n_ref"], per["c"]["well_formed"]) == (0, 1, 0.0)
    # cat: 3 ground truths, predictions a (pos 0, TP), d (pos 0, TP): recall 2/3 at precision 1 at every
    # threshold -> 67/101. dog: AP 1 for thresholds 0.5, 0.55, 0.6 and 0 above.
    cat = 67 / 101
    assert out["ap50"] == pytest.approx((cat + 1) / 2)
    assert out["ap75"] == pytest.approx(cat / 2)
    assert out["map"] == pytest.approx((cat + 0.3) / 2)
    assert out["mean_iou"] == pytest.approx((1 + 634 / 1023 + 0 + 1) / 4)
    assert out["boxes"]["d"]["prediction"] == [Box("cat", 0.0, 0.0, 1.0, 1.0)]
    assert not out["warnings"]
    none = detection_metrics({"x": "garbage"}, {"x": ["also garbage"]})
    assert len(none["warnings"]) == 2 and none["ap50"] != none["ap50"]
