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
from dataclasses import asdict, dataclass

import numpy as np

from ..quant import check_bits

SIGNED = ("differential", "offset")
RANGES = ("full", "calibrated")


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
