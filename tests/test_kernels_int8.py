"""The int8 tier of the tiled integer GEMM (pimsim.kernels, ``torch._int_mm``): exact int32
partial sums, bit-identical outputs, its bounds (int8 operands, partial sums <= 2^31 - 1) and
its guard (import-time test, ``PIMSIM_INT8=0``, ``use_int8``)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimsim import kernels
from pimsim.kernels import (
    I32_EXACT,
    TiledGemm,
    int8_fits,
    partial_sums_reference,
    plan_path,
    psum_bound,
    tiled_matmul_reference,
    use_int8,
)
from pimsim.quant import TileGrid

PROP = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
needs_int8 = pytest.mark.skipif(not kernels.int8_available(),
                                reason=f"int8 GEMM not available: {kernels.INT8_UNAVAILABLE}")


def same_bits(y, ref):
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))


# ---------------------------------------------------------------------------- the rule
def test_int8_rule_by_hand():
    # operands: weights <= 8 bits, signed inputs <= 8 bits, unsigned inputs <= 7 bits (255 > 127)
    assert int8_fits(128, 8, 8) and int8_fits(128, 4, 8) and int8_fits(128, 8, 7, True)
    assert not int8_fits(128, 9, 8) and not int8_fits(128, 8, 9)
    assert not int8_fits(128, 8, 8, a_unsigned=True)
    # bound: 131071 * 2^7 * 2^7 = 2^31 - 2^14 fits int32, 131072 columns reach 2^31, which does not
    assert psum_bound(131071, 8, 8) == 2**31 - 2**14 <= I32_EXACT
    assert int8_fits(131071, 8, 8) and not int8_fits(131072, 8, 8)
    assert plan_path(131072, 8, 8, int8=True) == "f64"
    # unsigned 7-bit: 2^7 * 2^7 per term as well
    assert int8_fits(131071, 8, 7, True) and not int8_fits(131072, 8, 7, True)
    assert plan_path(128, 4, 8, int8=True) == "int8"
    assert plan_path(128, 4, 8, int8=False) == "f32"


@needs_int8
def test_auto_and_switches():
    g = TileGrid(4, 16, 4, 8)
    w, s = np.ones((4, 16), np.int8), np.ones(g.shape)
    assert TiledGemm(w, g, s, w_bits=4, a_bits=8).path == "int8"
    with use_int8(False):
        assert TiledGemm(w, g, s, w_bits=4, a_bits=8).path == "f32"
        assert TiledGemm(w, g, s, w_bits=4, a_bits=8, path="int8").path == "int8"   # explicit
    assert kernels.int8_enabled()
    # unsigned 8-bit inputs keep the float tiers; so do grouped operators under auto
    assert TiledGemm(w, g, s, w_bits=4, a_bits=8, a_unsigned=True).path == "f32"
    gg = TileGrid(4, 8, 2, 8, groups=2)
    assert TiledGemm(np.ones((4, 8), np.int8), gg, np.ones(gg.shape), w_bits=4).path == "f32"


def test_explicit_int8_refused_where_not_exact():
    g = TileGrid(2, 131072, 2, 131072)
    w = np.zeros((2, 131072), np.int8)
    with pytest.raises(ValueError, match=r"path 'int8' is not exact for c=131072, w_bits=8, "
                                         r"a_bits=8: needs 'f64'"):
        TiledGemm(w, g, np.ones(g.shape), w_bits=8, a_bits=8, path="int8")
    g = TileGrid(2, 16, 2, 16)
    with pytest.raises(ValueError, match=r"path 'int8' is not exact .*a_bits=8 unsigned"):
        TiledGemm(np.zeros((2, 16), np.int8), g, np.ones(g.shape), w_bits=8, a_bits=8,
                  path="int8", a_unsigned=True)


def test_env_var_disables_int8():
    code = ("from pimsim import kernels; from pimsim.quant import TileGrid; import numpy as np; "
            "g = TileGrid(2, 8, 2, 8); print(kernels.int8_enabled(), "
            "kernels.TiledGemm(np.ones((2, 8), np.int8), g, np.ones(g.shape), w_bits=4).path)")
    env = dict(os.environ, PIMSIM_INT8="0", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "f32"]


# ---------------------------------------------------------------------------- exactness
@st.composite
def problems(draw):
    O, K = draw(st.integers(1, 40)), draw(st.integers(1, 200))
    N = draw(st.integers(1, 120))
    r, c = draw(st.integers(1, O)), draw(st.integers(1, K))
    wb, ab = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    unsigned = draw(st.booleans()) and ab <= 7
    fill = draw(st.sampled_from(["uniform", "extreme", "min"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    wlo, whi = -(1 << (wb - 1)), (1 << (wb - 1)) - 1
    xlo, xhi = (0, (1 << ab) - 1) if unsigned else (-(1 << (ab - 1)), (1 << (ab - 1)) - 1)
    if fill == "uniform":
        wq, xq = rng.integers(wlo, whi + 1, (O, K)), rng.integers(xlo, xhi + 1, (K, N))
    elif fill == "extreme":
        wq = rng.choice([wlo, whi, 0], (O, K))
        xq = rng.choice([xlo, xhi, 0], (K, N))
    else:                               # the largest |product| everywhere
        wq = np.full((O, K), wlo)
        xq = np.full((K, N), xhi if unsigned else xlo)
    g = TileGrid(O, K, r, c)
    clamp = None if draw(st.booleans()) else rng.uniform(0, psum_bound(c, wb, ab, unsigned), g.shape)
    return dict(g=g, wq=wq.astype(np.int8), xq=xq.astype(np.float32 if unsigned else np.int8),
                wb=wb, ab=ab, unsigned=unsigned, clamp=clamp,
                scales=10.0 ** rng.uniform(-3, 1, g.shape), sx=float(10.0 ** rng.uniform(-3, 0)),
                bias=rng.standard_normal(O).astype(np.float32))


@needs_int8
@settings(PROP, max_examples=80)
@given(p=problems(), layout=st.sampled_from(["KN", "NK"]))
def test_int8_matches_int64_reference(p, layout):
    g = p["g"]
    op = TiledGemm(p["wq"], g, p["scales"], w_bits=p["wb"], a_bits=p["ab"], clamp=p["clamp"],
                   path="int8", a_unsigned=p["unsigned"])
    x = p["xq"] if layout == "KN" else np.ascontiguousarray(p["xq"].T)
    ref_p = partial_sums_reference(p["wq"], p["xq"].astype(np.int64), g)
    np.testing.assert_array_equal(op.partial_sums(x, layout), ref_p)
    ref = tiled_matmul_reference(p["wq"], p["xq"].astype(np.int64), p["scales"], g, p["sx"],
                                 clamp=p["clamp"], bias=p["bias"])
    y = op(torch.from_numpy(x), p["sx"], bias=p["bias"], layout=layout)
    same_bits(y if layout == "KN" else np.ascontiguousarray(y.T), ref)


@needs_int8
@settings(PROP, max_examples=25)
@given(B=st.integers(1, 3), C=st.integers(1, 9), O=st.integers(1, 20), hw=st.integers(1, 9),
       k=st.sampled_from([1, 3]), stride=st.integers(1, 2), c=st.integers(1, 40),
       seed=st.integers(0, 99))
def test_int8_conv_equals_float_path(B, C, O, hw, k, stride, c, seed):
    rng = np.random.default_rng(seed)
    K = C * k * k
    g = TileGrid(O, K, max(1, O // 2), min(c, K))
    wq = rng.integers(-8, 8, (O, K)).astype(np.int8)
    x = torch.from_numpy(rng.integers(-128, 128, (B, C, hw, hw)).astype(np.float32))
    s = rng.uniform(0.5, 2, g.shape)
    geom = ((k, k), (stride, stride), (k // 2, k // 2))
    a = TiledGemm(wq, g, s, w_bits=4, a_bits=8, path="int8").conv(x, 0.01, *geom)
    b = TiledGemm(wq, g, s, w_bits=4, a_bits=8, path="f32").conv(x, 0.01, *geom)
    same_bits(a, b)


@needs_int8
def test_int8_grouped_explicit_equals_reference():
    rng = np.random.default_rng(1)
    g = TileGrid(12, 10, 2, 4, groups=3)
    wq = rng.integers(-128, 128, (12, 10)).astype(np.int8)
    xq = rng.integers(-128, 128, (30, 50)).astype(np.int8)
    op = TiledGemm(wq, g, np.ones(g.shape), w_bits=8, a_bits=8, path="int8")
    np.testing.assert_array_equal(op.partial_sums(xq), partial_sums_reference(wq, xq, g))


@needs_int8
def test_int8_at_the_int32_bound():
    """131071 columns of (-128) * (-128) = 2^31 - 2^14 (int32), plus odd terms; the f32 path
    would round these, the int8 one must not."""
    c = 131071
    wq = np.full((2, c), -128, np.int8)
    xq = np.full((c, 3), -128, np.int8)
    xq[:7, 1] = 127                               # column 1: 7 terms of -128*127 instead
    g = TileGrid(2, c, 2, c)
    op = TiledGemm(wq, g, np.ones(g.shape), w_bits=8, a_bits=8)
    assert op.path == "int8"
    want = wq.astype(np.int64) @ xq.astype(np.int64)
    assert want.max() == 2**31 - 2**14 and want[0, 1] % 2 == 0 and want[0, 1] != want[0, 0]
    np.testing.assert_array_equal(op.partial_sums(xq)[0], want)
    same_bits(op(xq, 1.0), tiled_matmul_reference(wq, xq, np.ones(g.shape), g, 1.0))


def test_degenerate_strides_are_copied():
    """A (1, n) tensor with strides (1, 1) counts as contiguous in torch; oneDNN misreads it."""
    t = torch.arange(6, dtype=torch.int8).reshape(6, 1).t().contiguous()
    assert t.stride() == (1, 1)
    r = kernels._row_major(t)
    assert r.stride() == (6, 1) and torch.equal(r, t)
    ok = torch.zeros(3, 8, dtype=torch.int8)[:, 2:5]
    assert kernels._row_major(ok) is ok
