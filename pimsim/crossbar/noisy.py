"""The analog array model (``NoisyCrossbarGemm``): the crossbar layer of
``pimsim.crossbar.arrays`` with real cells (``pimsim.crossbar.device``), per-slice ADC ranges
(``adc_range: calibrated_slice``) and drift compensation (``compensation: global | tile``).

Used by the ``crossbar`` backend whenever ``Crossbar.analog`` is true (non-ideal cells, a
per-slice ADC range or a compensation); with ideal cells it computes exactly what
``CrossbarGemm`` computes (tested bit for bit), in floats on BLAS instead of popcounts.

Column sums
-----------
Conductances are kept in *level units*: a cell at target level ``l`` (``g_T = g_min + l *
delta``, ``delta = (1 - g_min) / (2^cell_bits - 1)``) whose conductance is ``g`` contributes
``G = l + (g - g_T) / delta`` (exactly ``l`` for an ideal cell). In every input cycle c of
every segment and sign pass, the word lines carry the DAC digits ``d_i`` of the inputs and the
column current of bit line j is ``sum_i d_i * g_ij`` (fractions of g_max x digit). The chip's
reference (one per array, trimmed at design time) subtracts the nominal ``g_min * sum_i d_i``
and the ADC's input stage divides by ``delta``, so the ADC sees
``v_j = sum_i d_i * G_ij + noise`` in the same column-sum units as the ideal model (one unit
= one level step times one input unit): the device deviations (programming noise, stuck
cells, and the drift of the ``g_min`` part as well as of the level part) stay in the sum, as
they would on a chip whose reference is not a drifting cell. ``_column_sums(d, G)`` is this
one step (float32 BLAS when every exact column sum fits 24 bits, else float64; called with the
digits of all cycles of a segment and pass stacked, ``(cycles * N, word lines)``, and the
segment's weight and reference columns side by side) and the place where a wire-resistance
model replaces the ideal sum; ``bitline_layout()`` gives each column's array and bit line.

Read noise: each cell read with a fresh ``N(0, read_noise)`` deviation makes the column sum's
noise ``N(0, (read_noise / delta)^2 * sum_i d_i^2)`` -- drawn per column sum, exactly that
distribution. The draws of one input vector are consecutive positions of a counter-based stream
(``pimsim.crossbar.cbrng``: SplitMix64 bits, ziggurat normals) keyed by
``SeedSequence([seed, crc32(layer), 1, image, piece])``, in a fixed order (segment, pass, cycle,
only when the image drives a word line in that cycle), where ``image`` counts the images
through the layer since the chip was programmed / ``reset_stats`` and ``piece`` is the piece of
an image too large for one chunk; so the noise of an image depends neither on the batch size
nor on the thread count.

ADC: ``level = min(rint(max(v, 0) / step), 2^adc_bits - 1)`` per column (``v > range``
counted as clipped), then the shift-add, reference subtraction and tile rescale exactly as in
``pimsim.crossbar.arrays`` (same float operations in the same order). With an ideal ADC
(``adc_bits: 0``) the analog value itself is used.

ADC ranges: ``full`` / a number as in ``arrays``; ``calibrated`` (per array) and
``calibrated_slice`` (per array and weight slice: low slices hold small values, so their
columns get a smaller range and a finer step) are fitted on the calibration batch with ideal
cells -- a design-time fit shared by every chip instance.

Drift compensation (``compensation``): the chip applies ``REF_VECTORS`` fixed reference input
vectors (known integers, half the inputs at random values, the same for every chip) and
compares its own partial sums ``P_meas`` (after the ADC, with read noise) with the ideal ones
``P_ideal`` the programmed integer weights imply: ``global``: one factor
``sum |P_ideal| / sum |P_meas|`` per layer (aihwkit's global drift compensation); ``tile``: the
same ratio per crossbar tile (row block x column block), multiplied into that tile's PTQ-SL
scale -- the scales are rewritten, so it costs nothing at run time. Measured lazily at the first
call after programming (after the ADC ranges are fitted). Only the chip's outputs are used,
never its conductances.
"""

from __future__ import annotations

import contextlib
import zlib

import numpy as np
from numba import njit, uint64

from ..kernels import blas_pools
from .arrays import CrossbarGemm, adc_tables
from .cbrng import FN, KN, WN, add_read_noise, stream_key
from .mapping import adc_conversions

WIRE_EXACT_CELLS = 128 * 128   # arrays up to this many cells: the exact IR-drop solve
REF_VECTORS = 64          # reference input vectors of the drift compensation
_REF_KEY = 0x5EF         # the reference pattern's seed (the same on every chip)


def layer_key(name: str) -> int:
    """A stable integer of a layer's name (part of every random key of its cells)."""
    return zlib.crc32(name.encode())


@contextlib.contextmanager
def single_thread_blas():
    """The analog products are thin (a few hundred columns): multi-threaded OpenBLAS gains
    little on them and spin-waits badly on a shared machine, so they run on one BLAS thread
    (NumPy's BLAS pools through threadpoolctl; the caller's counts are put back)."""
    pools = blas_pools()
    if pools is None:
        yield
        return
    with pools.limit(limits=1):
        yield


def _column_sums(d: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``v[n, j] = sum_i d[n, i] * G[i, j]``: the analog column sums (``d`` (N, R) DAC digits
    of the driven word lines, ``G`` (R, C) conductances in level units), (N, C) in the dtype
    of ``G`` (float32 holds every exact sum of ideal cells, see ``NoisyCrossbarGemm``)."""
    return np.matmul(d, G)


@njit(cache=True)
def adc_accumulate(v, rng, step, levels, sh, L):
    """The ADC of one cycle, fused: ``L[n, j] += min(rint(max(v, 0) / step[j]), levels) * sh``
    (``levels == 0``: ideal, ``L += v * sh``); returns the conversions with ``v > rng[j]``.
    One thread: a call takes tens of microseconds, less than waking a thread pool. ``v`` and
    ``L`` C-contiguous (flat unsigned offsets: no negative-index wraparound per access)."""
    N, C = v.shape
    vf = v.reshape(-1)
    Lf = L.reshape(-1)
    uC = uint64(C)
    flev = np.float64(levels)
    k = 0
    for n in range(N):
        base = uint64(n) * uC
        if levels == 0:
            for j in range(uC):
                Lf[base + j] += np.float64(vf[base + j]) * sh
        else:
            for j in range(uC):                   # branch-free: vectorizes
                x = np.float64(vf[base + j])
                k += x > rng[j]
                lv = min(np.rint(max(x, 0.0) / step[j]), flev)
                Lf[base + j] += lv * sh
    return k


@njit(cache=True)
def digit_planes(x, k0, k1, sign, dac, D, act, sq):
    """DAC digits of inputs ``k0..k1`` of every row of ``x`` (nb x K integers) in every cycle:
    ``D[c, n, i] = (max(sign * x[n, k0 + i], 0) >> (c * dac)) & (2^dac - 1)``; ``act[c, n]``:
    the row drives a word line in cycle c; ``sq[c, n] = sum_i D[c, n, i]^2``. Every array
    C-contiguous (flat unsigned offsets)."""
    C, nb, nr = D.shape
    K = x.shape[1]
    xf = x.reshape(-1)
    Df = D.reshape(-1)
    af = act.reshape(-1)
    qf = sq.reshape(-1)
    mask = (1 << dac) - 1
    unr = uint64(nr)
    plane = uint64(nb * nr)
    m = np.empty(nr, dtype=np.int64)
    for n in range(nb):
        base = uint64(n * K + k0)
        for i in range(unr):
            v = sign * xf[base + i]
            m[i] = v if v > 0 else 0
        for c in range(C):
            sh = c * dac
            q = 0
            db = uint64(c) * plane + uint64(n) * unr
            for i in range(unr):                  # branch-free: vectorizes
                d = (m[i] >> sh) & mask
                Df[db + i] = d
                q += d * d
            af[c * nb + n] = q > 0                # some digit is not 0
            qf[c * nb + n] = q


class NoisyCrossbarGemm(CrossbarGemm):
    """``CrossbarGemm`` with analog column sums over real cells (module docstring). Same
    constructor; the device, the ADC policy and the compensation come from ``crossbar``.
    ``program(seed)`` makes it another chip instance."""

    def __init__(self, wq, grid, scales, crossbar, w_bits, a_bits, mapping=None,
                 name="layer", shortcut=True, a_unsigned=False):
        self.images_seen = 0
        super().__init__(wq, grid, scales, crossbar, w_bits, a_bits, mapping=mapping, name=name,
                         shortcut=False, a_unsigned=a_unsigned)
        self.shortcut = False
        self.phys = crossbar.dev.physics(crossbar.cell_bits)
        self.key = layer_key(name)
        self.wq = np.asarray(wq).astype(np.int64)
        self.scales = np.asarray(scales, dtype=np.float64)
        self.slice_ranges = None
        self._comp = None
        self._batch = None
        self._img, self._stream = None, 1
        if self.parts is None:
            self._build_levels()
        self.program(crossbar.dev.seed)

    # -- cells ---------------------------------------------------------------------------------
    def _build_levels(self):
        from .. import array_kernels as ak
        xb, lm = self.crossbar, self.lm
        vals = ak.weight_planes(self.wq, self.w_bits, xb.signed)            # (sets, O, K)
        O, Q = self.grid.O, len(self.col_set)
        self.n_slices = int(self.col_t.max()) + 1
        self.R = lm.ref_cols
        self.aps = lm.arrays_per_segment
        self.levels, self.ref_levels = [], []
        for s in range(lm.segments):
            k0, k1 = self.seg_bounds[s], self.seg_bounds[s + 1]
            lv = np.empty((k1 - k0, Q, O), dtype=np.int64)
            for q in range(Q):
                mask = (1 << int(self.col_nb[q])) - 1
                lv[:, q, :] = ((vals[self.col_set[q], :, k0:k1] >> int(self.col_b0[q])) & mask).T
            self.levels.append(lv.reshape(k1 - k0, Q * O))
            ref = np.broadcast_to(self.ref_vals[None, None, :], (k1 - k0, self.aps, self.R))
            self.ref_levels.append(np.ascontiguousarray(ref).reshape(k1 - k0, self.aps * self.R))
        self.levels_all = [np.concatenate([a, b], axis=1)
                           for a, b in zip(self.levels, self.ref_levels)]
        full = max(xb.full_range(r) for r in np.diff(self.seg_bounds))
        self._dtype = np.float32 if full < (1 << 24) else np.float64

    def bitline_layout(self):
        """(array within the segment, bit line) of every column of the segment's conductance
        matrices ``G_all[s]`` (weight columns ``q * O + o``, then reference columns
        ``a * R + t``): on each array the weight columns are filled in (output, column) order
        from bit line 0, the reference columns take the last ``R`` bit lines. Word line i of a
        segment is row i of ``G_all[s]``. For models that need positions (wire resistance)."""
        O, Q = self.grid.O, len(self.col_set)
        arr = self.col_arr.reshape(-1)                                  # (Q*O,), index q*O+o
        order = np.lexsort((np.repeat(np.arange(Q), O), np.tile(np.arange(O), Q), arr))
        line = np.empty(Q * O, dtype=np.int64)
        for a in range(self.aps):
            idx = order[arr[order] == a]
            line[idx] = np.arange(idx.size)
        ref_arr = np.repeat(np.arange(self.aps), self.R)
        ref_line = self.crossbar.cols - self.R + np.tile(np.arange(self.R), self.aps)
        return np.concatenate([arr, ref_arr]), np.concatenate([line, ref_line])

    def program(self, seed: int) -> None:
        """Program the cells as chip ``seed``: every cell's state drawn from
        ``SeedSequence([seed, crc32(layer name)])`` in a fixed layout (segment, word line,
        column, output; then the reference columns), the read-noise stream restarted."""
        self.seed = int(seed)
        self._comp = None
        self.images_seen = 0
        if self.parts is not None:
            for p in self.parts:
                p.program(seed)
            return
        ph = self.phys
        self.cells, self.ref_cells = [], []
        if not ph.cells_ideal:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed,
                                                                               self.key])))
            S, rows = self.lm.segments, self.crossbar.rows
            Q, O = len(self.col_set), self.grid.O
            dw = ph.draw(rng, (S, rows, Q * O))
            dr = ph.draw(rng, (S, rows, self.aps * self.R))
            for s in range(S):
                for lv, draws, out in ((self.levels[s], dw, self.cells),
                                       (self.ref_levels[s], dr, self.ref_cells)):
                    d = {k: v[s, :lv.shape[0], :lv.shape[1]] for k, v in draws.items()}
                    gp, nu, stuck = ph.program(lv, d)
                    out.append({"level": lv, "gp": gp, "nu": nu, "stuck": stuck,
                                "z_flicker": d["z_flicker"]})
        self.refresh()

    def refresh(self) -> None:
        """Recompute the conductances (level units) at ``t_inference`` from the cells' state
        (after a change of ``cells[s]['nu']`` etc.); drops the compensation."""
        self._comp = None
        if self.parts is not None:
            for p in self.parts:
                p.refresh()
            return
        ph = self.phys
        if ph.cells_ideal:
            self.G = [lv.astype(self._dtype) for lv in self.levels]
            self.Gref = [lv.astype(self._dtype) for lv in self.ref_levels]
        else:
            def conductances(c):
                g = ph.at_time(c["gp"], c["nu"], {"z_flicker": c["z_flicker"]}, c["stuck"])
                return ph.level_units(c["level"], g).astype(self._dtype)
            self.G = [conductances(c) for c in self.cells]
            self.Gref = [conductances(c) for c in self.ref_cells]
        # weight and reference columns side by side: one product per cycle
        self.G_all = [np.ascontiguousarray(np.concatenate([g, r], axis=1))
                      for g, r in zip(self.G, self.Gref)]
        if ph.wire_r > 0:
            self.G_all = [self._with_wires(s, g) for s, g in enumerate(self.G_all)]

    def _with_wires(self, s: int, G: np.ndarray) -> np.ndarray:
        """Segment ``s``'s conductance matrix (level units) with the wire resistance folded in.

        The resistive array is linear in its word-line voltages, so its sensed column currents
        are ``d @ T`` with ``T = pimsim.crossbar.irdrop.effective_conductance(g)`` of each
        physical array (``rows x cols`` conductances in fractions of g_max: the programmed
        cells, ``g_min`` at cells no column uses): the exact nodal solve up to 128 x 128 cells,
        where it costs about what the line model does, the coupled line model on larger
        arrays (its error against the exact solve: README, ``bench_irdrop``). The chip subtracts
        the nominal ``g_min * sum_i d_i`` and divides by ``delta``, so the matrix the ADC sees
        is ``(T - g_min) / delta`` at the used word lines and bit lines
        (``bitline_layout``)."""
        from .irdrop import effective_conductance
        ph, xb = self.phys, self.crossbar
        arr, line = self.bitline_layout()
        rows = G.shape[0]
        out = np.empty_like(G)
        for a in range(self.aps):
            cols = np.flatnonzero(arr == a)
            g = np.full((xb.rows, xb.cols), ph.g_min, dtype=np.float64)
            g[:rows, line[cols]] = ph.g_min + ph.delta * G[:, cols].astype(np.float64)
            method = "exact" if xb.rows * xb.cols <= WIRE_EXACT_CELLS else "coupled"
            T = effective_conductance(np.clip(g, 0.0, None), ph.wire_r, method)
            out[:, cols] = ((T[:rows, line[cols]] - ph.g_min) / ph.delta).astype(G.dtype)
        return out

    def reset_stats(self) -> None:
        super().reset_stats()
        self.images_seen = 0            # the read-noise stream restarts at image 0
        for p in self.parts or ():
            p.images_seen = 0

    # -- ADC ranges ----------------------------------------------------------------------------
    def start_fit(self) -> None:
        super().start_fit()
        self._comp = None
        for p in self.parts or ():
            p.start_fit()
        if self.parts is None:
            self.seen_slice = np.zeros((self.n_arrays, self.n_slices), dtype=np.float64)

    def finish_fit(self) -> np.ndarray:
        if self.crossbar.adc_range != "calibrated_slice":
            self._comp = None
            return super().finish_fit()
        if self.parts is not None:
            sl = [p.finish_fit() for p in self.parts]
            self.slice_ranges = np.concatenate(sl)
            self.recording = False
            self.set_ranges(self.slice_ranges.max(1))       # the parts' tables too
            self._comp = None
            return self.slice_ranges
        self.recording = False
        self.slice_ranges = np.maximum(self.seen_slice, 1.0)
        self.set_ranges(self.slice_ranges.max(1))
        self._comp = None
        return self.slice_ranges

    def _range_table(self) -> np.ndarray | None:
        """(G, slices) ADC range per array and slice; None: ideal ADC (or recording)."""
        xb = self.crossbar
        if self.recording or xb.adc_bits == 0:
            return None
        if xb.adc_range == "calibrated_slice":
            if self.slice_ranges is None:
                raise ValueError(f"layer {self.name}: adc_range calibrated_slice: fit the "
                                 "ranges first (start_fit / finish_fit on the calibration batch)")
            return self.slice_ranges
        if xb.adc_range == "calibrated" and self.ranges is None:
            raise ValueError(f"layer {self.name}: adc_range calibrated: fit the ranges first "
                             "(start_fit / finish_fit on the calibration batch)")
        _, _, rng = adc_tables(xb, self.lm, self.ranges)
        return np.repeat(rng[:, None], self.n_slices, axis=1)

    # -- running -------------------------------------------------------------------------------
    def _noise_key(self, stream: int, image: int, piece: int) -> np.ndarray:
        """The counter-based read-noise key of one image (piece) of this chip and layer."""
        return stream_key([self.seed, self.key, stream, int(image), int(piece)])

    def _psums(self, x, passes):
        if self.parts is not None:
            return self._group_psums(x, passes)
        if self.recording and self.crossbar.adc_range != "calibrated_slice":
            return super()._psums(x, passes)             # per-array fit: the ideal cells
        x = np.ascontiguousarray(np.asarray(x), dtype=np.int64)
        nb = x.shape[0]
        hi = (1 << self.in_bits) - 1
        if nb and (x.max() > hi or x.min() < (-hi if passes == 2 else 0)):
            if self.a_unsigned:
                raise ValueError(f"layer {self.name}: crossbar inputs must be unsigned "
                                 f"{self.a_bits}-bit integers in [0, {hi}]")
            raise ValueError(f"layer {self.name}: crossbar inputs must be symmetric "
                             f"{self.a_bits}-bit integers in [{-hi}, {hi}]")
        xb, lm = self.crossbar, self.lm
        rec = self.recording
        tab = self._range_table()
        levels = (1 << xb.adc_bits) - 1
        dac = xb.dac_bits
        C = xb.input_cycles(self.a_bits, self.a_unsigned)
        O, Q = self.grid.O, len(self.col_set)
        aps, R = self.aps, self.R
        sig = 0.0 if rec else self.phys.read_sigma / self.phys.delta
        # per-image pieces of this chunk and their read-noise generators
        img, piece = self._img if self._img is not None else \
            (np.arange(nb), np.zeros(nb, np.int64))
        QO, W = Q * O, Q * O + aps * R                  # weight columns, + reference columns
        # the DAC digits of every segment, pass and cycle
        planes = []
        for s in range(lm.segments):
            k0, k1 = self.seg_bounds[s], self.seg_bounds[s + 1]
            per_pass = []
            for p in range(passes):
                D = np.empty((C, nb, k1 - k0), dtype=self._dtype)
                act = np.empty((C, nb), dtype=np.bool_)
                sq = np.empty((C, nb), dtype=np.float64)
                digit_planes(x, k0, k1, 1 if p == 0 else -1, dac, D, act, sq)
                per_pass.append((D, act, sq))
            planes.append(per_pass)
        if sig > 0:
            # one read-noise stream per image (piece): W normals per driven (segment, pass,
            # cycle, vector), at consecutive positions in that order (counter-based: computed
            # where they are added, pimsim.crossbar.cbrng)
            cut = np.flatnonzero(np.diff(img) | np.diff(piece)) + 1
            bounds = np.concatenate([[0], cut, [nb]])
            owner = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
            cursor = np.zeros(len(bounds) - 1, dtype=np.int64)
            keys = np.array([self._noise_key(self._stream, img[a], piece[a])
                             for a in bounds[:-1]], dtype=np.uint64).reshape(-1, 2)
            K0, K1 = np.ascontiguousarray(keys[:, 0]), np.ascontiguousarray(keys[:, 1])
        P = np.zeros((self.grid.n_col_blocks, nb, O), dtype=np.float64)
        nclip = 0
        colt = np.repeat(self.col_t, O)                                   # (Q*O,)
        for s in range(lm.segments):
            k0, k1 = self.seg_bounds[s], self.seg_bounds[s + 1]
            garr = s * aps + self.col_arr.reshape(-1)                      # (Q*O,)
            # every column of the segment's arrays: weight columns, then reference columns
            g_all = np.concatenate([garr, s * aps + np.repeat(np.arange(aps), R)])
            t_all = np.concatenate([colt, np.tile(np.arange(R), aps)])
            G = self.levels_all[s].astype(self._dtype) if rec else self.G_all[s]
            if tab is not None:
                rng_a = tab[g_all, t_all]
                st_a = rng_a / levels
            else:
                rng_a = st_a = np.ones(W)
            vseg = None
            nr = k1 - k0
            for p in range(passes):
                D, act, sq = planes[s][p]
                on = act.any(1)
                La = np.zeros((nb, W), dtype=np.float64)
                if on.any():
                    # every cycle's column sums in one product: (C * nb, nr) @ (nr, W)
                    V = _column_sums(D.reshape(C * nb, nr), G).reshape(C, nb, W)
                for c in range(C):
                    if not on[c]:
                        continue                  # no word line driven: every sum is 0
                    v = np.ascontiguousarray(V[c])          # a view when it is one
                    if sig > 0:
                        add_read_noise(v, act[c], sig * np.sqrt(sq[c]), K0, K1, cursor, owner,
                                       KN, WN, FN)
                    if rec:
                        np.maximum.at(self.seen_slice, (g_all, t_all), v.max(0))
                    nclip += adc_accumulate(v, rng_a, st_a, 0 if tab is None else levels,
                                            float(1 << (c * dac)), La)
                L, Lr = La[:, :QO], La[:, QO:]
                st_c = st_a[:QO]
                val = np.zeros((nb, O), dtype=np.float64)
                for q in range(Q):
                    lv = L[:, q * O:(q + 1) * O]
                    if R:
                        lv = lv - Lr[:, self.col_arr[q] * R + self.col_t[q]]
                    stp = 1.0 if tab is None else st_c[q * O:(q + 1) * O]   # (Numba: step)
                    term = np.float64(1 << (xb.cell_bits * int(self.col_t[q]))) * (stp * lv)
                    val = val + term if self.col_sign[q] > 0 else val - term
                vseg = val if p == 0 else vseg - val
            j = self.seg_col[s]
            P[j] = P[j] + vseg
        self.clipped += nclip
        return P

    def _group_psums(self, x, passes):
        for p in self.parts:
            p._img, p._stream = self._img, self._stream
        return super()._group_psums(x, passes)

    def _chunks(self, N: int, vpi: int):
        """(n0, n1, image ids, piece ids) of the chunks: whole images, or pieces of one image
        (the same cut for every batch size)."""
        lim = max(64, self.tiled.chunk_size(max(N, 1 << 30)))
        if vpi <= lim:
            per = max(1, lim // vpi) * vpi
            for n0 in range(0, N, per):
                n1 = min(N, n0 + per)
                r = np.arange(n0, n1)
                yield n0, n1, r // vpi, np.zeros(n1 - n0, np.int64)
        else:
            for i0 in range(0, N, vpi):
                for k, n0 in enumerate(range(i0, min(N, i0 + vpi), lim)):
                    n1 = min(i0 + vpi, n0 + lim, N)
                    yield n0, n1, np.full(n1 - n0, i0 // vpi), np.full(n1 - n0, k)

    def _combiner(self):
        if self.crossbar.compensation == "none" or self.recording:
            return self.tiled
        if self._comp is None:
            self._comp = self._compensate()
        return self._comp

    def _run(self, N, rows, passes, sx, b, y):
        t = self._combiner()
        self.conversions += adc_conversions(self.lm, N, passes)
        vpi = 1 if not self._batch else max(1, N // self._batch)
        base = self.images_seen
        self._stream = 1
        with single_thread_blas():
            for n0, n1, img, piece in self._chunks(N, vpi):
                self._img = (base + img, piece)
                P = self._psums(rows(n0, n1), passes)
                t.combine(P, sx, b, y, n0)
        self._img = None
        self.images_seen = base + -(-N // vpi)
        return y

    def __call__(self, xq, act_scale, bias=None):
        self._batch = None
        return super().__call__(xq, act_scale, bias=bias)

    def conv(self, xq4, act_scale, kernel_size, stride=(1, 1), padding=(0, 0),
             dilation=(1, 1), bias=None):
        self._batch = int(xq4.shape[0])
        try:
            return super().conv(xq4, act_scale, kernel_size, stride, padding, dilation,
                                bias=bias)
        finally:
            self._batch = None

    # -- drift compensation --------------------------------------------------------------------
    def reference_inputs(self) -> np.ndarray:
        """The ``REF_VECTORS`` x K reference vectors (the same for every chip and layer size):
        integers in ``[0, 2^(a-1)-1]`` (unsigned inputs: ``[0, 2^a - 1]``) on a random half of
        the inputs, 0 elsewhere."""
        rng = np.random.default_rng([_REF_KEY, self.grid.K_in])
        hi = (1 << self.in_bits) - 1
        x = rng.integers(0, hi + 1, size=(REF_VECTORS, self.grid.K_in))
        return x * (rng.random(x.shape) < 0.5)

    def measure(self, x: np.ndarray) -> np.ndarray:
        """The chip's partial sums (J, N, O) of integer inputs ``x`` (N x K), read with the
        reference stream of read noise (stream 2, so image noise is not disturbed)."""
        n = x.shape[0]
        self._img, self._stream = (np.arange(n), np.zeros(n, np.int64)), 2
        try:
            with single_thread_blas():
                return self._psums(np.ascontiguousarray(x), 2 if x.min() < 0 else 1)
        finally:
            self._img = None

    def compensation_factors(self) -> np.ndarray:
        """The factor per tile (``scales`` shape) from the chip's response to the reference
        inputs: ``global`` one ratio for the layer, ``tile`` one per tile."""
        from ..kernels import partial_sums_reference
        x = self.reference_inputs()
        meas = np.abs(self.measure(x))                                     # (J, N, O)
        ideal = np.abs(partial_sums_reference(self.wq, x.T, self.grid).astype(np.float64))
        ideal = ideal.transpose(0, 2, 1)
        if self.crossbar.compensation == "global":
            m = meas.sum()
            return np.full(self.scales.shape, ideal.sum() / m if m > 0 else 1.0)
        rb = self.grid.row_block_index()
        mi = np.zeros(self.scales.shape)
        ii = np.zeros(self.scales.shape)
        for j in range(meas.shape[0]):
            np.add.at(mi[:, j], rb, meas[j].sum(0))
            np.add.at(ii[:, j], rb, ideal[j].sum(0))
        return np.where(mi > 0, ii / np.where(mi > 0, mi, 1.0), 1.0)

    def _compensate(self):
        from ..kernels import TiledGemm
        self.factors = self.compensation_factors()
        return TiledGemm(self.wq, self.grid, self.scales * self.factors, w_bits=self.w_bits,
                         a_bits=self.a_bits)


def program_chips(net, seed: int) -> int:
    """Make every analog layer of ``net`` chip ``seed`` (``NoisyCrossbarGemm.program``);
    returns the number of layers programmed."""
    from .attach import array_op
    n = 0
    for l in net.quantized_layers:
        op = array_op(l)
        if isinstance(op, NoisyCrossbarGemm):
            op.program(seed)
            n += 1
    return n
