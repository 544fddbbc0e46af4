"""Hugging Face transformers export: our (big_vision) parameter tree → `PaliGemmaForConditionalGeneration`.

Used two ways: as the HF export (`export_hf` writes a folder that `from_pretrained` loads), and in tests as a
second, independent implementation whose logits must match ours. torch and transformers are imported inside the
functions so `paligemma_ft` imports without the `hf` extra.

Conventions bridged here (big_vision ↔ HF):
  * Weights: flax kernels are [in, out], torch `Linear.weight` is [out, in]; the patchify conv is HWIO in flax,
    OIHW in torch; per-head einsum weights ([N, D, H], [N, H, D]) flatten heads × head_dim into one axis.
  * `kv_einsum[0]` is K and `[1]` is V; `gating_einsum[0]` is the GELU gate and `[1]` the linear "up" branch;
    a fused `qkv_einsum` (kv heads == heads) splits into q, k, v. RMSNorm scales copy unchanged: HF's Gemma
    RMSNorm also multiplies by (1 + weight).
  * Vocabulary: big_vision feeds image embeddings as soft tokens in front of the text; HF marks their places
    with an `<image>` placeholder id that must be a row of the embedding. The placeholder is our vocab size V and
    the HF table is padded with zero rows to the next multiple of 64 above V (257 152 → 257 216, the released HF
    PaliGemma layout). Those extra rows produce logit 0 and are never real tokens.
  * Soft-caps: HF applies `final_logit_softcapping` on every forward pass, big_vision's teacher-forced pass and
    first decoded token never do (reference 2.6). The presets use 0.0, which maps to None (identical logits).
  * Gemma 2 in HF alternates sliding-window and global layers; big_vision has no sliding window, so every layer
    is declared `full_attention`.

Axes: D width, N heads, K kv heads, H head dim, F mlp dim, V vocab, p patch size, C channels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

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
        projection_dim=llm["width"],
    )

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


# --- Parameters -----------------------------------------------------------------------------------------------


def _to_torch(x: Any) -> torch.Tensor:
    """A numpy/jax array → a contiguous torch tensor of the same dtype (bfloat16 goes through float32 exactly)."""
    import torch

    a = np.ascontiguousarray(np.asarray(x))
    if a.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16; the f32 round trip is exact.
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    if not a.flags.writeable:  # Still a read-only view of a jax buffer: torch must own memory it may write.
        a = a.copy()
    return torch.from_numpy(a)


def _unstack(stacked: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """Splits a scanned block (every leaf has a leading depth axis) into one subtree per layer."""
    leaves = {k: np.asarray(v) for k, v in _flatten(stacked).items()}
    depth = {np.shape(v)[0] for v in leaves.values()}
    if len(depth) != 1:
        raise ValueError(f"Scanned parameters under {where!r} disagree on the depth axis: {sorted(depth)}.")
    return [_unflatten({k: v[i] for k, v in leaves.items()}) for i in range(depth.pop())]


def _numbered(tree: Mapping[str, Any], prefix: str, where: str) -> list[Mapping[str, Any]]:
    """Unscanned layers `{prefix}0`, `{prefix}1`, ... of `tree`, in order."""
    out = []
    while f"{prefix}{len(out)}" in tree:
        out.append(tree[f"{prefix}{len(out)}"])
    if not out:
        raise ValueError(
            f"No layers under {where!r}: expected a scanned block or {prefix}0, {prefix}1, ...; "
            f"found keys {sorted(tree)}."
        )
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, v in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _linear(kernel: Any) -> np.ndarray:
    """flax Dense kernel [in, out] → torch Linear weight [out, in]."""
    return np.asarray(kernel).T


def _vision_state(img: Mapping[str, Any]) -> dict[str, np.ndarray]:
    pre = "model.vision_tower."  # HF 5.x in-memory names (save_pretrained writes its own layout).
    # Conv kernel HWIO [p, p, C, D] → OIHW [D, C, p, p]; patches stay row-major (y then x) on both sides.
    sd = {
        pre + "embeddings.patch_embedding.weight": np.asarray(img["embedding"]["kernel"]).transpose(3, 2, 0, 1),
        pre + "embeddings.patch_embedding.bias": np.asarray(img["embedding"]["bias"]),
        pre + "embeddings.position_embedding.weight": np.asarray(img["pos_embedding"])[0],
    }  # [1, P, D] → [P, D]
    enc = img["Transformer"]
    # scan=True: one stacked `encoderblock`; scan=False: `encoderblock_{i}`.
    blocks = (
        _unstack(enc["encoderblock"], "img/Transformer/encoderblock")
        if "encoderblock" in enc
        else _numbered(enc, "encoderblock_", "img/Transformer")
    )
    for i, blk in enumerate(blocks):
        lp = f"{pre}encoder.layers.{i}."
        for hf, ours in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
            sd[lp + hf + ".weight"] = np.asarray(blk[ours]["scale"])
            sd[lp + hf + ".bias"] = np.asarray(blk[ours]["bias"])
        mha = blk["MultiHeadDotProductAttention_0"]
        for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            k = np.asarray(mha[ours]["kernel"])  # [D, N, H] → [N·H, D]
            sd[f"{lp}self_attn.{hf}.weight"] = k.reshape(k.shape[0], -1).T
            sd[f"{lp}self_attn.{hf}.bias"] = np.asarray(mha[ours]["bias"]).reshape(-1)
        k = np.asarray(mha["out"]["kernel"])  # [N, H, D] → [D, N·H]
        sd[lp + "self_attn.out_proj.weight"] = k.reshape(-1, k.shape[-1]).T
        sd[lp + "self_attn.out_proj.bias"] = np.asarray(mha["out"]["bias"])
        for hf, ours in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            sd[f"{lp}mlp.{hf}.weight"] = _linear(blk["MlpBlock_0"][ours]["kernel"])
            sd[f"{lp}mlp.{hf}.bias"] = np.asarray(blk["MlpBlock_0"][ours]["bias"])
    sd[pre + "post_layernorm.weight"] = np.asarray(enc["encoder_norm"]["scale"])
    sd[pre + "post_layernorm.bias"] = np.asarray(enc["encoder_norm"]["bias"])
    # The ViT head is PaliGemma's linear projection into the LLM width.
    sd["model.multi_modal_projector.linear.weight"] = _linear(img["head"]["kernel"])
    sd["model.multi_modal_projector.linear.bias"] = np.asarray(img["head"]["bias"])
    return sd


def _heads_in(w: np.ndarray) -> np.ndarray:
    """Per-head input projection [N, D, H] → torch Linear weight [N·H, D] (head-major, as HF's `.view(N, H)`)."""
    return w.transpose(0, 2, 1).reshape(-1, w.shape[1])


def _text_state(llm: Mapping[str, Any]) -> dict[str, np.ndarray]:
    pre = "model.language_model."
    table = np.asarray(llm["embedder"]["input_embedding"])  # [V, D]
    vocab, width = table.shape
    # Zero rows for <image> (id V) and HF's padding to a multiple of 64; the placeholder's row is never read
    # (image features replace it) and the padding ids are never real tokens.
    padded = np.zeros((hf_vocab_size(vocab), width), table.dtype)
    padded[:vocab] = table
    sd = {
        pre + "embed_tokens.weight": padded,
        "lm_head.weight": padded,  # Tied output layer.
        pre + "norm.weight": np.asarray(llm["final_norm"]["scale"]),
    }
    # scan=True: `llm/layers/...` stacked on a leading depth axis; scan=False: `llm/layers/{i}/...`.
    layers = llm["layers"]
    blocks = _numbered(layers, "", "llm/layers") if "0" in layers else _unstack(layers, "llm/layers")
    for i, blk in enumerate(blocks):
        lp = f"{pre}layers.{i}."
        attn = blk["attn"]
        if "qkv_einsum" in attn:  # kv heads == heads: one fused [3, N, D, H] weight.
            q, k, v = np.asarray(attn["qkv_einsum"]["w"])
        else:
            q = np.asarray(attn["q_einsum"]["w"])  # [N, D, H]
            k, v = np.asarray(attn["kv_einsum"]["w"])  # [2, K, D, H]: index 0 is K, 1 is V.
        sd[lp + "self_attn.q_proj.weight"] = _heads_in(q)
        sd[lp + "self_attn.k_proj.weight"] = _heads_in(k)
        sd[lp + "self_attn.v_proj.weight"] = _heads_in(v)
        o = np.asarray(attn["attn_vec_einsum"]["w"])  # [N, H, D] → [D, N·H]
        sd[lp + "self_attn.o_proj.weight"] = o.reshape(-1, o.shape[-1]).T
        gating = np.asarray(blk["mlp"]["gating_einsum"])  # [2, D, F]: index 0 goes through GELU, 1 is linear.
        sd[lp + "mlp.gate_proj.weight"] = gating[0].T
        sd[lp + "mlp.up_proj.weight"] = gating[1].T
        sd[lp + "mlp.down_proj.weight"] = _linear(blk["mlp"]["linear"])
        sd[lp + "input_layernorm.weight"] = np.asarray(blk["pre_attention_norm"]["scale"])
        if "post_attention_norm" in blk:  # Gemma 2: four norms per block.
            sd[lp + "post_attention_layernorm.weight"] = np.asarray(blk["post_attention_norm"]["scale"])
            sd[lp + "pre_feedforward_layernorm.weight"] = np.asarray(blk["pre_ffw_norm"]["scale"])
            sd[lp + "post_feedforward_layernorm.weight"] = np.asarray(blk["post_ffw_norm"]["scale"])
        else:  # Gemma 1 calls its pre-MLP norm `post_attention_layernorm`.
            sd[lp + "post_attention_layernorm.weight"] = np.asarray(blk["pre_ffw_norm"]["scale"])
    return sd


def to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Converts our parameter tree (`{"img": ..., "llm": ...}`, scanned or not) to HF's state dict.

    The result loads with `PaliGemmaForConditionalGeneration(to_hf_config(...)).load_state_dict(sd, strict=True)`.
    Each tensor keeps its leaf's dtype (float32, float16 or bfloat16); `lm_head.weight` is the embedding table.

    Args:
      params: the nested parameter dict, optionally wrapped as `{"params": {...}}`.

    Returns:
      `{hf_name: torch.Tensor}` with torch layouts (Linear [out, in], conv OIHW).
    """
    if set(params) == {"params"}:
        params = params["params"]
    missing = [k for k in ("img", "llm") if k not in params]
    if missing:
        raise ValueError(
            f"to_hf_state_dict needs the full PaliGemma tree; top-level key(s) {missing} missing "
            f"(found {sorted(params)})."
        )
    sd = {**_vision_state(params["img"]), **_text_state(params["llm"])}
    tensors = {name: _to_torch(v) for name, v in sd.items()}
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"]  # Same tensor: tied.
    return tensors


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
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # `from_pretrained` with an in-memory state dict builds the model on the meta device (no random init of a
    # 3B model) and creates the non-persistent buffers (RoPE frequencies, embed scale) itself.
    model, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=state,
        output_loading_info=True,
        dtype=state["model.language_model.embed_tokens.weight"].dtype,
        **kw,
    )
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

    `PaliGemmaForConditionalGeneration.from_pretrained(outdir)` reloads it. The tokenizer/processor files are not
    written (ours is a SentencePiece model: copy it alongside if needed). Returns `outdir` as a string.
    """
    model = to_hf_model(params, model_config, image_size=image_size)
    outdir = os.fspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    model.save_pretrained(outdir)
    return outdir
