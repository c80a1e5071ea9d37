"""Channel orders built from the weights: tiles whose members share a magnitude (``cluster``).

A tile's scale is set by its largest weight (PTQ-SL then moves it within ``[alpha, beta]``
times that), so a tile that holds one large and many small weights rounds the small ones
coarsely. The order of a free channel group decides which output rows of its producers share a
row block and which input channels of its consumers share a column block. ``cluster`` chooses
the order that puts channels of matching magnitude into the same tiles, on a proxy of the
layer-output error:

    E_L(order) = sum over tiles t of  s_t^2 * sum_{(o, k) in t} H_kk,    s_t = max_{t} |W_ok|

the output error of max-scale rounding with uniform rounding noise (variance ``s_t^2 / 12``
per weight, times the input energy ``H_kk = sum_n Xq_kn^2`` of its column; the constant
``1 / (12 q_max^2)`` is the same for every layer and dropped). The segment's proxy is
``sum_L sqrt(E_L)``, the same Euclidean sum the search's real score uses.

Per channel the proxy needs only a few numbers, so a swap of two channels is evaluated without
touching the weights: for a producer (rows permuted) row ``i`` has, per column block j, its
maximum ``a_ij = max_{k in j} |W_ik|`` and input energy ``b_ij = sum_{k in j} H_kk``, and row
block R contributes ``sum_j (max_{i in R} a_ij)^2 * sum_{i in R} b_ij``; for a consumer
(input channels permuted; a channel is ``kk = kh*kw`` im2col columns, which must lie in one
column block: ``c`` a multiple of ``kk``) channel ``ch`` has, per row block i, the maximum of
``|W|`` over its rows and columns and the energy ``rows(i) * sum_{k in ch} H_kk``, and the
channels of a column block share. Both are "channels in consecutive blocks with a feature
vector (max, energy)", and the change of every layer's ``E_L`` for every pair of channels in
different blocks is formed at once from each block's two largest values per feature.

The search per free group: steepest descent over channel swaps (the best swap of all pairs, as
long as it lowers the proxy by more than 1e-9 relative), started from the current order and from
``restarts`` seeded random orders; groups of one segment take turns (``passes`` times), each
seeing the others' current orders. The distinct local optima with the lowest proxy, and the
current order, are then scored for real and the best is kept, so on the calibration batch the
result is never worse than the current order by that score. Two real scores (``reorder.score``):
``gram`` (``SegmentScorer``: Algorithm 1 on the Gram statistics, the evolutionary search's score:
the sum of the segment layers' output errors with their inputs fixed at the current order's
calibration) and ``output`` (the segment's layers calibrated for real at the candidate order,
then the error of the next layer's float output on the quantized segment's output,
``||f(x_q) - f(x)||``: what the rest of the network sees, with the upstream change of each layer's
input included; about one partial forward pass and two layer calibrations per candidate). Layers the proxy cannot describe
(a consumer whose channels straddle column blocks; grouped layers, whose permutable rows are
each in their own group) add nothing to the proxy and are still in the real score.
"""

from __future__ import annotations

import math

import numpy as np

from .score import SegmentScorer

REL_TOL = 1e-9          # a swap must lower the proxy by more than this, relative


class ChannelBlocks:
    """One layer's proxy as a function of one group's order: ``a`` (max) and ``b`` (energy),
    each (channels, features), in the order the statistics were taken at; channel blocks of
    ``size`` consecutive positions (the last one may be smaller)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, size: int):
        self.a, self.b, self.size = np.asarray(a, np.float64), np.asarray(b, np.float64), size
        n = self.a.shape[0]
        self.block = np.arange(n) // size
        self.starts = np.arange(0, n, size)

    def energy(self, order: np.ndarray) -> float:
        """``E_L`` with channel ``order[p]`` at position p."""
        A, B = self.a[order], self.b[order]
        mx = np.maximum.reduceat(A, self.starts, axis=0)
        sm = np.add.reduceat(B, self.starts, axis=0)
        return float((mx * mx * sm).sum())

    def swap_deltas(self, order: np.ndarray) -> np.ndarray:
        """``D[p, q]``: the change of ``E_L`` when positions p and q swap (0 within a block)."""
        A, B = self.a[order], self.b[order]
        n, F = A.shape
        blk = self.block
        nb = len(self.starts)
        # per block and feature: the largest value, where it is, the second largest
        top1 = np.full((nb, F), -np.inf)
        arg1 = np.full((nb, F), -1, dtype=np.int64)
        top2 = np.full((nb, F), -np.inf)
        for k in range(self.size):                    # at most `size` members per block
            pos = self.starts + k
            ok = pos < n
            v = np.full((nb, F), -np.inf)
            v[ok] = A[pos[ok]]
            bigger = v > top1
            top2 = np.where(bigger, top1, np.maximum(top2, v))
            arg1 = np.where(bigger, pos[:, None], arg1)
            top1 = np.where(bigger, v, top1)
        top2 = np.where(np.isfinite(top2), top2, 0.0)     # a block of one: nothing left
        sm = np.add.reduceat(B, self.starts, axis=0)
        cost = (top1 * top1 * sm).sum(1)                   # (nb,)
        pb = blk                                          # block of position p
        wo = np.where(arg1[pb] == np.arange(n)[:, None], top2[pb], top1[pb])   # max without p
        new_max = np.maximum(wo[:, None, :], A[None, :, :])                    # (p, q, F)
        new_sum = sm[pb][:, None, :] - B[:, None, :] + B[None, :, :]
        half = (new_max * new_max * new_sum).sum(2) - cost[pb][:, None]        # p's block
        D = half + half.T
        D[pb[:, None] == pb[None, :]] = 0.0
        return D


def layer_blocks(scorer, role: str, rows=None, cols=None) -> ChannelBlocks | None:
    """The ``ChannelBlocks`` of a ``LayerScorer`` for the group that permutes its output rows
    (``role="rows"``) or its input channels (``role="cols"``), with the other axis in the
    relative order ``cols`` / ``rows`` (None: as taken). None when the proxy cannot describe the
    layer (module docstring)."""
    W = np.abs(scorer.W)
    H = scorer.stats["H"]
    g = scorer.grid
    if H.ndim == 3 or g.groups != 1:
        return None
    h = np.diag(H).astype(np.float64)
    if rows is not None:
        W = W[rows]
    kk = scorer.kk
    if role == "rows":
        if cols is not None:
            cix = (np.asarray(cols)[:, None] * kk + np.arange(kk)).reshape(-1)
            W, h = W[:, cix], h[cix]
        cb = g.col_bounds()[:-1]
        a = np.maximum.reduceat(W, cb, axis=1)
        b = np.broadcast_to(np.add.reduceat(h, cb), a.shape)
        return ChannelBlocks(a, b, g.r)
    if g.c % kk:
        return None
    C = W.shape[1] // kk
    rb = g.row_block_starts()
    per_rb = np.maximum.reduceat(W, rb, axis=0)                  # (nrb, K)
    a = per_rb.reshape(len(rb), C, kk).max(2).T                    # (C, nrb)
    nrows = np.diff(np.append(rb, g.O))
    b = h.reshape(C, kk).sum(1)[:, None] * nrows[None, :]
    return ChannelBlocks(a, b, g.c // kk)


class ProxyScorer:
    """The segment proxy for one group's order, with the other groups at given orders."""

    def __init__(self, sc: SegmentScorer, group: str, orders: dict):
        self.parts = []                       # ChannelBlocks of the layers the proxy describes
        for s in sc.scorers:
            out_g, in_g = sc.out[s.name], sc.inp[s.name]
            if group not in (out_g, in_g) or out_g == in_g:
                continue
            if out_g == group:
                cb = layer_blocks(s, "rows", cols=sc.relative(orders, in_g))
            else:
                cb = layer_blocks(s, "cols", rows=sc.relative(orders, out_g))
            if cb is not None:
                self.parts.append(cb)
        self.base = np.argsort(sc.base[group])

    def rel(self, order: np.ndarray) -> np.ndarray:
        """The absolute order as positions of the statistics' order."""
        return self.base[order]

    def value(self, order: np.ndarray) -> float:
        r = self.rel(order)
        return sum(math.sqrt(max(p.energy(r), 0.0)) for p in self.parts)

    def descend(self, order: np.ndarray, max_steps: int) -> tuple[np.ndarray, float]:
        """Steepest descent over swaps from ``order`` (absolute). Returns (order, proxy)."""
        order = np.array(order)
        if not self.parts:
            return order, 0.0
        for _ in range(max_steps):
            r = self.rel(order)
            E = [p.energy(r) for p in self.parts]
            total = sum(math.sqrt(max(e, 0.0)) for e in E)
            gain = sum(np.sqrt(np.maximum(e + p.swap_deltas(r), 0.0))
                       for p, e in zip(self.parts, E)) - total
            q = int(np.argmin(gain))
            i, j = divmod(q, gain.shape[1])
            if not gain[i, j] < -REL_TOL * max(total, 1e-300):
                return order, total
            order[i], order[j] = order[j], order[i]
        return order, self.value(order)


def cluster_segment(sc: SegmentScorer, sizes: dict, base: dict, rng: np.random.Generator,
                    restarts: int = 4, passes: int = 2, keep: int = 3, measure=None) -> dict:
    """The ``cluster`` orders of one segment (module docstring). Returns best orders, real
    scores and counts, as ``evolve_segment`` does. ``measure(orders)``, when given, replaces
    the real score by ``-measure(orders)`` (``score: output``: the error after the segment)."""
    orders = {n: p.copy() for n, p in base.items()}
    candidates = []                           # (proxy, orders)
    for _ in range(passes):
        for g in sizes:
            if sizes[g] < 2:
                continue
            px = ProxyScorer(sc, g, orders)
            starts = [orders[g]] + [rng.permutation(sizes[g]) for _ in range(restarts)]
            found = [px.descend(s, 50 * sizes[g]) for s in starts]
            best = min(range(len(found)), key=lambda k: (found[k][1], k))
            for o, v in found:
                candidates.append((v, {**orders, g: o}))
            orders = {**orders, g: found[best][0]}
    candidates.append((-math.inf, orders))    # the joint result of the passes, always scored

    def real(o):
        return -measure(o) if measure is not None else sc.score(o)

    def key(o):
        return b"".join(o[n].tobytes() for n in sorted(o))

    identity_score = real(base)
    seen, scored = {key(base)}, []
    for v, o in sorted(candidates, key=lambda t: t[0]):
        if len(scored) >= keep:
            break
        if key(o) not in seen:
            seen.add(key(o))
            scored.append((real(o), o))
    best_score, best = max(scored, key=lambda t: t[0]) if scored else (identity_score, base)
    if not best_score > identity_score:
        best_score, best = identity_score, base
    return {"orders": {n: p.copy() for n, p in best.items()}, "score": best_score,
            "identity_score": identity_score, "history": [identity_score, best_score],
            "evaluations": 1 + len(scored)}
