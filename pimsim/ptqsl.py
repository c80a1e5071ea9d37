"""PTQ-SL calibration (Algorithm 1 of the paper) and the weight-only ``mse`` baseline.

Two calibration methods (registered under these names by ``pimsim.methods``; this module does
not import the registry):

``ptqsl``  (needs the float network's layer output ``Y*``)
    The per-layer pipeline of the paper, in the im2col view ``Y = W X + b`` (W is O x K,
    X is K x N with N = all output pixels of the calibration batch):

    1. search the activation scale ``s_x`` with float weights (only the input quantized);
    2. Algorithm 1: greedy coordinate descent over all tile scales ``s_ij`` with ``s_x`` fixed.
       Every tile starts from ``max|W_ij| / (2^(b-1)-1)``; its candidates are ``n`` values
       linear in ``[alpha * s_ij0, beta * s_ij0]``. Column blocks j are visited in order; for
       the Euclidean metric all row blocks i of column j are searched together (they touch
       disjoint output rows, so the error splits exactly over row blocks); for the cosine
       metric the row blocks of column j are visited one after the other (the global cosine
       couples them), each seeing the choices already written back. A tile keeps its current
       scale unless a candidate is better by more than a rounding-level tolerance (among
       candidates tied within it: the lowest index), so a round never increases the
       layer-output error. ``rounds`` rounds, stop early when nothing changes;
    3. search ``s_x`` again with the quantized weights fixed;
    4. if, against all odds, the result is worse on the layer objective than plain ``max``
       calibration, fall back to ``max`` (``info["fallback"]``).

    ``mode="gram"`` (default) evaluates the weight search on the quadratic form of the output
    error: with ``Xq`` fixed, ``H = Xq Xq^T`` (K x K) and ``G = (Y* - b) Xq^T`` (O x K) hold all
    that the search needs (plus ``Y* Xq^T``, ``Xq 1`` and the row sums of ``Y*`` for cosine),
    so the search never touches the N samples. ``mode="direct"`` evaluates Eq. 6 literally on
    the samples (``Y^ = W^ Xq + b`` in float64 per candidate) — slow, the reference of the tests.
    Both pick the same scales up to exact ties. ``H`` is accumulated exactly: integer-valued
    ``Q = round(X / s_x)`` products are summed in float32 over chunks short enough that every
    partial sum is an integer below 2^24, the chunks in float64.

    The activation searches evaluate the real layer output (the fake-quant path of
    ``GemmLayer``: float32 conv of the dequantized input, float64 sums) — one convolution per
    candidate; the scale is kept unless a candidate is strictly better. Candidates: n values
    linear in ``[alpha, beta] * max|x| / (2^(a-1)-1)``. ``act_search="golden"`` (default) runs
    a golden-section search over the candidate indices (about 12 convolutions instead of n;
    exact when the error is unimodal over the grid) and keeps the best point it evaluated.
    On ResNet-20 it hits the grid's argmin in 29 of 36 searches and is otherwise within 4e-3
    (float weights) / 2e-4 (4-bit weights, where the curve is flat and jagged) relative error
    of it. ``act_search="grid"`` evaluates all n candidates (~3x the calibration time).

``mse``  (data-free weights)
    Per tile, the candidate of the same grid (or the ``max`` init, which wins ties) minimizing
    ``||W_ij - W^_ij||^2``; activation scale by ``max`` calibration.

Parameters (``params`` dict; YAML ``quant.search.*`` and ``quant.metric``): see ``SearchParams``
(``DEFAULTS`` is its defaults as a dict).
``symmetric`` (set by ``calibrate(symmetric=True)``, which ``pimsim run`` uses when the config
has a ``crossbar:`` section): weights and inputs are searched, and quantized, in the symmetric
range ``[-(2^(b-1)-1), 2^(b-1)-1]`` that crossbar arrays store, so the scales are chosen for the
integers the arrays will hold.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .kernels import fake_quant_act, im2col_rows, sq_diff_sum
from .network import GemmLayer, LayerQuant
from .quant import (Granularity, TileGrid, act_max_scale, act_qrange, max_scales,
                    qrange, quantize_weight)
from .schema import defaults_of, setting


@dataclass(frozen=True)
class SearchParams:
    """The parameters of ``ptqsl`` / ``mse`` and their defaults (``DEFAULTS``; checked together
    by ``check_params``). All but ``metric``, ``symmetric`` and ``act_unsigned`` are the YAML
    keys ``quant.search.*``; ``metric`` is ``quant.metric``; ``symmetric`` follows from a
    ``crossbar:`` section; ``act_unsigned`` from ``quant.act_signed`` and the layer's input."""

    alpha: float = setting(0.5, "lowest candidate, times the max-calibration init")
    beta: float = setting(1.2, "highest candidate, times the init")
    candidates: int = setting(100, "n candidates, linear in [alpha, beta] * init")
    rounds: int = setting(3, "rounds of Algorithm 1 (early stop when nothing changes)")
    mode: str = setting("gram", "gram (error from Gram matrices) | direct (Eq. 6 on the "
                        "samples)")
    metric: str = setting("euclidean", "euclidean | cosine: the objective of Eq. 6")
    act_search: str = setting("golden", "golden | grid (activation-scale search)")
    alternate: int = setting(1, "rounds of {Algorithm 1, activation search}: 1 = the paper's "
                             "pipeline; more: repeat both (Algorithm 1 from the current scales) "
                             "until neither changes")
    start: str = setting("act", "act: step 1 searches s_x with float weights (the paper); "
                         "max: Algorithm 1 first, at the max-calibrated s_x (PTQ4ViT's order); "
                         "best: run both, keep the lower layer-output error")
    extend: float | None = setting(None, "null, or a factor below alpha: after the pipeline, "
                                   "one more {Algorithm 1, activation search} from its result "
                                   "with the candidates extended down to extend x init at "
                                   "the same spacing (never worse: the old candidates stay)")
    symmetric: bool = setting(False, "integers in [-(2^(b-1)-1), 2^(b-1)-1] (crossbar storage)")
    act_unsigned: bool = setting(False, "activations in [0, 2^b - 1] (set per layer by "
                                 "pimsim.calibrate from quant.act_signed)")


DEFAULTS = defaults_of(SearchParams)
MODES = ("gram", "direct")
METRICS = ("euclidean", "cosine")
ACT_SEARCHES = ("golden", "grid")
STARTS = ("act", "max", "best")

TOL_EUCLID = 1e-11          # numerical ties, relative to the row block's output energy
TOL_COSINE = 1e-12          # numerical ties of 1 - cos
_CHUNK = 1 << 22            # elements per candidate chunk (float64 temporaries of ~32 MB)


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------

def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


def _whole(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def check_params(params: dict | None) -> dict:
    """``params`` merged onto ``DEFAULTS`` and validated; ValueError names the bad key."""
    p = dict(DEFAULTS)
    for k, v in (params or {}).items():
        if k not in DEFAULTS:
            raise ValueError(f"unknown PTQ-SL parameter {k!r}; allowed: {', '.join(DEFAULTS)}")
        p[k] = v
    for k in ("alpha", "beta"):
        if not _number(p[k]) or not math.isfinite(p[k]) or p[k] <= 0:
            raise ValueError(f"{k} must be a finite number > 0, got {p[k]!r}")
        p[k] = float(p[k])
    if p["beta"] < p["alpha"]:
        raise ValueError(f"beta must be >= alpha, got alpha={p['alpha']}, beta={p['beta']}")
    if not _whole(p["candidates"]) or not 1 <= p["candidates"] <= 100000:
        raise ValueError(f"candidates must be an integer in 1..100000, got {p['candidates']!r}")
    for k in ("rounds", "alternate"):
        if not _whole(p[k]) or not 1 <= p[k] <= 1000:
            raise ValueError(f"{k} must be an integer in 1..1000, got {p[k]!r}")
    p["candidates"], p["rounds"], p["alternate"] = (int(p["candidates"]), int(p["rounds"]),
                                                    int(p["alternate"]))
    if p["extend"] is not None:
        e = p["extend"]
        if not _number(e) or not math.isfinite(e) or not 0 < e < p["alpha"]:
            raise ValueError(f"extend must be null or a number in (0, alpha = {p['alpha']}), "
                             f"got {e!r}")
        p["extend"] = float(e)
    for k in ("symmetric", "act_unsigned"):
        if not isinstance(p[k], (bool, np.bool_)):
            raise ValueError(f"{k} must be true or false, got {p[k]!r}")
        p[k] = bool(p[k])
    for k, allowed in (("mode", MODES), ("metric", METRICS), ("act_search", ACT_SEARCHES),
                       ("start", STARTS)):
        if p[k] not in allowed:
            raise ValueError(f"{k} must be one of {', '.join(allowed)}, got {p[k]!r}")
    return p


def candidate_factors(p: dict) -> np.ndarray:
    """The n multipliers of the init scale: linear in [alpha, beta] (float64)."""
    return np.linspace(p["alpha"], p["beta"], p["candidates"], dtype=np.float64)


def extended_factors(p: dict) -> np.ndarray:
    """``candidate_factors(p)`` with more factors below ``alpha`` down to ``p["extend"]`` at the
    grid's own spacing (the old factors kept bit for bit, ascending)."""
    f = candidate_factors(p)
    if p["extend"] is None:
        return f
    step = (p["beta"] - p["alpha"]) / (len(f) - 1) if len(f) > 1 else p["alpha"] - p["extend"]
    n_ext = int(math.ceil((p["alpha"] - p["extend"]) / step - 1e-9))
    low = p["alpha"] - step * np.arange(n_ext, 0, -1, dtype=np.float64)
    low[0] = max(low[0], p["extend"])
    return np.concatenate([low[low >= p["extend"] * (1 - 1e-12)], f])


# --------------------------------------------------------------------------------------------
# one layer on the calibration batch
# --------------------------------------------------------------------------------------------

def _exact_f32_columns(a_bits: int, unsigned: bool = False) -> int:
    """Columns per float32 GEMM of ``Q Q^T`` such that every partial sum is an integer of
    magnitude at most 2^24, hence exact (|q| <= 2^(a-1); unsigned: q < 2^a); 0: too few, use
    float64."""
    return (1 << 24) // (1 << (2 * (a_bits if unsigned else a_bits - 1)))


class LayerProblem:
    """A layer, its calibration input ``x`` and float target ``Y*``: outputs, metrics and the
    im2col statistics the weight search needs."""

    conv_rows = True    # convs: statistics from im2col rows (False: the column path, the tests' reference)

    def __init__(self, layer: GemmLayer, x: torch.Tensor, target: torch.Tensor, a_bits: int,
                 symmetric: bool = False, unsigned: bool = False):
        self.layer = layer
        fmt = torch.channels_last if layer.kind == "conv" else torch.contiguous_format
        # channels-last: the oneDNN convolution of the activation search is ~3x faster
        self.x = x.detach().to(torch.float32).contiguous(memory_format=fmt)
        self.target = target.detach().to(torch.float32).contiguous(memory_format=fmt)
        self.a_bits = a_bits
        self.unsigned = bool(unsigned)
        self.lo, self.hi = act_qrange(a_bits, symmetric, self.unsigned)
        self.O, self.K = layer.O, layer.K
        self.groups, self.K_in = layer.groups, layer.K_in
        b = layer.bias
        self.bias = (b.detach().to(torch.float64).numpy() if b is not None
                     else np.zeros(self.O, dtype=np.float64))
        t64 = self.target.reshape(-1).to(torch.float64)
        self.t2 = float(torch.dot(t64, t64))
        self.x_absmax = float(self.x.abs().max())

    # -- the real layer output -----------------------------------------------------------------
    def quantize_input(self, s: float) -> torch.Tensor:
        """``clamp(round(x / s))`` exactly as ``GemmLayer.quantize_input`` computes it."""
        return torch.div(self.x, s).round_().clamp_(self.lo, self.hi)

    def output(self, w: np.ndarray, s: float) -> torch.Tensor:
        """Layer output with O x K weights ``w`` and input quantized with scale ``s`` (the
        fake-quant path: float32 operands, as ``GemmLayer.fake_forward``)."""
        xin = fake_quant_act(self.x, s, self.lo, self.hi)        # one pass, same values
        wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        wt = wt.reshape(self.layer.weight.shape)
        if self.layer.kind == "conv":
            wt = wt.contiguous(memory_format=torch.channels_last)
        return self.layer.float_forward(xin, wt)

    def metric(self, y: torch.Tensor, metric: str) -> float:
        """Eq. 6 between ``Y*`` and ``y``: ``||Y* - y||`` or ``1 - cos(Y*, y)`` (float64 sums)."""
        if y.layout == torch.strided and y.dim() == 4:
            y = y.contiguous(memory_format=torch.channels_last)
        if metric == "euclidean":
            return math.sqrt(sq_diff_sum(self.target, y))
        t64, y64 = self.target.to(torch.float64), y.to(torch.float64)
        dot = float(torch.sum(t64 * y64))
        return _one_minus_cos(dot, float(torch.sum(y64 * y64)), self.t2)

    def error(self, w: np.ndarray, s: float, metric: str) -> float:
        return self.metric(self.output(w, s), metric)

    # -- im2col view ---------------------------------------------------------------------------
    def columns(self, q: torch.Tensor, b0: int, b1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Xc, Tc)``: the K_in x M im2col columns of images ``b0:b1`` of ``q`` and the O x M
        target columns (float32), columns in (image, output pixel) order (a grouped layer's
        group g reads rows ``g*K .. (g+1)*K``).

        Same columns as ``GemmLayer.im2col`` (``F.unfold``), built from strided views of the
        padded input: ~10x faster than this torch's ``F.unfold`` on CPU.
        """
        l = self.layer
        if l.kind == "linear":                   # B x F or B x T x F: one column per position
            return (q[b0:b1].reshape(-1, self.K).t(),
                    self.target[b0:b1].reshape(-1, self.O).t())
        qc = q[b0:b1].permute(1, 0, 2, 3)                    # C x b x H x W
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = l.kernel_size, l.stride, l.padding, l.dilation
        Ho, Wo = l.out_hw(q.shape[2], q.shape[3])
        xp = F.pad(qc, (pw, pw, ph, ph)) if ph or pw else qc
        views = [xp[:, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]
                 for i in range(kh) for j in range(kw)]
        X = torch.stack(views, 1).reshape(self.K_in, -1)
        T = self.target[b0:b1].permute(1, 0, 2, 3).reshape(self.O, -1)
        return X, T

    def _chunks(self, q: torch.Tensor, elements: int):
        """``columns`` of successive image chunks of about ``elements`` im2col entries."""
        B = q.shape[0]
        if self.layer.kind == "linear":
            per_image = q[0].numel()
        else:
            ho, wo = self.layer.out_hw(q.shape[2], q.shape[3])
            per_image = self.K_in * ho * wo
        step = max(1, min(B, elements // per_image))
        for b0 in range(0, B, step):
            yield self.columns(q, b0, min(B, b0 + step))

    def gram_stats(self, s: float) -> dict:
        """H = Xq Xq^T, Gs = Y* Xq^T, u = Xq 1, ys = Y* 1, yy = rowwise ||Y*||^2 (float64) for
        ``Xq = s * Q``. Grouped layer (``groups`` g > 1): per group, ``H`` (g, K, K) of the
        group's own input rows, ``u`` (g, K), ``Gs`` (O x K) row o against its group's input;
        the dict then has ``groups = g``."""
        if self.groups > 1:
            return self._gram_stats_grouped(s)
        if self.layer.kind == "conv" and self.conv_rows:
            return self._gram_stats_conv(s)
        q = self.quantize_input(s)
        K, O = self.K, self.O
        H = torch.zeros(K, K, dtype=torch.float64)
        Gs = torch.zeros(O, K, dtype=torch.float64)
        u = torch.zeros(K, dtype=torch.float64)
        ys = torch.zeros(O, dtype=torch.float64)
        yy = torch.zeros(O, dtype=torch.float64)
        step = _exact_f32_columns(self.a_bits, self.unsigned)
        n_cols = 0
        for X, T in self._chunks(q, 1 << 21):               # ~8 MB float32 chunks
            M = X.shape[1]
            n_cols += M
            X64 = X.to(torch.float64)
            if step >= 1:           # integer partial sums <= 2^24 per GEMM: exact in float32
                full = M // step
                if full:
                    Xv = X[:, :full * step].reshape(K, full, step).permute(1, 0, 2)
                    H += torch.bmm(Xv, Xv.transpose(1, 2)).sum(0, dtype=torch.float64)
                if full * step < M:
                    Xr = X[:, full * step:]
                    H += (Xr @ Xr.t()).to(torch.float64)
            else:
                H += X64 @ X64.t()
            T64 = T.to(torch.float64)
            Gs += T64 @ X64.t()
            u += X64.sum(1)
            ys += T64.sum(1)
            yy += (T64 * T64).sum(1)
        return {"H": (H * (s * s)).numpy(), "Gs": (Gs * s).numpy(), "u": (u * s).numpy(),
                "ys": ys.numpy(), "yy": yy.numpy(), "N": n_cols}

    def _gram_stats_conv(self, s: float) -> dict:
        """``gram_stats`` of an ungrouped convolution from the pixel-major im2col rows
        ``R = X^T`` of ``kernels.im2col_rows`` (Numba) and the channels-last target read as
        rows ``T^T`` without a copy: the same statistics (H and u exact integer sums, as in the
        column path; Gs, ys, yy float64 products and sums of the same terms)."""
        q = self.quantize_input(s)
        l = self.layer
        xh = q.permute(0, 2, 3, 1).numpy()
        if not xh.flags.c_contiguous:
            xh = np.ascontiguousarray(xh)
        B, Hh, Ww, _ = xh.shape
        ho, wo = l.out_hw(Hh, Ww)
        P = ho * wo
        K, O = self.K, self.O
        geom = (tuple(l.kernel_size), tuple(l.stride), tuple(l.padding), tuple(l.dilation))
        H = torch.zeros(K, K, dtype=torch.float64)
        Gs = torch.zeros(O, K, dtype=torch.float64)
        u = torch.zeros(K, dtype=torch.float64)
        ys = torch.zeros(O, dtype=torch.float64)
        yy = torch.zeros(O, dtype=torch.float64)
        step = _exact_f32_columns(self.a_bits, self.unsigned)
        per = max(1, min(B, (1 << 21) // (K * P)))          # ~8 MB float32 chunks
        # buffers reused across chunks: a fresh allocation per chunk (page faults) cost more
        # than the conversions themselves
        buf = np.empty((per * P, K), dtype=np.float32)
        buf64 = torch.empty(per * P, K, dtype=torch.float64)
        tbuf64 = torch.empty(per * P, O, dtype=torch.float64)
        ones = torch.ones(per * P, dtype=torch.float64)
        tgt = self.target.permute(0, 2, 3, 1)                 # B x ho x wo x O
        for b0 in range(0, B, per):
            b1 = min(B, b0 + per)
            M = (b1 - b0) * P
            im2col_rows(xh, geom, b0 * P, buf[:M])
            Rt = torch.from_numpy(buf[:M])
            R64 = buf64[:M].copy_(Rt)
            if step >= 1:           # integer partial sums <= 2^24 per GEMM: exact in float32
                full = M // step
                if full:
                    Rv = Rt[:full * step].reshape(full, step, K)
                    H += torch.bmm(Rv.transpose(1, 2), Rv).sum(0, dtype=torch.float64)
                if full * step < M:
                    Rr = Rt[full * step:]
                    H += (Rr.t() @ Rr).to(torch.float64)
            else:
                H += R64.t() @ R64
            T64 = tbuf64[:M].copy_(tgt[b0:b1].reshape(M, O))
            Gs += T64.t() @ R64
            u += torch.mv(R64.t(), ones[:M])                  # integer sums: exact, any order
            ys += T64.sum(0)
            yy += (T64 * T64).sum(0)
        return {"H": (H * (s * s)).numpy(), "Gs": (Gs * s).numpy(), "u": (u * s).numpy(),
                "ys": ys.numpy(), "yy": yy.numpy(), "N": B * P}

    def _gram_stats_grouped(self, s: float) -> dict:
        q = self.quantize_input(s)
        g, K, O = self.groups, self.K, self.O
        Og = O // g
        H = torch.zeros(g, K, K, dtype=torch.float64)
        Gs = torch.zeros(g, Og, K, dtype=torch.float64)
        u = torch.zeros(g, K, dtype=torch.float64)
        ys = torch.zeros(O, dtype=torch.float64)
        yy = torch.zeros(O, dtype=torch.float64)
        step = _exact_f32_columns(self.a_bits, self.unsigned)
        n_cols = 0
        for X, T in self._chunks(q, 1 << 21):
            M = X.shape[1]
            n_cols += M
            Xg = X.reshape(g, K, M)
            X64 = Xg.to(torch.float64)
            if step >= 1:           # integer partial sums <= 2^24 per GEMM: exact in float32
                for m0 in range(0, M, step):
                    Xs = Xg[:, :, m0:m0 + step]
                    H += torch.bmm(Xs, Xs.transpose(1, 2)).to(torch.float64)
            else:
                H += torch.bmm(X64, X64.transpose(1, 2))
            T64 = T.to(torch.float64)
            Gs += torch.bmm(T64.reshape(g, Og, M), X64.transpose(1, 2))
            u += X64.sum(2)
            ys += T64.sum(1)
            yy += (T64 * T64).sum(1)
        return {"H": (H * (s * s)).numpy(), "Gs": (Gs * s).reshape(O, K).numpy(),
                "u": (u * s).numpy(), "ys": ys.numpy(), "yy": yy.numpy(), "N": n_cols,
                "groups": g}

    def direct_data(self, s: float) -> tuple[np.ndarray, np.ndarray]:
        """``Xq = s * Q`` (K x N; grouped: (g, K, N), each group's input rows) and ``Y*``
        (O x N) in float64, columns in (image, pixel) order."""
        X, T = self.columns(self.quantize_input(s), 0, self.x.shape[0])
        X = X.to(torch.float64) * s
        if self.groups > 1:
            X = X.reshape(self.groups, self.K, -1)
        return X.numpy(), T.to(torch.float64).numpy()


def _one_minus_cos(dot, nrm2, t2):
    """``1 - dot / sqrt(nrm2 * t2)`` elementwise; 1 where the norm is 0 (cosine undefined)."""
    dot, nrm2 = np.asarray(dot, dtype=np.float64), np.asarray(nrm2, dtype=np.float64)
    den = np.sqrt(np.maximum(nrm2, 0.0) * t2)
    out = np.ones(np.broadcast(dot, den).shape)
    ok = den > 0
    np.divide(dot, den, out=out, where=ok)
    out = np.where(ok, 1.0 - out, 1.0)
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------
# activation-scale search
# --------------------------------------------------------------------------------------------

def search_act_scale(prob: LayerProblem, w: np.ndarray, grid: np.ndarray, current: float,
                     metric: str, how: str) -> tuple[float, float, int]:
    """Best input scale for weights ``w`` among ``grid`` (n scales, ascending), keeping
    ``current`` unless a candidate is strictly better. Returns (scale, metric, evaluations)."""
    memo: dict[int, float] = {}

    def f(i):
        if i not in memo:
            memo[i] = prob.error(w, float(grid[i]), metric)
        return memo[i]

    n = len(grid)
    if how == "grid":
        for i in range(n):
            f(i)
    else:
        lo, hi = 0, n - 1
        while hi - lo > 2:
            d = max(1, int(round((hi - lo) * 0.3819660112501051)))
            m1, m2 = lo + d, hi - d
            if m2 <= m1:
                m2 = m1 + 1
            if f(m1) <= f(m2):
                hi = m2
            else:
                lo = m1
        for i in range(lo, hi + 1):
            f(i)
    f_cur = prob.error(w, current, metric)
    best = min(memo, key=lambda i: (memo[i], i))
    evals = len(memo) + 1
    if memo[best] < f_cur:
        return float(grid[best]), memo[best], evals
    return float(current), f_cur, evals


# --------------------------------------------------------------------------------------------
# Algorithm 1
# --------------------------------------------------------------------------------------------

def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 matrix product through torch (one thread pool: ``torch.set_num_threads``)."""
    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


def group_matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B`` where the last-but-one axis of A (O rows) is cut into the groups of B:
    ``B`` (k, n) is one matrix for all rows (plain ``_mm`` of 2-D operands); ``B`` (g, k, n)
    multiplies row block g of A (O/g rows each) with ``B[g]``. A may have a leading stack axis
    (m, O, k). float64 through torch."""
    if B.ndim == 2 and A.ndim == 2:
        return _mm(A, B)
    if B.ndim == 2:
        return (torch.from_numpy(np.ascontiguousarray(A)) @ torch.from_numpy(
            np.ascontiguousarray(B))).numpy()
    g = B.shape[0]
    lead, (O, k) = A.shape[:-2], A.shape[-2:]
    a = torch.from_numpy(np.ascontiguousarray(A)).reshape(*lead, g, O // g, k)
    y = a @ torch.from_numpy(np.ascontiguousarray(B))
    return y.reshape(*lead, O, B.shape[-1]).numpy()


def group_rows_of(v: np.ndarray, O: int) -> np.ndarray:
    """A per-group vector ``v`` (g, k) as one row per output row (O, k); (k,) stays (k,)."""
    return v if v.ndim == 1 else np.repeat(v, O // v.shape[0], axis=0)


class GramEval:
    """The evaluator of ``algorithm1`` on Gram statistics (``LayerProblem.gram_stats``: ``H``,
    ``Gs``, ``u``, ``ys``, ``yy``, ``N``) and the bias: per-candidate error terms of one column
    block from ``H``, ``G``, never touching the samples. ``pimsim.reorder`` runs it on permuted
    statistics to score channel orders."""

    def __init__(self, st: dict, bias: np.ndarray, metric: str):
        self.H, self.Gs, self.u, self.ys, self.N = st["H"], st["Gs"], st["u"], st["ys"], st["N"]
        self.yy = st["yy"]
        self.b = bias
        # grouped layer: H (g, K, K), u (g, K) per group; urow = u of every row's group
        self.grouped = self.H.ndim == 3
        self.urow = group_rows_of(self.u, len(bias))
        if self.grouped:
            self.G = self.Gs - bias[:, None] * self.urow
        else:
            self.G = self.Gs - np.outer(bias, self.u)       # (Y* - b 1^T) Xq^T
        self.metric = metric
        self.HW = None

    def start_round(self, What):
        self.HW = group_matmul(What, self.H)

    def update(self, cs, dz):
        """``What[:, cs]`` changed by ``dz``: keep the cached ``What H`` in step."""
        self.HW += group_matmul(dz, self.H[..., cs, :])

    def energy(self, What):
        """Per row: ||y*_o - b_o||^2 + ||w^_o Xq||^2 (the scale of the rounding noise)."""
        r2 = self.yy - 2 * self.b * self.ys + self.N * self.b * self.b
        return r2 + (What * group_matmul(What, self.H)).sum(1)

    def totals(self, What):
        """(<Y*, Y^>, ||Y^||^2) of the current weights (cosine)."""
        A = float((What * self.Gs).sum() + (self.b * self.ys).sum())
        Nn = float((What * self.HW).sum() + 2 * (self.b * (What * self.urow).sum(1)).sum()
                   + self.N * (self.b * self.b).sum())
        return A, Nn

    def _terms(self, cs, Z, zc, rows_to_rb):
        """Row values of the z-dependent parts for all candidates Z (m x O x c)."""
        Hjj = self.H[..., cs, cs]
        rest = self.HW[:, cs] - group_matmul(zc, Hjj)          # (H_{j,-j} w_{-j}) per row
        m, O, c = Z.shape
        step = max(1, _CHUNK // max(1, O * c))
        quad = np.empty((m, O))
        for t0 in range(0, m, step):
            Zt = Z[t0:t0 + step]
            if self.grouped:
                quad[t0:t0 + step] = (group_matmul(Zt, Hjj) * Zt).sum(-1)
            else:
                quad[t0:t0 + step] = (_mm(Zt.reshape(-1, c), Hjj).reshape(Zt.shape) * Zt).sum(-1)
        if self.metric == "euclidean":
            f = quad - 2.0 * (Z * (self.G[:, cs] - rest)).sum(-1)
            return (rows_to_rb(f),)
        pa = (Z * self.Gs[:, cs]).sum(-1)
        ub = (self.b[:, None] * self.urow[:, cs]) if self.grouped else np.outer(self.b, self.u[cs])
        pn = quad + 2.0 * (Z * (rest + ub)).sum(-1)
        return rows_to_rb(pa), rows_to_rb(pn)

    def euclid(self, cs, Z, zc, rows_to_rb):
        return self._terms(cs, Z, zc, rows_to_rb)[0]

    def cosine(self, cs, Z, zc, rows_to_rb):
        return self._terms(cs, Z, zc, rows_to_rb)


class DirectEval:
    """The evaluator of ``algorithm1`` on the samples (Eq. 6 literally, ``mode="direct"``):
    per-candidate error terms of one column block from ``Xq`` and ``Y*`` (``Xq`` K x N, or
    (g, K, N) per group for a grouped layer: row block g of W times ``Xq[g]``)."""

    def __init__(self, Xq: np.ndarray, Y: np.ndarray, bias: np.ndarray, metric: str):
        self.Xq, self.Y, self.b, self.metric = Xq, Y, bias, metric
        self.What = None

    def start_round(self, What):
        self.What = What

    def update(self, cs, dz):
        pass                                            # What is shared with the search

    def _mul(self, A, X):
        return A @ X if X.ndim == 2 else group_matmul(A, X)

    def energy(self, What):
        R = self.Y - self.b[:, None]
        P = self._mul(What, self.Xq)
        return (R * R).sum(1) + (P * P).sum(1)

    def totals(self, What):
        Yh = self._mul(What, self.Xq) + self.b[:, None]
        return float((self.Y * Yh).sum()), float((Yh * Yh).sum())

    def _base(self, cs, zc):                                   # block j removed
        return (self._mul(self.What, self.Xq) - self._mul(zc, self.Xq[..., cs, :])
                + self.b[:, None])

    def euclid(self, cs, Z, zc, rows_to_rb):
        base = self._base(cs, zc)
        Xj = self.Xq[..., cs, :]
        out = []
        for t in range(Z.shape[0]):
            e = self.Y - (base + self._mul(Z[t], Xj))
            out.append(rows_to_rb((e * e).sum(1)[None])[0])
        return np.stack(out)

    def cosine(self, cs, Z, zc, rows_to_rb):
        base = self._base(cs, zc)
        Xj = self.Xq[..., cs, :]
        pa, pn = [], []
        for t in range(Z.shape[0]):
            Yh = base + self._mul(Z[t], Xj)
            pa.append(rows_to_rb((self.Y * Yh).sum(1)[None])[0])
            pn.append(rows_to_rb((Yh * Yh).sum(1)[None])[0])
        return np.stack(pa), np.stack(pn)


def fake_quant(w, s, lo, hi):
    """Dequantized weights ``s * clamp(round(w / s), lo, hi)`` (element-wise scales ``s``, e.g.
    ``TileGrid.expand``; float64 division, half to even as ``pimsim.quant.quantize``)."""
    return s * np.clip(np.rint(w / s), lo, hi)


def _pick(vals: np.ndarray, cur: np.ndarray, tol):
    """Per column of ``vals`` (candidates x blocks): the lowest candidate index within ``tol``
    of the minimum, and whether that minimum beats ``cur`` by more than ``tol``."""
    fmin = vals.min(0)
    best = np.argmax(vals <= fmin + tol, axis=0)
    return best, fmin < cur - tol


def algorithm1(W: np.ndarray, grid: TileGrid, w_bits: int, factors: np.ndarray, rounds: int,
               evaluator, metric: str, t2: float = 1.0,
               symmetric: bool = False, S_init: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Greedy coordinate descent over the tile scales of the O x K matrix ``W``.

    ``evaluator`` gives, for the candidates of one column block, per-row-block error terms
    (``GramEval`` or ``DirectEval``). Returns (scales, info). ``symmetric``: integers in
    ``[-(2^(b-1)-1), 2^(b-1)-1]``. ``S_init``: the scales to start from (default: the max
    init); the candidates stay anchored at the max init either way.

    Ties: a tile moves only to a candidate better than its current scale by more than the
    tolerance; among candidates within the tolerance of the best, the lowest index wins.
    Tolerances: ``TOL_EUCLID`` x (||Y*_i - b||^2 + ||W^_i Xq||^2 of the row block) for the
    Euclidean metric, ``TOL_COSINE`` on ``1 - cos``. They absorb float rounding (relative
    1e-13 or less) so that gram and direct mode — whose sums round differently — make the
    same choices even when two candidates tie exactly in exact arithmetic (a 1-element tile
    with ``q * s`` equal for two candidates, an all-zero input feature, ...).
    """
    W = np.asarray(W, dtype=np.float64)
    lo, hi = qrange(w_bits, symmetric)
    S0 = max_scales(W, grid, w_bits)
    cands = factors[:, None, None] * S0[None]               # (n, nrb, ncb)
    n = len(factors)
    S = S0.copy() if S_init is None else np.array(S_init, dtype=np.float64)
    # index of the current scale in the candidate list; -1 = the init (not on the grid)
    match = cands == S[None]
    cur_idx = np.where(match.any(0), match.argmax(0), -1)
    rb_of_row = grid.row_block_index()
    rb_starts = grid.row_block_starts()
    nrb = grid.n_row_blocks

    def rows_to_rb(v):
        return np.add.reduceat(v, rb_starts, axis=1)

    What = fake_quant(W, grid.expand(S), lo, hi)
    # numerical ties: errors closer than TOL_EUCLID x the row block's output energy
    tol = TOL_EUCLID * rows_to_rb(evaluator.energy(What)[None])[0]
    changes = []
    for _ in range(rounds):
        changed = 0
        evaluator.start_round(What)
        for j in range(grid.n_col_blocks):
            cs = grid.col_slice(j)
            Wj = W[:, cs]
            zc = What[:, cs].copy()
            St = cands[:, rb_of_row, j][:, :, None]          # (n, O, 1)
            Z = np.concatenate([fake_quant(Wj[None], St, lo, hi), zc[None]])   # current last
            ci = np.where(cur_idx[:, j] >= 0, cur_idx[:, j], n)          # (nrb,)
            if metric == "euclidean":
                Fv = evaluator.euclid(cs, Z, zc, rows_to_rb)           # (n + 1, nrb)
                best, take = _pick(Fv[:n], Fv[ci, np.arange(nrb)], tol)
            else:
                A, Nn = evaluator.totals(What)
                pa, pn = evaluator.cosine(cs, Z, zc, rows_to_rb)
                best = np.zeros(nrb, dtype=np.int64)
                take = np.zeros(nrb, dtype=bool)
                for i in range(nrb):                         # sequential: cosine couples them
                    c = ci[i]
                    At = A + (pa[:, i] - pa[c, i])
                    Nt = Nn + (pn[:, i] - pn[c, i])
                    m = _one_minus_cos(At, Nt, t2)
                    b_, t_ = _pick(m[:n, None], m[c:c + 1], TOL_COSINE)
                    best[i], take[i] = b_[0], t_[0]
                    if take[i]:
                        A, Nn = At[best[i]], Nt[best[i]]
            if take.any():
                rows = take[rb_of_row]
                What[rows, cs] = Z[best[rb_of_row], np.arange(grid.O)][rows]
                S[take, j] = cands[best[take], np.nonzero(take)[0], j]
                cur_idx[take, j] = best[take]
                changed += int(take.sum())
                evaluator.update(cs, What[:, cs] - zc)
        changes.append(changed)
        if changed == 0:
            break
    return S, {"rounds": len(changes), "changes": changes}


# --------------------------------------------------------------------------------------------
# calibration methods
# --------------------------------------------------------------------------------------------

def _dequant(W, grid, S, bits, symmetric: bool = False):
    """Dequantized weights exactly as ``GemmLayer.set_quant`` forms them (float32)."""
    return (quantize_weight(W, grid, S, bits, symmetric).astype(np.float32)
            * grid.expand(S).astype(np.float32))


def ptqsl_method(layer: GemmLayer, x: torch.Tensor, target, gran: Granularity, w_bits: int,
                 a_bits: int, params: dict) -> LayerQuant:
    """PTQ-SL per-layer pipeline (see the module docstring). ``start="best"`` runs the
    pipeline from both starts (``act`` and ``max``) and keeps the result with the lower
    layer-output error (``act`` on a tie), so it is never worse than either."""
    if target is None:
        raise ValueError(f"layer {layer.name}: ptqsl needs the float network's layer output")
    p = check_params(params)
    if p["start"] != "best":
        return _ptqsl_pipeline(layer, x, target, gran, w_bits, a_bits, p)
    t0 = time.perf_counter()
    qa = _ptqsl_pipeline(layer, x, target, gran, w_bits, a_bits, {**p, "start": "act"})
    qm = _ptqsl_pipeline(layer, x, target, gran, w_bits, a_bits, {**p, "start": "max"})
    q = qm if qm.info["err"] < qa.info["err"] else qa
    q.info.update(start="best", start_chosen=q.info["start"], err_start_act=qa.info["err"],
                  err_start_max=qm.info["err"], seconds=time.perf_counter() - t0)
    return q


def _ptqsl_pipeline(layer, x, target, gran, w_bits, a_bits, p) -> LayerQuant:
    metric, t_start = p["metric"], time.perf_counter()
    grid = gran.resolve(layer.O, layer.K, layer.groups)
    sym, uns = p["symmetric"], p["act_unsigned"]
    prob = LayerProblem(layer, x, target, a_bits, sym, uns)
    W32 = layer.weight_matrix()
    W = W32.astype(np.float64)
    factors = candidate_factors(p)
    s_max = float(act_max_scale(prob.x_absmax, a_bits, uns))
    act_grid = factors * s_max
    S_max = max_scales(W, grid, w_bits)
    W_max = _dequant(W, grid, S_max, w_bits, sym)
    times = {}

    # 1. activation scale with float weights (start "max": skipped, Algorithm 1 first at s_max)
    t0 = time.perf_counter()
    if p["start"] == "max":
        s1, e1, ev1 = s_max, prob.error(W32, s_max, metric), 1
    else:
        s1, e1, ev1 = search_act_scale(prob, W32, act_grid, s_max, metric, p["act_search"])
    times["act1_s"] = time.perf_counter() - t0

    # 2. Algorithm 1 with s_x = s1 fixed; 3. activation scale again with the quantized weights;
    # alternate > 1: repeat 2 (from the current scales) and 3 until neither changes
    s3, S, errs, rounds_done, changes, ev3 = s1, None, [], 0, [], 0
    times.update(stats_s=0.0, search_s=0.0, act2_s=0.0)
    for _ in range(p["alternate"]):
        t0 = time.perf_counter()
        if p["mode"] == "gram":
            ev = GramEval(prob.gram_stats(s3), prob.bias, metric)
        else:
            Xq, Y = prob.direct_data(s3)
            ev = DirectEval(Xq, Y, prob.bias, metric)
        times["stats_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        S_new, ainfo = algorithm1(W, grid, w_bits, factors, p["rounds"], ev, metric, prob.t2,
                                  sym, S_init=S)
        times["search_s"] += time.perf_counter() - t0
        rounds_done += ainfo["rounds"]
        changes += ainfo["changes"]
        W_hat = _dequant(W, grid, S_new, w_bits, sym)
        t0 = time.perf_counter()
        s_new, e3, n_ev = search_act_scale(prob, W_hat, act_grid, s3, metric, p["act_search"])
        ev3 += n_ev
        times["act2_s"] += time.perf_counter() - t0
        errs.append(e3)
        same = S is not None and np.array_equal(S_new, S) and s_new == s3
        S, s3 = S_new, s_new
        if same:
            break

    # extend: one more Algorithm 1 and activation search from the result, on the extended
    # candidates (the result's own scales among them, so neither step can make it worse)
    if p["extend"] is not None:
        f_ext = extended_factors(p)
        t0 = time.perf_counter()
        ev = GramEval(prob.gram_stats(s3), prob.bias, metric) if p["mode"] == "gram" else \
            DirectEval(*prob.direct_data(s3), prob.bias, metric)
        times["stats_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        S, ainfo = algorithm1(W, grid, w_bits, f_ext, p["rounds"], ev, metric, prob.t2, sym,
                              S_init=S)
        times["search_s"] += time.perf_counter() - t0
        rounds_done += ainfo["rounds"]
        changes += ainfo["changes"]
        t0 = time.perf_counter()
        s3, e3, n_ev = search_act_scale(prob, _dequant(W, grid, S, w_bits, sym), f_ext * s_max,
                                        s3, metric, p["act_search"])
        ev3 += n_ev
        times["act2_s"] += time.perf_counter() - t0
        errs.append(e3)

    # 4. never worse than max calibration on the layer objective
    err_max = prob.error(W_max, s_max, metric)
    err_init = prob.error(W_max, s1, metric)
    fallback = not e3 <= err_max
    if fallback:
        S, s3, e3 = S_max, s_max, err_max
    info = {"method": "ptqsl", "metric": metric, "mode": p["mode"], "act_search": p["act_search"],
            "start": p["start"], "extend": p["extend"],
            "err_max": err_max, "err_init": err_init, "err_act1": e1, "err": e3,
            "rounds": rounds_done, "changes": changes, "act_evals": ev1 + ev3,
            "fallback": fallback, "seconds": time.perf_counter() - t_start,
            "alternations": len(errs), "err_per_alternation": errs, **times}
    if metric == "euclidean" and prob.t2 > 0:
        info["rel_err"] = e3 / math.sqrt(prob.t2)
        info["rel_err_max"] = err_max / math.sqrt(prob.t2)
    info["symmetric"] = sym
    info["act_unsigned"] = uns
    return LayerQuant(grid, S, float(s3), w_bits, a_bits, info=info, symmetric=sym,
                      act_unsigned=uns)


def mse_scales(W: np.ndarray, grid: TileGrid, w_bits: int, factors: np.ndarray,
               symmetric: bool = False) -> np.ndarray:
    """Per tile, the scale among the max init and ``factors * init`` minimizing
    ``||W_ij - W^_ij||^2`` (the init wins ties, then the lowest candidate index)."""
    W = np.asarray(W, dtype=np.float64)
    lo, hi = qrange(w_bits, symmetric)
    S0 = max_scales(W, grid, w_bits)

    def tile_err(S):                                    # S: (m, nrb, ncb) -> (m, nrb, ncb)
        e = W[None] - fake_quant(W[None], grid.expand(S), lo, hi)
        e *= e
        return grid.block_sum(e)

    e0 = tile_err(S0[None])[0]
    best_e = np.full(S0.shape, np.inf)
    best_s = S0.copy()
    step = max(1, _CHUNK // (grid.O * grid.K))
    for t0 in range(0, len(factors), step):
        cand = factors[t0:t0 + step, None, None] * S0[None]
        e = tile_err(cand)
        k = np.argmin(e, axis=0)
        ek = np.take_along_axis(e, k[None], 0)[0]
        better = ek < best_e
        best_e[better] = ek[better]
        best_s[better] = np.take_along_axis(cand, k[None], 0)[0][better]
    return np.where(best_e < e0, best_s, S0)


def mse_method(layer: GemmLayer, x: torch.Tensor, target, gran: Granularity, w_bits: int,
               a_bits: int, params: dict) -> LayerQuant:
    """Weight-only MSE search per tile; activation scale by max calibration."""
    p = check_params(params)
    grid = gran.resolve(layer.O, layer.K, layer.groups)
    S = mse_scales(layer.weight_matrix(), grid, w_bits, candidate_factors(p), p["symmetric"])
    act_scale = float(act_max_scale(float(x.abs().max()), a_bits, p["act_unsigned"]))
    return LayerQuant(grid, S, act_scale, w_bits, a_bits, info={"method": "mse"},
                      symmetric=p["symmetric"], act_unsigned=p["act_unsigned"])

