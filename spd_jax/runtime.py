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
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from spd_jax.arch import ParamInfo
from spd_jax.config import ConfigError, ModelConfig
from spd_jax.model import Transformer
from spd_jax.plan import DecodePath, SyncPlan
from spd_jax.sharding import TP_AXIS, TPLayout, make_mesh, named, spec_of

# Engine.replicate: larger host arrays skip the cross-process equality check (environment: for tests)
REPLICATE_CHECK_BYTES = int(os.environ.get("SPD_JAX_REPLICATE_CHECK_BYTES", 1 << 20))

Params = dict[str, Any]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def path_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def tp_axis_of(spec: P) -> int | None:
    for i, s in enumerate(spec):
        if s == TP_AXIS:
            return i
    return None


def param_infos(state) -> Params:
    """The declared layout (`arch.ParamInfo`) of every parameter of an NNX state, as a pure dict shaped
    like `nnx.to_pure_dict(state)`. A parameter that declares none is an error, never replicated."""
    out: Params = {}
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]:
        names = path_names(path)
        info = var.get_metadata().get("info") if is_var(var) else None
        if not isinstance(info, ParamInfo):
            raise ValueError(f"parameter {'/'.join(map(str, names))} declares no layout (arch.ParamInfo)")
        node = out
        for k in names[:-1]:
            node = node.setdefault(k, {})
        node[names[-1]] = info
    return out


def _is_info(x) -> bool:
    return isinstance(x, ParamInfo)


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Everything static about a model split `tp` ways: config, layout, NNX graphdef, global shapes and
    each parameter's declared layout."""

    cfg: ModelConfig
    layout: TPLayout
    graphdef: Any
    abstract: Params  # pure dict of ShapeDtypeStruct with global shapes
    dtype: Any
    fused: bool = False  # q/k/v and gate/up stored as single projections (inference layout)
    norms_folded: bool = False  # the blocks' RMSNorm weights folded into their projections (inference layout)
    infos: Params = dataclasses.field(default=None, compare=False)  # pure dict of arch.ParamInfo

    @property
    def tp(self) -> int:
        return self.layout.tp

    def specs(self) -> Params:
        return jax.tree.map(spec_of, self.infos, is_leaf=_is_info)

    def param_count(self) -> int:
        """Weights of the model as the checkpoint has them (no padding or kv-head replication)."""
        lay = self.layout

        def one(info: ParamInfo, a) -> int:
            n = 1
            for ax, size in zip(info.axes, a.shape):
                m = lay.pad_map(ax)
                n *= size if m is None else int(m.max()) + 1
            return n

        return sum(jax.tree.leaves(jax.tree.map(one, self.infos, self.abstract, is_leaf=_is_info)))

    def cache_shape(self, batch: int, max_len: int) -> tuple[int, ...]:
        return (batch, max_len, self.layout.kv_heads, self.cfg.head_dim)


def build_model_def(cfg: ModelConfig, tp: int, dtype: str | Any = "float32", fused: bool = False,
                    norms_folded: bool = False) -> ModelDef:
    dt = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    layout = TPLayout(cfg, tp)
    abs_model = nnx.eval_shape(lambda: Transformer(cfg, layout, dt, fused, norms_folded))
    graphdef, state = nnx.split(abs_model)
    return ModelDef(cfg, layout, graphdef, nnx.to_pure_dict(state), dt, fused, norms_folded, param_infos(state))


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

    @staticmethod
    def create(mdef: ModelDef, *, emulate: bool = False, devices=None) -> "Engine":
        mesh = None if emulate else make_mesh(mdef.tp, devices)
        return Engine(mdef, mesh, emulate)

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
    def sharded(self, fn: Callable, in_specs, out_specs, *, check_vma: bool = True) -> Callable:
        """Run `fn` (one shard's computation, collectives over "tp") as real or emulated TP.

        in_specs/out_specs are pytrees of PartitionSpec as for `jax.shard_map`. Under emulation,
        inputs with a "tp" spec are expected in stacked [tp, *local] layout (as params are stored) and
        such outputs come back stacked too (use `gather` for the global array); replicated outputs
        come back as one copy. check_vma=False: `fn` cannot be typed by the replication check (the floor
        plan leaves out every all-reduce on purpose; a one-shot all-reduce's equal-on-every-device result
        is typed device-varying), so shard_map does not check it.
        """
        is_p = lambda x: isinstance(x, P)  # noqa: E731
        if not self.emulate:
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
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
    def forward(self, plan: SyncPlan, *, attend_cache: bool | int = False, with_cache: bool = False,
                return_hidden: bool = False, path: DecodePath = DecodePath()) -> Callable:
        """An (unjitted) function (params, tokens[B,T], pad[B], cache, cache_index) -> (logits[B,T,V], cache).

        Logits are float32 over the true vocabulary (padding sliced off). `cache` is None unless
        with_cache. With return_hidden the hidden states (L block inputs + the last block's output,
        each [B,T,D]) come back as a third output. `plan` says which all-reduces run, `path` how a decode
        step executes (`plan.DecodePath`: attention kernel, shadow row, kernel settings).
        """
        n_layers = self.mdef.cfg.n_layers
        if not isinstance(plan, SyncPlan):
            raise TypeError(f"forward needs a SyncPlan, got {type(plan).__name__}")
        plan.check(n_layers)
        if plan.collective_free and self.emulate:
            raise ValueError("the floor plan needs real devices (no emulation)")
        graphdef = self.mdef.graphdef

        def fn(params, tokens, pad, cache, cache_index):
            model = nnx.merge(graphdef, params)
            return model(tokens, pad, cache, cache_index, plan=plan, attend_cache=attend_cache,
                         return_hidden=return_hidden, path=path)

        cache_specs = [{"k": CACHE_SPEC, "v": CACHE_SPEC}] * n_layers if with_cache else None
        logits_spec = P(None, None, TP_AXIS)
        out_specs = (logits_spec, cache_specs)
        if return_hidden:
            out_specs = (*out_specs, [P()] * (n_layers + 1))
        sm = self.sharded(fn, (self.mdef.specs(), P(), P(), cache_specs, P()), out_specs,
                          check_vma=not plan.collective_free and plan.allreduce.checkable)
        vocab = self.mdef.cfg.vocab_size

        def run(params, tokens, pad, cache, cache_index):
            out = sm(params, tokens, pad, cache, cache_index)
            return (self.gather(out[0], logits_spec)[..., :vocab], *out[1:])

        return run

    def replicate(self, x):
        """Put a host array where the forward expects replicated inputs. NumPy subclasses (a slice of
        a memory-mapped file) are viewed as plain arrays: a multi-process device_put accepts only those.

        With several processes, `jax.device_put` first checks that every process passed the same value by
        all-gathering the whole array across processes; for a 67 MB batch of LLaMA-2-7B teacher states
        that check cost more than the block it fed (the 7B sensitivity stage ran > 6 min instead of ~1).
        Arrays above REPLICATE_CHECK_BYTES are therefore placed shard by shard from each process's own
        copy (`jax.make_array_from_callback`): the callers build them identically on every process
        (same data, same seed); smaller ones keep the check."""
        if isinstance(x, np.ndarray):
            x = np.asarray(x)
        if self.emulate:
            return jnp.asarray(x)
        sharding = named(self.mesh, P())
        if jax.process_count() > 1 and isinstance(x, np.ndarray) and x.nbytes > REPLICATE_CHECK_BYTES:
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
        return jax.device_put(x, sharding)

    def replicated_spec(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        """The abstract counterpart of `replicate` (for ahead-of-time lowering). Unlike `replicate`, it
        runs no cross-process check, so compiling from several threads cannot interleave collectives."""
        if self.emulate:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=named(self.mesh, P()))

    @functools.cached_property
    def _logits_jit(self):
        return {}

    def logits(self, params: Params, tokens, pad=None, plan: SyncPlan | None = None):
        """Full-sequence logits (no cache), jitted per sync plan (default: all sync). tokens: [B, T] int."""
        tokens = np.asarray(tokens, np.int32)
        plan = plan if plan is not None else SyncPlan.sync(self.mdef.cfg.n_layers)
        pad = np.zeros(tokens.shape[0], np.int32) if pad is None else np.asarray(pad, np.int32)
        key = plan
        if key not in self._logits_jit:
            f = self.forward(plan)
            self._logits_jit[key] = jax.jit(lambda p, t, pd: f(p, t, pd, None, jnp.int32(0))[0])
        return self._logits_jit[key](params, self.replicate(tokens), self.replicate(pad))


# ----------------------------------------------------------------------------- fused projections


def _fuse_layer(lp: Params, finfos: Params) -> Params:
    """One block's params (one shard's view) -> the fused layout described by the fused model's
    parameter infos: a leaf declaring `fused_from=(a, b, ...)` is the same leaf of sibling modules a, b,
    ... concatenated on this shard's output columns, so the global columns come out shard-major."""
    def walk(src: Params, infos: Params) -> Params:
        out = {}
        for name, sub in infos.items():
            if isinstance(sub, ParamInfo):
                out[name] = src[name]
                continue
            infos_here = list(sub.values())
            fused_from = infos_here[0].fused_from if all(isinstance(i, ParamInfo) for i in infos_here) else ()
            if fused_from:
                out[name] = {leaf: jnp.concatenate([src[m][leaf] for m in fused_from], axis=-1) for leaf in sub}
            else:
                out[name] = walk(src[name], sub)
        return out

    return walk(lp, finfos)


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
    fmdef = build_model_def(mdef.cfg, mdef.tp, mdef.dtype, fused=True, norms_folded=mdef.norms_folded)
    fused_engine = dataclasses.replace(engine, mdef=fmdef)
    finfos = fmdef.infos["layers"][0]
    fn = jax.jit(engine.sharded(lambda lp: _fuse_layer(lp, finfos), (mdef.specs()["layers"][0],),
                                fmdef.specs()["layers"][0]), donate_argnums=0)
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


# ----------------------------------------------------------------------------- folded norms

# the projections that read each block norm's output, in either projection layout
_NORMED = {"attn_norm": ("attn", ("q", "k", "v", "qkv")), "mlp_norm": ("mlp", ("gate", "up", "gate_up"))}


def _fold_layer(lp: Params) -> Params:
    """One block's params (one shard's view): each projection reading a norm's output gets that norm's weight
    on its input rows (W <- g[:, None] * W, rounded once to the weight dtype), and the norm's weight becomes 1."""
    out = jax.tree.map(lambda x: x, lp)
    for norm, (owner, names) in _NORMED.items():
        g = lp[norm]["scale"].astype(jnp.float32)
        for name in names:
            if name in lp[owner]:
                w = lp[owner][name]["w"]
                out[owner][name]["w"] = (g[:, None] * w.astype(jnp.float32)).astype(w.dtype)
        out[norm]["scale"] = jnp.ones_like(lp[norm]["scale"])
    return out


def fold_norms(engine: Engine, params: Params) -> tuple[Engine, Params]:
    """The same model with each block's two RMSNorm weights folded into the projections that read them.

    RMSNorm(x) @ W = (x @ (g * W)) / rms(x): the folded model (`model.Block`, norms_folded) runs the
    projections on the residual stream itself and scales their outputs by 1/rms, which removes the kernel
    that wrote the normalised activation in front of q/k/v and gate/up (two kernels per block in batch-1
    decode; measured in docs/performance.md, 2026-11-28). The folded weights are rounded once to the weight
    dtype, so in bfloat16 the logits differ from the unfolded model's by bf16 rounding. RMSNorm families only
    (LLaMA, Qwen, Mistral); an inference layout like `fuse_projections` (the SPD pipeline, head grouping
    and checkpoints use the unfolded model), composable with it in either order. Runs per block on each
    shard, donating the unfolded block; `params` must not be used afterwards.
    """
    mdef = engine.mdef
    if mdef.norms_folded:
        return engine, params
    if mdef.cfg.family.norm != "rms":
        raise ConfigError(f"--fold-norms needs an RMSNorm model; the {mdef.cfg.family.name} family uses "
                          f"{mdef.cfg.family.norm} norm (its mean subtraction cannot move behind the projections)")
    fmdef = build_model_def(mdef.cfg, mdef.tp, mdef.dtype, fused=mdef.fused, norms_folded=True)
    spec = mdef.specs()["layers"][0]
    fn = jax.jit(engine.sharded(_fold_layer, (spec,), spec), donate_argnums=0)
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = {i: fn(params["layers"][i]) for i in sorted(params["layers"])}
    return dataclasses.replace(engine, mdef=fmdef), out


def layout_choice(cfg, fused: bool | None, fold: bool | None, default: bool) -> tuple[bool, bool]:
    """(fused, fold) for a run that asked for `fused`/`fold` (None: not said). Unsaid layouts take `default`,
    folding only where the family uses RMSNorm (so "on by default" never refuses OPT); an explicit
    --fold-norms on a LayerNorm model stays an error (`fold_norms`)."""
    fused = default if fused is None else fused
    fold = (default and cfg.family.norm == "rms") if fold is None else fold
    return bool(fused), bool(fold)


def inference_layout(engine: Engine, params: Params, *, fused: bool = False,
                     fold: bool = False) -> tuple[Engine, Params]:
    """The inference layouts a run asked for (--fused-projections, --fold-norms), applied to loaded params."""
    if fused:
        engine, params = fuse_projections(engine, params)
    if fold:
        engine, params = fold_norms(engine, params)
    return engine, params
