"""Symmetric signed quantizer (Eq. 1-2) and the tile granularity of an O x K weight matrix.

``quantize``/``dequantize`` work on numpy arrays and torch tensors alike. ``TileGrid`` is a small
value object saying how an im2col weight matrix is cut into r x c sub-matrices, each with its own
scale: regular tiles (Method 1), r rows with m horizontal splits (Method 2), layerwise and
channelwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MIN_BITS = 2
MAX_BITS = 16


def check_bits(bits, what: str = "bits") -> int:
    """Return ``bits`` as int, or raise ValueError unless it is a whole number in 2..16."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{what} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return int(bits)


def qrange(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """Signed integer range ``(-2^(b-1), 2^(b-1) - 1)`` of a b-bit quantizer;
    ``symmetric``: ``(-(2^(b-1) - 1), 2^(b-1) - 1)`` (what crossbar arrays store: a magnitude
    and a sign, or an offset code of ``2^b - 1`` levels)."""
    bits = check_bits(bits)
    hi = (1 << (bits - 1)) - 1
    return (-hi if symmetric else -hi - 1), hi


ACT_SIGNED = ("signed", "unsigned", "auto")


def act_qrange(bits: int, symmetric: bool = False, unsigned: bool = False) -> tuple[int, int]:
    """Integer range of b-bit activations: ``unsigned`` ``(0, 2^b - 1)`` (a non-negative
    input, e.g. after ReLU: the DAC applies all b bits in one pass), else ``qrange(bits,
    symmetric)``."""
    if unsigned:
        return 0, (1 << check_bits(bits)) - 1
    return qrange(bits, symmetric)


def act_max_scale(absmax, bits: int, unsigned: bool = False):
    """``max`` calibration scale of activations: ``max|x| / act_qrange(...)[1]`` (``max_scale``
    for signed inputs); an all-zero input gets scale 1."""
    if not unsigned:
        return max_scale(absmax, bits)
    s = np.asarray(absmax, dtype=np.float64) / act_qrange(bits, unsigned=True)[1]
    return np.where(s > 0, s, 1.0)


def act_unsigned(mode: str, layer: str, xmin: float) -> bool:
    """Whether layer ``layer`` quantizes its input unsigned under ``quant.act_signed = mode``,
    given the smallest value ``xmin`` of its calibration input: ``signed`` never, ``auto``
    when ``xmin >= 0``, ``unsigned`` always (ValueError naming the layer when ``xmin < 0``)."""
    if mode not in ACT_SIGNED:
        raise ValueError(f"quant.act_signed must be one of {', '.join(ACT_SIGNED)}, got {mode!r}")
    if mode == "signed":
        return False
    if mode == "auto":
        return bool(xmin >= 0)
    if xmin < 0:
        raise ValueError(f"layer {layer}: quant.act_signed unsigned needs a non-negative input, "
                         f"but its calibration input has min {xmin:.6g} (use auto or signed)")
    return True


def int_dtype(bits: int) -> np.dtype:
    """Storage dtype of b-bit integers: int8 up to 8 bits, int16 above."""
    return np.dtype(np.int8) if check_bits(bits) <= 8 else np.dtype(np.int16)


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _check_scale(scale):
    """Validate a scale (positive scalar or broadcastable array); returned as float64 numpy."""
    s = scale.detach().to(torch.float64).cpu().numpy() if _is_torch(scale) else \
        np.asarray(scale, dtype=np.float64)
    if s.size == 0:
        raise ValueError("scale is empty")
    if np.isnan(s).any():
        raise ValueError("scale contains NaN")
    if not np.isfinite(s).all():
        raise ValueError("scale contains inf")
    if (s <= 0).any():
        raise ValueError(f"scale must be > 0, got min {s.min()!r}")
    return s


def _check_finite(x):
    ok = torch.isfinite(x).all().item() if _is_torch(x) else np.isfinite(x).all()
    if not ok:
        n_nan = int(torch.isnan(x).sum()) if _is_torch(x) else int(np.isnan(x).sum())
        kind = "NaN" if n_nan else "inf"
        raise ValueError(f"data to quantize contains {kind} values")


def quantize(x, scale, bits: int, out_dtype=None, symmetric: bool = False):
    """Eq. 1: ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``.

    ``x`` is a numpy array or torch tensor; ``scale`` a positive scalar or an array that
    broadcasts against ``x``. ``x / s`` is formed in float64 and rounded half-to-even, so numpy
    and torch give the same integers for the same data. Returns
    integers in the storage dtype of ``bits`` (int8 up to 8 bits, int16 above) unless
    ``out_dtype`` is given (e.g. ``np.float32`` for integer-valued floats ready for BLAS).
    ``symmetric``: clamp to ``-(2^(b-1) - 1)`` below (``qrange``).
    """
    bits = check_bits(bits)
    lo, hi = qrange(bits, symmetric)
    _check_finite(x)
    s = _check_scale(scale)
    if _is_torch(x):
        q = torch.clamp(torch.round(x.to(torch.float64) / torch.from_numpy(s).to(x.device)), lo, hi)
        return q.to(out_dtype or (torch.int8 if bits <= 8 else torch.int16))
    q = np.clip(np.rint(np.asarray(x, dtype=np.float64) / s), lo, hi)
    return q.astype(out_dtype or int_dtype(bits))


def dequantize(q, scale):
    """Eq. 2: ``x ~= s * q`` (float32 result for integer input)."""
    if _is_torch(q):
        s = scale if _is_torch(scale) else torch.as_tensor(np.asarray(scale), dtype=torch.float32)
        return q.to(torch.float32) * s.to(torch.float32)
    return np.asarray(q, dtype=np.float32) * np.asarray(scale, dtype=np.float32)


def fake_quantize(x, scale, bits: int):
    """Quantize then dequantize (float32): the value the integer hardware represents."""
    return dequantize(quantize(x, scale, bits), scale)


def max_scale(absmax, bits: int):
    """The ``max`` calibration scale ``max|x| / (2^(b-1) - 1)``; an all-zero block gets scale 1."""
    s = np.asarray(absmax, dtype=np.float64) / qrange(bits)[1]
    return np.where(s > 0, s, 1.0)      # all-zero (or subnormal) block: any scale, take 1


# --------------------------------------------------------------------------------------------
# Granularity
# --------------------------------------------------------------------------------------------

KINDS = ("tile", "split", "layerwise", "channelwise")


def _check_size(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    if v <= 0:
        raise ValueError(f"{what} must be a positive integer, got {v}")
    return int(v)


@dataclass(frozen=True)
class Granularity:
    """How a layer's weight matrix is shared out among scaling factors, before knowing O x K.

    ``kind``: ``"tile"`` (Method 1: r x c), ``"split"`` (Method 2: r rows, m horizontal splits,
    c = ceil(K/m)), ``"layerwise"`` (one scale) or ``"channelwise"`` (one scale per row).
    ``resolve(O, K)`` gives the concrete ``TileGrid`` of a layer.
    """

    kind: str
    r: int | None = None
    c: int | None = None
    m: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"granularity kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "tile":
            _check_size(self.r, "tile rows r")
            _check_size(self.c, "tile columns c")
        elif self.kind == "split":
            _check_size(self.r, "tile rows r")
            _check_size(self.m, "splits m")

    @classmethod
    def tile(cls, r: int, c: int) -> "Granularity":
        return cls("tile", r=r, c=c)

    @classmethod
    def split(cls, r: int, m: int) -> "Granularity":
        return cls("split", r=r, m=m)

    @classmethod
    def layerwise(cls) -> "Granularity":
        return cls("layerwise")

    @classmethod
    def channelwise(cls) -> "Granularity":
        return cls("channelwise")

    def resolve(self, O: int, K: int, groups: int = 1) -> "TileGrid":
        """The tile grid of an O x K matrix (tile sizes larger than the matrix clamp to it).

        ``groups`` (a grouped convolution): the O x K matrix is ``groups`` matrices of
        ``O/groups`` rows stacked along the rows, K their (common) column count; every group
        is cut on its own (tile rows clamp to ``O/groups``, Method 2's ``c = ceil(K/m)`` of
        the group's K). Layerwise stays one scale for the whole layer, channelwise one per row.
        """
        O = _check_size(O, "O (rows)")
        K = _check_size(K, "K (columns)")
        groups = _check_size(groups, "groups")
        if O % groups:
            raise ValueError(f"O={O} rows are not divisible by groups={groups}")
        Og = O // groups
        if self.kind == "tile":
            r, c = min(self.r, Og), self.c
        elif self.kind == "split":
            r, c = min(self.r, Og), math.ceil(K / min(self.m, K))
        elif self.kind == "layerwise":
            r, c = O, K
        else:
            r, c = 1, K
        return TileGrid(O, K, min(r, O), min(c, K), groups)

    def label(self) -> str:
        if self.kind == "tile":
            return f"{self.r}x{self.c}"
        if self.kind == "split":
            return f"{self.r}x(K/{self.m})"
        return self.kind

    def __str__(self) -> str:
        return self.label()


@dataclass(frozen=True)
class TileGrid:
    """The concrete cut of an O x K matrix into tiles of r rows and c columns.

    Tiles on the bottom and right edges are smaller when r or c does not divide O or K.
    The scale array of the layer has shape ``(n_row_blocks, ceil(K/c))``.

    ``groups`` (default 1): the matrix is a grouped convolution's ``groups`` matrices of
    ``Og = O/groups`` rows and K columns stacked along the rows (PyTorch's
    ``weight.reshape(O, -1)``); group g's rows multiply only its own K input columns, which
    are columns ``g*K .. (g+1)*K`` of the layer input (``K_in = groups * K`` of them). Row
    blocks restart at every group boundary: each group has ``ceil(Og/r)`` row blocks
    (``r <= Og``), so no tile spans two groups. The one exception is the layerwise grid
    ``r = O``: a single row block whose one scale is shared by all groups; its tiles as placed
    on arrays are still cut at the group boundaries (``group_tiles``).
    With ``groups = 1`` everything is as for a plain matrix.
    """

    O: int
    K: int
    r: int
    c: int
    groups: int = 1

    def __post_init__(self):
        for v, what in ((self.O, "O"), (self.K, "K"), (self.r, "r"), (self.c, "c"),
                        (self.groups, "groups")):
            _check_size(v, what)
        if self.r > self.O or self.c > self.K:
            raise ValueError(f"tile {self.r}x{self.c} larger than matrix {self.O}x{self.K}")
        if self.O % self.groups:
            raise ValueError(f"O={self.O} rows are not divisible by groups={self.groups}")
        if self.r > self.Og and self.r != self.O:
            raise ValueError(f"tile rows r={self.r} span two groups of {self.Og} rows "
                             f"(groups={self.groups}); r must be <= {self.Og} or = O")

    # -- groups --------------------------------------------------------------------------------
    @property
    def Og(self) -> int:
        """Rows per group: ``O / groups``."""
        return self.O // self.groups

    @property
    def K_in(self) -> int:
        """Columns of the layer input: ``groups * K``."""
        return self.groups * self.K

    @property
    def shared(self) -> bool:
        """True when one row block spans several groups (the layerwise grid of a grouped
        layer: one scale shared by all groups)."""
        return self.groups > 1 and self.r == self.O

    @property
    def group_r(self) -> int:
        """Rows of a tile inside one group: ``min(r, Og)``."""
        return min(self.r, self.Og)

    @property
    def blocks_per_group(self) -> int:
        """Row blocks of one group (tiles as placed on arrays): ``ceil(Og / group_r)``."""
        return -(-self.Og // self.group_r)

    def group_rows(self, g: int) -> slice:
        if not 0 <= g < self.groups:
            raise IndexError(f"group {g} out of range 0..{self.groups - 1}")
        return slice(g * self.Og, (g + 1) * self.Og)

    def group_grid(self) -> "TileGrid":
        """The grid of one group alone: ``Og x K`` with tiles of ``group_r x c``."""
        return TileGrid(self.Og, self.K, self.group_r, self.c)

    def group_scales(self, scales, g: int) -> np.ndarray:
        """Group g's part of a ``shape`` scale array, as the ``group_grid().shape`` array."""
        s = np.asarray(scales)
        if s.shape != self.shape:
            raise ValueError(f"scale array shape {s.shape} != grid shape {self.shape}")
        if self.shared:
            return np.repeat(s, self.blocks_per_group, axis=0)
        b = self.blocks_per_group
        return s[g * b:(g + 1) * b]

    # -- blocks --------------------------------------------------------------------------------
    @property
    def n_row_blocks(self) -> int:
        if self.shared:
            return 1
        return self.groups * self.blocks_per_group

    @property
    def n_col_blocks(self) -> int:
        return -(-self.K // self.c)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the scale array: ``(n_row_blocks, ceil(K/c))``."""
        return self.n_row_blocks, self.n_col_blocks

    @property
    def n_tiles(self) -> int:
        return self.n_row_blocks * self.n_col_blocks

    def row_slice(self, i: int) -> slice:
        if not 0 <= i < self.n_row_blocks:
            raise IndexError(f"row block {i} out of range 0..{self.n_row_blocks - 1}")
        if self.shared:
            return slice(0, self.O)
        g, ii = divmod(i, self.blocks_per_group)
        o0 = g * self.Og
        return slice(o0 + ii * self.r, o0 + min((ii + 1) * self.r, self.Og))

    def col_slice(self, j: int) -> slice:
        if not 0 <= j < self.n_col_blocks:
            raise IndexError(f"column block {j} out of range 0..{self.n_col_blocks - 1}")
        return slice(j * self.c, min((j + 1) * self.c, self.K))

    def tile_slices(self, i: int, j: int) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of tile (i, j)."""
        return self.row_slice(i), self.col_slice(j)

    def tiles(self):
        """Iterate ``(i, j, rows, cols)`` over all scale tiles, row-block major."""
        for i in range(self.n_row_blocks):
            for j in range(self.n_col_blocks):
                yield (i, j) + self.tile_slices(i, j)

    def group_tiles(self):
        """Iterate ``(g, i, j, rows, cols)`` over the tiles as placed on arrays: those of
        ``tiles`` cut at the group boundaries (the same unless ``shared``); ``i`` is the row
        block (scale) the tile belongs to, ``rows`` lie inside group g."""
        b, gr = self.blocks_per_group, self.group_r
        for g in range(self.groups):
            o0 = g * self.Og
            for ii in range(b):
                rows = slice(o0 + ii * gr, o0 + min((ii + 1) * gr, self.Og))
                i = 0 if self.shared else g * b + ii
                for j in range(self.n_col_blocks):
                    yield g, i, j, rows, self.col_slice(j)

    def row_block_starts(self) -> np.ndarray:
        """The first row of every row block (int64, length n_row_blocks)."""
        if self.shared:
            return np.zeros(1, dtype=np.int64)
        local = np.arange(0, self.Og, self.r, dtype=np.int64)
        return (np.arange(self.groups, dtype=np.int64)[:, None] * self.Og
                + local[None]).reshape(-1)

    def row_block_index(self) -> np.ndarray:
        """``i(o)`` for every row o: the row block it belongs to (int64, length O)."""
        o = np.arange(self.O, dtype=np.int64)
        if self.groups == 1:
            return o // self.r
        if self.shared:
            return np.zeros(self.O, dtype=np.int64)
        return (o // self.Og) * self.blocks_per_group + (o % self.Og) // self.r

    def group_of_row(self) -> np.ndarray:
        """The group of every row (int64, length O)."""
        return np.arange(self.O, dtype=np.int64) // self.Og

    def col_bounds(self) -> np.ndarray:
        """Column boundaries ``[0, c, 2c, ..., K]`` (int64, length n_col_blocks + 1)."""
        return np.minimum(np.arange(self.n_col_blocks + 1, dtype=np.int64) * self.c, self.K)

    def expand(self, scales) -> np.ndarray:
        """Broadcast a ``shape`` scale array to the full O x K matrix; a leading stack
        dimension (``(m,) + shape`` -> ``(m, O, K)``) is kept."""
        s = np.asarray(scales)
        if s.shape[-2:] != self.shape or s.ndim not in (2, 3):
            raise ValueError(f"scale array shape {s.shape} != grid shape {self.shape}")
        if self.groups == 1:
            rows = np.repeat(s, self.r, axis=-2)[..., : self.O, :]
        else:
            rows = np.take(s, self.row_block_index(), axis=-2)
        return np.repeat(rows, self.c, axis=-1)[..., : self.K]

    def block_sum(self, v) -> np.ndarray:
        """Sums of ``v`` (..., O, K) over every tile: (..., n_row_blocks, n_col_blocks)."""
        rows = np.add.reduceat(v, self.row_block_starts(), axis=-2)
        return np.add.reduceat(rows, self.col_bounds()[:-1], axis=-1)

    def block_absmax(self, w) -> np.ndarray:
        """``max|W_ij|`` of every tile, shape ``shape``."""
        w = np.abs(np.asarray(w, dtype=np.float64))
        if w.shape != (self.O, self.K):
            raise ValueError(f"matrix shape {w.shape} != grid {self.O}x{self.K}")
        rows = np.maximum.reduceat(w, self.row_block_starts(), axis=0)
        return np.maximum.reduceat(rows, self.col_bounds()[:-1], axis=1)


def max_scales(w, grid: TileGrid, bits: int) -> np.ndarray:
    """Per-tile ``max`` calibration scales ``max|W_ij| / (2^(b-1) - 1)`` (float64)."""
    return max_scale(grid.block_absmax(w), bits)


def quantize_weight(w, grid: TileGrid, scales, bits: int, symmetric: bool = False) -> np.ndarray:
    """Quantize an O x K weight matrix tile by tile with its ``grid.shape`` scale array."""
    w = np.asarray(w)
    if w.shape != (grid.O, grid.K):
        raise ValueError(f"matrix shape {w.shape} != grid {grid.O}x{grid.K}")
    return quantize(w, grid.expand(scales), bits, symmetric=symmetric)
