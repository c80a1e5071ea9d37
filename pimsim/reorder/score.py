"""Scoring channel orders without the samples, from Gram statistics permuted by the order.

Scoring (``SegmentScorer``) never touches the calibration images: once per segment, the
segment's quantized layers are calibrated at their current order and each layer's input
``x`` and float output ``Y*`` are kept; the activation scale ``s_x`` of PTQ-SL step 1 (which
does not depend on the order: a joint permutation of x's channels and W's columns leaves the
layer output unchanged) and the Gram statistics ``H = Xq Xq^T``, ``Gs = Y* Xq^T``, ... are
formed once. An order permutes them (``P H P^T``, ``P_r Gs P^T``), Algorithm 1 of
``pimsim.ptqsl`` runs on the permuted statistics, and the layer's output error
``||Y* - W^ Xq - b||`` follows from the same quadratic form. The segment score is minus the sum
of these per-layer Euclidean errors. Approximation: each layer's input is the one of the
identity-order calibration (permuted), i.e. the change of upstream quantization noise with the
order, and steps 3-4 of PTQ-SL (second activation search, fallback) are left out of the score.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..network import GemmLayer
from ..ptqsl import (GramEval, LayerProblem, algorithm1, candidate_factors, check_params,
                     fake_quant, group_matmul, group_rows_of, search_act_scale)
from ..quant import Granularity, max_scale, qrange
from .permute import Reorderer, column_index


def permute_stats(st: dict, bias: np.ndarray, rows, cols) -> tuple[dict, np.ndarray]:
    """Gram statistics (``LayerProblem.gram_stats``) and bias of the layer whose output rows
    are reordered by ``rows`` and im2col columns by ``cols`` (None: unchanged):
    ``H -> P H P^T``, ``Gs -> P_r Gs P^T``, ``u -> P u``, ``ys, yy, b -> P_r (.)``.
    Grouped layer (per-group ``H`` (g, K, K), ``u`` (g, K)): ``rows`` must move whole groups
    (as a depthwise layer's rows do), which then take their ``H`` and ``u`` along; its
    columns are never reordered (``pimsim.reorder.groups``)."""
    H, Gs, u, ys, yy = st["H"], st["Gs"], st["u"], st["ys"], st["yy"]
    if H.ndim == 3:
        if cols is not None:
            raise ValueError("the input columns of a grouped layer are not reordered")
        if rows is not None:
            g = H.shape[0]
            og = len(rows) // g
            gorder = np.asarray(rows)[::og] // og
            if not np.array_equal(np.asarray(rows), (gorder[:, None] * og
                                                     + np.arange(og)).reshape(-1)):
                raise ValueError("a grouped layer's rows can only be reordered by whole groups")
            H, u = H[gorder], u[gorder]
        out = {"H": H, "Gs": Gs, "u": u, "ys": ys, "yy": yy, "N": st["N"], "groups": H.shape[0]}
        if rows is not None:
            out.update(Gs=Gs[rows], ys=ys[rows], yy=yy[rows])
            bias = bias[rows]
        return out, bias
    if cols is not None:
        H = H[np.ix_(cols, cols)]
        Gs = Gs[:, cols]
        u = u[cols]
    if rows is not None:
        Gs, ys, yy, bias = Gs[rows], ys[rows], yy[rows], bias[rows]
    return {"H": H, "Gs": Gs, "u": u, "ys": ys, "yy": yy, "N": st["N"]}, bias


def gram_error(W_hat: np.ndarray, st: dict, bias: np.ndarray) -> float:
    """``||Y* - W^ Xq - b 1^T||`` (Euclidean, over all samples) from the Gram statistics."""
    r2 = st["yy"] - 2 * bias * st["ys"] + st["N"] * bias * bias
    if st["H"].ndim == 3:                               # grouped: per-group H and u
        G = st["Gs"] - bias[:, None] * group_rows_of(st["u"], len(bias))
        WH = group_matmul(W_hat, st["H"])
    else:
        G = st["Gs"] - np.outer(bias, st["u"])
        WH = W_hat @ st["H"]
    e2 = float(r2.sum() - 2 * (W_hat * G).sum() + (W_hat * WH).sum())
    return math.sqrt(max(e2, 0.0))


def ptqsl_weight_error(W: np.ndarray, grid, w_bits: int, factors: np.ndarray, rounds: int,
                       st: dict, bias: np.ndarray,
                       symmetric: bool = False) -> tuple[float, np.ndarray]:
    """Algorithm 1 (Euclidean) on Gram statistics, then the resulting output error and scales."""
    S, _ = algorithm1(W, grid, w_bits, factors, rounds, GramEval(st, bias, "euclidean"),
                      "euclidean", symmetric=symmetric)
    lo, hi = qrange(w_bits, symmetric)
    return gram_error(fake_quant(W, grid.expand(S), lo, hi), st, bias), S


class LayerScorer:
    """One quantized layer of a segment: its statistics at the current (identity) order and
    the output error of PTQ-SL weights under other orders."""

    def __init__(self, layer: GemmLayer, x: torch.Tensor, target: torch.Tensor,
                 gran: Granularity, w_bits: int, a_bits: int, params: dict | None = None):
        p = check_params({**(params or {}), "metric": "euclidean", "mode": "gram"})
        # im2col columns per input channel (a grouped layer has in_channels / groups of them)
        self.name, self.kk = layer.name, layer.K * layer.groups // layer.in_channels
        self.grid = gran.resolve(layer.O, layer.K, layer.groups)
        self.w_bits, self.rounds, self.symmetric = w_bits, p["rounds"], p["symmetric"]
        self.factors = candidate_factors(p)
        prob = LayerProblem(layer, x, target, a_bits, self.symmetric)
        W32 = layer.weight_matrix()
        self.W = W32.astype(np.float64)
        s_max = float(max_scale(prob.x_absmax, a_bits))
        self.act_scale, _, _ = search_act_scale(prob, W32, self.factors * s_max, s_max,
                                                "euclidean", p["act_search"])
        self.stats = prob.gram_stats(self.act_scale)
        self.bias = prob.bias

    def error(self, rows=None, in_order=None) -> float:
        """PTQ-SL output error with output rows in order ``rows`` and input channels in order
        ``in_order`` (relative to the order the statistics were taken at)."""
        cols = None if in_order is None else column_index(in_order, self.kk)
        st, b = permute_stats(self.stats, self.bias, rows, cols)
        W = self.W
        if rows is not None:
            W = W[rows]
        if cols is not None:
            W = W[:, cols]
        return ptqsl_weight_error(W, self.grid, self.w_bits, self.factors, self.rounds, st, b,
                                  self.symmetric)[0]


class SegmentScorer:
    """Score = -(sum of the PTQ-SL output errors of the segment's quantized layers)."""

    def __init__(self, scorers: list[LayerScorer], reorderer: Reorderer):
        self.scorers = scorers
        self.out = {s.name: reorderer.output_group(s.name) for s in scorers}
        self.inp = {s.name: reorderer.input_group(s.name) for s in scorers}
        self.base = {n: reorderer.orders[n].copy() for n in reorderer.orders}
        self.evaluations = 0

    def score(self, orders: dict) -> float:
        """``orders``: absolute orders of the segment's groups (others at the base order)."""
        self.evaluations += 1
        total = 0.0
        for s in self.scorers:
            rows = self.relative(orders, self.out[s.name])
            cols = self.relative(orders, self.inp[s.name])
            total += s.error(rows, cols)
        return -total

    def relative(self, orders, group):
        """The order relative to the one the statistics were taken at."""
        if group is None or group not in orders:
            return None
        rel = np.argsort(self.base[group])[orders[group]]
        return None if np.array_equal(rel, np.arange(len(rel))) else rel
