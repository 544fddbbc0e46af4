"""Cross-check against a second implementation: Hugging Face transformers' `PaliGemmaForConditionalGeneration`.

Our tiny random models (PaliGemma 1 multi-query and multi-head, PaliGemma 2 with GQA/post-norms/soft-cap, and the
27B query scaling) are converted with `paligemma_ft.checkpoints.hf` and must
give the same text logits to 1e-4 in float32.

How HF is made to compute big_vision's prefix-LM attention: `input_ids` = [<image>] * P + text, and
`token_type_ids` = 0 for the image and prefix tokens, 1 for the suffix. HF turns the 0s into one bidirectional
block laid over its causal mask, which is exactly `cumsum(mask_ar)` with mask_ar 0 on image + prefix and 1 on the
suffix. Positions are left to HF (it counts from 1, big_vision from 0; RoPE only sees differences, so the
logits agree to rounding, and this is the path users of the export get). Patterns that `token_type_ids` cannot
express (several bidirectional blocks) are checked separately with an explicit 4-D additive mask. HF runs with
its default attention implementation (sdpa for Gemma 1, eager for Gemma 2), as an exported model would.
"""

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from paligemma_ft.checkpoints import hf  # noqa: E402
from paligemma_ft.model import Model, get_preset, make_attn_mask  # noqa: E402
from paligemma_ft.utils import tree_flatten_with_names  # noqa: E402

PRESETS = ["tiny_pg1", "tiny_pg1_mha", "tiny_pg2", "tiny_pg2_27b"]
TOL = 1e-4
BATCH, TEXT_LEN, PREFIX_LEN = 2, 8, 3


def _random_params(model, res, vocab, seed):
    """Random values for every leaf of the model's parameter tree, at init-like scales.

    `model.init` would take ~7 s of XLA compilation per preset on 2 cores; the tree's shapes come from
    `jax.eval_shape` instead and every leaf is drawn here, so zero-initialized leaves (RMSNorm scales, the ViT
    head, biases) are all non-trivial: weights ~ N(0, 1/sqrt(tower width)), biases and RMSNorm scales ~ N(0, 0.1),
    LayerNorm scales ~ 1 + N(0, 0.1).
    """
    image, text, mask_ar = _inputs(res, vocab)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, text, mask_ar)["params"]
    rng = np.random.default_rng(seed)
    width = {
        "img": shapes["img"]["Transformer"]["encoder_norm"]["scale"].shape[-1],
        "llm": shapes["llm"]["final_norm"]["scale"].shape[-1],
    }
    leaves = []
    for name, leaf in tree_flatten_with_names(shapes):
        layer_axis = int("encoderblock/" in name or "llm/layers/" in name)  # Scanned leaves carry a depth axis.
        if leaf.ndim - layer_axis >= 2 or name.endswith("pos_embedding"):
            x = rng.normal(0, width[name[:3]] ** -0.5, leaf.shape)
        elif name.startswith("img/") and name.endswith("/scale"):  # LayerNorm: x * scale.
            x = 1 + rng.normal(0, 0.1, leaf.shape)
        else:  # Biases and RMSNorm scales (used as 1 + scale).
            x = rng.normal(0, 0.1, leaf.shape)
        leaves.append(jnp.asarray(x, leaf.dtype))
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def _inputs(res, vocab, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (BATCH, res, res, 3)).astype(np.float32)
    text = rng.integers(0, vocab, (BATCH, TEXT_LEN)).astype(np.int32)
    mask_ar = np.array([[0] * PREFIX_LEN + [1] * (TEXT_LEN - PREFIX_LEN)] * BATCH, np.int32)
    return image, text, mask_ar


class _Case:
    """One preset: config, random params, inputs, our logits and the converted HF model (built once)."""

    def __init__(self, name, seed):
        self.cfg, self.res = get_preset(name)
        self.vocab = self.cfg["llm"]["vocab_size"]
        self.model = Model(**self.cfg)
        self.image, self.text, self.mask_ar = _inputs(self.res, self.vocab, seed)
        self.params = _random_params(self.model, self.res, self.vocab, seed)
        self.apply = jax.jit(lambda p, i, t, m: self.model.apply({"params": p}, i, t, m)[0])
        self.logits = np.asarray(self.apply(self.params, self.image, self.text, self.mask_ar))
        self.n_img = (self.res // self.cfg["img"]["patch_size"][0]) ** 2
        self.hf_model = hf.to_hf_model(self.params, self.cfg, image_size=self.res)

    def hf_inputs(self, mask_ar=None):
        """input_ids with P <image> placeholders in front, NCHW pixels and prefix-LM token_type_ids."""
        mask_ar = self.mask_ar if mask_ar is None else mask_ar
        placeholder = np.full((BATCH, self.n_img), self.vocab)  # The <image> id is our vocab size.
        return dict(
            input_ids=torch.from_numpy(np.concatenate([placeholder, self.text], 1).astype(np.int64)),
            pixel_values=torch.from_numpy(self.image).permute(0, 3, 1, 2),
            # 0 = image + prefix (one bidirectional block), 1 = causal suffix.
            token_type_ids=torch.from_numpy(np.concatenate([np.zeros_like(placeholder), mask_ar], 1)),
        )

    def hf_logits(self, model=None, **inputs):
        """HF's logits on the text positions, cut to our vocabulary (HF's table has <image> + padding rows)."""
        model = model or self.hf_model
        with torch.no_grad():
            out = model(**(inputs or self.hf_inputs()))
        return out.logits[:, self.n_img :, : self.vocab].float().numpy()


_CASES = {}


def _case(name):
    """One `_Case` per preset for the whole module: building and compiling is the expensive part."""
    if name not in _CASES:
        _CASES[name] = _Case(name, seed=PRESETS.index(name))
    return _CASES[name]


@pytest.fixture(scope="module", params=PRESETS)
def case(request):
    return _case(request.param)


def test_logits_match_transformers(case):
    ours, theirs = case.logits, case.hf_logits()
    assert theirs.shape == ours.shape == (BATCH, TEXT_LEN, case.vocab)
    assert np.abs(ours).max() > 1.0  # Non-trivial logits, so the tolerance is meaningful.
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)


def test_hf_config_matches_preset(case):
    cfg = hf.to_hf_config(case.cfg, image_size=case.res)
    llm, text = case.cfg["llm"], cfg.text_config
    assert cfg.image_token_index == case.vocab and text.vocab_size == hf.hf_vocab_size(case.vocab)
    assert text.vocab_size % 64 == 0 and text.vocab_size > case.vocab
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (
        llm["num_heads"],
        llm["num_kv_heads"],
        llm["head_dim"],
    )
    assert cfg.text_config.num_image_tokens == case.n_img
    if llm["post_norms"]:
        assert text.model_type == "gemma2" and set(text.layer_types) == {"full_attention"}
        assert text.attn_logit_softcapping == llm["attn_logits_softcap"] and text.final_logit_softcapping is None
        expected = (
            llm["width"] // llm["num_heads"] if llm["query_pre_attn_norm"] == "rsqrt_emb_per_head" else llm["head_dim"]
        )
        assert text.query_pre_attn_scalar == expected
    else:
        assert text.model_type == "gemma"


def test_export_reloads_with_same_logits(tmp_path):
    c = _case("tiny_pg2")
    out = hf.export_hf(c.params, c.cfg, c.res, tmp_path / "export")
    reloaded = transformers.PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    assert reloaded.config.image_token_index == c.vocab
    logits = c.hf_logits(reloaded)
    np.testing.assert_allclose(logits, c.logits, atol=TOL, rtol=0)
    np.testing.assert_array_equal(logits, c.hf_logits())  # Bit-identical to the in-memory conversion.


def test_block_causal_mask_via_4d_mask():
    """A mask_ar that token_type_ids cannot express (two bidirectional blocks), given to HF as a 4-D mask."""
    c = _case("tiny_pg1")
    mask_ar = np.array([[1, 0, 0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0, 1]], np.int32)
    ours = np.asarray(c.apply(c.params, c.image, c.text, mask_ar))
    full_ar = np.concatenate([np.zeros((BATCH, c.n_img), np.int32), mask_ar], 1)
    allowed = np.asarray(make_attn_mask(jnp.ones(full_ar.shape, bool), jnp.asarray(full_ar)))
    additive = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]  # [B, 1, T, T]
    inputs = c.hf_inputs()
    del inputs["token_type_ids"]
    theirs = c.hf_logits(attention_mask=torch.from_numpy(additive), **inputs)
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)
    assert np.abs(ours - c.logits).max() > 1e-2  # The mask really differs from the prefix-LM one.


def test_final_softcap_is_applied_by_hf_on_every_pass():
    """With a non-zero final soft-cap, HF caps every forward; big_vision's teacher-forced pass never does."""
    c = _case("tiny_pg2")
    cfg = {**c.cfg, "llm": {**c.cfg["llm"], "final_logits_softcap": 3.0}}
    assert hf.to_hf_config(cfg, image_size=c.res).text_config.final_logit_softcapping == 3.0
    capped = hf.to_hf_model(c.params, cfg, image_size=c.res)
    ours = np.asarray(jax.jit(lambda p: Model(**cfg).apply({"params": p}, c.image, c.text, c.mask_ar)[0])(c.params))
    np.testing.assert_allclose(ours, c.logits, atol=1e-6)  # Our teacher-forced logits ignore the cap.
    np.testing.assert_allclose(c.hf_logits(capped), 3.0 * np.tanh(ours / 3.0), atol=TOL, rtol=0)


def test_strong_attention_softcap_matches():
    """A cap of 2 is active on most attention logits (50 only bends the largest), so the cap itself is compared."""
    c = _case("tiny_pg2")
    cfg = {**c.cfg, "llm": {**c.cfg["llm"], "attn_logits_softcap": 2.0}}
    ours = np.asarray(jax.jit(lambda p: Model(**cfg).apply({"params": p}, c.image, c.text, c.mask_ar)[0])(c.params))
    theirs = c.hf_logits(hf.to_hf_model(c.params, cfg, image_size=c.res))
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)
    assert np.abs(ours - c.logits).max() > 1e-2  # The cap changed the model's output.


@pytest.mark.parametrize("preset, scalar", [("pg1_3b_224", None), ("pg2_3b_448", 256), ("pg2_28b_896", 144)])
def test_released_sizes_config(preset, scalar):
    """Full-size configs (no weights): HF's released layout of vocab 257 216 with <image> = 257 152."""
    cfg, res = get_preset(preset)
    hf_cfg = hf.to_hf_config(cfg, image_size=res)
    assert (hf_cfg.image_token_index, hf_cfg.text_config.vocab_size) == (257_152, 257_216)
    assert hf_cfg.text_config.num_image_tokens == (res // 14) ** 2
    assert hf_cfg.vision_config.hidden_size == 1152 and hf_cfg.vision_config.num_hidden_layers == 27
    assert getattr(hf_cfg.text_config, "query_pre_attn_scalar", None) == scalar
    if scalar is not None:  # PaliGemma 2: no sliding window, no final soft-cap (the presets' 0.0).
        assert set(hf_cfg.text_config.layer_types) == {"full_attention"}
        assert hf_cfg.text_config.final_logit_softcapping is None
        assert hf_cfg.text_config.attn_logit_softcapping == 50.0


@pytest.mark.parametrize("mutation", ["swap_kv", "swap_gate_up", "transpose_patch"])
def test_crosscheck_detects_layout_errors(mutation):
    """The comparison is sensitive: a plausible conversion mistake breaks it by far more than the tolerance."""
    c = _case("tiny_pg2")
    state = {k: v.clone() for k, v in hf.to_hf_state_dict(c.params).items()}
    layer = "model.language_model.layers.0."
    if mutation == "swap_kv":
        k, v = layer + "self_attn.k_proj.weight", layer + "self_attn.v_proj.weight"
        state[k], state[v] = state[v], state[k]
    elif mutation == "swap_gate_up":
        g, u = layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"
        state[g], state[u] = state[u], state[g]
    else:  # HWIO → OIHW with the spatial axes swapped (patches read column-major).
        name = "model.vision_tower.embeddings.patch_embedding.weight"
        state[name] = state[name].transpose(2, 3).contiguous()
    broken = hf.to_hf_model(c.params, c.cfg, image_size=c.res)
    broken.load_state_dict(state, strict=True)
    assert np.abs(c.hf_logits(broken) - c.logits).max() > 100 * TOL


def _unscan(tree, depth_img, depth_llm):
    """Our scanned tree → the scan=False layout (`encoderblock_{i}`, `layers/{i}`)."""
    img, llm = dict(tree["img"]), dict(tree["llm"])
    enc = dict(img["Transformer"])
    stacked = enc.pop("encoderblock")
    enc.update({f"encoderblock_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(depth_img)})
    img["Transformer"] = enc
    llm["layers"] = {str(i): jax.tree.map(lambda x: x[i], llm["layers"]) for i in range(depth_llm)}
    return {"img": img, "llm": llm}


def test_unscanned_tree_converts_identically():
    c = _case("tiny_pg1_mha")
    unscanned = _unscan(c.params, c.cfg["img"]["depth"], c.cfg["llm"]["depth"])
    cfg = {"img": {**c.cfg["img"], "scan": False}, "llm": {**c.cfg["llm"], "scan": False}}
    shapes = jax.eval_shape(Model(**cfg).init, jax.random.PRNGKey(0), c.image, c.text, c.mask_ar)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(unscanned)  # The layout really is scan=False's.
    a, b = hf.to_hf_state_dict(c.params), hf.to_hf_state_dict({"params": unscanned})
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bfloat16_leaves_convert_exactly():
    c = _case("tiny_pg1")
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), c.params)  # As a .bf16.npz loads.
    a, b = hf.to_hf_state_dict(bf16), hf.to_hf_state_dict(jax.tree.map(lambda x: x.astype(np.float32), bf16))
    for name in a:
        assert a[name].dtype == torch.bfloat16 and torch.equal(a[name].float(), b[name]), name
    assert a["lm_head.weight"] is a["model.language_model.embed_tokens.weight"]


@pytest.mark.parametrize(
    "llm_override, key",
    [
        (dict(attn_logits_softcap=50.0), "attn_logits_softcap"),
        (dict(query_pre_attn_norm="rsqrt_emb_per_head"), "query_pre_attn_norm"),
    ],
)
def test_unexpressible_gemma1_settings_fail_naming_the_key(llm_override, key):
    cfg, res = get_preset("tiny_pg1")
    cfg["llm"].update(llm_override)
    with pytest.raises(ValueError, match=key):
        hf.to_hf_config(cfg, image_size=res)


def test_non_learned_posemb_fails():
    cfg, res = get_preset("tiny_pg1")
    cfg["img"]["posemb"] = "sincos2d"
    with pytest.raises(ValueError, match="posemb"):
        hf.to_hf_config(cfg, image_size=res)
