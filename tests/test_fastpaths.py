"""The kernel path's fast input stages against independent references: the shifted-row im2col
(stride and dilation 1 along the width) against ``F.unfold`` on arbitrary row chunks, and the
one-pass int8 quantizer against torch's ``clamp(round(x / s))`` on values at rounding ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimsim.kernels import (_im2col_rows, _im2col_rows_w1, _channels_last, conv_out_hw,
                            im2col_rows, quantize_int8_channels_last)

PROP = settings(deadline=None, max_examples=120,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _unfold_rows(x, ks, st_, pd, dl):
    K = x.shape[1] * ks[0] * ks[1]
    return F.unfold(x, ks, dilation=dl, padding=pd, stride=st_).permute(0, 2, 1).reshape(-1, K)


@st.composite
def w1_geometry(draw):
    """Convolutions of width stride 1 and width dilation 1 (what ``_im2col_rows_w1`` takes)."""
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(2, 4))
    sh, ph, pw, dh = (draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 3)),
                      draw(st.integers(1, 3)))
    H = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 12))
    W = draw(st.integers(max(1, kw - 2 * pw), 12))
    return B, C, H, W, ((kh, kw), (sh, 1), (ph, pw), (dh, 1))


@PROP
@given(w1_geometry(), st.data())
def test_shifted_im2col_rows_equal_unfold_on_any_chunk(geo, data):
    B, C, H, W, g = geo
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    x = rng.integers(-128, 128, size=(B, C, H, W)).astype(np.int8)
    want = _unfold_rows(torch.from_numpy(x.astype(np.float32)), *g).numpy()
    ho, wo = conv_out_hw(H, W, *g)
    N = B * ho * wo
    assert want.shape[0] == N
    xh = _channels_last(torch.from_numpy(x))
    n0 = data.draw(st.integers(0, N - 1), label="n0")
    n1 = data.draw(st.integers(n0, N), label="n1")
    out = np.full((n1 - n0, want.shape[1]), 99, dtype=np.int8)   # 99: no stale value passes
    (kh, kw), (sh, _), (ph, pw), (dh, _) = g
    _im2col_rows_w1(xh, kh, kw, sh, ph, pw, dh, n0, out)
    np.testing.assert_array_equal(out.astype(np.float32), want[n0:n1])
    out2 = np.empty_like(out)
    im2col_rows(xh, g, n0, out2)                                  # the dispatcher picks it
    np.testing.assert_array_equal(out2, out)


def test_im2col_dispatch_keeps_the_general_kernel_for_strided_widths():
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, size=(2, 3, 9, 10)).astype(np.int8)
    g = ((3, 3), (1, 2), (1, 1), (1, 1))
    xh = _channels_last(torch.from_numpy(x))
    want = _unfold_rows(torch.from_numpy(x.astype(np.float32)), *g).numpy()
    out = np.empty(want.shape, np.int8)
    im2col_rows(xh, g, 0, out)
    np.testing.assert_array_equal(out.astype(np.float32), want)
    ref = np.empty_like(out)
    _im2col_rows(xh, 3, 3, 1, 2, 1, 1, 1, 1, 0, ref)
    np.testing.assert_array_equal(ref, out)


def _tie_values(rng, s, n):
    """float32 values at and next to the rounding ties of x / s and on the integer grid."""
    k = rng.integers(-140, 140, n).astype(np.float64)
    v = np.concatenate([(k + 0.5) * s, k * s, rng.normal(0, 60 * s, n)]).astype(np.float32)
    return np.concatenate([v, np.nextafter(v, np.float32(np.inf)),
                           np.nextafter(v, np.float32(-np.inf))])


@pytest.mark.parametrize("s, lo, hi", [(0.0123456789, -128, 127), (0.37, -127, 127),
                                       (0.3, 0, 127), (2.5e-3, -8, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_int8_quantizer_equals_torch_round_clamp(s, lo, hi, channels_last):
    rng = np.random.default_rng(0)
    v = _tie_values(rng, s, 20_000)
    n = len(v) // 60 * 60
    x = torch.from_numpy(v[:n].copy()).reshape(-1, 3, 4, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.div(x, s).round_().clamp_(lo, hi)            # GemmLayer.quantize_input
    got = quantize_int8_channels_last(x, s, lo, hi)
    assert got.dtype == torch.int8 and got.shape == x.shape
    assert got.permute(0, 2, 3, 1).is_contiguous()              # channels-last memory
    assert torch.equal(got.float(), want)
    # the ties are there: half-away-from-zero rounding or a float64 division would differ
    away = torch.sign(x / s) * torch.floor(torch.abs(x / s) + 0.5)
    assert not torch.equal(away.clamp(lo, hi), want)
    f64 = torch.from_numpy(np.rint(x.double().numpy() / s)).float().clamp(lo, hi)
    assert not torch.equal(f64, want)


def test_int8_quantizer_refuses_what_int8_cannot_hold():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="-128 <= lo <= hi <= 127"):
        quantize_int8_channels_last(x, 0.1, 0, 255)
    with pytest.raises(ValueError, match="float32 B x C x H x W"):
        quantize_int8_channels_last(x.double(), 0.1, -128, 127)


@pytest.mark.parametrize("path", ["auto", "f32", "f64", "int"])
@pytest.mark.parametrize("geometry", [((1, 1), (1, 1), (0, 0), (1, 1)),    # rows = the input
                                      ((1, 1), (2, 2), (0, 0), (1, 1)),
                                      ((3, 3), (1, 1), (1, 1), (1, 1)),
                                      ((3, 3), (2, 2), (1, 1), (1, 1))])
def test_tiled_conv_equals_reference_on_unfold_rows(path, geometry):
    from pimsim.kernels import TiledGemm, tiled_matmul_reference
    from pimsim.quant import TileGrid
    rng = np.random.default_rng(3)
    B, C, H, W, O = 3, 6, 7, 9, 5
    ks = geometry[0]
    K = C * ks[0] * ks[1]
    grid = TileGrid(O, K, 2, 4)
    wq = rng.integers(-8, 8, size=(O, K)).astype(np.int8)
    scales = rng.uniform(0.01, 2.0, size=grid.shape)
    bias = rng.standard_normal(O).astype(np.float32)
    x = torch.from_numpy(rng.integers(-128, 128, size=(B, C, H, W)).astype(np.float32))
    op = TiledGemm(wq, grid, scales, w_bits=4, a_bits=8, path=path)
    y = op.conv(x, 0.05, *geometry, bias=bias)
    rows = _unfold_rows(x, *geometry).numpy().astype(np.int64)          # N x K, independent
    ref = tiled_matmul_reference(wq, rows.T, scales, grid, 0.05, bias=bias)
    np.testing.assert_allclose(y.T, ref, rtol=0, atol=1e-6 * max(1.0, np.abs(ref).max()))


def test_set_threads_reaches_numpys_blas_pool():
    """A '1-thread' run must not leave NumPy's OpenBLAS pool on every core (it ran the
    calibration's and the searches' NumPy products on 2 cores in a --threads 1 benchmark)."""
    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_info
    from pimsim.kernels import set_threads, threads

    def blas():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    if not blas():
        pytest.skip("NumPy has no BLAS pool threadpoolctl can see")
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert blas() and all(n == 1 for n in blas())
        with threads(2):
            assert all(n == 2 for n in blas())
        assert all(n == 1 for n in blas())          # put back after the block
    finally:
        set_threads(before)


# ---------------------------------------------------------------- calibration's fused passes

@pytest.mark.parametrize("s, lo, hi", [(0.0123456789, -128, 127), (0.3, 0, 255),
                                       (2.5e-3, -8, 7)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d", "strided"])
def test_fake_quant_act_equals_the_four_torch_passes(s, lo, hi, layout):
    from pimsim.kernels import fake_quant_act
    rng = np.random.default_rng(1)
    v = _tie_values(rng, s, 20_000)
    n = len(v) // 60 * 60
    x = torch.from_numpy(v[:n].copy()).reshape(-1, 3, 4, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "2d":
        x = x.reshape(-1, 60)
    elif layout == "strided":
        x = x[:, :, :, ::2]                       # not dense: the torch fallback
    want = torch.div(x, s).round_().clamp_(lo, hi).mul_(np.float32(s))
    got = fake_quant_act(x, s, lo, hi)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert torch.equal(got, want)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    # a float64 product (or float64 division) would differ on these values
    f64 = (torch.div(x, s).round_().clamp_(lo, hi).double() * s).float()
    assert not torch.equal(f64, want) or s == 2.5e-3


def test_sq_diff_sum_against_float64_reference_and_thread_count():
    from pimsim import kernels
    rng = np.random.default_rng(2)
    a = torch.from_numpy(rng.standard_normal((7, 5, 33, 41)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((7, 5, 33, 41)).astype(np.float32))
    a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    d = (a - b).double().numpy().ravel()                   # float32 difference, as a - b
    want = float(np.sum(d * d, dtype=np.float64))
    got = kernels.sq_diff_sum(a, b)
    assert got == pytest.approx(want, rel=1e-13)
    # float32 accumulation is visibly off: the float64 sum matters
    f32 = float(np.sum((a - b).numpy().ravel() ** 2, dtype=np.float32))
    assert abs(f32 - want) > abs(got - want)
    with kernels.threads(1):
        one = kernels.sq_diff_sum(a, b)
    with kernels.threads(2):
        two = kernels.sq_diff_sum(a, b)
    assert one == two == got                               # fixed blocks: thread-count free
    # mixed layouts take the torch fallback, same value up to summation order
    assert kernels.sq_diff_sum(a, b.contiguous()) == pytest.approx(want, rel=1e-13)
    with pytest.raises(ValueError, match="shapes differ"):
        kernels.sq_diff_sum(a, b[:1])


@pytest.mark.parametrize("geom", [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)),
                                  ((1, 1), (2, 2), (0, 0), (1, 1)), ((3, 2), (1, 1), (2, 0), (2, 1))])
@pytest.mark.parametrize("a_bits, unsigned", [(8, False), (8, True), (4, False)])
def test_gram_stats_from_im2col_rows_equal_the_column_path(geom, a_bits, unsigned):
    """The row path (Numba im2col, channels-last target rows) gives the statistics of the column
    path (strided views, the reference) bit for bit, and H and u equal a float64 numpy
    computation from F.unfold (independent of both)."""
    from pimsim.network import GemmLayer
    from pimsim.ptqsl import LayerProblem
    torch.manual_seed(0)
    ks, st_, pd, dl = geom
    conv = torch.nn.Conv2d(6, 10, ks, stride=st_, padding=pd, dilation=dl)
    layer = GemmLayer("c", conv)
    x = torch.randn(37, 6, 11, 13)                # 37 images: several chunks of uneven size
    if unsigned:
        x = x.abs()
    y = conv(x).detach()
    prob = LayerProblem(layer, x, y, a_bits, unsigned=unsigned)
    s = float(x.abs().max()) / (2 ** (a_bits - 1)) * 0.6
    old_chunk = LayerProblem.conv_rows
    try:
        LayerProblem.conv_rows = True
        rows = prob.gram_stats(s)
        LayerProblem.conv_rows = False
        cols = prob.gram_stats(s)
    finally:
        LayerProblem.conv_rows = old_chunk
    for k in ("H", "Gs", "u", "ys", "yy"):
        assert np.array_equal(rows[k], cols[k]), k
    assert rows["N"] == cols["N"]
    q = prob.quantize_input(s).double()
    X = F.unfold(q, ks, dilation=dl, padding=pd, stride=st_).permute(1, 0, 2).reshape(q.shape[1] * ks[0] * ks[1], -1).numpy()
    assert np.array_equal(rows["H"], (X @ X.T) * (s * s))
    assert np.array_equal(rows["u"], X.sum(1) * s)
