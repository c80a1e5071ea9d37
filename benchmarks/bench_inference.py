"""Speed of simulated inference: ResNet-20 W4A8 on 128x128 tiles (exact kernel path) against the
plain torch float32 model on the same test images, measured in the same run.

    python benchmarks/bench_inference.py [--limit 10000] [--repeats 2] [--threads 0] [--out DIR]

Prints a table and writes DIR/inference.{json,md} (default benchmarks/results/) with
``slowdown_vs_torch_fp32`` = kernel-path time / torch fp32 time (best of the repeats, runs
interleaved so machine noise hits both), and the provenance of benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numba
import torch

from harness import Bench, common_args
from pimsim.config import validate
from pimsim.models import build_model
from pimsim.simulate import evaluate, prepare, quantize_network


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each (best kept)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--tile", default="[128, 128]", help="quant.tile as YAML (default [128, 128])")
    common_args(ap, seeds=(0,))
    args = ap.parse_args(argv)

    import yaml
    cfg = validate({"model": {"name": "resnet20"},
                    "quant": {"weight_bits": 4, "act_bits": 8, "tile": yaml.safe_load(args.tile),
                              "seed": args.seeds[0]},
                    "eval": {"batch_size": args.batch_size, "backend": "kernel"}})
    bench = Bench(args)
    threads = bench.threads
    prep = prepare(cfg)
    images, labels = bench.test_set(prep)
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
    print(f"wrote {bench.write_json('inference.json', res)}")
    bench.write_md("inference.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
