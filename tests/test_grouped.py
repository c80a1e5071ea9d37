"""Grouped and depthwise convolution (issue #14 item 3) on every part of pimsim.

The references are independent of the code under test: F.unfold / F.conv2d (torch) for the
im2col columns and the float convolution, int64 numpy products computed group by group for
Eq. 5, row-block indices and hand counts of arrays, conversions and MACs written out here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimsim import reorder as R
from pimsim.calibrate import calibrate
from pimsim.cost import LayerShape, network_cost
from pimsim.crossbar import Crossbar, CrossbarGemm, LayerSpec, map_layer
from pimsim.crossbar.attach import array_op, attach
from pimsim.kernels import TiledGemm, partial_sums_reference
from pimsim.network import GemmLayer, LayerQuant, build_network
from pimsim.ptqsl import DirectEval, GramEval, LayerProblem, algorithm1, candidate_factors
from pimsim.quant import Granularity, TileGrid, max_scales, quantize_weight

PROP = settings(deadline=None, max_examples=30, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------

def expected_block(o, O, g, r):
    """Row block of row o in a grid of g groups and r tile rows (r = O: the shared block)."""
    if g > 1 and r == O:
        return 0
    og = O // g
    return (o // og) * -(-og // r) + (o % og) // r


def eq5_grouped_reference(wq, xq4, g, r, c, scales, sx, bias, geom):
    """Eq. 5 of a grouped conv, group by group, in int64 numpy on F.unfold columns:
    Y^T (N x O) float32."""
    (kh, kw), stride, padding, dilation = geom
    X = F.unfold(torch.from_numpy(xq4.astype(np.float64)), (kh, kw), dilation=dilation,
                 padding=padding, stride=stride)                       # (B, C*kk, L)
    X = X.permute(1, 0, 2).reshape(X.shape[1], -1).numpy().astype(np.int64)   # K_in x N
    O, K = wq.shape
    og = O // g
    acc = np.zeros((O, X.shape[1]))
    for gi in range(g):
        Xg = X[gi * K:(gi + 1) * K]
        for j, k0 in enumerate(range(0, K, c)):
            for o in range(gi * og, (gi + 1) * og):
                p = wq[o, k0:k0 + c].astype(np.int64) @ Xg[k0:k0 + c]
                acc[o] += np.float64(scales[expected_block(o, O, g, r), j]) * p.astype(np.float64)
    return ((np.float64(sx) * acc).astype(np.float32) + bias[:, None]).T


def expand_reference(scales, O, K, g, r, c):
    s = np.empty((O, K))
    for o in range(O):
        for k in range(K):
            s[o, k] = scales[expected_block(o, O, g, r), k // c]
    return s


@st.composite
def grouped_convs(draw):
    depthwise = draw(st.booleans())
    g = draw(st.integers(1, 6))
    cg = 1 if depthwise else draw(st.integers(1, 3))
    og = draw(st.sampled_from([1, 2])) if depthwise else draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    H, W = draw(st.integers(kh, 6)), draw(st.integers(kw, 6))
    B = draw(st.integers(1, 2))
    K = cg * kh * kw
    kind = draw(st.sampled_from(["tile", "split", "layerwise", "channelwise"]))
    if kind == "tile":
        gran = Granularity.tile(draw(st.integers(1, 6)), draw(st.integers(1, K + 2)))
    elif kind == "split":
        gran = Granularity.split(draw(st.integers(1, 6)), draw(st.integers(1, 4)))
    else:
        gran = Granularity(kind)
    w_bits, a_bits = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    path = draw(st.sampled_from(["auto", "f64", "int"]))
    return dict(g=g, cg=cg, og=og, k=(kh, kw), stride=stride, padding=padding, hw=(H, W), B=B,
                gran=gran, w_bits=w_bits, a_bits=a_bits, path=path, seed=draw(st.integers(0, 99)))


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------

def test_grid_row_blocks_restart_at_groups():
    g = Granularity.tile(2, 4).resolve(12, 9, groups=3)        # 3 groups of 4 rows
    assert (g.r, g.c, g.groups, g.shape) == (2, 4, 3, (6, 3))
    assert [g.row_slice(i) for i in range(6)] == [slice(0, 2), slice(2, 4), slice(4, 6),
                                                 slice(6, 8), slice(8, 10), slice(10, 12)]
    g = Granularity.tile(3, 4).resolve(8, 5, groups=2)         # rows 0-2, 3, 4-6, 7
    assert g.shape == (4, 2)
    assert g.row_block_index().tolist() == [0, 0, 0, 1, 2, 2, 2, 3]
    # Method 2: c = ceil(K/m) of the group's K; tile rows clamp to a group
    assert Granularity.split(8, 2).resolve(16, 9, groups=4) == TileGrid(16, 9, 4, 5, 4)
    # layerwise: still one scale; channelwise: one per row
    assert Granularity.layerwise().resolve(16, 9, groups=4).shape == (1, 1)
    assert Granularity.channelwise().resolve(16, 9, groups=4).shape == (16, 1)
    with pytest.raises(ValueError, match="span two groups"):
        TileGrid(8, 4, 3, 4, groups=4)
    with pytest.raises(ValueError, match="divisible"):
        Granularity.tile(2, 2).resolve(9, 4, groups=2)


@PROP
@given(O_g=st.integers(1, 7), g=st.integers(1, 5), K=st.integers(1, 9),
       r=st.integers(1, 9), c=st.integers(1, 10), kind=st.sampled_from(["tile", "layerwise",
                                                                         "channelwise"]),
       seed=st.integers(0, 50))
def test_grid_expand_absmax_against_loops(O_g, g, K, r, c, kind, seed):
    O = O_g * g
    grid = (Granularity.tile(r, c) if kind == "tile" else Granularity(kind)).resolve(O, K, g)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(O, K))
    s = rng.uniform(0.5, 2.0, size=grid.shape)
    np.testing.assert_array_equal(grid.expand(s), expand_reference(s, O, K, g, grid.r, grid.c))
    amax = np.zeros(grid.shape)
    for o in range(O):
        for k in range(K):
            i, j = expected_block(o, O, g, grid.r), k // grid.c
            amax[i, j] = max(amax[i, j], abs(w[o, k]))
    np.testing.assert_array_equal(grid.block_absmax(w), amax)
    # no tile as placed on arrays spans two groups, and they cover W exactly once
    seen = np.zeros((O, K), int)
    for gi, i, j, rows, cols in grid.group_tiles():
        assert gi * O_g <= rows.start < rows.stop <= (gi + 1) * O_g
        assert all(expected_block(o, O, g, grid.r) == i for o in range(rows.start, rows.stop))
        seen[rows, cols] += 1
    assert (seen == 1).all()
    if not grid.shared:
        for i, j, rows, cols in grid.tiles():
            assert rows.start // O_g == (rows.stop - 1) // O_g


# --------------------------------------------------------------------------------------------
# kernel and fake backends
# --------------------------------------------------------------------------------------------

@PROP
@given(p=grouped_convs())
def test_grouped_kernel_equals_int64_reference(p):
    rng = np.random.default_rng(p["seed"])
    g, cg, og = p["g"], p["cg"], p["og"]
    O, K = g * og, cg * p["k"][0] * p["k"][1]
    grid = p["gran"].resolve(O, K, g)
    wlo, whi = -(1 << (p["w_bits"] - 1)), (1 << (p["w_bits"] - 1)) - 1
    alo, ahi = -(1 << (p["a_bits"] - 1)), (1 << (p["a_bits"] - 1)) - 1
    wq = rng.integers(wlo, whi + 1, size=(O, K)).astype(np.int8)
    xq = rng.integers(alo, ahi + 1, size=(p["B"], g * cg) + p["hw"]).astype(np.float32)
    scales = rng.uniform(1e-3, 1e-1, size=grid.shape)
    bias = rng.normal(size=O).astype(np.float32)
    sx = 0.037
    geom = (p["k"], p["stride"], p["padding"], (1, 1))
    path = p["path"]
    if path == "f64" and p["w_bits"] + p["a_bits"] > 40:
        path = "auto"
    op = TiledGemm(wq, grid, scales, w_bits=p["w_bits"], a_bits=p["a_bits"], path=path)
    y = op.conv(xq, sx, *geom, bias=bias)
    ref = eq5_grouped_reference(wq, xq, g, grid.r, grid.c, scales, sx, bias, geom)
    assert y.shape == ref.shape
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
    # the matrix entry points (K x N and N x K) on the same columns
    X = F.unfold(torch.from_numpy(xq), p["k"], padding=p["padding"], stride=p["stride"])
    X = X.permute(1, 0, 2).reshape(X.shape[1], -1).contiguous()
    np.testing.assert_array_equal(op(X, sx, bias=bias).T, ref)
    np.testing.assert_array_equal(op(X.t().contiguous(), sx, bias=bias, layout="NK"), ref)
    np.testing.assert_array_equal(op.partial_sums(X), partial_sums_reference(wq, X.numpy(), grid))


def test_depthwise_kernel_is_fast_enough():
    """A depthwise 3x3 layer of 512 channels on 16 x 16 images: one batched product per column
    block, not a Python loop over the channels (generous bound for a loaded machine)."""
    import time
    C = 512
    grid = Granularity.channelwise().resolve(C, 9, C)
    rng = np.random.default_rng(0)
    op = TiledGemm(rng.integers(-127, 128, size=(C, 9)).astype(np.int8), grid,
                   np.full(grid.shape, 0.01), a_bits=8)
    x = rng.integers(-127, 128, size=(4, C, 16, 16)).astype(np.float32)
    op.conv(x, 0.1, (3, 3), (1, 1), (1, 1))
    t = time.perf_counter()
    op.conv(x, 0.1, (3, 3), (1, 1), (1, 1))
    assert time.perf_counter() - t < 2.0


def grouped_layer(g, cg, og, k=3, seed=0, bias=True):
    torch.manual_seed(seed)
    conv = nn.Conv2d(g * cg, g * og, k, padding=k // 2, groups=g, bias=bias)
    return GemmLayer("conv", conv), conv


@pytest.mark.parametrize("g,cg,og", [(4, 2, 3), (6, 1, 1), (3, 1, 2)])
def test_fake_path_equals_torch_grouped_conv(g, cg, og):
    layer, conv = grouped_layer(g, cg, og)
    assert (layer.O, layer.K, layer.K_in, layer.groups) == (g * og, cg * 9, g * cg * 9, g)
    grid = Granularity.tile(2, 5).resolve(layer.O, layer.K, g)
    W = layer.weight_matrix()
    S = max_scales(W, grid, 4)
    q = LayerQuant(grid, S, 0.05, 4, 6)
    layer.set_quant(q)
    x = torch.randn(2, g * cg, 7, 7)
    Sx = expand_reference(S, layer.O, layer.K, g, grid.r, grid.c)
    w_deq = (np.clip(np.rint(W / Sx), -8, 7) * Sx).astype(np.float32)
    x_deq = torch.clamp(torch.round(x / 0.05), -32, 31) * 0.05
    ref = F.conv2d(x_deq, torch.from_numpy(w_deq).reshape(conv.weight.shape), conv.bias,
                   padding=1, groups=g)
    with torch.no_grad():
        torch.testing.assert_close(layer.fake_forward(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.kernel_forward(x), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.float_forward(x), conv(x))


def test_grid_groups_must_match_layer():
    layer, _ = grouped_layer(4, 2, 2)
    grid = Granularity.channelwise().resolve(layer.O, layer.K)      # groups forgotten
    with pytest.raises(ValueError, match="groups"):
        layer.set_quant(LayerQuant(grid, np.ones(grid.shape), 0.1, 8, 8))


# --------------------------------------------------------------------------------------------
# crossbar
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gran", [Granularity.tile(2, 4), Granularity.layerwise(),
                                  Granularity.channelwise()])
@pytest.mark.parametrize("signed", ["differential", "offset"])
def test_crossbar_grouped_equals_kernel_ideal_and_groups_alone(gran, signed):
    g, cg, og = 3, 2, 3
    O, K = g * og, cg * 9
    grid = gran.resolve(O, K, g)
    rng = np.random.default_rng(1)
    wq = rng.integers(-7, 8, size=(O, K)).astype(np.int8)
    S = rng.uniform(0.01, 0.1, size=grid.shape)
    x = torch.from_numpy(rng.integers(-31, 32, size=(2, g * cg, 5, 5)).astype(np.float32))
    bias = rng.normal(size=O).astype(np.float32)
    geom = ((3, 3), (1, 1), (1, 1), (1, 1))
    xb = Crossbar(rows=8, cols=12, cell_bits=2, signed=signed)
    cg_op = CrossbarGemm(wq, grid, S, xb, 4, 6, shortcut=False)
    kernel = TiledGemm(wq, grid, S, w_bits=4, a_bits=6).conv(x, 0.02, *geom, bias=bias)
    y = cg_op.conv(x, 0.02, *geom, bias=bias)
    np.testing.assert_array_equal(y.view(np.uint32), kernel.view(np.uint32))
    assert cg_op.conversions == y.shape[0] * 2 * cg_op.lm.input_cycles * cg_op.lm.used_columns
    # a real ADC: the grouped layer = each group alone on its own (ungrouped) arrays
    xb4 = Crossbar(rows=8, cols=12, cell_bits=2, signed=signed, adc_bits=3)
    y4 = CrossbarGemm(wq, grid, S, xb4, 4, 6).conv(x, 0.02, *geom, bias=bias)
    for gi in range(g):
        rows = slice(gi * og, (gi + 1) * og)
        sub = TileGrid(og, K, min(grid.r, og), grid.c)
        Sg = np.stack([S[expected_block(o, O, g, grid.r)] for o in range(rows.start, rows.stop)])
        Sg = Sg[::sub.r]                                    # one scale row per row block
        alone = CrossbarGemm(wq[rows], sub, Sg, xb4, 4, 6).conv(
            x[:, gi * cg:(gi + 1) * cg], 0.02, *geom, bias=bias[rows])
        np.testing.assert_array_equal(y4[:, rows], alone)


@PROP
@given(og=st.integers(1, 6), g=st.integers(1, 6), K=st.integers(1, 30), r=st.integers(1, 8),
       c=st.integers(1, 30), rows=st.sampled_from([4, 8, 16]), cols=st.sampled_from([8, 16]),
       layerwise=st.booleans())
def test_mapping_places_every_group_on_its_own_arrays(og, g, K, r, c, rows, cols, layerwise):
    O = g * og
    gran = Granularity.layerwise() if layerwise else Granularity.tile(r, c)
    grid = gran.resolve(O, K, g)
    xb = Crossbar(rows=rows, cols=cols, cell_bits=2)
    lm = map_layer(LayerSpec("l", O, K, grid, 4, 8), xb, strict=False)
    one = map_layer(LayerSpec("l", og, K, TileGrid(og, K, min(grid.r, og), grid.c), 4, 8), xb,
                    strict=False)
    assert lm.groups == g
    assert (lm.arrays, lm.segments, lm.used_cells) == (g * one.arrays, g * one.segments,
                                                      g * one.used_cells)
    assert lm.used_columns == g * one.used_columns
    cpw = xb.cols_per_weight(4)
    # hand count: a group's column block j needs ceil(c_j / rows) segments, each holding
    # ceil(tiles of the group / tiles per array) arrays
    gr = min(grid.r, og)
    nrb = -(-og // gr)
    per_seg = (-(-nrb // (cols // (gr * cpw))) if gr * cpw <= cols
               else sum(-(-(min(og, (i + 1) * gr) - i * gr) * cpw // cols) for i in range(nrb)))
    segs = sum(-(-min(grid.c, K - k0) // rows) for k0 in range(0, K, grid.c))
    assert lm.arrays == g * segs * per_seg
    # no bit line of an array holds rows of two groups: column_arrays is per group
    assert lm.column_arrays(xb).shape == (og, cpw)


def test_cost_of_a_depthwise_layer_by_hand():
    C, P = 16, 64                                  # depthwise 3x3, 16 channels, 8x8 output
    xb = Crossbar()                                # 128 x 128, 2-bit cells, differential, 1-bit DAC
    res = network_cost([LayerShape("dw", C, 9, P, groups=C)], Granularity.channelwise(), 8, 8,
                       xb, strict=False)
    L = res["layers"][0]
    cpw = 2 * math.ceil(7 / 2)                     # 8 bit lines per 8-bit weight
    cyc = 7                                        # (8 - 1) / 1 DAC cycles per input
    assert L["macs"] == C * 9 * P
    assert L["scales"] == C and L["scale_bits"] == C * 16
    assert L["arrays"] == C                        # one array per channel (own inputs)
    assert L["segments"] == C
    assert L["used_columns"] == C * cpw
    assert L["adc_conversions"] == P * cyc * C * cpw
    assert L["dac_conversions"] == C * 9 * cyc * P
    assert L["used_cells"] == C * 9 * cpw
    assert L["total_cells"] == C * 128 * 128
    assert L["rescale_mults"] == C * 1 * P and L["tile_adds"] == 0
    assert L["buffer_accesses"] == C * 9 * P + C * P + C * P
    assert L["array_reads"] == C * cyc * P
    assert L["lw_scale_bits"] == 16                # layerwise: one scale for the layer
    lw = network_cost([LayerShape("dw", C, 9, P, groups=C)], Granularity.layerwise(), 8, 8, xb)
    assert lw["layers"][0]["scales"] == 1 and lw["layers"][0]["arrays"] == C


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------

def grouped_problem(seed=0, g=4, cg=2, og=3, metric="euclidean"):
    layer, conv = grouped_layer(g, cg, og, seed=seed)
    x = torch.randn(3, g * cg, 6, 6)
    with torch.no_grad():
        target = conv(x) + 0.01 * torch.randn(3, g * og, 6, 6)
    return layer, x, target


def test_gram_stats_per_group_against_unfold():
    layer, x, target = grouped_problem()
    prob = LayerProblem(layer, x, target, 6)
    s = 0.04
    st_ = prob.gram_stats(s)
    X = F.unfold(prob.quantize_input(s).double(), 3, padding=1)
    X = (X.permute(1, 0, 2).reshape(X.shape[1], -1) * s).numpy()           # K_in x N
    T = target.double().permute(1, 0, 2, 3).reshape(layer.O, -1).numpy()
    K, og = layer.K, layer.O // layer.groups
    assert st_["H"].shape == (4, K, K) and st_["groups"] == 4
    for gi in range(4):
        Xg = X[gi * K:(gi + 1) * K]
        np.testing.assert_allclose(st_["H"][gi], Xg @ Xg.T, rtol=1e-12)
        np.testing.assert_allclose(st_["Gs"][gi * og:(gi + 1) * og], T[gi * og:(gi + 1) * og] @ Xg.T,
                                   rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(st_["u"][gi], Xg.sum(1), rtol=1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("gran", [Granularity.tile(2, 5), Granularity.layerwise()])
def test_algorithm1_gram_equals_direct_on_grouped(metric, gran):
    layer, x, target = grouped_problem()
    prob = LayerProblem(layer, x, target, 6)
    s = 0.04
    grid = gran.resolve(layer.O, layer.K, layer.groups)
    W = layer.weight_matrix().astype(np.float64)
    factors = candidate_factors({"alpha": 0.5, "beta": 1.2, "candidates": 15})
    ev_g = GramEval(prob.gram_stats(s), prob.bias, metric)
    Xq, Y = prob.direct_data(s)
    ev_d = DirectEval(Xq, Y, prob.bias, metric)
    Sg, _ = algorithm1(W, grid, 3, factors, 2, ev_g, metric, prob.t2)
    Sd, _ = algorithm1(W, grid, 3, factors, 2, ev_d, metric, prob.t2)
    np.testing.assert_array_equal(Sg, Sd)
    # the direct evaluation's error is that of a grouped float conv (independent: F.conv2d)
    Wh = quantize_weight(W, grid, Sg, 3).astype(np.float64) * grid.expand(Sg)
    y = F.conv2d(prob.quantize_input(s).double() * s, torch.from_numpy(Wh).reshape(
        layer.weight.shape), layer.bias.double(), padding=1, groups=layer.groups)
    Yr = y.permute(1, 0, 2, 3).reshape(layer.O, -1).numpy()
    Yd = (np.concatenate([Wh[gi * 3:(gi + 1) * 3] @ Xq[gi] for gi in range(4)])
          + prob.bias[:, None])
    np.testing.assert_allclose(Yd, Yr, rtol=1e-9, atol=1e-9)


def test_euclidean_ptqsl_on_groups_is_per_group():
    """The Euclidean error splits over rows, so Algorithm 1 on a grouped layer picks for each
    group the scales it picks for that group alone (an ungrouped conv on its channels)."""
    g, cg, og = 3, 2, 2
    layer, x, target = grouped_problem(g=g, cg=cg, og=og)
    s = 0.04
    factors = candidate_factors({"alpha": 0.5, "beta": 1.2, "candidates": 12})
    grid = Granularity.tile(1, 6).resolve(layer.O, layer.K, g)
    prob = LayerProblem(layer, x, target, 6)
    S, _ = algorithm1(layer.weight_matrix(), grid, 3, factors, 2,
                      GramEval(prob.gram_stats(s), prob.bias, "euclidean"), "euclidean")
    for gi in range(g):
        rows = slice(gi * og, (gi + 1) * og)
        conv = nn.Conv2d(cg, og, 3, padding=1)
        conv.weight.data = layer.weight[rows].clone()
        conv.bias.data = layer.bias[rows].clone()
        alone = GemmLayer("alone", conv)
        p1 = LayerProblem(alone, x[:, gi * cg:(gi + 1) * cg], target[:, rows], 6)
        sub = Granularity.tile(1, 6).resolve(og, layer.K)
        S1, _ = algorithm1(alone.weight_matrix(), sub, 3, factors, 2,
                           GramEval(p1.gram_stats(s), p1.bias, "euclidean"), "euclidean")
        np.testing.assert_array_equal(S[gi * og:(gi + 1) * og], S1)


# --------------------------------------------------------------------------------------------
# a MobileNet-style block, end to end
# --------------------------------------------------------------------------------------------

class MobileBlock(nn.Module):
    """stem 3x3 -> pointwise -> depthwise 3x3 -> pointwise (+ residual) -> grouped 3x3 (g=2)
    -> pool -> fc, BatchNorm after every conv (folded)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pw1, self.bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw2, self.bn3 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.gc, self.bn4 = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 10)
        g = torch.Generator().manual_seed(0)
        for bn in (self.bn0, self.bn1, self.bn2, self.bn3, self.bn4):
            bn.running_mean.uniform_(-0.2, 0.2, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.data.uniform_(0.5, 1.5, generator=g)
            bn.bias.data.uniform_(-0.2, 0.2, generator=g)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.pw1(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        x = x + self.bn3(self.pw2(y))
        x = F.relu(self.bn4(self.gc(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_mobilenet_block_ptqsl_kernel_and_crossbar_agree_with_float():
    torch.manual_seed(0)
    net = build_network(MobileBlock())
    assert {l.name: l.groups for l in net.layers} == {"stem": 1, "pw1": 1, "dw": 16, "pw2": 1,
                                                       "gc": 2, "fc": 1}
    calib = torch.randn(8, 3, 8, 8)
    x = torch.randn(100, 3, 8, 8)
    with torch.no_grad():
        ref = net(x).argmax(1)
    calibrate(net, calib, Granularity.channelwise(), 8, 8, method="ptqsl",
              params={"candidates": 20}, progress=False)
    assert net.layer("dw").quant.grid.groups == 16
    net.set_mode("kernel")
    with torch.no_grad():
        k = net(x)
    assert (k.argmax(1) == ref).float().mean() >= 0.99
    attach(net, Crossbar())
    for l in net.quantized_layers:
        array_op(l).shortcut = False               # the bit-serial arrays, not the shortcut
    net.set_mode("kernel")
    with torch.no_grad():
        k_sym = net(x[:20])
    net.set_mode("crossbar")
    with torch.no_grad():
        xb = net(x[:20])
    np.testing.assert_array_equal(xb.numpy(), k_sym.numpy())   # ideal ADC: bit for bit
    assert (xb.argmax(1) == ref[:20]).float().mean() >= 0.95


# --------------------------------------------------------------------------------------------
# reordering
# --------------------------------------------------------------------------------------------

def test_reorder_groups_depthwise_tied_grouped_frozen():
    net = build_network(MobileBlock())
    groups = {g.name: g for g in R.find_groups(net, torch.zeros(1, 3, 8, 8))}
    # pw1 output = dw input = dw output: one free group with two producers, consumer pw2
    g = groups["pw1"]
    assert g.free and g.producers == ["pw1", "dw"] and g.consumers == ["pw2"]
    assert not groups["gc"].free and any("grouped convolution 'gc'" in r
                                         for r in groups["gc"].frozen)
    # gc's input (the residual stream stem + pw2) is frozen as well
    assert not groups["stem"].free
    ro = R.Reorderer(net)
    x = torch.randn(4, 3, 8, 8)
    w_dw, w_pw2 = net.layer("dw").weight.clone(), net.layer("pw2").weight.clone()
    p = np.random.default_rng(3).permutation(16)
    with torch.no_grad():
        y0 = net(x)
        ro.set_orders({"pw1": p})
        y1 = net(x)
    torch.testing.assert_close(net.layer("dw").weight, w_dw[p])       # filters move along
    torch.testing.assert_close(net.layer("pw2").weight, w_pw2[:, p])
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)


def test_reorder_search_runs_on_depthwise_and_keeps_function():
    torch.manual_seed(1)
    net = build_network(MobileBlock())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        y0 = net(x)
    ro = R.Reorderer(net)
    res = R.evolve(net, torch.randn(6, 3, 8, 8), Granularity.tile(4, 8), 4, 8,
                   params={"candidates": 8, "rounds": 1}, population=3, generations=2, seed=0,
                   progress=False, reorderer=ro)
    assert set(res["orders"]) == {"pw1"}
    for l in net.layers:
        l.clear_quant()
    with torch.no_grad():
        torch.testing.assert_close(net(x), y0, atol=1e-5, rtol=1e-5)
