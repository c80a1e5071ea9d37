"""Speed of simulated inference: ResNet-20 W4A8 on 128x128 tiles (exact kernel path) against the
plain torch float32 model on the same test images, measured in the same run.

    python benchmarks/bench_inference.py [--images 10000] [--repeats 2] [--out FILE]

Prints a table and writes JSON (default benchmarks/results/inference.json) with
``slowdown_vs_torch_fp32`` = kernel-path time / torch fp32 time (best of the repeats, runs
interleaved so machine noise hits both).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numba
import torch

from pimsim.config import validate
from pimsim.data import load_cifar10
from pimsim.models import build_model
from pimsim.simulate import evaluate, prepare, quantize_network, set_threads

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000, help="test images (default 10000)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each (best kept)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--tile", default="[128, 128]", help="quant.tile as YAML (default [128, 128])")
    ap.add_argument("--out", default=str(RESULTS / "inference.json"))
    args = ap.parse_args(argv)

    import yaml
    cfg = validate({"model": {"name": "resnet20"},
                    "quant": {"weight_bits": 4, "act_bits": 8, "tile": yaml.safe_load(args.tile)},
                    "eval": {"batch_size": args.batch_size, "backend": "kernel"}})
    threads = set_threads(0)
    prep = prepare(cfg)
    images, labels = load_cifar10("test", prep.data_dir, limit=args.images)
    torch_model = build_model("resnet20", checkpoint=prep.checkpoint)   # BN unfolded, eager
    t0 = time.perf_counter()
    quantize_network(prep, progress=False)
    calib_s = time.perf_counter() - t0
    net = prep.net
    net.set_mode("kernel")
    evaluate(net, images[:500], labels[:500], args.batch_size, progress=False)  # JIT warm-up

    runs = {"torch_fp32": [], "kernel_w4a8": []}
    acc = {}
    for rep in range(args.repeats):
        for name, model in (("torch_fp32", torch_model), ("kernel_w4a8", net)):
            t = time.perf_counter()
            acc[name], _ = evaluate(model, images, labels, args.batch_size, progress=False)
            runs[name].append(time.perf_counter() - t)
            print(f"repeat {rep + 1}: {name:<12} {runs[name][-1]:7.2f} s  top-1 {100 * acc[name]:.2f}%",
                  file=sys.stderr)
    best = {k: min(v) for k, v in runs.items()}
    slowdown = best["kernel_w4a8"] / best["torch_fp32"]
    rows = [{"run": k, "seconds": round(best[k], 3), "images_per_s": round(len(images) / best[k], 1),
             "top1": acc[k]} for k in runs]
    res = {
        "slowdown_vs_torch_fp32": round(slowdown, 3),
        "images": int(len(images)),
        "tile": cfg["quant.tile"],
        "bits": "W4A8",
        "calibration_s": round(calib_s, 3),
        "threads": threads,
        "torch": torch.__version__,
        "numba": numba.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "seconds_all_repeats": {k: [round(t, 3) for t in v] for k, v in runs.items()},
        "rows": rows,
    }
    md = ["| run | seconds | images/s | top-1 |", "|---|---|---|---|"]
    md += [f"| {r['run']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} | {100 * r['top1']:.2f}% |"
           for r in rows]
    md.append(f"\nslowdown of the exact kernel path vs torch fp32: **{slowdown:.2f}x** "
              f"({len(images)} images, {threads} threads)")
    print("\n".join(md))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
