"""Safety: no value from a config, a dataset or a file is run as code; paths stay in their folder; no credential
reaches a saved file.

Related tests elsewhere: a pickle-bearing `.npz` is refused (test_checkpoint.py::
test_pickle_bearing_npz_is_refused_with_clear_error); `--config.x=<code>` stays a string (test_cli.py::
test_values_are_never_evaluated); JSONL path escapes (test_data_sources.py::
test_jsonl_path_escapes_refused_unless_allowed, test_bad_inputs.py); Kaggle credentials never printed or logged
by the download code (test_kaggle.py); none in a training run's outputs or logs (test_kill_resume.py).
"""

import ast
import io
import json
import pathlib
import re

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from paligemma_ft import config as config_lib
from paligemma_ft import safety, sharding
from paligemma_ft.commands import cli
from paligemma_ft.data import pipeline, sources
from paligemma_ft.data.transforms import BadExample
from paligemma_ft.tokenizer import Tokenizer
from paligemma_ft.training import report as run_report

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
SECRET = "s3cr3t-0123456789abcdef"


def payload(marker: pathlib.Path) -> str:
    return f"__import__('os').system('touch {marker}')"


# Calls that run code or unpickle: (module or None for a builtin, function name).
UNSAFE_CALLS = {
    (None, "eval"),
    (None, "exec"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("marshal", "loads"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("torch", "load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("shelve", "open"),
}


def test_the_package_has_no_call_that_runs_data_as_code():
    """A static guard: no eval/exec/unpickling anywhere, and every np.load says allow_pickle=False."""
    found = []
    for path in sorted((ROOT / "paligemma_ft").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name):
                key = (None, func.id)
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                key = (func.value.id, func.attr)
            else:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if key in UNSAFE_CALLS:
                found.append(f"{where} {key}")
            if key[1] == "load" and key[0] in ("np", "numpy", "jnp"):
                safe = any(
                    k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in node.keywords
                )
                if not safe:
                    found.append(f"{where} np.load without allow_pickle=False")
    assert found == []


def test_config_values_with_code_stay_strings(tmp_path):
    marker = tmp_path / "pwned"
    config = config_lib.load_config(
        DEMO,
        [
            f"--config.input.prefix={payload(marker)}",
            f"--config.tokenizer={payload(marker)}",
            f"--config.model_init={payload(marker)}",
        ],
    )
    assert config.input.prefix == config.tokenizer == config.model_init == payload(marker)
    assert not marker.exists()


@pytest.mark.parametrize(
    "tactic, message",
    [
        ("{payload}", "must look like name"),
        ("fsdp(axis={payload})", "arguments must be literals"),
        ("replicate | __import__('os').system('x')", "must look like name"),
    ],
)
def test_sharding_tactics_are_parsed_not_run(tmp_path, tactic, message):
    marker = tmp_path / "pwned"
    mesh = sharding.make_mesh([("data", -1)])
    params = {"w": jax.ShapeDtypeStruct((8, 4), np.float32)}
    with pytest.raises(ValueError, match=message):
        sharding.infer_sharding(params, [(".*", tactic.format(payload=payload(marker)))], mesh)
    assert not marker.exists()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


def test_dataset_values_with_code_are_only_text(tmp_path):
    marker = tmp_path / "pwned"
    code = payload(marker)
    (tmp_path / "a.png").write_bytes(_png())
    lines = [
        {"image": "a.png", "prefix": code, "suffix": code, "id": code},
        {"image": f"$(touch {marker}).png", "suffix": "x"},  # Shell syntax in a path: just a missing file.
        {"image": "a.png", "suffix": [code, "`touch " + str(marker) + "`"]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tok = Tokenizer.from_spec("builtin:tiny")
    data = {"source": "jsonl", "path": str(path)}
    cfg = {"data": data, "res": 8, "text_len": 256, "batch_size": 3, "num_workers": 0}
    report = pipeline.BadInputReport()
    batch = next(
        pipeline.make_eval_batches(data, cfg, tok, 3, kind="train", process_index=0, process_count=1, report=report)
    )
    assert report.entries == [(str(path), 2, "missing_image")]
    meta = batch["_meta"][0]
    assert meta["prefix"] == code and meta["id"] == code and meta["references"] == [code]
    suffix_ids = batch["text"][0][batch["mask_loss"][0] == 1]
    assert tok.decode(suffix_ids) == code  # The code is the target text, token for token.
    assert not marker.exists()


def test_coco_file_names_cannot_escape_the_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(_png())
    ann = {
        "images": [{"id": 1, "file_name": "../secret.png"}, {"id": 2, "file_name": str(tmp_path / "secret.png")}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 2, "image_id": 2, "caption": "y"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    cfg = {"source": "coco", "annotations": str(tmp_path / "captions.json"), "image_dir": str(tmp_path / "images")}
    src = sources.make_source(cfg)
    for i in range(2):
        with pytest.raises(BadExample, match="outside the image folder") as info:
            src[i]
        assert info.value.reason == "path_escape"
    allowed = sources.make_source({**cfg, "allow_outside": True})
    assert allowed[0]["image"] == allowed[1]["image"] == (tmp_path / "secret.png").read_bytes()


def test_saved_config_and_report_hold_no_credentials(tmp_path):
    base = config_lib.load_config(DEMO, []).to_dict()
    config = ml_collections.ConfigDict(
        {
            **base,
            "kaggle_key": SECRET,
            "hf_token": SECRET,
            "wandb": {"project": "p", "api_key": SECRET},
            "kaggle": {"username": "someone", "key": SECRET},
        }
    )
    config_lib.save_config(config, tmp_path / "config.json")
    run_report.write_report(tmp_path, config, sharding.make_mesh([("data", -1)]), "overview", {})
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert {"config.json", "report.md"} <= set(written)
    assert all(SECRET.encode() not in data for data in written.values())
    saved = json.loads(written["config.json"])
    assert saved["kaggle"] == {"username": "someone"} and saved["wandb"] == {"project": "p"}  # Only the secrets go.
    assert saved["total_steps"] == base["total_steps"] and b'"username": "someone"' in written["report.md"]


# ------------------------------------------------------------------------------------------------ redaction


def test_secrets_are_redacted_by_pattern():
    tree = {
        "auth_header": SECRET,
        "passphrase": SECRET,
        "db_password": SECRET,
        "wandbApiKey": SECRET,
        "credentials_file": SECRET,
        "kaggle": {"username": "someone", "key": SECRET},
        "hub": {"url": f"https://someone:{SECRET}@hub.example.com/x", "header": f"Authorization: Bearer {SECRET}"},
        "tokenizer": "builtin:tiny",  # Names that only look like credential words stay, and non-strings stay.
        "keypoints": "nose,eyes",
        "author": "someone",
        "text_len": 16,
        "max_decode_len": 32,
        "pad_token_id": 0,
        "rng_key": 3,
        "prefix": "caption en",
    }
    out = safety.redact(tree)
    assert SECRET not in json.dumps(out)
    assert set(out) == {
        "kaggle",
        "hub",
        "tokenizer",
        "keypoints",
        "author",
        "text_len",
        "max_decode_len",
        "pad_token_id",
        "rng_key",
        "prefix",
    }
    assert out["kaggle"] == {"username": "someone"} and out["hub"]["url"] == "https://***@hub.example.com/x"
    assert out["hub"]["header"].startswith("Authorization: ***")
    assert [out[k] for k in ("tokenizer", "keypoints", "text_len", "rng_key")] == ["builtin:tiny", "nose,eyes", 16, 3]


RANDOM_LOOKING = "Zx81kQp2Lm4Tr7Vw9Yb3Nc6Hd0Jf5Gs1"


@pytest.mark.parametrize(
    "text, secret",
    [
        (f"override '--config.wandb.api_key={SECRET}': unknown key", SECRET),
        (f"override '--config.hf_tokn=hf_{SECRET}': unknown key config.hf_tokn", SECRET),  # A typo in the name.
        (f"override '--config.wandb.api_kye={RANDOM_LOOKING}': unknown key", RANDOM_LOOKING),
        (f"cannot fetch https://user:{SECRET}@example.com/model.npz", SECRET),
        (f"request refused with header Bearer {SECRET}", SECRET),
        (f'{{"passphrase": "{SECRET}"}}', SECRET),
        (f"bad value ghp_{SECRET}", SECRET),
    ],
)
def test_messages_are_redacted_by_pattern(text, secret):
    out = safety.redact_text(text)
    assert secret not in out and "***" in out


def test_ordinary_messages_are_not_redacted():
    for text in (
        "override '--config.tokenizer=builtin:tiny': unknown key",
        "Checkpoint '/runs/x/params.npz' does not fit the model: key 'llm/embedder' expected shape (10,)",
        "KeyError: 'img/embedding'",
        "model_init kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224/1",
        "input.max_image_bytes=67108864",
        "image file /data/sk-learn-models/hf_cats/x.png does not exist",  # Token-like prefixes in plain names.
    ):
        assert safety.redact_text(text) == text


def test_a_mistyped_override_is_not_echoed_with_its_secret(capsys):
    token = "hf_" + SECRET.replace("-", "")
    for item in (f"--config.hf_tokn={token}", f"--config.wandb_api_key={token}"):
        assert cli.main(["inspect", "--config", DEMO, item]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "unknown key" in err and token not in err and "***" in err


# ------------------------------------------------------------------------------------------ escaping data text

HOSTILE = [
    "<script>alert('x')</script>",
    "![x](http://evil.example/pixel.png)",
    "a | b ``` c",
    "\x1b[2J\x1b[31mred\x1b[0m\u202egnp.exe",
]


def _hostile_workdir(tmp_path, config):
    (tmp_path / "eval").mkdir()
    rows = [
        {"prompt": HOSTILE[i], "prediction": HOSTILE[(i + 1) % 4], "references": [HOSTILE[(i + 2) % 4]]}
        for i in range(4)
    ]
    (tmp_path / "eval" / "predictions_val_step2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval" / "bad_rows_val.jsonl").write_text('{"file": "v.jsonl", "line": 3, "reason": "x"}\n')
    metrics = run_report.MetricsLog(tmp_path / "metrics.jsonl")
    metrics.write(0, {"val/cider": 0.1})
    metrics.write(2, {"val/cider": 0.5, "train/loss": 1.0})
    return run_report.write_report(tmp_path, config, sharding.make_mesh([("data", -1)]), "overview", {})


def test_report_md_shows_data_text_and_never_renders_it(tmp_path):
    from markdown_it import MarkdownIt

    config = config_lib.load_config(DEMO, ["--config.input.prefix='```</code><script>x</script>'"])
    text = _hostile_workdir(tmp_path, config).read_text()
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert "<script" not in html and "&lt;script&gt;" in html
    assert [m for m in re.findall(r"<img[^>]*>", html)] == ['<img src="curves.png" alt="curves" />']
    assert "![x](http://evil.example/pixel.png)" in html  # Shown as text.
    assert "\x1b" not in text and "\u202e" not in text and "\\x1b[2J" in html and "\\u202e" in html
    rows = re.findall(r"<tr>(.*?)</tr>", html, re.S)
    predictions = [r for r in rows if "alert" in r or "evil" in r]
    assert len(predictions) == 4 and all(r.count("<td>") == 3 for r in predictions)  # `|` split no cell.
    assert html.count('<code class="language-json">') == 1 and "</code><script>" not in html  # One config block.
    assert '<a href="eval/bad_rows_val.jsonl">bad_rows_val.jsonl</a>: 1 row(s)' in html


def test_console_summary_makes_escape_codes_visible(tmp_path):
    config = config_lib.load_config(DEMO, [])
    _hostile_workdir(tmp_path, config)
    rows = run_report.MetricsLog(tmp_path / "metrics.jsonl").rows()
    summary = run_report.console_summary(rows, tmp_path / "eval")
    assert "\x1b" not in summary and "\u202e" not in summary
    assert "\\x1b[2J\\x1b[31mred\\x1b[0m\\u202egnp.exe" in summary and "<script>alert('x')</script>" in summary
    assert safety.printable("caf\u00e9 \u4e2d\u6587\tok\n") == "caf\u00e9 \u4e2d\u6587\\tok\\n"  # Scripts stay.


def test_console_summary_aligns_long_metric_names(tmp_path):
    rows = [
        {"step": 0, "val/ap50": 0.0, "val_constrained/well_formed_rate": 1.0},
        {"step": 600, "val/ap50": 0.5775, "val_constrained/well_formed_rate": 1.0},
    ]
    lines = run_report.console_summary(rows, tmp_path / "eval").splitlines()
    assert len(lines) == 3 and len({line.index("(steps") for line in lines[1:]}) == 1
    assert len({len(line) for line in lines[1:]}) == 1 and lines[0].endswith("after")


def test_instructions_with_placeholders_are_not_masked():
    from paligemma_ft.checkpoints import kaggle  # noqa: PLC0415

    help_text = kaggle._ways_to_authenticate()
    assert "KAGGLE_KEY=<key>" in help_text and safety.redact_text(help_text) == help_text
    masked = safety.redact_text('export KAGGLE_KEY=hunter2 and "key": "abc" and token: <token>x')
    assert "hunter2" not in masked and "abc" not in masked and "<token>x" not in masked
