"""The array-level simulation of a quantized layer (``CrossbarGemm``): bit-sliced weights,
bit-serial inputs, per-column ADCs, digital shift-add and the tile rescale of Eq. 5.

Number representation
---------------------
- Weights are symmetric signed ``w_bits`` integers in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (the
  crossbar layers of a network are quantized with this symmetric range).
  ``differential``: ``|w|`` (b-1 bits) is cut into ``slices = ceil((b-1)/cell_bits)`` slices of
  ``cell_bits`` bits, least significant first; the positive part ``max(w, 0)`` and the negative
  part ``max(-w, 0)`` sit on separate column sets: ``cols_per_weight = 2 * slices``, ordered
  (positive slices 0..S-1, negative slices 0..S-1). ``offset``: ``u = w + (2^(b-1)-1)`` in
  ``[0, 2^b - 2]`` is stored in ``slices = ceil(b/cell_bits)`` slices (``cols_per_weight =
  slices``); every array has ``ref_cols = slices`` reference columns holding the slices of the
  offset ``2^(b-1)-1`` in every used word line. After the ADC the digitized reference column
  of slice t is subtracted from the digitized column of slice t of every weight on that array
  (before the shift-add), so ``sum_k u_k x_k - sum_k (2^(b-1)-1) x_k = sum_k w_k x_k``.
- Inputs are symmetric signed ``a_bits`` integers in ``[-(2^(a-1)-1), 2^(a-1)-1]``, applied
  bit-serially: the magnitude of the positive part ``max(x, 0)`` in ``input_cycles =
  ceil((a-1)/dac_bits)`` cycles of ``dac_bits`` bits (least significant first), then, only when
  the layer call's input has a negative value, the same for ``max(-x, 0)`` (subtracted).
  Unsigned inputs (``a_unsigned``: ``quant.act_signed`` unsigned / auto on a non-negative
  input) are integers in ``[0, 2^a - 1]``, all a bits applied in ``ceil(a/dac_bits)`` cycles of
  one pass.
- ADC: in every cycle every used column (weight slices and reference columns) is converted.
  The column's integer sum v (over the segment's word lines, ``0 <= v <= rows_used *
  (2^cell_bits-1) * (2^dac_bits-1)``) becomes: ideal (``adc_bits = 0``) v itself; otherwise the
  level ``min(rint(v / step), 2^adc_bits - 1)`` with ``step = range / (2^adc_bits - 1)``
  (round half to even), whose digital value is ``level * step``; a conversion with
  ``v > range`` clips (counted). ``range`` per array: ``full`` = ``rows_used * (2^cell_bits-1)
  * (2^dac_bits-1)`` (the largest possible column sum; rows_used = the segment's word lines);
  ``calibrated`` = the largest column sum seen on that array on the calibration batch (at least
  1); a number = that column-sum value for every array.
- Digital side, per output row o, input vector n and segment: the levels of a column are
  shift-added over cycles as integers, ``L_q = sum_cyc 2^(dac_bits * cyc) * level`` (offset:
  minus the reference column's ``L``, same array); then in float64, in column order q,
  ``v_seg = sum_q sign_q * 2^(cell_bits * t_q) * step_q * L_q`` (ideal: ``step = 1``, so this is
  the exact integer); the positive pass minus the negative pass; the segments of a column block
  are added in K order, giving the tile partial sum ``P_j[o, n]``. Finally
  ``y = f32(s_x * sum_j s_ij * P_j) + bias`` exactly as ``kernels.TiledGemm`` (its combine
  kernel), so with an ideal ADC the result equals ``TiledGemm`` bit for bit.
- Grouped convolution (``grid.groups > 1``): each group is a ``CrossbarGemm`` of its own
  (``parts``: its ``O/g`` rows, ``grid.group_grid()`` tiles, its K input columns, arrays
  ``group_mapping()``); their partial sums fill the groups' rows of ``P`` and the rescale is
  the layer's (same combine as ``TiledGemm``). Per-array ADC ranges are listed group by group.
"""

from __future__ import annotations

import numpy as np

from ..quant import TileGrid, check_bits
from .geometry import Crossbar
from .mapping import LayerMapping, LayerSpec, adc_conversions, map_layer

def adc_tables(crossbar: Crossbar, lm: LayerMapping, ranges=None, ideal: bool = False):
    """``(thr (G,) int64, step (G,) float64, ranges (G,) float64)`` of the layer's G arrays
    (g = segment * arrays_per_segment + array): the largest unclipped column sum, the digital
    value of one ADC level (``range / (2^adc_bits - 1)``) and the range. ``ranges``: per-array
    ADC ranges (else from the policy: ``full`` or the number; ``calibrated`` needs them).
    ``ideal`` (or ``adc_bits == 0``): step 1, nothing clips."""
    aps, S = lm.arrays_per_segment, lm.segments
    G = S * aps
    seg_rows = np.diff(np.asarray(lm.seg_bounds, dtype=np.int64))
    full = np.repeat([crossbar.full_range(r) for r in seg_rows], aps).astype(np.float64)
    if ideal or crossbar.adc_bits == 0:
        return np.full(G, np.iinfo(np.int64).max), np.ones(G), full
    if ranges is None:
        if crossbar.adc_range in ("calibrated", "calibrated_slice"):
            raise ValueError(f"layer {lm.name}: adc_range calibrated needs the ranges fitted on "
                             "the calibration batch (CrossbarGemm.start_fit / finish_fit)")
        ranges = full if crossbar.adc_range == "full" else np.full(G, float(crossbar.adc_range))
    ranges = np.asarray(ranges, dtype=np.float64)
    if ranges.shape != (G,) or not (np.isfinite(ranges).all() and (ranges > 0).all()):
        raise ValueError(f"layer {lm.name}: ADC ranges must be {G} positive numbers")
    step = ranges / ((1 << crossbar.adc_bits) - 1)
    return np.floor(ranges).astype(np.int64), step, ranges


class CrossbarGemm:
    """A quantized layer computed the way the crossbar arrays compute it (module docstring).

    ``wq`` (O x K symmetric integers), ``grid``, ``scales`` as for ``kernels.TiledGemm``;
    ``crossbar``; ``mapping`` (its ``LayerMapping``, built non-strictly when None).
    ``shortcut``: with an ideal ADC, compute through ``TiledGemm`` (same result, faster).
    Counters ``clipped`` and ``conversions`` accumulate over calls (``reset_stats``).
    ``fit_ranges()`` / ``set_ranges()``: the ``calibrated`` ADC range per array.
    """

    def __init__(self, wq, grid: TileGrid, scales, crossbar: Crossbar, w_bits: int,
                 a_bits: int, mapping: LayerMapping | None = None, name: str = "layer",
                 shortcut: bool = True, a_unsigned: bool = False):
        from ..kernels import TiledGemm
        self.crossbar = crossbar
        self.w_bits, self.a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits")
        self.a_unsigned = bool(a_unsigned)
        # input magnitude bits applied by the DACs: a_bits - 1 (signed) or a_bits (unsigned)
        self.in_bits = self.a_bits if self.a_unsigned else self.a_bits - 1
        wq = np.asarray(wq)
        hi = (1 << (self.w_bits - 1)) - 1
        if wq.size and (wq.min() < -hi or wq.max() > hi):
            raise ValueError(f"layer {name}: crossbar weights must be symmetric {self.w_bits}-bit "
                             f"integers in [{-hi}, {hi}], got [{wq.min()}, {wq.max()}]")
        self.tiled = TiledGemm(wq, grid, scales, w_bits=self.w_bits, a_bits=self.a_bits,
                               a_unsigned=self.a_unsigned)
        self.lm = mapping if mapping is not None else map_layer(
            LayerSpec(name, grid.O, grid.K, grid, self.w_bits, self.a_bits,
                      a_unsigned=self.a_unsigned), crossbar, strict=False)
        lm = self.lm
        if (lm.O, lm.K, lm.r, lm.c, lm.groups) != (grid.O, grid.K, grid.r, grid.c, grid.groups):
            raise ValueError(f"layer {name}: mapping {lm.O}x{lm.K} tiles {lm.r}x{lm.c} "
                             f"groups={lm.groups} != grid")
        if lm.a_unsigned != self.a_unsigned:
            raise ValueError(f"layer {name}: mapping a_unsigned={lm.a_unsigned} != the layer's "
                             f"a_unsigned={self.a_unsigned}")
        self.grid, self.name, self.shortcut = grid, name, shortcut
        self.parts = None
        if grid.groups > 1:
            # a grouped layer: every group on arrays of its own (its own CrossbarGemm on its
            # rows, tiles and inputs); the partial sums are put together and rescaled here
            gm = lm.group_mapping()
            self.parts = [type(self)(wq[grid.group_rows(g)], grid.group_grid(),
                                       grid.group_scales(scales, g), crossbar, self.w_bits,
                                       self.a_bits, mapping=gm, name=f"{name} group {g}",
                                       shortcut=False, a_unsigned=self.a_unsigned)
                          for g in range(grid.groups)]
        else:
            self._build_columns(wq)
        self.n_arrays = lm.segments * lm.arrays_per_segment
        self.ranges = None
        self.recording = False
        self.seen = np.zeros(self.n_arrays, dtype=np.int64)
        self._set_tables()
        self.reset_stats()

    def _build_columns(self, wq) -> None:
        """The packed weights and column tables of an ungrouped layer's arrays."""
        from .. import array_kernels as ak
        crossbar, lm = self.crossbar, self.lm
        self.seg_bounds = np.asarray(lm.seg_bounds, dtype=np.int64)
        self.seg_col = np.searchsorted(self.grid.col_bounds(), self.seg_bounds[:-1],
                                       side="right") - 1
        self.words = -(-crossbar.rows // 64)
        (self.col_set, self.col_t, self.col_b0, self.col_nb, self.col_sign, self.n_sets,
         self.mag_bits) = ak.column_table(self.w_bits, crossbar.cell_bits, crossbar.signed)
        self.wk = ak.kernel_weights(
            ak.pack_weights(wq, self.w_bits, crossbar.signed, lm.seg_bounds, self.words),
            self.col_set, self.col_b0, self.col_nb, self.mag_bits, crossbar.cell_bits)
        self.col_arr = np.ascontiguousarray(lm.column_arrays(crossbar).T)      # (Q, O)
        off = (1 << (self.w_bits - 1)) - 1
        mask = (1 << crossbar.cell_bits) - 1
        self.ref_vals = np.array([(off >> (t * crossbar.cell_bits)) & mask
                                  for t in range(lm.ref_cols)], dtype=np.int64)

    # -- ADC ranges ----------------------------------------------------------------------------
    def _set_tables(self):
        if self.parts is not None:
            per = self.n_arrays // len(self.parts)
            for g, p in enumerate(self.parts):
                p.recording = self.recording
                p.ranges = None if self.ranges is None else self.ranges[g * per:(g + 1) * per]
                p._set_tables()
            self._parts_recording = self.recording
            self.thr = None if any(p.thr is None for p in self.parts) else True
            return
        ideal = self.recording or self.crossbar.adc_bits == 0
        if not ideal and self.crossbar.adc_range in ("calibrated", "calibrated_slice") \
                and self.ranges is None:
            self.thr = None                  # until fitted
            return
        from ..array_kernels import adc_lut
        self.thr, self.step, self.range_used = adc_tables(
            self.crossbar, self.lm, self.ranges, ideal)
        vmax = max(self.crossbar.full_range(r) for r in np.diff(self.seg_bounds))
        self.lut = (np.zeros((self.n_arrays, 1), np.int32) if ideal else
                    adc_lut(self.step, vmax, (1 << self.crossbar.adc_bits) - 1))

    def set_ranges(self, ranges) -> None:
        """Use these per-array ADC ranges (column-sum units), e.g. fitted ``calibrated`` ones."""
        self.ranges = np.maximum(np.asarray(ranges, dtype=np.float64), 1.0)
        self._set_tables()

    def start_fit(self) -> None:
        """Record the largest column sum per array over the next calls (ideal ADC meanwhile)."""
        self.recording = True
        self.seen[:] = 0
        for p in self.parts or ():
            p.seen[:] = 0
        self._set_tables()

    def finish_fit(self) -> np.ndarray:
        """Stop recording; the recorded maxima (at least 1) become the ADC ranges."""
        if self.parts is not None:
            self.seen = np.concatenate([p.seen for p in self.parts])
        self.recording = False
        self.set_ranges(np.maximum(self.seen, 1))
        return self.ranges

    @property
    def ideal(self) -> bool:
        return self.crossbar.adc_bits == 0 or self.recording

    def reset_stats(self) -> None:
        self.clipped = 0
        self.conversions = 0

    def conversions_per_vector(self, passes: int) -> int:
        """ADC conversions for one input vector: passes x cycles x segments x used columns
        (``pimsim.crossbar.mapping.adc_conversions`` of one vector)."""
        return adc_conversions(self.lm, 1, passes)

    # -- running -------------------------------------------------------------------------------
    def _psums(self, x: np.ndarray, passes: int) -> np.ndarray:
        """Partial sums P (J, nb, O) float64 of the input rows ``x`` (nb x K) on the arrays."""
        from .. import array_kernels as ak
        if self.parts is not None:
            return self._group_psums(x, passes)
        if self.thr is None:
            raise ValueError(f"layer {self.name}: adc_range calibrated: fit the ranges first "
                             "(start_fit / finish_fit on the calibration batch)")
        nb = x.shape[0]
        xb = np.empty((nb, passes, self.lm.segments, self.in_bits, self.words), np.uint64)
        bad = ak.pack_inputs(x, self.seg_bounds, self.in_bits, passes, self.words, xb)
        if bad:
            hi = (1 << self.in_bits) - 1
            if self.a_unsigned:
                raise ValueError(f"layer {self.name}: crossbar inputs must be unsigned "
                                 f"{self.a_bits}-bit integers in [0, {hi}]")
            raise ValueError(f"layer {self.name}: crossbar inputs must be symmetric "
                             f"{self.a_bits}-bit integers in [{-hi}, {hi}]")
        P = np.empty((self.grid.n_col_blocks, nb, self.grid.O), dtype=np.float64)
        clip = np.empty(nb, dtype=np.int64)
        rec = self.recording
        seen = np.zeros((nb if rec else 1, self.n_arrays), dtype=np.int64)
        levels = 0 if self.ideal else (1 << self.crossbar.adc_bits) - 1
        ak.array_psums(xb, self.wk, self.seg_col, self.col_t, self.col_sign,
                       self.crossbar.cell_bits, self.crossbar.dac_bits, self.col_arr,
                       self.lm.arrays_per_segment, self.ref_vals, levels, self.lut, self.thr,
                       self.step, rec, P, clip, seen)
        if rec:
            np.maximum(self.seen, seen.max(0), out=self.seen)
        self.clipped += int(clip.sum())
        return P

    def _group_psums(self, x: np.ndarray, passes: int) -> np.ndarray:
        """Grouped layer: each group's partial sums on its own arrays from its own K inputs."""
        if self._parts_recording != self.recording:     # recording switched from outside
            self._set_tables()
        if self.thr is None:
            raise ValueError(f"layer {self.name}: adc_range calibrated: fit the ranges first "
                             "(start_fit / finish_fit on the calibration batch)")
        g = self.grid
        P = np.empty((g.n_col_blocks, x.shape[0], g.O), dtype=np.float64)
        for gi, p in enumerate(self.parts):
            xg = np.ascontiguousarray(x[:, gi * g.K:(gi + 1) * g.K])
            P[:, :, g.group_rows(gi)] = p._psums(xg, passes)
            self.clipped += p.clipped
            p.clipped = 0
        if self.recording:
            self.seen = np.concatenate([p.seen for p in self.parts])
        return P

    def _run(self, N, rows, passes, sx, b, y):
        t = self.tiled
        self.conversions += adc_conversions(self.lm, N, passes)
        nb = t.chunk_size(N)
        for n0 in range(0, N, nb):
            n1 = min(N, n0 + nb)
            P = self._psums(rows(n0, n1), passes)
            t.combine(P, sx, b, y, n0)
        return y

    def _passes(self, x) -> int:
        """Sign passes of a layer call: 1 for unsigned inputs (a negative value is refused by
        ``pack_inputs``) and for a signed input without negative values, else 2."""
        if self.a_unsigned:
            return 1
        return 2 if float(x.min()) < 0 else 1

    def __call__(self, xq, act_scale: float, bias=None) -> np.ndarray:
        """Y^T (N x O, float32) of the input X^T (N x K integers or integer-valued floats)."""
        t = self.tiled
        sx, b = t.check_act_scale(act_scale), t.check_bias(bias)
        x = xq.numpy() if hasattr(xq, "numpy") else np.asarray(xq)
        if x.ndim != 2 or x.shape[1] != self.grid.K_in:
            raise ValueError(f"input must be N x K with K={self.grid.K_in}, got shape {x.shape}")
        passes = self._passes(x) if x.size else 1
        if self.ideal and self.shortcut and not self.recording:
            self.conversions += adc_conversions(self.lm, x.shape[0], passes)
            return t(x, act_scale, bias=bias, layout="NK")
        y = np.empty((x.shape[0], self.grid.O), dtype=np.float32)
        return self._run(x.shape[0], lambda n0, n1: x[n0:n1], passes, sx, b, y)

    def conv(self, xq4, act_scale: float, kernel_size, stride=(1, 1), padding=(0, 0),
             dilation=(1, 1), bias=None) -> np.ndarray:
        """A convolution on the arrays: (B, C, H, W) integers -> Y^T ((B*Ho*Wo) x O, float32)."""
        t = self.tiled
        sx, b = t.check_act_scale(act_scale), t.check_bias(bias)
        geom = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
        passes = self._passes(xq4) if xq4.numel() else 1
        if self.ideal and self.shortcut and not self.recording:
            y = t.conv(xq4, act_scale, *geom, bias=bias)
            self.conversions += adc_conversions(self.lm, y.shape[0], passes)
            return y
        N, rows = t.conv_rows(xq4, geom)

        def rows_np(n0, n1):
            r = rows(n0, n1)
            return r.numpy() if hasattr(r, "numpy") else r
        y = np.empty((N, self.grid.O), dtype=np.float32)
        return self._run(N, rows_np, passes, sx, b, y)
