"""Training throughput: examples/s, tokens/s, MFU, compile time and memory; optionally vs Hugging Face + PyTorch.

    python bench/bench_train.py                                          # CPU: tiny_pg1, float32
    python bench/bench_train.py --preset pg2_3b_224 --batch 32 --hf      # one GPU: bfloat16 compute
    python bench/bench_train.py --remat full none dots --attn einsum cudnn --loss chunked full   # before/after
    python bench/bench_train.py --preset pg2_3b_224 --recipes full lora qlora --hf   # LoRA r16 vs HF + PEFT (+ bnb)

Rows: every combination of recipe (`full` fine-tune, `attn`: the colab's `llm/layers/attn/.*` only, `lora`:
rank-16 adapters on every LLM layer weight over a frozen base in the run's dtype, `qlora`: the same over an NF4
base), remat policy, attention implementation and loss (`chunked`: vocabulary logits only for text positions,
chunk by chunk, as the trainer; `full`: all [B, L, V] logits at once, the "before"). Random weights and numpy
batches (no grain, no orbax): the script imports only `paligemma_ft.model / training.step / optim / losses /
flops / hf`, so it runs on a bare JAX + PyTorch image with `PYTHONPATH=.`. Appends a table to bench/RESULTS.md
with the device named.

The step is the trainer's own (`paligemma_ft.training.step.jit_train_step`: the trainer's loss, the optax update
from `optim.make_optimizer`, storage dtypes kept, buffers donated); the `full` rows pass its `loss` hook another
formulation. `--dtype` is the compute dtype (`config.compute_dtype`; default
bfloat16 on GPU/TPU, float32 on CPU) as the trainer applies it: trainable parameters stored float32 (master
copies), frozen ones in the compute dtype (`frozen_dtype`). MFU counts useful FLOPs (`paligemma_ft.flops`:
logits at loss positions only, no recomputation, frozen towers forward only). A configuration that runs out of
device memory gets an OOM row instead of stopping the run.

The HF comparison builds the same weights in `transformers`' PaliGemma with its default attention for Gemma 2
(eager: HF has no SDPA for Gemma 2's soft-capped attention) and SDPA for Gemma 1, trains in the torch dtype of
`--dtype` with AdamW (fused on CUDA) and reports torch's peak allocation.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import platform
import sys
import time

# Allocate GPU memory on demand rather than 75 % up front: PyTorch (--hf) needs its share, and the device's
# peak-memory figure then means what the step used.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from paligemma_ft import flops  # noqa: E402
from paligemma_ft.model import Model, get_preset, precision  # noqa: E402
from paligemma_ft.model import lora as lora_lib  # noqa: E402
from paligemma_ft.training import optim  # noqa: E402
from paligemma_ft.training import step as step_lib  # noqa: E402

RECIPES = {"full": ".*", "attn": "llm/layers/attn/.*", "lora": ".*_lora_[ab]", "qlora": ".*_lora_[ab]"}  # Trainable.
LORA_RANK, LORA_TARGETS = 16, ("llm/layers/.*",)  # The LoRA recipes: PEFT's r=16 on every LLM linear layer.


def lora_spec(recipe: str) -> lora_lib.LoraSpec | None:
    if recipe not in ("lora", "qlora"):
        return None
    quant = "nf4" if recipe == "qlora" else "none"
    targets = lora_lib.parse_targets(LORA_TARGETS)
    return lora_lib.LoraSpec(rank=LORA_RANK, alpha=2.0 * LORA_RANK, targets=targets, quant=quant)


RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")


def device_name() -> str:
    """The accelerator, its count, the host, and the host's load (other processes skew CPU timings)."""
    d = jax.devices()[0]
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()} ({platform.node()}, "
        f"{os.cpu_count()} CPUs{load})"
    )


# --- The "before" loss ------------------------------------------------------------------------------------------


def full_loss(params, batch, rng, *, model):
    """The "before": all text logits [B, L, V] in float32 at once, then the same cross-entropy."""
    text = batch["text"]
    logits, _ = model.apply(
        {"params": params}, batch["image"], text[:, :-1], batch["mask_ar"][:, :-1], train=True, rngs={"dropout": rng}
    )
    mask = batch["mask_loss"][:, 1:] * batch["_mask"][:, None].astype(jnp.int32)
    return optim.softmax_xent(logits.astype(jnp.float32), text[:, 1:], mask)


def model_config(preset: str, dtype: str, remat: str | None, attn: str, scan: bool = True) -> tuple[dict, int]:
    """The preset computing in `dtype` (as `config.compute_dtype`), with the given remat policy and attention."""
    cfg, res = get_preset(preset)
    cfg["img"]["scan"] = cfg["llm"]["scan"] = scan
    cfg["llm"]["attn_impl"] = attn
    if remat:
        cfg["img"]["remat_policy"] = cfg["llm"]["remat_policy"] = remat
    return precision.apply_compute_dtype(cfg, dtype), res


def make_batch(b: int, res: int, text_len: int, loss_tokens: int, vocab: int, seed: int = 0) -> dict:
    """A numpy batch in the trainer's layout: text [B, L + 1], prefix of L + 1 - loss_tokens tokens, then loss."""
    rng = np.random.default_rng(seed)
    suffix = np.array([0] * (text_len + 1 - loss_tokens) + [1] * loss_tokens, np.int32)
    return dict(
        image=rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32),
        text=rng.integers(3, vocab, (b, text_len + 1)).astype(np.int32),
        mask_ar=np.tile(suffix, (b, 1)),
        mask_loss=np.tile(suffix, (b, 1)),
        _mask=np.ones((b,), bool),
    )


def build(preset, dtype, remat, attn, recipe, loss_name, batch_size, text_len, loss_tokens, scan=True):
    """(jitted step, abstract state, init fn, batch, model config, res)."""
    cfg, res = model_config(preset, dtype, remat, attn, scan)
    model = Model(**cfg, lora=lora_spec(recipe))
    z = jnp.zeros((1, text_len), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]
    schedule = [(RECIPES[recipe], {"decay_type": "constant"}), (".*", None)]
    trainable = optim.trainable_mask(shapes, schedule)
    # The trainer's storage: float32 masters for trainable parameters (LoRA adapters), frozen ones in the compute
    # dtype, quantized codes as they are.
    dtypes = jax.tree.map(
        lambda t, s: jnp.dtype(jnp.float32 if t else dtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype),
        trainable,
        shapes,
    )
    shapes = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, d), shapes, dtypes)
    config = dict(optax_name="scale_by_adam", lr=1e-4, wd=0.0, grad_clip_norm=1.0, schedule=schedule)
    tx, _ = optim.make_optimizer(config, shapes, total_steps=1000)
    loss = {"chunked": None, "full": functools.partial(full_loss, model=model)}[loss_name]  # None: the trainer's.
    step = step_lib.jit_train_step(model, tx, trainable, loss=loss)

    @jax.jit
    def init():
        p = model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]
        p = jax.tree.map(lambda x, d: x.astype(d), p, dtypes)
        return {"params": p, "opt": tx.init(p), "step": jnp.int32(0), "rng": jax.random.PRNGKey(0)}

    vocab = shapes["llm"]["embedder"]["input_embedding"].shape[0]
    batch = make_batch(batch_size, res, text_len, loss_tokens, min(vocab, 1600))
    return step, jax.eval_shape(init), init, batch, cfg, res


def is_oom(e: BaseException) -> bool:
    """Whether an exception is the device running out of memory (XLA's or PyTorch's)."""
    text = f"{type(e).__name__}: {e}"
    return any(k in text for k in ("RESOURCE_EXHAUSTED", "Out of memory", "OutOfMemoryError", "out of memory"))


def bench_jax(args, recipe, remat, attn, loss_name) -> dict:
    try:
        return _bench_jax(args, recipe, remat, attn, loss_name)
    except Exception as e:  # noqa: BLE001 - an OOM is a result (this setting does not fit); anything else raises.
        if not is_oom(e):
            raise
        cfg, res = model_config(args.preset, args.dtype, remat, attn)
        return dict(oom=True, cfg=cfg, res=res)


def _bench_jax(args, recipe, remat, attn, loss_name) -> dict:
    step, abstract, init, batch, cfg, res = build(
        args.preset, args.dtype, remat, attn, recipe, loss_name, args.batch, args.text_len, args.loss_tokens
    )
    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    compiled = step.lower(abstract, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = (
        (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
        if mem is not None
        else None
    )
    state = init()
    state, metrics = compiled(state, batch)  # Warm-up.
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    dt = (time.perf_counter() - t0) / args.steps
    stats = jax.devices()[0].memory_stats() or {}
    ex_s = args.batch / dt
    useful = flops.train_flops_per_example(
        cfg, res, args.text_len, args.loss_tokens, RECIPES[recipe], lora=lora_spec(recipe)
    )
    n_tokens = flops.image_tokens(cfg, res) + args.text_len
    return dict(
        examples_per_s=ex_s,
        tokens_per_s=ex_s * n_tokens,
        mfu=flops.mfu(useful, ex_s),
        compile_s=compile_s,
        xla_gib=xla_bytes / 2**30 if xla_bytes is not None else None,
        peak_gib=stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
        loss=float(metrics["train/loss"]),
        flops=useful,
        cfg=cfg,
        res=res,
    )


def hf_attention(cfg: dict) -> str | None:
    """transformers' attention for the model: its default (eager) for Gemma 2, which HF refuses to run with SDPA,
    and SDPA for Gemma 1."""
    from paligemma_ft.model.presets import resolve_llm_config

    return None if resolve_llm_config(cfg["llm"]).get("post_norms") else "sdpa"


def bench_hf(args, recipe, cfg, res) -> dict:
    """The same model, batch, sequence and trainable set through transformers + torch AdamW; the LoRA recipes
    through PEFT (r=16, alpha 32, every LLM linear layer), `qlora` over a bitsandbytes NF4 base."""
    try:
        return _bench_hf(args, recipe, cfg, res)
    except Exception as e:  # noqa: BLE001 - as bench_jax: an OOM is a result.
        if not is_oom(e):
            raise
        import torch

        torch.cuda.empty_cache()
        return dict(oom=True)


def _bench_hf(args, recipe, cfg, res) -> dict:
    import torch

    from paligemma_ft.checkpoints import hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    base_recipe = "attn" if recipe in ("lora", "qlora") else recipe  # A plain base: PEFT adds the adapters.
    _, _, init, batch, _, _ = build(
        args.preset, "float32", None, "einsum", base_recipe, "chunked", args.batch, args.text_len, args.loss_tokens
    )
    host = jax.device_get(jax.jit(lambda: init()["params"])())
    model = hf.to_hf_model(host, cfg, image_size=res, attn_implementation=hf_attention(cfg))
    del host
    if recipe == "qlora":  # Reload through bitsandbytes' 4-bit NF4 Linear layers (needs a CUDA GPU).
        import tempfile

        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            quant = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=tdtype
            )
            model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
                tmp,
                quantization_config=quant,
                dtype=tdtype,
                device_map={"": device},
                attn_implementation=hf_attention(cfg),
            )
    else:
        model = model.to(device, tdtype)
    if recipe in ("lora", "qlora"):
        import peft

        targets = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=targets, lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
    model.train()
    pattern = {"full": None, "attn": "language_model.layers.", "lora": "lora_", "qlora": "lora_"}[recipe]
    params = []
    for name, p in model.named_parameters():
        wanted = pattern is None or (pattern in name and (".self_attn." in name or "lora_" in pattern))
        p.requires_grad_(wanted)
        if wanted:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **({"fused": True} if device == "cuda" else {}))
    n_img = flops.image_tokens(cfg, res)
    image_id = hf.to_hf_config(cfg, image_size=res).image_token_index  # The <image> placeholder id.
    text = torch.from_numpy(batch["text"][:, :-1].astype(np.int64))
    ids = torch.cat([torch.full((args.batch, n_img), image_id), text], 1).to(device)
    ttype = torch.cat(
        [
            torch.zeros((args.batch, n_img), dtype=torch.int64),
            torch.from_numpy(batch["mask_ar"][:, :-1].astype(np.int64)),
        ],
        1,
    ).to(device)
    # HF shifts labels itself: label at position i is the token at i (predicted from i - 1).
    labels = torch.where(ttype.bool(), ids, torch.full_like(ids, -100))
    pix = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).to(device, tdtype)
    kw = dict(input_ids=ids, pixel_values=pix, token_type_ids=ttype, attention_mask=torch.ones_like(ids), labels=labels)

    def one():
        out = model(**kw)  # noqa: F821 - bench_hf deletes it after the timing loop.
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()  # noqa: F821
        opt.zero_grad(set_to_none=True)  # noqa: F821
        return out.loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    one()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = one()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del model, opt
    return dict(examples_per_s=args.batch / dt, peak_gib=peak, loss=float(loss.detach()))


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny_pg1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=32, help="L: text tokens the model reads")
    ap.add_argument("--loss-tokens", type=int, default=None, help="suffix positions with loss (default L - 4)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on GPU/TPU, float32 on CPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument(
        "--remat",
        nargs="+",
        default=[None],
        help="none / dots / dots_with_no_batch_dims_saveable / full (default: the preset's, full)",
    )
    ap.add_argument("--attn", nargs="+", default=["einsum"], help="einsum / xla / cudnn / auto / pallas")
    ap.add_argument("--loss", nargs="+", default=["chunked"], help="chunked / full")
    ap.add_argument("--hf", action="store_true", help="also time transformers + PyTorch on the same setup")
    ap.add_argument("--results", default=RESULTS, help="Markdown file to append to ('' for none)")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if jax.devices()[0].platform == "cpu" else "bfloat16")
    args.loss_tokens = args.loss_tokens or max(1, args.text_len - 4)
    head = (
        "| recipe | remat | attn | loss | examples/s | tokens/s | MFU | compile s | XLA GiB | peak GiB | "
        "GFLOP/example |" + (" HF examples/s | HF peak GiB | ratio |" if args.hf else "")
    )
    rows = []
    print(head, flush=True)
    for recipe, remat, attn, loss in itertools.product(args.recipes, args.remat, args.attn, args.loss):
        r = bench_jax(args, recipe, remat, attn, loss)
        row = f"| {recipe} | {remat or 'preset'} | {attn} | {loss} | "
        if r.get("oom"):
            row += "OOM | | | | | | |"
        else:
            row += (
                f"{r['examples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {_fmt(r['mfu'], '.1%')} | "
                f"{r['compile_s']:.1f} | {_fmt(r['xla_gib'], '.3f')} | {_fmt(r['peak_gib'], '.2f')} | "
                f"{r['flops'] / 1e9:.4g} |"
            )
        if args.hf:
            h = bench_hf(args, recipe, r["cfg"], r["res"])
            if h.get("oom"):
                row += " OOM | | |"
            else:
                ratio = "" if r.get("oom") else f"{r['examples_per_s'] / h['examples_per_s']:.2f}x"
                row += f" {h['examples_per_s']:.2f} | {_fmt(h['peak_gib'], '.2f')} | {ratio} |"
        print(row, flush=True)
        rows.append(row)
    sep = "|" + "---|" * head.count(" |")
    text = (
        f"\n## Training throughput ({datetime.date.today()}, `python bench/bench_train.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`)\n\nDevice: {device_name()}; {args.preset}, batch "
        f"{args.batch}, text {args.text_len} tokens ({args.loss_tokens} with loss), {args.dtype} compute "
        f"(trainable parameters float32, frozen {args.dtype}), Adam, random weights, {args.steps} timed steps "
        "after one warm-up. MFU: useful FLOPs "
        "(`paligemma_ft.flops`) over the chip's dense bf16 peak (n/a on CPU). XLA GiB: arguments + outputs - "
        "donated + temporaries of the compiled step; peak GiB: the device allocator's peak so far (not on CPU)."
        f"\n\n{head}\n{sep}\n" + "\n".join(rows) + "\n"
    )
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
