"""Numba kernels of the array-level crossbar simulation, each with a plain NumPy reference.

The semantics (slicing, bit-serial inputs, ADC, shift-add) are documented in
``pimsim.crossbar``; these functions take arrays only:

- ``pack_weights``: the weight bit-planes of every segment, packed 64 word lines per uint64;
- ``pack_inputs`` (Numba): the input magnitude bit-planes of a chunk of input vectors;
- ``array_psums`` (Numba): per input vector, segment, sign pass and DAC cycle, every column sum
  as popcounts of (input plane AND weight plane), digitized by a per-array lookup table (the
  ADC), clipped conversions counted, shift-added, reference columns subtracted, segments added
  into the tile partial sums ``P[j, n, o]`` (float64);
- ``array_psums_reference``: the same in int64 NumPy matrix products, no bit tricks.

Column sums are small integers (at most rows * (2^cell_bits-1) * (2^dac_bits-1)), so an ADC
is a table ``lut[array, v]`` of levels plus a clip threshold ``thr[array]`` (largest unclipped
v) and a step (digital value of one level). An input cycle whose bit-planes are all zero on a
segment is skipped: all its column sums are 0, converted to level 0, never clipped.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic


@intrinsic
def popcount64(typingctx, x):
    """LLVM ``ctpop`` on a uint64 (one POPCNT instruction on x86-64)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, sig, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, [args[0]])
    return types.uint64(types.uint64), codegen


# --------------------------------------------------------------------------------------------
# Column layout
# --------------------------------------------------------------------------------------------

def column_table(w_bits: int, cell_bits: int, signed: str):
    """Per weight column q: ``(set, slice t, first bit, bit count, sign)`` as int64 arrays, plus
    ``(n_sets, mag_bits)``. Differential: sets 0 (positive part, sign +1) and 1 (negative part,
    sign -1) with ``w_bits - 1`` magnitude bits; offset: one set of ``w_bits`` bits."""
    nb = w_bits - 1 if signed == "differential" else w_bits
    n_sets = 2 if signed == "differential" else 1
    S = -(-nb // cell_bits)
    rows = []
    for s in range(n_sets):
        for t in range(S):
            b0 = t * cell_bits
            rows.append((s, t, b0, min(cell_bits, nb - b0), 1 if s == 0 else -1))
    a = np.array(rows, dtype=np.int64)
    return a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], n_sets, nb


def weight_planes(wq: np.ndarray, w_bits: int, signed: str) -> np.ndarray:
    """The stored unsigned values per set: (n_sets, O, K) int64 (|w| parts or w + offset)."""
    w = np.asarray(wq).astype(np.int64)
    if signed == "differential":
        return np.stack([np.maximum(w, 0), np.maximum(-w, 0)])
    return (w + ((1 << (w_bits - 1)) - 1))[None]


def pack_weights(wq, w_bits: int, signed: str, seg_bounds, words: int) -> np.ndarray:
    """Weight bit-planes packed along K per segment: uint64 (S, O, n_sets * mag_bits, words);
    bit (k - k0) % 64 of word (k - k0) // 64 holds bit b of set s of weight (o, k)."""
    vals = weight_planes(wq, w_bits, signed)
    n_sets, O, _ = vals.shape
    nb = w_bits - 1 if signed == "differential" else w_bits
    S = len(seg_bounds) - 1
    out = np.zeros((S, O, n_sets * nb, words), dtype=np.uint64)
    for s in range(S):
        k0, k1 = seg_bounds[s], seg_bounds[s + 1]
        for p in range(n_sets * nb):
            bits = ((vals[p // nb, :, k0:k1] >> (p % nb)) & 1).astype(np.uint64)   # (O, k1-k0)
            for kk in range(k1 - k0):
                out[s, :, p, kk // 64] |= bits[:, kk] << np.uint64(kk % 64)
    return out


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def pack_inputs(x, seg_bounds, a_bits, passes, words, out):
    """Input magnitude bit-planes of the rows of ``x`` (nb x K, integer values) into ``out``
    uint64 (nb, passes, S, a_bits - 1, words): pass 0 packs ``max(x, 0)``, pass 1 (when
    ``passes == 2``) ``max(-x, 0)``; bit kk of word w of segment s is input k0_s + 64 w + kk.
    Returns the number of values outside the symmetric range ``[-(2^(a-1)-1), 2^(a-1)-1]``
    (or negative with ``passes == 1``): they are not packed correctly, the caller raises."""
    nb, K = x.shape
    S = seg_bounds.shape[0] - 1
    na = a_bits - 1
    hi = (1 << na) - 1
    lo = -hi if passes == 2 else 0
    bad = np.zeros(nb, dtype=np.int64)
    for n in prange(nb):
        buf = np.zeros(64, dtype=np.int64)
        nbad = 0
        for k in range(K):
            v = np.int64(x[n, k])
            nbad += (v > hi) | (v < lo)
        bad[n] = nbad
        for s in range(S):
            k0, k1 = seg_bounds[s], seg_bounds[s + 1]
            for w in range(words):
                a = k0 + 64 * w
                m = min(64, k1 - a)
                for p in range(passes):
                    sg = 1 if p == 0 else -1
                    for kk in range(64):
                        buf[kk] = max(sg * np.int64(x[n, a + kk]), 0) if kk < m else 0
                    for b in range(na):
                        acc = np.uint64(0)
                        for kk in range(64):
                            acc |= np.uint64((buf[kk] >> b) & 1) << np.uint64(kk)
                        out[n, p, s, b, w] = acc
    return bad.sum()


@njit(parallel=True, cache=True)
def array_psums(xb, wb, seg_col, col_set, col_t, col_b0, col_nb, col_sign, mag_bits,
                cell_bits, dac_bits, col_arr, aps, ref_vals, adc_levels, thr, step, record, P,
                clip, seen):
    """Tile partial sums of a chunk of input vectors on the arrays (see module docstring).

    xb: (nb, passes, S, na, words) input planes; wb: (S, n_sets*mag_bits, words, O) weight
    planes (``pack_weights(...).transpose(0, 2, 3, 1)``, O innermost so that the popcounts
    vectorize over output rows); seg_col[s]: column block j of segment s (segments in K order);
    col_*: the column table (``column_table``); col_arr (Q, O): array (within a segment) of each
    weight column; aps: arrays per segment; ref_vals (R,): reference column values per slice
    (offset; else empty); adc_levels: 2^adc_bits - 1, or 0 for an ideal ADC; thr (G,) largest
    unclipped column sum and step (G,) float64 per global array g = s * aps + a; ``record``:
    track the largest column sum per array in ``seen`` (nb, G). Writes P (J, nb, O) float64 and
    clip (nb,) counts. ADC: ``level = min(rint(v / step), adc_levels)``, clipped if v > thr.
    """
    nb, passes, S, na, words = xb.shape
    Q, O = col_arr.shape
    NP = wb.shape[1]
    R = ref_vals.shape[0]
    J = P.shape[0]
    cycles = (na + dac_bits - 1) // dac_bits
    ideal = adc_levels == 0
    for n in prange(nb):
        for j in range(J):
            for o in range(O):
                P[j, n, o] = 0.0
        nclip = 0
        L = np.zeros((passes, Q, O), dtype=np.int64)
        Lref = np.zeros((passes, aps, R + 1), dtype=np.int64)
        acc = np.zeros((NP, O), dtype=np.int64)
        v = np.zeros(O, dtype=np.int64)
        val = np.zeros(O, dtype=np.float64)
        vseg = np.zeros(O, dtype=np.float64)
        stq = np.zeros((Q, O), dtype=np.float64)
        thq = np.zeros((Q, O), dtype=np.int64)
        for s in range(S):
            L[:] = 0
            Lref[:] = 0
            g0 = s * aps
            for q in range(Q):
                for o in range(O):
                    g = g0 + col_arr[q, o]
                    stq[q, o] = step[g]
                    thq[q, o] = thr[g]
            for p in range(passes):
                for c in range(cycles):
                    d0 = c * dac_bits
                    d1 = min(na, d0 + dac_bits)
                    nz = False
                    for d in range(d0, d1):
                        for w in range(words):
                            if xb[n, p, s, d, w] != 0:
                                nz = True
                    if not nz:
                        continue                   # all column sums 0 -> level 0, no clip
                    sh = c * dac_bits
                    acc[:] = 0
                    act = np.int64(0)
                    for d in range(d0, d1):
                        for w in range(words):
                            xv = xb[n, p, s, d, w]
                            if xv == 0:
                                continue
                            act += np.int64(popcount64(xv)) << (d - d0)
                            for pl in range(NP):
                                for o in range(O):
                                    acc[pl, o] += np.int64(popcount64(xv & wb[s, pl, w, o])) << (d - d0)
                    for q in range(Q):
                        base = col_set[q] * mag_bits + col_b0[q]
                        for o in range(O):
                            v[o] = acc[base, o]
                        for b in range(1, col_nb[q]):
                            for o in range(O):
                                v[o] += acc[base + b, o] << b
                        if record:
                            for o in range(O):
                                g = g0 + col_arr[q, o]
                                if v[o] > seen[n, g]:
                                    seen[n, g] = v[o]
                        if ideal:
                            for o in range(O):
                                L[p, q, o] += v[o] << sh
                        else:
                            for o in range(O):
                                lev = min(np.rint(np.float64(v[o]) / stq[q, o]),
                                          np.float64(adc_levels))
                                nclip += v[o] > thq[q, o]
                                L[p, q, o] += np.int64(lev) << sh
                    for a in range(aps):           # reference columns: value x active inputs
                        g = g0 + a
                        for t in range(R):
                            vr = ref_vals[t] * act
                            if record and vr > seen[n, g]:
                                seen[n, g] = vr
                            if ideal:
                                Lref[p, a, t] += vr << sh
                            else:
                                lev = min(np.rint(np.float64(vr) / step[g]),
                                          np.float64(adc_levels))
                                nclip += vr > thr[g]
                                Lref[p, a, t] += np.int64(lev) << sh
            for p in range(passes):
                for o in range(O):
                    val[o] = 0.0
                for q in range(Q):
                    f = np.float64(1 << (cell_bits * col_t[q]))
                    for o in range(O):
                        lv = L[p, q, o]
                        if R > 0:
                            lv -= Lref[p, col_arr[q, o], col_t[q]]
                        term = f * (stq[q, o] * np.float64(lv))
                        if col_sign[q] > 0:
                            val[o] = val[o] + term
                        else:
                            val[o] = val[o] - term
                for o in range(O):
                    if p == 0:
                        vseg[o] = val[o]
                    else:
                        vseg[o] = vseg[o] - val[o]
            j = seg_col[s]
            for o in range(O):
                P[j, n, o] = P[j, n, o] + vseg[o]
        clip[n] = nclip


# --------------------------------------------------------------------------------------------
# Plain NumPy reference
# --------------------------------------------------------------------------------------------

def array_psums_reference(wq, xt, w_bits, a_bits, signed, cell_bits, dac_bits, seg_bounds,
                          seg_col, n_col_blocks, col_arr, aps, ranges, adc_bits, passes):
    """int64 matrix products per (segment, pass, cycle, column): returns (P (J, N, O) float64,
    clipped conversions (int), largest column sum per global array (G,) int64).

    ``xt``: N x K integer inputs; ``ranges`` (G,): ADC range per global array (ignored when
    ``adc_bits == 0``, ideal). Same float operations in the same order as ``array_psums``."""
    x = np.asarray(xt).astype(np.int64)
    N = x.shape[0]
    sets, col_t, col_b0, col_nb, col_sign, n_sets, nb = column_table(w_bits, cell_bits, signed)
    vals = weight_planes(wq, w_bits, signed)                     # (n_sets, O, K)
    O = vals.shape[1]
    Q = len(sets)
    na = a_bits - 1
    cycles = -(-na // dac_bits)
    S = len(seg_bounds) - 1
    G = S * aps
    levels = (1 << adc_bits) - 1
    P = np.zeros((n_col_blocks, N, O), dtype=np.float64)
    clipped = 0
    seen = np.zeros(G, dtype=np.int64)
    off = (1 << (w_bits - 1)) - 1
    R = -(-w_bits // cell_bits) if signed == "offset" else 0
    ranges = np.asarray(ranges, dtype=np.float64)

    def adc(v, g):                       # v (..., N) int64 column sums on array(s) g
        nonlocal clipped
        if adc_bits == 0:
            return v, np.ones(np.shape(g))
        rng = ranges[g]
        stp = rng / levels
        clipped += int((v > rng[..., None]).sum())
        return np.minimum(np.rint(v / stp[..., None]), levels).astype(np.int64), stp

    for s in range(S):
        k0, k1 = seg_bounds[s], seg_bounds[s + 1]
        garr = s * aps + col_arr                                   # (O, Q)
        vseg = None
        for p in range(passes):
            mag = np.maximum(x[:, k0:k1], 0) if p == 0 else np.maximum(-x[:, k0:k1], 0)
            L = np.zeros((O, Q, N), dtype=np.int64)
            Lref = np.zeros((aps, max(R, 1), N), dtype=np.int64)
            for c in range(cycles):
                digit = (mag >> (c * dac_bits)) & ((1 << dac_bits) - 1)    # (N, k1-k0)
                for q in range(Q):
                    wsl = (vals[sets[q], :, k0:k1] >> col_b0[q]) & ((1 << col_nb[q]) - 1)
                    v = wsl @ digit.T                                       # (O, N)
                    for o in range(O):
                        g = garr[o, q]
                        seen[g] = max(seen[g], v[o].max(initial=0))
                    lev, _ = adc(v, garr[:, q])
                    L[:, q] += lev << (c * dac_bits)
                for t in range(R):
                    rv = (off >> (t * cell_bits)) & ((1 << cell_bits) - 1)
                    v = rv * digit.sum(1)                                   # (N,)
                    for a in range(aps):
                        g = s * aps + a
                        seen[g] = max(seen[g], v.max(initial=0))
                        lev, _ = adc(v[None], np.array([g]))
                        Lref[a, t] += lev[0] << (c * dac_bits)
            val = np.zeros((O, N), dtype=np.float64)
            for q in range(Q):
                lv = L[:, q]
                if R:
                    lv = lv - Lref[col_arr[:, q], col_t[q]]
                stp = np.ones(O) if adc_bits == 0 else ranges[garr[:, q]] / levels
                term = np.float64(1 << (cell_bits * col_t[q])) * (stp[:, None] * lv.astype(np.float64))
                val = val + term if col_sign[q] > 0 else val - term
            vseg = val if p == 0 else vseg - val
        j = seg_col[s]
        P[j] = P[j] + vseg.T
    return P, clipped, seen
