"""Peak memory of PTQ-SL calibration: ResNet-50 at 224x224 and ResNet-20 at 32x32, 128 images.

    python benchmarks/bench_memory.py [--model resnet50 resnet20] [--image-size N ...]
        [--images 128] [--path new old] [--wbits 4 --abits 8] [--tile 16 36]
        [--threads T] [--out DIR]

Each case runs in a fresh Python subprocess (``--child``), so its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own: a zoo model with random weights
(``pimsim.models.build_model``; ResNet-50 is the ImageNet one, 1000 classes), BatchNorm folded
and traced, ``--images`` synthetic calibration images (standard normal, seed 0) of
``--image-size`` (default: 224 for resnet18 / resnet50, 32 for the CIFAR ResNets), PTQ-SL with
its defaults (100 candidates, 3 rounds, gram mode, golden activation search), W4A8, tiles
``--tile`` (16 x 36), first and last layer in float.

Paths (``--path``):

- ``new``: ``pimsim.calibrate.calibrate`` (float targets computed in lockstep with the
  quantized pass, none held beyond its layer);
- ``old``: the algorithm calibrate used before issue #14 (a copy below, ``old_calibrate``):
  a float pass records every quantized layer's output first, then one hooked pass calibrates.
  By default run only where its targets fit (``--old-max-gb``, default 8 GB of targets: the
  ResNet-20 case); for the others the bytes it would hold are reported (``old_targets_gb``,
  from the layers' output shapes on one image).

Reported per case: ``peak_rss_mb`` (whole child process: interpreter, torch, model, images and
calibration), ``before_calib_mb`` (RSS high-water mark after building the model and images),
``calibration_s`` and ``old_targets_gb`` (every quantized layer's float output at once, what the
old path holds). The goal of issue #14 is ResNet-50 at 224 x 224, 128 images <= 6 GB.
Writes DIR/memory.{json,md} (default DIR: benchmarks/results/) with the provenance of
benchmarks/harness.py. Small check: ``--model resnet50 --images 8 --image-size 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import Bench, common_args, log, positive_int
from pimsim.calibrate import calibrate, method_params, quantize_layer, resolve_float_layers
from pimsim.kernels import set_threads
from pimsim.methods import get_method
from pimsim.models import build_model
from pimsim.network import build_network
from pimsim.quant import Granularity

IMAGENET = ("resnet18", "resnet50")
GOAL_GB = 6.0
SEED = 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0      # KiB on Linux


def old_calibrate(net, images, gran, w_bits, a_bits, method="ptqsl", params=None) -> None:
    """The calibration algorithm before issue #14: all float outputs recorded up front."""
    m = get_method(method)
    params = method_params(params)
    todo = [l for l in net.layers if l.name not in resolve_float_layers(net, "auto")]
    for l in net.layers:
        l.clear_quant()
    targets = {}

    def rec(layer, x):
        y = layer.float_forward(x)
        targets[layer.name] = y
        return y
    net.run_with_hooks(images, {l.name: rec for l in todo})

    def hook(layer, x):
        layer.hook = None
        quantize_layer(m.fn, layer, x, targets.pop(layer.name, None), gran, w_bits, a_bits,
                       params)
        return None
    net.run_with_hooks(images, {l.name: hook for l in todo})


def old_targets_bytes(net, image_size: int, images: int) -> int:
    """Bytes of every quantized layer's float32 output on ``images`` images (one-image pass)."""
    keep = resolve_float_layers(net, "auto")
    total = [0]

    def hook(layer, x):
        y = layer.float_forward(x)
        if layer.name not in keep:
            total[0] += y[0].numel() * 4
        return y
    net.run_with_hooks(torch.zeros(1, 3, image_size, image_size), {l.name: hook for l in net.layers})
    return total[0] * images


def child(args) -> int:
    """One case in this process; prints one JSON line."""
    set_threads(args.threads)
    torch.manual_seed(SEED)
    net = build_network(build_model(args.model[0]))
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.images, 3, args.image_size[0], args.image_size[0], generator=g)
    old_gb = old_targets_bytes(net, args.image_size[0], args.images) / 2 ** 30
    before = peak_rss_mb()
    gran = Granularity.tile(*args.tile)
    t0 = time.perf_counter()
    if args.path[0] == "new":
        calibrate(net, x, gran, args.wbits, args.abits, method="ptqsl", progress=False)
    else:
        old_calibrate(net, x, gran, args.wbits, args.abits)
    secs = time.perf_counter() - t0
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "before_calib_mb": round(before, 1),
                      "calibration_s": round(secs, 1), "old_targets_gb": round(old_gb, 3),
                      "layers_quantized": len(net.quantized_layers)}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["resnet50", "resnet20"],
                    help="zoo models (default: resnet50 resnet20)")
    ap.add_argument("--image-size", type=positive_int, nargs="+", default=None,
                    help="image side per model (default 224 for ImageNet ResNets, else 32)")
    ap.add_argument("--images", type=positive_int, default=128,
                    help="calibration images (default 128)")
    ap.add_argument("--path", nargs="+", choices=("new", "old"), default=["new", "old"])
    ap.add_argument("--old-max-gb", type=float, default=8.0,
                    help="run the old path only where its targets take at most this (GB)")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--tile", type=int, nargs=2, default=[16, 36], metavar=("R", "C"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    common_args(ap, seeds=None, limit=False)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    sizes = args.image_size or [224 if m in IMAGENET else 32 for m in args.model]
    if len(sizes) == 1:
        sizes = sizes * len(args.model)
    if len(sizes) != len(args.model):
        ap.error(f"--image-size: give one size or one per model ({len(args.model)})")

    bench = Bench(args)
    cases = []
    for model, size in zip(args.model, sizes):
        old_gb = None
        for path in sorted(args.path, key=("new", "old").index):
            if path == "old" and old_gb is not None and old_gb > args.old_max_gb:
                log(f"{model} @ {size}, {args.images} images, old path: skipped "
                    f"(its targets alone take {old_gb:.1f} GB > --old-max-gb {args.old_max_gb})")
                cases.append({"model": model, "image_size": size, "images": args.images,
                              "path": "old", "skipped": f"targets {old_gb:.1f} GB"})
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model,
                   "--image-size", str(size), "--images", str(args.images), "--path", path,
                   "--wbits", str(args.wbits), "--abits", str(args.abits),
                   "--tile", *map(str, args.tile), "--threads", str(bench.threads),
                   "--out", str(bench.out)]
            log(f"{model} @ {size}, {args.images} images, {path} path ...")
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if r.returncode != 0:
                log(r.stderr[-3000:])
                raise SystemExit(f"case {model} {path} failed (exit {r.returncode})")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            old_gb = res["old_targets_gb"]
            case = {"model": model, "image_size": size, "images": args.images, "path": path,
                    **res, "wall_s": round(time.perf_counter() - t0, 1)}
            log(f"  peak RSS {res['peak_rss_mb']:.0f} MB, calibration {res['calibration_s']:.1f} s")
            cases.append(case)

    done = [c for c in cases if "skipped" not in c]
    goal = [c for c in done if c["model"] == "resnet50" and c["image_size"] == 224
            and c["images"] == 128 and c["path"] == "new"]
    result = {"cases": cases, "goal_gb": GOAL_GB, "wbits": args.wbits, "abits": args.abits,
              "tile": args.tile, "method": "ptqsl (defaults)", "torch": torch.__version__}
    if goal:
        result["resnet50_224_128_peak_gb"] = round(goal[0]["peak_rss_mb"] / 1024, 2)
        result["goal_met"] = goal[0]["peak_rss_mb"] / 1024 <= GOAL_GB
    lines = [f"# Peak memory of PTQ-SL calibration (W{args.wbits}A{args.abits}, tiles "
             f"{args.tile[0]}x{args.tile[1]}, random weights, synthetic images)", "",
             "| model | image | images | path | peak RSS MB | RSS before calibration MB | "
             "calibration s | old path's targets GB |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for c in cases:
        if "skipped" in c:
            lines.append(f"| {c['model']} | {c['image_size']} | {c['images']} | old | "
                         f"skipped ({c['skipped']}) | | | |")
        else:
            lines.append(f"| {c['model']} | {c['image_size']} | {c['images']} | {c['path']} | "
                         f"{c['peak_rss_mb']:.0f} | {c['before_calib_mb']:.0f} | "
                         f"{c['calibration_s']:.1f} | {c['old_targets_gb']:.2f} |")
    if goal:
        lines += ["", f"ResNet-50, 224 x 224, 128 images: {result['resnet50_224_128_peak_gb']} GB "
                      f"peak (goal <= {GOAL_GB:g} GB: {'met' if result['goal_met'] else 'NOT met'})."]
    bench.write_md("memory.md", lines)
    log(f"wrote {bench.write_json('memory.json', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
