"""Evaluators over padded batches with fake predictors; the JSONL and HTML they write; choosing them by name."""

import json
import math

import ml_collections
import numpy as np
import pytest
from PIL import Image

from paligemma_ft.evaluate import (
    Box,
    CaptionEvaluator,
    DetectionEvaluator,
    PerplexityEvaluator,
    Predictor,
    VqaEvaluator,
    caption_metrics,
    make_evaluator,
    write_gallery_html,
    write_predictions_jsonl,
)

WORDS = "a the dog cat man sitting on table red blue horse riding with two in grass".split()


def make_split(n, image_dir, *, padding_meta="copy"):
    """n examples: id -> meta; images on disk for the first two only (the rest are missing)."""
    rng = np.random.default_rng(0)
    metas = []
    for i in range(n):
        path = image_dir / f"{i}.png"
        if i < 2:
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
        refs = [" ".join(rng.choice(WORDS, size=rng.integers(3, 8))) for _ in range(2)]
        metas.append({"id": f"ex{i}", "image_path": str(path), "prefix": "caption en", "references": refs})
    return metas


def batches_of(metas, batch_size, pad_positions=()):
    """Batches with `_mask`; padding rows copy a real example's meta (so counting them would be caught)."""
    rows = list(metas)
    for pos in pad_positions:  # Padding in the middle of the split, not only at the end.
        rows.insert(pos, None)
    while len(rows) % batch_size:
        rows.append(None)
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        out.append(
            {
                "text": np.zeros((batch_size, 4), np.int32),
                "_mask": np.array([r is not None for r in chunk]),
                "_meta": [r if r is not None else dict(metas[0]) for r in chunk],
            }
        )
    return out


class FakePredictor:
    """Generates `answers[id]` for real rows and a marker for padding; losses from a table."""

    def __init__(self, answers, losses=None):
        self.answers, self.losses_of, self.calls = answers, losses or {}, 0

    def generate(self, batch):
        self.calls += 1
        return [self.answers[m["id"]] if ok else "PADDING" for ok, m in zip(batch["_mask"], batch["_meta"])]

    def losses(self, batch):
        return np.array(
            [self.losses_of[m["id"]] if ok else 1e6 for ok, m in zip(batch["_mask"], batch["_meta"])], np.float32
        )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_caption_evaluator_scores_each_example_once(tmp_path):
    metas = make_split(37, tmp_path)
    answers = {m["id"]: m["references"][0] for m in metas}
    answers["ex2"] = '<b>bold & "quoted"</b>'  # Must be escaped in the HTML.
    batches = batches_of(metas, 8, pad_positions=(3, 17))
    assert sum(len(b["_mask"]) for b in batches) == 40 and sum(b["_mask"].sum() for b in batches) == 37
    predictor = FakePredictor(answers)
    assert isinstance(predictor, Predictor)
    ev = make_evaluator("val_cap", {"type": "coco_caption", "bootstrap": 20, "max_gallery_items": 5})
    assert isinstance(ev, CaptionEvaluator) and ev.kind == "prompt"
    metrics = ev.run(predictor, iter(batches), tmp_path / "out", step=12)
    assert predictor.calls == len(batches) and metrics["n"] == 37.0
    refs = {m["id"]: m["references"] for m in metas}
    expected = caption_metrics(answers, refs, bootstrap=20)
    assert metrics["cider"] == pytest.approx(expected["cider"])
    assert metrics["cider_ci95_lo"] == pytest.approx(expected["cider_ci95_lo"])
    assert all(isinstance(v, float) for v in metrics.values()) and "per_example" not in metrics
    rows = read_jsonl(tmp_path / "out" / "predictions_val_cap_step12.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(answers) and len(rows) == 37
    for r in rows:
        assert r["prediction"] == answers[r["id"]] and r["references"] == refs[r["id"]]
        assert r["prompt"] == "caption en" and r["image"].endswith(r["id"][2:] + ".png")
        assert r["score"]["cider"] == pytest.approx(expected["per_example"][r["id"]]["cider"])
    page = (tmp_path / "out" / "gallery_val_cap_step12.html").read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 2 and page.count("no image") == 3  # 5 items shown.
    assert "&lt;b&gt;bold &amp; &quot;quoted&quot;&lt;/b&gt;" in page and "<b>bold" not in page
    assert "5 of 37 examples" in page and "noisy" in page  # 37 images: the small-split warning is shown.
    assert any("noisy" in w for w in ev.warnings)


def test_repeated_id_is_an_error(tmp_path):
    metas = make_split(5, tmp_path)
    metas[3] = dict(metas[1])
    ev = make_evaluator("vqa", {"type": "vqa"})
    with pytest.raises(ValueError, match="'ex1' was already scored"):
        ev.run(FakePredictor({m["id"]: "x" for m in metas}), batches_of(metas, 4), tmp_path, 0)


def test_predictor_must_return_one_string_per_row(tmp_path):
    class Short(FakePredictor):
        def generate(self, batch):
            return super().generate(batch)[:-1]

    metas = make_split(3, tmp_path)
    with pytest.raises(ValueError, match="returned 3 strings for 4 rows"):
        VqaEvaluator("v").run(Short({m["id"]: "x" for m in metas}), batches_of(metas, 4), tmp_path, 0)
    with pytest.raises(ValueError, match="no '_mask'"):
        VqaEvaluator("v").run(Short({}), [{"_meta": []}], tmp_path, 0)
    only_padding = {"_mask": np.zeros(4, bool), "_meta": [metas[0]] * 4}
    with pytest.raises(ValueError, match="no .non-padding. examples"):
        VqaEvaluator("v").run(FakePredictor({}), [only_padding], tmp_path, 0)


def test_vqa_evaluator(tmp_path):
    metas = make_split(6, tmp_path)
    for i, m in enumerate(metas):
        m["references"] = ["2", "two", "3"] if i % 2 else ["yes"]
    answers = {m["id"]: ("Two" if i % 2 else "no") for i, m in enumerate(metas)}
    metrics = VqaEvaluator("okvqa").run(FakePredictor(answers), batches_of(metas, 4), tmp_path, 3)
    # Odd ids: "Two" -> "2" matches two of three answers (leave-one-out: (1/3 + 1/3 + 2/3) / 3); even: wrong.
    assert metrics["n"] == 6.0 and metrics["acc"] == 0.0 and metrics["acc_any"] == pytest.approx(0.5)
    assert metrics["vqav2_acc"] == pytest.approx(0.5 * 4 / 9)
    rows = read_jsonl(tmp_path / "predictions_okvqa_step3.jsonl")
    assert {r["id"]: r["score"]["acc_any"] for r in rows} == {m["id"]: float(i % 2) for i, m in enumerate(metas)}


def test_detection_evaluator_rows_carry_boxes(tmp_path):
    metas = make_split(3, tmp_path)
    target = "<loc0000><loc0000><loc0511><loc0511> cat"
    for m in metas:
        m["references"] = [target]
    answers = {"ex0": target, "ex1": "nonsense", "ex2": "<loc0000><loc0000><loc0511><loc1023> cat"}
    ev = make_evaluator("det", {"type": "detection"})
    assert isinstance(ev, DetectionEvaluator)
    metrics = ev.run(FakePredictor(answers), batches_of(metas, 2), tmp_path, 7)
    assert metrics["n"] == 3.0 and metrics["well_formed_rate"] == pytest.approx(2 / 3)
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "predictions_det_step7.jsonl")}
    assert rows["ex0"]["boxes"]["prediction"][0] == {
        "label": "cat",
        "y0": 0.0,
        "x0": 0.0,
        "y1": 511 / 1023,
        "x1": 511 / 1023,
    }
    assert rows["ex1"]["boxes"]["prediction"] == [] and rows["ex1"]["score"]["well_formed"] == 0.0
    assert rows["ex2"]["score"]["iou"] == pytest.approx(511 / 1023)  # Same height, width 511 vs 1023.
    assert (tmp_path / "gallery_det_step7.html").read_text().count("data:image/jpeg") == 2


def test_perplexity_ignores_padding(tmp_path):
    metas = make_split(5, tmp_path)
    losses = {m["id"]: float(i + 1) for i, m in enumerate(metas)}  # 1..5, mean 3.
    ev = make_evaluator("val_ppl", ml_collections.ConfigDict({"type": "perplexity", "log_steps": 100}))
    assert isinstance(ev, PerplexityEvaluator) and ev.kind == "train"
    metrics = ev.run(FakePredictor({}, losses), batches_of(metas, 4, pad_positions=(1,)), tmp_path, 1)
    assert metrics == {"loss": pytest.approx(3.0), "perplexity": pytest.approx(math.exp(3.0)), "n": 5.0}
    rows = read_jsonl(tmp_path / "predictions_val_ppl_step1.jsonl")
    assert sorted(r["score"]["loss"] for r in rows) == [1.0, 2.0, 3.0, 4.0, 5.0]
    # Without `_meta` (train batches may have none) rows are named by position; padding still ignored.
    bare = [{"_mask": np.array([True, False, True])}]

    class ByRow:
        def losses(self, batch):
            return np.array([2.0, 100.0, 4.0])

    assert ev.run(ByRow(), bare, tmp_path, 2)["loss"] == pytest.approx(3.0)


def test_make_evaluator_names_and_errors():
    assert isinstance(make_evaluator("c", {"type": "caption"}), CaptionEvaluator)
    assert isinstance(make_evaluator("v", {"type": "proj.paligemma.transfers.vqav2", "pred": "decode"}), VqaEvaluator)
    ev = make_evaluator("v", {"type": "vqa", "anls_theta": 0.3, "lowercase": False, "data": {"split": "val"}})
    assert (ev.anls_theta, ev.lowercase, ev.name) == (0.3, False, "v")
    with pytest.raises(ValueError, match="unknown evaluator type 'pope'"):
        make_evaluator("s", {"type": "pope"})
    with pytest.raises(ValueError, match=r"'c'.*unknown config key\(s\) \['bootstrapp'\]"):
        make_evaluator("c", {"type": "caption", "bootstrapp": 10})
    with pytest.raises(ValueError, match="no 'type'"):
        make_evaluator("c", {"bootstrap": 10})
    with pytest.raises(ValueError, match="bootstrap must be an int >= 0"):
        make_evaluator("c", {"type": "caption", "bootstrap": -1})


def test_report_writers(tmp_path):
    rows = [
        {
            "id": np.int64(i),
            "image": None,
            "prompt": "p",
            "prediction": "ü",
            "references": ["r"],
            "score": {"x": np.float32(0.5)},
            "boxes": {"prediction": [Box("a", 0, 0, 1, 1)], "references": []},
        }
        for i in range(3)
    ]
    write_predictions_jsonl(tmp_path / "p.jsonl", rows)
    back = read_jsonl(tmp_path / "p.jsonl")
    assert back[2] == {
        "id": 2,
        "image": None,
        "prompt": "p",
        "prediction": "ü",
        "references": ["r"],
        "score": {"x": 0.5},
        "boxes": {"prediction": [{"label": "a", "y0": 0, "x0": 0, "y1": 1, "x1": 1}], "references": []},
    }
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows[0]["image"] = str(tmp_path / "broken.png")
    write_gallery_html(tmp_path / "g.html", rows, title="T <1>", max_items=2, metrics={"acc": float("nan")})
    page = (tmp_path / "g.html").read_text(encoding="utf-8")
    assert "<title>T &lt;1&gt;</title>" in page and page.count("no image") == 2 and "2 of 3 examples" in page
    assert "nan" in page and "ü" in page
