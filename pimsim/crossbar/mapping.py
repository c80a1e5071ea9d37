"""The placement of a quantized network's tiles on crossbar arrays (``Mapping``), and the ADC
conversions that placement implies (``adc_conversions``, shared by the array simulation's
counters and the cost model).

Placement
---------
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
- Grouped convolution (``TileGrid.groups = g > 1``): every group is an ``O/g x K`` matrix with
  its own inputs, so each group is placed by the rule above on arrays of its own (its tiles
  are ``grid.group_tiles()``: a tile never spans two groups; the layerwise grid's one shared
  scale is cut at the group boundaries too). All groups have the same shape, so the layer's
  counts are g times those of one group (``LayerMapping.group_mapping``): ``segments``,
  ``arrays``, ``used_cells``, ``total_cells``; ``seg_bounds`` are those of one group (within
  its K columns) and ``used_columns = segments * (O/g * cols_per_weight + ref_cols *
  arrays_per_segment)``. Several small groups are not packed onto one array (a depthwise
  3x3 layer takes ``g`` arrays): the simple, conservative placement.


ADC conversions
---------------
In every DAC cycle every used bit line of every array is converted once (weight slices and
reference columns). An input vector is applied in ``input_cycles`` cycles per sign pass (1
pass for non-negative inputs, 2 when the positive and the negative part are applied) to every
segment (``input_cycles = ceil((a_bits - 1) / dac_bits)`` for signed inputs, whose magnitude
has a_bits - 1 bits; ``ceil(a_bits / dac_bits)`` for unsigned ones, ``a_unsigned``:
``quant.act_signed`` unsigned / auto, always one pass), and a segment's arrays hold ``O * cols_per_weight + ref_cols * arrays_per_segment``
used bit lines, so a layer makes
``vectors * passes * input_cycles * segments * (O * cols_per_weight + ref_cols *
arrays_per_segment)`` conversions (``adc_conversions``; ``vectors`` = output pixels x images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..quant import Granularity, TileGrid
from .geometry import Crossbar

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
    a_unsigned: bool = False          # inputs in [0, 2^a - 1]: one pass of a_bits magnitude bits


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
    groups: int = 1                   # grouped conv: counts are groups x those of one group
    a_unsigned: bool = False          # unsigned inputs (quant.act_signed): one sign pass

    @property
    def used_columns(self) -> int:
        """Bit lines converted by the ADCs in one cycle of all the layer's arrays:
        ``segments * (O/groups * cols_per_weight + ref_cols * arrays_per_segment)``."""
        return self.segments * (self.O // self.groups * self.cols_per_weight
                                + self.ref_cols * self.arrays_per_segment)

    def group_mapping(self) -> "LayerMapping":
        """The placement of one group alone (``self`` when ``groups == 1``)."""
        g = self.groups
        if g == 1:
            return self
        Og = self.O // g
        r = min(self.r, Og)
        return replace(self, O=Og, r=r, row_blocks=-(-Og // r), arrays=self.arrays // g,
                       segments=self.segments // g, used_cells=self.used_cells // g,
                       total_cells=self.total_cells // g, groups=1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seg_bounds"] = list(self.seg_bounds)
        return d

    def column_arrays(self, crossbar: Crossbar) -> np.ndarray:
        """Array index (0..arrays_per_segment-1, within a segment) of every bit line used by
        the layer's weights: int64 (O, cols_per_weight) (grouped: of one group, (O/groups,
        cols_per_weight), the same for every group)."""
        if self.groups > 1:
            return self.group_mapping().column_arrays(crossbar)
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


    def tile_placements(self, crossbar: Crossbar, grid: TileGrid) -> list[dict]:
        """Where every tile of ``grid`` (the layer's ``TileGrid``) sits on the layer's arrays, by
        the placement rule of the module docstring: one entry per tile as placed
        (``grid.group_tiles()``) with its ``group``, scale indices ``i, j`` and matrix rows
        ``o0:o1`` / columns ``k0:k1``, and its ``pieces``: one per (segment, array) holding
        part of it, each with ``array`` (the layer's array index: group by group, segment by
        segment, the arrays along the bit lines within a segment; the order of per-array ADC
        ranges), ``row_offset`` / ``rows`` (first word line and word lines used) and
        ``col_offset`` / ``cols`` (first bit line and bit lines used, reference columns not
        counted: they follow the weights' ``avail = cols - ref_cols`` bit lines)."""
        if (grid.O, grid.K, grid.r, grid.c, grid.groups) != (self.O, self.K, self.r, self.c,
                                                             self.groups):
            raise ValueError(f"layer {self.name}: grid {grid.O}x{grid.K} tiles "
                             f"{grid.r}x{grid.c} != mapping")
        one = self.group_mapping()
        cpw, avail = one.cols_per_weight, crossbar.cols - one.ref_cols
        aps, gr = one.arrays_per_segment, grid.group_r
        bounds = list(one.seg_bounds)
        fits = gr * cpw <= avail
        # first array (within a segment) of every row block of a group, when blocks span arrays
        starts, base = [], 0
        for ii in range(grid.blocks_per_group):
            starts.append(base)
            n = min(grid.Og, (ii + 1) * gr) - ii * gr
            base += -(-n * cpw // avail)
        out = []
        for g, i, j, rows, cols in grid.group_tiles():
            ii = (rows.start - g * grid.Og) // gr
            n = rows.stop - rows.start
            pieces = []
            for s in range(len(bounds) - 1):
                k0, k1 = bounds[s], bounds[s + 1]
                if k0 < cols.start or k1 > cols.stop:
                    continue
                a0 = g * one.arrays + s * aps
                if fits:
                    per = one.row_blocks_per_array
                    pieces.append({"array": a0 + ii // per, "row_offset": 0, "rows": k1 - k0,
                                   "col_offset": (ii % per) * gr * cpw, "cols": n * cpw})
                else:
                    left, t = n * cpw, 0
                    while left > 0:
                        pieces.append({"array": a0 + starts[ii] + t, "row_offset": 0,
                                       "rows": k1 - k0, "col_offset": 0,
                                       "cols": min(avail, left)})
                        left -= avail
                        t += 1
            out.append({"group": g, "i": i, "j": j, "o0": rows.start, "o1": rows.stop,
                        "k0": cols.start, "k1": cols.stop, "pieces": pieces})
        return out


def adc_conversions(lm: LayerMapping, vectors: int, passes: int = 1) -> int:
    """ADC conversions of ``vectors`` input vectors (output pixels x images) applied to layer
    ``lm`` in ``passes`` sign passes (1: non-negative inputs, 2: positive and negative part):
    ``vectors * passes * input_cycles * used_columns`` (module docstring). The one formula
    behind both ``CrossbarGemm.conversions`` and ``pimsim.cost``'s ``adc_conversions``."""
    return int(vectors) * int(passes) * lm.input_cycles * lm.used_columns


def map_layer(spec: LayerSpec, crossbar: Crossbar, strict: bool = True) -> LayerMapping:
    """Place one layer (see the module docstring); ValueError if it cannot be placed."""
    g = spec.grid
    if (g.O, g.K) != (spec.O, spec.K):
        raise ValueError(f"layer {spec.name}: grid {g.O}x{g.K} != layer {spec.O}x{spec.K}")
    if g.groups > 1:
        one = map_layer(LayerSpec(spec.name, g.Og, spec.K, g.group_grid(), spec.w_bits,
                                  spec.a_bits, spec.granularity, spec.a_unsigned), crossbar,
                        strict)
        n = g.groups
        return replace(one, O=spec.O, r=g.r, row_blocks=g.n_row_blocks, arrays=n * one.arrays,
                       segments=n * one.segments, used_cells=n * one.used_cells,
                       total_cells=n * one.total_cells, groups=n)
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
        slices=crossbar.slices(spec.w_bits),
        input_cycles=crossbar.input_cycles(spec.a_bits, spec.a_unsigned),
        seg_bounds=tuple(bounds), a_unsigned=bool(spec.a_unsigned))


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
                s = LayerSpec(s.name, s.O, s.K, s.grid, s.w_bits, s.a_bits, granularity,
                              s.a_unsigned)
            out.append(map_layer(s, crossbar, strict))
        return cls(crossbar, tuple(out))

    @classmethod
    def from_network(cls, net, crossbar: Crossbar, strict: bool = True,
                     granularity: Granularity | None = None) -> "Mapping":
        """Map the quantized layers (``.quant`` set) of a ``pimsim.network.Network``."""
        specs = [LayerSpec(l.name, l.O, l.K, l.quant.grid, l.quant.w_bits, l.quant.a_bits,
                           a_unsigned=l.quant.act_unsigned) for l in net.quantized_layers]
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
