"""Simulated inference of a real network on real data: the job behind ``pimsim run``.

``prepare`` opens the dataset (``pimsim.datasets``), resolves the checkpoint and builds the
traced network with the data's class count (failing early on bad input); ``evaluate_dataset``
runs a network over a dataset's test images in batches with a progress bar (``evaluate``: over
uint8 CIFAR arrays); ``run`` ties config -> calibration -> float and quantized evaluation ->
result dict.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .calibrate import calibrate
from .config import Config, ConfigError, resolve_checkpoint, resolve_load
from .cost import config_cost, config_mapping, config_network
from .kernels import threads as scoped_threads
from .data import to_tensor
from .datasets import Dataset, batch_count, open_dataset
from .network import Network
from .provenance import provenance


@dataclass
class Prepared:
    """Everything a run needs, resolved before any long work starts."""

    cfg: Config
    data_dir: Path | None           # the data folder (CIFAR; else data.dir / --data-dir or None)
    checkpoint: Path | None         # None: a model.factory model with its own initial weights
    net: Network
    dataset: Dataset | None = None  # None: opened from cfg and data_dir when needed


def dataset_of(prep: Prepared) -> Dataset:
    """The run's ``Dataset`` (opened once)."""
    if prep.dataset is None:
        prep.dataset = open_dataset(prep.cfg, prep.data_dir)
    return prep.dataset


def prepare(cfg: Config, data_dir=None) -> Prepared:
    """Open the dataset, resolve the checkpoint (``<data dir>/models/``: the CIFAR data folder,
    else ``data.dir`` / ``data_dir`` if given), build and trace the model with the dataset's
    class count, and check the layer names of ``quant.float_layers`` against it (ConfigError
    before any evaluation)."""
    ds = open_dataset(cfg, data_dir)
    ddir = ds.data_dir
    ckpt = resolve_checkpoint(cfg, ddir)
    net = config_network(cfg, checkpoint=ckpt, num_classes=ds.num_classes,
                         input_shape=ds.input_shape)
    check_float_layers(cfg, net)
    return Prepared(cfg, ddir, ckpt, net, ds)


def check_float_layers(cfg: Config, net: Network) -> None:
    """ConfigError naming the file, ``quant.float_layers``, the unknown names and the network's
    GEMM layers when the list names a layer the network does not have."""
    float_layers = cfg["quant.float_layers"]
    if float_layers == "auto":
        return
    names = [l.name for l in net.layers]
    unknown = [n for n in float_layers if n not in names]
    if unknown:
        raise ConfigError(f"{cfg.source}: quant.float_layers: unknown layer(s) "
                          f"{', '.join(unknown)} for {cfg.model_label}; its layers: "
                          f"{', '.join(names)}")


def evaluate(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 500,
             progress: bool = True, desc: str = "eval") -> tuple[float, np.ndarray]:
    """Top-1 accuracy (fraction) and predicted classes over uint8 CIFAR images."""
    preds = np.empty(len(images), dtype=np.int64)
    with torch.no_grad():
        for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress,
                      leave=False, unit="batch"):
            out = net(to_tensor(images[s:s + batch_size]))
            preds[s:s + batch_size] = out.argmax(1).numpy()
    return float((preds == labels).mean()), preds


def evaluate_dataset(net: torch.nn.Module, dataset: Dataset, batch_size: int = 500,
                     limit: int | None = None, progress: bool = True,
                     desc: str = "eval") -> tuple[float, np.ndarray]:
    """Top-1 accuracy (fraction) and predicted classes over the first ``limit`` (default all)
    test images of ``dataset`` (``Dataset.test_batches``)."""
    n = dataset.test_size if limit is None else min(limit, dataset.test_size)
    preds = np.empty(n, dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    s = 0
    with torch.no_grad():
        for x, y in tqdm(dataset.test_batches(batch_size, n), total=batch_count(n, batch_size),
                         desc=desc, disable=not progress, leave=False, unit="batch"):
            preds[s:s + len(y)] = net(x).argmax(1).numpy()
            labels[s:s + len(y)] = y
            s += len(y)
    return float((preds == labels).mean()), preds


def symmetric_range(cfg) -> bool:
    """True when the config has a ``crossbar:`` section: the arrays store integers in
    ``[-(2^(b-1)-1), 2^(b-1)-1]``, so calibration searches its scales for that range."""
    return cfg.crossbar is not None


def calibration_params(cfg) -> dict:
    """The calibration method's options: ``quant.search.*`` and ``quant.metric``."""
    return {**cfg["quant.search"], "metric": cfg["quant.metric"]}


def calibration_batch(prep: Prepared) -> torch.Tensor:
    """The configured calibration images (``quant.calib_images`` of the training split, CIFAR-10:
    of data_batch_1, drawn with seed ``quant.seed``) as a normalized tensor."""
    cfg = prep.cfg
    return dataset_of(prep).calibration(cfg["quant.calib_images"], cfg["quant.seed"])


def quantize_network(prep: Prepared, progress: bool = True,
                     symmetric: bool | None = None) -> dict:
    """Calibrate ``prep.net`` as the config says; returns calibration info. ``symmetric``:
    None = as the config implies (``symmetric_range``)."""
    cfg = prep.cfg
    return calibrate(prep.net, calibration_batch(prep), cfg.granularity, cfg["quant.weight_bits"],
                     cfg["quant.act_bits"], method=cfg["quant.calibration"],
                     float_layers=cfg["quant.float_layers"], progress=progress,
                     params=calibration_params(cfg),
                     symmetric=symmetric_range(cfg) if symmetric is None else symmetric,
                     act_signed=cfg["quant.act_signed"])


def reorder_network(prep: Prepared, progress: bool = True) -> dict | None:
    """Channel reordering as ``reorder.method`` says, on the float network before calibration:
    ``random`` applies one seeded random joint order to every free permutation group;
    ``evolution`` runs the evolutionary search (``pimsim.reorder.evolve``) and ``cluster`` the
    weight-clustering orders (``pimsim.reorder.cluster``); both calibrate segment by segment and
    leave the network calibrated at the final orders exactly as ``quantize_network`` would
    (their record's ``"calibrated"``), so it is not calibrated again. Returns the ``"reorder"``
    entry of the result (None for ``none``)."""
    from .reorder import Reorderer, cluster, evolve, find_groups
    cfg = prep.cfg
    method = cfg["reorder.method"]
    if method == "none":
        return None
    t0 = time.perf_counter()
    example = torch.zeros(1, *dataset_of(prep).input_shape)
    ro = Reorderer(prep.net, find_groups(prep.net, example))
    if method == "random":
        ro.set_orders(ro.random_orders(np.random.default_rng(cfg["reorder.seed"])))
        info = {"method": "random", "orders": ro.orders_json(), "seed": cfg["reorder.seed"]}
    else:
        common = dict(method=cfg["quant.calibration"], params=calibration_params(cfg),
                      float_layers=cfg["quant.float_layers"], seed=cfg["reorder.seed"],
                      progress=progress, reorderer=ro, symmetric=symmetric_range(cfg),
                      act_signed=cfg["quant.act_signed"])
        args = (prep.net, calibration_batch(prep), cfg.granularity, cfg["quant.weight_bits"],
                cfg["quant.act_bits"])
        if method == "evolution":
            info = evolve(*args, population=cfg["reorder.population"],
                          generations=cfg["reorder.generations"], swaps=cfg["reorder.swaps"],
                          **common)
        else:
            info = cluster(*args, restarts=cfg["reorder.restarts"], score=cfg["reorder.score"],
                           **common)
    info["frozen_groups"] = {g.name: g.frozen for g in ro.groups if not g.free}
    info["search_s"] = time.perf_counter() - t0
    return info


def layer_table(net: Network) -> list[dict]:
    """One entry per quantized layer: name, O, K, tile (r, c), number of scales, whether its
    integers use the symmetric (crossbar) range and whether its input is unsigned."""
    keys = ("err_max", "err", "rounds", "fallback")
    return [{"name": l.name, "O": l.O, "K": l.K, "tile": [l.quant.grid.r, l.quant.grid.c],
             "scales": int(l.quant.grid.n_tiles), "symmetric": bool(l.quant.symmetric),
             "act_unsigned": bool(l.quant.act_unsigned),
             "calib": {k: l.quant.info[k] for k in keys if k in l.quant.info}}
            for l in net.quantized_layers]


def run(cfg: Config, limit: int | None = None, data_dir=None, progress: bool = True,
        out_dir=None) -> dict:
    """Calibrate and evaluate the configured network; the result dict of ``pimsim run``.

    Everything that can be checked is checked before the first evaluation: data, checkpoint
    (tensors only, finite), ``quant.float_layers``, the calibration batch and the cost model.
    A ``limit`` above the test-set size is capped: ``"limit_capped"`` is true and ``"notes"``
    says so (``config.eval.limit`` keeps the requested value, ``"images"`` the count used).
    ``"checkpoint"`` is the file the weights came from (null: a ``model.factory`` model's own
    initial weights). ``"digital_layers"``: the matrix products that ran in torch instead of on
    arrays (``Network.digital_layers``: name, op, MACs per inference), costed as digital work.

    The run uses ``eval.threads`` threads in torch and Numba and puts the caller's thread
    counts back when it returns (``pimsim.kernels.threads``); ``"threads"`` is the count used.

    ``quant.load``: the calibration stored in that folder is loaded (``pimsim.export``) instead
    of reordering and calibrating (``"loaded"`` names the folder). ``out_dir``: the run's
    calibration is also written there (``write_export``: tiles, manifest, CSV, ONNX model).
    """
    check_backend(cfg)
    if out_dir is not None:
        check_out_dir(out_dir)
    with scoped_threads(cfg["eval.threads"]) as threads:
        return _run(cfg, limit, data_dir, progress, threads, out_dir)


def check_backend(cfg: Config) -> None:
    """ConfigError unless the configured backend has what it needs (crossbar: a crossbar:
    section)."""
    if cfg["eval.backend"] == "crossbar" and cfg.crossbar is None:
        raise ConfigError(f"{cfg.source}: eval.backend: crossbar: needs a crossbar: section")


def checked_mapping(cfg: Config, net: Network):
    """The cost model's mapping of ``net`` (``config_mapping``), built before any long work:
    a tile that does not fit the crossbar is a ConfigError naming the file."""
    try:
        return config_mapping(cfg, net)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def check_out_dir(out_dir) -> Path:
    """Check before any work that ``out_dir`` is (or can be made as) a folder; TilesError
    naming it otherwise."""
    from .export import TilesError
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TilesError(f"--out {out} is a file; give a folder for the export")
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise TilesError(f"--out {out}: {anc} is a file, not a folder")
    return out


def calibrate_or_load(prep: Prepared, progress: bool = True):
    """``(calibration info, reorder info or None, loaded or None)``: with ``quant.load`` the
    stored calibration (``pimsim.export.load_tiles``; nothing is calibrated), else
    ``reorder_network`` then ``quantize_network``."""
    cfg = prep.cfg
    d = resolve_load(cfg)
    if d is None:
        t0 = time.perf_counter()
        reorder = reorder_network(prep, progress)  # joint orders: weights permuted, no gather
        if reorder is not None and "calibrated" in reorder:     # the search's calibration
            keep = reorder["calibrated"]["float_layers"]
            return ({"calibration_s": time.perf_counter() - t0,
                     "float_layers": [l.name for l in prep.net.layers if l.name in keep]},
                    reorder, None)
        return quantize_network(prep, progress), reorder, None
    from .export import load_tiles
    t0 = time.perf_counter()
    loaded = load_tiles(prep.net, cfg, d, dataset_of(prep).input_shape,
                        checkpoint=prep.checkpoint)
    loaded["dir"] = d
    return ({"calibration_s": time.perf_counter() - t0,
             "float_layers": loaded["float_layers"]}, None, loaded)


def resolved_config(prep: Prepared, limit=None) -> dict:
    """The config as the run used it: checkpoint and data folder resolved."""
    resolved = prep.cfg.to_dict()
    resolved["model"]["checkpoint"] = None if prep.checkpoint is None else str(prep.checkpoint)
    resolved["data"]["dir"] = None if prep.data_dir is None else str(prep.data_dir)
    resolved["eval"]["limit"] = limit
    return resolved


def write_export(prep: Prepared, out_dir, mapping=None, reorder=None, loaded=None,
                 resolved=None, onnx: bool = True) -> dict:
    """Write the calibrated ``prep.net`` into ``out_dir`` (``pimsim.export.export_tiles``:
    tiles.safetensors, manifest.json, tiles.csv) and, when ``onnx`` and the onnx package is
    installed, ``model.onnx`` (``pimsim.onnx_export``). Returns ``{"dir", "files", "notes"}``."""
    from .export import CSV_FILE, MANIFEST, TENSORS, export_tiles
    from .onnx_export import export_onnx, onnx_available
    orders = (reorder or {}).get("orders") or (loaded or {}).get("orders") or {}
    out = Path(out_dir)
    resolved = copy.deepcopy(resolved if resolved is not None else resolved_config(prep))
    resolved["data"]["dir"] = prep.cfg["data.dir"]      # as given (recorded only if relative)
    export_tiles(prep.net, resolved, out, mapping=mapping, orders=orders,
                 checkpoint=prep.checkpoint)
    files, notes = [TENSORS, MANIFEST, CSV_FILE], []
    if onnx and onnx_available():
        export_onnx(prep.net, out / "model.onnx", dataset_of(prep).input_shape)
        files.append("model.onnx")
    elif onnx:
        notes.append("onnx is not installed: model.onnx not written (pip install "
                     "'pimsim[onnx]')")
    return {"dir": str(out), "files": files, "notes": notes}


def export(cfg: Config, out_dir, data_dir=None, progress: bool = True, onnx: bool = True) -> dict:
    """The job of ``pimsim export``: prepare, reorder and calibrate (or load ``quant.load``), put
    the layers on the ``crossbar:`` arrays if any (fitting calibrated ADC ranges), and write
    the export (``write_export``); no test image is evaluated."""
    check_backend(cfg)
    check_out_dir(out_dir)
    with scoped_threads(cfg["eval.threads"]):
        prep = prepare(cfg, data_dir)
        dataset_of(prep).check_calibration(cfg["quant.calib_images"])
        checked_mapping(cfg, prep.net)
        info, reorder, loaded = calibrate_or_load(prep, progress)
        mapping = setup_crossbar(prep, loaded) if cfg.crossbar is not None else None
        res = write_export(prep, out_dir, mapping, reorder, loaded, onnx=onnx)
        res.update(calibration_s=info["calibration_s"], layers=layer_table(prep.net),
                   float_layers=info["float_layers"],
                   loaded=None if loaded is None else str(loaded["dir"]))
        return res


def _run(cfg: Config, limit, data_dir, progress: bool, threads: int, out_dir=None) -> dict:
    """The body of ``run``, with ``threads`` threads set."""
    prep = prepare(cfg, data_dir)
    ds = dataset_of(prep)
    limit = limit or cfg["eval.limit"]
    test_size = ds.test_size
    ds.check_calibration(cfg["quant.calib_images"])                     # fail early
    shape_mapping = checked_mapping(cfg, prep.net)  # the cost model's mapping: fail early
    notes = list(cfg.notes)
    if limit is not None and limit > test_size:
        notes.append(f"limit {limit} is above the {test_size} images of "
                     f"{ds.test_source}: capped, evaluating all {test_size}")
    n_images = test_size if limit is None else min(limit, test_size)
    bs = cfg["eval.batch_size"]
    net = prep.net
    t0 = time.perf_counter()
    fp_top1, _ = evaluate_dataset(net, ds, bs, n_images, progress, desc="float")
    fp_s = time.perf_counter() - t0
    info, reorder, loaded = calibrate_or_load(prep, progress)
    if loaded is not None and cfg["reorder.method"] != "none":
        notes.append(f"reorder.method {cfg['reorder.method']} not run: the channel orders "
                     f"stored in {loaded['dir']} are used")
    mapping = setup_crossbar(prep, loaded) if cfg.crossbar is not None else None
    net.set_mode(cfg["eval.backend"])
    t0 = time.perf_counter()
    chips = chip_seeds(cfg)
    tops = []
    for seed in chips:                             # Monte Carlo chips (crossbar.device)
        if seed is not None:
            from .crossbar.noisy import program_chips
            program_chips(net, seed)               # the read-noise stream restarts too
        desc = f"quantized ({cfg['eval.backend']})" + ("" if seed is None else f", chip {seed}")
        tops.append(evaluate_dataset(net, ds, bs, n_images, progress, desc=desc)[0])
    top1 = float(np.mean(tops))
    eval_s = time.perf_counter() - t0
    resolved = resolved_config(prep, limit)
    ckpt = resolved["model"]["checkpoint"]
    cost = config_cost(cfg, net, mapping if mapping is not None else shape_mapping,
                       input_shape=ds.input_shape)
    out = {
        "fp_top1": fp_top1,
        "top1": top1,
        "images": int(n_images),
        "checkpoint": ckpt,
        "dataset": ds.describe(),
        "limit_capped": limit is not None and limit > test_size,
        "notes": notes,
        "calibration_s": info["calibration_s"],
        "eval_s": eval_s,
        "fp_eval_s": fp_s,
        "float_layers": info["float_layers"],
        "threads": threads,
        "pimsim": __version__,
        "config": resolved,
        "layers": layer_table(net),
        "reorder": reorder,
        # matrix products run in torch, not on arrays (counted by the cost as digital work)
        "digital_layers": cost["digital_layers"],
        # pimsim.cost: per-inference totals of this network on the mapping it ran on
        "cost": cost["totals"],
        "provenance": provenance(seeds=[cfg["quant.seed"]], threads=threads),
    }
    if loaded is not None:
        out["loaded"] = str(loaded["dir"])
    if mapping is not None:
        crossbar_results(out, net, mapping, cfg["eval.backend"] == "crossbar")
    if cfg.crossbar is not None and cfg["eval.backend"] == "crossbar":
        out["top1_instances"] = tops
        out["top1_sd"] = float(np.std(tops, ddof=1)) if len(tops) > 1 else 0.0
        out["top1_min"], out["top1_max"] = float(min(tops)), float(max(tops))
        out["chip_seeds"] = [s for s in chips if s is not None]
        dev = cfg.crossbar.dev
        if dev.instances > 1 and chips == [None]:
            notes.append(f"crossbar.device.instances: {dev.instances}: the cells are ideal, "
                         "so every chip is the same; evaluated once")
    if out_dir is not None:
        ex = write_export(prep, out_dir, mapping, reorder, loaded, resolved)
        out["export"] = ex
        out["notes"] = notes + ex["notes"]
    return out


def chip_seeds(cfg: Config) -> list:
    """The chip seeds a run evaluates: ``crossbar.device.seed .. seed + instances - 1`` when the
    layers run on the analog array model (backend crossbar, ``Crossbar.analog``), else
    ``[None]`` (one evaluation: ideal cells make every chip the same, wire resistance or not)."""
    xb = cfg.crossbar
    if xb is None or cfg["eval.backend"] != "crossbar" or xb.dev.cells_ideal:
        return [None]
    return list(range(xb.dev.seed, xb.dev.seed + xb.dev.instances))


def setup_crossbar(prep: Prepared, loaded: dict | None = None):
    """With a ``crossbar:`` section (the network already calibrated in the symmetric range): the
    Mapping, an array operator per layer and, for backend crossbar with ``adc_range:
    calibrated``, the per-array ADC ranges fitted on the calibration batch (after
    quantization), or those stored in the ``loaded`` calibration when it has them."""
    from .crossbar import attach, fit_adc_ranges, reset_adc_stats
    cfg = prep.cfg
    mapping = attach(prep.net, cfg.crossbar, cfg.granularity, strict=True)
    if loaded is not None and loaded["adc_ranges"]:
        from .export import apply_adc_ranges
        apply_adc_ranges(prep.net, loaded["adc_ranges"], str(loaded["dir"]))
    elif cfg["eval.backend"] == "crossbar" \
            and cfg.crossbar.adc_range in ("calibrated", "calibrated_slice") \
            and cfg.crossbar.adc_bits > 0:
        fit_adc_ranges(prep.net, calibration_batch(prep), cfg["eval.batch_size"])
    reset_adc_stats(prep.net)
    return mapping


def crossbar_results(out: dict, net: Network, mapping, simulated: bool) -> None:
    """Add arrays, utilization and ADC clip fraction (totals and per layer) to a run's result;
    the clip fraction is null unless the arrays were simulated (backend crossbar)."""
    from .crossbar import adc_stats
    stats = adc_stats(net) if simulated else {}
    out["crossbar"] = mapping.crossbar.to_dict()
    out["arrays"] = mapping.arrays
    out["utilization"] = mapping.utilization
    clipped = sum(c for c, _ in stats.values())
    conv = sum(n for _, n in stats.values())
    out["adc_clip_fraction"] = clipped / conv if conv else (0.0 if simulated else None)
    for entry in out["layers"]:
        lm = mapping.layer(entry["name"])
        entry["arrays"], entry["utilization"] = lm.arrays, lm.utilization
        c, n = stats.get(entry["name"], (0, 0))
        entry["adc_clip_fraction"] = c / n if n else (0.0 if simulated else None)
