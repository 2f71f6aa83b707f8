"""Run the per-shard model as real TP (`jax.shard_map` over a `tp` mesh) or emulated TP (one device).

Parameters are a plain nested dict (`nnx.to_pure_dict` of the model state), merged back into the NNX
module inside the traced function (`nnx.merge`), so no Python object sits on the per-token path.

* Real TP: params are global `jax.Array`s with `NamedSharding(mesh, spec)`; the shard function runs
  under `jax.shard_map(..., check_vma=True)`, so a missing or extra psum fails at trace time.
* Emulated TP (`emulate=True`): each sharded param is stored stacked as [tp, *local_shape] on one
  device, and the *same* shard function runs under `jax.vmap(axis_name="tp")`; the collectives then
  act across the stacked axis. This gives the N-way TP numbers (including SPD's per-shard MLP inputs)
  on a single CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from spd_jax.config import ModelConfig
from spd_jax.model import Transformer
from spd_jax.sharding import TP_AXIS, TPLayout, make_mesh, named, param_spec

Params = dict[str, Any]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def path_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def tp_axis_of(spec: P) -> int | None:
    for i, s in enumerate(spec):
        if s == TP_AXIS:
            return i
    return None


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Everything static about a model split `tp` ways: config, layout, NNX graphdef, global shapes."""

    cfg: ModelConfig
    layout: TPLayout
    graphdef: Any
    abstract: Params  # pure dict of ShapeDtypeStruct with global shapes
    dtype: Any
    fused: bool = False  # q/k/v and gate/up stored as single projections (inference layout)

    @property
    def tp(self) -> int:
        return self.layout.tp

    def specs(self) -> Params:
        return jax.tree_util.tree_map_with_path(lambda p, x: param_spec(path_names(p), x.ndim), self.abstract)

    def cache_shape(self, batch: int, max_len: int) -> tuple[int, ...]:
        return (batch, max_len, self.layout.kv_heads, self.cfg.head_dim)


def build_model_def(cfg: ModelConfig, tp: int, dtype: str | Any = "float32", fused: bool = False) -> ModelDef:
    dt = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    layout = TPLayout(cfg, tp)
    abs_model = nnx.eval_shape(lambda: Transformer(cfg, layout, dt, fused))
    graphdef, state = nnx.split(abs_model)
    return ModelDef(cfg, layout, graphdef, nnx.to_pure_dict(state), dt, fused)


# ----------------------------------------------------------------------------- shard stacking (emulation)


def stack_shards(x: np.ndarray | jax.Array, spec: P, tp: int):
    """Global array -> [tp, *local] for a sharded spec; replicated arrays are returned unchanged."""
    ax = tp_axis_of(spec)
    if ax is None:
        return x
    shape = x.shape
    y = x.reshape(shape[:ax] + (tp, shape[ax] // tp) + shape[ax + 1 :])
    return jnp.moveaxis(y, ax, 0) if isinstance(y, jax.Array) else np.moveaxis(y, ax, 0)


def unstack_shards(x, spec: P):
    ax = tp_axis_of(spec)
    if ax is None:
        return x
    y = jnp.moveaxis(x, 0, ax)
    return y.reshape(y.shape[:ax] + (y.shape[ax] * y.shape[ax + 1],) + y.shape[ax + 2 :])


# ----------------------------------------------------------------------------- the engine


CACHE_SPEC = P(None, None, TP_AXIS, None)


@dataclasses.dataclass(frozen=True)
class Engine:
    """A ModelDef bound to an execution mode: `mesh` (real TP) or `emulate=True` (one device)."""

    mdef: ModelDef
    mesh: Mesh | None = None
    emulate: bool = False
    spd_attn_bias: str = "full"
    floor: bool = False  # benchmark only: no collectives at all (see model.collectives_disabled)

    @staticmethod
    def create(mdef: ModelDef, *, emulate: bool = False, devices=None, spd_attn_bias: str = "full") -> "Engine":
        mesh = None if emulate else make_mesh(mdef.tp, devices)
        return Engine(mdef, mesh, emulate, spd_attn_bias)

    # ---- placement
    def shardings(self) -> Params:
        """Sharding of each param in this engine's storage layout."""
        if self.emulate:
            dev = jax.devices()[0]
            return jax.tree.map(lambda s: jax.sharding.SingleDeviceSharding(dev), self.mdef.specs(),
                                is_leaf=lambda x: isinstance(x, P))
        return jax.tree.map(lambda s: named(self.mesh, s), self.mdef.specs(), is_leaf=lambda x: isinstance(x, P))

    def from_global(self, params: Params, specs: Params | None = None) -> Params:
        """Global arrays (host or device) -> this engine's storage layout. `specs` defaults to the model's."""
        specs = self.mdef.specs() if specs is None else specs
        is_p = lambda x: isinstance(x, P)  # noqa: E731
        if self.emulate:
            dev = jax.devices()[0]
            return jax.tree.map(lambda x, s: jax.device_put(stack_shards(jnp.asarray(x), s, self.mdef.tp), dev),
                                params, specs, is_leaf=is_p)
        return jax.tree.map(lambda x, s: jax.device_put(x, named(self.mesh, s)), params, specs, is_leaf=is_p)

    def to_global(self, params: Params, specs: Params | None = None) -> Params:
        if not self.emulate:
            return params
        specs = self.mdef.specs() if specs is None else specs
        return jax.tree.map(lambda x, s: unstack_shards(x, s), params, specs, is_leaf=lambda x: isinstance(x, P))

    def global_shardings(self) -> Params:
        """Where a checkpoint's global arrays are restored: NamedSharding (real TP) or one device."""
        if self.emulate:
            dev = jax.devices()[0]
            return jax.tree.map(lambda s: jax.sharding.SingleDeviceSharding(dev), self.mdef.specs(),
                                is_leaf=lambda x: isinstance(x, P))
        return self.shardings()

    def cache_shardings(self):
        """Where init_cache puts each layer's k/v (real TP only)."""
        sh = named(self.mesh, CACHE_SPEC)
        return [{"k": sh, "v": sh} for _ in range(self.mdef.cfg.n_layers)]

    def init_cache(self, batch: int, max_len: int, dtype=None):
        dtype = dtype or self.mdef.dtype
        shape = self.mdef.cache_shape(batch, max_len)
        n = self.mdef.cfg.n_layers
        if self.emulate:
            tp = self.mdef.tp
            local = (tp, batch, max_len, shape[2] // tp, shape[3])
            return [{"k": jnp.zeros(local, dtype), "v": jnp.zeros(local, dtype)} for _ in range(n)]
        z = jax.jit(lambda: [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(n)],
                    out_shardings=self.cache_shardings())
        return z()

    # ---- running a per-shard function
    def sharded(self, fn: Callable, in_specs, out_specs) -> Callable:
        """Run `fn` (one shard's computation, collectives over "tp") as real or emulated TP.

        in_specs/out_specs are pytrees of PartitionSpec as for `jax.shard_map`. Under emulation,
        inputs with a "tp" spec are expected in stacked [tp, *local] layout (as params are stored) and
        such outputs come back stacked too (use `gather` for the global array); replicated outputs
        come back as one copy.
        """
        is_p = lambda x: isinstance(x, P)  # noqa: E731
        if self.floor:
            from spd_jax.model import collectives_disabled

            inner = fn

            def fn(*args):
                with collectives_disabled():
                    return inner(*args)

            if self.emulate:
                raise ValueError("the floor mode needs real devices (no emulation)")
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        if not self.emulate:
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True)
        in_axes = jax.tree.map(lambda s: 0 if tp_axis_of(s) is not None else None, in_specs, is_leaf=is_p)
        out_axes = jax.tree.map(lambda s: 0, out_specs, is_leaf=is_p)
        vm = jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, axis_name=TP_AXIS, axis_size=self.mdef.tp)

        def run(*args):
            out = vm(*args)
            return jax.tree.map(lambda s, o: o if tp_axis_of(s) is not None else o[0], out_specs, out, is_leaf=is_p)

        return run

    def gather(self, x, spec: P):
        """A sharded output of `sharded` as its global array."""
        return unstack_shards(x, spec) if self.emulate else x

    # ---- the forward
    def forward(self, spd_modes: tuple[bool, ...], *, attend_cache: bool = False, with_cache: bool = False,
                return_hidden: bool = False) -> Callable:
        """An (unjitted) function (params, tokens[B,T], pad[B], cache, cache_index) -> (logits[B,T,V], cache).

        Logits are float32 over the true vocabulary (padding sliced off). `cache` is None unless
        with_cache. With return_hidden the hidden states (L block inputs + the last block's output,
        each [B,T,D]) come back as a third output.
        """
        spd_modes = tuple(bool(m) for m in spd_modes)
        n_layers = self.mdef.cfg.n_layers
        if len(spd_modes) != n_layers:
            raise ValueError(f"spd_modes has {len(spd_modes)} entries, model has {n_layers} blocks")
        graphdef, bias_mode = self.mdef.graphdef, self.spd_attn_bias

        def fn(params, tokens, pad, cache, cache_index):
            model = nnx.merge(graphdef, params)
            return model(tokens, pad, cache, cache_index, spd_modes=spd_modes, attend_cache=attend_cache,
                         spd_attn_bias=bias_mode, return_hidden=return_hidden)

        cache_specs = [{"k": CACHE_SPEC, "v": CACHE_SPEC}] * n_layers if with_cache else None
        logits_spec = P(None, None, TP_AXIS)
        out_specs = (logits_spec, cache_specs)
        if return_hidden:
            out_specs = (*out_specs, [P()] * (n_layers + 1))
        sm = self.sharded(fn, (self.mdef.specs(), P(), P(), cache_specs, P()), out_specs)
        vocab = self.mdef.cfg.vocab_size

        def run(params, tokens, pad, cache, cache_index):
            out = sm(params, tokens, pad, cache, cache_index)
            return (self.gather(out[0], logits_spec)[..., :vocab], *out[1:])

        return run

    def replicate(self, x):
        """Put a small host array where the forward expects replicated inputs."""
        if self.emulate:
            return jnp.asarray(x)
        return jax.device_put(x, named(self.mesh, P()))

    def replicated_spec(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        """The abstract counterpart of `replicate` (for ahead-of-time lowering). Unlike `replicate`, it
        runs no cross-process check, so compiling from several threads cannot interleave collectives."""
        if self.emulate:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=named(self.mesh, P()))

    @functools.cached_property
    def _logits_jit(self):
        return {}

    def logits(self, params: Params, tokens, pad=None, spd_modes=None):
        """Full-sequence logits (no cache), jitted per SPD configuration. tokens: [B, T] int."""
        tokens = np.asarray(tokens, np.int32)
        spd_modes = tuple(spd_modes) if spd_modes is not None else (False,) * self.mdef.cfg.n_layers
        pad = np.zeros(tokens.shape[0], np.int32) if pad is None else np.asarray(pad, np.int32)
        key = spd_modes
        if key not in self._logits_jit:
            f = self.forward(spd_modes)
            self._logits_jit[key] = jax.jit(lambda p, t, pd: f(p, t, pd, None, jnp.int32(0))[0])
        return self._logits_jit[key](params, self.replicate(tokens), self.replicate(pad))


# ----------------------------------------------------------------------------- fused projections


def _fuse_layer(lp: Params) -> Params:
    """One block's params (one shard's view) -> the fused layout: q|k|v and gate|up concatenated on the
    output columns of this shard, so the global columns come out shard-major."""
    out = dict(lp)
    attn = dict(lp["attn"])
    q, k, v = attn.pop("q"), attn.pop("k"), attn.pop("v")
    attn["qkv"] = {n: jnp.concatenate([q[n], k[n], v[n]], axis=-1) for n in q}
    out["attn"] = attn
    mlp = dict(lp["mlp"])
    if "gate" in mlp:
        gate, up = mlp.pop("gate"), mlp.pop("up")
        mlp["gate_up"] = {n: jnp.concatenate([gate[n], up[n]], axis=-1) for n in gate}
    out["mlp"] = mlp
    return out


def fuse_projections(engine: Engine, params: Params) -> tuple[Engine, Params]:
    """The same model with q/k/v and gate/up each as one projection (fewer, larger GEMMs per block).

    An inference layout only: the SPD pipeline, head grouping and checkpoints use the unfused one. The
    conversion runs per block on each shard (no data moves between devices) and donates the unfused
    block, so the extra memory is one block's weights at a time. Returns the fused engine and params;
    `params` must not be used afterwards.
    """
    mdef = engine.mdef
    if mdef.fused:
        return engine, params
    fmdef = build_model_def(mdef.cfg, mdef.tp, mdef.dtype, fused=True)
    fused_engine = dataclasses.replace(engine, mdef=fmdef)
    fn = jax.jit(engine.sharded(_fuse_layer, (mdef.specs()["layers"][0],), fmdef.specs()["layers"][0]),
                 donate_argnums=0)
    out = {k: v for k, v in params.items() if k != "layers"}
    layers = {}
    for i in sorted(params["layers"]):
        with warnings.catch_warnings():  # q/k/v and gate/up buffers cannot be reused in place: freed below
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            layers[i] = fn(params["layers"][i])
        for x in jax.tree.leaves(params["layers"][i]):
            if isinstance(x, jax.Array) and not x.is_deleted():
                x.delete()
    out["layers"] = layers
    return fused_engine, out
