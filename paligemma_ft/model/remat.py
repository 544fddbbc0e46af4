"""Rematerialization policies for the scanned layers (`model.img.remat_policy`, `model.llm.remat_policy`).

What each block keeps for the backward pass, lightest recompute first (what `paligemma-ft plan --policies`
compares):

  none    (= everything_saveable)                 keep every activation: most memory, no recompute;
  dots    (= dots_saveable, checkpoint_dots)      keep matmul outputs, recompute the elementwise ops;
  dots_with_no_batch_dims_saveable                keep weight matmul outputs only, recompute attention too
          (= checkpoint_dots_with_no_batch_dims);
  full    (= nothing_saveable, big_vision's)      keep each block's input, recompute the whole block.

In 16-bit compute the model's products are custom VJPs (`paligemma_ft.model.precision.einsum`), which JAX's dot
policies do not see; their results carry names, and the dots policies here also save those names, so "dots"
means the same in float32 and bfloat16.
"""

from __future__ import annotations

from typing import Any

import jax

from paligemma_ft.model.precision import DOT_NAMES

# Accepted names -> (jax.checkpoint_policies attribute or None for no remat, short name).
POLICIES: dict[str, tuple[str | None, str]] = {
    "none": (None, "none"),
    "everything_saveable": (None, "none"),
    "dots": ("dots_saveable", "dots"),
    "dots_saveable": ("dots_saveable", "dots"),
    "checkpoint_dots": ("dots_saveable", "dots"),
    "dots_with_no_batch_dims_saveable": ("dots_with_no_batch_dims_saveable", "dots_with_no_batch_dims_saveable"),
    "checkpoint_dots_with_no_batch_dims": ("dots_with_no_batch_dims_saveable", "dots_with_no_batch_dims_saveable"),
    "full": ("nothing_saveable", "full"),
    "nothing_saveable": ("nothing_saveable", "full"),
}
# The distinct policies, lightest recompute (most memory) first.
STANDARD = ("none", "dots", "dots_with_no_batch_dims_saveable", "full")
DEFAULT = "nothing_saveable"  # big_vision's.


def _check(name: str | None) -> str:
    name = DEFAULT if name is None else name
    if name not in POLICIES:
        raise ValueError(
            f"Unknown remat_policy {name!r}: use one of {', '.join(STANDARD)} (or the jax.checkpoint_policies "
            f"names {', '.join(k for k in POLICIES if k not in STANDARD)})."
        )
    return name


def short_name(name: str | None) -> str:
    """The policy's short name ("none", "dots", "dots_with_no_batch_dims_saveable", "full"); None = the default."""
    return POLICIES[_check(name)][1]


def remat_policy(name: str | None) -> Any:
    """The `jax.checkpoint` policy for a config name; None means no rematerialization ("none").

    Raises:
      ValueError: for an unknown name (the message lists the accepted ones).
    """
    attr = POLICIES[_check(name)][0]
    if attr is None:
        return None
    policies = jax.checkpoint_policies
    policy = getattr(policies, attr)
    if attr == "dots_saveable":
        return policies.save_from_both_policies(policy, policies.save_only_these_names(*DOT_NAMES.values()))
    if attr == "dots_with_no_batch_dims_saveable":
        return policies.save_from_both_policies(policy, policies.save_only_these_names(DOT_NAMES[False]))
    return policy
