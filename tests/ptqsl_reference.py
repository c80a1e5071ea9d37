"""An independent, deliberately plain reference of PTQ-SL calibration for the tests.

Written from the paper (Eq. 1, Eq. 5, Eq. 6, Algorithm 1 and the per-layer pipeline of its
"Experimental Settings"; see ../shared/docs/PAPER_NOTES.md), not from ``pimsim.ptqsl``: im2col
by ``torch.nn.functional.unfold``, every quantization by an explicit loop over the tiles, every
objective evaluated on all the calibration samples in float64 numpy, every search by trying each
candidate in turn. Slow, only for layers of a few dozen weights.

Tie rule (the documented one of ``pimsim.ptqsl``): a scale moves to a candidate only when that
candidate beats the current scale; among equal candidates the lowest index wins. A reference
search also returns its smallest *decision margin* (relative gap between the winner and the
runner-up, and between the winner and the current value; exact ties left out), so a test can
check that its data are not near a tie, where float32 (code) and float64 (reference) sums could
decide differently.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Eq. 1's integer range; symmetric: the crossbar range without -2^(b-1)."""
    hi = 2 ** (bits - 1) - 1
    return (-hi if symmetric else -hi - 1), hi


def tiles(O: int, K: int, r: int, c: int):
    """(i, j, rows, cols) of every r x c tile of an O x K matrix (smaller tiles at the edges)."""
    for i, o0 in enumerate(range(0, O, r)):
        for j, k0 in enumerate(range(0, K, c)):
            yield i, j, slice(o0, min(o0 + r, O)), slice(k0, min(k0 + c, K))


def n_blocks(O: int, K: int, r: int, c: int) -> tuple[int, int]:
    return -(-O // r), -(-K // c)


def max_init(W: np.ndarray, r: int, c: int, bits: int) -> np.ndarray:
    """Algorithm 1's init: ``max|W_ij| / (2^(b-1) - 1)`` per tile (1 for an all-zero tile)."""
    S = np.empty(n_blocks(*W.shape, r, c))
    for i, j, rows, cols in tiles(*W.shape, r, c):
        m = float(np.abs(W[rows, cols]).max())
        S[i, j] = m / (2 ** (bits - 1) - 1) if m > 0 else 1.0
    return S


def quantize_tiles(W: np.ndarray, S: np.ndarray, r: int, c: int, bits: int,
                   symmetric: bool) -> np.ndarray:
    """Integer weights, tile by tile: ``clamp(round(W_ij / s_ij))`` (round half to even)."""
    lo, hi = int_range(bits, symmetric)
    Q = np.empty(W.shape, dtype=np.int64)
    for i, j, rows, cols in tiles(*W.shape, r, c):
        Q[rows, cols] = np.clip(np.rint(W[rows, cols] / S[i, j]), lo, hi)
    return Q


def dequant_tiles(W, S, r, c, bits, symmetric) -> np.ndarray:
    """``s_ij * Q_ij`` per tile, float64."""
    Q = quantize_tiles(W, S, r, c, bits, symmetric).astype(np.float64)
    for i, j, rows, cols in tiles(*W.shape, r, c):
        Q[rows, cols] *= S[i, j]
    return Q


class Layer:
    """A small Conv2d / Linear (or a ``pimsim`` GemmLayer: its weight, bias and geometry) with its calibration input ``x`` and target ``Y*``, in the
    im2col view ``Y = W X + b`` (float64 numpy, columns = (image, output pixel))."""

    def __init__(self, module: torch.nn.Module, x: torch.Tensor, target: torch.Tensor):
        linear = isinstance(module, torch.nn.Linear) or getattr(module, "kind", None) == "linear"
        w = module.weight.detach().to(torch.float32)
        self.W = w.reshape(w.shape[0], -1).double().numpy()            # O x K
        self.O, self.K = self.W.shape
        self.b = (module.bias.detach().double().numpy() if module.bias is not None
                  else np.zeros(self.O))
        x = x.detach().to(torch.float32)
        self.absmax = float(x.abs().max())
        x64 = x.double()
        if linear:
            self.X = x64.reshape(x.shape[0], -1).T.numpy()              # K x B
            self.Y = target.detach().double().reshape(x.shape[0], -1).T.numpy()
        else:
            cols = F.unfold(x64, module.kernel_size, dilation=module.dilation,
                            padding=module.padding, stride=module.stride)   # B x K x L
            self.X = cols.permute(1, 0, 2).reshape(self.K, -1).numpy()
            t = target.detach().double()
            self.Y = t.permute(1, 0, 2, 3).reshape(self.O, -1).numpy()

    def xq(self, s: float, a_bits: int, symmetric: bool) -> np.ndarray:
        """The quantized input ``s * clamp(round(X / s))`` (padding zeros stay zero)."""
        lo, hi = int_range(a_bits, symmetric)
        return s * np.clip(np.rint(self.X / s), lo, hi)

    def objective(self, W_hat: np.ndarray, Xq: np.ndarray, metric: str = "euclidean") -> float:
        """Eq. 6: ``||Y* - Y^||`` or ``1 - cos(Y*, Y^)`` with ``Y^ = W^ Xq + b``."""
        Yh = W_hat @ Xq + self.b[:, None]
        if metric == "euclidean":
            return float(np.sqrt(((self.Y - Yh) ** 2).sum()))
        den = np.sqrt((Yh * Yh).sum() * (self.Y * self.Y).sum())
        return 1.0 - float((self.Y * Yh).sum()) / den if den > 0 else 1.0


def _choose(errs, current: float, current_is: int | None = None):
    """Index of the best of ``errs`` (lowest index among equals) if it beats ``current``,
    else None; and the decision margin relative to the winner's error. ``current_is``: the
    index of the candidate the current value is (its gap is then the runner-up gap)."""
    errs = np.asarray(errs, dtype=np.float64)
    k = int(np.argmin(errs))
    others = np.delete(errs, k)
    scale = max(abs(errs[k]), 1e-300)
    gaps = list(np.abs(others - errs[k]))
    if current_is is None:
        gaps.append(abs(current - errs[k]))
    # an exact tie (e.g. a tile that only meets all-zero input features) is decided the same
    # way by every implementation (keep the current value, else the lowest index): no risk
    gaps = [g for g in gaps if g > 0]
    margin = min(gaps) / scale if gaps else np.inf
    return (k if errs[k] < current else None), margin


def coordinate_descent(L: Layer, Xq: np.ndarray, r: int, c: int, bits: int, factors, rounds: int,
                       metric: str = "euclidean", symmetric: bool = False):
    """Algorithm 1 as the paper states it: start at the max init; visit the tiles one at a time
    (column block by column block, the row blocks of a column in order) and give each the
    candidate ``f * s_ij0`` with the lowest Eq. 6 error while all other scales stay fixed;
    ``rounds`` rounds, stop when a round changes nothing.

    Returns ``(S, margin, changes)``: scales, the smallest decision margin, changes per round."""
    S0 = max_init(L.W, r, c, bits)
    S = S0.copy()
    nrb, ncb = S.shape
    margin, changes = np.inf, []

    def err(S_):
        return L.objective(dequant_tiles(L.W, S_, r, c, bits, symmetric), Xq, metric)

    for _ in range(rounds):
        changed = 0
        for j in range(ncb):
            for i in range(nrb):
                cur = err(S)
                errs = []
                for f in factors:
                    T = S.copy()
                    T[i, j] = f * S0[i, j]
                    errs.append(err(T))
                on_grid = [t for t, f in enumerate(factors) if f * S0[i, j] == S[i, j]]
                k, m = _choose(errs, cur, on_grid[0] if on_grid else None)
                margin = min(margin, m)
                if k is not None:       # strictly better, so never the current scale itself
                    S[i, j] = factors[k] * S0[i, j]
                    changed += 1
        changes.append(changed)
        if not changed:
            break
    return S, margin, changes


def all_combinations(L: Layer, Xq: np.ndarray, r: int, c: int, bits: int, factors,
                     metric: str = "euclidean", symmetric: bool = False, with_init: bool = True):
    """Brute force: Eq. 6 for every combination of per-tile scales, each tile taking the max
    init (``with_init``) or one of the candidates ``f * s_ij0``. Returns ``(S_best, e_best,
    margin)`` (lowest error; margin: relative gap to the second-best combination)."""
    S0 = max_init(L.W, r, c, bits)
    choices = ([1.0] if with_init else []) + list(factors)
    shape = S0.shape
    best, errs = None, []
    for combo in itertools.product(range(len(choices)), repeat=S0.size):
        S = np.array([choices[t] for t in combo]).reshape(shape) * S0
        e = L.objective(dequant_tiles(L.W, S, r, c, bits, symmetric), Xq, metric)
        errs.append(e)
        if best is None or e < best[1]:
            best = (S, e)
    errs = np.sort(np.asarray(errs))
    margin = (errs[1] - errs[0]) / max(errs[0], 1e-300) if len(errs) > 1 else np.inf
    return best[0], best[1], margin


def act_search(L: Layer, W_hat: np.ndarray, grid, current: float, a_bits: int, symmetric: bool,
               metric: str = "euclidean"):
    """The input scale among ``grid`` with the lowest Eq. 6 error for fixed weights ``W_hat``,
    ``current`` kept unless beaten. Returns ``(scale, error, margin)``."""
    errs = [L.objective(W_hat, L.xq(float(s), a_bits, symmetric), metric) for s in grid]
    e_cur = L.objective(W_hat, L.xq(current, a_bits, symmetric), metric)
    on_grid = [t for t, s in enumerate(grid) if float(s) == current]
    k, m = _choose(errs, e_cur, on_grid[0] if on_grid else None)
    return (float(current), e_cur, m) if k is None else (float(grid[k]), errs[k], m)


def pipeline(L: Layer, r: int, c: int, w_bits: int, a_bits: int, factors, rounds: int,
             symmetric: bool = False, start: str = "act"):
    """The paper's per-layer PTQ-SL (Euclidean, every activation candidate tried):
    1. search ``s_x`` with float weights; 2. Algorithm 1 with ``s_x`` fixed; 3. search ``s_x``
    again with the quantized weights; plus pimsim's documented step 4: keep max calibration if
    the result is worse than it on Eq. 6. ``start="max"`` (PTQ4ViT's order): no step 1,
    Algorithm 1 runs at the max-calibrated ``s_x``.

    Returns a dict: ``S``, ``s_x``, ``err`` (Eq. 6 of the result), ``err_max``, ``margin``."""
    s_max = L.absmax / (2 ** (a_bits - 1) - 1)
    grid = np.asarray(factors) * s_max
    if start == "max":
        s1, m1 = s_max, np.inf
    else:
        s1, _, m1 = act_search(L, L.W, grid, s_max, a_bits, symmetric)
    S, m2, _ = coordinate_descent(L, L.xq(s1, a_bits, symmetric), r, c, w_bits, factors, rounds,
                                  symmetric=symmetric)
    W_hat = dequant_tiles(L.W, S, r, c, w_bits, symmetric)
    s3, e3, m3 = act_search(L, W_hat, grid, s1, a_bits, symmetric)
    S_max = max_init(L.W, r, c, w_bits)
    err_max = L.objective(dequant_tiles(L.W, S_max, r, c, w_bits, symmetric),
                          L.xq(s_max, a_bits, symmetric))
    same = s3 == s_max and np.array_equal(S, S_max)          # then e3 is err_max exactly
    margin = min(m1, m2, m3, np.inf if same else abs(e3 - err_max) / err_max)
    if e3 > err_max:
        S, s3, e3 = S_max, s_max, err_max
    return {"S": S, "s_x": s3, "err": e3, "err_max": err_max, "margin": margin}


def mse_reference(W: np.ndarray, r: int, c: int, bits: int, factors, symmetric: bool):
    """The ``mse`` baseline per tile: the max init or a candidate, lowest ``||W_ij - W^_ij||^2``
    (the init wins ties, then the lowest index). Returns ``(S, margin)``."""
    S0 = max_init(W, r, c, bits)
    lo, hi = int_range(bits, symmetric)
    S = S0.copy()
    margin = np.inf
    for i, j, rows, cols in tiles(*W.shape, r, c):
        w = W[rows, cols]

        def e(s):
            return float(((w - s * np.clip(np.rint(w / s), lo, hi)) ** 2).sum())
        k, m = _choose([e(f * S0[i, j]) for f in factors], e(S0[i, j]))
        margin = min(margin, m)
        if k is not None:
            S[i, j] = factors[k] * S0[i, j]
    return S, margin


def layer_inputs(net, x: torch.Tensor, mode: str) -> dict:
    """The input every GEMM layer of a pimsim ``Network`` sees when ``x`` runs through it with
    its quantized layers in ``mode`` ("fake": what sequential calibration saw; "float")."""
    seen = {}

    def hook(layer, inp):
        seen[layer.name] = inp.detach().clone()
        return None
    saved = {l.name: l.mode for l in net.layers}
    net.set_mode(mode)
    try:
        net.run_with_hooks(x, {l.name: hook for l in net.layers})
    finally:
        for l in net.layers:
            l.mode = saved[l.name]
    return seen


def float_target(layer, x_float: torch.Tensor) -> torch.Tensor:
    """The float layer's output on its float-network input (Eq. 6's Y*), by torch directly."""
    if getattr(layer, "kind", None) == "linear":
        return F.linear(x_float, layer.weight, layer.bias)
    return F.conv2d(x_float, layer.weight, layer.bias, layer.stride, layer.padding,
                    layer.dilation)
