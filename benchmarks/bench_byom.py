"""Bring your own model, measured: a non-zoo pretrained CIFAR-10 network (the MobileNetV2-style
``examples/mobilenet_cifar.py``, trained by ``benchmarks/train_mobilenet.py``) in float, at W8A8
and W4A8 channelwise, W4A8 PTQ-SL on 128x128 tiles (exact kernel) and on ISAAC-like arrays
(array-level simulation, ``hwconfigs/isaac.yaml``'s crossbar), each over calibration seeds.

    python benchmarks/bench_byom.py [--seeds 0 1 2] [--limit N] [--threads T]
        [--weights ~/.cache/pimsim/mobilenet_cifar-s0.safetensors] [--points NAME ...]

Every point is one ``pimsim run`` (``pimsim.simulate.run``) of a YAML-equivalent config built
with ``model.factory: examples/mobilenet_cifar.py:build``, so the numbers are exactly what a
user's ``pimsim run`` gives. The weights are not part of the project: when the file is missing
this script says how to make it (``train_mobilenet.py``, about 5-30 minutes on a CPU) and the
sha256 of the weights each row used is recorded. Writes ``byom-mobilenet_cifar.csv`` (one row per
point and seed, resumable) and ``byom-mobilenet_cifar.md`` (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
from pathlib import Path

import yaml

from harness import Bench, common_args, log, pm
from pimsim.config import validate
from pimsim.simulate import run

ROOT = Path(__file__).resolve().parents[1]
FACTORY = str(ROOT / "examples" / "mobilenet_cifar.py") + ":build"
ISAAC = yaml.safe_load((ROOT / "hwconfigs" / "isaac.yaml").read_text())["crossbar"]

POINTS = {   # name -> (label, quant overrides, eval backend, crossbar section or None)
    "w8a8-channelwise": ("W8A8 channelwise (kernel)",
                         {"weight_bits": 8, "tile": "channelwise", "calibration": "max"}, "kernel", None),
    "w4a8-channelwise": ("W4A8 channelwise, max (kernel)",
                         {"tile": "channelwise", "calibration": "max"}, "kernel", None),
    "w4a8-ptqsl-channelwise": ("W4A8 channelwise, PTQ-SL (kernel)",
                               {"tile": "channelwise"}, "kernel", None),
    "w4a8-ptqsl-128x128": ("W4A8 PTQ-SL, 128x128 tiles (kernel)", {"tile": [128, 128]}, "kernel", None),
    "w4a8-ptqsl-isaac": ("W4A8 PTQ-SL, ISAAC-like arrays (crossbar)", {"tile": "crossbar"}, "crossbar", ISAAC),
}
COLUMNS = ["name", "seed", "fp_top1", "top1", "images", "calibration_s", "eval_s", "scales",
           "arrays", "energy_nj", "weights_sha256"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config(name: str, seed: int, weights: Path):
    _, quant, backend, crossbar = POINTS[name]
    raw = {"model": {"factory": FACTORY, "checkpoint": str(weights)},
           "quant": {"weight_bits": 4, "act_bits": 8, "calibration": "ptqsl", "seed": seed, **quant},
           "eval": {"backend": backend}}
    if crossbar is not None:
        raw["crossbar"] = copy.deepcopy(crossbar)
    return validate(raw, source=f"bench_byom:{name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, seeds=(0, 1, 2), threads=1)
    ap.add_argument("--weights", type=Path,
                    default=Path.home() / ".cache" / "pimsim" / "mobilenet_cifar-s0.safetensors")
    ap.add_argument("--points", nargs="+", choices=list(POINTS), default=list(POINTS))
    args = ap.parse_args(argv)
    if not args.weights.is_file():
        print(f"{args.weights}: no such weights file; make it with "
              f"`python benchmarks/train_mobilenet.py --seeds 0` (or pass --weights)", file=sys.stderr)
        return 2
    bench = Bench(args)
    digest = sha256(args.weights)
    suffix = "" if args.limit is None else f"-limit{args.limit}"
    res = bench.results(f"byom-mobilenet_cifar{suffix}.csv", COLUMNS)
    for name in args.points:
        for seed in args.seeds:
            point = f"{name}-s{seed}"
            if point in res:
                continue
            log(f"{point} ...")
            out = run(config(name, seed, args.weights), limit=args.limit, progress=False)
            cost = out["cost"]
            res.append({"point": point, "name": name, "seed": seed,
                        "fp_top1": f"{out['fp_top1']:.4f}", "top1": f"{out['top1']:.4f}",
                        "images": out["images"], "calibration_s": f"{out['calibration_s']:.1f}",
                        "eval_s": f"{out['eval_s']:.1f}",
                        "scales": cost["scales"],
                        "arrays": cost.get("arrays", ""), "energy_nj": f"{cost.get('energy_nj', float('nan')):.1f}",
                        "weights_sha256": digest})
            log(f"{point}: top1 {out['top1']:.4f} (float {out['fp_top1']:.4f}), "
                f"eval {out['eval_s']:.0f} s")
    rows = res.rows()
    fp = sorted({r["fp_top1"] for r in rows})
    lines = ["# Bring your own model: MobileNetV2-style CIFAR-10 net (examples/mobilenet_cifar.py)",
             "",
             f"Float top-1: {', '.join(f'{100 * float(v):.2f} %' for v in fp)} "
             f"({rows[0]['images'] if rows else '-'} test images; weights sha256 {digest[:12]}). "
             "First and last layer in float (`quant.float_layers: auto`). Mean ± sd over "
             "calibration seeds.",
             "",
             "| configuration | seeds | top-1 (%) | top-1 - float (points) | scales | arrays | energy / inference (nJ) |",
             "|---|---|---|---|---|---|---|"]
    for name in args.points:
        rs = [r for r in rows if r["name"] == name]
        if not rs:
            continue
        diffs = [float(r["top1"]) - float(r["fp_top1"]) for r in rs]
        lines.append(f"| {POINTS[name][0]} | {' '.join(sorted(r['seed'] for r in rs))} | "
                     f"{pm([r['top1'] for r in rs])} | {pm(diffs, signed=True)} | {rs[0]['scales']} | "
                     f"{rs[0]['arrays']} | {rs[0]['energy_nj']} |")
    bench.write_md(f"byom-mobilenet_cifar{suffix}.md", lines, rows=res.rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
