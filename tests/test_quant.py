"""Tests of the symmetric quantizer (Eq. 1-2) and the tile granularity (Eq. 4-5) in pimsim.quant."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimsim.quant import (
    Granularity,
    TileGrid,
    dequantize,
    fake_quantize,
    max_scale,
    max_scales,
    quantize,
    quantize_weight,
)

ALL_BITS = list(range(2, 17))
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def qr(b):
    return -(1 << (b - 1)), (1 << (b - 1)) - 1


def exact_round_half_even(x, s):
    """round(x / s) on the exact rationals, ties to even (Eq. 1 without the clamp)."""
    q = Fraction(float(x)) / Fraction(float(s))
    f = math.floor(q)
    d = q - f
    if d > Fraction(1, 2) or (d == Fraction(1, 2) and f % 2):
        f += 1
    return f


def both(x, scale, bits):
    """quantize a numpy array and the same data as a torch tensor; return both as numpy."""
    qn = quantize(x, scale, bits)
    sc = torch.from_numpy(np.asarray(scale)) if isinstance(scale, np.ndarray) else scale
    qt = quantize(torch.from_numpy(x), sc, bits)
    assert isinstance(qn, np.ndarray) and isinstance(qt, torch.Tensor)
    return qn, qt.numpy()


# --------------------------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_round_half_to_even(dtype):
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 0.49, 0.51, 0.0], dtype=dtype)
    want = np.array([0, 2, 2, 0, -2, -2, 4, -4, 0, 1, 0])
    qn, qt = both(x, 1.0, 8)
    np.testing.assert_array_equal(qn, want)
    np.testing.assert_array_equal(qt, want)
    # the same ties reached through a scale: x / s = k + 1/2 exactly
    qn, qt = both(x * 0.25, 0.25, 8)
    np.testing.assert_array_equal(qn, want)
    np.testing.assert_array_equal(qt, want)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_clamp_range_and_dtype(bits):
    lo, hi = qr(bits)
    x = np.array([-1e30, lo - 1.0, lo - 0.5, lo, lo + 0.4, -1.0, 0.0, 1.0, hi - 0.4, hi,
                  hi + 0.5, hi + 1.0, 1e30], dtype=np.float64)
    want = np.array([lo, lo, lo, lo, lo, -1, 0, 1, hi, hi, hi, hi, hi])
    qn, qt = both(x, 1.0, bits)
    dt = np.int8 if bits <= 8 else np.int16
    assert qn.dtype == dt
    assert qt.dtype == dt
    np.testing.assert_array_equal(qn, want)
    np.testing.assert_array_equal(qt, want)
    # float32 data as well (the torch path keeps the dtype of the data)
    qn, qt = both(x.astype(np.float32), 1.0, bits)
    assert qn.dtype == dt and qt.dtype == dt
    np.testing.assert_array_equal(qn, want)
    np.testing.assert_array_equal(qt, want)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_dequantize_numpy_torch_identical(bits):
    lo, hi = qr(bits)
    rng = np.random.default_rng(bits)
    q = rng.integers(lo, hi + 1, size=(7, 9)).astype(np.int8 if bits <= 8 else np.int16)
    s = rng.uniform(0.01, 3.0, size=(7, 1))
    dn = dequantize(q, s)
    dtn = dequantize(torch.from_numpy(q), torch.from_numpy(s))
    dts = dequantize(torch.from_numpy(q), s)
    assert dn.dtype == np.float32 and dtn.dtype == torch.float32
    np.testing.assert_array_equal(dn, dtn.numpy())
    np.testing.assert_array_equal(dn, dts.numpy())
    np.testing.assert_array_equal(dn, q.astype(np.float32) * s.astype(np.float32))


@HYP
@given(bits=st.integers(2, 16), seed=st.integers(0, 2**32 - 1),
       log_scale=st.floats(-6, 3), shape=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_numpy_torch_same_integers_float64(bits, seed, log_scale, shape):
    rng = np.random.default_rng(seed)
    s = 10.0 ** log_scale
    lo, hi = qr(bits)
    x = rng.uniform(lo - 3, hi + 3, size=shape) * s
    qn, qt = both(x, s, bits)
    np.testing.assert_array_equal(qn, qt)
    assert qn.min() >= lo and qn.max() <= hi
    # and it is Eq. 1: clamp(round_half_even(x / s))
    np.testing.assert_array_equal(qn, np.clip(np.rint(x / s), lo, hi))


@HYP
@given(bits=st.integers(2, 16), seed=st.integers(0, 2**32 - 1),
       shape=st.tuples(st.integers(1, 6), st.integers(1, 6)))
def test_per_element_broadcast_scales(bits, seed, shape):
    rng = np.random.default_rng(seed)
    lo, hi = qr(bits)
    O, K = shape
    for s in (rng.uniform(0.01, 2, size=(O, K)), rng.uniform(0.01, 2, size=(O, 1)),
              rng.uniform(0.01, 2, size=(1, K)), rng.uniform(0.01, 2, size=(K,))):
        x = rng.uniform(lo - 2, hi + 2, size=(O, K)) * np.broadcast_to(s, (O, K))
        qn, qt = both(x, s, bits)
        np.testing.assert_array_equal(qn, qt)
        np.testing.assert_array_equal(qn, np.clip(np.rint(x / s), lo, hi))
        # element-wise: the same as quantizing every element with its own scalar scale
        sb = np.broadcast_to(s, (O, K))
        for o in range(O):
            for k in range(K):
                assert qn[o, k] == quantize(np.array([x[o, k]]), float(sb[o, k]), bits)[0]


def test_fake_quantize_is_dequantized_quantize():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 6))
    s = rng.uniform(0.05, 0.2, size=(5, 1))
    q = quantize(x, s, 4)
    np.testing.assert_array_equal(fake_quantize(x, s, 4), dequantize(q, s))
    xt = torch.from_numpy(x)
    np.testing.assert_array_equal(fake_quantize(xt, torch.from_numpy(s), 4).numpy(),
                                  dequantize(q, s))


# numpy vs torch on float32 data -------------------------------------------------------------
#
# Regression: the torch path used to divide in the dtype of the data (float32 for float32 and
# integer tensors) while numpy divided in float64, so for x / s just below a half-integer the
# float32 quotient rounded onto the .5 and the two paths gave different integers, e.g.
#     x = float32(-3.35) = -3.3499999046325684, s = 0.1, bits 8: exact x / s = -33.49999990...
#     numpy -33 (correct), torch float32(x) / float32(0.1) = -33.5 -> -34.

@pytest.mark.parametrize("x,s", [(-3.35, 0.1), (7.95, 0.1), (6.125, 0.07)])
def test_numpy_torch_same_integers_float32_known_cases(x, s):
    xa = np.array([x], dtype=np.float32)
    want = exact_round_half_even(xa[0], s)
    qn, qt = both(xa, s, 8)
    assert int(qn[0]) == want, "numpy path"
    assert int(qt[0]) == want, f"torch path gives {int(qt[0])}, numpy and exact give {want}"


@HYP
@given(bits=st.integers(2, 16), seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-4, 1))
def test_numpy_torch_same_integers_float32(bits, seed, log_scale):
    rng = np.random.default_rng(seed)
    s = 10.0 ** log_scale
    lo, hi = qr(bits)
    # values near half-integers multiples of s, where the precision of x / s matters
    k = rng.integers(lo - 2, hi + 2, size=4000)
    x = ((k + 0.5 + rng.uniform(-1e-6, 1e-6, size=k.size)) * s).astype(np.float32)
    qn, qt = both(x, s, bits)
    np.testing.assert_array_equal(qn, qt)


@HYP
@given(bits=st.integers(2, 16), seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-2, 3),
       dtype=st.sampled_from([np.int8, np.int16, np.int32]))
def test_numpy_torch_same_integers_integer_data(bits, seed, log_scale, dtype):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    x = rng.integers(max(info.min, -(2**20)), min(info.max, 2**20), size=3000).astype(dtype)
    s = 10.0 ** log_scale
    qn, qt = both(x, s, bits)
    np.testing.assert_array_equal(qn, qt)
    np.testing.assert_array_equal(qn, np.clip(np.rint(x.astype(np.float64) / s), *qr(bits)))


# errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 17, 0, -3, 4.0, True, False, "8", None])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_bad_bits(bits, lib):
    x = np.ones(3) if lib == "numpy" else torch.ones(3)
    match = r"bits must be (an integer in|in) 2\.\.16"
    with pytest.raises(ValueError, match=match):
        quantize(x, 1.0, bits)


@pytest.mark.parametrize("scale,match", [
    (0.0, r"scale must be > 0"),
    (-0.5, r"scale must be > 0"),
    (np.nan, r"scale contains NaN"),
    (np.inf, r"scale contains inf"),
    (-np.inf, r"scale contains inf"),
    (np.array([1.0, 0.0, 1.0]), r"scale must be > 0"),
    (np.array([1.0, np.nan, 1.0]), r"scale contains NaN"),
    (np.array([], dtype=np.float64), r"scale is empty"),
])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_bad_scale(scale, match, lib):
    x = np.ones(3) if lib == "numpy" else torch.ones(3)
    with pytest.raises(ValueError, match=match):
        quantize(x, scale, 8)
    if lib == "torch" and np.ndim(scale) > 0:
        with pytest.raises(ValueError, match=match):
            quantize(x, torch.from_numpy(np.asarray(scale)), 8)


@pytest.mark.parametrize("bad,match", [(np.nan, r"contains NaN"), (np.inf, r"contains inf"),
                                       (-np.inf, r"contains inf")])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bad_data(bad, match, lib, dtype):
    x = np.array([1.0, bad, 2.0], dtype=dtype)
    if lib == "torch":
        x = torch.from_numpy(x)
    with pytest.raises(ValueError, match=match):
        quantize(x, 1.0, 8)


# --------------------------------------------------------------------------------------------
# Granularity / TileGrid
# --------------------------------------------------------------------------------------------

def cdiv(a, b):
    return -(-a // b)


@given(O=st.integers(1, 600), K=st.integers(1, 5000), r=st.integers(1, 700),
       c=st.integers(1, 6000), m=st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_resolve(O, K, r, c, m):
    g = Granularity.tile(r, c).resolve(O, K)
    assert (g.O, g.K, g.r, g.c) == (O, K, min(r, O), min(c, K))
    assert g.shape == (cdiv(O, g.r), cdiv(K, g.c))
    assert g.n_tiles == g.shape[0] * g.shape[1]

    g = Granularity.split(r, m).resolve(O, K)
    assert g.c == math.ceil(K / m) == cdiv(K, m)
    assert g.r == min(r, O)
    assert g.shape == (cdiv(O, g.r), cdiv(K, g.c))
    assert g.shape[1] <= m

    g = Granularity.layerwise().resolve(O, K)
    assert (g.r, g.c, g.shape) == (O, K, (1, 1))

    g = Granularity.channelwise().resolve(O, K)
    assert (g.r, g.c, g.shape) == (1, K, (O, 1))


def test_resolve_hand_cases():
    # a ResNet-20 stage-2 conv: O=32, K=16*9=144
    assert Granularity.tile(16, 72).resolve(32, 144).shape == (2, 2)
    assert Granularity.tile(16, 576).resolve(32, 144) == TileGrid(32, 144, 16, 144)
    assert Granularity.tile(5, 50).resolve(32, 144).shape == (7, 3)        # ragged edges
    assert Granularity.split(8, 4).resolve(64, 576) == TileGrid(64, 576, 8, 144)
    assert Granularity.split(8, 16).resolve(16, 27) == TileGrid(16, 27, 8, 2)   # c=ceil(27/16)
    assert Granularity.split(8, 16).resolve(16, 27).shape == (2, 14)
    assert Granularity.split(100, 100).resolve(3, 5) == TileGrid(3, 5, 3, 1)
    assert Granularity.layerwise().resolve(64, 576) == TileGrid(64, 576, 64, 576)
    assert Granularity.channelwise().resolve(64, 576) == TileGrid(64, 576, 1, 576)
    assert str(Granularity.tile(4, 36)) == "4x36"


@pytest.mark.parametrize("make", [
    lambda: Granularity.tile(0, 4), lambda: Granularity.tile(4, 0),
    lambda: Granularity.tile(-1, 4), lambda: Granularity.tile(4, -8),
    lambda: Granularity.tile(2.0, 4), lambda: Granularity.tile(4, 2.5),
    lambda: Granularity.tile(True, 4), lambda: Granularity.tile(None, 4),
    lambda: Granularity.split(4, 0), lambda: Granularity.split(0, 4),
    lambda: Granularity.split(4, 1.5), lambda: Granularity.split(-4, 2),
    lambda: Granularity("rowwise"),
    lambda: Granularity.tile(4, 4).resolve(0, 8), lambda: Granularity.tile(4, 4).resolve(8, 0),
    lambda: Granularity.tile(4, 4).resolve(-8, 8), lambda: Granularity.tile(4, 4).resolve(8.0, 8),
    lambda: TileGrid(4, 4, 5, 4), lambda: TileGrid(4, 4, 4, 5), lambda: TileGrid(4, 4, 0, 4),
    lambda: TileGrid(4, 4, 2, 2).expand(np.ones((2, 3))),
    lambda: TileGrid(4, 4, 2, 2).block_absmax(np.ones((4, 5))),
    lambda: quantize_weight(np.ones((4, 5)), TileGrid(4, 4, 2, 2), np.ones((2, 2)), 4),
])
def test_bad_sizes(make):
    with pytest.raises(ValueError):
        make()


def test_bad_size_messages():
    with pytest.raises(ValueError, match="tile rows r must be a positive integer"):
        Granularity.tile(0, 4)
    with pytest.raises(ValueError, match="tile columns c must be a positive integer"):
        Granularity.tile(4, 2.5)
    with pytest.raises(ValueError, match="splits m must be a positive integer"):
        Granularity.split(4, -1)
    with pytest.raises(ValueError, match="granularity kind must be one of"):
        Granularity("rowwise")


grids = st.tuples(st.integers(1, 70), st.integers(1, 70), st.integers(1, 80),
                  st.integers(1, 80)).map(
    lambda t: Granularity.tile(t[2], t[3]).resolve(t[0], t[1]))


@HYP
@given(g=grids)
def test_tiles_partition_the_matrix(g):
    cover = np.zeros((g.O, g.K), dtype=np.int64)
    seen = []
    for i, j, rows, cols in g.tiles():
        seen.append((i, j))
        assert (rows, cols) == g.tile_slices(i, j)
        assert rows.step is None and cols.step is None
        h, w = rows.stop - rows.start, cols.stop - cols.start
        assert 1 <= h <= g.r and 1 <= w <= g.c
        # only the last row block / column block may be smaller (ragged edges)
        assert h == g.r or (i == g.n_row_blocks - 1 and h == g.O - i * g.r)
        assert w == g.c or (j == g.n_col_blocks - 1 and w == g.K - j * g.c)
        cover[rows, cols] += 1
    assert seen == [(i, j) for i in range(g.n_row_blocks) for j in range(g.n_col_blocks)]
    assert (cover == 1).all()
    np.testing.assert_array_equal(g.row_block_index(), np.arange(g.O) // g.r)
    b = g.col_bounds()
    assert b[0] == 0 and b[-1] == g.K and len(b) == g.n_col_blocks + 1
    assert [slice(b[j], b[j + 1]) for j in range(g.n_col_blocks)] == \
        [g.col_slice(j) for j in range(g.n_col_blocks)]
    with pytest.raises(IndexError):
        g.row_slice(g.n_row_blocks)
    with pytest.raises(IndexError):
        g.col_slice(-1)


@HYP
@given(g=grids, seed=st.integers(0, 2**32 - 1))
def test_expand_and_block_absmax_match_loop(g, seed):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.1, 5, size=g.shape)
    w = rng.standard_normal((g.O, g.K)) * rng.uniform(0.01, 10)
    e = g.expand(s)
    am = g.block_absmax(w)
    assert e.shape == (g.O, g.K) and am.shape == g.shape
    e_loop = np.full((g.O, g.K), np.nan)
    for i, j, rows, cols in g.tiles():
        e_loop[rows, cols] = s[i, j]
        assert am[i, j] == np.abs(w[rows, cols]).max()
    np.testing.assert_array_equal(e, e_loop)


@HYP
@given(g=grids, seed=st.integers(0, 2**32 - 1), bits=st.integers(2, 16),
       log_mag=st.floats(-8, 8), zero_frac=st.floats(0, 0.6), dtype=st.sampled_from(["f32", "f64"]))
def test_max_scales_and_quantize_weight(g, seed, bits, log_mag, zero_frac, dtype):
    rng = np.random.default_rng(seed)
    lo, hi = qr(bits)
    w = rng.standard_normal((g.O, g.K)) * 10.0 ** log_mag
    zero_tiles = rng.random(g.shape) < zero_frac
    for i, j, rows, cols in g.tiles():
        if zero_tiles[i, j]:
            w[rows, cols] = 0.0
    if dtype == "f32":
        w = w.astype(np.float32)
    s = max_scales(w, g, bits)
    assert s.shape == g.shape and s.dtype == np.float64
    assert (s > 0).all()
    q = quantize_weight(w, g, s, bits)
    assert q.dtype == (np.int8 if bits <= 8 else np.int16)
    assert q.min() >= -hi and q.max() <= hi        # max calibration never hits -2^(b-1)
    for i, j, rows, cols in g.tiles():
        a = np.abs(w[rows, cols].astype(np.float64)).max()
        if a > 0:
            assert s[i, j] == a / hi
            assert np.abs(q[rows, cols]).max() == hi
            # the element(s) of largest magnitude land exactly on +-hi
            big = np.abs(w[rows, cols]) == a
            np.testing.assert_array_equal(np.abs(q[rows, cols][big]), hi)
        else:
            assert s[i, j] == 1.0
            assert (q[rows, cols] == 0).all()
    np.testing.assert_array_equal(q, quantize(w, g.expand(s), bits))


def test_max_scale_values():
    np.testing.assert_array_equal(max_scale([0.0, 7.0, 14.0], 4), [1.0, 1.0, 2.0])
    assert max_scale(127.0, 8) == 1.0
    assert max_scale(32767.0 * 0.5, 16) == 0.5
    assert max_scale(3.0, 2) == 3.0          # 2 bits: levels -2..1, hi = 1


# Regression: a non-zero absmax below hi * 5e-324 (float64 subnormal range) gave
# absmax / hi == 0.0, i.e. scale 0 for a non-zero tile, and quantize_weight then raised
# "scale must be > 0" (input: absmax 5e-324, bits 4 -> scale 0.0).
def test_max_scale_positive_for_tiny_nonzero_absmax():
    s = max_scale(np.array([5e-324, 1e-323]), 4)
    assert (s > 0).all(), f"max_scale gave {s} for a non-zero absmax"
    g = Granularity.layerwise().resolve(1, 2)
    w = np.array([[5e-324, 0.0]])
    quantize_weight(w, g, max_scales(w, g, 4), 4)
