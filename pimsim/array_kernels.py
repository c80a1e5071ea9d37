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
word (64 word lines) whose input bits are all zero is skipped: it adds 0 to every column sum.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types, uint64
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
def pack_inputs(x, seg_bounds, na, passes, words, out):
    """Input magnitude bit-planes of the rows of ``x`` (nb x K, integer values) into ``out``
    uint64 (nb, passes, S, na, words), ``na`` magnitude bits (a_bits - 1 for signed a_bits-bit
    inputs, a_bits for unsigned ones): pass 0 packs ``max(x, 0)``, pass 1 (when
    ``passes == 2``) ``max(-x, 0)``; bit kk of word w of segment s is input k0_s + 64 w + kk.
    Returns the number of values outside ``[-(2^na - 1), 2^na - 1]`` (or negative with
    ``passes == 1``): they are not packed correctly, the caller raises."""
    nb, K = x.shape
    S = seg_bounds.shape[0] - 1
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
                m = max(0, min(64, k1 - a))
                for p in range(passes):
                    sg = 1 if p == 0 else -1
                    for kk in range(m):
                        buf[kk] = max(sg * np.int64(x[n, a + kk]), 0)
                    for kk in range(m, 64):
                        buf[kk] = 0
                    for b in range(na):
                        acc = np.uint64(0)
                        for kk in range(64):
                            acc |= np.uint64((buf[kk] >> b) & 1) << np.uint64(kk)
                        out[n, p, s, b, w] = acc
    return bad.sum()


def kernel_weights(packed: np.ndarray, col_set, col_b0, col_nb, mag_bits: int,
                   cell_bits: int) -> np.ndarray:
    """Rearrange ``pack_weights`` output (S, O, planes, words) for ``array_psums``: uint64
    (S, words, cell_bits, Q * O), entry [s, w, b, q * O + o] = word w of bit b of the slice of
    column q of output o (zero when the slice has fewer than b + 1 bits)."""
    S, O, _, words = packed.shape
    Q = len(col_set)
    out = np.zeros((S, words, cell_bits, Q * O), dtype=np.uint64)
    for q in range(Q):
        for b in range(col_nb[q]):
            plane = col_set[q] * mag_bits + col_b0[q] + b
            out[:, :, b, q * O:(q + 1) * O] = packed[:, :, plane, :].transpose(0, 2, 1)
    return out


_BLOCK = 16          # input vectors per parallel task (work buffers allocated once per task)


@njit(parallel=True, cache=True)
def array_psums(xb, wk, seg_col, col_t, col_sign, cell_bits, dac_bits, col_arr, aps, ref_vals,
                adc_levels, lut, thr, step, record, P, clip, seen):
    """Tile partial sums of a chunk of input vectors on the arrays (see module docstring).

    xb: (nb, passes, S, na, words) input planes (``pack_inputs``); wk: (S, words, cell_bits,
    Q*O) weight planes (``kernel_weights``: flat over columns and outputs so that the popcounts
    vectorize); seg_col[s]: column block j of segment s (segments in K order); col_t, col_sign:
    slice and sign (+1/-1) of each weight column q (``column_table``); col_arr (Q, O): array
    (within a segment) holding column q of output o; aps: arrays per segment; ref_vals (R,):
    reference column value per slice (offset; else empty); adc_levels: 2^adc_bits - 1, or 0 for
    an ideal ADC; lut (G, V) int32: the ADC level of every possible column sum 0..V-1, thr (G,):
    largest unclipped column sum and step (G,): value of one level, per global array
    g = s * aps + a (``adc_lut``); ``record``: track the largest column sum per array in
    ``seen`` (nb, G). Writes P (J, nb, O) float64 and clip (nb,) counts.
    """
    nb, passes, S, na, words = xb.shape
    CB, QO = wk.shape[2], wk.shape[3]
    Q, O = col_arr.shape
    R = ref_vals.shape[0]
    J = P.shape[0]
    C = (na + dac_bits - 1) // dac_bits
    ideal = adc_levels == 0
    V = lut.shape[1]
    lutf = lut.ravel()
    # per segment and flat column q * O + o: global array, its LUT offset, step, threshold
    garr_s = np.empty((S, QO), dtype=np.int64)
    for s in range(S):
        for q in range(Q):
            for o in range(O):
                garr_s[s, q * O + o] = s * aps + col_arr[q, o]
    lbase_s = garr_s * V
    stq_s = np.empty((S, QO), dtype=np.float64)
    thq_s = np.empty((S, QO), dtype=np.int64)
    for s in range(S):
        for i in range(QO):
            stq_s[s, i] = step[garr_s[s, i]]
            thq_s[s, i] = thr[garr_s[s, i]]
    wkf = wk.reshape(-1)                             # wk C-contiguous (kernel_weights)
    uQO, uCB, uwords = uint64(QO), uint64(CB), uint64(words)
    nblk = (nb + _BLOCK - 1) // _BLOCK
    for blk in prange(nblk):
        L = np.zeros((passes, QO), dtype=np.int64)
        Lf = L.reshape(-1)
        Lref = np.zeros((passes, aps, R + 1), dtype=np.int64)
        v = np.zeros((C, QO), dtype=np.int64)        # column sums of every cycle
        vf = v.reshape(-1)
        act = np.zeros(C, dtype=np.int64)            # active-input count (x bit weight)
        cnz = np.zeros(C, dtype=np.bool_)            # cycle has an active input
        val = np.zeros(O, dtype=np.float64)
        vseg = np.zeros(O, dtype=np.float64)
        for n in range(blk * _BLOCK, min(nb, (blk + 1) * _BLOCK)):
            for j in range(J):
                for o in range(O):
                    P[j, n, o] = 0.0
            nclip = 0
            for s in range(S):
                g0 = s * aps
                garr = garr_s[s]
                lbase = lbase_s[s]
                stq = stq_s[s]
                thq = thq_s[s]
                for p in range(passes):
                    for c in range(C):
                        act[c] = 0
                        cnz[c] = False
                        for i in range(QO):
                            v[c, i] = 0
                    for d in range(na):
                        c = d // dac_bits
                        sd = d - c * dac_bits
                        vb = uint64(c) * uQO
                        for w in range(words):
                            xv = xb[n, p, s, d, w]
                            if xv == 0:
                                continue           # no active input: adds 0 to every sum
                            act[c] += np.int64(popcount64(xv)) << sd
                            cnz[c] = True
                            for b in range(CB):
                                # flat unsigned offsets: no wraparound check, the loop vectorizes
                                wb = ((uint64(s) * uwords + uint64(w)) * uCB + uint64(b)) * uQO
                                shb = sd + b
                                for i in range(uQO):
                                    vf[vb + i] += np.int64(popcount64(xv & wkf[wb + i])) << shb
                    Lb = uint64(p) * uQO
                    for i in range(uQO):
                        Lf[Lb + i] = 0
                    for c in range(C):
                        if not cnz[c]:
                            continue               # all sums 0: level 0, no clip, no record
                        sh = c * dac_bits
                        vb = uint64(c) * uQO
                        if record:
                            for i in range(QO):
                                if v[c, i] > seen[n, garr[i]]:
                                    seen[n, garr[i]] = v[c, i]
                        if ideal:
                            for i in range(uQO):
                                Lf[Lb + i] += vf[vb + i] << sh
                        else:
                            for i in range(uQO):
                                vi = vf[vb + i]
                                nclip += vi > thq[i]
                                Lf[Lb + i] += np.int64(lutf[uint64(lbase[i] + vi)]) << sh
                    for a in range(aps):           # reference columns: value x active inputs
                        g = g0 + a
                        for t in range(R):
                            Lref[p, a, t] = 0
                            for c in range(C):
                                if not cnz[c]:
                                    continue
                                vr = ref_vals[t] * act[c]
                                if record and vr > seen[n, g]:
                                    seen[n, g] = vr
                                if ideal:
                                    Lref[p, a, t] += vr << (c * dac_bits)
                                else:
                                    nclip += vr > thr[g]
                                    Lref[p, a, t] += np.int64(lut[g, vr]) << (c * dac_bits)
                for p in range(passes):
                    for o in range(O):
                        val[o] = 0.0
                    for q in range(Q):
                        f = np.float64(1 << (cell_bits * col_t[q]))
                        for o in range(O):
                            i = q * O + o
                            lv = L[p, i]
                            if R > 0:
                                lv -= Lref[p, col_arr[q, o], col_t[q]]
                            term = f * (stq[i] * np.float64(lv))
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

def adc_lut(step, vmax: int, adc_levels: int) -> np.ndarray:
    """int32 (G, vmax + 1): ``min(rint(v / step[g]), adc_levels)`` for every column sum v."""
    v = np.arange(vmax + 1, dtype=np.float64)
    return np.minimum(np.rint(v[None, :] / np.asarray(step)[:, None]), adc_levels).astype(np.int32)


def array_psums_reference(wq, xt, w_bits, a_bits, signed, cell_bits, dac_bits, seg_bounds,
                          seg_col, n_col_blocks, col_arr, aps, ranges, adc_bits, passes,
                          a_unsigned=False):
    """int64 matrix products per (segment, pass, cycle, column): returns (P (J, N, O) float64,
    clipped conversions (int), largest column sum per global array (G,) int64).

    ``xt``: N x K integer inputs (``a_unsigned``: in ``[0, 2^a - 1]``, a_bits magnitude
    bits); ``ranges`` (G,): ADC range per global array (ignored when
    ``adc_bits == 0``, ideal). Same float operations in the same order as ``array_psums``."""
    x = np.asarray(xt).astype(np.int64)
    N = x.shape[0]
    sets, col_t, col_b0, col_nb, col_sign, n_sets, nb = column_table(w_bits, cell_bits, signed)
    vals = weight_planes(wq, w_bits, signed)                     # (n_sets, O, K)
    O = vals.shape[1]
    Q = len(sets)
    na = a_bits if a_unsigned else a_bits - 1
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
