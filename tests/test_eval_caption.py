"""Caption metrics: equality with a direct pycocoevalcap computation, tokenization, bootstrap intervals."""

import random

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from paligemma_ft.evaluate import caption
from paligemma_ft.evaluate.caption import caption_metrics, tokenize_caption

PREDICTIONS = {
    "img1": "A man riding a horse on the beach.",
    "img2": "Two dogs playing with a frisbee in the grass",
    "img3": "a plate of food with broccoli and rice",
    3: "A red double-decker bus driving down the street.",
    "img5": "a cat",
    "img6": "A bathroom with a sink, a toilet and a mirror.",
}
REFERENCES = {
    "img1": [
        "A man rides a horse along the beach.",
        "A person riding a brown horse on sand.",
        "Man on horseback at the seashore.",
    ],
    "img2": ["Two dogs play with a frisbee on the lawn.", "Dogs chasing a frisbee in a grassy field."],
    "img3": [
        "A plate with broccoli, rice and chicken.",
        "Food on a white plate: rice and broccoli.",
        "A dinner plate of rice with vegetables.",
        "Broccoli and rice served on a plate.",
    ],
    3: ["A red double decker bus on a city street.", "A double-decker bus drives down the road."],
    "img5": ["A cat sleeping on a couch.", "A grey cat lying on a sofa."],
    "img6": ["A small bathroom with a toilet and a sink.", "A white bathroom with a mirror over the sink."],
}


def _tokenized(predictions, references):
    gts = {k: [tokenize_caption(r) for r in references[k]] for k in predictions}
    res = {k: [tokenize_caption(predictions[k])] for k in predictions}
    return gts, res


def test_metrics_equal_direct_pycocoevalcap():
    gts, res = _tokenized(PREDICTIONS, REFERENCES)
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    out = caption_metrics(PREDICTIONS, REFERENCES, bootstrap=0)
    assert out["cider"] == pytest.approx(cider, rel=1e-12)
    assert out["rouge_l"] == pytest.approx(rouge, rel=1e-12)
    for k in range(4):
        assert out[f"bleu_{k + 1}"] == pytest.approx(bleu[k], rel=1e-12)
    assert out["n"] == 6 and set(out["per_example"]) == set(PREDICTIONS)
    for i, key in enumerate(gts):
        assert out["per_example"][key]["cider"] == pytest.approx(cider_each[i], rel=1e-12)
        assert out["per_example"][key]["bleu_4"] == pytest.approx(bleu_each[3][i], rel=1e-12)
        assert out["per_example"][key]["rouge_l"] == pytest.approx(rouge_each[i], rel=1e-12)
    assert 0.0 < out["cider"] < 10.0 and "cider_ci95_lo" not in out


def test_degenerate_captions_match_pycocoevalcap():
    # An empty prediction and a punctuation-only reference (both tokenize to ""), and a one-word caption.
    preds = {"a": "", "b": "dog", "c": "a cat on a mat", "d": "..."}
    refs = {"a": ["a dog"], "b": ["dog", "..."], "c": ["a cat on a mat", "cat"], "d": ["!"]}
    gts, res = _tokenized(preds, refs)
    assert res["a"] == [""] and gts["b"][1] == ""
    out = caption_metrics(preds, refs, bootstrap=30)
    assert out["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    assert out["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert out["bleu_1"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][0], rel=1e-12)
    own = caption._cider_image_scores(caption._cider_tables(gts, res), np.ones((1, 4)))[:, 0]
    np.testing.assert_allclose(own, Cider().compute_score(gts, res)[1], rtol=1e-9, atol=1e-12)


def test_tokenizer_matches_ptb_output():
    # Expected strings: Stanford PTBTokenizer -lowerCase output with pycocoevalcap's punctuation tokens removed.
    assert (
        tokenize_caption("A man's riding a black-and-white horse, isn't he?")
        == "a man 's riding a black-and-white horse is n't he"
    )
    assert (
        tokenize_caption("Two dogs -- playing; one's jumping... don't stop!")
        == "two dogs playing one 's jumping do n't stop"
    )
    assert tokenize_caption("a cat sitting on a table.it's cute") == "a cat sitting on a table.it 's cute"
    assert (
        tokenize_caption("It's 10:30 and they're 2,000 people's cars")
        == "it 's 10:30 and they 're 2,000 people 's cars"
    )
    assert tokenize_caption('3.5 m/s & 50% off $5. "Quoted"\n') == "3.5 m/s & 50 % off $ 5 quoted"


def test_tokenizer_documented_differences_from_ptb():
    # PTB: "the u.s. flag -lrb- red -rrb-" and "rock 'n' roll"; ours drop the abbreviation period and brackets.
    assert tokenize_caption("The U.S. flag (red)") == "the u.s flag red"
    assert tokenize_caption("rock'n'roll") == "rock'n'roll"


def _random_split(n, seed):
    rng = random.Random(seed)
    words = "a the dog cat man woman sitting on table red blue horse riding with two of in grass field".split()
    sent = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))  # noqa: E731
    preds = {i: sent() for i in range(n)}
    refs = {i: [sent() for _ in range(rng.randint(1, 5))] for i in range(n)}
    return preds, refs


def test_resampled_metrics_equal_pycocoevalcap_on_the_resample():
    preds, refs = _random_split(40, seed=1)
    gts, res = _tokenized(preds, refs)
    counts = caption._resample_counts(len(gts), 4, seed=3)
    assert (counts.sum(axis=1) == len(gts)).all()
    tables = caption._cider_tables(gts, res)
    cider = caption._cider_resampled(tables, counts, chunk_elems=10)  # Several chunks on purpose.
    bleu = caption._bleu_from_stats(counts @ caption._bleu_stats(gts, res))
    for r in range(len(counts)):
        # The same resample written out as a dict with a duplicated image under distinct keys.
        drawn = np.repeat(np.arange(len(gts)), counts[r].astype(int))
        g2 = {j: gts[int(i)] for j, i in enumerate(drawn)}
        r2 = {j: res[int(i)] for j, i in enumerate(drawn)}
        assert cider[r] == pytest.approx(Cider().compute_score(g2, r2)[0], rel=1e-9)
        np.testing.assert_allclose(bleu[r], Bleu(4).compute_score(g2, r2, verbose=0)[0], rtol=1e-9)
    # With every image drawn once, the per-image table scores are pycocoevalcap's own per-image scores.
    own = caption._cider_image_scores(tables, np.ones((1, len(gts))))[:, 0]
    np.testing.assert_allclose(own, Cider().compute_score(gts, res)[1], rtol=1e-9, atol=1e-12)


def test_bootstrap_intervals_contain_estimate_and_are_seeded():
    preds, refs = _random_split(30, seed=2)
    a = caption_metrics(preds, refs, bootstrap=200, seed=7)
    b = caption_metrics(preds, refs, bootstrap=200, seed=7)
    c = caption_metrics(preds, refs, bootstrap=200, seed=8)
    for name in ("cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        lo, hi = a[f"{name}_ci95_lo"], a[f"{name}_ci95_hi"]
        assert lo <= a[name] <= hi and lo < hi, name
        assert (b[f"{name}_ci95_lo"], b[f"{name}_ci95_hi"]) == (lo, hi)
    assert (c["cider_ci95_lo"], c["cider_ci95_hi"]) != (a["cider_ci95_lo"], a["cider_ci95_hi"])


def test_small_split_warning():
    small = caption_metrics(PREDICTIONS, REFERENCES, bootstrap=0)
    assert any("on 6 images it is noisy" in w for w in small["warnings"])
    preds, refs = _random_split(caption.SMALL_SPLIT, seed=0)
    assert not caption_metrics(preds, refs, bootstrap=0)["warnings"]


def test_meteor_skipped_without_java(monkeypatch):
    monkeypatch.setattr(caption.shutil, "which", lambda _: None)
    out = caption_metrics(PREDICTIONS, REFERENCES, bootstrap=0, meteor=True)
    assert "meteor" not in out and any("METEOR skipped" in w for w in out["warnings"])


def test_bad_inputs_name_the_id():
    with pytest.raises(ValueError, match="img9"):
        caption_metrics({"img9": "a cat"}, {"img1": ["a dog"]}, bootstrap=0)
    with pytest.raises(ValueError, match="'img1'"):
        caption_metrics({"img1": "a cat"}, {"img1": []}, bootstrap=0)
    with pytest.raises(ValueError, match="no examples"):
        caption_metrics({}, {}, bootstrap=0)
