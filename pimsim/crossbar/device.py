"""The cells of a crossbar as real devices: the YAML section ``crossbar.device:`` (``Device``)
and the statistical model that turns a cell's target level into its programmed, drifted
conductance (``DevicePhysics``).

Units: every conductance is a fraction of the cell's largest conductance ``g_max`` (so the
on/off ratio is ``1 / g_min``). A cell storing level ``l`` of ``L = 2^cell_bits - 1`` is
programmed to the target ``g_T = g_min + (1 - g_min) * l / L`` (levels linear in
``[g_min, 1]``).

The model of one cell, in this order (``DevicePhysics.program`` / ``at_time``):

1. programming: ``g_P = max(g_T + sigma_p(g_T) * z, 0)``, ``z ~ N(0, 1)``, with
   ``sigma_p(g) = programming_noise + programming_noise_rel * g`` (or the named model's
   polynomial in ``g``);
2. stuck cells: with probability ``stuck_off`` the cell is at ``g_min``, with probability
   ``stuck_on`` at 1 (whatever its target; stuck cells do not drift);
3. drift: ``nu = max(nu_mean + nu_std * z', 0)`` per cell (``drift_nu`` / ``drift_nu_std``;
   the PCM model: ``|nu_mean(g_T) + nu_std(g_T) * z'|``, functions of the level) and, ``t_inference`` seconds after
   the first read at ``t0`` (aihwkit's convention: ``t = t0 + t_inference``),
   ``g(t) = g_P * (t / t0)^-nu``;
4. the PCM model only (``model: pcm`` without an explicit ``read_noise``): the accumulated 1/f
   noise of Nandakumar et al., a per-cell deviation at that time,
   ``g += |g| * q(g_P) * sqrt(ln((t + t_read) / (2 t_read))) * z''``, clipped at 0;
5. every read (every array cycle, ``pimsim.crossbar.noisy``): each cell's conductance seen
   with a fresh ``N(0, read_noise)`` deviation.

A cell's random draws depend only on (``seed``, layer, segment (array row of arrays), word line,
bit line, slice): ``pimsim.crossbar.noisy`` draws all cells of a layer at once, in a fixed
layout, from ``SeedSequence([seed, crc32(layer name)])``.

Named models (``model: pcm | rram``) are YAML files in ``hwconfigs/devices/`` holding the
published coefficients and their source; a key given explicitly in ``crossbar.device``
replaces the model's value (or level-dependent function) of that quantity. Keys left at
``null`` take the model's value, else the ideal one (0; ``t0``: 20 s).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..schema import setting

MODELS = ("none", "pcm", "rram")
DEVICES_DIR = Path(__file__).resolve().parents[2] / "hwconfigs" / "devices"


def _num(v) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and math.isfinite(v))


def _nonneg(v):
    return None if v is None or (_num(v) and v >= 0) else "must be a number >= 0 (or null)"


def _positive(v):
    return None if v is None or (_num(v) and v > 0) else "must be a number > 0 (or null)"


def _g_min(v):
    if v is None or (_num(v) and 0 <= v < 1):
        return None
    return "must be a number in [0, 1) (a fraction of g_max; on/off ratio = 1/g_min) or null"


def _fraction(v):
    return None if _num(v) and 0 <= v <= 1 else "must be a fraction in [0, 1]"


def _time(v):
    return None if _num(v) and v >= 0 else "must be a number of seconds >= 0"


def _wire_r(v):
    if _num(v) and 0 <= v <= 1:
        return None
    return ("must be a number in [0, 1] (one wire segment's resistance as a fraction of the "
            "cell's lowest resistance 1/g_max)")


def _model(v):
    return None if v in MODELS else f"must be one of {', '.join(MODELS)}"


def _seed(v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        return "must be an integer >= 0"
    return None


def _instances(v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        return "must be an integer >= 1"
    return None


@dataclass(frozen=True)
class Device:
    """A validated ``crossbar.device`` section (module docstring). ``null`` (None): the named
    model's value, else the ideal one."""

    g_min: float | None = setting(None, "lowest conductance, fraction of g_max (on/off ratio "
                                  "1/g_min); null: the model's, else 0", _g_min)
    programming_noise: float | None = setting(
        None, "sigma of a programmed cell, fraction of g_max, state-independent; null: the "
        "model's, else 0", _nonneg)
    programming_noise_rel: float | None = setting(
        None, "sigma of a programmed cell proportional to its target conductance (fraction of "
        "it); null: the model's, else 0", _nonneg)
    read_noise: float | None = setting(None, "sigma of a cell per read (per array cycle), "
                                       "fraction of g_max; null: 0", _nonneg)
    drift_nu: float | None = setting(None, "mean drift exponent nu; null: the model's, else 0",
                                     _nonneg)
    drift_nu_std: float | None = setting(None, "sd of nu across cells; null: the model's, "
                                         "else 0", _nonneg)
    t0: float | None = setting(None, "time of the first read after programming, s; null: the "
                               "model's, else 20", _positive)
    t_inference: float = setting(0.0, "seconds after t0 at which the network runs", _time)
    stuck_off: float = setting(0.0, "fraction of cells stuck at g_min", _fraction)
    stuck_on: float = setting(0.0, "fraction of cells stuck at g_max", _fraction)
    wire_r: float = setting(0.0, "resistance of one wire segment between adjacent cells "
                            "(word and bit lines), fraction of the cell's lowest resistance "
                            "1/g_max; 0: ideal wires (pimsim.crossbar.irdrop)", _wire_r)
    model: str = setting("none", "named statistical model: none | pcm | rram "
                         "(hwconfigs/devices/<model>.yaml)", _model)
    seed: int = setting(0, "the chip instance: same seed, same cells", _seed)
    instances: int = setting(1, "chips evaluated (seeds seed .. seed+instances-1)", _instances)

    def __post_init__(self):
        problem = self.problem_at()
        if problem:
            key, value, what = problem
            raise ValueError(f"crossbar.device.{key}: {value!r}: {what}")

    def problem_at(self):
        """``(key, value, text)`` of the first bad value, or None."""
        for f in fields(self):
            v = getattr(self, f.name)
            problem = f.metadata["check"](v)
            if problem:
                return f.name, v, problem
        if self.stuck_off + self.stuck_on > 1:
            return ("stuck_on", self.stuck_on,
                    f"stuck_off + stuck_on must be <= 1 (stuck_off is {self.stuck_off})")
        return None

    @classmethod
    def from_dict(cls, d) -> "Device":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"crossbar.device: {d!r}: must be a mapping of "
                             f"{', '.join(DEVICE_KEYS)}")
        for k in d:
            if k not in DEVICE_KEYS:
                raise ValueError(f"crossbar.device.{k}: {d[k]!r}: unknown key; allowed: "
                                 f"{', '.join(DEVICE_KEYS)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def physics(self, cell_bits: int) -> "DevicePhysics":
        return DevicePhysics(self, cell_bits)

    @property
    def ideal(self) -> bool:
        """True when every cell stores its level exactly, every read is perfect and the wires
        have no resistance."""
        return DevicePhysics(self, 1).ideal

    @property
    def cells_ideal(self) -> bool:
        """True when nothing about the cells is random (wires aside): every chip is the same."""
        return DevicePhysics(self, 1).cells_ideal


DEVICE_KEYS = tuple(f.name for f in fields(Device))
DEVICE_DEFAULTS = {f.name: f.default for f in fields(Device)}


def check_device(v):
    """The ``crossbar.device`` check for ``pimsim.schema``: an error text naming the key."""
    try:
        Device.from_dict(v)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def locate_device_problem(v):
    """``(sub-key, value, text)`` of the first bad entry of a ``crossbar.device`` mapping (for
    a one-line config error naming ``crossbar.device.<key>``), or None."""
    if not isinstance(v, dict):
        return None, v, f"must be a mapping of {', '.join(DEVICE_KEYS)}"
    for k in v:
        if k not in DEVICE_KEYS:
            return k, v[k], f"unknown key; allowed in crossbar.device: {', '.join(DEVICE_KEYS)}"
    d = Device.__new__(Device)
    for k in DEVICE_KEYS:
        object.__setattr__(d, k, v.get(k, DEVICE_DEFAULTS[k]))
    return d.problem_at()


def load_model(name: str) -> dict:
    """The coefficients of named model ``name`` (``hwconfigs/devices/<name>.yaml``)."""
    import yaml
    path = DEVICES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"crossbar.device.model: {name}: model file {path} not found")
    return yaml.safe_load(path.read_text())


def _poly(coef, g):
    out = np.zeros_like(g, dtype=np.float64)
    for c in reversed(list(coef)):
        out = out * g + c
    return out


class DevicePhysics:
    """The resolved model of a ``Device`` for cells of ``cell_bits`` bits: explicit keys, then
    the named model's coefficients, then the ideal values (module docstring)."""

    def __init__(self, device: Device, cell_bits: int):
        self.device = d = device
        self.levels = (1 << cell_bits) - 1
        m = load_model(d.model) if d.model != "none" else {}
        self.coef = m
        self.g_min = float(d.g_min if d.g_min is not None else m.get("g_min", 0.0))
        self.delta = (1.0 - self.g_min) / self.levels            # one level step, of g_max
        self.t0 = float(d.t0 if d.t0 is not None else m.get("t0", 20.0))
        self.t = self.t0 + float(d.t_inference)
        # programming noise: explicit keys, else the model's polynomial sigma(g)
        if d.programming_noise is not None or d.programming_noise_rel is not None:
            self.prog_poly = [float(d.programming_noise or 0.0),
                              float(d.programming_noise_rel or 0.0)]
        else:
            self.prog_poly = [float(c) for c in m.get("programming_sigma", [0.0])]
        # drift exponent: constants if given, else the model's functions of the level
        self.nu_model = m.get("drift") if (d.drift_nu is None and d.drift_nu_std is None) \
            else None
        self.nu_mean = float(d.drift_nu or 0.0)
        self.nu_std = float(d.drift_nu_std or 0.0)
        self.read_sigma = float(d.read_noise or 0.0)
        # the PCM model's accumulated 1/f noise (a per-cell deviation at time t)
        self.flicker = m.get("read_noise_1f") if d.read_noise is None else None
        self.stuck_off, self.stuck_on = float(d.stuck_off), float(d.stuck_on)
        self.wire_r = float(d.wire_r)

    @property
    def drifts(self) -> bool:
        if self.t <= self.t0:
            return False
        return self.nu_model is not None or self.nu_mean > 0 or self.nu_std > 0

    @property
    def cells_ideal(self) -> bool:
        """Every cell holds its target conductance and every read is exact (wires aside)."""
        return (not any(self.prog_poly) and not self.drifts and self.read_sigma == 0
                and self.flicker is None and self.stuck_off == 0 and self.stuck_on == 0)

    @property
    def ideal(self) -> bool:
        """Ideal cells and ideal wires: the integer array model computes the same."""
        return self.cells_ideal and self.wire_r == 0

    # -- level-dependent quantities ------------------------------------------------------------
    def target(self, level) -> np.ndarray:
        """Target conductance (fraction of g_max) of integer levels."""
        return self.g_min + self.delta * np.asarray(level, dtype=np.float64)

    def prog_sigma(self, g) -> np.ndarray:
        return np.maximum(_poly(self.prog_poly, np.asarray(g, np.float64)), 0.0)

    def nu_params(self, g):
        """(mean, sd) of the drift exponent of cells with target conductance ``g``."""
        g = np.asarray(g, np.float64)
        if self.nu_model is None:
            return np.full(g.shape, self.nu_mean), np.full(g.shape, self.nu_std)
        dm = self.nu_model
        lg = np.log(np.maximum(g, dm.get("g_floor", 1e-7)))
        mean = np.clip(_poly(dm["nu_mean_log"], lg), *dm["nu_mean_clip"])
        sd = np.clip(_poly(dm["nu_std_log"], lg), *dm["nu_std_clip"])
        return mean, sd

    def flicker_sigma(self, g) -> np.ndarray:
        """Relative sigma of the accumulated 1/f noise at time t (PCM), per cell."""
        f = self.flicker
        q = np.minimum(f["q"] / np.maximum(np.abs(g) ** f["exponent"], f["g_floor"]), f["q_max"])
        return q * math.sqrt(math.log((self.t + f["t_read"]) / (2 * f["t_read"])))

    # -- cells ---------------------------------------------------------------------------------
    def draw(self, rng: np.random.Generator, shape) -> dict:
        """The random draws of ``shape`` cells, always in the same order and sizes (so a cell's
        draws depend only on its position in the layout): z_prog, z_nu, u_stuck, z_flicker."""
        return {"z_prog": rng.standard_normal(shape), "z_nu": rng.standard_normal(shape),
                "u_stuck": rng.random(shape), "z_flicker": rng.standard_normal(shape)}

    def program(self, level, draws: dict):
        """(g_P programmed conductance, nu drift exponent, stuck mask) of cells at ``level``."""
        gt = self.target(level)
        gp = np.maximum(gt + self.prog_sigma(gt) * draws["z_prog"], 0.0) if any(self.prog_poly) \
            else gt.copy()
        mean, sd = self.nu_params(gt)
        nu = mean + sd * draws["z_nu"]
        nu = np.abs(nu) if self.nu_model is not None else np.maximum(nu, 0.0)   # aihwkit: |nu|
        u = draws["u_stuck"]
        off = u < self.stuck_off
        on = (u >= self.stuck_off) & (u < self.stuck_off + self.stuck_on)
        gp[off] = self.g_min
        gp[on] = 1.0
        stuck = off | on
        nu[stuck] = 0.0
        return gp, nu, stuck

    def at_time(self, gp, nu, draws: dict, stuck=None) -> np.ndarray:
        """Conductance at ``t = t0 + t_inference``: drift, then (PCM) the accumulated 1/f noise."""
        g = gp * (self.t / self.t0) ** (-nu) if self.drifts else gp.copy()
        if self.flicker is not None:
            dev = np.abs(g) * self.flicker_sigma(gp) * draws["z_flicker"]
            if stuck is not None:
                dev[stuck] = 0.0
            g = np.maximum(g + dev, 0.0)
        return g

    def level_units(self, level, g) -> np.ndarray:
        """Conductance ``g`` as a column-sum contribution in level steps: ``level + (g - g_T) /
        delta`` (exactly ``level`` for an ideal cell; the chip's reference subtracts the
        nominal ``g_min`` of every driven word line, see ``pimsim.crossbar.noisy``)."""
        lv = np.asarray(level, dtype=np.float64)
        return lv + (g - self.target(level)) / self.delta
