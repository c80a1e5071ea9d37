"""Property tests of the tiled integer GEMM of Eq. 5 (pimsim.kernels) against its reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimsim import kernels
from pimsim.kernels import (
    F32_EXACT,
    F64_EXACT,
    TiledGemm,
    partial_sums_reference,
    plan_path,
    psum_bound,
    tiled_matmul,
    tiled_matmul_reference,
)
from pimsim.quant import Granularity, TileGrid, max_scales, quantize, quantize_weight

@pytest.fixture(autouse=True)
def _float_tiers():
    """This module tests the float / int64 tiers and their boundaries; the int8 tier
    (chosen first where it applies and is available) is tested in test_kernels_int8.py."""
    with kernels.use_int8(False):
        yield


PROP = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])


def qr(b):
    return -(1 << (b - 1)), (1 << (b - 1)) - 1


def store(bits):
    return np.int8 if bits <= 8 else np.int16


def rand_ints(rng, shape, bits, fill):
    """Random b-bit integers in their storage dtype; ``fill`` picks the value distribution."""
    lo, hi = qr(bits)
    if fill == "uniform":
        a = rng.integers(lo, hi + 1, size=shape)
    elif fill == "extreme":           # only the ends of the range (and 0)
        a = rng.choice(np.array([lo, lo, hi, 0]), size=shape)
    elif fill == "min":               # every value at -2^(b-1): the largest |product|
        a = np.full(shape, lo)
    else:                             # sparse
        a = rng.integers(lo, hi + 1, size=shape) * (rng.random(shape) < 0.2)
    return a.astype(store(bits))


def assert_bit_identical(y, ref):
    assert y.dtype == np.float32 and ref.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_array_max_ulp(y, ref, maxulp=4)
    # in practice the kernel performs the very same float operations as the reference
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))


@st.composite
def problems(draw, max_ok=80, max_n=300):
    O = draw(st.integers(1, max_ok))
    K = draw(st.integers(1, max_ok))
    N = draw(st.integers(1, max_n))
    # tile sizes: anything from 1 to larger than the matrix (clamped by resolve)
    r = draw(st.one_of(st.integers(1, max_ok + 20), st.sampled_from([1, O, O + 7])))
    c = draw(st.one_of(st.integers(1, max_ok + 20), st.sampled_from([1, K, K + 13])))
    wb = draw(st.integers(2, 16))
    ab = draw(st.integers(2, 16))
    seed = draw(st.integers(0, 2**32 - 1))
    fill = draw(st.sampled_from(["uniform", "uniform", "extreme", "min", "sparse"]))
    clamp = draw(st.sampled_from([None, None, "scalar", "array", "zero"]))
    bias = draw(st.booleans())
    lib = draw(st.sampled_from(["numpy", "torch"]))

    grid = Granularity.tile(r, c).resolve(O, K)
    rng = np.random.default_rng(seed)
    wq = rand_ints(rng, (O, K), wb, fill)
    xq = rand_ints(rng, (K, N), ab, fill)
    scales = 10.0 ** rng.uniform(-3, 1, size=grid.shape)
    sx = float(10.0 ** rng.uniform(-3, 1))
    P = partial_sums_reference(wq, xq, grid)
    pmax = float(np.abs(P).max()) if P.size else 0.0
    if clamp == "scalar":
        L = float(np.round(rng.uniform(0, 1) * pmax)) if rng.random() < 0.7 \
            else rng.uniform(0, 1) * pmax
    elif clamp == "array":
        L = np.round(rng.uniform(0, 1, size=grid.shape) * pmax)
    elif clamp == "zero":
        L = 0.0
    else:
        L = None
    b = (rng.standard_normal(O) * 10).astype(np.float32) if bias else None
    return dict(grid=grid, wq=wq, xq=xq, scales=scales, sx=sx, clamp=L, bias=b, wb=wb, ab=ab,
                lib=lib, P=P)


def as_lib(a, lib):
    return torch.from_numpy(a) if lib == "torch" else a


def check(p, path="auto"):
    g = p["grid"]
    op = TiledGemm(as_lib(p["wq"], p["lib"]), g, p["scales"], w_bits=p["wb"], a_bits=p["ab"],
                   clamp=p["clamp"], path=path)
    want_path = plan_path(g.c, p["wb"], p["ab"]) if path == "auto" else path
    assert op.path == want_path
    x = as_lib(p["xq"], p["lib"])
    ps = op.partial_sums(x)
    assert ps.dtype == np.int64
    np.testing.assert_array_equal(ps, p["P"])
    y = op(x, p["sx"], bias=p["bias"])
    ref = tiled_matmul_reference(p["wq"], p["xq"], p["scales"], g, p["sx"], clamp=p["clamp"],
                                 bias=p["bias"])
    assert_bit_identical(y, ref)
    # the operator is reusable: a second call on the same input gives the same result
    assert_bit_identical(op(x, p["sx"], bias=p["bias"]), ref)
    return op


# --------------------------------------------------------------------------------------------
# Kernel == reference
# --------------------------------------------------------------------------------------------

@settings(PROP, max_examples=150)
@given(p=problems())
def test_kernel_matches_reference(p):
    check(p)


@settings(PROP, max_examples=60)
@given(p=problems(max_ok=60, max_n=150))
def test_every_exact_path_matches_reference(p):
    need = plan_path(p["grid"].c, p["wb"], p["ab"])
    order = ["f32", "f64", "int"]
    for path in order[order.index(need):]:
        check(p, path)
    for path in order[: order.index(need)]:          # the inexact ones are refused
        with pytest.raises(ValueError, match="not exact"):
            TiledGemm(p["wq"], p["grid"], p["scales"], w_bits=p["wb"], a_bits=p["ab"], path=path)


@settings(PROP, max_examples=60)
@given(p=problems(max_ok=40, max_n=100))
def test_tiled_matmul_one_shot(p):
    g = p["grid"]
    # bits default to the storage widths (8 or 16), always a safe (exact) bound
    y = tiled_matmul(p["wq"], p["xq"], p["scales"], g, p["sx"], clamp=p["clamp"], bias=p["bias"])
    ref = tiled_matmul_reference(p["wq"], p["xq"], p["scales"], g, p["sx"], clamp=p["clamp"],
                                 bias=p["bias"])
    assert_bit_identical(y, ref)
    y = tiled_matmul(p["wq"], p["xq"], p["scales"], g, p["sx"], w_bits=p["wb"], a_bits=p["ab"],
                     clamp=p["clamp"], bias=p["bias"], path="f64")
    assert_bit_identical(y, ref)


def test_forced_f32_refused_when_not_exact():
    g = TileGrid(4, 4096, 4, 4096)
    w = np.zeros((4, 4096), np.int8)
    s = np.ones(g.shape)
    assert psum_bound(4096, 8, 8) == 2**26
    with pytest.raises(ValueError, match=r"path 'f32' is not exact for c=4096"):
        TiledGemm(w, g, s, w_bits=8, a_bits=8, path="f32")
    assert TiledGemm(w, g, s, w_bits=8, a_bits=8).path == "f64"
    assert TiledGemm(w, g, s, w_bits=8, a_bits=8, path="int").path == "int"
    # int storage without explicit bits: the storage width (8 bits) is assumed
    with pytest.raises(ValueError, match="not exact"):
        TiledGemm(w, g, s, path="f32")
    # 16 x 16 bits, c = 2^23 + 1: beyond 2^53, only the integer path is exact
    g = TileGrid(1, 2**23 + 1, 1, 2**23 + 1)
    w = np.zeros((1, g.K), np.int16)
    for path in ("f32", "f64"):
        with pytest.raises(ValueError, match="needs 'int'"):
            TiledGemm(w, g, np.ones(g.shape), w_bits=16, a_bits=16, path=path)
    assert TiledGemm(w, g, np.ones(g.shape), w_bits=16, a_bits=16).path == "int"


# --------------------------------------------------------------------------------------------
# Worst case at the exactness boundaries
# --------------------------------------------------------------------------------------------

def worst_case(O, K, c, N, wb, ab, path="auto"):
    g = TileGrid(O, K, O, c)
    wq = np.full((O, K), qr(wb)[0], dtype=store(wb))
    xq = np.full((K, N), qr(ab)[0], dtype=store(ab))
    rng = np.random.default_rng(K)
    scales = rng.uniform(0.5, 2, size=g.shape)
    op = TiledGemm(wq, g, scales, w_bits=wb, a_bits=ab, path=path)
    P = op.partial_sums(xq)
    widths = np.diff(g.col_bounds())
    want = widths[:, None, None] * (1 << (wb - 1)) * (1 << (ab - 1))
    np.testing.assert_array_equal(P, np.broadcast_to(want, P.shape))
    assert_bit_identical(op(xq, 0.01), tiled_matmul_reference(wq, xq, scales, g, 0.01))
    return op, P


@pytest.mark.parametrize("wb,ab", [(8, 8), (4, 8), (8, 4), (16, 2), (12, 12), (14, 10)])
def test_worst_case_f32_boundary(wb, ab):
    c = F32_EXACT >> (wb - 1) >> (ab - 1)
    assert psum_bound(c, wb, ab) == 2**24
    assert plan_path(c, wb, ab) == "f32" and plan_path(c + 1, wb, ab) == "f64"
    # exactly 2^24: still the f32 path, every partial sum exactly c * 2^(wb-1) * 2^(ab-1)
    op, P = worst_case(3, 2 * c + 1, c, 70, wb, ab)       # two full blocks and a ragged one
    assert op.path == "f32"
    assert P[0].max() == 2**24
    # one column more: must switch to f64, and is exact there too
    op, P = worst_case(3, 2 * (c + 1) + 1, c + 1, 70, wb, ab)
    assert op.path == "f64"
    assert P[0].max() == 2**24 + (1 << (wb - 1) << (ab - 1))
    with pytest.raises(ValueError):
        TiledGemm(np.zeros((3, c + 1), store(wb)), TileGrid(3, c + 1, 3, c + 1),
                  np.ones((1, 1)), w_bits=wb, a_bits=ab, path="f32")


def test_f32_boundary_is_sharp():
    """Why the bound matters: 2^24 + 1 is not a float32, an f32 GEMM would return 2^24."""
    wq = np.full((1, 1025), -128, np.int8)
    xq = np.full((1025, 1), -128, np.int8)
    wq[0, -1] = 1
    xq[-1, 0] = 1                                   # 1024 * 2^14 + 1 * 1 = 2^24 + 1
    f32 = torch.mm(torch.from_numpy(wq).float(), torch.from_numpy(xq).float())
    assert int(f32[0, 0]) != 2**24 + 1
    g = TileGrid(1, 1025, 1, 1025)
    op = TiledGemm(wq, g, np.ones((1, 1)), w_bits=8, a_bits=8)
    assert op.path == "f64"                         # bound 1025 * 2^14 > 2^24
    assert op.partial_sums(xq)[0, 0, 0] == 2**24 + 1


def test_worst_case_f64_boundary():
    # 16 x 16 bits: one product is 2^30, c = 2^23 columns reach 2^53 exactly
    c = F64_EXACT >> 15 >> 15
    assert psum_bound(c, 16, 16) == 2**53 and plan_path(c, 16, 16) == "f64"
    assert plan_path(c + 1, 16, 16) == "int"
    # small stand-in with the same structure: c=3 at 16x16 bits is f64 (bound 3 * 2^30)
    op, P = worst_case(2, 7, 3, 5, 16, 16)
    assert op.path == "f64" and P.max() == 3 * 2**30
    op, P = worst_case(2, 7, 3, 5, 16, 16, path="int")
    assert op.path == "int" and P.max() == 3 * 2**30


def test_worst_case_int_path_beyond_2_53():
    c = (F64_EXACT >> 30) + 1                       # 2^23 + 1 columns of 16 x 16 bits
    g = TileGrid(1, c, 1, c)
    wq = np.full((1, c), -(2**15), np.int16)
    xq = np.full((c, 1), -(2**15), np.int16)
    op = TiledGemm(wq, g, np.ones((1, 1)), w_bits=16, a_bits=16)
    assert op.path == "int"
    P = op.partial_sums(xq)
    assert P[0, 0, 0] == c * 2**30 == 2**53 + 2**30
    y = op(xq, 1.0)
    assert y[0, 0] == np.float32(float(c * 2**30))


# --------------------------------------------------------------------------------------------
# Several chunks of N
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("O,K,r,c,wb,ab,chunk_bytes", [
    # chunk_bytes None: the module's default _CHUNK_BYTES; else patched (bytes per chunk)
    (64, 576, 64, 64, 4, 8, 1 << 22),   # J=9 column blocks (a ResNet-20 stage-3 conv)
    (80, 16, 7, 1, 4, 8, None),         # small K, many column blocks
    (80, 16, 7, 1, 4, 8, 1 << 20),
    (16, 27, 16, 27, 8, 8, None),       # ResNet stem-like, small K: long chunks
    (40, 100, 8, 30, 16, 16, None),     # f64 path
    (33, 50, 5, 7, 14, 14, None),       # f64 path, ragged tiles
    (33, 50, 5, 7, 14, 14, 1 << 20),
])
def test_several_chunks(monkeypatch, O, K, r, c, wb, ab, chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(kernels, "_CHUNK_BYTES", chunk_bytes)
    g = Granularity.tile(r, c).resolve(O, K)
    rng = np.random.default_rng(O * K)
    wq = rand_ints(rng, (O, K), wb, "uniform")
    scales = rng.uniform(0.01, 1, size=g.shape)
    bias = rng.standard_normal(O).astype(np.float32)
    clamp = np.round(rng.uniform(0.2, 1, size=g.shape) * psum_bound(g.c, wb, ab) / 8)
    ops = [TiledGemm(wq, g, scales, w_bits=wb, a_bits=ab, clamp=clamp, path=path)
           for path in ("auto", "int")]
    nb = ops[0].chunk_size(10**9)
    N = max(5000, 2 * nb + nb // 3 + 1)             # several full chunks and a ragged last one
    xq = rand_ints(rng, (K, N), ab, "uniform")
    xt = np.ascontiguousarray(xq.T)
    P = partial_sums_reference(wq, xq, g)
    ref = tiled_matmul_reference(wq, xq, scales, g, 0.05, clamp=clamp, bias=bias)
    for op in ops:
        assert op.chunk_size(N) == nb and N > 2 * nb and N % nb != 0
        np.testing.assert_array_equal(op.partial_sums(xq), P)
        assert_bit_identical(op(xq, 0.05, bias=bias), ref)
        out = np.full((O, N), np.nan, np.float32)
        assert op(torch.from_numpy(xq), 0.05, bias=bias, out=out) is out
        assert_bit_identical(out, ref)
        assert_bit_identical(op(xt, 0.05, bias=bias, layout="NK"), np.ascontiguousarray(ref.T))


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 16])
@pytest.mark.parametrize("path", ["f32", "f64", "int"])
def test_small_chunks(monkeypatch, chunk_bytes, path):
    """Chunks of the minimum 64 columns and N a multiple / not a multiple of the chunk."""
    monkeypatch.setattr(kernels, "_CHUNK_BYTES", chunk_bytes)
    g = TileGrid(9, 20, 4, 6)
    rng = np.random.default_rng(chunk_bytes)
    wq = rand_ints(rng, (9, 20), 4, "uniform")
    for N in (1, 64, 65, 129, 700):
        xq = rand_ints(rng, (20, N), 8, "uniform")
        s = rng.uniform(0.1, 1, size=g.shape)
        op = TiledGemm(wq, g, s, w_bits=4, a_bits=8, path=path)
        np.testing.assert_array_equal(op.partial_sums(xq), partial_sums_reference(wq, xq, g))
        assert_bit_identical(op(xq, 0.3), tiled_matmul_reference(wq, xq, s, g, 0.3))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.fixture
def setup():
    g = TileGrid(6, 10, 4, 4)                           # shape (2, 3)
    rng = np.random.default_rng(0)
    wq = rand_ints(rng, (6, 10), 4, "uniform")
    xq = rand_ints(rng, (10, 5), 8, "uniform")
    return g, wq, xq, np.ones(g.shape)


def test_bad_weight_shape(setup):
    g, wq, xq, s = setup
    with pytest.raises(ValueError, match="weight shape"):
        TiledGemm(wq[:, :9], g, s, w_bits=4)
    with pytest.raises(ValueError, match="weight shape"):
        TiledGemm(wq.T, g, s, w_bits=4)
    with pytest.raises(ValueError, match="integer operands required"):
        TiledGemm(wq.astype(np.float32), g, s)             # float storage needs w_bits


@pytest.mark.parametrize("bad", [np.ones((2, 2)), np.ones((3, 2)), np.ones(6), np.float64(1.0)])
def test_bad_scale_shape(setup, bad):
    g, wq, xq, s = setup
    with pytest.raises(ValueError, match="scales shape"):
        TiledGemm(wq, g, bad, w_bits=4)


@pytest.mark.parametrize("v", [0.0, -1.0, np.nan, np.inf])
def test_non_positive_scale(setup, v):
    g, wq, xq, s = setup
    s = s.copy()
    s[1, 2] = v
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        TiledGemm(wq, g, s, w_bits=4)


@pytest.mark.parametrize("sx", [0.0, -0.1, np.nan, np.inf, -np.inf])
def test_bad_activation_scale(setup, sx):
    g, wq, xq, s = setup
    with pytest.raises(ValueError, match="activation scale"):
        TiledGemm(wq, g, s, w_bits=4)(xq, sx)


def test_wrong_input_k(setup):
    g, wq, xq, s = setup
    op = TiledGemm(wq, g, s, w_bits=4)
    for bad in (xq[:9], np.vstack([xq, xq[:1]]), xq.T, xq[None, :9], xq[None, None]):
        with pytest.raises(ValueError, match=r"input must be K x N with K=10"):
            op(bad, 0.1)
        with pytest.raises(ValueError, match=r"input must be K x N with K=10"):
            op.partial_sums(bad)


# Regression: an early version read ``N = xq.shape[1]`` before validating the input, so a 1-D
# input (one column of length K) raised IndexError instead of this ValueError.
def test_one_dimensional_input_is_value_error(setup):
    g, wq, xq, s = setup
    op = TiledGemm(wq, g, s, w_bits=4)
    with pytest.raises(ValueError, match="input must be K x N"):
        op.partial_sums(xq[:, 0])
    with pytest.raises(ValueError, match="input must be K x N"):
        op(xq[:, 0], 0.1)


@pytest.mark.parametrize("bias", [np.ones(5), np.ones(7), np.ones((6, 1)), np.ones((1, 6))])
def test_bad_bias_shape(setup, bias):
    g, wq, xq, s = setup
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        TiledGemm(wq, g, s, w_bits=4)(xq, 0.1, bias=bias)


def test_bad_out_clamp_path(setup):
    g, wq, xq, s = setup
    op = TiledGemm(wq, g, s, w_bits=4)
    with pytest.raises(ValueError, match="out must be float32"):
        op(xq, 0.1, out=np.empty((6, 5), np.float64))
    with pytest.raises(ValueError, match="out must be float32"):
        op(xq, 0.1, out=np.empty((6, 4), np.float32))
    for bad in (-1.0, np.nan, np.array([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])):
        with pytest.raises(ValueError, match="clamp limits must be >= 0"):
            TiledGemm(wq, g, s, w_bits=4, clamp=bad)
    with pytest.raises(ValueError):
        TiledGemm(wq, g, s, w_bits=4, clamp=np.ones((3, 3)))       # not broadcastable to (2, 3)
    with pytest.raises(ValueError, match="path must be one of"):
        TiledGemm(wq, g, s, w_bits=4, path="f16")


# --------------------------------------------------------------------------------------------
# plan_path / psum_bound
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c,wb,ab,bound,path", [
    (1, 2, 2, 4, "f32"),
    (576, 4, 8, 576 * 8 * 128, "f32"),          # W4A8 with the paper's widest tile: 589824
    (36, 8, 8, 36 * 2**14, "f32"),
    (1024, 8, 8, 2**24, "f32"),                 # exactly the f32 limit
    (1025, 8, 8, 2**24 + 2**14, "f64"),
    (4096, 8, 8, 2**26, "f64"),
    (16384, 4, 8, 2**24, "f32"),
    (16385, 4, 8, 2**24 + 2**10, "f64"),
    (1, 16, 16, 2**30, "f64"),
    (2**23, 16, 16, 2**53, "f64"),              # exactly the f64 limit
    (2**23 + 1, 16, 16, 2**53 + 2**30, "int"),
    (3 * 2**40, 8, 8, 3 * 2**54, "int"),
])
def test_plan_path_psum_bound(c, wb, ab, bound, path):
    assert psum_bound(c, wb, ab) == bound
    assert plan_path(c, wb, ab) == path


# --------------------------------------------------------------------------------------------
# Quantizer + kernel: Eq. 5 computes W_deq @ X_deq
# --------------------------------------------------------------------------------------------

@settings(PROP, max_examples=60)
@given(O=st.integers(1, 50), K=st.integers(1, 80), N=st.integers(1, 120),
       r=st.integers(1, 60), c=st.integers(1, 90), wb=st.integers(2, 16), ab=st.integers(2, 16),
       seed=st.integers(0, 2**32 - 1), bias=st.booleans(), searched=st.booleans())
def test_kernel_is_fake_quant_matmul(O, K, N, r, c, wb, ab, seed, bias, searched):
    """``searched``: scales as PTQ-SL leaves them (each tile's and the input's max scale times
    a factor in [0.5, 1.2]), so codes clamp and reach -2^(b-1), which max scales never do."""
    rng = np.random.default_rng(seed)
    g = Granularity.tile(r, c).resolve(O, K)
    w = rng.standard_normal((O, K)) * rng.uniform(0.01, 1, size=(O, 1))
    x = np.maximum(rng.standard_normal((K, N)), 0) if rng.random() < 0.5 \
        else rng.standard_normal((K, N))
    s = max_scales(w, g, wb)
    sx = float(max(np.abs(x).max(), 1e-3) / qr(ab)[1])
    if searched:
        s = s * rng.uniform(0.5, 1.2, size=s.shape)
        sx *= rng.uniform(0.5, 1.2)
    wq = quantize_weight(w, g, s, wb)
    xq = quantize(x, sx, ab)
    b = rng.standard_normal(O).astype(np.float32) if bias else None
    op = TiledGemm(wq, g, s, w_bits=wb, a_bits=ab)
    w_deq = wq.astype(np.float64) * g.expand(s)
    x_deq = xq.astype(np.float64) * sx
    wx = w_deq @ x_deq
    # float32 output: relative 1e-6 (a float32 ulp is 6e-8), plus an absolute floor for
    # outputs that cancel to ~0 relative to the size of the terms
    mag = np.abs(w_deq) @ np.abs(x_deq)
    y = op(xq, sx)
    err = np.abs(y.astype(np.float64) - wx)
    assert (err <= 1e-6 * np.abs(wx) + 1e-12 * mag + 1e-30).all(), err.max()
    if b is not None:
        # the bias is added in float32 to the float32 product (as in the reference): one more
        # float32 rounding, relative to the larger of the two addends
        y = op(xq, sx, bias=b)
        ref = wx + b.astype(np.float64)[:, None]
        err = np.abs(y.astype(np.float64) - ref)
        tol = 1e-6 * np.abs(ref) + 2.0**-23 * (np.abs(wx) + np.abs(b)[:, None]) + 1e-12 * mag
        assert (err <= tol).all(), err.max()


# --------------------------------------------------------------------------------------------
# layout "NK": the input is X^T (N x K, e.g. pixel-major im2col), the result Y^T (N x O)
# --------------------------------------------------------------------------------------------

@settings(PROP, max_examples=50)
@given(p=problems(), small_chunks=st.booleans(), path=st.sampled_from(["auto", "f64", "int"]))
def test_nk_layout_matches_reference(p, small_chunks, path):
    g = p["grid"]
    if path == "f64" and plan_path(g.c, p["wb"], p["ab"]) == "int":
        path = "int"
    old = kernels._CHUNK_BYTES
    if small_chunks:
        kernels._CHUNK_BYTES = 1                        # chunks of the minimum 64 rows
    try:
        op = TiledGemm(p["wq"], g, p["scales"], w_bits=p["wb"], a_bits=p["ab"],
                       clamp=p["clamp"], path=path)
        xt = np.ascontiguousarray(p["xq"].T)
        np.testing.assert_array_equal(op.partial_sums(as_lib(xt, p["lib"]), layout="NK"), p["P"])
        ref = tiled_matmul_reference(p["wq"], p["xq"], p["scales"], g, p["sx"], clamp=p["clamp"],
                                     bias=p["bias"])
        y = op(as_lib(xt, p["lib"]), p["sx"], bias=p["bias"], layout="NK")
        assert y.shape == (xt.shape[0], g.O)
        assert_bit_identical(y, np.ascontiguousarray(ref.T))
        out = np.full((g.O, xt.shape[0]), np.nan, np.float32).T      # a strided out
        assert op(xt, p["sx"], bias=p["bias"], out=out, layout="NK") is out
        assert_bit_identical(np.ascontiguousarray(out), np.ascontiguousarray(ref.T))
        # a transposed view given as "KN" (non-contiguous input) is the same product
        assert_bit_identical(op(xt.T, p["sx"], bias=p["bias"]), ref)
    finally:
        kernels._CHUNK_BYTES = old


def test_bad_layout(setup):
    g, wq, xq, s = setup
    op = TiledGemm(wq, g, s, w_bits=4)
    with pytest.raises(ValueError, match="layout must be"):
        op(xq, 0.1, layout="KNN")
    with pytest.raises(ValueError, match=r"input must be N x K with K=10"):
        op(xq, 0.1, layout="NK")                     # K x N given as N x K
