"""Parameter names and layouts, big_vision <-> Hugging Face PaliGemma, one tensor at a time and both ways.

Each `Rule` ties one of our per-layer parameters (`img/Transformer/encoderblock_{i}/...`, `llm/layers/{i}/...`:
the scan layout is sliced or stacked on read by `checkpoints/fit.py`) to the HF tensor(s) it becomes, with the
transform each way. The transforms are transposes, reshapes, indexing and stacking only, so a round trip is
bitwise. Conventions bridged (reference: ecosystem notes, "HF names vs big_vision names"):

  * flax kernels are [in, out], torch `Linear.weight` is [out, in]; the patchify conv is HWIO in flax, OIHW in
    torch; per-head einsum weights ([N, D, H], [N, H, D]) flatten heads x head_dim into one axis, head-major.
  * `kv_einsum[0]` is K and `[1]` is V; `gating_einsum[0]` is the GELU gate and `[1]` the linear "up" branch; a
    fused `qkv_einsum` (kv heads == heads) is q, k, v. RMSNorm scales copy unchanged: HF's Gemma RMSNorm also
    multiplies by (1 + weight). Gemma 1 calls its pre-MLP norm `post_attention_layernorm`; Gemma 2 has four.
  * The embedding's HF padding rows are handled by the readers and writers (`hf_import.py`, `hf_export.py`),
    not here: big_vision has no `<image>` row.

HF names are written here in a canonical form (`vision.`, `projector.`, `text.`, `lm_head.`) and mapped to the
layout of a file: transformers 4.x and the released hub files (`vision_tower.vision_model.`,
`multi_modal_projector.`, `language_model.model.`), transformers 5 in memory (`model.vision_tower.`, ...) and
transformers 5's `save_pretrained` (`vision_tower.`, ...). Files are written in the hub layout, which every
version of transformers (and vLLM) reads.

Axes: D width, N heads, K kv heads, H head dim, F mlp dim, p patch size, C channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# Canonical prefix -> prefix in a file, for the layouts we write.
HUB = {
    "vision.": "vision_tower.vision_model.",
    "projector.": "multi_modal_projector.",
    "text.": "language_model.model.",
}
MEMORY = {
    "vision.": "model.vision_tower.",
    "projector.": "model.multi_modal_projector.",
    "text.": "model.language_model.",
}
# Any layout's prefix -> canonical prefix (longest first, so `vision_tower.vision_model.` wins over `vision_tower.`).
_READ = (
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
EMBEDDING = "text.embed_tokens.weight"  # Canonical name of the (padded) token table.
LM_HEAD = "lm_head.weight"


def canonical(name: str) -> str | None:
    """The canonical form of an HF tensor name in any known layout, or None for a name of no known layout."""
    for prefix, short in _READ:
        if name.startswith(prefix):
            return short + name[len(prefix) :]
    return None


def in_layout(name: str, layout: Mapping[str, str] = HUB) -> str:
    """A canonical name as written in `layout` (`HUB` or `MEMORY`)."""
    for short, prefix in layout.items():
        if name.startswith(short):
            return prefix + name[len(short) :]
    return name


@dataclasses.dataclass(frozen=True)
class Rule:
    """One of our parameters <-> its HF tensors.

    Attributes:
      ours: our per-layer name.
      hf: canonical HF names, in the order `to_hf` returns them.
      to_hf: our array -> the HF arrays (views where possible).
      from_hf: (HF arrays, our shape) -> our array.
    """

    ours: str
    hf: tuple[str, ...]
    to_hf: Callable[[np.ndarray], list[np.ndarray]]
    from_hf: Callable[[Sequence[np.ndarray], tuple[int, ...]], np.ndarray]


def _same(ours: str, hf: str) -> Rule:
    return Rule(ours, (hf,), lambda x: [x], lambda ys, s: ys[0].reshape(s))


def _flat(ours: str, hf: str) -> Rule:
    """Our per-head bias [N, H] <-> [N*H]."""
    return Rule(ours, (hf,), lambda x: [x.reshape(-1)], lambda ys, s: ys[0].reshape(s))


def _linear(ours: str, hf: str) -> Rule:
    """flax Dense kernel [in, out] <-> torch Linear weight [out, in]."""
    return Rule(ours, (hf,), lambda x: [x.T], lambda ys, s: ys[0].T)


def _heads_in(w: np.ndarray) -> np.ndarray:
    """Gemma per-head input projection [N, D, H] -> torch Linear weight [N*H, D] (head-major)."""
    return w.transpose(0, 2, 1).reshape(-1, w.shape[1])


def _heads_in_back(y: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """torch [N*H, D] -> [N, D, H] for our `shape` [N, D, H]."""
    n, d, h = shape
    return y.reshape(n, h, d).transpose(0, 2, 1)


def _vision_rules(depth: int) -> list[Rule]:
    v = "vision."
    rules = [
        # Conv HWIO [p, p, C, D] <-> OIHW [D, C, p, p]; patches are row-major (y, then x) on both sides.
        Rule(
            "img/embedding/kernel",
            (v + "embeddings.patch_embedding.weight",),
            lambda x: [x.transpose(3, 2, 0, 1)],
            lambda ys, s: ys[0].transpose(2, 3, 1, 0),
        ),
        _same("img/embedding/bias", v + "embeddings.patch_embedding.bias"),
        # [1, P, D] <-> [P, D].
        Rule(
            "img/pos_embedding",
            (v + "embeddings.position_embedding.weight",),
            lambda x: [x[0]],
            lambda ys, s: ys[0][None],
        ),
    ]
    for i in range(depth):
        ours, theirs = f"img/Transformer/encoderblock_{i}/", f"{v}encoder.layers.{i}."
        mha = ours + "MultiHeadDotProductAttention_0/"
        for flax_ln, hf_ln in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
            rules.append(_same(f"{ours}{flax_ln}/scale", f"{theirs}{hf_ln}.weight"))
            rules.append(_same(f"{ours}{flax_ln}/bias", f"{theirs}{hf_ln}.bias"))
        for flax_proj, hf_proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            # Kernel [D, N, H] <-> [N*H, D]; bias [N, H] <-> [N*H].
            rules.append(
                Rule(
                    f"{mha}{flax_proj}/kernel",
                    (f"{theirs}self_attn.{hf_proj}.weight",),
                    lambda x: [x.reshape(x.shape[0], -1).T],
                    lambda ys, s: ys[0].T.reshape(s),
                )
            )
            rules.append(_flat(f"{mha}{flax_proj}/bias", f"{theirs}self_attn.{hf_proj}.bias"))
        # Output kernel [N, H, D] <-> [D, N*H].
        rules.append(
            Rule(
                f"{mha}out/kernel",
                (f"{theirs}self_attn.out_proj.weight",),
                lambda x: [x.reshape(-1, x.shape[-1]).T],
                lambda ys, s: ys[0].T.reshape(s),
            )
        )
        rules.append(_same(f"{mha}out/bias", f"{theirs}self_attn.out_proj.bias"))
        for flax_dense, hf_fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            rules.append(_linear(f"{ours}MlpBlock_0/{flax_dense}/kernel", f"{theirs}mlp.{hf_fc}.weight"))
            rules.append(_same(f"{ours}MlpBlock_0/{flax_dense}/bias", f"{theirs}mlp.{hf_fc}.bias"))
    rules += [
        _same("img/Transformer/encoder_norm/scale", v + "post_layernorm.weight"),
        _same("img/Transformer/encoder_norm/bias", v + "post_layernorm.bias"),
        # The ViT head is PaliGemma's linear projection into the LLM width.
        _linear("img/head/kernel", "projector.linear.weight"),
        _same("img/head/bias", "projector.linear.bias"),
    ]
    return rules


def _stacked(ours: str, hf: tuple[str, ...]) -> Rule:
    """Our [k, N, D, H] (k = 2 for kv, 3 for qkv) <-> k per-head projections."""
    return Rule(
        ours,
        hf,
        lambda x: [_heads_in(x[j]) for j in range(x.shape[0])],
        lambda ys, s: np.stack([_heads_in_back(y, s[1:]) for y in ys]),
    )


def _text_rules(depth: int, fused_qkv: bool, post_norms: bool) -> list[Rule]:
    t = "text."
    rules = [_same("llm/final_norm/scale", t + "norm.weight")]
    for i in range(depth):
        ours, theirs = f"llm/layers/{i}/", f"{t}layers.{i}."
        attn = theirs + "self_attn."
        if fused_qkv:
            rules.append(
                _stacked(
                    ours + "attn/qkv_einsum/w", (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight")
                )
            )
        else:
            rules.append(
                Rule(
                    ours + "attn/q_einsum/w",
                    (attn + "q_proj.weight",),
                    lambda x: [_heads_in(x)],
                    lambda ys, s: _heads_in_back(ys[0], s),
                )
            )
            rules.append(_stacked(ours + "attn/kv_einsum/w", (attn + "k_proj.weight", attn + "v_proj.weight")))
        # attn_vec [N, H, D] <-> o_proj [D, N*H].
        rules.append(
            Rule(
                ours + "attn/attn_vec_einsum/w",
                (attn + "o_proj.weight",),
                lambda x: [x.reshape(-1, x.shape[-1]).T],
                lambda ys, s: ys[0].T.reshape(s),
            )
        )
        # gating [2, D, F]: index 0 goes through GELU (gate_proj), 1 is linear (up_proj); each [F, D] in torch.
        rules.append(
            Rule(
                ours + "mlp/gating_einsum",
                (theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"),
                lambda x: [x[0].T, x[1].T],
                lambda ys, s: np.stack([ys[0].T, ys[1].T]),
            )
        )
        rules.append(_linear(ours + "mlp/linear", theirs + "mlp.down_proj.weight"))
        rules.append(_same(ours + "pre_attention_norm/scale", theirs + "input_layernorm.weight"))
        if post_norms:  # Gemma 2: four norms per block.
            rules.append(_same(ours + "post_attention_norm/scale", theirs + "post_attention_layernorm.weight"))
            rules.append(_same(ours + "pre_ffw_norm/scale", theirs + "pre_feedforward_layernorm.weight"))
            rules.append(_same(ours + "post_ffw_norm/scale", theirs + "post_feedforward_layernorm.weight"))
        else:  # Gemma 1 calls its pre-MLP norm `post_attention_layernorm`.
            rules.append(_same(ours + "pre_ffw_norm/scale", theirs + "post_attention_layernorm.weight"))
    return rules


def rules_for(img: Mapping[str, Any], llm: Mapping[str, Any]) -> list[Rule]:
    """Every rule of a model with resolved tower configs (`presets.resolve_*_config`), except the embedding."""
    fused = llm["num_kv_heads"] == llm["num_heads"]  # Our Gemma fuses q, k, v when every head has its own K/V.
    return _vision_rules(img["depth"]) + _text_rules(llm["depth"], fused, llm["post_norms"])


def rules_from_names(names: Sequence[str]) -> list[Rule]:
    """The rules for a per-layer tree given only its names (depths, fused qkv and post-norms read from them)."""
    names = list(names)
    depth = lambda prefix: len({n[len(prefix) :].split("/")[0] for n in names if n.startswith(prefix)})
    img_depth = len({n.split("/")[2] for n in names if n.startswith("img/Transformer/encoderblock_")})
    llm_depth = depth("llm/layers/")
    fused = any("/attn/qkv_einsum/" in n for n in names)
    post_norms = any("/post_attention_norm/" in n for n in names)
    return _vision_rules(img_depth) + _text_rules(llm_depth, fused, post_norms)


def zero_copy(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A read-only array of `shape` that occupies no memory: the rules' views on it give the HF shapes."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), tuple(shape), (0,) * len(shape), writeable=False)
