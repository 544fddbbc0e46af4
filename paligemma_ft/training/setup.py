"""Everything a run decides before it computes: model, tokenizer, mesh, shapes, shardings, dtypes, optimizer and
trainable mask (`setup`), and a fresh training state born sharded (`init_state`).

With `config.lora` (rank >= 1) the model carries LoRA adapters, and a quantized base when `lora.quant` is set:
only the adapters train and hold optimizer state (`adapters.training_config`), the checkpoint provides the base
(quantized weight by weight as it is read, `adapters.quantize_on_load`) and the adapters are initialised by the
model's own init, like any parameter a checkpoint lacks.

`setup` only builds shapes (`jax.eval_shape`), so configuration errors (a mesh that does not divide the devices,
a tokenizer larger than the vocabulary, a resolution that is not a multiple of the patch size, an unknown
optimizer) stop the run before any parameter is allocated. `paligemma-ft plan` calls it with `shapes_only=True`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from paligemma_ft import adapters as adapters_lib
from paligemma_ft import config_base
from paligemma_ft import sharding as sharding_lib
from paligemma_ft import tokenizer as tokenizer_lib
from paligemma_ft.checkpoints import loading
from paligemma_ft.checkpoints.loading import make_model
from paligemma_ft.model import Model
from paligemma_ft.training import optim
from paligemma_ft.utils import tree_flatten_with_names

PyTree = Any


@dataclasses.dataclass
class Setup:
    """The static parts of a run (see the module docstring).

    Attributes:
      model, tok: the Flax model and tokenizer (`tok` is None for a shapes-only setup).
      mesh: the device mesh; `batch_shard`: how every batch array is split over it.
      res, text_len: image side and big_vision's text length (sequences are `text_len + 1` long).
      shapes: the parameters' ShapeDtypeStructs in their storage dtypes; `dtypes`: those dtypes.
      state_shard, state_abstract: shardings and ShapeDtypeStructs of the train state
        (`{"params", "opt", "step", "rng"}`).
      trainable: a tree of bools like the parameters; `tx`, `sched_fns`: the optimizer and its schedules.
      path: the `model_init` checkpoint (None: random init, or shapes only).
      dont_load: regexes of parameters initialised instead of loaded (`config.dont_load`).
    """

    model: Model
    tok: tokenizer_lib.Tokenizer | None
    mesh: jax.sharding.Mesh
    batch_shard: jax.sharding.NamedSharding
    res: int
    text_len: int
    shapes: PyTree
    state_shard: dict
    state_abstract: dict
    trainable: PyTree
    tx: optax.GradientTransformation
    sched_fns: list
    path: loading.Checkpoint | None
    dtypes: PyTree
    dont_load: tuple[str, ...] = ()

    @property
    def sched_fn(self) -> Any:
        """The schedule of the first trainable group (what `train/lr` reports), or None."""
        return self.sched_fns[0] if self.sched_fns else None


def setup(config: Any, *, shapes_only: bool = False) -> Setup:
    """Everything decided before compute (errors early; see the module docstring).

    `shapes_only` (for `plan`): with a preset, no checkpoint is resolved or read and no tokenizer is loaded, so
    nothing is downloaded and no data, credentials or files are needed; `tok` and `path` are None.
    """
    config = config_base.complete(config)
    config_base.validate(config)
    model, _, path = make_model(config, shapes_only=shapes_only)
    res = int(config.input.res)
    text_len = int(config.input.text_len)
    devices = jax.devices()
    if n := config.num_devices:  # Use only the first n devices (tests; sharing a host).
        devices = devices[: int(n)]
    mesh = sharding_lib.make_mesh([tuple(a) for a in config.mesh], devices)
    strategy = [tuple(r) for r in config.sharding_strategy]
    sharding_lib.check_batch_divisible(int(config.input.batch_size), mesh)
    shapes = loading.init_shapes(model, res, text_len + 1)
    tok = None
    if not shapes_only:  # The configured tokenizer, else the one found with the checkpoint (checked vs the vocab).
        source = path.path if path else (config.model_name_or_preset or "the config")
        tok = loading.load_tokenizer(config.tokenizer, path, loading.vocab_size(shapes), source=source)
    p_shard = sharding_lib.infer_sharding(shapes, strategy, mesh)
    opt_config = adapters_lib.training_config(config, model.lora)  # LoRA: only the adapters train.
    dtypes = optim.param_dtypes(shapes, opt_config)
    tx, sched_fns = optim.make_optimizer(
        opt_config, shapes, total_steps=int(config.total_steps), batch_size=int(config.input.batch_size)
    )
    trainable = optim.trainable_mask(shapes, opt_config.schedule)
    shapes = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, d), shapes, dtypes)
    opt_shapes = jax.eval_shape(tx.init, shapes)
    o_shard = sharding_lib.opt_state_sharding(opt_shapes, shapes, strategy, mesh)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shard = {"params": p_shard, "opt": o_shard, "step": repl, "rng": repl}
    state_abstract = {
        "params": shapes,
        "opt": opt_shapes,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    return Setup(
        model=model,
        tok=tok,
        mesh=mesh,
        batch_shard=sharding_lib.batch_sharding(mesh),
        res=res,
        text_len=text_len,
        shapes=shapes,
        state_shard=state_shard,
        state_abstract=state_abstract,
        trainable=trainable,
        tx=tx,
        sched_fns=sched_fns,
        path=path,
        dtypes=dtypes,
        dont_load=tuple(config.dont_load),
    )


def init_params(s: Setup, seed: int) -> PyTree:
    """Parameters born sharded: what `s.path` holds loaded leaf by leaf, what it lacks (or `s.dont_load` names)
    from the model's random init jitted to the shardings (`loading.load_params`). LoRA adapters are among the
    latter; a QLoRA base is quantized on the host as each weight is read."""

    def init():
        z = jnp.zeros((1, s.text_len + 1), jnp.int32)
        return s.model.init(jax.random.PRNGKey(seed), jnp.zeros((1, s.res, s.res, 3)), z, z)["params"]

    derived = None
    if s.model.lora is not None:
        derived = adapters_lib.quantize_on_load(dict(tree_flatten_with_names(s.shapes)), s.model.lora)
    return loading.load_params(
        s.path, s.shapes, s.state_shard["params"], init_fn=init, dont_load=s.dont_load, derived=derived
    )


def init_state(s: Setup, seed: int) -> dict:
    """A fresh training state on the devices: step 0, the optimizer's initial state, `PRNGKey(seed)`."""
    params = init_params(s, seed)
    repl = s.state_shard["step"]
    return {
        "params": params,
        "opt": jax.jit(s.tx.init, out_shardings=s.state_shard["opt"])(params),
        "step": jax.device_put(jnp.int32(0), repl),
        "rng": jax.device_put(jax.random.PRNGKey(seed), repl),
    }
