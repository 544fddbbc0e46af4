"""Model configurations: big_vision's keys, named presets, validation, and inference from checkpoint shapes.

A model config is `dict(img=dict(...), llm=dict(...))` exactly as big_vision's `config.model`, e.g. the
PaliGemma 2 3B fine-tuning config `img=dict(variant="So400m/14", pool_type="none", scan=True),
llm=dict(variant="gemma2_2b", vocab_size=257152, final_logits_softcap=0.0)`. Presets spare users typing it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from paligemma_ft.model import gemma, vit

PALIGEMMA_VOCAB = 257_152  # 256 000 Gemma pieces + 1024 <loc> + 128 <seg>.
TINY_VOCAB = 1_664  # The shipped tiny tokenizer's vocabulary (see scripts/make_tiny_tokenizer.py).

# Every key each tower accepts (big_vision's names); anything else is a typo and fails naming it.
IMG_KEYS = {
    "variant",
    "num_classes",
    "patch_size",
    "width",
    "depth",
    "mlp_dim",
    "num_heads",
    "posemb",
    "dropout",
    "pool_type",
    "head_zeroinit",
    "scan",
    "remat_policy",
    "dtype_mm",
    "rep_size",
}
LLM_KEYS = {
    "variant",
    "width",
    "depth",
    "mlp_dim",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "post_norms",
    "attn_logits_softcap",
    "final_logits_softcap",
    "query_pre_attn_norm",
    "norm_eps",
    "scan",
    "remat_policy",
    "dropout",
    "dropout_bdims",
    "cache_dtype",
    "embed_dtype",
    "attn_impl",
}

# PaliGemma's ViT everywhere: SigLIP So400m/14, all tokens kept, scanned.
_SIGLIP = dict(variant="So400m/14", pool_type="none", scan=True)
# gemma_bv's defaults (reference 2.3): scanned, full remat, bf16 KV cache.
_LLM_DEFAULTS = dict(
    variant="gemma_2b",
    scan=True,
    remat_policy="nothing_saveable",
    dropout=0.0,
    dropout_bdims=(),
    cache_dtype="bfloat16",
)


def _check_keys(cfg: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in model.{where}; allowed: {sorted(allowed)}.")


def resolve_llm_config(llm: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merges a big_vision-style `llm` dict over its variant; returns the `Gemma` module's fields."""
    llm = dict(llm or {})
    _check_keys(llm, LLM_KEYS, "llm")
    # As gemma_bv: None for these means "keep the variant's value"; `cache_dtype=None` means float32.
    keep_if_none = {"vocab_size", "final_logits_softcap", "attn_logits_softcap"}
    cfg = {**_LLM_DEFAULTS, **{k: v for k, v in llm.items() if not (v is None and k in keep_if_none)}}
    variant = cfg.pop("variant")
    if variant is not None and variant not in gemma.VARIANTS:
        raise ValueError(f"Unknown model.llm.variant {variant!r}; known: {sorted(gemma.VARIANTS)}.")
    base = copy.deepcopy(gemma.VARIANTS[variant]) if variant else {}
    # big_vision: `vocab_size`, `final_logits_softcap`, `attn_logits_softcap` override the variant when given.
    out = {**base, **cfg}
    missing = [
        k for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size") if k not in out
    ]
    if missing:
        raise ValueError(f"model.llm needs a variant or explicit {missing}.")
    if out["num_heads"] % out["num_kv_heads"]:
        raise ValueError(
            f"model.llm.num_heads={out['num_heads']} is not a multiple of num_kv_heads={out['num_kv_heads']}."
        )
    out["dropout_bdims"] = tuple(out.get("dropout_bdims", ()))
    return out


def resolve_img_config(img: Mapping[str, Any] | None, *, llm_width: int) -> dict[str, Any]:
    """Merges a big_vision-style `img` dict over its variant; the head projects into `llm_width`."""
    img = dict(img if img is not None else _SIGLIP)
    _check_keys(img, IMG_KEYS, "img")
    if img.pop("rep_size", False):
        raise ValueError("model.img.rep_size is not supported by PaliGemma (the head projects every token).")
    variant = img.pop("variant", None)
    out = {**vit.decode_variant(variant), **img}
    out.setdefault("num_classes", llm_width)
    if "patch_size" in out:
        ps = out["patch_size"]
        out["patch_size"] = tuple(ps) if isinstance(ps, (list, tuple)) else (int(ps), int(ps))
    return out


def _pg(llm_variant: str, res: int, **llm_kw) -> tuple[dict[str, Any], int]:
    return dict(img=dict(_SIGLIP), llm=dict(variant=llm_variant, vocab_size=PALIGEMMA_VOCAB, **llm_kw)), res


def _tiny(res: int = 32, **llm_kw) -> tuple[dict[str, Any], int]:
    img = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8), pool_type="none", scan=True)
    llm = dict(
        variant=None,
        width=64,
        depth=2,
        mlp_dim=128,
        num_heads=4,
        num_kv_heads=1,
        head_dim=16,
        vocab_size=TINY_VOCAB,
        query_pre_attn_norm="rsqrt_head_dim",
        attn_logits_softcap=0.0,
        final_logits_softcap=0.0,
        post_norms=False,
    )
    llm.update(llm_kw)
    return dict(img=img, llm=llm), res


# name -> (model config, image resolution). PaliGemma 2 presets use final_logits_softcap=0.0 like every big_vision
# fine-tuning config and the colab (reference 2.6); pass `final_logits_softcap=30.0` for "faithful Gemma 2".
PRESETS: dict[str, tuple[dict[str, Any], int]] = {}
for _res in (224, 448, 896):
    PRESETS[f"pg1_3b_{_res}"] = _pg("gemma_2b", _res)
    PRESETS[f"pg2_3b_{_res}"] = _pg("gemma2_2b", _res, final_logits_softcap=0.0)
    PRESETS[f"pg2_10b_{_res}"] = _pg("gemma2_9b", _res, final_logits_softcap=0.0)
    PRESETS[f"pg2_28b_{_res}"] = _pg("gemma2_27b", _res, final_logits_softcap=0.0)
# Tiny models for tests and the demo (MQA like PaliGemma 1; GQA + post-norms + soft-caps like PaliGemma 2).
PRESETS["tiny_pg1"] = _tiny()
PRESETS["tiny_pg1_mha"] = _tiny(num_kv_heads=4)
PRESETS["tiny_pg2"] = _tiny(num_kv_heads=2, post_norms=True, attn_logits_softcap=50.0)
# The model shipped as `builtin:demo` (scripts/make_demo_model.py): PaliGemma 1 layout, 64 px, ~1.6M parameters.
PRESETS["demo"] = (
    dict(
        img=dict(width=96, depth=3, mlp_dim=192, num_heads=4, patch_size=(8, 8), pool_type="none", scan=True),
        llm=dict(
            variant=None,
            width=128,
            depth=3,
            mlp_dim=384,
            num_heads=4,
            num_kv_heads=1,
            head_dim=32,
            vocab_size=TINY_VOCAB,
            query_pre_attn_norm="rsqrt_head_dim",
            attn_logits_softcap=0.0,
            final_logits_softcap=0.0,
            post_norms=False,
        ),
    ),
    64,
)
PRESETS["tiny_pg2_27b"] = _tiny(
    num_kv_heads=2, post_norms=True, attn_logits_softcap=50.0, head_dim=8, query_pre_attn_norm="rsqrt_emb_per_head"
)


def get_preset(name: str) -> tuple[dict[str, Any], int]:
    """Returns `(model_config, resolution)` for a preset name, e.g. `get_preset("pg2_3b_224")`."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; known: {sorted(PRESETS)}.")
    cfg, res = PRESETS[name]
    return copy.deepcopy(cfg), res


def infer_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Any], int]:
    """Infers `(model_config, resolution)` from a flat {name: shape} of a (scanned) PaliGemma checkpoint.

    Gemma 2 is recognized by its post-norms; its soft-caps follow the PaliGemma 2 presets (attention 50, final
    0.0). Used so `model_init=<file>` alone is enough to build the right model.
    """

    def get(name):
        if name not in shapes:
            raise ValueError(
                f"Cannot infer the model from the checkpoint: parameter {name!r} is missing "
                "(is it a PaliGemma checkpoint in big_vision's scanned layout?)."
            )
        return tuple(shapes[name])

    blk = "img/Transformer/encoderblock/"
    depth_v, width_v, heads_v, _ = get(blk + "MultiHeadDotProductAttention_0/query/kernel")
    patch = get("img/embedding/kernel")[0]
    mlp_v = get(blk + "MlpBlock_0/Dense_0/kernel")[-1]
    n_tok = get("img/pos_embedding")[1]
    res = int(round(n_tok**0.5)) * patch
    depth, n_heads, width, head_dim = (
        get("llm/layers/attn/q_einsum/w")
        if "llm/layers/attn/q_einsum/w" in shapes
        else (lambda s: (s[0], s[2], s[3], s[4]))(get("llm/layers/attn/qkv_einsum/w"))
    )
    kv = shapes.get("llm/layers/attn/kv_einsum/w")
    n_kv = kv[2] if kv is not None else n_heads
    mlp = get("llm/layers/mlp/linear")[1]
    vocab = get("llm/embedder/input_embedding")[0]
    post_norms = "llm/layers/post_attention_norm/scale" in shapes
    img = dict(
        width=width_v,
        depth=depth_v,
        mlp_dim=mlp_v,
        num_heads=heads_v,
        patch_size=(patch, patch),
        pool_type="none",
        scan=True,
    )
    # The shapes cannot tell the query scaling apart; released sizes are matched to their variant below.
    query_norm = "rsqrt_head_dim"
    llm = dict(
        variant=None,
        width=width,
        depth=depth,
        mlp_dim=mlp,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab,
        post_norms=post_norms,
        attn_logits_softcap=50.0 if post_norms else 0.0,
        final_logits_softcap=0.0,
        query_pre_attn_norm=query_norm,
    )
    # Prefer the named variant when the shapes are a released size (nicer logs, identical numerics).
    for name, v in gemma.VARIANTS.items():
        if all(v[k] == llm[k] for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")):
            llm = dict(variant=name, vocab_size=vocab, final_logits_softcap=0.0)
            break
    if (width_v, depth_v, mlp_v, heads_v, patch) == (1152, 27, 4304, 16, 14):
        img = dict(_SIGLIP)
    return dict(img=img, llm=llm), res
