"""Kill anywhere, lose nothing, with QLoRA on: tests/test_kill_resume.py's scenario on configs/demo_lora.py (nf4 base,
adapters on both towers), so integer base leaves and adapters go through orbax, the data iterator and the exports."""

import pytest
import test_kill_resume as kill_resume
from test_kill_resume import env  # noqa: F401 - the fixture.

from paligemma_ft.adapters import load_adapters

LORA = ["--config.lora.quant=nf4", "--config.lora.rank=4", "--config.lora.dropout=0.1"]


@pytest.mark.slow
def test_qlora_killed_anywhere_and_restarted_ends_bitwise(tmp_path, env, monkeypatch):  # noqa: F811
    original = kill_resume.command

    def command(workdir):
        cmd = original(workdir)
        cmd[cmd.index("--config") + 1] = str(kill_resume.ROOT / "configs" / "demo_lora.py")
        return [*cmd, *LORA]

    monkeypatch.setattr(kill_resume, "command", command)
    reference = tmp_path / "reference"  # The uninterrupted QLoRA run (the module's fixture runs demo.py).
    kill_resume.run_to_end(reference, env, tmp_path / "reference.log")
    kill_resume.test_killed_anywhere_and_restarted_ends_bitwise_like_an_uninterrupted_run(tmp_path, env, reference)
    (want, want_meta), (got, got_meta) = (load_adapters(tmp_path / d / "adapters.npz") for d in ("reference", "killed"))
    assert got_meta == want_meta and sorted(got) == sorted(want)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
