"""Command-line interface: parses arguments, calls the library, prints and saves results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__


class OutputError(ValueError):
    """An output path (``--out``) that cannot be written; names the path."""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the error names the value, under the subcommand's usage)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v}")
    return v


def check_out_file(path) -> Path:
    """Check, before any work, that ``path`` can be written as a file: not a folder, its nearest
    existing ancestor a folder, and a probe file can be created there (the probe and any
    folders made for it are removed again). OutputError naming the path otherwise."""
    out = Path(path)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name (e.g. {out / 'result.json'})")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"--out {out}: {anc} is a file, not a folder")
    made = []
    try:
        for d in reversed([out.parent, *out.parent.parents]):
            if not d.exists():
                d.mkdir()
                made.append(d)
        if out.exists():
            with open(out, "a"):
                pass
        else:
            with open(out, "x"):
                pass
            out.unlink()
    except OSError as e:
        raise OutputError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
    return out


def _print_notes(notes, skip=()) -> None:
    for n in notes:
        if n not in skip:
            print(f"pimsim: note: {n}", file=sys.stderr)


def _set_load(cfg, load_dir) -> None:
    """``--load DIR``: ``quant.load`` of the config, as an absolute path (checked now)."""
    from .config import resolve_load
    if load_dir is not None:
        cfg.data["quant"]["load"] = str(Path(load_dir).expanduser().absolute())
        resolve_load(cfg)


def _cmd_run(args) -> int:
    from .config import load
    from .kernels import set_threads
    from .simulate import check_out_dir, run
    if args.out:
        check_out_file(args.out)
    if args.out_dir:
        check_out_dir(args.out_dir)
    cfg = load(args.config, args.set)
    _print_notes(cfg.notes)
    if args.backend:
        cfg.data["eval"]["backend"] = args.backend
    _set_load(cfg, args.load)
    set_threads(cfg["eval.threads"])     # the command is the top level: its threads, process-wide
    res = run(cfg, limit=args.limit, data_dir=args.data_dir, progress=not args.quiet,
              out_dir=args.out_dir)
    _print_notes(res["notes"], skip=cfg.notes)
    q = res["config"]["quant"]
    print(f"model {cfg.model_label}  W{q['weight_bits']}A{q['act_bits']}  "
          f"tile {cfg.granularity}  calibration "
          f"{'loaded from ' + res['loaded'] if res.get('loaded') else q['calibration']}  "
          f"backend {res['config']['eval']['backend']}")
    print(f"checkpoint {res['checkpoint']}" if res["checkpoint"] is not None else
          "checkpoint none: the model's own initial weights (model.factory, no "
          "model.checkpoint)")
    d = res["dataset"]
    print(f"data {d['dataset']}: test {d['test']} ({d['test_size']} images, {d['num_classes']} "
          f"classes, input {'x'.join(map(str, d['input_shape']))}); calibration from "
          f"{d['calibration']}")
    print(f"{'layer':<20}{'O':>6}{'K':>6}{'tile':>12}{'scales':>8}")
    for l in res["layers"]:
        print(f"{l['name']:<20}{l['O']:>6}{l['K']:>6}{'%dx%d' % tuple(l['tile']):>12}{l['scales']:>8}")
    print(f"float layers: {', '.join(res['float_layers']) or '-'}")
    if res["digital_layers"]:
        print("digital layers (run in torch, not on arrays; costed as digital work): "
              + ", ".join(f"{d['name']} ({d['op']}, {d['macs']} MACs)"
                          for d in res["digital_layers"]))
    if res.get("reorder"):
        ro = res["reorder"]
        print(f"reorder {ro['method']}: {len(ro['orders'])} free channel group(s) reordered "
              f"jointly, {len(ro['frozen_groups'])} frozen (search {ro['search_s']:.1f}s)")
        for g, p in ro["orders"].items():
            print(f"  {g:<20} {' '.join(map(str, p))}")
    print(f"images {res['images']}{' (limit capped)' if res['limit_capped'] else ''}  float top-1 {100 * res['fp_top1']:.2f}%  "
          f"quantized top-1 {100 * res['top1']:.2f}%  "
          f"(calibration {res['calibration_s']:.1f}s, eval {res['eval_s']:.1f}s)")
    if len(res.get("top1_instances") or ()) > 1:
        print(f"chips {res['chip_seeds'][0]}..{res['chip_seeds'][-1]}: top-1 mean "
              f"{100 * res['top1']:.2f}% sd {100 * res['top1_sd']:.2f}% min "
              f"{100 * res['top1_min']:.2f}% max {100 * res['top1_max']:.2f}%")
    if "arrays" in res:
        clip = res["adc_clip_fraction"]
        print(f"crossbar {res['crossbar']['name']}: {res['arrays']} arrays, utilization "
              f"{100 * res['utilization']:.1f}%, ADC clipped conversions "
              f"{'-' if clip is None else f'{100 * clip:.4f}%'}")
    if res.get("export"):
        ex = res["export"]
        print(f"wrote {', '.join(ex['files'])} into {ex['dir']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def _cmd_export(args) -> int:
    from .config import load
    from .kernels import set_threads
    from .simulate import check_out_dir, export
    check_out_dir(args.out)
    cfg = load(args.config, args.set)
    _print_notes(cfg.notes)
    _set_load(cfg, args.load)
    set_threads(cfg["eval.threads"])
    res = export(cfg, args.out, data_dir=args.data_dir, progress=not args.quiet,
                 onnx=not args.no_onnx)
    _print_notes(res["notes"])
    q = cfg.data["quant"]
    print(f"model {cfg.model_label}  W{q['weight_bits']}A{q['act_bits']}  tile {cfg.granularity}  "
          f"calibration {'loaded from ' + res['loaded'] if res['loaded'] else q['calibration']} "
          f"({res['calibration_s']:.1f}s); {len(res['layers'])} quantized layers, "
          f"{sum(l['scales'] for l in res['layers'])} tiles; float layers: "
          f"{', '.join(res['float_layers']) or '-'}")
    print(f"wrote {', '.join(res['files'])} into {res['dir']}")
    return 0


def _cmd_fetch(args) -> int:
    from .data import fetch
    what = tuple(args.what) if args.what else ("cifar10", "models")
    try:
        paths = fetch(args.dest, what=what, progress=not args.quiet)
    except OSError as e:                     # e.g. --dest on a read-only disk or under a file
        print(f"pimsim: error: fetch into {args.dest}: {e.strerror or e}"
              f"{f' ({e.filename})' if e.filename else ''}", file=sys.stderr)
        return 2
    for k, p in paths.items():
        print(f"{k}: {p}")
    return 0


def _cmd_cost(args) -> int:
    from .config import load
    from .cost import config_cost, format_table, to_json
    if args.out:
        check_out_file(args.out)
    cfg = load(args.config, args.set)
    _print_notes(cfg.notes)
    try:
        res = config_cost(cfg)
    except ValueError as e:                  # a tile that does not fit the crossbar
        print(f"pimsim: error: {args.config}: {e}", file=sys.stderr)
        return 2
    xb = res["crossbar"]
    print(f"model {res['model']}  W{res['w_bits']}A{res['a_bits']}  tile {res['granularity']}  "
          f"crossbar {xb['name']} {xb['rows']}x{xb['cols']}, {xb['cell_bits']} bit/cell, "
          f"{xb['signed']}, {xb['dac_bits']}-bit DAC, {xb['scale_bits']}-bit scales"
          + ("" if res["strict"] else " (default crossbar: oversized tiles split over arrays)"))
    print(format_table(res))
    if args.out:
        from .provenance import provenance
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(to_json({**res, "provenance": provenance(seeds=[], threads=1)}))
        print(f"wrote {out}")
    return 0


def _cmd_plot(args) -> int:
    from .plots import plot_results, read_rows
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise OutputError(f"--out {args.out} is a file; give a folder for the PNGs")
    for f in args.results:                   # check every CSV before drawing any
        read_rows(f)
    for f in args.results:
        for p in plot_results(f, args.out):
            print(f"wrote {p}")
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import SweepError, load, run_sweep
    sweep = load(args.sweep)
    out = args.out or sweep.out
    check_out_file(out)
    print(f"sweep {args.sweep}: {len(sweep.points)} points -> {out}")
    try:
        res = run_sweep(sweep, out=out, workers=args.workers, scheduler=args.scheduler,
                        data_dir=args.data_dir, progress=not args.quiet)
    except SweepError as e:
        print(f"pimsim: error: {e}", file=sys.stderr)
        return 1
    print(f"ran {res['ran']} point(s), skipped {res['skipped']} already in {res['out']}")
    return 0


def _config_args(p) -> None:
    """The CONFIG argument and the --set overrides of a subcommand that reads a config."""
    p.add_argument("config", help="YAML config (e.g. hwconfigs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by dotted path, value read as YAML "
                        "(e.g. --set quant.tile='[16, 36]'); repeatable")


def _data_dir_arg(p) -> None:
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ or "
                   "cifar-100-python/ (overrides data.dir)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pimsim",
        description="Simulate sub-layerwise (PTQ-SL) quantized networks on PIM crossbar tiles.")
    p.add_argument("--version", action="version", version=f"pimsim {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="calibrate and evaluate a network on a crossbar config",
                       description="Calibrate the configured network on the calibration images, "
                                   "then evaluate float and quantized top-1 on the test images "
                                   "of data.dataset (CIFAR-10 by default).")
    _config_args(r)
    r.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="evaluate only the first N test images")
    r.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    _data_dir_arg(r)
    r.add_argument("--backend", choices=("kernel", "fake", "crossbar"), default=None,
                   help="override eval.backend")
    r.add_argument("--load", default=None, metavar="DIR",
                   help="reload the calibration of a pimsim export folder instead of "
                        "calibrating (sets quant.load)")
    r.add_argument("--out-dir", default=None, metavar="DIR",
                   help="also write the run's calibration there, as pimsim export --out does "
                        "(tiles.safetensors, manifest.json, tiles.csv, model.onnx)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=_cmd_run)

    ex = sub.add_parser("export", help="calibrate and write the calibration: tiles, manifest, "
                                       "CSV and ONNX model",
                        description="Calibrate the configured network (or reload --load DIR) "
                                    "without evaluating it and write DIR/tiles.safetensors "
                                    "(integer weights, tile scales, activation scales, channel "
                                    "orders, ADC ranges), DIR/manifest.json, DIR/tiles.csv and "
                                    "DIR/model.onnx (opset-21 QDQ, needs the onnx extra).")
    _config_args(ex)
    ex.add_argument("--out", required=True, metavar="DIR", help="export folder (made if needed)")
    ex.add_argument("--load", default=None, metavar="DIR",
                    help="reload this export folder's calibration instead of calibrating")
    _data_dir_arg(ex)
    ex.add_argument("--no-onnx", action="store_true", help="do not write model.onnx")
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ex.set_defaults(fn=_cmd_export)

    co = sub.add_parser("cost", help="memory, compute, array, energy and latency cost of a config",
                        description="Per-layer and total cost of the configured network on its "
                                    "crossbar (no data needed): scale memory, rescale multiplies "
                                    "and partial-sum additions, arrays, ADC conversions, energy "
                                    "and latency per inference from the cost: constants.")
    _config_args(co)
    co.add_argument("--out", default=None, metavar="FILE.json", help="write the cost as JSON")
    co.set_defaults(fn=_cmd_cost)

    pl = sub.add_parser("plot", help="accuracy heatmaps and accuracy/cost Pareto plots (PNG)",
                        description="From sweep or granularity CSVs: top-1 heatmaps over (r, c) "
                                    "and (r, m), and top-1 vs scale-memory overhead and vs "
                                    "energy with the Pareto front marked.")
    pl.add_argument("results", nargs="+", help="results CSV(s)")
    pl.add_argument("--out", default=None, metavar="DIR",
                    help="folder for the PNGs (default: beside each CSV)")
    pl.set_defaults(fn=_cmd_plot)

    sw = sub.add_parser("sweep", help="run a grid of configs, one CSV row per point (resumable)",
                        description="Run every point of a sweep YAML (base config + grid of "
                                    "overrides); rows are appended to the results CSV as points "
                                    "finish, and a rerun skips the points already there.")
    sw.add_argument("sweep", help="sweep YAML (see pimsim.sweep)")
    sw.add_argument("--scheduler", default=None, metavar="ADDRESS",
                    help="Dask scheduler address (e.g. tcp://host:8786); default: local processes")
    sw.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                    help="local worker processes (default: all cores)")
    sw.add_argument("--out", default=None, metavar="FILE.csv",
                    help="results CSV (default: the sweep's out: key, else SWEEP.csv)")
    _data_dir_arg(sw)
    sw.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sw.set_defaults(fn=_cmd_sweep)

    f = sub.add_parser("fetch", help="download CIFAR-10 (CIFAR-100 with --what cifar100) and "
                                     "the published checkpoints (needs internet)")
    f.add_argument("--dest", default=str(Path.home() / ".cache" / "pimsim"),
                   help="where to put them (default ~/.cache/pimsim)")
    f.add_argument("--what", nargs="+", choices=("cifar10", "cifar100", "models"), default=None,
                   help="what to download (default: cifar10 models)")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    f.set_defaults(fn=_cmd_fetch)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    from .config import ConfigError
    from .data import DataError, DataNotFoundError, FetchError
    from .models import CheckpointError, ModelFactoryError
    from .network import UnsupportedModelError
    from .export import TilesError
    from .plots import ResultsError
    try:
        return args.fn(args)
    except (ConfigError, DataNotFoundError, DataError, FetchError, UnsupportedModelError,
            CheckpointError, ModelFactoryError, ResultsError, OutputError, TilesError,
            FileNotFoundError) as e:
        print(f"pimsim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pimsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
