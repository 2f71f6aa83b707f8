"""Head grouping (HG) for extremely sensitive blocks (docs/design.md, "The SPD pipeline").

1. Attention-score maps: for each head, the softmax attention map averaged over calibration samples.
2. Scatter: split the heads into `tp` equal groups so that heads on the same device are as different
   as possible (maximise the sum of pairwise Euclidean distances between score maps inside groups).
   Exhaustive over all partitions when there are at most `EXHAUSTIVE_LIMIT` of them; beyond that, a
   pairwise-swap local search (move the best improving swap of two units between groups until none
   improves) from `SCATTER_RESTARTS` random balanced starts, keeping the best.
3. Match (MC): choose which group goes to which device (i.e. to which MLP shard) to maximise the total
   norm of the MLP outputs before the residual add, sum_j ||MLP_j(LN2(X + Y_{g(j)}))||. Exhaustive over
   the tp! assignments for tp <= 8, the Hungarian method (exact) beyond.
4. Permute: physically reorder the Q/K/V columns and O rows so device j holds its matched group. MLP
   shards stay in place (moving heads onto a shard is the same matching as moving the shard); the
   permutation code also supports reordering MLP shards. In sync mode the block output is unchanged.

Granularity for grouped-query attention: a query head must stay with its kv head, so the unit that is
grouped is a kv head together with its query heads ("kv group"). With tp > kv heads (kv heads
replicated across devices) there is no freedom left that keeps each device's query heads on one kv
head, so HG is skipped for such a block (reported in the plan).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spd_jax.arch import ParamInfo
from spd_jax.distributed import to_host
from spd_jax.model import attention_core, attention_probs, fresh_inputs

EXHAUSTIVE_LIMIT = 20000
SCATTER_RESTARTS = 32


def grouping_units(layout) -> tuple[int, int] | None:
    """(number of units, query heads per unit), or None when kv heads are replicated (tp > kv heads)."""
    if layout.kv_repeat != 1:
        return None
    u = layout.kv_heads
    return u, layout.cfg.n_heads // u


# Head grouping runs the block's own pieces (Attention.heads / output, Block.spd_mlp, MLP(part=...)) on
# the block's *global* parameters outside shard_map, so whatever the block computes, grouping optimises.


def _heads(blk, x, cfg):
    rope, mask = fresh_inputs(cfg, x.shape[1], jnp.zeros((x.shape[0],), jnp.int32))
    q, k, v = blk.attn.heads(blk.attn_norm(x), rope)
    return q, k, v, mask


def attention_maps(block_graphdef, bp_global, x_ntd, cfg) -> np.ndarray:
    """[H, T, T] mean attention probabilities per query head."""

    @jax.jit
    def f(bp, x):
        blk = nnx.merge(block_graphdef, bp)
        q, k, _, mask = _heads(blk, x, cfg)
        p = attention_probs(q, k, mask)  # [B, K, G, T, S]; head h = k * G + g
        return jnp.mean(p.reshape(p.shape[0], -1, *p.shape[3:]), axis=0)

    return to_host(f(bp_global, jnp.asarray(x_ntd)))


def pairwise_distances(maps_uf: np.ndarray) -> np.ndarray:
    """Euclidean distances between rows, [U, U], from the Gram matrix in float64: memory O(U^2 + U*F)
    instead of the [U, U, F] of differences (F = T^2 attention entries: 17 GB for 32 heads at T = 2048)."""
    m = maps_uf.reshape(len(maps_uf), -1).astype(np.float64)
    sq = np.einsum("uf,uf->u", m, m)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (m @ m.T)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(np.maximum(d2, 0.0))


def _partitions(units: list[int], k: int):
    if not units:
        yield []
        return
    first, rest = units[0], units[1:]
    for comp in itertools.combinations(rest, k - 1):
        remaining = [u for u in rest if u not in comp]
        for p in _partitions(remaining, k):
            yield [[first, *comp], *p]


def n_partitions(n: int, groups: int) -> int:
    k = n // groups
    return math.factorial(n) // (math.factorial(k) ** groups * math.factorial(groups))


def _within(dist, groups):
    return sum(dist[a, b] for g in groups for a, b in itertools.combinations(g, 2))


def _swap_search(dist: np.ndarray, group_of: np.ndarray, n_groups: int) -> np.ndarray:
    """Best-improvement pairwise swaps between groups until no swap raises the within-group distance.

    S[u, g] = sum of distances from u to the members of g; swapping a (in g) with b (in h) changes the
    objective by (S[a,h] - d_ab - S[a,g]) + (S[b,g] - d_ab - S[b,h]). Group sizes never change.
    """
    group_of = group_of.copy()
    onehot = np.eye(n_groups)[group_of]  # [n, G]
    S = dist @ onehot
    while True:
        own = S[np.arange(len(group_of)), group_of]  # S[u, g(u)]
        # gain[a, b] = S[a, g(b)] - own[a] + S[b, g(a)] - own[b] - 2 d_ab
        to_b = S[:, group_of]  # [a, b] -> S[a, g(b)]
        gain = to_b - own[:, None] + to_b.T - own[None, :] - 2 * dist
        gain[group_of[:, None] == group_of[None, :]] = -np.inf
        a, b = np.unravel_index(np.argmax(gain), gain.shape)
        if not gain[a, b] > 1e-12 * max(1.0, abs(S).max()):
            return group_of
        ga, gb = group_of[a], group_of[b]
        S[:, ga] += dist[:, b] - dist[:, a]
        S[:, gb] += dist[:, a] - dist[:, b]
        group_of[a], group_of[b] = gb, ga


def scatter(dist: np.ndarray, tp: int, seed: int = 0) -> tuple[list[list[int]], str]:
    """Split units into tp equal groups maximising within-group distance. Returns (groups, method)."""
    n = dist.shape[0]
    k = n // tp
    if k == 1:
        return [[u] for u in range(n)], "trivial"
    if n_partitions(n, tp) <= EXHAUSTIVE_LIMIT:
        best = max(_partitions(list(range(n)), k), key=lambda g: _within(dist, g))
        return [sorted(g) for g in best], "exhaustive"
    rng = np.random.RandomState(seed)
    base = np.repeat(np.arange(tp), k)
    best_groups, best_val = None, -np.inf
    for _ in range(SCATTER_RESTARTS):
        group_of = _swap_search(dist, rng.permutation(base), tp)
        groups = [sorted(np.nonzero(group_of == g)[0].tolist()) for g in range(tp)]
        val = _within(dist, groups)
        if val > best_val:
            best_groups, best_val = groups, val
    return sorted(best_groups), "local-search"


def match(norms: np.ndarray) -> tuple[list[int], str]:
    """norms[g, j] = MLP-output norm with group g on shard j. Returns device_of_group, method."""
    tp = norms.shape[0]
    if tp <= 8:
        best = max(itertools.permutations(range(tp)), key=lambda p: sum(norms[g, p[g]] for g in range(tp)))
        return list(best), "exhaustive"
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-norms)
    return [int(c) for _, c in sorted(zip(rows, cols))], "hungarian"


def mlp_norms(block_graphdef, bp_global, x_ntd, cfg, groups_q: list[list[int]], tp: int, bias_mode: str) -> np.ndarray:
    """norms[g, j] = sum over samples of ||Z_j||_F, the SPD MLP output of shard j when its attention
    partial is group g's: Block.spd_mlp(X, Y_g, part=shard j's ffn slice)."""

    @jax.jit
    def f(bp, x):
        blk = nnx.merge(block_graphdef, bp)
        q, k, v, mask = _heads(blk, x, cfg)
        per = q.shape[2] // k.shape[2]
        fs = blk.mlp.width() // tp
        out = []
        for heads_list in groups_q:
            heads = np.asarray(heads_list)
            kv = np.asarray(sorted({int(h) // per for h in heads_list}))
            y = blk.attn.output(attention_core(q[:, :, heads], k[:, :, kv], v[:, :, kv], mask), heads=heads)
            row = []
            for j in range(tp):
                z = blk.spd_mlp(x, y, bias_mode, part=slice(j * fs, (j + 1) * fs))
                row.append(jnp.sqrt(jnp.sum(jnp.square(z.astype(jnp.float32)), axis=(1, 2))).sum())
            out.append(jnp.stack(row))
        return jnp.stack(out)

    return to_host(f(bp_global, jnp.asarray(x_ntd)))


def permute_block(bp: dict, infos: dict, cfg, q_order: list[int], kv_order: list[int],
                  mlp_shard_order: list[int] | None, tp: int) -> dict:
    """Reorder heads (every q_heads axis by q_order, every kv_heads axis by kv_order) and optionally MLP
    shards (every ffn axis), in global layout. Which dimension is which comes from each parameter's
    declared axes (`infos`, arch.ParamInfo)."""
    hd = cfg.head_dim

    def index(order, width):
        return jnp.asarray((np.asarray(order)[:, None] * width + np.arange(width)[None, :]).reshape(-1))

    def one(info: ParamInfo, a):
        if a is None:
            return a
        for d, ax in enumerate(info.axes):
            if ax == "fused":
                raise ValueError("head grouping needs the unfused layout")
            if ax == "q_heads":
                a = jnp.take(a, index(q_order, hd), axis=d)
            elif ax == "kv_heads":
                a = jnp.take(a, index(kv_order, hd), axis=d)
            elif ax == "ffn" and mlp_shard_order is not None:
                a = jnp.take(a, index(mlp_shard_order, a.shape[d] // tp), axis=d)
        return a

    return jax.tree.map(one, infos, bp, is_leaf=lambda x: isinstance(x, ParamInfo))


def head_group_block(block_graphdef, block_infos: dict, bp_global: dict, x_ntd: np.ndarray, cfg, layout,
                     bias_mode: str = "full"):
    """Full HG for one block (global-layout params). Returns (new params, info dict) or (params, skip info)."""
    tp = layout.tp
    units = grouping_units(layout)
    if units is None:
        return bp_global, {"applied": False, "reason": f"tp={tp} > {cfg.n_kv_heads} kv heads: kv heads are "
                                                        "replicated, no head regrouping is possible"}
    n_units, per = units
    maps = attention_maps(block_graphdef, bp_global, x_ntd, cfg)  # [H, T, T]
    unit_maps = maps.reshape(n_units, per, -1).mean(axis=1)
    dist = pairwise_distances(unit_maps)
    groups, scatter_method = scatter(dist, tp)
    groups_q = [[u * per + i for u in g for i in range(per)] for g in groups]
    norms = mlp_norms(block_graphdef, bp_global, x_ntd, cfg, groups_q, tp, bias_mode)
    device_of_group, match_method = match(norms)
    group_on_device = [device_of_group.index(j) for j in range(tp)]
    kv_order = [u for j in range(tp) for u in groups[group_on_device[j]]]
    q_order = [u * per + i for u in kv_order for i in range(per)]
    k = n_units // tp
    orig_q = [[u * per + i for u in range(j * k, (j + 1) * k) for i in range(per)] for j in range(tp)]
    orig = mlp_norms(block_graphdef, bp_global, x_ntd, cfg, orig_q, tp, bias_mode)
    new = permute_block(bp_global, block_infos, cfg, q_order, kv_order, None, tp)
    return new, {"applied": True, "unit": "kv group" if per > 1 else "head", "groups": groups,
                 "device_of_group": device_of_group, "kv_order": kv_order, "scatter": scatter_method,
                 "match": match_method,
                 "mlp_norm_total": float(sum(norms[g, device_of_group[g]] for g in range(tp))),
                 "mlp_norm_original_layout": float(np.trace(orig))}
