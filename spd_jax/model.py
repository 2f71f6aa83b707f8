"""Model math for ONE tensor-parallel shard, with explicit collectives over the `tp` axis.

Modules are constructed with *global* shapes (so `nnx.split` gives the global parameter tree that the
loader fills and `jax.shard_map` partitions) but are called on *local* shards: every size used in the
computation is read from the arrays, never from the config. The same code therefore runs
  * under `jax.shard_map` on N devices (`spd_jax.runtime`, real TP), and
  * under `jax.vmap(..., axis_name="tp")` on one device (the single-device N-way TP emulation),
because both bind the collective `psum` / `axis_index` to the axis name "tp".

What a module builds comes from the family's table entry (`spd_jax.arch.Family`: norm, MLP, positions,
q/k norms, checkpoint names); every parameter declares its layout (`arch.ParamInfo`) where it is made.

The decoder block has a per-block, static sync mode, carried by one `SyncPlan` (docs/design.md, "SPD
block"):
  sync:  H = X + AllReduce(Y_i) + b_o ;  out = H + AllReduce(Z_i(LN2(H))) + b_down
  spd:   M_i = X + Y_i (+ b_o) ;         out = X + AllReduce(Y_i + Z_i(LN2(M_i))) + b_o + b_down
where Y_i is device i's partial attention output (row-parallel o-projection without its bias).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spd_jax.arch import ParamInfo
from spd_jax.collectives import PSUM, AllReduce
from spd_jax.config import ModelConfig, RopeConfig
from spd_jax.kernels import decode_attention_append
from spd_jax.plan import DecodePath, SyncPlan
from spd_jax.sharding import TP_AXIS, TPLayout

NEG_INF = float(np.finfo(np.float32).min)

# MLP activations by family kind, looked up when the MLP is traced (so a change here reaches every user
# of the MLP: the model, distillation and head grouping alike).
ACTIVATIONS = {"swiglu": jax.nn.silu, "relu": jax.nn.relu}


def psum(x, on: bool = True, how: AllReduce = PSUM, one_row: bool = False):
    """All-reduce over the `tp` axis, done as `how` says (collectives.AllReduce: NCCL's psum or a one-shot
    exchange for small messages); `on=False` is the floor plan's identity (no collective). `one_row`: x is
    [B, 2, D] with two identical rows (the shadow row): all-reduce the first and copy the sum, so the
    message is what it would be for one row."""
    if not on:
        return x
    if one_row:
        return jnp.repeat(how(x[:, :1], TP_AXIS), 2, axis=1)
    return how(x, TP_AXIS)


class Step(NamedTuple):
    """What one forward call's blocks need of its `DecodePath`, resolved for this call's shapes by
    `Transformer.__call__`. shadow: T = 2 identical rows (the shadow row); one_row: their all-reduces carry the
    first row only; kv_range: (start_b, end_b) cache slots the attention kernel attends (None: XLA's masked
    attention); tune: the kernel's Triton settings."""

    shadow: bool = False
    one_row: bool = False
    kv_range: tuple | None = None
    tune: tuple[tuple[str, int], ...] = ()


PLAIN_STEP = Step()


def param(value, info: ParamInfo) -> nnx.Param:
    """A parameter with its declared layout (read back by `runtime.param_infos`)."""
    return nnx.Param(value, info=info)


def _leaf_names(names, leaf: str) -> dict:
    hf, gg = names if names is not None else (None, None)
    return {"hf": None if hf is None else f"{hf}.{leaf}", "gguf": None if gg is None else f"{gg}.{leaf}"}


# ----------------------------------------------------------------------------- layers


def matmul(x, w, **kw):
    """x[..., in] @ w[in, out].

    A single row (batch-1 decode) is computed as two rows, the second zero. XLA:GPU rewrites a
    vector x matrix `dot` whose operands hold fewer than ~10M elements into multiply + reduce kernels
    (e.g. a LLaMA-2-7B attention projection shard at TP 2, 4096 x 2048), which run at a fraction of
    memory bandwidth; a two-row product stays a GEMM (Triton) and reads the weight once. Measured on
    H200 (`experiments/gemv_forms.py`, docs/performance.md): 2.8x faster for 4096 x 2048, 1.2-1.5x for the
    MLP shapes. The result is the same product.
    """
    lead = x.shape[:-1]
    if math.prod(lead) != 1:
        return jnp.einsum("...i,io->...o", x, w, **kw)
    x2 = x.reshape(1, x.shape[-1])
    y = jnp.einsum("ri,io->ro", jnp.concatenate([x2, jnp.zeros_like(x2)], axis=0), w, **kw)
    return y[:1].reshape(*lead, w.shape[-1])


class Linear(nnx.Module):
    """y = x @ w (+ b). w is [in, out] with logical `axes`; its checkpoint form is [out, in].

    Row-parallel callers add their bias after the all-reduce. `part` (a slice of the tp-split dimension
    of a *global* weight) computes one shard's share outside shard_map (head grouping)."""

    def __init__(self, din: int, dout: int, *, axes: tuple[str, str], bias: bool, dtype, names=None,
                 gguf_rope=None, fused_from: tuple[str, ...] = ()):
        self.w = param(jnp.zeros((din, dout), dtype), ParamInfo(axes, transpose=True, gguf_rope=gguf_rope,
                                                                 fused_from=fused_from, **_leaf_names(names, "weight")))
        self.b = param(jnp.zeros((dout,), dtype), ParamInfo(axes[1:], gguf_rope=gguf_rope, fused_from=fused_from,
                                                            **_leaf_names(names, "bias"))) if bias else None
        self.row_parallel = ParamInfo(axes).tp_dim() == 0

    def __call__(self, x, add_bias: bool = True, part: slice | None = None):
        w = self.w[...]
        b = None if self.b is None else self.b[...]
        if part is not None:
            if self.row_parallel:
                w = w[part]
            else:
                w, b = w[:, part], None if b is None else b[part]
        y = matmul(x, w)
        if add_bias and b is not None:
            y = y + b
        return y

    def bias(self):
        return None if self.b is None else self.b[...]


class Norm(nnx.Module):
    """RMSNorm (HF semantics: normalise in f32, cast, then scale) or LayerNorm (OPT)."""

    def __init__(self, d: int, *, kind: str, eps: float, dtype, names=None, axes: tuple[str] = ("embed",)):
        self.eps = eps
        self.scale = param(jnp.ones((d,), dtype), ParamInfo(axes, **_leaf_names(names, "weight")))
        self.bias = param(jnp.zeros((d,), dtype), ParamInfo(axes, **_leaf_names(names, "bias"))) \
            if kind == "layer" else None

    def inv_rms(self, x):
        """RMSNorm's 1 / rms(x) in float32, [..., 1] (the late-scaled norm: see Block)."""
        xf = x.astype(jnp.float32)
        return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        if self.bias is None:
            return self.scale[...] * (xf * self.inv_rms(x)).astype(x.dtype)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        xf = (xf - mu) * jax.lax.rsqrt(var + self.eps)
        return (xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> np.ndarray:
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv = inv.astype(np.float32)
    if rope.kind == "linear":
        return (inv / rope.factor).astype(np.float32)
    if rope.kind == "llama3":
        low_wl = rope.original_max_position / rope.low_freq_factor
        high_wl = rope.original_max_position / rope.high_freq_factor
        wl = 2 * math.pi / inv
        out = np.where(wl > low_wl, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wl - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * out / rope.factor + smooth * out
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return np.where(medium, smoothed, out).astype(np.float32)
    return inv


def apply_rope(x_bthd, cos_btd, sin_btd):
    """HF 'rotate_half' convention on [B, T, H, hd] with cos/sin [B, T, hd]."""
    half = x_bthd.shape[-1] // 2
    x1, x2 = x_bthd[..., :half], x_bthd[..., half:]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_btd[:, :, None, :], sin_btd[:, :, None, :]
    xf = x_bthd.astype(jnp.float32)
    return (xf * cos + rot.astype(jnp.float32) * sin).astype(x_bthd.dtype)


def attention_probs(q_bthd, k_bskd, mask_bts):
    """Softmax attention probabilities [B, K, G, T, S] (float32); q head h = k * G + g uses kv head k."""
    b, t, h, d = q_bthd.shape
    kh = k_bskd.shape[2]
    q = q_bthd.reshape(b, t, kh, h // kh, d)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd, preferred_element_type=jnp.float32)
    s = s / np.float32(math.sqrt(d))
    s = jnp.where(mask_bts[:, None, None, :, :], s, NEG_INF)
    return jax.nn.softmax(s, axis=-1)


def attention_core(q_bthd, k_bskd, v_bskd, mask_bts):
    """Grouped-query attention on local heads -> [B, T, H * hd]."""
    b, t, h, d = q_bthd.shape
    p = attention_probs(q_bthd, k_bskd, mask_bts)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_bskd.dtype), v_bskd)
    return o.reshape(b, t, h * d)


class Attention(nnx.Module):
    """GQA attention. `fused`: q, k, v are one column-parallel projection `qkv` whose global columns are
    shard-major ([q_0 k_0 v_0 | q_1 k_1 v_1 | ...]), so each shard's slice is its own [q_i k_i v_i]."""

    def __init__(self, cfg: ModelConfig, layout: TPLayout, dtype, fused: bool = False, block: int = 0):
        d, hd, fam = cfg.hidden, cfg.head_dim, cfg.family
        names = lambda role: fam.names(role, block)  # noqa: E731
        self.head_dim = hd
        self.group = cfg.n_heads // layout.kv_heads  # q heads per kv head (static)
        self.fused = fused
        if fused:
            self.qkv = Linear(d, (cfg.n_heads + 2 * layout.kv_heads) * hd, axes=("embed", "fused"),
                              bias=cfg.qkv_bias, dtype=dtype, fused_from=("q", "k", "v"))
        else:
            rope_rows = fam.gguf_rope_permuted
            self.q = Linear(d, cfg.n_heads * hd, axes=("embed", "q_heads"), bias=cfg.qkv_bias, dtype=dtype,
                            names=names("q"), gguf_rope="q" if rope_rows else None)
            self.k = Linear(d, layout.kv_heads * hd, axes=("embed", "kv_heads"), bias=cfg.qkv_bias, dtype=dtype,
                            names=names("k"), gguf_rope="k" if rope_rows else None)
            self.v = Linear(d, layout.kv_heads * hd, axes=("embed", "kv_heads"), bias=cfg.qkv_bias, dtype=dtype,
                            names=names("v"))
        self.o = Linear(cfg.n_heads * hd, d, axes=("q_heads", "embed"), bias=cfg.o_bias, dtype=dtype,
                        names=names("o"))
        if fam.qk_norm:  # Qwen3: RMSNorm over head_dim on every q and k head, before RoPE
            self.q_norm = Norm(hd, kind="rms", eps=cfg.norm_eps, dtype=dtype, names=names("q_norm"),
                               axes=("head_dim",))
            self.k_norm = Norm(hd, kind="rms", eps=cfg.norm_eps, dtype=dtype, names=names("k_norm"),
                               axes=("head_dim",))
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, h_btd, scale_bt1=None):
        """q, k, v of h; `scale_bt1` (late norm): multiply each projection by this per-row scale before its bias."""
        b, t, _ = h_btd.shape
        hd = self.head_dim

        def proj(lin):
            if scale_bt1 is None:
                return lin(h_btd)
            return _add((lin(h_btd, add_bias=False) * scale_bt1).astype(h_btd.dtype), lin.bias())

        if not self.fused:
            return (proj(self.q).reshape(b, t, -1, hd), proj(self.k).reshape(b, t, -1, hd),
                    proj(self.v).reshape(b, t, -1, hd))
        y = proj(self.qkv).reshape(b, t, -1, hd)
        kl = y.shape[2] // (self.group + 2)  # local kv heads
        hl = self.group * kl
        return y[:, :, :hl], y[:, :, hl:hl + kl], y[:, :, hl + kl:]

    def heads(self, h_btd, rope_cs, scale_bt1=None):
        """q [B,T,H,hd], k, v [B,T,K,hd] of the normed input: projections, q/k norms, RoPE."""
        q, k, v = self.project_qkv(h_btd, scale_bt1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope_cs is not None:
            q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
        return q, k, v

    def output(self, o_btf, heads=None):
        """The o-projection without its bias (Y_i). `heads`: which q heads of a global o weight `o_btf`
        holds (head grouping, outside shard_map); None = this shard's own heads."""
        if heads is None:
            return self.o(o_btf, add_bias=False)
        hd = self.head_dim
        rows = (np.asarray(heads)[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)
        return matmul(o_btf, self.o.w[...][rows])

    def __call__(self, h_btd, rope_cs, mask_bts, kv_cache, cache_index, attend_cache: int, step: Step = PLAIN_STEP,
                 scale_bt1=None):
        """Returns (Y_i: this shard's partial o-projection, no bias, new kv cache or None).

        step.shadow: the second of the T = 2 rows is a copy of the first (`Transformer`'s shadow row); only
        the first is written to the cache. step.kv_range: (start_b, end_b) cache slots each sequence attends
        to (end_b = cache_index + 1): the Pallas kernel (`kernels.decode_attention_append`, with step.tune's
        settings) writes this step's k/v into the cache and attends over the whole cache, instead of
        `attention_core` with the mask."""
        q, k, v = self.heads(h_btd, rope_cs, scale_bt1)
        new_cache = None
        if kv_cache is not None and step.kv_range is not None:  # the kernel writes this step's k/v and attends
            o, ck, cv = decode_attention_append(q, k, v, kv_cache["k"], kv_cache["v"], step.kv_range[0], cache_index,
                                                **dict(step.tune))
            return self.output(o), {"k": ck, "v": cv}
        if kv_cache is not None:
            kw, vw = (k[:, :1], v[:, :1]) if step.shadow else (k, v)
            ck = jax.lax.dynamic_update_slice(kv_cache["k"], kw.astype(kv_cache["k"].dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(kv_cache["v"], vw.astype(kv_cache["v"].dtype), (0, cache_index, 0, 0))
            new_cache = {"k": ck, "v": cv}
            if attend_cache:  # the first `attend_cache` slots (Transformer resolves True to the whole cache)
                k, v = ck[:, :attend_cache], cv[:, :attend_cache]
        return self.output(attention_core(q, k, v, mask_bts)), new_cache


class MLP(nnx.Module):
    """SwiGLU (gate, up, down) or ReLU with biases (OPT: fc1, fc2). Returns the partial sum Z_i.

    `part`: one shard's slice of the ffn axis of *global* weights (head grouping's per-shard MLP)."""

    def __init__(self, cfg: ModelConfig, layout: TPLayout, dtype, fused: bool = False, block: int = 0):
        d, f, fam = cfg.hidden, layout.intermediate, cfg.family
        names = lambda role: fam.names(role, block)  # noqa: E731
        self.kind = fam.mlp
        self.fused = fused and fam.mlp == "swiglu"
        if fam.mlp == "relu":
            self.fc1 = Linear(d, f, axes=("embed", "ffn"), bias=fam.mlp_bias, dtype=dtype, names=names("fc1"))
            self.fc2 = Linear(f, d, axes=("ffn", "embed"), bias=fam.mlp_bias, dtype=dtype, names=names("fc2"))
        else:
            if self.fused:  # shard-major columns [gate_0 up_0 | gate_1 up_1 | ...]
                self.gate_up = Linear(d, 2 * f, axes=("embed", "fused"), bias=False, dtype=dtype,
                                      fused_from=("gate", "up"))
            else:
                self.gate = Linear(d, f, axes=("embed", "ffn"), bias=False, dtype=dtype, names=names("gate"))
                self.up = Linear(d, f, axes=("embed", "ffn"), bias=False, dtype=dtype, names=names("up"))
            self.down = Linear(f, d, axes=("ffn", "embed"), bias=False, dtype=dtype, names=names("down"))

    def __call__(self, h_btd, part: slice | None = None, scale_bt1=None):
        act = ACTIVATIONS[self.kind]
        if scale_bt1 is not None and (self.kind != "swiglu" or part is not None):
            raise ValueError("the late-scaled norm is defined for the SwiGLU MLP of the whole shard only")
        if self.kind == "relu":
            return self.fc2(act(self.fc1(h_btd, part=part)), add_bias=False, part=part)
        # late norm (RMSNorm families, runtime.fold_norms): the projections' outputs take the 1/rms scale
        sc = (lambda y: y) if scale_bt1 is None else (lambda y: (y * scale_bt1).astype(h_btd.dtype))  # noqa: E731
        if self.fused:
            if part is not None:
                raise ValueError("a shard slice of the fused layout is not defined (use the unfused model)")
            gu = sc(self.gate_up(h_btd))
            fl = gu.shape[-1] // 2
            g, u = gu[..., :fl], gu[..., fl:]
        else:
            g, u = sc(self.gate(h_btd, part=part)), sc(self.up(h_btd, part=part))
        return self.down(act(g) * u, add_bias=False, part=part)

    def out_bias(self):
        return self.fc2.bias() if self.kind == "relu" else None

    def width(self) -> int:
        """The ffn width of the weights held (global, padded, outside shard_map; local inside)."""
        return (self.fc2 if self.kind == "relu" else self.down).w.shape[0]


def _add(x, b):
    return x if b is None else x + b


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layout: TPLayout, dtype, fused: bool = False, index: int = 0,
                 norms_folded: bool = False):
        """norms_folded: the RMSNorm weights of the two norms live in the projections that read them
        (runtime.fold_norms), and the norms' 1/rms scales those projections' outputs (see `__call__`)."""
        fam = cfg.family
        if norms_folded and fam.norm != "rms":
            raise ValueError(f"folded norms need RMSNorm; the {fam.name} family uses {fam.norm} norm")
        self.late_norm = norms_folded
        self.attn_norm = Norm(cfg.hidden, kind=fam.norm, eps=cfg.norm_eps, dtype=dtype,
                              names=fam.names("attn_norm", index))
        self.attn = Attention(cfg, layout, dtype, fused, index)
        self.mlp_norm = Norm(cfg.hidden, kind=fam.norm, eps=cfg.norm_eps, dtype=dtype,
                             names=fam.names("mlp_norm", index))
        self.mlp = MLP(cfg, layout, dtype, fused, index)

    def spd_mlp(self, x_btd, y_btd, bias: str, part: slice | None = None):
        """Z_i of an SPD block: the MLP on this shard's own attention partial, M_i = X + Y_i (+ b_o)."""
        m = x_btd + y_btd
        if bias == "full":
            m = _add(m, self.attn.o.bias())
        return self._mlp(m, part)

    def _mlp(self, h_btd, part: slice | None = None):
        """The MLP of LN2(h): the norm before the projections, or (folded norms) its 1/rms after them."""
        if self.late_norm:
            return self.mlp(h_btd, part=part, scale_bt1=self.mlp_norm.inv_rms(h_btd))
        return self.mlp(self.mlp_norm(h_btd), part=part)

    def __call__(self, x_btd, rope_cs, mask_bts, kv_cache, cache_index, *, mode: str, bias: str = "full",
                 attend_cache: int = 0, allreduce: AllReduce = PSUM, step: Step = PLAIN_STEP):
        """mode: "sync" (two all-reduces), "spd" (one) or "none" (the floor: sync maths, no collective).
        step: how this call executes (shadow row, one-row all-reduces, the attention kernel; see `Step`).

        With folded norms, RMSNorm(x) @ W = (x @ (g * W)) / rms(x): the projections read the residual
        stream x itself, their weights carry g, and 1/rms(x) (one reduction) scales their outputs, where
        XLA fuses it into the kernels that already consume them. That removes the normalised-activation
        kernel in front of each normed projection (two per block; docs/performance.md, 2026-11-28)."""
        h, scale = (x_btd, self.attn_norm.inv_rms(x_btd)) if self.late_norm else (self.attn_norm(x_btd), None)
        y, new_cache = self.attn(h, rope_cs, mask_bts, kv_cache, cache_index, attend_cache, step, scale_bt1=scale)
        one_row = step.one_row
        b_o, b_out = self.attn.o.bias(), self.mlp.out_bias()
        if mode != "spd":  # two sync points
            on = mode == "sync"
            h = _add(x_btd + psum(y, on, allreduce, one_row), b_o)
            z = self._mlp(h)
            return _add(h + psum(z, on, allreduce, one_row), b_out), new_cache
        z = self.spd_mlp(x_btd, y, bias)  # one sync point: the MLP sees only this shard's attention partial
        out = _add(_add(x_btd + psum(y + z, True, allreduce, one_row), b_o), b_out)
        return out, new_cache


class Embedding(nnx.Module):
    def __init__(self, vocab: int, d: int, dtype, names=None):
        self.w = param(jnp.zeros((vocab, d), dtype), ParamInfo(("vocab", "embed"), **_leaf_names(names, "weight")))


class LMHead(nnx.Module):
    def __init__(self, d: int, vocab: int, dtype, names=None):
        self.w = param(jnp.zeros((d, vocab), dtype), ParamInfo(("embed", "vocab"), transpose=True,
                                                               **_leaf_names(names, "weight")))


class Transformer(nnx.Module):
    """Decoder-only LM (the families of spd_jax.arch). `__call__` runs one TP shard; see module docstring."""

    def __init__(self, cfg: ModelConfig, layout: TPLayout, dtype=jnp.float32, fused: bool = False,
                 norms_folded: bool = False):
        """fused: q/k/v and gate/up as single projections (an inference layout, see runtime.fuse_projections);
        norms_folded: the blocks' RMSNorm weights folded into their projections (runtime.fold_norms)."""
        fam = cfg.family
        self.cfg = cfg
        self.embed = Embedding(layout.vocab, cfg.hidden, dtype, fam.names("embed"))
        self.pos_embed = param(jnp.zeros((cfg.max_position + 2, cfg.hidden), dtype),  # OPT: learned, offset 2
                               ParamInfo(("positions", "embed"), **_leaf_names(fam.names("pos_embed"), "weight"))) \
            if fam.positions == "learned" else None
        self.layers = nnx.List([Block(cfg, layout, dtype, fused, i, norms_folded) for i in range(cfg.n_layers)])
        self.final_norm = Norm(cfg.hidden, kind=fam.norm, eps=cfg.norm_eps, dtype=dtype, names=fam.names("final_norm"))
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.hidden, layout.vocab, dtype, fam.names("lm_head"))

    def embed_tokens(self, tokens_bt, collectives: bool = True, allreduce: AllReduce = PSUM):
        """Vocab-parallel lookup: each shard owns rows [i*Vl, (i+1)*Vl); one all-reduce."""
        w = self.embed.w[...]
        vl = w.shape[0]
        ids = tokens_bt - jax.lax.axis_index(TP_AXIS) * vl
        ok = (ids >= 0) & (ids < vl)
        x = jnp.take(w, jnp.clip(ids, 0, vl - 1), axis=0) * ok[..., None].astype(w.dtype)
        return psum(x, collectives, allreduce)

    def logits_local(self, h_btd):
        """This shard's slice of the vocabulary logits, in float32."""
        w = self.embed.w[...].T if self.lm_head is None else self.lm_head.w[...]
        return matmul(h_btd, w, preferred_element_type=jnp.float32)

    def hidden_in(self, tokens_bt, positions_bt, collectives: bool = True, allreduce: AllReduce = PSUM):
        x = self.embed_tokens(tokens_bt, collectives, allreduce)
        if self.pos_embed is not None:  # OPT: learned positions with offset 2
            # clipped, not NaN-filled: only padding (a bucket's tail) can reach past the table, and a NaN there
            # would reach real rows through 0 * NaN in attention; real tokens are checked (ModelConfig.check_fits)
            x = x + jnp.take(self.pos_embed[...], positions_bt + 2, axis=0, mode="clip")
        return x

    def rope(self, positions_bt):
        return rope_tables(self.cfg, positions_bt)

    def mask(self, q_slots_t, k_slots_s, pad_b):
        return attention_mask(q_slots_t, k_slots_s, pad_b, self.cfg.sliding_window)

    def fresh_inputs(self, t: int, pad_b):
        return fresh_inputs(self.cfg, t, pad_b)

    def __call__(self, tokens_bt, pad_b, cache, cache_index, *, plan: SyncPlan, attend_cache: bool | int = False,
                 return_hidden: bool = False, path: DecodePath = DecodePath()):
        """One shard's forward.

        tokens_bt: [B, T] token ids, left-padded by pad_b[b] tokens (pad slots are never attended to).
        cache: None (no KV cache) or a list of {"k","v"} [B, S, KVl, hd] per layer.
        cache_index: slot where tokens_bt[:, 0] is written (0 for a fresh prefill).
        plan: the per-block sync modes and SPD bias policy (static).
        attend_cache: attend over the whole cache (decode) instead of only over tokens_bt (prefill); an int n
            attends over the first n cache slots only (n must cover every written slot: the decode loop
            grows n with the filled part, so attention costs what the context holds, not the allocation).
        path: how a decode step executes (`plan.DecodePath`, static). path.shadow_row: for one token of one
            sequence attending over the cache (batch-1 decode), run the blocks on two identical rows and keep
            the first. Every projection is then a two-row GEMM without the pad and slice kernels `matmul`
            needs for a single row (~5 of ~22 kernels per block on H200, docs/performance.md); only the first
            row is written to the cache, and attention reads the cache once for both rows. The all-reduces
            carry the first row only and copy the sum (the message of one row; path.shadow_allreduce "both"
            sends both, for comparison). path.attention "pallas": a decode step of one token per sequence
            attends through `kernels.decode_attention_append`, over the filled slots of the whole cache
            (`attend_cache` windows are then not needed); prefill and other calls keep the JAX path.
        Returns (local logits [B, T, Vl] float32, new cache or None[, hidden states]); with return_hidden
        the hidden states are the L block inputs followed by the last block's output (L + 1 arrays).
        """
        t = tokens_bt.shape[1]
        shadow = bool(path.shadow_row and attend_cache and cache is not None and not return_hidden
                      and tokens_bt.shape == (1, 1))
        slots = cache_index + jnp.arange(t, dtype=jnp.int32)  # [T]
        positions = positions_for(slots, pad_b)
        if attend_cache is True:
            attend_cache = cache[0]["k"].shape[1]
        keys = jnp.arange(attend_cache, dtype=jnp.int32) if attend_cache else slots
        mask = self.mask(slots, keys, pad_b)
        rope_cs = self.rope(positions)
        x = self.hidden_in(tokens_bt, positions, not plan.collective_free, plan.allreduce)
        kv_range = None
        if path.attention == "pallas" and attend_cache and cache is not None and t == 1 and not return_hidden:
            start = pad_b if self.cfg.sliding_window is None else \
                jnp.maximum(pad_b, cache_index - self.cfg.sliding_window + 1)
            kv_range = (start.astype(jnp.int32), jnp.broadcast_to(cache_index + 1, pad_b.shape).astype(jnp.int32))
        step = Step(shadow, shadow and path.shadow_allreduce == "first", kv_range, path.tune)
        if shadow:
            x, mask = jnp.repeat(x, 2, axis=1), jnp.repeat(mask, 2, axis=1)
            rope_cs = None if rope_cs is None else tuple(jnp.repeat(a, 2, axis=1) for a in rope_cs)
        new_cache = [] if cache is not None else None
        hidden = []
        for i, layer in enumerate(self.layers):
            hidden.append(x)
            x, c = layer(x, rope_cs, mask, None if cache is None else cache[i], cache_index,
                         mode=plan.modes[i], bias=plan.bias, attend_cache=attend_cache, allreduce=plan.allreduce,
                         step=step)
            if cache is not None:
                new_cache.append(c)
        hidden.append(x)
        logits = self.logits_local(self.final_norm(x))
        if shadow:
            logits = logits[:, :1]
        if return_hidden:
            return logits, new_cache, hidden
        return logits, new_cache


def positions_for(slots_t, pad_b):
    """Position of each slot per sequence: 0 at the first real (non-pad) token."""
    return jnp.maximum(slots_t[None, :] - pad_b[:, None], 0)


def attention_mask(q_slots_t, k_slots_s, pad_b, window: int | None = None):
    """[B, T, S]: causal, not a pad slot and, with a sliding `window`, q - k < window (HF's semantics:
    a query sees itself and the window - 1 positions before it). Slot differences are position
    differences within a sequence, so this holds with a KV cache and left padding alike."""
    q, k = q_slots_t[None, :, None], k_slots_s[None, None, :]
    m = (k <= q) & (k >= pad_b[:, None, None])
    if window is not None:
        m = m & (q - k < window)
    return m


def fresh_inputs(cfg: ModelConfig, t: int, pad_b):
    """RoPE tables (or None) and mask of a fresh sequence of t slots without cache: what a block needs when
    it runs alone (SPD pipeline, head grouping)."""
    slots = jnp.arange(t, dtype=jnp.int32)
    return rope_tables(cfg, positions_for(slots, pad_b)), attention_mask(slots, slots, pad_b, cfg.sliding_window)


def rope_tables(cfg: ModelConfig, positions_bt):
    if cfg.rope is None:
        return None
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope)
    f = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vocab_parallel_nll(logits_local_btv, targets_bt, vocab_size: int):
    """Per-token negative log-likelihood from vocab-sharded logits (Megatron-style), [B, T] float32.

    Each shard holds vocab columns [i*Vl, (i+1)*Vl); padded columns (>= vocab_size) are excluded.
    """
    vl = logits_local_btv.shape[-1]
    start = jax.lax.axis_index(TP_AXIS) * vl
    col = start + jnp.arange(vl)
    lg = jnp.where(col < vocab_size, logits_local_btv.astype(jnp.float32), -jnp.inf)
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(lg, axis=-1)), TP_AXIS)
    sumexp = psum(jnp.sum(jnp.exp(lg - m[..., None]), axis=-1))
    local_t = targets_bt - start
    ok = (local_t >= 0) & (local_t < vl)
    tgt = jnp.take_along_axis(lg, jnp.clip(local_t, 0, vl - 1)[..., None], axis=-1)[..., 0]
    tgt = psum(jnp.where(ok, tgt, 0.0))
    return jnp.log(sumexp) + m - tgt


def vocab_parallel_is_argmax(logits_local_btv, targets_bt, vocab_size: int):
    """[B, T] bool: the target is the (global) argmax of vocab-sharded logits (greedy prediction)."""
    vl = logits_local_btv.shape[-1]
    start = jax.lax.axis_index(TP_AXIS) * vl
    lg = jnp.where(start + jnp.arange(vl) < vocab_size, logits_local_btv.astype(jnp.float32), -jnp.inf)
    m = jax.lax.pmax(jnp.max(lg, axis=-1), TP_AXIS)
    local_t = targets_bt - start
    ok = (local_t >= 0) & (local_t < vl)
    tgt = jnp.take_along_axis(lg, jnp.clip(local_t, 0, vl - 1)[..., None], axis=-1)[..., 0]
    tgt = psum(jnp.where(ok, tgt, 0.0))
    return tgt >= m


def vocab_parallel_log_softmax(logits_local_btv, vocab_size: int):
    """Log-probabilities of this shard's vocab columns from vocab-sharded logits, [B, T, Vl] float32
    (padded columns >= vocab_size get -inf)."""
    vl = logits_local_btv.shape[-1]
    col = jax.lax.axis_index(TP_AXIS) * vl + jnp.arange(vl)
    lg = jnp.where(col < vocab_size, logits_local_btv.astype(jnp.float32), -jnp.inf)
    m = jax.lax.pmax(jnp.max(lg, axis=-1), TP_AXIS)
    lse = jnp.log(psum(jnp.sum(jnp.exp(lg - m[..., None]), axis=-1))) + m
    return lg - lse[..., None]


def vocab_parallel_argmax(logits_local_btv, vocab_size: int):
    """[B, T] int32: the global argmax of vocab-sharded logits (lowest index on ties, as np.argmax)."""
    vl = logits_local_btv.shape[-1]
    start = jax.lax.axis_index(TP_AXIS) * vl
    lg = jnp.where(start + jnp.arange(vl) < vocab_size, logits_local_btv.astype(jnp.float32), -jnp.inf)
    local_max = jnp.max(lg, axis=-1)
    m = jax.lax.pmax(local_max, TP_AXIS)
    idx = jnp.where(local_max >= m, start + jnp.argmax(lg, axis=-1), jnp.iinfo(jnp.int32).max)
    return jax.lax.pmin(idx.astype(jnp.int32), TP_AXIS)
