"""The crossbar: array geometry (``Crossbar``), the placement of tiles on arrays (``Mapping``)
and the array-level simulation of a quantized layer (``CrossbarGemm``).

Geometry and placement
----------------------
An array has ``rows`` word lines (inputs) and ``cols`` bit lines (outputs); a cell stores
``cell_bits`` bits. A quantized layer is the O x K integer matrix ``Wq`` cut by its
``TileGrid`` into r x c sub-matrices (one scale each). Placement rule:

- An array's word lines carry the inputs of ONE column block j of the grid (its c_j inputs).
  A column block with c_j > rows is split along K into ``ceil(c_j / rows)`` *segments* (each
  on its own arrays); the segments' column results are added digitally, after the ADCs,
  before the tile scale is applied, so the sub-matrix keeps one scale.
- Along the bit lines every segment holds all O rows of W. A weight occupies
  ``cols_per_weight`` adjacent bit lines; ``offset`` arrays also hold ``ref_cols`` reference
  columns each. With ``avail = cols - ref_cols`` and a row block of r rows needing
  ``r * cols_per_weight`` bit lines: if that fits, an array holds
  ``row_blocks_per_array = avail // (r * cols_per_weight)`` row blocks side by side and a
  segment needs ``ceil(row_blocks / row_blocks_per_array)`` arrays; otherwise every row block
  spans ``ceil(r_i * cols_per_weight / avail)`` arrays of its own (r_i: its actual rows; the
  bit lines of a row block are filled in order, so the slices of one weight may sit in two
  neighbouring arrays; every array has its own reference columns).
- Per layer: ``arrays = segments * arrays_per_segment`` with ``segments = sum_j ceil(c_j /
  rows)``; ``used_cells = K * (O * cols_per_weight + ref_cols * arrays_per_segment)`` (every
  input k is one used word line in one segment); ``total_cells = arrays * rows * cols``.
  Layerwise, channelwise, Method 1 and Method 2 grids all map this way. With ``strict=True``
  an explicit Method 1 tile (``Granularity`` kind ``tile``, incl. ``quant.tile: crossbar``)
  must fit one array (``c <= rows`` and ``r * cols_per_weight + ref_cols <= cols``).
  ``quant.tile: crossbar`` is ``Crossbar.tile_for(w_bits)``: ``c = rows``,
  ``r = (cols - ref_cols) // cols_per_weight``.

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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..quant import Granularity, TileGrid, check_bits

SIGNED = ("differential", "offset")
RANGES = ("full", "calibrated")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def _whole(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


# (field, lo, hi, unit/meaning) of the integer fields; shared with pimsim.config
INT_FIELDS = {
    "rows": (1, 4096, "word lines per array (inputs)"),
    "cols": (1, 4096, "bit lines per array (output columns)"),
    "cell_bits": (1, 8, "bits stored per cell"),
    "dac_bits": (1, 8, "input bits applied per cycle"),
    "adc_bits": (0, 16, "ADC resolution in bits, 0 = ideal"),
    "scale_bits": (1, 64, "bits to store one tile scale"),
}


def check_field(name: str, v) -> str | None:
    """An error text if ``v`` is not allowed for Crossbar field ``name``, else None."""
    if name in INT_FIELDS:
        lo, hi, _ = INT_FIELDS[name]
        if not _whole(v) or not lo <= v <= hi:
            return f"must be an integer in {lo}..{hi}"
        return None
    if name == "signed":
        return None if v in SIGNED else f"must be one of {', '.join(SIGNED)}"
    if name == "adc_range":
        if v in RANGES:
            return None
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
                and math.isfinite(v) and v > 0:
            return None
        return "must be full, calibrated or a positive number (a column-sum value)"
    if name == "name":
        return None if isinstance(v, str) and v else "must be a non-empty string"
    return "unknown crossbar field"


@dataclass(frozen=True)
class Crossbar:
    """A validated crossbar array description (YAML section ``crossbar:``)."""

    rows: int = 128                   # word lines = inputs per array
    cols: int = 128                   # bit lines = output columns per array
    cell_bits: int = 2                # bits stored per cell
    signed: str = "differential"      # "differential" | "offset"
    dac_bits: int = 1                 # input bits applied per cycle (bit-serial inputs)
    adc_bits: int = 0                 # 0 = ideal ADC
    adc_range: object = "full"        # "full" | "calibrated" | a positive number
    scale_bits: int = 16              # bits to store one tile scale
    name: str = "custom"

    def __post_init__(self):
        for f in ("rows", "cols", "cell_bits", "signed", "dac_bits", "adc_bits", "adc_range",
                  "scale_bits", "name"):
            problem = check_field(f, getattr(self, f))
            if problem:
                raise ValueError(f"crossbar.{f}: {getattr(self, f)!r}: {problem}")

    @classmethod
    def from_dict(cls, d: dict) -> "Crossbar":
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- derived -------------------------------------------------------------------------------
    def slices(self, w_bits: int) -> int:
        """Cells (slices) per weight magnitude (differential) or offset value (offset)."""
        b = check_bits(w_bits, "w_bits")
        mag = b - 1 if self.signed == "differential" else b
        return -(-mag // self.cell_bits)

    def cols_per_weight(self, w_bits: int) -> int:
        """Bit lines one weight occupies: 2 * slices (differential) or slices (offset)."""
        s = self.slices(w_bits)
        return 2 * s if self.signed == "differential" else s

    def ref_cols(self, w_bits: int) -> int:
        """Reference columns per array: the offset's slices (offset), 0 (differential)."""
        return self.slices(w_bits) if self.signed == "offset" else 0

    def input_cycles(self, a_bits: int) -> int:
        """DAC cycles per input vector and sign pass: ``ceil((a_bits - 1) / dac_bits)``."""
        return -(-(check_bits(a_bits, "a_bits") - 1) // self.dac_bits)

    def weight_problem(self, w_bits: int) -> str | None:
        """Why ``w_bits`` weights cannot be placed on this array, or None."""
        need = self.cols_per_weight(w_bits) + self.ref_cols(w_bits)
        if need > self.cols:
            ref = f" + {self.ref_cols(w_bits)} reference" if self.signed == "offset" else ""
            return (f"a {w_bits}-bit weight needs {self.cols_per_weight(w_bits)}{ref} bit lines "
                    f"({self.signed}, {self.slices(w_bits)} slice(s) of {self.cell_bits} bit(s)) "
                    f"but the array has cols={self.cols}")
        return None

    def check_weight_bits(self, w_bits: int) -> None:
        problem = self.weight_problem(w_bits)
        if problem:
            raise ValueError(problem)

    def tile_for(self, w_bits: int) -> tuple[int, int]:
        """The (r, c) tile that fills one array: ``c = rows``,
        ``r = (cols - ref_cols) // cols_per_weight``."""
        self.check_weight_bits(w_bits)
        return (self.cols - self.ref_cols(w_bits)) // self.cols_per_weight(w_bits), self.rows

    def tile_problem(self, r: int, c: int, w_bits: int) -> str | None:
        """Why an explicit r x c tile does not fit one array, or None."""
        cpw, ref = self.cols_per_weight(w_bits), self.ref_cols(w_bits)
        if c > self.rows or r * cpw + ref > self.cols:
            ref_s = f" + {ref} reference" if ref else ""
            return (f"tile {r}x{c} does not fit a {self.rows}x{self.cols} array at {w_bits}-bit "
                    f"weights: needs c <= {self.rows} word lines and r * {cpw}{ref_s} <= "
                    f"{self.cols} bit lines (largest: quant.tile: crossbar = "
                    f"{list(self.tile_for(w_bits))})")
        return None

    def full_range(self, rows_used: int) -> int:
        """Largest possible column sum with ``rows_used`` word lines driven."""
        return int(rows_used) * ((1 << self.cell_bits) - 1) * ((1 << self.dac_bits) - 1)


# --------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSpec:
    """What the mapping needs to know about one quantized layer. ``granularity`` (optional)
    says whether the grid is an explicit Method 1 tile (checked when ``strict``)."""

    name: str
    O: int
    K: int
    grid: TileGrid
    w_bits: int
    a_bits: int
    granularity: Granularity | None = None


@dataclass(frozen=True)
class LayerMapping:
    """Placement of one quantized layer's tiles on arrays (see the module docstring)."""

    name: str
    O: int
    K: int
    r: int
    c: int
    row_blocks: int
    col_blocks: int
    arrays: int
    cols_per_weight: int
    used_cells: int
    total_cells: int
    utilization: float
    w_bits: int
    a_bits: int
    segments: int = 0                 # sum_j ceil(c_j / rows)
    row_blocks_per_array: int = 1
    arrays_per_segment: int = 1       # arrays along the bit lines (same for every segment)
    ref_cols: int = 0                 # reference columns per array (offset)
    slices: int = 1
    input_cycles: int = 1
    seg_bounds: tuple = field(default=(), repr=False)   # K boundaries of the segments

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seg_bounds"] = list(self.seg_bounds)
        return d

    def column_arrays(self, crossbar: Crossbar) -> np.ndarray:
        """Array index (0..arrays_per_segment-1, within a segment) of every bit line used by
        the layer's weights: int64 (O, cols_per_weight)."""
        cpw, ref = self.cols_per_weight, self.ref_cols
        avail = crossbar.cols - ref
        out = np.empty((self.O, cpw), dtype=np.int64)
        q = np.arange(cpw)
        if self.r * cpw <= avail:
            per = self.row_blocks_per_array
            blk = np.arange(self.O) // self.r
            out[:] = (blk // per)[:, None]
        else:
            base = 0
            for i in range(self.row_blocks):
                o0, o1 = i * self.r, min(self.O, (i + 1) * self.r)
                local = (np.arange(o1 - o0)[:, None] * cpw + q[None]) // avail
                out[o0:o1] = base + local
                base += -(-(o1 - o0) * cpw // avail)
        return out


def map_layer(spec: LayerSpec, crossbar: Crossbar, strict: bool = True) -> LayerMapping:
    """Place one layer (see the module docstring); ValueError if it cannot be placed."""
    g = spec.grid
    if (g.O, g.K) != (spec.O, spec.K):
        raise ValueError(f"layer {spec.name}: grid {g.O}x{g.K} != layer {spec.O}x{spec.K}")
    problem = crossbar.weight_problem(spec.w_bits)
    if problem:
        raise ValueError(f"layer {spec.name}: {problem}")
    cpw, ref = crossbar.cols_per_weight(spec.w_bits), crossbar.ref_cols(spec.w_bits)
    if strict and spec.granularity is not None and spec.granularity.kind == "tile":
        problem = crossbar.tile_problem(g.r, g.c, spec.w_bits)
        if problem:
            raise ValueError(f"layer {spec.name}: {problem}")
    R, avail = crossbar.rows, crossbar.cols - ref
    bounds = [0]
    for j in range(g.n_col_blocks):
        cs = g.col_slice(j)
        for k0 in range(cs.start, cs.stop, R):
            bounds.append(min(cs.stop, k0 + R))
    segments = len(bounds) - 1
    nrb = g.n_row_blocks
    if g.r * cpw <= avail:
        per = avail // (g.r * cpw)
        per_seg = -(-nrb // per)
    else:
        per = 1
        per_seg = sum(-(-(min(g.O, (i + 1) * g.r) - i * g.r) * cpw // avail) for i in range(nrb))
    arrays = segments * per_seg
    used = spec.K * (spec.O * cpw + ref * per_seg)
    total = arrays * crossbar.rows * crossbar.cols
    return LayerMapping(
        name=spec.name, O=spec.O, K=spec.K, r=g.r, c=g.c, row_blocks=nrb,
        col_blocks=g.n_col_blocks, arrays=arrays, cols_per_weight=cpw, used_cells=used,
        total_cells=total, utilization=used / total, w_bits=spec.w_bits, a_bits=spec.a_bits,
        segments=segments, row_blocks_per_array=per, arrays_per_segment=per_seg, ref_cols=ref,
        slices=crossbar.slices(spec.w_bits), input_cycles=crossbar.input_cycles(spec.a_bits),
        seg_bounds=tuple(bounds))


@dataclass(frozen=True)
class Mapping:
    """The placement of every quantized layer of a network on crossbar arrays."""

    crossbar: Crossbar
    layers: tuple  # tuple[LayerMapping, ...], quantized layers in network order

    @property
    def arrays(self) -> int:
        return sum(l.arrays for l in self.layers)

    @property
    def used_cells(self) -> int:
        return sum(l.used_cells for l in self.layers)

    @property
    def total_cells(self) -> int:
        return sum(l.total_cells for l in self.layers)

    @property
    def utilization(self) -> float:
        t = self.total_cells
        return self.used_cells / t if t else 0.0

    @classmethod
    def from_layers(cls, specs, crossbar: Crossbar, strict: bool = True,
                    granularity: Granularity | None = None) -> "Mapping":
        """Map ``LayerSpec``s; ``granularity`` stands in for specs that carry none (it decides
        whether ``strict`` checks an explicit Method 1 tile)."""
        out = []
        for s in specs:
            if s.granularity is None and granularity is not None:
                s = LayerSpec(s.name, s.O, s.K, s.grid, s.w_bits, s.a_bits, granularity)
            out.append(map_layer(s, crossbar, strict))
        return cls(crossbar, tuple(out))

    @classmethod
    def from_network(cls, net, crossbar: Crossbar, strict: bool = True,
                     granularity: Granularity | None = None) -> "Mapping":
        """Map the quantized layers (``.quant`` set) of a ``pimsim.network.Network``."""
        specs = [LayerSpec(l.name, l.O, l.K, l.quant.grid, l.quant.w_bits, l.quant.a_bits)
                 for l in net.quantized_layers]
        return cls.from_layers(specs, crossbar, strict, granularity)

    def layer(self, name: str) -> LayerMapping:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"no mapped layer {name!r}; layers: {[l.name for l in self.layers]}")

    def to_dict(self) -> dict:
        return {"crossbar": self.crossbar.to_dict(), "arrays": self.arrays,
                "used_cells": self.used_cells, "total_cells": self.total_cells,
                "utilization": self.utilization, "layers": [l.to_dict() for l in self.layers]}


# --------------------------------------------------------------------------------------------
# Array-level simulation
# --------------------------------------------------------------------------------------------

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
        if crossbar.adc_range == "calibrated":
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
                 shortcut: bool = True):
        from .. import array_kernels as ak
        from ..kernels import TiledGemm
        self.crossbar = crossbar
        self.w_bits, self.a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits")
        wq = np.asarray(wq)
        hi = (1 << (self.w_bits - 1)) - 1
        if wq.size and (wq.min() < -hi or wq.max() > hi):
            raise ValueError(f"layer {name}: crossbar weights must be symmetric {self.w_bits}-bit "
                             f"integers in [{-hi}, {hi}], got [{wq.min()}, {wq.max()}]")
        self.tiled = TiledGemm(wq, grid, scales, w_bits=self.w_bits, a_bits=self.a_bits)
        self.lm = mapping if mapping is not None else map_layer(
            LayerSpec(name, grid.O, grid.K, grid, self.w_bits, self.a_bits), crossbar, strict=False)
        lm = self.lm
        if (lm.O, lm.K, lm.r, lm.c) != (grid.O, grid.K, grid.r, grid.c):
            raise ValueError(f"layer {name}: mapping {lm.O}x{lm.K} tiles {lm.r}x{lm.c} != grid")
        self.grid, self.name, self.shortcut = grid, name, shortcut
        self.seg_bounds = np.asarray(lm.seg_bounds, dtype=np.int64)
        self.seg_col = np.searchsorted(grid.col_bounds(), self.seg_bounds[:-1], side="right") - 1
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
        self.n_arrays = lm.segments * lm.arrays_per_segment
        self.ranges = None
        self.recording = False
        self.seen = np.zeros(self.n_arrays, dtype=np.int64)
        self._set_tables()
        self.reset_stats()

    # -- ADC ranges ----------------------------------------------------------------------------
    def _set_tables(self):
        ideal = self.recording or self.crossbar.adc_bits == 0
        if not ideal and self.crossbar.adc_range == "calibrated" and self.ranges is None:
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
        self._set_tables()

    def finish_fit(self) -> np.ndarray:
        """Stop recording; the recorded maxima (at least 1) become the ADC ranges."""
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
        """ADC conversions for one input vector: passes x cycles x segments x used columns."""
        lm = self.lm
        cols = lm.O * lm.cols_per_weight + lm.ref_cols * lm.arrays_per_segment
        return passes * lm.input_cycles * lm.segments * cols

    # -- running -------------------------------------------------------------------------------
    def _psums(self, x: np.ndarray, passes: int) -> np.ndarray:
        """Partial sums P (J, nb, O) float64 of the input rows ``x`` (nb x K) on the arrays."""
        from .. import array_kernels as ak
        if self.thr is None:
            raise ValueError(f"layer {self.name}: adc_range calibrated: fit the ranges first "
                             "(start_fit / finish_fit on the calibration batch)")
        nb = x.shape[0]
        xb = np.empty((nb, passes, self.lm.segments, self.a_bits - 1, self.words), np.uint64)
        bad = ak.pack_inputs(x, self.seg_bounds, self.a_bits, passes, self.words, xb)
        if bad:
            hi = (1 << (self.a_bits - 1)) - 1
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

    def _run(self, N, rows, passes, sx, b, y):
        from ..kernels import _combine_nk
        t = self.tiled
        self.conversions += N * self.conversions_per_vector(passes)
        for n0 in range(0, N, t._chunk(N)):
            n1 = min(N, n0 + t._chunk(N))
            P = self._psums(rows(n0, n1), passes)
            _combine_nk(P, t._srow, t._lim, sx, b, y, n0)
        return y

    @staticmethod
    def _passes(x) -> int:
        return 2 if float(x.min()) < 0 else 1

    def __call__(self, xq, act_scale: float, bias=None) -> np.ndarray:
        """Y^T (N x O, float32) of the input X^T (N x K integers or integer-valued floats)."""
        t = self.tiled
        sx, b = t._check_act_scale(act_scale), t._check_bias(bias)
        x = xq.numpy() if hasattr(xq, "numpy") else np.asarray(xq)
        if x.ndim != 2 or x.shape[1] != self.grid.K:
            raise ValueError(f"input must be N x K with K={self.grid.K}, got shape {x.shape}")
        passes = self._passes(x) if x.size else 1
        if self.ideal and self.shortcut and not self.recording:
            self.conversions += x.shape[0] * self.conversions_per_vector(passes)
            return t(x, act_scale, bias=bias, layout="NK")
        y = np.empty((x.shape[0], self.grid.O), dtype=np.float32)
        return self._run(x.shape[0], lambda n0, n1: x[n0:n1], passes, sx, b, y)

    def conv(self, xq4, act_scale: float, kernel_size, stride=(1, 1), padding=(0, 0),
             dilation=(1, 1), bias=None) -> np.ndarray:
        """A convolution on the arrays: (B, C, H, W) integers -> Y^T ((B*Ho*Wo) x O, float32)."""
        t = self.tiled
        sx, b = t._check_act_scale(act_scale), t._check_bias(bias)
        geom = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
        passes = self._passes(xq4) if xq4.numel() else 1
        if self.ideal and self.shortcut and not self.recording:
            y = t.conv(xq4, act_scale, *geom, bias=bias)
            self.conversions += y.shape[0] * self.conversions_per_vector(passes)
            return y
        N, rows = t._conv_rows(xq4, geom)

        def rows_np(n0, n1):
            r = rows(n0, n1)
            return r.numpy() if hasattr(r, "numpy") else r
        y = np.empty((N, self.grid.O), dtype=np.float32)
        return self._run(N, rows_np, passes, sx, b, y)


# --------------------------------------------------------------------------------------------
# A network on crossbars
# --------------------------------------------------------------------------------------------

def attach(net, crossbar: Crossbar, granularity: Granularity | None = None,
           strict: bool = True) -> Mapping:
    """Put the quantized layers of ``net`` (a calibrated ``pimsim.network.Network``) on arrays:
    their weights become symmetric (a weight at ``-2^(b-1)`` is stored as ``-(2^(b-1)-1)``, as
    the arrays cannot hold it; inputs are clamped the same way), the ``Mapping`` is built and
    every layer gets its ``CrossbarGemm`` (mode ``crossbar``). Returns the mapping."""
    from ..calibrate import symmetric_quant
    for l in net.quantized_layers:
        if not l.quant.symmetric:
            mode = l.mode
            l.set_quant(symmetric_quant(l.quant, True))
            l.mode = mode
    mapping = Mapping.from_network(net, crossbar, strict=strict, granularity=granularity)
    for l in net.quantized_layers:
        l.set_crossbar(crossbar, mapping.layer(l.name))
    return mapping


def fit_adc_ranges(net, images, batch_size: int = 500) -> dict:
    """The ``calibrated`` ADC range: run ``images`` (normalized tensor) through ``net`` with
    every quantized layer in mode ``crossbar`` and an ideal ADC, record the largest column sum
    per array, and make it that array's range. Returns ``{layer: ranges}``."""
    import torch
    layers = [l for l in net.quantized_layers if l.xbar is not None]
    saved = {l.name: l.mode for l in net.layers}
    try:
        for l in layers:
            l.mode = "crossbar"
            l.xbar.start_fit()
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                net(images[s:s + batch_size])
        return {l.name: l.xbar.finish_fit().tolist() for l in layers}
    finally:
        for l in net.layers:
            l.mode = saved[l.name]
        for l in layers:
            l.xbar.recording = False


def reset_adc_stats(net) -> None:
    for l in net.quantized_layers:
        if l.xbar is not None:
            l.xbar.reset_stats()


def adc_stats(net) -> dict:
    """``{layer: (clipped, conversions)}`` counted since the last ``reset_adc_stats``."""
    return {l.name: (l.xbar.clipped, l.xbar.conversions) for l in net.quantized_layers
            if l.xbar is not None}
