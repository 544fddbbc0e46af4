"""Experiment configs: load a `configs/*.py` file, apply `--config.a.b=value` overrides, save it as JSON.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`. It is named on the command line as
`configs/name.py` or `configs/name.py:arg`, where `arg` (a plain string) goes to `get_config(arg)`, the way
big_vision picks a variant of one experiment (`:res=448`, `:task=vqa`). A bare name (`demo`, `vqa:tfds`) is a
config shipped with the package (`configs/` of the repository, `paligemma_ft.configs` in the wheel).

The file's config is laid over the declared base (`paligemma_ft.config_base`): the keys it sets win, the others
get their declared defaults, and a key declared nowhere fails, naming the file, the key and the closest declared
keys. A file may add top-level keys for its own use (names its paths follow with `get_ref`) by listing them in
`config.local_keys`. The result is locked before overrides are applied, so a typo in an override
fails the same way instead of silently adding a field that nothing reads; only open groups (`model.llm`,
`evals`, ...) accept new keys. Override values are Python literals read with `ast.literal_eval` (never `eval`);
anything that is not a literal stays a string.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import ml_collections

from paligemma_ft import config_base
from paligemma_ft.safety import redact  # Re-exported: `config.redact` is what callers use.

_PATH_ARG = re.compile(r"^(?P<path>.+?\.py)(?::(?P<arg>.*))?$")
_NAME_ARG = re.compile(r"^(?P<name>[A-Za-z_]\w*)(?::(?P<arg>.*))?$")


def shipped_configs_dir() -> Path:
    """The folder of the configs shipped with the package: `paligemma_ft.configs` in an installed wheel, else the
    repository's top-level `configs/` (a source checkout, where that package is mapped from)."""
    spec = importlib.util.find_spec("paligemma_ft.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[1] / "configs"


def shipped_config_names() -> list[str]:
    """Names usable as `--config NAME` (`demo`, `longcap100`, ...)."""
    return sorted(p.stem for p in shipped_configs_dir().glob("*.py") if not p.name.startswith("_"))


def _split_spec(spec: str) -> tuple[Path, str | None]:
    """`configs/x.py:arg` -> (Path("configs/x.py"), "arg"); a bare `name[:arg]` -> the shipped `name.py`."""
    match = _PATH_ARG.match(spec)
    if match is not None:
        return Path(match["path"]), match["arg"]
    named = _NAME_ARG.match(spec)
    if named is not None:
        path = shipped_configs_dir() / f"{named['name']}.py"
        if not path.is_file():
            raise FileNotFoundError(
                f"config {spec!r}: no shipped config of that name (shipped: {', '.join(shipped_config_names())}); "
                "or give a file, such as configs/name.py"
            )
        return path, named["arg"]
    raise ValueError(
        f"config {spec!r}: expected a Python file (configs/name.py or configs/name.py:arg) or a shipped config's "
        f"name ({', '.join(shipped_config_names())})"
    )


def _import_file(path: Path) -> Any:
    """Imports a config file as a fresh module (no `eval`); its folder is importable while it runs."""
    if not path.is_file():
        hint = (
            f"; the shipped config of that name is --config {path.stem}" if path.stem in shipped_config_names() else ""
        )
        raise FileNotFoundError(f"config file {path} does not exist{hint}")
    name = "_paligemma_ft_config_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"config file {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Shared helpers next to the configs (`import common`) resolve from the config's own folder.
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def parse_value(raw: str) -> Any:
    """A Python literal (`3`, `1e-4`, `[1, 2]`, `'x'`, `None`, `True`) or, failing that, the raw string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def _split_override(item: str) -> tuple[str, str]:
    """`--config.a.b=v`, `config.a.b=v` or `a.b=v` -> ("a.b", "v")."""
    body = item[2:] if item.startswith("--") else item
    body = body[len("config.") :] if body.startswith("config.") else body
    key, sep, raw = body.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r}: expected --config.KEY=VALUE, e.g. --config.total_steps=100")
    return key, raw


def _coerce(old: Any, new: Any, raw: str) -> Any:
    """Fits a parsed value to the field's current type where the intent is unambiguous."""
    if isinstance(old, str) and not isinstance(new, str):
        return raw  # `--config.model_init=123` names a file called "123", not a number.
    if isinstance(old, bool) and isinstance(new, str) and new.lower() in ("true", "false"):
        return new.lower() == "true"  # Shells and YAML habits write booleans in lower case.
    return new


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Sets one `--config.a.b=value` on a (locked) config in place.

    Keys inside open groups (`config_base.OPEN_GROUPS`, e.g. `model.llm`, `evals`) may be new.

    Raises:
      ValueError: the key does not exist (naming it, with close matches), or the value has the wrong type.
    """
    key, raw = _split_override(item)
    *parents, leaf = key.split(".")
    node: Any = config
    walked: list[str] = []
    for depth, part in enumerate([*parents, leaf]):
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            raise ValueError(
                f"override {item!r}: config.{'.'.join(walked)} is a {type(node).__name__}, "
                f"not a group of fields, so it has no field {part!r}"
            )
        if part not in node and config_base.is_open(".".join([*walked, part])):
            if isinstance(node, ml_collections.ConfigDict):  # A new key in an open group.
                with node.unlocked():
                    node[part] = {} if depth < len(parents) else parse_value(raw)
            else:
                node[part] = {} if depth < len(parents) else parse_value(raw)
        if part not in node:
            where = "config." + ".".join(walked) if walked else "the config"
            keys = sorted(str(k) for k in node.keys())
            raise ValueError(
                f"override {item!r}: unknown key config.{key} ({part!r} is not in {where}). "
                f"{config_base.close_matches(part, keys)}Known keys there: {', '.join(keys)}"
            )
        walked.append(part)
        if depth < len(parents):
            node = node[part]
    value = _coerce(node[leaf], parse_value(raw), raw)
    try:
        node[leaf] = value
    except TypeError as e:  # ConfigDict refuses e.g. 0.5 for an int field.
        raise ValueError(
            f"override {item!r}: config.{key} is a {type(node[leaf]).__name__}, got {value!r} ({e})"
        ) from None


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Imports `configs/name.py[:arg]` (or a shipped `name[:arg]`), calls `get_config([arg])`, lays it over the
    declared base, locks the result and applies overrides.

    Args:
      path: a config file, optionally followed by `:arg` for `get_config(arg)`; or a shipped config's name.
      overrides: items like `--config.lr=1e-4` (the `--config.` prefix is optional), applied in order.

    Returns:
      The locked ConfigDict with every declared key: new keys cannot be added (except in open groups), existing
      ones can still be set.

    Raises:
      FileNotFoundError: the file (or shipped config) does not exist.
      ValueError: no `get_config`, a key the file sets that is not declared, or a bad override (unknown key,
        wrong type, missing `=`).
    """
    file, arg = _split_spec(path)
    module = _import_file(file)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {file}: defines no get_config() function")
    config = get_config() if arg is None else get_config(arg)
    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"config file {file}: get_config() returned a {type(config).__name__}, "
            "expected an ml_collections.ConfigDict"
        )
    config_base.complete(config, f"config file {file}")
    config.lock()
    for item in overrides:
        apply_override(config, item)
    return config


def save_config(config: ml_collections.ConfigDict | dict, path: str | os.PathLike) -> None:
    """Writes the config as indented JSON (non-JSON values as strings), without credential-like fields."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(redact(tree), indent=2, sort_keys=True, default=str) + "\n")
