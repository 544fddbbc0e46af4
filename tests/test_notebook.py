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

# Appended to the executed notebook: the real-run config must fit the PaliGemma 2 3B parameter names (only the
# LLM's attention trains) and use known data keys, so a typo in it fails here rather than on someone's GPU.
CHECK_REAL_CONFIG = """
from paligemma_ft.training import optim
from paligemma_ft.data.sources import check_data_config
from paligemma_ft.model import Model, get_preset
from paligemma_ft.predictor import init_shapes
from paligemma_ft.utils import tree_flatten_with_names

real = longcap100_config("/data/longcap100", "paligemma_tokenizer.model")
cfg, res = get_preset(real.model_name_or_preset)
shapes = init_shapes(Model(**cfg), res, real.input.text_len + 1)
trainable = [n for n, t in tree_flatten_with_names(optim.trainable_mask(shapes, real.schedule)) if t]
assert trainable and all(n.startswith("llm/layers/attn/") for n in trainable), trainable
optim.make_optimizer(real, shapes, total_steps=real.total_steps)
for d in (real.input.data, real.evals.val.data):
    check_data_config(d.to_dict())
print("REAL CONFIG OK", len(trainable))
"""


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
