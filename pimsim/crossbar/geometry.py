"""A crossbar array: its geometry and number formats (``Crossbar``) and their validation.

An array has ``rows`` word lines (inputs) and ``cols`` bit lines (outputs); a cell stores
``cell_bits`` bits; inputs are applied ``dac_bits`` at a time; ``adc_bits`` (0 = ideal) and
``adc_range`` describe the column ADCs; ``signed`` says how signed weights are stored
(``differential`` or ``offset``, see ``pimsim.crossbar.arrays``). The derived quantities
(slices and bit lines per weight, reference columns, DAC cycles per input, the largest column
sum) are what the mapping (``pimsim.crossbar.mapping``), the array simulation and the cost
model (``pimsim.cost``) read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..quant import check_bits
from ..schema import non_empty_str, setting

SIGNED = ("differential", "offset")
RANGES = ("full", "calibrated", "calibrated_slice")
COMPENSATION = ("none", "global", "tile")


def _whole(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


class _IntRange:
    """Check of an integer field: a whole number (NumPy integers too) in ``lo..hi``."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, v) -> str | None:
        if not _whole(v) or not self.lo <= v <= self.hi:
            return f"must be an integer in {self.lo}..{self.hi}"
        return None


def _signed(v) -> str | None:
    return None if v in SIGNED else f"must be one of {', '.join(SIGNED)}"


def _adc_range(v) -> str | None:
    if v in RANGES:
        return None
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
            and math.isfinite(v) and v > 0:
        return None
    return "must be full, calibrated, calibrated_slice or a positive number (a column-sum value)"


def _compensation(v) -> str | None:
    return None if v in COMPENSATION else f"must be one of {', '.join(COMPENSATION)}"


def _device_check(v) -> str | None:
    from .device import check_device
    return check_device(v)


def _device_defaults() -> dict:
    from .device import DEVICE_DEFAULTS
    return dict(DEVICE_DEFAULTS)


@dataclass(frozen=True)
class Crossbar:
    """A validated crossbar array description: the YAML section ``crossbar:``, whose keys,
    defaults, checks and docs ``pimsim.config`` reads from these fields (``pimsim.schema``)."""

    rows: int = setting(128, "word lines per array = inputs (count)", _IntRange(1, 4096))
    cols: int = setting(128, "bit lines per array = output columns (count)", _IntRange(1, 4096))
    cell_bits: int = setting(2, "bits stored per cell (1..8)", _IntRange(1, 8))
    signed: str = setting("differential", "signed weights: differential (+/- column sets) | "
                          "offset (w + 2^(b-1)-1 with reference columns)", _signed)
    dac_bits: int = setting(1, "input bits applied per cycle (1..8), inputs are bit-serial",
                            _IntRange(1, 8))
    adc_bits: int = setting(0, "ADC resolution in bits (0 = ideal, 1..16)", _IntRange(0, 16))
    adc_range: object = setting("full", "ADC range: full (largest possible column sum) | "
                                "calibrated (per array, largest column sum on the calibration "
                                "batch) | calibrated_slice (per array and weight slice) | a number "
                                "(column-sum units)", _adc_range)
    scale_bits: int = setting(16, "bits to store one tile scale (1..64)", _IntRange(1, 64))
    name: str = setting("custom", "preset name", non_empty_str)
    compensation: str = setting("none", "drift compensation from reference inputs: none | "
                                "global (one factor per layer) | tile (one factor per tile, "
                                "folded into its scale)", _compensation)
    device: dict = setting(doc="the cells as real devices (pimsim.crossbar.device.Device); "
                           "all defaults = ideal cells", check=_device_check,
                           factory=_device_defaults)

    def __post_init__(self):
        for f in fields(self):
            problem = f.metadata["check"](getattr(self, f.name))
            if problem:
                if f.name == "device":               # names crossbar.device.<key> itself
                    raise ValueError(problem)
                raise ValueError(f"crossbar.{f.name}: {getattr(self, f.name)!r}: {problem}")
        from .device import Device
        object.__setattr__(self, "_device", Device.from_dict(self.device))

    @property
    def dev(self):
        """The ``pimsim.crossbar.device.Device`` of ``device``."""
        return self._device

    @property
    def analog(self) -> bool:
        """True when the layer must run on the analog (float) array model,
        ``pimsim.crossbar.noisy``: non-ideal cells, per-slice ADC ranges or drift compensation."""
        return (not self._device.ideal or self.compensation != "none"
                or (self.adc_range == "calibrated_slice" and self.adc_bits > 0))

    def __hash__(self):
        return hash(tuple((f.name, repr(getattr(self, f.name))) for f in fields(self)))

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

    def input_cycles(self, a_bits: int, unsigned: bool = False) -> int:
        """DAC cycles per input vector and sign pass: ``ceil((a_bits - 1) / dac_bits)`` (the
        magnitude of a signed input); ``unsigned`` inputs in ``[0, 2^a - 1]``:
        ``ceil(a_bits / dac_bits)`` in their one pass."""
        mag = check_bits(a_bits, "a_bits") - (0 if unsigned else 1)
        return -(-mag // self.dac_bits)

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


_CHECKS = {f.name: f.metadata["check"] for f in fields(Crossbar)}

# {field: (lo, hi, meaning)} of the integer fields, read off the Crossbar fields
INT_FIELDS = {f.name: (c.lo, c.hi, f.metadata["doc"]) for f in fields(Crossbar)
              if isinstance(c := f.metadata["check"], _IntRange)}


def check_field(name: str, v) -> str | None:
    """An error text if ``v`` is not allowed for Crossbar field ``name``, else None."""
    check = _CHECKS.get(name)
    return "unknown crossbar field" if check is None else check(v)
