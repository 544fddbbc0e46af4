"""Hugging Face PaliGemma folders on disk: recognising one, and finding one in the HF cache (offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_config(folder: str | os.PathLike) -> dict | None:
    """The folder's `config.json` as a dict, or None when there is none or it is not JSON."""
    try:
        with open(Path(folder) / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_hf_folder(folder: str | os.PathLike) -> bool:
    """True for a folder with a `config.json` and safetensors weights (a transformers `save_pretrained` folder)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and ((folder / SINGLE).is_file() or (folder / INDEX).is_file())


def cached_snapshot(repo: str) -> Path:
    """The HF cache's snapshot folder of `repo` (`org/name[@revision]`), found offline by huggingface_hub.

    Raises:
      FileNotFoundError: huggingface_hub is not installed, or the repo (revision) is not in the cache; the
        message names the cache folder and the download command.
    """
    repo_id, _, revision = repo.partition("@")
    try:
        import huggingface_hub  # noqa: PLC0415 - the `hf` extra.
        from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415
    except ImportError as e:
        raise FileNotFoundError(f"checkpoint 'hf:{repo}' needs huggingface_hub: pip install 'paligemma-ft[hf]'") from e
    try:
        # local_files_only: the cache answers, the network is never asked.
        path = huggingface_hub.snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError) as e:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"checkpoint 'hf:{repo}' is not in the Hugging Face cache {cache} ({type(e).__name__}); download it "
            f"first with `hf download {repo_id}` (or set HF_HUB_CACHE to the cache that holds it)"
        ) from None
    return Path(path)
