"""`paligemma-ft plan --arithmetic-only`: a rough estimate of a training step's temporaries, without compiling.

Per example and tower: the activations the remat policy keeps for the backward pass in every block, plus one
block's working set (recomputed during the backward pass); attention logits and probabilities in float32; then
gradients and the optimizer update's scratch (2 x the trainable parameters' bytes) and one chunk of float32
vocabulary logits. Compiled plans replace this with XLA's own memory analysis.
"""

from __future__ import annotations

from paligemma_ft import flops as flops_lib
from paligemma_ft.model import remat


def _tower_activation_bytes(
    tokens: int, width: int, mlp: int, qkv_width: int, heads: int, depth: int, policy: str, act: int
) -> float:
    """Rough bytes for one example's activations in one tower (attention logits/probs in float32).

    Saved for the backward pass: the block inputs under "full" remat, matmul outputs under "dots", everything
    under "none"; plus one block's working set, recomputed during the backward pass.
    """
    scores = 2 * heads * tokens * tokens * 4  # f32 logits and probabilities.
    one_block = tokens * (6 * width + 3 * mlp + 2 * qkv_width) * act + scores
    matmul_outputs = tokens * (3 * width + 2 * qkv_width + 2 * mlp) * act
    saved = {
        "full": tokens * width * act,
        "dots": matmul_outputs + scores / 2,
        "dots_with_no_batch_dims_saveable": matmul_outputs,  # Not the attention scores (batched products).
    }.get(policy, one_block)
    return depth * saved + one_block


def estimate_temp_bytes(
    model_cfg: dict,
    res: int,
    text_len: int,
    per_device_batch: int,
    grad_bytes: int,
    act_bytes: int = 4,
    chunk: int = 512,
) -> float:
    """Rough per-device temporaries of one step: activations of `per_device_batch` examples (per micro-batch),
    gradients and optimizer-update scratch (2 x `grad_bytes`), and one chunk of float32 vocabulary logits."""
    img, llm = flops_lib._resolve(model_cfg)  # noqa: SLF001 - same package.
    p = flops_lib._image_tokens(img, res)  # noqa: SLF001
    t = p + text_len
    per_example = _tower_activation_bytes(
        p,
        img["width"],
        img.get("mlp_dim") or 4 * img["width"],
        3 * img["width"],
        img["num_heads"],
        img["depth"],
        remat.short_name(img.get("remat_policy")) if img.get("scan") else "none",
        act_bytes,
    )
    per_example += _tower_activation_bytes(
        t,
        llm["width"],
        2 * llm["mlp_dim"],
        (llm["num_heads"] + 2 * llm["num_kv_heads"]) * llm["head_dim"],
        llm["num_heads"],
        llm["depth"],
        remat.short_name(llm.get("remat_policy")) if llm.get("scan", True) else "none",
        act_bytes,
    )
    logits = 3 * min(chunk, per_device_batch * text_len) * llm["vocab_size"] * 4
    return per_device_batch * per_example + 2 * grad_bytes + logits
