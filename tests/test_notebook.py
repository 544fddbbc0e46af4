"""The Colab/Kaggle notebook runs top to bottom on CPU (nbclient), so it cannot rot unnoticed.

The notebook reads three environment variables meant for this test: `PALIGEMMA_FT_NOTEBOOK_SKIP_INSTALL=1`
(the package is installed already), `PALIGEMMA_FT_NOTEBOOK_STEPS` (a few training steps, smaller evaluation
sets) and `PALIGEMMA_FT_NOTEBOOK_WORKDIR` (the run folder).
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (the test extra)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (the test extra)")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "finetune_paligemma.ipynb"
SECRET = "nb-s3cr3t-0123456789abcdef"  # A Kaggle key that must never appear in the notebook's outputs.

CONFIGS = NOTEBOOK.parents[1] / "configs"
LONGCAP_OVERRIDES = [  # What the notebook's longcap100 run changes in configs/longcap100.py, and nothing else.
    "--config.data_dir=/data/longcap100",
    "--config.tokenizer=paligemma_tokenizer.model",
    "--config.total_steps=64",
]

# Appended to the executed notebook: the real-run config is configs/longcap100.py with the notebook's overrides
# (no copy that can drift), fits the PaliGemma 2 3B parameter names (only the LLM's attention trains) and uses
# known data keys, so a typo in it fails here rather than on someone's GPU.
CHECK_REAL_CONFIG = f"""
from paligemma_ft.config import load_config as _load
from paligemma_ft.training import optim
from paligemma_ft.data.sources import check_data_config
from paligemma_ft.model import Model, get_preset
from paligemma_ft.predictor import init_shapes
from paligemma_ft.utils import tree_flatten_with_names

real = longcap100_config("/data/longcap100", "paligemma_tokenizer.model")
assert real.to_dict() == _load({str(CONFIGS / "longcap100.py")!r}, {LONGCAP_OVERRIDES!r}).to_dict()
assert real.input.lowercase is True  # The colab's lower-cased captions (a drifted copy once lacked them).
cfg, res = get_preset(real.model_name_or_preset)
shapes = init_shapes(Model(**cfg), res, real.input.text_len + 1)
trainable = [n for n, t in tree_flatten_with_names(optim.trainable_mask(shapes, real.schedule)) if t]
assert trainable and all(n.startswith("llm/layers/attn/") for n in trainable), trainable
optim.make_optimizer(real, shapes, total_steps=real.total_steps)
for d in (real.input.data, real.evals.val.data):
    check_data_config(d.to_dict())
print("REAL CONFIG OK", len(trainable))
"""


def _config_cell(nb) -> str:
    """The notebook's config cell (the one that defines `longcap100_config`)."""
    cells = [c.source for c in nb.cells if c.cell_type == "code" and "def longcap100_config" in c.source]
    assert len(cells) == 1
    return cells[0]


def test_notebook_config_is_the_shipped_file(monkeypatch):
    """The notebook loads configs/longcap100.py and configs/demo.py by name: no copy of either."""
    from paligemma_ft.config import load_config

    monkeypatch.delenv("PALIGEMMA_FT_NOTEBOOK_STEPS", raising=False)
    source = _config_cell(nbformat.read(NOTEBOOK, as_version=4))
    assert "ConfigDict(" not in source and "schedule" not in source  # No config written out in the notebook.
    namespace = {"os": __import__("os")}
    exec(compile(source, "<notebook config cell>", "exec"), namespace)  # Builds the demo config (RUN="demo").
    assert namespace["config"].to_dict() == load_config(str(CONFIGS / "demo.py")).to_dict()
    real = namespace["longcap100_config"]("/data/longcap100", "paligemma_tokenizer.model", 64)
    assert real.to_dict() == load_config(str(CONFIGS / "longcap100.py"), LONGCAP_OVERRIDES).to_dict()
    assert real.input.lowercase is True and real.input.data.path == "/data/longcap100/data_train90.jsonl"


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
            parts.extend(out.get("traceback", []))
    return "\n".join(parts)


def test_every_code_cell_is_valid_ipython():
    """Cells that the run skips (the install) must still parse, `%pip` lines included."""
    from IPython.core.inputtransformer2 import TransformerManager

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells and not any(c.get("outputs") for c in cells), "commit the notebook without outputs"
    for cell in cells:
        compile(TransformerManager().transform_cell(cell.source), "<cell>", "exec")
    assert any("%pip install" in c.source for c in cells)


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setenv("PALIGEMMA_FT_NOTEBOOK_SKIP_INSTALL", "1")
    monkeypatch.setenv("PALIGEMMA_FT_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("PALIGEMMA_FT_NOTEBOOK_WORKDIR", str(workdir))
    # The kernel sees one CPU device, as a Colab CPU runtime does (conftest's 8 simulated devices slow it down).
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_REAL_CONFIG))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # Raises CellExecutionError (with the cell and its traceback) if any cell fails.

    text = outputs_text(nb)
    assert SECRET not in text
    assert "Skipping the install" in text
    assert "Kaggle credentials: the KAGGLE_USERNAME and KAGGLE_KEY environment variables" in text
    assert "REAL CONFIG OK" in text
    # Training ran its 3 steps and exported the parameters where the notebook says.
    assert (workdir / "params.npz").stat().st_size > 0 and (workdir / "metrics.jsonl").exists()
    assert str(workdir / "params.npz") in text
    assert any(p.suffix == ".jsonl" for p in (workdir / "eval_again").iterdir())
    # The loss curve and the image grid were drawn.
    pngs = sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))
    assert pngs >= 2
