"""YAML configuration -> validated, typed config. Every error names file, key, value and what is
allowed, and is raised before any work starts.

The schema is one typed, documented definition per section (``SECTIONS``): a frozen dataclass
whose fields carry default, check and doc (``pimsim.schema.setting``). ``model``, ``quant``,
``data`` and ``eval`` are defined here; ``reorder`` is ``pimsim.reorder.ReorderParams``,
``crossbar`` (optional: null unless given) is ``pimsim.crossbar.Crossbar`` and ``cost`` is
``pimsim.cost.CostParams``; the defaults of ``quant.search`` and ``quant.metric`` are
``pimsim.ptqsl.SearchParams``. ``SCHEMA`` is read off those classes; README's
"Configuration (YAML)" tables are checked against it (tests/test_schema.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from .cost import CostParams
from .crossbar import Crossbar
from .methods import get_method, method_names
from .ptqsl import DEFAULTS as SEARCH_DEFAULTS
from .ptqsl import check_params as check_search_params
from .quant import ACT_SIGNED, Granularity, MAX_BITS, MIN_BITS
from .reorder.search import ReorderParams
from .schema import (Key, boolean, int_in, keys_of, non_empty_str, one_of, optional,
                     setting)

BACKENDS = ("kernel", "fake", "crossbar")
DATASETS = ("cifar10", "cifar100", "imagefolder", "npz")


class ConfigError(ValueError):
    """A configuration problem: ``file: key: value: what is allowed``."""


def fmt_value(v) -> str:
    """A value as it reads in YAML, for error messages (``file: key: value: allowed``)."""
    return yaml.safe_dump(v, default_flow_style=True, width=200).strip().removesuffix("...").strip()


def _method(v):
    """A registered calibration method (read when checked: methods registered later count)."""
    names = method_names()
    return None if v in names else f"must be one of {', '.join(names)}"


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
        return f"must be a mapping of {', '.join(_SEARCH_YAML)}"
    if "metric" in v:
        return "the metric is quant.metric, not quant.search.metric"
    if "symmetric" in v:
        return ("symmetric is not a search option: calibration uses the symmetric integer range "
                "exactly when the config has a crossbar: section")
    if "act_unsigned" in v:
        return "act_unsigned is not a search option: use quant.act_signed (signed, unsigned, auto)"
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


# quant.search: the PTQ-SL search options of YAML (quant.metric and the symmetric range are set
# elsewhere); their defaults are pimsim.ptqsl.SearchParams
_SEARCH_YAML = tuple(k for k in SEARCH_DEFAULTS if k not in ("metric", "symmetric", "act_unsigned"))


def _factory(v):
    """``FILE.py:FUNCTION`` or ``package.module:FUNCTION`` (pimsim.models.parse_factory)."""
    from .models import ModelFactoryError, parse_factory
    if not isinstance(v, str) or not v:
        return "must be 'FILE.py:FUNCTION' or 'package.module:FUNCTION'"
    try:
        parse_factory(v)
    except ModelFactoryError as e:
        return str(e)
    return None


def _kwargs(v):
    if not isinstance(v, dict):
        return "must be a mapping of keyword arguments of the model.factory function"
    bad = [k for k in v if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        return f"keys must be Python argument names, got {fmt_value(bad[0])}"
    return None


@dataclass(frozen=True)
class ModelSection:
    """``model:`` -- which network, which weights."""

    name: str = setting("resnet20", "model of the zoo (pimsim.models.MODELS); not with "
                        "model.factory", non_empty_str)
    factory: str | None = setting(
        None, "your own model instead of a zoo one: 'FILE.py:FUNCTION' (a path relative to the "
        "YAML file, or absolute) or 'package.module:FUNCTION', called with model.kwargs, "
        "returning an nn.Module", optional(_factory))
    kwargs: dict = setting(doc="keyword arguments of the model.factory function (only with "
                           "model.factory)", check=_kwargs, factory=dict)
    checkpoint: str | None = setting(
        None, "checkpoint file (.th / .pt read as tensors only, or .safetensors; a state dict, "
        "{state_dict: ...}, keys with or without module.); relative paths are looked up beside "
        "the YAML file, in the working directory, then in <data dir>/models/; null = for a zoo "
        "model from <data dir>/models/ the fine-tuned default if present, else the published "
        "one; for a model.factory model its own initial weights", optional(non_empty_str))
    strict: bool = setting(False, "true: refuse a model with matrix products that would run "
                           "digitally instead of on arrays (the run's digital_layers)", boolean)


@dataclass(frozen=True)
class QuantSection:
    """``quant:`` -- bits, granularity and calibration."""

    weight_bits: int = setting(4, "weight bits b_w", int_in(MIN_BITS, MAX_BITS))
    act_bits: int = setting(8, "activation bits b_a", int_in(MIN_BITS, MAX_BITS))
    act_signed: str = setting("signed", "activation range per layer: signed [-(2^(b-1)-1) or "
                              "-2^(b-1), 2^(b-1)-1]; unsigned [0, 2^b - 1] (every quantized "
                              "layer's calibration input must be >= 0); auto: unsigned for a "
                              "layer whose calibration input is >= 0 (after ReLU), else signed",
                              one_of(ACT_SIGNED))
    tile: object = setting("channelwise", "sub-matrix shape: channelwise, layerwise, [r, c] "
                           "(Method 1) or [r, null] with splits (Method 2)", _tile)
    splits: int | None = setting(None, "m of Method 2: c = ceil(K / m)", optional(int_in(1)))
    calibration: str = setting("ptqsl", "scale calibration method (pimsim.methods)", _method)
    metric: str = setting(SEARCH_DEFAULTS["metric"], "PTQ-SL objective (Eq. 6): euclidean "
                          "||Y-Ŷ|| or cosine 1-cos(Y,Ŷ)", one_of(("euclidean", "cosine")))
    search: dict = setting(doc="PTQ-SL / mse search: candidates linear in [alpha, beta] x max "
                           "init, rounds of Algorithm 1, mode gram|direct, act_search "
                           "golden|grid, alternate, start act|max|best, extend", check=_search,
                           factory=lambda: {k: SEARCH_DEFAULTS[k] for k in _SEARCH_YAML})
    calib_images: int = setting(128, "calibration images drawn from the training split "
                                "(CIFAR-10: data_batch_1)", int_in(1, 10000))
    seed: int = setting(0, "seed of the calibration image draw", int_in(0))
    float_layers: object = setting("auto", "layers kept in float: auto (first and last) or a "
                                   "list of names", _float_layers)
    load: str | None = setting(None, "folder written by pimsim export (or run --out-dir) whose "
                               "calibration is reloaded instead of calibrating; null = "
                               "calibrate", optional(non_empty_str))


def _numbers(positive: bool):
    """A non-empty list of finite numbers (all > 0 with ``positive``)."""
    def check(v):
        what = "positive numbers" if positive else "numbers"
        if not isinstance(v, list) or not v or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or x != x
                or x in (float("inf"), float("-inf")) for x in v):
            return f"must be a list of {what}, one per image channel (e.g. [0.5, 0.5, 0.5])"
        if positive and any(x <= 0 for x in v):
            return "must be a list of positive numbers (a std <= 0 cannot normalize)"
        return None
    return check


@dataclass(frozen=True)
class DataSection:
    """``data:`` -- which dataset, where it is (and where the checkpoints are)."""

    dataset: str = setting("cifar10", "cifar10, cifar100 (python format), imagefolder "
                           "(data.root/train|val/<class>/*) or npz (data.path)",
                           one_of(DATASETS))
    dir: str | None = setting(None, "data folder with cifar-10-batches-py/ or cifar-100-python/ "
                              "(and models/)", optional(non_empty_str))
    root: str | None = setting(None, "imagefolder: folder holding train/<class>/* and "
                               "val/<class>/*", optional(non_empty_str))
    path: str | None = setting(None, "npz: .npz file with x and y (the evaluation images)",
                               optional(non_empty_str))
    calib_path: str | None = setting(None, "npz: .npz file with x for the calibration draw "
                                     "(null = draw from data.path)", optional(non_empty_str))
    image_size: int = setting(224, "imagefolder: center-crop size (pixels)", int_in(1, 4096))
    resize: int = setting(256, "imagefolder: short side after resizing, before the crop",
                          int_in(1, 8192))
    mean: list | None = setting(None, "per-channel mean subtracted from x / 255 (null = the "
                                "dataset's usual values)", optional(_numbers(False)))
    std: list | None = setting(None, "per-channel std dividing it (null = the dataset's usual "
                               "values)", optional(_numbers(True)))
    num_classes: int | None = setting(None, "npz: number of classes (null = 1 + the largest "
                                      "label)", optional(int_in(1)))


@dataclass(frozen=True)
class EvalSection:
    """``eval:`` -- how the quantized network is evaluated."""

    batch_size: int = setting(500, "test images per batch", int_in(1))
    backend: str = setting("kernel", "kernel: tiled-integer Numba kernel (exact); fake: "
                           "dequantized torch conv; crossbar: array-level simulation (needs a "
                           "crossbar: section)", one_of(BACKENDS))
    limit: int | None = setting(None, "evaluate only the first N test images",
                                optional(int_in(1)))
    threads: int = setting(0, "threads for torch and Numba (0 = all cores)", int_in(0))


# section name -> its one definition, in the order of the YAML file (and of error messages)
SECTIONS = {
    "model": ModelSection,
    "quant": QuantSection,
    "data": DataSection,
    "eval": EvalSection,
    "reorder": ReorderParams,
    "crossbar": Crossbar,          # optional: null unless the config (or --set crossbar.*) gives it
    "cost": CostParams,            # per-operation constants of pimsim.cost (energy pJ, time ns)
}

SCHEMA: dict[str, dict[str, Key]] = {sec: keys_of(cls) for sec, cls in SECTIONS.items()}


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

    @property
    def base_dir(self) -> Path:
        """The folder relative paths of the config are taken from: the YAML file's folder (the
        working directory for a config not read from a file)."""
        if self.source in ("<config>", "<defaults>") or not Path(self.source).is_file():
            return Path.cwd()
        return Path(self.source).resolve().parent

    @property
    def model_label(self) -> str:
        """The model as results name it: ``model.name``, or the ``model.factory`` string."""
        return self.data["model"]["name"] or self.data["model"]["factory"]

    def build_model(self, checkpoint=None, num_classes: int | None = None):
        """The configured model (eval mode): zoo model ``model.name`` (with ``num_classes``
        outputs, default its own), or what
        ``model.factory`` returns called with ``model.kwargs``; with the tensors of
        ``checkpoint`` if given (a zoo model without one has random weights, a factory model
        its own initial ones). Every failure of the factory is a ConfigError naming the file
        and model.factory; a checkpoint that does not fit a factory model a CheckpointError
        naming the file and model.checkpoint."""
        from .models import CheckpointError, ModelFactoryError, build_from_factory, build_model
        m = self.data["model"]
        if m["factory"] is None:
            return build_model(m["name"], checkpoint=checkpoint, num_classes=num_classes)
        try:
            return build_from_factory(m["factory"], m["kwargs"], self.base_dir, checkpoint)
        except ModelFactoryError as e:
            raise _err(self.source, "model.factory", m["factory"], str(e)) from None
        except CheckpointError as e:
            raise CheckpointError(f"{self.source}: model.checkpoint: {e}") from None


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
        if (sec, key) == ("crossbar", "device"):      # name the sub-key: crossbar.device.<key>
            from .crossbar.device import locate_device_problem
            located = locate_device_problem(value)
            if located:
                k, v, what = located
                raise _err(where, f"crossbar.device.{k}" if k else dotted, v, what)
        problem = spec.check(value)
        if problem:
            raise _err(where, dotted, shown, problem)
        data[sec][key] = value
        origin[dotted] = where
        given.add(sec)
    # cross-field rules
    _check_model(data, origin, source)
    tile, splits = data["quant"]["tile"], data["quant"]["splits"]
    if isinstance(tile, list) and tile[1] is None and splits is None:
        raise _err(origin.get("quant.tile", source), "quant.tile", tile,
                   "[r, null] needs quant.splits (Method 2: c = ceil(K/m))")
    if splits is not None and not (isinstance(tile, list) and tile[1] is None):
        raise _err(origin.get("quant.splits", source), "quant.splits", splits,
                   "only with quant.tile: [r, null]")
    _check_method_params(data, origin, source)
    _check_data(data, origin, source)
    _check_crossbar(data, given, origin, source)
    return Config(data, source)


def _check_model(data: dict, origin: dict, source: str) -> None:
    """Exactly one of model.name (a zoo model) / model.factory; model.kwargs only with a
    factory. With a factory, model.name is null in the resolved config."""
    from .models import MODELS
    m = data["model"]
    if m["factory"] is not None:
        if "model.name" in origin:
            raise _err(origin["model.name"], "model.name", m["name"],
                       f"give model.name (a zoo model) or model.factory ({m['factory']}), "
                       "not both")
        m["name"] = None
        return
    if m["kwargs"]:
        raise _err(origin.get("model.kwargs", source), "model.kwargs", m["kwargs"],
                   "only with model.factory (the arguments of your model function)")
    if m["name"] not in MODELS:
        raise _err(origin.get("model.name", source), "model.name", m["name"],
                   f"unknown model; allowed: {', '.join(MODELS)}")


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


def _check_data(data: dict, origin: dict, source: str) -> None:
    """The data keys each dataset needs or allows, and the sizes that must agree."""
    d = data["data"]
    ds = d["dataset"]
    where = lambda key: origin.get(f"data.{key}", source)  # noqa: E731
    need = {"imagefolder": "root", "npz": "path"}
    for name, key in need.items():
        if ds == name and d[key] is None:
            raise _err(where("dataset"), "data.dataset", ds, f"needs data.{key}")
        if ds != name and d[key] is not None:
            raise _err(where(key), f"data.{key}", d[key], f"only with data.dataset: {name}")
    for key in ("calib_path", "num_classes"):
        if ds != "npz" and d[key] is not None:
            raise _err(where(key), f"data.{key}", d[key], "only with data.dataset: npz")
    if ds == "imagefolder" and d["image_size"] > d["resize"]:
        raise _err(where("image_size"), "data.image_size", d["image_size"],
                   f"must be <= data.resize ({d['resize']}): the crop is taken from the resized "
                   f"image")
    for key in ("mean", "std"):
        if ds != "npz" and d[key] is not None and len(d[key]) != 3:
            raise _err(where(key), f"data.{key}", d[key],
                       f"must have 3 values, one per RGB channel of {ds}")


def _check_crossbar(data: dict, given: set, origin: dict, source: str) -> None:
    """The crossbar section is null unless given; geometry checks against the quant section."""
    if "crossbar" not in given:
        data["crossbar"] = None
        for key, value in (("quant.tile", "crossbar"), ("eval.backend", "crossbar")):
            sec, _, k = key.partition(".")
            if data[sec][k] == value:
                raise _err(origin.get(key, source), key, value, "needs a crossbar: section")
        return
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


def resolve_checkpoint(cfg: Config, data_dir: Path | None) -> Path | None:
    """The checkpoint file of ``cfg``, which must exist; None for a ``model.factory`` model
    without ``model.checkpoint`` (it keeps its own initial weights).

    ``model.checkpoint: null``: the first of ``pimsim.models.default_checkpoint_names`` found
    in ``<data dir>/models/`` (the fine-tuned checkpoint beside the JPEG copy of CIFAR-10, else
    the published one that ``pimsim fetch`` downloads). A relative path is looked up beside the
    YAML file, in the working directory, then in ``<data dir>/models/``.
    """
    from .data import CHECKPOINT_URLS, candidate_paths
    from .models import default_checkpoint_names
    name, ckpt = cfg["model.name"], cfg["model.checkpoint"]
    if ckpt is None and cfg["model.factory"] is not None:
        return None                     # the factory model's own initial weights
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
    looked = candidate_paths(ckpt, cfg.source,
                             extra=() if data_dir is None else (Path(data_dir) / "models",))
    for cand in looked:
        if cand.is_file():
            return cand
    hint = ""
    if p.name in CHECKPOINT_URLS:
        dest = data_dir if data_dir is not None else "DIR"
        hint = f"; pimsim fetch --what models --dest {dest} downloads {p.name}"
    raise _err(cfg.source, "model.checkpoint", ckpt,
               "file not found; looked in " + ", ".join(str(c) for c in looked) + hint)


def resolve_load(cfg: Config) -> Path | None:
    """The folder of ``quant.load`` (None: calibrate). A relative path is looked up in the
    working directory, then beside the YAML file; ConfigError naming the key when neither is a
    folder."""
    d = cfg["quant.load"]
    if d is None:
        return None
    from .data import candidate_paths
    looked = candidate_paths(d, cfg.source, cwd_first=True)
    for cand in looked:
        if cand.is_dir():
            return cand
    raise _err(cfg.source, "quant.load", d, "no such folder; looked in "
               + ", ".join(str(c) for c in looked) + " (give a folder written by pimsim export)")


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
