"""Question-answering metrics: exact match, VQAv2 accuracy with the official answer normalization, and ANLS.

* `acc`: exact match with the first reference (the canonical answer), after stripping and (by default)
  lower-casing, as big_vision's `transfers/vqa` evaluator; `acc_any`: exact match with any reference.
* `vqav2_acc`: the official VQAv2 metric. Prediction and answers go through `normalize_vqa_answer`; with
  several reference answers the score is min(1, #matching others / 3) averaged over the leave-one-out subsets
  (10 choose 9 for VQAv2's ten answers), as the official script does. With a single reference it is the exact
  match of the normalized strings (the leave-one-out form would always be 0). One deliberate difference: the
  official script normalizes only when the ten answers disagree; we always normalize (more lenient, and the same
  whenever the annotators disagree).
* `anls`: Average Normalized Levenshtein Similarity (DocVQA, theta = 0.5): per reference
  1 - lev(a, b) / max(|a|, |b|) if that distance is below theta, else 0, maximised over references; strings are
  lower-cased and their whitespace collapsed first.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from paligemma_ft.evaluate.ids import check_same_ids

# Characters the official VQAv2 evaluation strips or turns into spaces (see `_strip_punctuation`).
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_ARTICLES = frozenset(["a", "an", "the"])
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# Apostrophe-less spellings -> the contraction. Spellings that are ordinary words ("shed", "wed", "ill", "well",
# "hell", "its", "lets", "were") are left out on purpose.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "couldve": "could've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hes": "he's",
    "hows": "how's",
    "im": "i'm",
    "isnt": "isn't",
    "itll": "it'll",
    "ive": "i've",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "oclock": "o'clock",
    "shant": "shan't",
    "shes": "she's",
    "shouldnt": "shouldn't",
    "shouldve": "should've",
    "thats": "that's",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "werent": "weren't",
    "weve": "we've",
    "whats": "what's",
    "wheres": "where's",
    "whos": "who's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "wouldve": "would've",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _strip_punctuation(text: str) -> str:
    """The official rule: each mark is deleted where it touches a space (or the answer has a digit,digit
    group such as 2,000), otherwise replaced by a space (`t-shirt` -> `t shirt`); periods are removed unless a
    digit follows (`3.5` stays). The conditions look at the original text, as the official script does."""
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or glued) else " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """VQAv2 answer normalization: punctuation, lower-case, number words -> digits, articles, contractions.

    Examples: "Two dogs." -> "2 dogs"; "the T-shirt" -> "t shirt"; "dont know" -> "don't know"; "2,000" -> "2000".
    """
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answer: str, *, lowercase: bool = True) -> float:
    """1.0 when the stripped strings are equal (case-insensitive by default), else 0.0."""
    a, b = prediction.strip(), answer.strip()
    return float(a.lower() == b.lower() if lowercase else a == b)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy of one prediction: leave-one-out mean of min(1, #matches / 3), after normalization.

    With a single answer, the normalized exact match (see the module docstring).
    """
    if not answers:
        raise ValueError("vqa_accuracy: `answers` is empty")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = [g == pred for g in gts]
    total = sum(matches)
    # Leaving answer i out leaves `total - matches[i]` matching answers among the others.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], theta: float = 0.5) -> float:
    """ANLS of one prediction: max over answers of 1 - NL if NL < theta else 0 (NL: normalized Levenshtein)."""
    if not answers:
        raise ValueError("anls: `answers` is empty")
    clean = lambda s: " ".join(s.strip().lower().split())  # noqa: E731
    pred, best = clean(prediction), 0.0
    for answer in answers:
        gt = clean(answer)
        longest = max(len(pred), len(gt))
        nl = levenshtein(pred, gt) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < theta else 0.0)
    return best


def vqa_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    anls_theta: float = 0.5,
    lowercase: bool = True,
) -> dict[str, Any]:
    """All QA metrics over a split.

    Args:
      predictions: id -> predicted answer.
      references: id -> non-empty list of reference answers; the first is the canonical one used by `acc`.
      anls_theta: ANLS threshold.
      lowercase: compare case-insensitively in `acc` / `acc_any`.

    Returns:
      A dict with floats `acc`, `acc_any`, `vqav2_acc`, `anls`, int `n`, `per_example`
      (id -> {"acc", "acc_any", "vqav2_acc", "anls"}) and `warnings` (list of str).
    """
    check_same_ids(predictions, references, "vqa_metrics")
    per: dict[Hashable, dict[str, float]] = {}
    for k, pred in predictions.items():
        answers = references[k]
        if isinstance(answers, str) or not answers:
            raise ValueError(f"references[{k!r}] must be a non-empty list of strings, got {answers!r}")
        per[k] = {
            "acc": exact_match(pred, answers[0], lowercase=lowercase),
            "acc_any": max(exact_match(pred, a, lowercase=lowercase) for a in answers),
            "vqav2_acc": vqa_accuracy(pred, answers),
            "anls": anls(pred, answers, anls_theta),
        }
    out: dict[str, Any] = {
        name: sum(p[name] for p in per.values()) / len(per) for name in ("acc", "acc_any", "vqav2_acc", "anls")
    }
    out.update(n=len(per), per_example=per, warnings=[])
    return out
