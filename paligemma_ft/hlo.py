"""What a compiled XLA program materializes: arrays by dtype and shape, per computation (for dtype audits).

    compiled = jax.jit(fn).lower(*args).compile()
    arrays = materialized(compiled.as_text())     # [Array(computation, name, dtype, shape, opcode), ...]
    loops = while_loops(compiled.as_text())       # [Loop(body, arrays, nested_loops), ...], nested loops too
    weights = llm_weight_shapes(params)          # the shapes a copy of an LLM weight would have

An XLA fusion computes its internals element by element without storing them, so only the instructions of
non-fused computations (the entry, while bodies and conditions, called computations) count, fusion outputs
included. The tests and `bench/hlo_dtypes.py` use this to show, from what XLA will actually run, that a bfloat16
step holds no float32 copy of a weight. The text format is XLA's `HloModule::ToString` (stable for years); the
parser reads only computation headers and `%name = type opcode(...)` lines, so a format change makes it find
nothing rather than something false (the callers assert they found the arrays they expect, too).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from paligemma_ft.utils import tree_flatten_with_names

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"^(\w+)\[([\d,]*)\]")
_FUSED_CALL = re.compile(r"\bfusion\(.*\bcalls=%?([\w.\-]+)")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_CALLED = re.compile(
    r"\b(?:body|condition|to_apply|calls|branch_computations|true_computation|false_computation)="
    r"\{?%?([\w.\-]+(?:, %?[\w.\-]+)*)\}?"
)


@dataclasses.dataclass(frozen=True)
class Array:
    """One materialized array: where it is computed, its dtype ("f32", "bf16", ...), shape and opcode."""

    computation: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    opcode: str


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith(" "):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        comps[current].append(line)
    return comps, entry


def _fused(comps: dict[str, list[str]]) -> set[str]:
    return {m.group(1) for lines in comps.values() for line in lines if (m := _FUSED_CALL.search(line))}


def _arrays(name: str, lines: list[str]) -> list[Array]:
    out = []
    for line in lines:
        m = _INSTR.match(line)
        if not m or not (a := _ARRAY.match(m.group(2))):  # Tuples alias their elements: not new arrays.
            continue
        shape = tuple(int(d) for d in a.group(2).split(",") if d)
        out.append(Array(name, m.group(1), a.group(1), shape, m.group(3)))
    return out


def materialized(text: str) -> list[Array]:
    """Every array an instruction of a non-fused computation produces (the buffers the program can hold)."""
    comps, _ = _computations(text)
    fused = _fused(comps)
    return [a for name, lines in comps.items() if name not in fused for a in _arrays(name, lines)]


@dataclasses.dataclass(frozen=True)
class Loop:
    """A while loop: its body's name, the arrays materialized in it and in what it calls (nested loops too), and
    how many while loops it contains."""

    body: str
    arrays: list[Array]
    nested_loops: int


def while_loops(text: str) -> list[Loop]:
    """Every while loop of the program (nested ones too, each also inside its parent's arrays).

    Loop-carried values read in a body (`get-tuple-element`) are among its arrays: an array that XLA hoisted out
    of the loop reaches the body that way.
    """
    comps, _ = _computations(text)
    fused = _fused(comps)
    bodies = [m.group(1) for lines in comps.values() for line in lines if (m := _BODY.search(line))]
    loops = []
    for body in dict.fromkeys(bodies):
        todo, seen, nested = [body], set(), 0
        while todo:
            name = todo.pop()
            if name in seen or name in fused or name not in comps:
                continue
            seen.add(name)
            for line in comps[name]:
                nested += bool(_BODY.search(line))
                for m in _CALLED.finditer(line):
                    todo += [c.strip().lstrip("%") for c in m.group(1).split(",")]
        loops.append(Loop(body, [a for name in sorted(seen) for a in _arrays(name, comps[name])], nested))
    return loops


def llm_weight_shapes(params: Any) -> set[tuple[int, ...]]:
    """Shapes of the LLM's weight matrices in `params` (arrays or `ShapeDtypeStruct`s): as stored (scan-stacked)
    and per layer (as the scan slices them), to look for copies of them among a program's arrays."""
    shapes = set()
    for name, leaf in tree_flatten_with_names(params):
        if name.startswith("llm/") and leaf.ndim >= 2:
            shapes.add(tuple(leaf.shape))
            if name.startswith("llm/layers/") and leaf.ndim >= 3:
                shapes.add(tuple(leaf.shape[1:]))
    return shapes
