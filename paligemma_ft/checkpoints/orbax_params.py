"""The parameters of one orbax training checkpoint (`WORKDIR/checkpoints/STEP/state`), read one at a time.

`OrbaxParams` is a `ParamSource` (`checkpoints/fit.py`): names and shapes come from orbax's metadata, and each
read is a partial restore of that one leaf to a host numpy array, so neither the optimizer state nor the other
parameters are loaded (`paligemma-ft convert WORKDIR --step N OUT`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from paligemma_ft.checkpoints.npz import ArraySpec, CheckpointError
from paligemma_ft.utils import recover_tree, tree_flatten_with_names


def steps(workdir: str | os.PathLike) -> list[int]:
    """The complete checkpoint steps of a run's workdir, ascending."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "state").is_dir())


class OrbaxParams:
    """`params` of checkpoint `step` in `workdir` (None: the latest).

    Raises:
      CheckpointError: no such step (the message lists those there are) or unreadable metadata.
    """

    def __init__(self, workdir: str | os.PathLike, step: int | None = None):
        import orbax.checkpoint as ocp  # noqa: PLC0415 - only for this reader.

        available = steps(workdir)
        if not available or (step is not None and step not in available):
            raise CheckpointError(
                f"{workdir}: no training checkpoint {'step ' + str(step) if step is not None else ''} in "
                f"{Path(workdir) / 'checkpoints'} (steps there: {available or 'none'})."
            )
        self.step = step if step is not None else available[-1]
        self.path = Path(workdir) / "checkpoints" / str(self.step) / "state"
        self._ocp = ocp
        try:
            meta = ocp.StandardCheckpointer().metadata(str(self.path))
            tree = getattr(meta, "item_metadata", None) or meta
            params = tree["params"]
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged folder.
            raise CheckpointError(
                f"{self.path}: cannot read the checkpoint's metadata ({type(e).__name__}: {e})."
            ) from e
        self._specs = {
            name: ArraySpec(tuple(leaf.shape), np.dtype(leaf.dtype))
            for name, leaf in tree_flatten_with_names(params, is_leaf=lambda x: hasattr(x, "shape"))
        }

    @property
    def where(self) -> str:
        return repr(str(self.path))

    def specs(self) -> dict[str, ArraySpec]:
        return self._specs

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        ocp = self._ocp
        item = {"params": recover_tree([name], [0])}
        args = {"params": recover_tree([name], [ocp.RestoreArgs(restore_type=np.ndarray)])}
        restored = ocp.PyTreeCheckpointer().restore(
            str(self.path), args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
        )
        (array,) = jax.tree.leaves(restored)
        array = np.asarray(array)
        return array if index is None else np.ascontiguousarray(array[index])

    def close(self) -> None:
        pass

    def __enter__(self) -> OrbaxParams:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
