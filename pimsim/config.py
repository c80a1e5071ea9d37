"""YAML configuration -> validated, typed config. Every error names file, key, value and what is
allowed, and is raised before any work starts.

Schema (defaults in brackets; see README for the full table):

    model.name          zoo model name                                   [resnet20]
    model.checkpoint    checkpoint file, or null: fine-tuned else published [null]
    quant.weight_bits   2..16                                            [4]
    quant.act_bits      2..16                                            [8]
    quant.tile          channelwise | layerwise | [r, c] | [r, null]     [channelwise]
    quant.splits        m of Method 2 (with tile [r, null]), or null     [null]
    quant.calibration   a method of pimsim.methods: max | mse | ptqsl    [ptqsl]
    quant.metric        euclidean | cosine (PTQ-SL objective)            [euclidean]
    quant.search.*      alpha [0.5], beta [1.2], candidates [100], rounds [3],
                        mode gram|direct [gram], act_search golden|grid [golden]
    quant.calib_images  calibration images from data_batch_1             [128]
    quant.seed          seed of the calibration draw                     [0]
    quant.float_layers  auto (first and last GEMM) | list of layer names [auto]
    data.dir            data folder holding cifar-10-batches-py/, or null [null]
    eval.batch_size     images per evaluation batch                      [500]
    eval.backend        kernel (tiled-integer Numba kernel) | fake       [kernel]
    eval.limit          evaluate the first N test images, or null = all  [null]
    eval.threads        threads for torch and Numba, 0 = all cores       [0]
    reorder.method      none | random (one seeded joint order) | evolution [none]
    reorder.population  orders per generation of the evolutionary search [20]
    reorder.generations generations per segment                         [30]
    reorder.swaps       random channel transpositions per mutation      [2]
    reorder.seed        seed of the random orders and of the search     [0]
    crossbar.*          optional array description (pimsim.crossbar.Crossbar); absent = null:
      rows [128] word lines, cols [128] bit lines, cell_bits [2] bits/cell,
      signed [differential] | offset, dac_bits [1] input bits/cycle, adc_bits [0] (0 = ideal),
      adc_range [full] | calibrated | column-sum value, scale_bits [16] bits/scale, name [custom]
    quant.tile: crossbar  the tile that fills one array (needs crossbar:)
    eval.backend: crossbar  array-level simulation (needs crossbar:)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from .methods import get_method, method_names
from .ptqsl import check_params as check_search_params
from .quant import Granularity, MAX_BITS, MIN_BITS

BACKENDS = ("kernel", "fake", "crossbar")
REORDER_METHODS = ("none", "random", "evolution")


class ConfigError(ValueError):
    """A configuration problem: ``file: key: value: what is allowed``."""


def fmt_value(v) -> str:
    """A value as it reads in YAML, for error messages (``file: key: value: allowed``)."""
    return yaml.safe_dump(v, default_flow_style=True, width=200).strip().removesuffix("...").strip()


@dataclass(frozen=True)
class Key:
    """One configuration key: its default, a check returning an error text (or None) and a doc."""

    default: object
    check: object
    doc: str


def _int_in(lo, hi=None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer{'' if hi is None else f' in {lo}..{hi}'}"
        if v < lo or (hi is not None and v > hi):
            return f"must be in {lo}..{hi}" if hi is not None else f"must be >= {lo}"
        return None
    return check


def _optional(check):
    return lambda v: None if v is None else check(v)


def _one_of(options):
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _method(v):
    """A registered calibration method (read when checked: methods registered later count)."""
    names = method_names()
    return None if v in names else f"must be one of {', '.join(names)}"


def _str(v):
    return None if isinstance(v, str) and v else "must be a non-empty string"


def _tile(v):
    msg = ("must be channelwise, layerwise, crossbar, [r, c] or [r, null] (with quant.splits), "
           "r and c >= 1")
    if v in ("channelwise", "layerwise", "crossbar"):
        return None
    if not isinstance(v, list) or len(v) != 2:
        return msg
    r, c = v
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        return msg
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        return msg
    return None


def _search(v):
    if not isinstance(v, dict):
        return "must be a mapping of alpha, beta, candidates, rounds, mode, act_search"
    if "metric" in v:
        return "the metric is quant.metric, not quant.search.metric"
    if "symmetric" in v:
        return ("symmetric is not a search option: calibration uses the symmetric integer range "
                "exactly when the config has a crossbar: section")
    try:
        check_search_params(v)
    except ValueError as e:
        return str(e)
    return None


def _float_layers(v):
    if v == "auto":
        return None
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return None
    return "must be auto or a list of layer names"


def _crossbar_check(name):
    from .crossbar import check_field
    return lambda v: check_field(name, v)


_CROSSBAR_KEYS = (                                # (key, default, unit and meaning)
    ("rows", 128, "word lines per array = inputs (count)"),
    ("cols", 128, "bit lines per array = output columns (count)"),
    ("cell_bits", 2, "bits stored per cell (1..8)"),
    ("signed", "differential", "signed weights: differential (+/- column sets) | offset "
                               "(w + 2^(b-1)-1 with reference columns)"),
    ("dac_bits", 1, "input bits applied per cycle (1..8), inputs are bit-serial"),
    ("adc_bits", 0, "ADC resolution in bits (0 = ideal, 1..16)"),
    ("adc_range", "full", "ADC range: full (largest possible column sum) | calibrated (per "
                          "array, largest column sum on the calibration batch) | a number "
                          "(column-sum units)"),
    ("scale_bits", 16, "bits to store one tile scale (1..64)"),
    ("name", "custom", "preset name"),
)

SCHEMA: dict[str, dict[str, Key]] = {
    "model": {
        "name": Key("resnet20", _str, "model of the zoo (pimsim.models.MODELS)"),
        "checkpoint": Key(None, _optional(_str),
                          "checkpoint file (.th / .pt read as tensors only, or .safetensors); "
                          "relative paths are looked up beside the YAML file, in the working "
                          "directory, then in <data dir>/models/; null = from <data dir>/models/ "
                          "the fine-tuned default if present, else the published one"),
    },
    "quant": {
        "weight_bits": Key(4, _int_in(MIN_BITS, MAX_BITS), "weight bits b_w"),
        "act_bits": Key(8, _int_in(MIN_BITS, MAX_BITS), "activation bits b_a"),
        "tile": Key("channelwise", _tile, "sub-matrix shape: channelwise, layerwise, [r, c] "
                    "(Method 1) or [r, null] with splits (Method 2)"),
        "splits": Key(None, _optional(_int_in(1)), "m of Method 2: c = ceil(K / m)"),
        "calibration": Key("ptqsl", _method, "scale calibration method (pimsim.methods)"),
        "metric": Key("euclidean", _one_of(("euclidean", "cosine")),
                      "PTQ-SL objective (Eq. 6): euclidean ||Y-Ŷ|| or cosine 1-cos(Y,Ŷ)"),
        "search": Key({"alpha": 0.5, "beta": 1.2, "candidates": 100, "rounds": 3,
                       "mode": "gram", "act_search": "golden"}, _search,
                      "PTQ-SL / mse search: candidates linear in [alpha, beta] x max init, "
                      "rounds of Algorithm 1, mode gram|direct, act_search golden|grid"),
        "calib_images": Key(128, _int_in(1, 10000), "calibration images from data_batch_1"),
        "seed": Key(0, _int_in(0), "seed of the calibration image draw"),
        "float_layers": Key("auto", _float_layers,
                            "layers kept in float: auto (first and last) or a list of names"),
    },
    "data": {
        "dir": Key(None, _optional(_str), "data folder with cifar-10-batches-py/ (and models/)"),
    },
    "eval": {
        "batch_size": Key(500, _int_in(1), "test images per batch"),
        "backend": Key("kernel", _one_of(BACKENDS),
                       "kernel: tiled-integer Numba kernel (exact); fake: dequantized torch conv; "
                       "crossbar: array-level simulation (needs a crossbar: section)"),
        "limit": Key(None, _optional(_int_in(1)), "evaluate only the first N test images"),
        "threads": Key(0, _int_in(0), "threads for torch and Numba (0 = all cores)"),
    },
    "reorder": {
        "method": Key("none", _one_of(REORDER_METHODS),
                      "channel reordering: none, random (one seeded random joint order) or "
                      "evolution (evolutionary search per segment)"),
        "population": Key(20, _int_in(2, 10000), "orders per generation of the search"),
        "generations": Key(30, _int_in(0, 100000), "generations per segment"),
        "swaps": Key(2, _int_in(1, 10000), "random channel transpositions per mutation"),
        "seed": Key(0, _int_in(0), "seed of the random orders and of the search"),
    },
    # optional: the section is null unless the config (or --set crossbar.*) gives it
    "crossbar": {f: Key(d, _crossbar_check(f), doc) for f, d, doc in _CROSSBAR_KEYS},
}


OPTIONAL_SECTIONS = ("crossbar",)  # null unless given (`crossbar: {}` = all its defaults)


def _section_defaults(sec: str) -> dict:
    return {k: copy.deepcopy(key.default) for k, key in SCHEMA[sec].items()}


def defaults() -> dict:
    """The default configuration as a nested dict (optional sections are null)."""
    return {sec: None if sec in OPTIONAL_SECTIONS else _section_defaults(sec) for sec in SCHEMA}


def parse_override(text: str, source: str = "--set"):
    """``key.path=value`` with the value read as YAML -> (path, value)."""
    if "=" not in text:
        raise ConfigError(f"{source}: {text!r}: expected key=value, e.g. quant.tile='[16, 36]'")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: {key}: {raw!r}: not valid YAML ({e.problem})") from None
    return key.strip(), value


@dataclass
class Config:
    """A validated configuration: ``data`` is the resolved nested dict, ``source`` its file,
    ``notes`` remarks for the user that are not errors (e.g. an empty config file)."""

    data: dict
    source: str = "<defaults>"
    notes: tuple[str, ...] = ()

    def __getitem__(self, dotted: str):
        sec, _, key = dotted.partition(".")
        return self.data[sec][key]

    @property
    def crossbar(self):
        """The ``pimsim.crossbar.Crossbar`` of the ``crossbar:`` section, or None."""
        if self.data.get("crossbar") is None:
            return None
        from .crossbar import Crossbar
        return Crossbar(**self.data["crossbar"])

    @property
    def granularity(self) -> Granularity:
        tile, splits = self["quant.tile"], self["quant.splits"]
        if tile == "crossbar":
            return Granularity.tile(*self.crossbar.tile_for(self["quant.weight_bits"]))
        if tile == "channelwise":
            return Granularity.channelwise()
        if tile == "layerwise":
            return Granularity.layerwise()
        r, c = tile
        return Granularity.split(r, splits) if c is None else Granularity.tile(r, c)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.data)


def _err(source, key, value, what) -> ConfigError:
    return ConfigError(f"{source}: {key}: {fmt_value(value)}: {what}")


def validate(raw: dict, source: str = "<config>", overrides=()) -> Config:
    """Merge ``raw`` and ``overrides`` ([(dotted key, value)]) onto the defaults and check all."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections "
                          f"({', '.join(SCHEMA)}), got {type(raw).__name__}")
    data = defaults()
    for sec in OPTIONAL_SECTIONS:
        data[sec] = _section_defaults(sec)
    items = []
    given = set()                                 # sections the config or --set gives
    for sec, body in raw.items():
        if sec not in SCHEMA:
            raise _err(source, sec, body, f"unknown section; allowed: {', '.join(SCHEMA)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise _err(source, sec, body, "must be a mapping of keys")
        given.add(sec)
        items += [(f"{sec}.{k}", v, source) for k, v in body.items()]
    items += [(k, v, "--set") for k, v in overrides]
    origin = {}                                   # dotted key -> where its value came from
    for dotted, value, where in items:
        sec, _, rest = dotted.partition(".")
        key, _, sub = rest.partition(".")
        if sec not in SCHEMA:
            raise _err(where, dotted, value, f"unknown section; allowed: {', '.join(SCHEMA)}")
        if key not in SCHEMA[sec]:
            raise _err(where, dotted, value,
                       f"unknown key; allowed in {sec}: {', '.join(SCHEMA[sec])}")
        spec = SCHEMA[sec][key]
        shown = value                                  # the value as the user wrote it
        if sub or isinstance(spec.default, dict):      # a mapping key: merge onto what is set
            if not isinstance(spec.default, dict):
                raise _err(where, dotted, value, f"{sec}.{key} has no sub-keys")
            if sub:
                value = {sub: value}
            if not isinstance(value, dict):
                raise _err(where, dotted, value, "must be a mapping")
            value = {**data[sec][key], **value}
        problem = spec.check(value)
        if problem:
            raise _err(where, dotted, shown, problem)
        data[sec][key] = value
        origin[dotted] = where
        given.add(sec)
    # cross-field rules
    from .models import MODELS
    if data["model"]["name"] not in MODELS:
        raise _err(origin.get("model.name", source), "model.name", data["model"]["name"],
                   f"unknown model; allowed: {', '.join(MODELS)}")
    tile, splits = data["quant"]["tile"], data["quant"]["splits"]
    if isinstance(tile, list) and tile[1] is None and splits is None:
        raise _err(origin.get("quant.tile", source), "quant.tile", tile,
                   "[r, null] needs quant.splits (Method 2: c = ceil(K/m))")
    if splits is not None and not (isinstance(tile, list) and tile[1] is None):
        raise _err(origin.get("quant.splits", source), "quant.splits", splits,
                   "only with quant.tile: [r, null]")
    _check_method_params(data, origin, source)
    _check_crossbar(data, given, origin, source)
    return Config(data, source)


def _check_method_params(data: dict, origin: dict, source: str) -> None:
    """The chosen method's own check of its options ``{**quant.search, "metric": quant.metric}``
    (``quant.search`` itself is always checked as the PTQ-SL search options, which the reorder
    search scores orders with whatever the method)."""
    q = data["quant"]
    method = get_method(q["calibration"])
    if method.check_params is None or method.check_params is check_search_params:
        return                                    # nothing to check / checked already
    try:
        method.check_params({**q["search"], "metric": q["metric"]})
    except ValueError as e:
        raise _err(origin.get("quant.calibration", source), "quant.calibration", method.name,
                   f"its options (quant.search, quant.metric): {e}") from None


def _check_crossbar(data: dict, given: set, origin: dict, source: str) -> None:
    """The crossbar section is null unless given; geometry checks against the quant section."""
    if "crossbar" not in given:
        data["crossbar"] = None
        for key, value in (("quant.tile", "crossbar"), ("eval.backend", "crossbar")):
            sec, _, k = key.partition(".")
            if data[sec][k] == value:
                raise _err(origin.get(key, source), key, value, "needs a crossbar: section")
        return
    from .crossbar import Crossbar
    xb = Crossbar(**data["crossbar"])
    wb = data["quant"]["weight_bits"]
    problem = xb.weight_problem(wb)
    if problem:
        key = "crossbar.cols"
        raise _err(origin.get(key, source), key, xb.cols, problem)
    tile = data["quant"]["tile"]
    if isinstance(tile, list) and tile[1] is not None:
        problem = xb.tile_problem(tile[0], tile[1], wb)
        if problem:
            raise _err(origin.get("quant.tile", source), "quant.tile", tile, problem)


def resolve_checkpoint(cfg: Config, data_dir: Path | None) -> Path:
    """The checkpoint file of ``cfg``, which must exist.

    ``model.checkpoint: null``: the first of ``pimsim.models.default_checkpoint_names`` found
    in ``<data dir>/models/`` (the fine-tuned checkpoint beside the JPEG copy of CIFAR-10, else
    the published one that ``pimsim fetch`` downloads). A relative path is looked up beside the
    YAML file, in the working directory, then in ``<data dir>/models/``.
    """
    from .data import CHECKPOINT_URLS
    from .models import default_checkpoint_names
    name, ckpt = cfg["model.name"], cfg["model.checkpoint"]
    if ckpt is None:
        names = default_checkpoint_names(name)
        if not names:
            raise _err(cfg.source, "model.checkpoint", None,
                       f"model {name} has no default checkpoint; give a file")
        if data_dir is None:
            raise _err(cfg.source, "model.checkpoint", None,
                       f"the default checkpoint of {name} is looked for in <data dir>/models/, "
                       f"and no data folder is known; give a file")
        models_dir = Path(data_dir) / "models"
        for n in names:
            if (models_dir / n).is_file():
                return models_dir / n
        fetchable = [n for n in names if n in CHECKPOINT_URLS]
        hint = (f"pimsim fetch --what models --dest {data_dir} downloads {fetchable[0]}, or "
                if fetchable else "")
        raise _err(cfg.source, "model.checkpoint", None,
                   f"no default checkpoint of {name} in {models_dir} (looked for "
                   f"{' or '.join(names)}); {hint}give model.checkpoint a file")
    p = Path(ckpt).expanduser()
    looked = [p] if p.is_absolute() else []
    if not p.is_absolute():
        if cfg.source not in ("<config>", "<defaults>"):
            looked.append(Path(cfg.source).resolve().parent / p)
        looked.append(Path.cwd() / p)
        if data_dir is not None:
            looked.append(Path(data_dir) / "models" / p)
    for cand in looked:
        if cand.is_file():
            return cand
    hint = ""
    if p.name in CHECKPOINT_URLS:
        dest = data_dir if data_dir is not None else "DIR"
        hint = f"; pimsim fetch --what models --dest {dest} downloads {p.name}"
    raise _err(cfg.source, "model.checkpoint", ckpt,
               "file not found; looked in " + ", ".join(str(c) for c in looked) + hint)


def read_yaml(path, what: str = "config file"):
    """The parsed YAML of ``path``; ConfigError naming the file if it is missing or not YAML."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{path} is a folder; give the {what} (a YAML file) inside it")
    if not p.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e})") from None


def load(path, overrides=()) -> Config:
    """Read and validate a YAML config file; ``overrides`` are ``key=value`` strings. A file
    with nothing in it (or only comments) is accepted, every key taking its default, with a
    note in ``Config.notes`` saying so."""
    raw = read_yaml(path)
    cfg = validate(raw, str(path), [parse_override(o) for o in overrides])
    if raw is None:
        cfg.notes = (*cfg.notes, f"{path}: empty config: every key takes its default")
    return cfg


# --------------------------------------------------------------------------- cost: section
# Per-operation constants of the cost model (pimsim.cost): energy in pJ, time in ns; the keys,
# defaults and their published sources are pimsim.cost.COST_KEYS.
def _positive_number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
        return "must be a positive number"
    return None


def _cost_schema() -> dict:
    from .cost import COST_KEYS
    checks = {"digital_lanes": _int_in(1), "input_passes": _int_in(1, 2),
              "adc_ref_bits": _int_in(0, 16),
              "overlap_digital": lambda v: None if isinstance(v, bool) else "must be true or false"}
    return {k: Key(d, checks.get(k, _positive_number), doc) for k, d, doc in COST_KEYS}


SCHEMA["cost"] = _cost_schema()
