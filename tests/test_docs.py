"""docs/promises.md stays true: every test it names exists (as a test function pytest collects), every benchmark it
names exists, and every promise names at least one proof. docs/design.md's module map and the package agree."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMISES = ROOT / "docs" / "promises.md"
DESIGN = ROOT / "docs" / "design.md"
TEST_NAME = re.compile(r"`(tests/[\w/]+\.py)::(\w+(?:::\w+)?)`")
BENCH_NAME = re.compile(r"`(bench/[\w/.]+)`")


def _defined_tests(path: pathlib.Path) -> set[str]:
    """`test_x` for top-level test functions and `TestClass::test_x` for test methods, as pytest collects them."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.add(node.name)
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test")
            }
    return names


def _rows(text: str) -> list[str]:
    """The table rows of promises.md (header and separator rows left out)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if not re.fullmatch(r"\|[-| ]+\|", r) and not r.startswith(("| promise |", "| what "))]


def test_every_test_named_in_promises_exists():
    text = PROMISES.read_text()
    named = TEST_NAME.findall(text)
    assert len(named) >= 60, len(named)  # The parser sees the file's names (a format change would hide them).
    defined: dict[str, set[str]] = {}
    missing = []
    for file, test in named:
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
            continue
        if test not in defined.setdefault(file, _defined_tests(path)):
            missing.append(f"{file}::{test}")
    assert missing == []


def test_every_benchmark_named_in_promises_exists():
    named = BENCH_NAME.findall(PROMISES.read_text())
    assert named and [b for b in named if not (ROOT / b).is_file()] == []


def test_every_promise_names_a_proof():
    rows = _rows(PROMISES.read_text())
    assert len(rows) >= 40, len(rows)
    unproved = [r for r in rows if not (TEST_NAME.search(r) or BENCH_NAME.search(r))]
    assert unproved == []


def test_the_checks_catch_a_wrong_name(tmp_path):
    """The checks themselves: a renamed test and a row without proof are found."""
    assert "test_every_test_named_in_promises_exists" in _defined_tests(pathlib.Path(__file__))
    assert "test_no_such_test" not in _defined_tests(pathlib.Path(__file__))
    rows = _rows("| promise | proved by |\n|---|---|\n| a | `tests/test_docs.py::test_x` |\n| b | nothing |\n")
    assert rows == ["| a | `tests/test_docs.py::test_x` |", "| b | nothing |"]
    assert [r for r in rows if not TEST_NAME.search(r)] == ["| b | nothing |"]


def test_design_map_lists_every_module_and_only_existing_ones():
    text = DESIGN.read_text()
    section = text[text.index("## Modules") : text.index("## The path of a config")]
    mapped = re.findall(r"^\| `([\w/]+\.py)` \|", section, re.M)
    assert len(mapped) == len(set(mapped)), "a module has two rows"
    package = ROOT / "paligemma_ft"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py"}
    assert modules - set(mapped) == set(), "modules without a row in docs/design.md"
    assert {m for m in mapped if not (package / m).is_file()} == set(), "rows for modules that do not exist"
