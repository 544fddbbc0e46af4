"""Hugging Face transformers PaliGemma: the config both ways, and our tree as a torch model in memory.

`to_hf_config` / `from_hf_config` map our `dict(img=..., llm=...)` to transformers' `PaliGemmaConfig` and back;
`to_hf_state_dict` / `to_hf_model` build an in-memory HF model from our parameters (the tests' second,
independent implementation whose logits must match ours). Files are written and read tensor by tensor by
`hf_export.py` and `hf_import.py` (`paligemma-ft convert`), with the names of `hf_names.py`. torch and
transformers are imported inside the functions so `paligemma_ft` imports without the `hf` extra.

Conventions bridged here (big_vision ↔ HF; the weight layouts are in `hf_names.py`):
  * Vocabulary: big_vision feeds image embeddings as soft tokens in front of the text; HF marks their places
    with an `<image>` placeholder id that must be a row of the embedding. The placeholder is our vocab size V and
    the HF table is padded with zero rows to the next multiple of 64 above V (257 152 → 257 216, the released HF
    PaliGemma layout). Those extra rows produce logit 0 and are never real tokens; the import drops them again
    when no token uses them.
  * Soft-caps: HF applies `final_logit_softcapping` on every forward pass, big_vision's teacher-forced pass and
    first decoded token never do (reference 2.6). The presets use 0.0, which maps to None (identical logits).
  * Gemma 2 in HF alternates sliding-window and global layers; big_vision has no sliding window, so every layer
    is declared `full_attention` on export, and an imported window is checked against the sequence length.

Axes: D width, N heads, K kv heads, H head dim, F mlp dim, V vocab, p patch size, C channels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from paligemma_ft.checkpoints.npz import CheckpointError
from paligemma_ft.model.presets import resolve_img_config, resolve_llm_config

if TYPE_CHECKING:  # Only for annotations; the real imports are lazy.
    import torch
    import transformers

# HF pads the released PaliGemma vocabulary (257 152 + <image>) to a multiple of 64.
_VOCAB_MULTIPLE = 64
# Larger than any sequence PaliGemma sees (4096 image tokens at 896 px plus text); only a safety net, since every
# Gemma 2 layer is declared full attention.
_NO_SLIDING_WINDOW = 1 << 20


def hf_vocab_size(vocab_size: int) -> int:
    """Rows of the HF embedding for our vocabulary of `vocab_size`: room for `<image>` (= id `vocab_size`),
    rounded up to a multiple of 64 (257 152 → 257 216)."""
    return -(-(vocab_size + 1) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


def to_hf_config(model_config: Mapping[str, Any], *, image_size: int) -> transformers.PaliGemmaConfig:
    """Builds the HF config equivalent to our `dict(img=..., llm=...)` model config at `image_size` pixels.

    PaliGemma 2 (a `Gemma2Config` text model) is chosen when the LLM has post-norms, i.e. is Gemma 2.

    Raises:
      ValueError: for settings HF's PaliGemma cannot express (non-learned position embeddings, non-square
        patches, soft-caps or 27B query scaling on a Gemma 1 LLM), naming the config key.
    """
    import transformers

    llm = resolve_llm_config(model_config.get("llm"))
    img = resolve_img_config(model_config.get("img"), llm_width=llm["width"])
    if img.get("posemb", "learn") != "learn":
        raise ValueError(f"model.img.posemb={img['posemb']!r}: HF's SigLIP only has learned position embeddings.")
    patch = tuple(img["patch_size"])
    if patch[0] != patch[1]:
        raise ValueError(f"model.img.patch_size={patch}: HF's SigLIP needs square patches.")
    if image_size % patch[0]:
        raise ValueError(f"image_size={image_size} is not a multiple of model.img.patch_size={patch[0]}.")

    vision = transformers.SiglipVisionConfig(
        hidden_size=img["width"],
        intermediate_size=img.get("mlp_dim") or 4 * img["width"],
        num_hidden_layers=img["depth"],
        num_attention_heads=img["num_heads"],
        num_channels=3,
        image_size=image_size,
        patch_size=patch[0],
        hidden_act="gelu_pytorch_tanh",  # flax's tanh GELU.
        layer_norm_eps=1e-6,
        vision_use_head=False,  # pool_type="none": every token, no MAP head.
    )  # Its projection_dim (the LLM width) is set by PaliGemmaConfig below from its own projection_dim.

    vocab = hf_vocab_size(llm["vocab_size"])
    common = dict(
        vocab_size=vocab,
        hidden_size=llm["width"],
        intermediate_size=llm["mlp_dim"],
        num_hidden_layers=llm["depth"],
        num_attention_heads=llm["num_heads"],
        num_key_value_heads=llm["num_kv_heads"],
        head_dim=llm["head_dim"],
        rms_norm_eps=1e-6,  # big_vision hard-codes 1e-6 whatever `norm_eps` says.
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        attention_bias=False,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    text: transformers.PretrainedConfig
    if llm["post_norms"]:
        if llm["query_pre_attn_norm"] == "rsqrt_emb_per_head":  # Gemma 2 27B: 1/sqrt(width / heads).
            scalar = llm["width"] // llm["num_heads"]
        elif llm["query_pre_attn_norm"] == "rsqrt_head_dim":
            scalar = llm["head_dim"]
        else:
            raise ValueError(f"model.llm.query_pre_attn_norm={llm['query_pre_attn_norm']!r} has no HF equivalent.")
        text = transformers.Gemma2Config(
            **common,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=scalar,
            attn_logit_softcapping=llm["attn_logits_softcap"] or None,
            final_logit_softcapping=llm["final_logits_softcap"] or None,
            sliding_window=_NO_SLIDING_WINDOW,
            layer_types=["full_attention"] * llm["depth"],
        )
    else:
        for key, ok in (
            ("attn_logits_softcap", not llm["attn_logits_softcap"]),
            ("final_logits_softcap", not llm["final_logits_softcap"]),
            ("query_pre_attn_norm", llm["query_pre_attn_norm"] == "rsqrt_head_dim"),
        ):
            if not ok:
                raise ValueError(
                    f"model.llm.{key}={llm[key]!r} needs post_norms=True (Gemma 2): HF's Gemma 1 "
                    "has no soft-caps and scales queries by 1/sqrt(head_dim)."
                )
        text = transformers.GemmaConfig(**common, hidden_act="gelu_pytorch_tanh")

    return transformers.PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=llm["vocab_size"],
        vocab_size=vocab,
        projection_dim=llm["width"],
        hidden_size=llm["width"],
        tie_word_embeddings=True,
    )


# --- HF config -> ours -------------------------------------------------------------------------------------


def _refuse(where: str, key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {key}={value!r} {why}")


def from_hf_config(config: Mapping[str, Any], *, vocab_size: int, where: str = "config.json") -> tuple[dict, int]:
    """Our `(model config, image size)` from an HF PaliGemma `config.json` (a dict), the inverse of `to_hf_config`.

    `vocab_size` is our vocabulary (the HF table without its `<image>` and padding rows, see `hf_import`).

    Raises:
      CheckpointError: not a PaliGemma config, or a setting big_vision's model cannot express; one line naming
        the key and the file.
    """
    kind = config.get("model_type")
    if kind != "paligemma":
        raise CheckpointError(
            f"{where} describes a {kind!r} model (architectures {config.get('architectures')}), not PaliGemma "
            "(model_type 'paligemma'); only PaliGemma 1 and 2 folders convert."
        )
    v, t = dict(config.get("vision_config") or {}), dict(config.get("text_config") or {})
    if v.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise _refuse(where, "vision_config.model_type", v.get("model_type"), "is not SigLIP.")
    if v.get("vision_use_head", False):
        raise _refuse(where, "vision_config.vision_use_head", True, "adds a MAP head PaliGemma does not have.")
    if v.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_fast", "gelu_new"):
        raise _refuse(where, "vision_config.hidden_act", v.get("hidden_act"), "is not the tanh GELU big_vision uses.")
    text_kind = t.get("model_type", "gemma")
    if text_kind not in ("gemma", "gemma2"):
        raise _refuse(where, "text_config.model_type", text_kind, "is not Gemma 1 or 2 (PaliGemma 1 or 2).")
    act = t.get("hidden_activation") or t.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):  # HF's Gemma runs "gelu" as the tanh form too.
        raise _refuse(where, "text_config.hidden_activation", act, "is not the tanh GELU big_vision uses.")
    rope = (t.get("rope_parameters") or {}).get("rope_theta", t.get("rope_theta")) or 10_000.0
    if float(rope) != 10_000.0:
        raise _refuse(where, "text_config.rope_theta", rope, "differs from big_vision's fixed 10 000.")
    patch = int(v.get("patch_size", 14))
    width, heads = int(t.get("hidden_size", 2048)), int(t.get("num_attention_heads", 8))
    head_dim = int(t.get("head_dim") or width // heads)
    img = dict(
        width=int(v.get("hidden_size", 1152)),
        depth=int(v.get("num_hidden_layers", 27)),
        mlp_dim=int(v.get("intermediate_size", 4304)),
        num_heads=int(v.get("num_attention_heads", 16)),
        patch_size=(patch, patch),
        pool_type="none",
        scan=True,
    )
    if int(config.get("projection_dim") or width) != width:
        raise _refuse(where, "projection_dim", config.get("projection_dim"), f"differs from the text width {width}.")
    llm: dict[str, Any] = dict(
        variant=None,
        width=width,
        depth=int(t.get("num_hidden_layers", 18)),
        mlp_dim=int(t.get("intermediate_size", 16384)),
        num_heads=heads,
        num_kv_heads=int(t.get("num_key_value_heads", heads)),
        head_dim=head_dim,
        vocab_size=int(vocab_size),
        post_norms=text_kind == "gemma2",
        attn_logits_softcap=float(t.get("attn_logit_softcapping") or 0.0),
        # HF applies this cap on every forward pass, our model (as big_vision) only when decoding (reference 2.6).
        final_logits_softcap=float(t.get("final_logit_softcapping") or 0.0),
        query_pre_attn_norm="rsqrt_head_dim",
    )
    if text_kind == "gemma2":
        scalar = int(t.get("query_pre_attn_scalar", head_dim))
        if scalar == width // heads and scalar != head_dim:
            llm["query_pre_attn_norm"] = "rsqrt_emb_per_head"  # Gemma 2 27B.
        elif scalar != head_dim:
            raise _refuse(
                where, "text_config.query_pre_attn_scalar", scalar, f"is neither head_dim ({head_dim}) nor width/heads."
            )
    return {"img": img, "llm": llm}, int(v.get("image_size", 224))


def sliding_window(config: Mapping[str, Any]) -> int | None:
    """The window of a Gemma 2 config's sliding-window layers, or None when every layer attends to all tokens.

    transformers 5 lists `layer_types`; 4.x configs alternate sliding and global layers whenever `sliding_window`
    is set. big_vision has no sliding window (see `hf_import.check_sliding_window`).
    """
    t = config.get("text_config") or {}
    if t.get("model_type") != "gemma2" or not t.get("sliding_window"):
        return None
    types = t.get("layer_types")
    if types is not None and "sliding_attention" not in types:
        return None
    return int(t["sliding_window"])


# --- Parameters (in memory, for torch) ---------------------------------------------------------------------


def _to_torch(x: Any) -> torch.Tensor:
    """A numpy/jax array → a contiguous torch tensor of the same dtype (bfloat16 goes through float32 exactly)."""
    import torch

    a = np.ascontiguousarray(np.asarray(x))
    if a.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16; the f32 round trip is exact.
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    if not a.flags.writeable:  # Still a read-only view of a jax buffer: torch must own memory it may write.
        a = a.copy()
    return torch.from_numpy(a)


def pad_vocab(table: np.ndarray) -> np.ndarray:
    """Our table [V, D] with HF's rows appended as zeros: `<image>` (id V) and the padding to a multiple of 64.

    The placeholder's row is never read (image features replace it) and the padding ids are never real tokens,
    so zeros keep the export's meaning and make the rows recognisable as unused on the way back.
    """
    vocab, width = table.shape
    padded = np.zeros((hf_vocab_size(vocab), width), table.dtype)
    padded[:vocab] = table
    return padded


def to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Converts our parameter tree (`{"img": ..., "llm": ...}`, scanned or not) to HF's in-memory state dict.

    The result loads with `PaliGemmaForConditionalGeneration(to_hf_config(...)).load_state_dict(sd, strict=True)`.
    Each tensor keeps its leaf's dtype (float32, float16 or bfloat16); `lm_head.weight` is the embedding table.
    The names and transforms are `hf_names`' rules, the ones the streaming export writes to files.

    Args:
      params: the nested parameter dict, optionally wrapped as `{"params": {...}}`.

    Returns:
      `{hf_name: torch.Tensor}` with torch layouts (Linear [out, in], conv OIHW).
    """
    from paligemma_ft.checkpoints import fit, hf_names  # noqa: PLC0415 - fit imports the model.

    if set(params) == {"params"}:
        params = params["params"]
    missing = [k for k in ("img", "llm") if k not in params]
    if missing:
        raise ValueError(
            f"to_hf_state_dict needs the full PaliGemma tree; top-level key(s) {missing} missing "
            f"(found {sorted(params)})."
        )
    source = fit.DictSource(jax_free(params))
    view = fit.relayout(source, fit.per_layer(source.specs()))
    tensors = {}
    for rule in hf_names.rules_from_names(list(view.specs())):
        for name, array in zip(rule.hf, rule.to_hf(view.read(rule.ours))):
            tensors[hf_names.in_layout(name, hf_names.MEMORY)] = _to_torch(array)
    table = _to_torch(pad_vocab(np.asarray(view.read("llm/embedder/input_embedding"))))
    tensors[hf_names.in_layout(hf_names.EMBEDDING, hf_names.MEMORY)] = table
    tensors["lm_head.weight"] = table  # Same tensor: tied.
    return tensors


def jax_free(tree: Any) -> Any:
    """The tree with its leaves as numpy arrays (jax arrays are fetched to the host)."""
    if isinstance(tree, Mapping):
        return {k: jax_free(v) for k, v in tree.items()}
    return np.asarray(tree)


def to_hf_model(
    params: Mapping[str, Any],
    model_config: Mapping[str, Any],
    *,
    image_size: int,
    attn_implementation: str | None = None,
) -> transformers.PaliGemmaForConditionalGeneration:
    """Builds an HF `PaliGemmaForConditionalGeneration` holding `params`, in eval mode.

    Every HF weight must come from `params`: a missing, unexpected or mis-shaped one raises. The torch dtype
    follows the LLM embedding's dtype. `attn_implementation` is passed to HF (e.g. "eager"; None = HF's default).
    """
    import transformers

    config = to_hf_config(model_config, image_size=image_size)
    state = to_hf_state_dict(params)
    kw: dict[str, Any] = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # `from_pretrained` with an in-memory state dict builds the model on the meta device (no random init of a
    # 3B model) and creates the non-persistent buffers (RoPE frequencies, embed scale) itself.
    # HF's annotation of from_pretrained omits the (model, info) pair that output_loading_info=True returns.
    loaded: Any = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=state,
        output_loading_info=True,
        dtype=state["model.language_model.embed_tokens.weight"].dtype,
        **kw,
    )
    model, info = loaded
    problems = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ValueError(
            f"The converted parameters do not fit HF's PaliGemma built from the config: {problems} "
            f"{info.get('error_msgs') or ''}".rstrip()
        )
    return model.eval()


def export_hf(
    params: Mapping[str, Any], model_config: Mapping[str, Any], image_size: int, outdir: str | os.PathLike
) -> str:
    """Writes an HF `PaliGemmaForConditionalGeneration` folder (config + safetensors) to `outdir`.

    The streaming exporter of `paligemma-ft convert` on an in-memory tree (`hf_export.export`); no tokenizer or
    processor files are written (pass a tokenizer to `hf_export.export` for those). Returns `outdir`.
    """
    from paligemma_ft.checkpoints import fit, hf_export  # noqa: PLC0415

    source = fit.DictSource(jax_free(params["params"] if set(params) == {"params"} else params))
    hf_export.export(source, model_config, image_size, outdir)
    return os.fspath(outdir)
