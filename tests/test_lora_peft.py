"""The PEFT export: `peft.PeftModel.from_pretrained` on the Hugging Face export of the base (`paligemma-ft convert`,
`checkpoints/hf_export.py`) gives our LoRA model's logits."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from test_hf_crosscheck import BATCH, TOL, _inputs, _random_params  # noqa: E402

from paligemma_ft.checkpoints import fit, hf_export  # noqa: E402
from paligemma_ft.checkpoints import peft as peft_export  # noqa: E402
from paligemma_ft.model import Model, get_preset, lora  # noqa: E402
from paligemma_ft.utils import recover_tree, tree_flatten_with_names  # noqa: E402

TARGETS = lora.parse_targets(["llm/layers/.*", "img/Transformer/.*", "img/head/kernel"])


@pytest.mark.parametrize("preset,scan", [("tiny_pg1", True), ("tiny_pg2", True), ("tiny_pg1_mha", False)])
def test_peft_adapter_on_hf_export_matches_our_logits(tmp_path, preset, scan):
    cfg, res = get_preset(preset)
    cfg = {t: {**cfg[t], "scan": scan} for t in cfg}
    vocab = cfg["llm"]["vocab_size"]
    spec = lora.LoraSpec(rank=3, alpha=5.0, targets=TARGETS)
    base_model, model = Model(**cfg), Model(**cfg, lora=spec)
    base = dict(tree_flatten_with_names(_random_params(base_model, res, vocab, seed=1)))
    image, text, mask_ar = _inputs(res, vocab)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, text, mask_ar)["params"]
    rng = np.random.default_rng(2)
    adapters = {
        k: rng.normal(0, 0.1, s.shape).astype(np.float32)  # Non-zero A and B: a trained adapter.
        for k, s in tree_flatten_with_names(shapes)
        if lora.is_adapter(k)
    }
    both = {**base, **adapters}
    ours = np.asarray(model.apply({"params": recover_tree(list(both), list(both.values()))}, image, text, mask_ar)[0])
    plain = np.asarray(
        base_model.apply({"params": recover_tree(list(base), list(base.values()))}, image, text, mask_ar)[0]
    )
    assert np.abs(ours - plain).max() > 0.1  # The adapters matter.

    out = peft_export.export_peft(adapters, {k: np.shape(v) for k, v in base.items()}, spec, tmp_path / "peft")
    hf_export.export(fit.DictSource({k: np.asarray(v) for k, v in base.items()}), cfg, res, tmp_path / "hf")
    hf_base = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    model_hf = peft.PeftModel.from_pretrained(hf_base, out).eval()
    n_img = (res // cfg["img"]["patch_size"][0]) ** 2
    placeholder = np.full((BATCH, n_img), vocab)
    inputs = dict(
        input_ids=torch.from_numpy(np.concatenate([placeholder, text], 1).astype(np.int64)),
        pixel_values=torch.from_numpy(image).permute(0, 3, 1, 2),
        token_type_ids=torch.from_numpy(np.concatenate([np.zeros_like(placeholder), mask_ar], 1)),
    )
    with torch.no_grad():
        theirs = model_hf(**inputs).logits[:, n_img:, :vocab].float().numpy()
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)
    # Every adapter arrived: PEFT's modules carry exactly our A/B entries.
    loaded = sum(p.numel() for n, p in model_hf.named_parameters() if "lora_" in n)
    assert loaded == sum(a.size for a in adapters.values())
