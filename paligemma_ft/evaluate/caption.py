"""Caption metrics: CIDEr, BLEU-1..4, ROUGE-L (and METEOR) through pycocoevalcap, with bootstrap intervals.

Point estimates and per-example scores come from pycocoevalcap's own scorers, so numbers match the COCO caption
toolkit for the same tokens. Two things differ from `pycocoevalcap.eval.COCOEvalCap`:

* **Tokenization needs no Java.** `tokenize_caption` mimics Stanford's PTBTokenizer (`-lowerCase`) followed by
  pycocoevalcap's removal of punctuation tokens. Known differences from the real PTB tokenizer:
  abbreviations lose their final period (`u.s.` -> `u.s`, PTB keeps `u.s.`); brackets are dropped (PTB writes
  `-lrb-`/`-rrb-`, which pycocoevalcap's upper-case punctuation list then fails to remove); `rock'n'roll` stays one
  token (PTB: `rock 'n' roll`). Clitics are split as PTB does (`isn't` -> `is n't`, `dog's` -> `dog 's`);
  hyphenated words, decimals, times, `m/s` and e-mail addresses stay whole; `$`, `%`, `#`, `&` become tokens.
* **Bootstrap confidence intervals.** Examples (image ids) are resampled with replacement and every corpus metric
  is recomputed on each resample. For CIDEr the IDF is recomputed per resample too (a resampled corpus counts a
  duplicated image as several documents, exactly as pycocoevalcap would if handed the resample), so the interval
  includes the IDF's own sampling noise. Recomputing with pycocoevalcap a thousand times is too slow for real
  splits, so resamples use vectorised re-implementations (sparse n-gram tables for CIDEr, sufficient statistics for
  BLEU, per-example means for ROUGE-L) that the tests check against pycocoevalcap on resampled inputs.
  Intervals are percentile intervals (2.5 %, 97.5 %). METEOR gets no interval (its corpus score is not a
  function of per-example numbers we can resample cheaply).

METEOR runs only with `meteor=True` and a `java` on the PATH. It starts a JVM that loads METEOR's paraphrase
tables, which alone takes from seconds to half a minute, so it is off by default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from paligemma_ft.evaluate.ids import check_same_ids

# Punctuation tokens removed after tokenization: pycocoevalcap's list, plus the raw characters that PTB would
# first have rewritten into one of those tokens (`"` -> `` / '') and brackets (see the module docstring).
PUNCTUATION_TOKENS = frozenset(
    [
        "''",
        "'",
        "``",
        "`",
        '"',
        "-LRB-",
        "-RRB-",
        "-LCB-",
        "-RCB-",
        ".",
        "?",
        "!",
        ",",
        ":",
        "-",
        "--",
        "...",
        ";",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
    ]
)
_CLITIC_NT = re.compile(r"(\w)n't\b")
_CLITIC = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
# A token is a clitic, a word whose inner joints may be `-./:,@&'` (black-and-white, 3.5, 10:30, m/s, 2,000), or
# any other single non-space character (punctuation, $, %, ...).
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-./:,@&']\w+)*|\S")

CIDER_SIGMA = 6.0  # pycocoevalcap's Gaussian length-penalty width.
SMALL_SPLIT = 50  # Below this many images the CIDEr IDF is too noisy to trust: warn.
_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9  # pycocoevalcap's smoothing constants.


def tokenize_caption(text: str) -> str:
    """Lower-cases, splits PTB-style and drops punctuation tokens; returns the tokens joined by single spaces."""
    text = text.replace("\n", " ").lower()
    text = _CLITIC.sub(r"\1 '\2", _CLITIC_NT.sub(r"\1 n't", text))
    return " ".join(t for t in _TOKEN.findall(text) if t not in PUNCTUATION_TOKENS)


def _check_inputs(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> list:
    """Returns the ids in a fixed order after checking both mappings cover the same ids with >= 1 reference."""
    ids = check_same_ids(predictions, references, "caption_metrics")
    for k, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{k!r}] must be a non-empty list of strings, got {refs!r}")
    return ids


def _pycoco_scores(gts: dict, res: dict, *, meteor: bool, warnings: list[str]) -> tuple[dict, dict]:
    """Runs pycocoevalcap's scorers on tokenized inputs; returns (corpus scores, per-example arrays in key order)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:  # The scorers are an optional extra.
        raise ImportError("caption metrics need pycocoevalcap: pip install 'paligemma-ft[eval]'") from e
    corpus, per = {}, {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        corpus[f"bleu_{k + 1}"] = float(bleu[k])
    per["bleu_4"] = np.asarray(bleu_each[3], np.float64)
    cider, per["cider"] = Cider().compute_score(gts, res)
    corpus["cider"] = float(cider)
    rouge, per["rouge_l"] = Rouge().compute_score(gts, res)
    corpus["rouge_l"] = float(rouge)
    if meteor and shutil.which("java") is None:
        warnings.append("METEOR skipped: no `java` on the PATH.")
    elif meteor:
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            value, per_meteor = scorer.compute_score(gts, res)
            del scorer  # Its __del__ stops the JVM.
            corpus["meteor"] = float(value)
            per["meteor"] = np.asarray(per_meteor, np.float64)
        except Exception as e:  # noqa: BLE001 -- a broken JVM must not lose the other metrics.
            warnings.append(f"METEOR failed and was skipped: {e!r}")
    return corpus, per


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap: vectorised recomputation of each corpus metric for many resamples at once.
# A resample is a row of multiplicities M[r, i] (how often image i was drawn), summing to N.
# ---------------------------------------------------------------------------------------------------------------


def _resample_counts(n: int, num: int, seed: int) -> np.ndarray:
    """f64[num, n]: multiplicities of `num` resamples of `n` ids drawn with replacement."""
    draws = np.random.default_rng(seed).integers(0, n, size=(num, n))
    flat = (np.arange(num)[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=num * n).reshape(num, n).astype(np.float64)


def _bleu_stats(gts: dict, res: dict) -> np.ndarray:
    """f64[N, 10] per-example BLEU statistics: testlen, closest reflen, guess_1..4, correct_1..4."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    rows = []
    for k in gts:
        c = cook_test(res[k][0], cook_refs(gts[k]), eff="closest")
        rows.append([c["testlen"], c["reflen"], *c["guess"], *c["correct"]])
    return np.asarray(rows, np.float64)


def _bleu_from_stats(totals: np.ndarray) -> np.ndarray:
    """f64[R, 4] corpus BLEU-1..4 from summed statistics f64[R, 10] (pycocoevalcap's formula, 'closest')."""
    testlen, reflen, guess, correct = totals[:, 0], totals[:, 1], totals[:, 2:6], totals[:, 6:10]
    log_p = np.log((correct + _BLEU_TINY) / (guess + _BLEU_SMALL))
    bleu = np.exp(np.cumsum(log_p, axis=1) / np.arange(1, 5))
    ratio = (testlen + _BLEU_TINY) / (reflen + _BLEU_SMALL)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return bleu * brevity[:, None]


@dataclasses.dataclass(frozen=True)
class _CiderTables:
    """Sparse n-gram tables that turn CIDEr into matrix products given IDF weights.

    With w(g) = log(N) - log(max(1, df(g))) >= 0, pycocoevalcap's clipped cosine for one order n is
    sum_g min(tf_h, tf_r) tf_r w^2 / (sqrt(sum_g tf_h^2 w^2) sqrt(sum_g tf_r^2 w^2)): linear in w^2.
    N-grams found in the references of the same set of images have the same df in every resample, so they share
    one column (their coefficients add up). This keeps G small: most 3- and 4-grams occur in one image only, and
    all n-grams absent from every reference share column 0 (df = 0). P is the number of (image, reference) pairs.
    """

    doc: sp.csr_matrix  # [N, G] 1 where image i belongs to column g's set of images.
    num: sp.csr_matrix  # [P*4, G] sum of min(tf_h, tf_r) * tf_r, row = pair * 4 + order.
    hyp: sp.csr_matrix  # [N*4, G] sum of tf_h^2, row = image * 4 + order.
    ref: sp.csr_matrix  # [P*4, G] sum of tf_r^2.
    pair_image: np.ndarray  # i64[P] image of each pair.
    penalty: np.ndarray  # f64[P] Gaussian length penalty of each pair.
    n_refs: np.ndarray  # f64[N]


def _cider_tables(gts: dict, res: dict) -> _CiderTables:
    from pycocoevalcap.cider.cider_scorer import precook

    hyps = [precook(res[k][0]) for k in gts]
    refs = [[precook(r) for r in gts[k]] for k in gts]
    images_of: dict[tuple, list[int]] = {}
    for i, counts in enumerate(refs):
        for g in set().union(*counts):
            images_of.setdefault(g, []).append(i)
    column_of_set: dict[tuple, int] = {(): 0}
    col = {g: column_of_set.setdefault(tuple(s), len(column_of_set)) for g, s in images_of.items()}
    # pycocoevalcap's "length" counts bigrams (a quirk kept for equality): it feeds the length penalty.
    length = lambda counts: sum(c for g, c in counts.items() if len(g) == 2)  # noqa: E731
    # COO triplets (row, column, value) of the three sparse tables.
    num: tuple[list[int], list[int], list[float]] = ([], [], [])
    hyp: tuple[list[int], list[int], list[float]] = ([], [], [])
    ref: tuple[list[int], list[int], list[float]] = ([], [], [])
    pair_image: list[int] = []
    penalty: list[float] = []
    for i, (h, rs) in enumerate(zip(hyps, refs)):
        hyp[0].extend(i * 4 + len(g) - 1 for g in h)
        hyp[1].extend(col.get(g, 0) for g in h)
        hyp[2].extend(float(c * c) for c in h.values())
        for r in rs:
            p = len(pair_image)
            ref[0].extend(p * 4 + len(g) - 1 for g in r)
            ref[1].extend(col[g] for g in r)
            ref[2].extend(float(c * c) for c in r.values())
            both = [g for g in h if g in r]
            num[0].extend(p * 4 + len(g) - 1 for g in both)
            num[1].extend(col[g] for g in both)
            num[2].extend(float(min(h[g], r[g]) * r[g]) for g in both)
            pair_image.append(i)
            penalty.append(math.exp(-(float(length(h) - length(r)) ** 2) / (2 * CIDER_SIGMA**2)))
    n, pairs, g = len(gts), len(pair_image), len(column_of_set)
    doc_rows = [i for s in column_of_set for i in s]
    doc_cols = [c for s, c in column_of_set.items() for _ in s]
    # The COO -> CSR conversion sums duplicate entries: that is what merges n-grams into shared columns.
    build = lambda t, rows: sp.csr_matrix((t[2], (t[0], t[1])), shape=(rows, g))  # noqa: E731
    doc = sp.csr_matrix((np.ones(len(doc_rows)), (doc_rows, doc_cols)), shape=(n, g))
    return _CiderTables(
        doc,
        build(num, pairs * 4),
        build(hyp, n * 4),
        build(ref, pairs * 4),
        np.asarray(pair_image),
        np.asarray(penalty),
        np.asarray([len(rs) for rs in refs], np.float64),
    )


def _cider_image_scores(t: _CiderTables, counts: np.ndarray) -> np.ndarray:
    """f64[N, R] per-image CIDEr under the IDF of each resample; `counts` f64[R, N] multiplicities."""
    n, r = counts.shape[1], counts.shape[0]
    df = np.asarray(t.doc.T @ counts.T)  # [G, R]
    w2 = (np.log(float(n)) - np.log(np.maximum(1.0, df))) ** 2
    num = np.asarray(t.num @ w2).reshape(-1, 4, r)
    norm_h = np.sqrt(np.asarray(t.hyp @ w2)).reshape(n, 4, r)[t.pair_image]
    norm_r = np.sqrt(np.asarray(t.ref @ w2)).reshape(-1, 4, r)
    denom = norm_h * norm_r
    # pycocoevalcap divides only when both norms are non-zero; otherwise the numerator is already zero.
    val = np.divide(num, denom, out=np.zeros_like(num), where=denom != 0) * t.penalty[:, None, None]
    pairs = len(t.pair_image)
    per_image = sp.csr_matrix((np.ones(pairs), (t.pair_image, np.arange(pairs))), shape=(n, pairs)) @ val.sum(1)
    return per_image * 10.0 / (4.0 * t.n_refs[:, None])  # Mean over orders, mean over references, times 10.


def _cider_resampled(t: _CiderTables, counts: np.ndarray, chunk_elems: int = 4_000_000) -> np.ndarray:
    """f64[R] corpus CIDEr of each resample (IDF recomputed per resample), in chunks to bound memory."""
    # The largest dense intermediates are [G, R] (IDF weights) and [P*4, R] (per pair and order).
    chunk = max(1, chunk_elems // max(1, t.doc.shape[1], t.num.shape[0]))
    out = []
    for s in range(0, counts.shape[0], chunk):
        c = counts[s : s + chunk]
        out.append((c * _cider_image_scores(t, c).T).sum(axis=1) / counts.shape[1])
    return np.concatenate(out)


def _bootstrap(gts: dict, res: dict, per: dict, *, num: int, seed: int) -> dict[str, np.ndarray]:
    """Corpus metrics recomputed on `num` resamples: name -> f64[num]."""
    counts = _resample_counts(len(gts), num, seed)
    out = {"cider": _cider_resampled(_cider_tables(gts, res), counts)}
    bleu = _bleu_from_stats(counts @ _bleu_stats(gts, res))
    for k in range(4):
        out[f"bleu_{k + 1}"] = bleu[:, k]
    out["rouge_l"] = counts @ per["rouge_l"] / len(gts)
    return out


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    meteor: bool = False,
) -> dict[str, Any]:
    """CIDEr, BLEU-1..4, ROUGE-L (and optionally METEOR) of one caption per id against its references.

    Args:
      predictions: id -> predicted caption.
      references: id -> non-empty list of reference captions (same ids as `predictions`).
      bootstrap: number of bootstrap resamples for the 95 % intervals; 0 skips them.
      seed: seed of the resampling (same seed, same intervals).
      meteor: also compute METEOR when `java` is on the PATH (slow: starts a JVM).

    Returns:
      A dict with floats `cider`, `bleu_1`..`bleu_4`, `rouge_l` (`meteor`), for each of them but METEOR
      `<metric>_ci95_lo` / `<metric>_ci95_hi`, `n` (number of images), `per_example`
      (id -> {"cider", "bleu_4", "rouge_l"[, "meteor"]}) and `warnings` (list of str).
    """
    ids = _check_inputs(predictions, references)
    warnings: list[str] = []
    if len(ids) < SMALL_SPLIT:
        warnings.append(
            f"CIDEr's IDF is computed from the references: on {len(ids)} images it is noisy "
            f"(use >= {SMALL_SPLIT} images to compare runs)."
        )
    gts = {k: [tokenize_caption(r) for r in references[k]] for k in ids}
    res = {k: [tokenize_caption(predictions[k])] for k in ids}
    corpus, per = _pycoco_scores(gts, res, meteor=meteor, warnings=warnings)
    out: dict[str, Any] = dict(corpus)
    if bootstrap > 0:
        for name, values in _bootstrap(gts, res, per, num=bootstrap, seed=seed).items():
            out[f"{name}_ci95_lo"], out[f"{name}_ci95_hi"] = (float(v) for v in np.percentile(values, [2.5, 97.5]))
    out["n"] = len(ids)
    out["per_example"] = {k: {name: float(v[i]) for name, v in per.items()} for i, k in enumerate(ids)}
    out["warnings"] = warnings
    return out
