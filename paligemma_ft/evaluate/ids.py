"""The check every metric makes first: predictions and references describe the same examples."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any


def check_same_ids(predictions: Mapping[Hashable, Any], references: Mapping[Hashable, Any], metric: str) -> list:
    """The ids of `predictions`, in their order, after checking that `references` has exactly the same ids.

    Raises:
      ValueError: some ids are on one side only (up to five of each are named), or there are no examples.
    """
    missing = [k for k in predictions if k not in references]
    extra = [k for k in references if k not in predictions]
    if missing or extra:
        raise ValueError(
            f"predictions and references cover different ids: without references {missing[:5]}, "
            f"without prediction {extra[:5]}"
        )
    if not predictions:
        raise ValueError(f"{metric}: no examples to score")
    return list(predictions)
