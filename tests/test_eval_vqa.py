"""VQA metrics: VQAv2 normalization, the leave-one-out accuracy, ANLS and the split-level dict (hand-computed)."""

import pytest

from paligemma_ft.evaluate.vqa import anls, exact_match, levenshtein, normalize_vqa_answer, vqa_accuracy, vqa_metrics


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),  # Number word, final period, case.
        ("the T-shirt", "t shirt"),  # Article; a hyphen not touching a space becomes a space.
        ("an apple", "apple"),
        ("A", ""),  # Only an article.
        ("yes, it is!", "yes it is"),  # ", " touches a space: marks are deleted.
        ("2,000", "2000"),  # A digit,digit group: marks are deleted, not spaced.
        ("3.5", "3.5"),  # A period before a digit stays.
        ("dont know", "don't know"),  # Contractions get their apostrophe.
        ("Isnt it", "isn't it"),
        ("ten", "10"),
        ("none", "0"),
        ("  black and\twhite \n", "black and white"),
        ("well", "well"),  # An ordinary word is not a contraction.
        ("(left)", "left"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matching, expected):
    # 10 answers, `matching` of them "2". Leaving out a matching answer leaves matching-1 among the other nine,
    # e.g. 3 matches: (3 * min(1, 2/3) + 7 * min(1, 3/3)) / 10 = 0.9.
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("Two.", answers) == pytest.approx(expected)


def test_vqa_accuracy_single_answer_is_normalized_exact_match():
    assert vqa_accuracy("The dog", ["dog"]) == 1.0
    assert vqa_accuracy("dogs", ["dog"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("dog", [])


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2


def test_anls_by_hand():
    assert anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5 characters.
    assert anls("abc", ["xyz"]) == 0.0  # NL = 1.
    assert anls("ab", ["ac"]) == 0.0  # NL = 0.5 is not below theta = 0.5.
    assert anls("ab", ["ac"], theta=0.6) == pytest.approx(0.5)
    assert anls(" Hello  World ", ["hello world"]) == 1.0  # Case and whitespace do not count.
    assert anls("helo", ["xyz", "hello", "help"]) == pytest.approx(0.8)  # Best reference (help: 1 - 1/4 = 0.75).
    assert anls("", [""]) == 1.0


def test_exact_match():
    assert exact_match(" Yes ", "yes") == 1.0
    assert exact_match("Yes", "yes", lowercase=False) == 0.0


def test_vqa_metrics_split():
    preds = {"q1": "Yes", "q2": "two", "q3": "red car", "q4": "blu"}
    refs = {"q1": ["yes"], "q2": ["3", "2", "2", "2"], "q3": ["a red car", "red car"], "q4": ["blue"]}
    out = vqa_metrics(preds, refs)
    per = out["per_example"]
    assert [per[k]["acc"] for k in preds] == [1.0, 0.0, 0.0, 0.0]
    assert [per[k]["acc_any"] for k in preds] == [1.0, 0.0, 1.0, 0.0]
    # q2: "two" -> "2" matches 3 of 4; leave-one-out: (min(1, 3/3) + 3 * min(1, 2/3)) / 4 = 0.75.
    # q3: both answers normalize to "red car": each leaves one match: 1/3.
    assert [per[k]["vqav2_acc"] for k in preds] == pytest.approx([1.0, 0.75, 1 / 3, 0.0])
    # q2: "two" vs "2": NL = 1 -> 0. q3: exact second reference. q4: 1 - 1/4.
    assert [per[k]["anls"] for k in preds] == pytest.approx([1.0, 0.0, 1.0, 0.75])
    assert out["acc"] == pytest.approx(0.25) and out["acc_any"] == pytest.approx(0.5)
    assert out["vqav2_acc"] == pytest.approx((1 + 0.75 + 1 / 3) / 4)
    assert out["anls"] == pytest.approx(2.75 / 4) and out["n"] == 4
    with pytest.raises(ValueError, match="q5"):
        vqa_metrics({"q5": "x"}, {"q1": ["x"]})
