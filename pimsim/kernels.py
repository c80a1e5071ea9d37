"""The tiled integer matrix product of Eq. 5, exact and fast, with a plain NumPy reference.

    Y[o, n] = s_x * sum_j s[i(o), j] * P_j[o, n],    P_j = Wq[:, cols_j] @ Xq[cols_j, :]

``Wq`` (O x K) and ``Xq`` (K x N) hold integers; ``P_j`` is the integer partial sum of the
sub-matrices of column block j (one crossbar tile per (i, j)); ``s`` has one scale per tile.
An optional clamp ``L`` (an ADC range) clips each tile's partial sum to ``[-L, L]`` before it is
rescaled.

Why the fast path is exact
--------------------------
The partial sums are computed by BLAS on integer-valued floats. Every term ``Wq[o,k] * Xq[k,n]``
is an integer of magnitude at most ``2^(bw-1) * 2^(ba-1)`` and every partial sum that any BLAS
summation order can form is an integer of magnitude at most ``B = c * 2^(bw-1) * 2^(ba-1)``
(unsigned activations in ``[0, 2^ba - 1]``, ``quant.act_signed``: ``2^ba`` instead of
``2^(ba-1)``).
IEEE binary32 represents every integer of magnitude <= 2^24 exactly, so when ``B <= 2^24`` each
product and each addition in an ``sgemm`` is exact, whatever the blocking, order or FMA use, and
``P_j`` comes out as the exact integer. When ``B > 2^24`` the same holds for binary64 up to 2^53
(``dgemm``); beyond that, plain integer loops in Numba (int64) are used.

The ``int8`` path (cheaper than all of them on CPUs with int8 dot products, e.g. AVX-512 VNNI)
stores both operands as int8 and forms each ``P_j`` with an int8 x int8 -> int32 GEMM
(``torch._int_mm``, oneDNN). It applies when every operand fits int8: signed weights of
``bw <= 8`` bits and signed activations of ``ba <= 8`` bits, or unsigned activations
(``quant.act_signed``, values in ``[0, 2^ba - 1]``) of ``ba <= 7`` bits — unsigned 8-bit inputs
reach 255, which int8 cannot hold, and keep the float paths. Each product then has magnitude at
most ``2^14`` and every partial sum any order can form (a sum of at most c of them) at most
``B``; when ``B <= 2^31 - 1`` the exact integer is an int32. Integer addition in two's complement
is exact modulo 2^32, so even a kernel that internally offsets an operand (u8 x s8 with a
compensation term) returns the exact partial sum, provided nothing saturates; a kernel that
saturates (16-bit pair sums on pre-VNNI x86) is caught by the feature test run at import on the
extreme products (-128 * -128, 127 * 127, -128 * 127, long dot products near 2^31), and the path
is then not offered. ``torch._int_mm`` is a private API: it is used only when present, and it
passes that test; ``PIMSIM_INT8=0`` in the environment or ``use_int8(False)`` turns it off.
``plan_path`` picks the cheapest exact path (``int8`` when enabled and applicable, else the
float paths in the order above). Only then do floats enter: the rescale and accumulation
``acc = sum_j float64(s_ij) * float64(clip(P_j))`` runs in float64 in the order j = 0..J-1, and
``Y = float32(float64(s_x) * acc) (+ bias)``; the reference performs the same operations in the
same order, so the two agree bit for bit on the partial sums and to within rounding of the
(identical) float operations on the output.

The partial sums are formed per column block as ``X^T[:, cols_j] @ W_j^T`` by BLAS
(``torch.mm``), in chunks of N that keep the converted input and the partial sums in cache,
and a parallel Numba kernel does clip, rescale and accumulate. ``im2col`` (Numba) writes the
pixel-major input of a convolution directly, so a conv layer needs no transposition.
"""

from __future__ import annotations

import contextlib
import math
import os

import numba
import numpy as np
import torch
from numba import njit, prange, uint64

from .quant import TileGrid, check_bits

F32_EXACT = 2**24
F64_EXACT = 2**53
I32_EXACT = 2**31 - 1
PATHS = ("auto", "int8", "f32", "f64", "int")

# Bytes of the converted input chunk plus its partial sums, per chunk of N columns.
_CHUNK_BYTES = 1 << 22


def psum_bound(c: int, w_bits: int, a_bits: int, a_unsigned: bool = False) -> int:
    """Largest magnitude a tile partial sum of c columns can take: ``c * 2^(bw-1) * 2^(ba-1)``;
    ``a_unsigned`` (inputs in ``[0, 2^ba - 1]``): ``c * 2^(bw-1) * 2^ba``."""
    return int(c) << (w_bits - 1) << (a_bits if a_unsigned else a_bits - 1)


def int8_fits(c: int, w_bits: int, a_bits: int, a_unsigned: bool = False) -> bool:
    """Whether the int8 path is exact for tiles of c columns: both operands fit int8 (weights
    ``<= 8`` bits, signed inputs ``<= 8`` bits, unsigned inputs ``<= 7`` bits) and the partial-sum
    bound is at most ``2^31 - 1``."""
    fits = w_bits <= 8 and (a_bits <= 7 if a_unsigned else a_bits <= 8)
    return fits and psum_bound(c, w_bits, a_bits, a_unsigned) <= I32_EXACT


def plan_path(c: int, w_bits: int, a_bits: int, a_unsigned: bool = False,
              int8: bool | None = None) -> str:
    """The cheapest exact path for tiles of c columns: ``int8`` (if ``int8``, default: the
    int8 path is enabled, ``int8_enabled()``, and ``int8_fits``), else ``f32``, ``f64`` or
    ``int``."""
    if int8 is None:
        int8 = int8_enabled()
    if int8 and int8_fits(c, w_bits, a_bits, a_unsigned):
        return "int8"
    b = psum_bound(c, w_bits, a_bits, a_unsigned)
    if b <= F32_EXACT:
        return "f32"
    if b <= F64_EXACT:
        return "f64"
    return "int"


# --------------------------------------------------------------------------------------------
# The int8 GEMM (torch._int_mm), guarded
# --------------------------------------------------------------------------------------------

def _int8_self_test() -> str:
    """'' if ``torch._int_mm`` exists and returns exact int32 products on the extreme and odd
    cases, else the reason it is not used."""
    mm = getattr(torch, "_int_mm", None)
    if mm is None:
        return f"torch {torch.__version__} has no torch._int_mm"
    try:
        rng = np.random.default_rng(0)
        cases = [np.full((24, 64), v, np.int8) for v in (-128, 127)]
        cases += [rng.integers(-128, 128, size=(33, 75)).astype(np.int8),
                  rng.integers(-128, 128, size=(3, 5)).astype(np.int8)]
        for a in cases:
            for b in (a.T, -np.maximum(a.T, -127), rng.integers(-128, 128, size=(a.shape[1], 9))):
                b = np.ascontiguousarray(b, dtype=np.int8)
                got = mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
                if got.dtype != np.int32 or not np.array_equal(
                        got.astype(np.int64), a.astype(np.int64) @ b.astype(np.int64)):
                    return "torch._int_mm gave an inexact product"
        # a dot product of 131071 terms of -128 * -128 = 2^31 - 2^14, just below int32's limit
        a = torch.full((1, 131071), -128, dtype=torch.int8)
        if int(mm(a.expand(17, -1).contiguous(), a.t().contiguous())[0, 0]) != 131071 << 14:
            return "torch._int_mm overflowed below 2^31"
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        return f"torch._int_mm failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return ""


INT8_UNAVAILABLE = _int8_self_test()          # '' when the int8 GEMM is there and exact
_int8_on = [not INT8_UNAVAILABLE and os.environ.get("PIMSIM_INT8", "1").strip() != "0"]


def int8_available() -> bool:
    """The int8 GEMM exists and passed its import-time exactness test."""
    return not INT8_UNAVAILABLE


def int8_enabled() -> bool:
    """The int8 path is offered by ``plan_path`` (available, not disabled by ``PIMSIM_INT8=0``
    or ``use_int8(False)``)."""
    return _int8_on[0]


@contextlib.contextmanager
def use_int8(flag: bool):
    """``with use_int8(False):`` operators built in the block do not choose the int8 path
    (``True``: they do, where available); the previous setting is restored on exit."""
    before = _int8_on[0]
    _int8_on[0] = bool(flag) and int8_available()
    try:
        yield _int8_on[0]
    finally:
        _int8_on[0] = before


def _bits_of(dtype) -> int:
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.integer):
        raise ValueError(f"integer operands required, got dtype {dt}; pass bits explicitly "
                         "for integer-valued float operands")
    return dt.itemsize * 8


def _as_numpy(a):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=False)
def _combine_kn(P, srow, lim, sx, bias, y, n0):
    """Clip, rescale, accumulate: P (J, O, nb) -> columns n0..n0+nb of Y (O x N).

    y[o, n0+n] = f32(sx * sum_j srow[j, o] * clip(P[j, o, n], lim[j, o])) + bias[o].
    """
    J, O, nb = P.shape
    for o in prange(O):
        acc = np.zeros(nb, dtype=np.float64)
        for j in range(J):
            s = srow[j, o]
            lj = lim[j, o]
            for n in range(nb):
                p = min(max(np.float64(P[j, o, n]), -lj), lj)
                acc[n] += s * p
        for n in range(nb):
            y[o, n0 + n] = np.float32(sx * acc[n]) + bias[o]


@njit(parallel=True, cache=True, fastmath=False)
def combine_nk(P, srow, lim, sx, bias, y, n0):
    """The same for the transposed layout: P (J, nb, O) -> rows n0..n0+nb of Y^T (N x O),
    ``srow`` / ``lim`` as ``TiledGemm.row_scales`` / ``row_limits`` (``TiledGemm.combine``)."""
    J, nb, O = P.shape
    for n in prange(nb):
        acc = np.zeros(O, dtype=np.float64)
        for j in range(J):
            for o in range(O):
                p = min(max(np.float64(P[j, n, o]), -lim[j, o]), lim[j, o])
                acc[o] += srow[j, o] * p
        for o in range(O):
            y[n0 + n, o] = np.float32(sx * acc[o]) + bias[o]


@njit(parallel=True, cache=True, fastmath=False)
def _combine_nk_noclip(P, srow, sx, bias, y, n0):
    """``combine_nk`` when no tile has a clamp (every limit infinite, so clipping is the
    identity): the same float64 operations in the same order, in blocks of rows with the
    accumulators reused, contiguous inner loops over o and flat unsigned offsets (``P``,
    ``srow`` and ``y`` C-contiguous); measured ~1.3x faster in ResNet-20 inference."""
    J, nb, O = P.shape
    Pf = P.reshape(-1)
    sf = srow.reshape(-1)
    yf = y.reshape(-1)
    uO = uint64(O)
    plane = uint64(nb * O)
    BS = 32
    for blk in prange((nb + BS - 1) // BS):
        acc = np.empty(O, dtype=np.float64)
        for n in range(blk * BS, min(nb, blk * BS + BS)):
            for o in range(O):
                acc[o] = 0.0
            for j in range(J):
                pb = uint64(j) * plane + uint64(n) * uO
                sb = uint64(j) * uO
                for o in range(uO):
                    acc[o] += sf[sb + o] * np.float64(Pf[pb + o])
            yb = uint64(n0 + n) * uO
            for o in range(uO):
                yf[yb + o] = np.float32(sx * acc[o]) + bias[o]


@njit(parallel=True, cache=True)
def _psums_int(wq, xt, bounds, n0, og, out):
    """Exact int64 partial sums out[j, n, o] = sum_{k in block j} wq[o, k] * xt[n0 + n, g*K + k]
    with g = o // og the group of row o (``og`` rows per group; og = O: one group)."""
    J = bounds.shape[0] - 1
    nb, O = out.shape[1], out.shape[2]
    K = wq.shape[1]
    for n in prange(nb):
        for j in range(J):
            for o in range(O):
                off = (o // og) * K
                acc = np.int64(0)
                for k in range(bounds[j], bounds[j + 1]):
                    acc += np.int64(wq[o, k]) * np.int64(xt[n0 + n, off + k])
                out[j, n, o] = acc


def conv_out_hw(h, w, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution."""
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                 for s, k, st, p, d in zip((h, w), kernel_size, stride, padding, dilation))


# The tap block (copy one tap's C channels, or zeros) is written out in both im2col kernels:
# as a called Numba function it is not inlined, and the kernels ran 1.3-2.1x slower that way.

@njit(parallel=True, cache=True)
def _im2col_rows(x, kh, kw, sh, sw, ph, pw, dh, dw, n0, out):
    """Rows n0..n0+len(out) of the pixel-major im2col matrix of x, given channels-last
    (B, H, W, C), C-contiguous.

    Row n = (b, ho, wo) holds the receptive field of output pixel n, column k = (c, i, j) in
    PyTorch's ``weight.reshape(O, -1)`` order; zero padding. Reads are contiguous over c; the
    strided writes stay inside one row (in L1). ``out`` C-contiguous; flat unsigned offsets.
    """
    B, H, W, C = x.shape
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    khw = kh * kw
    K = C * khw
    if out.shape[0] == 0:
        return
    xf = x.reshape(-1)
    of = out.reshape(-1)
    ukhw = uint64(khw)
    for r in prange(out.shape[0]):
        n = n0 + r
        b = n // (Ho * Wo)
        ho = (n // Wo) % Ho
        wo = n % Wo
        rb = uint64(r * K)
        for i in range(kh):
            h = ho * sh - ph + i * dh
            for j in range(kw):
                w = wo * sw - pw + j * dw
                k0 = rb + uint64(i * kw + j)
                if 0 <= h < H and 0 <= w < W:
                    src = uint64(((b * H + h) * W + w) * C)
                    for c in range(C):
                        of[k0 + uint64(c) * ukhw] = xf[src + uint64(c)]
                else:
                    for c in range(C):
                        of[k0 + uint64(c) * ukhw] = 0


@njit(parallel=True, cache=True)
def _im2col_rows_w1(x, kh, kw, sh, ph, pw, dh, n0, out):
    """``_im2col_rows`` for stride 1 and dilation 1 along the width (every 3x3 / 1x1 conv of
    stride 1, and the height-strided ones): consecutive output pixels of one image row share
    kw - 1 of their kw taps, so row n+1 is row n shifted left by one column (taps j -> j - 1
    within each (c, i)) and only the taps j = kw - 1 are read from x. Each image row of the
    chunk starts with a full row; rows of different image rows run in parallel. Flat unsigned
    offsets: no negative-index wraparound per access (several times faster than 4-D indexing)."""
    B, H, W, C = x.shape
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = W + 2 * pw - (kw - 1)
    khw = kh * kw
    K = C * khw
    nrows = out.shape[0]
    if nrows == 0:
        return
    xf = x.reshape(-1)
    of = out.reshape(-1)
    ukhw = uint64(khw)
    first = n0 // Wo
    last = (n0 + nrows - 1) // Wo
    for s in prange(last - first + 1):
        g = first + s                            # image row b * Ho + ho
        r0 = max(n0, g * Wo) - n0
        r1 = min(n0 + nrows, (g + 1) * Wo) - n0
        b = g // Ho
        ho = g % Ho
        wo = n0 + r0 - g * Wo
        rb = uint64(r0 * K)
        for i in range(kh):
            h = ho * sh - ph + i * dh
            for j in range(kw):
                w = wo - pw + j
                k0 = rb + uint64(i * kw + j)
                if 0 <= h < H and 0 <= w < W:
                    src = uint64(((b * H + h) * W + w) * C)
                    for c in range(C):
                        of[k0 + uint64(c) * ukhw] = xf[src + uint64(c)]
                else:
                    for c in range(C):
                        of[k0 + uint64(c) * ukhw] = 0
        for r in range(r0 + 1, r1):
            wo += 1
            rb = uint64(r * K)
            pb = rb - uint64(K - 1)              # row r - 1, one column on
            for k in range(K - 1):
                of[rb + uint64(k)] = of[pb + uint64(k)]
            w = wo - pw + kw - 1
            for i in range(kh):
                h = ho * sh - ph + i * dh
                k0 = rb + uint64(i * kw + kw - 1)
                if 0 <= h < H and 0 <= w < W:
                    src = uint64(((b * H + h) * W + w) * C)
                    for c in range(C):
                        of[k0 + uint64(c) * ukhw] = xf[src + uint64(c)]
                else:
                    for c in range(C):
                        of[k0 + uint64(c) * ukhw] = 0


def im2col_rows(x, geometry, n0: int, out) -> None:
    """Rows ``n0 .. n0 + len(out)`` of the pixel-major im2col matrix of the channels-last
    C-contiguous ``x`` (B, H, W, C) into ``out`` (C-contiguous, x's dtype), for ``geometry``
    ((kh, kw), stride, padding, dilation): the shifted-row kernel ``_im2col_rows_w1`` where the
    width stride and dilation are 1, ``_im2col_rows`` otherwise."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    if sw == 1 and dw == 1 and kw >= 2:
        _im2col_rows_w1(x, kh, kw, sh, ph, pw, dh, n0, out)
    else:
        _im2col_rows(x, kh, kw, sh, sw, ph, pw, dh, dw, n0, out)


@njit(parallel=True, cache=True)
def _quantize_cl(x, s, lo, hi, out):
    """out[b, h, w, c] = int8(clamp(rint(x[b, h, w, c] / float32(s)), lo, hi)): Eq. 1 with
    torch's float32 division and round-half-to-even, in one pass."""
    B, H, W, C = x.shape
    sf = np.float32(s)
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        for w in range(W):
            for c in range(C):
                v = np.rint(x[b, h, w, c] / sf)
                out[b, h, w, c] = np.int8(min(max(v, lo), hi))


@njit(parallel=True, cache=True)
def _quantize_flat(x, s, lo, hi, out):
    """``_quantize_cl`` on flat (contiguous) arrays."""
    sf = np.float32(s)
    n = x.shape[0]
    BS = 4096
    for blk in prange((n + BS - 1) // BS):
        for i in range(uint64(blk * BS), uint64(min(n, blk * BS + BS))):
            v = np.rint(x[i] / sf)
            out[i] = np.int8(min(max(v, lo), hi))


def quantize_int8_channels_last(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round(x / scale), lo, hi)`` of a float32 (B, C, H, W) tensor as int8, in
    channels-last memory (returned as the (B, C, H, W) view): the values of
    ``GemmLayer.quantize_input`` (same float32 division, round half to even) in the layout
    ``TiledGemm.conv`` reads, without the float32 intermediate. Needs ``-128 <= lo <= hi <= 127``."""
    if not (-128 <= lo <= hi <= 127):
        raise ValueError(f"int8 quantization needs -128 <= lo <= hi <= 127, got [{lo}, {hi}]")
    if x.dim() != 4 or x.dtype != torch.float32:
        raise ValueError(f"expected a float32 B x C x H x W tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    B, C, H, W = x.shape
    out = np.empty((B, H, W, C), dtype=np.int8)
    xh = x.detach().permute(0, 2, 3, 1).numpy()
    if xh.flags.c_contiguous:                       # channels-last memory: one flat pass
        _quantize_flat(xh.reshape(-1), float(scale), float(lo), float(hi), out.reshape(-1))
    else:                                           # e.g. a float first layer's NCHW output
        _quantize_cl(xh, float(scale), float(lo), float(hi), out)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


@njit(parallel=True, cache=True)
def _fake_quant_flat(x, s, lo, hi, out):
    """out[i] = float32(clamp(rint(x[i] / float32(s)), lo, hi)) * float32(s): the fake-quant
    input of ``GemmLayer`` (torch's float32 division, round half to even, float32 product) in
    one pass instead of four."""
    sf = np.float32(s)
    lof = np.float32(lo)
    hif = np.float32(hi)
    n = x.shape[0]
    BS = 4096
    for blk in prange((n + BS - 1) // BS):
        for i in range(uint64(blk * BS), uint64(min(n, blk * BS + BS))):
            v = np.rint(x[i] / sf)
            out[i] = min(max(v, lof), hif) * sf


SUM_BLOCK = 8192          # elements per partial sum of sq_diff_sum (fixed: thread-count free)


@njit(parallel=True, cache=True)
def _sq_diff_blocks(a, b, out):
    """out[k] = sum over block k of float64(float32(a[i] - b[i]))^2."""
    n = a.shape[0]
    for blk in prange(out.shape[0]):
        acc = 0.0
        for i in range(uint64(blk * SUM_BLOCK), uint64(min(n, blk * SUM_BLOCK + SUM_BLOCK))):
            d = np.float64(a[i] - b[i])
            acc += d * d
        out[blk] = acc


def _flat(t: torch.Tensor):
    """The float32 storage of a dense tensor (contiguous in some memory format) as a flat
    numpy view, or None."""
    if t.dtype != torch.float32 or not (t.is_contiguous() or (
            t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
        return None
    return t.detach().as_strided((t.numel(),), (1,)).numpy()


def fake_quant_act(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round(x / scale), lo, hi) * scale`` of a float32 tensor, bit for bit the
    fake-quant input ``GemmLayer`` computes with four torch passes (float32 division, round half
    to even, float32 product), in one pass and in ``x``'s memory format."""
    xf = _flat(x)
    if xf is None:
        q = torch.div(x, scale).round_().clamp_(lo, hi)
        return q.mul_(np.float32(scale))
    out = torch.empty_like(x)
    _fake_quant_flat(xf, float(scale), float(lo), float(hi), _flat(out))
    return out


def sq_diff_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum((a - b)^2)`` of two float32 tensors of one shape: the difference in float32 (as
    ``a - b``), its squares summed in float64. Partial sums over fixed blocks of SUM_BLOCK
    elements, added in block order: the result does not depend on the thread count."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    af, bf = _flat(a), _flat(b)
    if af is None or bf is None or a.stride() != b.stride():
        d = (a - b).to(torch.float64)
        return float(torch.sum(d * d))
    parts = np.empty((af.shape[0] + SUM_BLOCK - 1) // SUM_BLOCK, dtype=np.float64)
    _sq_diff_blocks(af, bf, parts)
    return float(math.fsum(parts))


def _channels_last(x) -> np.ndarray:
    """A (B, C, H, W) tensor/array as a C-contiguous (B, H, W, C) numpy array (a view when the
    tensor is already in channels-last memory format)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() != 4:
        raise ValueError(f"conv input must be B x C x H x W, got shape {tuple(t.shape)}")
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def im2col(x, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> np.ndarray:
    """The pixel-major im2col matrix X^T ((B*Ho*Wo) x (C*kh*kw)) of a (B, C, H, W) array.

    Row n = (b, ho, wo) holds the receptive field of output pixel n in PyTorch's
    ``weight.reshape(O, -1)`` order, so ``im2col(x) @ W.T`` is the convolution.
    """
    xh = _channels_last(x)
    B, H, W, C = xh.shape
    ho, wo = conv_out_hw(H, W, kernel_size, stride, padding, dilation)
    out = np.empty((B * ho * wo, C * kernel_size[0] * kernel_size[1]), dtype=xh.dtype)
    im2col_rows(xh, (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)), 0, out)
    return out


def _row_major(t):
    """``t`` (2-D) itself if its strides are row-major ones (unit column stride, row stride at
    least the row length), else a row-major copy: oneDNN misreads the arbitrary strides torch
    allows on size-1 dimensions (a (1, n) tensor with strides (1, 1) is 'contiguous')."""
    if t.stride(1) == 1 and t.stride(0) >= t.shape[1]:
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def _mm_int8(a, b, out=None):
    """int8 x int8 -> exact int32 product (``torch._int_mm``); ``out`` contiguous int32."""
    a, b = _row_major(a), _row_major(b)
    return torch._int_mm(a, b, out=out) if out is not None else torch._int_mm(a, b)


# --------------------------------------------------------------------------------------------
# The prepared operator
# --------------------------------------------------------------------------------------------

class TiledGemm:
    """A tile-quantized weight matrix, prepared once and applied to many inputs (Eq. 5).

    ``wq``: O x K integers (int8/int16, or integer-valued floats with ``w_bits`` given);
    ``grid``: the ``TileGrid``; ``scales``: ``grid.shape`` positive floats; ``clamp``: ``None``,
    a scalar or a ``grid.shape`` array of partial-sum limits L (clip to ``[-L, L]``);
    ``path``: ``auto`` (cheapest exact), ``f32``, ``f64`` or ``int`` — a float path whose bound
    is not exact is refused; ``a_unsigned``: the inputs are unsigned ``a_bits`` integers in
    ``[0, 2^a - 1]`` (the exactness bound uses ``2^a``).

    The products are formed per column block j, in chunks of N, in the orientation in which
    BLAS reads the input as it is: ``W_j @ X_j`` for a K x N input, ``X_j^T @ W_j^T``
    (tall-skinny, the faster one when N >> O) for an N x K input and for convolutions.

    Grouped (``grid.groups = g > 1``, a grouped convolution): the input has ``K_in = g * K``
    rows (columns of X^T) and group g's rows of W multiply only input rows ``g*K .. (g+1)*K``.
    Column block j of all groups is one batched product (``torch.bmm`` over the groups of
    ``X_{g,j}^T @ W_{g,j}^T``); the exactness argument is the one above, per group (each
    partial sum still has at most c terms). Everything after the partial sums is unchanged.
    """

    def __init__(self, wq, grid: TileGrid, scales, w_bits: int | None = None,
                 a_bits: int = 8, clamp=None, path: str = "auto", a_unsigned: bool = False):
        wq = _as_numpy(wq)
        if wq.shape != (grid.O, grid.K):
            raise ValueError(f"weight shape {wq.shape} != grid {grid.O}x{grid.K}")
        scales = np.asarray(_as_numpy(scales), dtype=np.float64)
        if scales.shape != grid.shape:
            raise ValueError(f"scales shape {scales.shape} != grid shape {grid.shape}")
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise ValueError("scales must be finite and > 0")
        self.grid = grid
        self.w_bits = check_bits(w_bits if w_bits is not None else _bits_of(wq.dtype), "w_bits")
        self.a_bits = check_bits(a_bits, "a_bits")
        self.a_unsigned = bool(a_unsigned)
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        need = plan_path(grid.c, self.w_bits, self.a_bits, self.a_unsigned, int8=False)
        order = ("f32", "f64", "int")
        if path == "auto":
            # int8 for ungrouped operators (a grouped one would need one int8 call per group)
            path = plan_path(grid.c, self.w_bits, self.a_bits, self.a_unsigned,
                             int8=int8_enabled() and grid.groups == 1)
        elif path == "int8":
            if not int8_fits(grid.c, self.w_bits, self.a_bits, self.a_unsigned):
                raise ValueError(f"path 'int8' is not exact for c={grid.c}, "
                                 f"w_bits={self.w_bits}, a_bits={self.a_bits}"
                                 f"{' unsigned' if self.a_unsigned else ''}: needs {need!r}")
            if not int8_available():
                raise ValueError(f"path 'int8' is not available: {INT8_UNAVAILABLE}")
        elif order.index(path) < order.index(need):
            raise ValueError(f"path {path!r} is not exact for c={grid.c}, "
                             f"w_bits={self.w_bits}, a_bits={self.a_bits}"
                             f"{' unsigned' if self.a_unsigned else ''}: needs {need!r}")
        self.path = path
        self.scales = scales
        rb = grid.row_block_index()
        self._srow = np.ascontiguousarray(scales[rb, :].T)          # (J, O) scale of each row
        lim = np.full(grid.shape, np.inf)
        if clamp is not None:
            c = np.asarray(_as_numpy(clamp), dtype=np.float64)
            if np.isnan(c).any() or (c < 0).any():
                raise ValueError("clamp limits must be >= 0")
            lim = np.broadcast_to(c, grid.shape).astype(np.float64)
        self._lim = np.ascontiguousarray(lim[rb, :].T)               # (J, O)
        self._noclip = bool(np.isinf(self._lim).all())
        self.wq = np.ascontiguousarray(wq)
        self._bounds = grid.col_bounds()
        if self.path != "int":
            self._dtype = {"int8": torch.int8, "f32": torch.float32,
                           "f64": torch.float64}[self.path]
            self._pdtype = torch.int32 if self.path == "int8" else self._dtype
            self._mm = _mm_int8 if self.path == "int8" else torch.mm
            w = torch.from_numpy(self.wq).to(self._dtype)
            # W_j and W_j^T of every column block, contiguous, one per BLAS call
            self._wj = [w[:, grid.col_slice(j)].contiguous() for j in range(grid.n_col_blocks)]
            self._wjt = [wj.t().contiguous() for wj in self._wj]
            if grid.groups > 1:         # (g, c_j, Og): the groups' W_j^T, one batched call
                self._wjg = [wj.reshape(grid.groups, grid.Og, -1).transpose(1, 2).contiguous()
                             for wj in self._wj]

    # -- partial sums --------------------------------------------------------------------------
    def _transposed_input(self, xq, layout):
        """The input as X^T (N x K), a torch view: ``layout`` "KN" (xq is K x N) or "NK"."""
        if layout not in ("KN", "NK"):
            raise ValueError(f"layout must be 'KN' or 'NK', got {layout!r}")
        x = xq if isinstance(xq, torch.Tensor) else torch.from_numpy(np.asarray(xq))
        kdim = 0 if layout == "KN" else 1
        if x.dim() != 2 or x.shape[kdim] != self.grid.K_in:
            want = "K x N" if layout == "KN" else "N x K"
            raise ValueError(f"input must be {want} with K={self.grid.K_in}, got shape "
                             f"{tuple(x.shape)}")
        return x.t() if layout == "KN" else x

    # -- shared with other operators on the same tiles (pimsim.crossbar.CrossbarGemm) --------
    @property
    def row_scales(self) -> np.ndarray:
        """(J, O) float64: the scale ``s[i(o), j]`` of the tile holding row o in column block j."""
        return self._srow

    @property
    def row_limits(self) -> np.ndarray:
        """(J, O) float64: the partial-sum clamp of that tile (``inf``: no clamp)."""
        return self._lim

    def chunk_size(self, N) -> int:
        """Rows of X^T per chunk: keeps the converted input chunk and its partial sums in cache."""
        g = self.grid
        if self.path == "int8":                  # 1-byte inputs, 4-byte partial sums
            per_row = g.K_in + g.n_col_blocks * g.O * 4
        else:
            per_row = g.K_in * 8 + g.n_col_blocks * g.O * 8
        return max(64, min(N, _CHUNK_BYTES // per_row))


    def combine(self, P, act_scale: float, bias, y, n0: int) -> None:
        """Eq. 5's rescale step for rows ``n0..n0+nb`` of Y^T: ``P`` (J, nb, O) partial sums
        (any exact values, float64 or int64) are clipped to ``row_limits``, scaled by
        ``row_scales`` and summed over j in float64 in the order j = 0..J-1, then
        ``y[n0 + n, o] = f32(act_scale * acc) + bias[o]`` (``act_scale`` and ``bias`` as
        returned by ``check_act_scale`` / ``check_bias``; ``y`` float32 N x O, written in place)."""
        if self._noclip and P.flags.c_contiguous and y.flags.c_contiguous:
            _combine_nk_noclip(P, self._srow, act_scale, bias, y, n0)
        else:
            combine_nk(P, self._srow, self._lim, act_scale, bias, y, n0)

    def _psums_nk(self, N, rows):
        """Yield ``(n0, n1, P)``: exact partial sums P (J, n1-n0, O) of each chunk of rows of
        X^T; ``rows(n0, n1)`` gives those rows (a BLAS-ready float tensor, or a numpy array of
        integers for the int path). Each product is ``X_j^T @ W_j^T``, a tall-skinny GEMM."""
        grid = self.grid
        J, O, G = grid.n_col_blocks, grid.O, grid.groups
        bnd = self._bounds
        nb = self.chunk_size(N)
        for n0 in range(0, N, nb):
            n1 = min(N, n0 + nb)
            xc = rows(n0, n1)
            if self.path == "int":
                P = np.empty((J, n1 - n0, O), dtype=np.int64)
                _psums_int(self.wq, xc, bnd, 0, grid.Og, P)
            elif G == 1:
                P = torch.empty((J, n1 - n0, O), dtype=self._pdtype)
                for j in range(J):
                    self._mm(xc[:, bnd[j]:bnd[j + 1]], self._wjt[j], out=P[j])
                P = P.numpy()
            else:
                P = torch.empty((J, n1 - n0, G, grid.Og), dtype=self._pdtype)
                xg = xc.reshape(n1 - n0, G, grid.K).transpose(0, 1)       # (G, nb, K) view
                for j in range(J):
                    xj = xg[:, :, bnd[j]:bnd[j + 1]]
                    if self.path == "int8":          # no batched int8 GEMM: group by group
                        for gi in range(G):
                            P[j, :, gi].copy_(_mm_int8(xj[gi], self._wjg[j][gi]))
                    else:
                        P[j].copy_(torch.bmm(xj, self._wjg[j]).transpose(0, 1))   # (G, nb, Og)
                P = P.reshape(J, n1 - n0, O).numpy()
            yield n0, n1, P

    def iter_psums(self, xq, layout="KN"):
        """Partial sums of a matrix input: P (J, O, nb) for "KN" (``W_j @ X_j``, BLAS reads X
        as it is), P (J, nb, O) for "NK" (see ``_psums_nk``)."""
        xt = self._transposed_input(xq, layout)
        N = xt.shape[0]
        if layout == "NK" or self.path == "int" or self.grid.groups > 1:
            def rows(n0, n1):
                xc = xt[n0:n1]
                if self.path == "int":
                    return xc.numpy()
                if xc.dtype == self._dtype and xc.stride(1) == 1:
                    return xc
                return xc.to(self._dtype, memory_format=torch.contiguous_format)
            for n0, n1, P in self._psums_nk(N, rows):
                yield n0, n1, (P.transpose(0, 2, 1) if layout == "KN" else P)
            return
        J, O = self.grid.n_col_blocks, self.grid.O
        bnd = self._bounds
        x = xt.t()                                         # K x N, as given
        direct = x.dtype == self._dtype and x.stride(1) == 1
        nb = self.chunk_size(N)
        for n0 in range(0, N, nb):
            n1 = min(N, n0 + nb)
            xc = x[:, n0:n1]
            if not direct:                                 # convert (e.g. int8) into a float chunk
                xc = xc.to(self._dtype, memory_format=torch.contiguous_format)
            P = torch.empty((J, O, n1 - n0), dtype=self._pdtype)
            for j in range(J):
                self._mm(self._wj[j], xc[bnd[j]:bnd[j + 1]], out=P[j])
            yield n0, n1, P.numpy()

    def conv_rows(self, xq4, geometry):
        """(N, rows) of a convolution input ``xq4`` (B, C, H, W) and ``geometry`` (kernel_size,
        stride, padding, dilation): ``rows(n0, n1)`` forms rows n0..n1 of its im2col matrix
        X^T (pixel-major) just in time into a reused buffer, so the 9x larger im2col matrix
        never exists in memory (each call overwrites the previous rows)."""
        x = _channels_last(xq4)
        kh, kw = geometry[0]
        if x.shape[3] * kh * kw != self.grid.K_in:
            raise ValueError(f"conv input has {x.shape[3]} channels x {kh}x{kw} kernel != "
                             f"K={self.grid.K_in}")
        ho, wo = conv_out_hw(x.shape[1], x.shape[2], *geometry)
        N = x.shape[0] * ho * wo
        dt = {"int8": np.int8, "f32": np.float32}.get(self.path, np.float64)
        if self.path == "int8" and x.dtype != np.int8:
            x = x.astype(np.int8)            # integers within int8 (int8_fits): exact
        pointwise = geometry == ((1, 1), (1, 1), (0, 0), (1, 1)) and x.dtype == dt
        if pointwise:                        # a 1x1 conv: X^T is the channels-last input
            flat_x = x.reshape(N, -1)
        else:
            buf = np.empty((self.chunk_size(N), self.grid.K_in), dtype=dt)

        def rows(n0, n1):
            if pointwise:
                b = flat_x[n0:n1]
                return b if self.path == "int" else torch.from_numpy(b)
            b = buf[: n1 - n0]
            im2col_rows(x, geometry, n0, b)
            return b if self.path == "int" else torch.from_numpy(b)
        return N, rows

    def check_act_scale(self, act_scale) -> float:
        """``act_scale`` as a float; ValueError unless finite and > 0."""
        try:
            sx = float(act_scale)
        except (TypeError, ValueError):
            sx = float("nan")
        if not (np.isfinite(sx) and sx > 0):
            raise ValueError(f"activation scale must be finite and > 0, got {act_scale!r}")
        return sx

    def check_bias(self, bias) -> np.ndarray:
        """``bias`` as float32 (O,) (zeros for None); ValueError on another shape."""
        O = self.grid.O
        b = np.zeros(O, np.float32) if bias is None else np.asarray(_as_numpy(bias), np.float32)
        if b.shape != (O,):
            raise ValueError(f"bias must have shape ({O},), got {b.shape}")
        return b

    # -- public --------------------------------------------------------------------------------
    def partial_sums(self, xq, layout: str = "KN") -> np.ndarray:
        """Exact int64 partial sums of every column block, shape (J, O, N) (before clamping)."""
        N = self._transposed_input(xq, layout).shape[0]
        out = np.empty((self.grid.n_col_blocks, self.grid.O, N), dtype=np.int64)
        for n0, n1, P in self.iter_psums(xq, layout):
            out[:, :, n0:n1] = P if layout == "KN" else P.transpose(0, 2, 1)
        return out

    def __call__(self, xq, act_scale: float, bias=None, out=None, layout: str = "KN") -> np.ndarray:
        """Eq. 5: float32 ``Y`` from the integer input ``xq`` and its activation scale.

        ``layout="KN"``: ``xq`` is X (K x N) and the result is Y (O x N). ``layout="NK"``:
        ``xq`` is X^T (N x K, e.g. ``im2col`` of images) and the result is Y^T (N x O), the
        channels-last conv output. Integer dtypes, or integer-valued floats within ``a_bits``
        (signed, or ``[0, 2^a - 1]`` with ``a_unsigned``).
        ``out``: optional preallocated float32 result of that shape (any strides).
        """
        g = self.grid
        sx = self.check_act_scale(act_scale)
        b = self.check_bias(bias)
        N = self._transposed_input(xq, layout).shape[0]
        shape = (g.O, N) if layout == "KN" else (N, g.O)
        y = np.empty(shape, dtype=np.float32) if out is None else out
        if y.shape != shape or y.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {shape}")
        for n0, _, P in self.iter_psums(xq, layout):
            if layout == "KN":
                _combine_kn(P, self._srow, self._lim, sx, b, y, n0)
            else:
                self.combine(P, sx, b, y, n0)
        return y

    def conv(self, xq4, act_scale: float, kernel_size, stride=(1, 1), padding=(0, 0),
             dilation=(1, 1), bias=None) -> np.ndarray:
        """Eq. 5 for a convolution: ``xq4`` (B, C, H, W) integers (any strides) -> Y^T
        ((B*Ho*Wo) x O, float32), i.e. the output in channels-last order. The im2col rows are
        formed chunk by chunk in cache (``_im2col_rows``)."""
        g = self.grid
        sx = self.check_act_scale(act_scale)
        b = self.check_bias(bias)
        N, rows = self.conv_rows(xq4, (tuple(kernel_size), tuple(stride), tuple(padding),
                                        tuple(dilation)))
        y = np.empty((N, g.O), dtype=np.float32)
        for n0, _, P in self._psums_nk(N, rows):
            self.combine(P, sx, b, y, n0)
        return y


def tiled_matmul(wq, xq, scales, grid: TileGrid, act_scale: float, *, w_bits=None,
                 a_bits=None, clamp=None, bias=None, path: str = "auto",
                 a_unsigned=None) -> np.ndarray:
    """One-shot Eq. 5 (see ``TiledGemm``); bits default to the operands' storage widths
    (``a_unsigned`` to whether ``xq`` has an unsigned integer dtype)."""
    dt = _as_numpy(xq).dtype
    a_bits = a_bits if a_bits is not None else _bits_of(dt)
    if a_unsigned is None:
        a_unsigned = bool(np.issubdtype(dt, np.unsignedinteger))
    op = TiledGemm(wq, grid, scales, w_bits=w_bits, a_bits=a_bits, clamp=clamp, path=path,
                   a_unsigned=a_unsigned)
    return op(xq, act_scale, bias=bias)


# --------------------------------------------------------------------------------------------
# Plain NumPy reference (int64)
# --------------------------------------------------------------------------------------------

def partial_sums_reference(wq, xq, grid: TileGrid) -> np.ndarray:
    """int64 partial sums ``P[j] = Wq[:, cols_j] @ Xq[cols_j, :]``, shape (J, O, N); grouped:
    group g's rows times input rows ``g*K + cols_j``, group by group."""
    w = np.asarray(wq).astype(np.int64)
    x = np.asarray(xq).astype(np.int64)
    out = np.empty((grid.n_col_blocks, grid.O, x.shape[1]), dtype=np.int64)
    for j in range(grid.n_col_blocks):
        cols = grid.col_slice(j)
        for g in range(grid.groups):
            rows, off = grid.group_rows(g), g * grid.K
            out[j, rows] = w[rows, cols] @ x[cols.start + off:cols.stop + off, :]
    return out


def tiled_matmul_reference(wq, xq, scales, grid: TileGrid, act_scale: float, *,
                           clamp=None, bias=None) -> np.ndarray:
    """Eq. 5 in plain NumPy: int64 tile products, clip, float64 rescale and sum in j order."""
    P = partial_sums_reference(wq, xq, grid).astype(np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    rb = grid.row_block_index()
    if clamp is not None:
        lim = np.broadcast_to(np.asarray(clamp, np.float64), grid.shape)[rb, :]   # (O, J)
    acc = np.zeros(P.shape[1:], dtype=np.float64)
    for j in range(grid.n_col_blocks):
        p = P[j]
        if clamp is not None:
            p = np.clip(p, -lim[:, j:j + 1], lim[:, j:j + 1])
        acc += scales[rb, j][:, None] * p
    y = (np.float64(act_scale) * acc).astype(np.float32)
    if bias is not None:
        y = y + np.asarray(bias, np.float32)[:, None]
    return y


def blas_pools():
    """threadpoolctl's controller of the BLAS pools loaded in the process other than torch's
    (NumPy's OpenBLAS / MKL, used by the calibration's and searches' NumPy products), or None
    without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:            # an optional nicety: torch and Numba are still set
        return None
    return ThreadpoolController().select(user_api="blas")


def set_threads(n: int = 0) -> int:
    """Use n threads (0 = all cores) in torch, Numba and NumPy's BLAS; returns the count used.

    Process-wide (Numba's count is that of the calling thread): for a program's top level
    (the CLI, a benchmark, a sweep worker process). Library code uses ``threads``. NumPy's
    BLAS (OpenBLAS, a pool of its own that ``torch.set_num_threads`` does not reach) is set
    through threadpoolctl: without it a "1-thread" run's NumPy products still used every core."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    pools = blas_pools()
    if pools is not None:
        pools.limit(limits=n)
    return n


def blas_threads() -> dict:
    """{library file name: threads} of NumPy's BLAS pools (empty without threadpoolctl)."""
    pools = blas_pools()
    if pools is None:
        return {}
    return {os.path.basename(p.filepath): p.num_threads for p in pools.lib_controllers}


@contextlib.contextmanager
def threads(n: int = 0):
    """``with threads(n) as used:`` run a block with n threads (0 = all cores) in torch,
    Numba and NumPy's BLAS (``set_threads``), then put the counts back as they were, also on
    an exception. ``used`` is the count set."""
    before_torch, before_numba = torch.get_num_threads(), numba.get_num_threads()
    pools = blas_pools()
    before_blas = pools.info() if pools is not None else []
    try:
        yield set_threads(n)
    finally:
        torch.set_num_threads(before_torch)
        numba.set_num_threads(before_numba)
        if pools is not None:
            for lib, info in zip(pools.lib_controllers, before_blas):
                lib.set_num_threads(info["num_threads"])
