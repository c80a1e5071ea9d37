"""Speed of simulated inference: ResNet-20 on the exact kernel path against the plain torch
float32 model on the same test images, measured in the same run.

    python benchmarks/bench_inference.py [--limit 10000] [--repeats 2] [--threads 0]
        [--points w4a8-128x128 w4a8-channelwise w4a8-m2r4 w8a8-128x128] [--out DIR]

Points (each calibrated once with PTQ-SL, 128 images, ``quant.seed``): W4A8 on 128 x 128 tiles
(the headline), W4A8 channelwise, W4A8 Method 2 r = m = 4, W8A8 on 128 x 128 tiles. Each repeat
times torch fp32 and then every point over the whole test set (interleaved, so machine noise
hits all of them); the best repeat of each is kept. Prints a table and writes
DIR/inference.{json,md} (default benchmarks/results/) with ``slowdown_vs_torch_fp32`` of the
headline point (kernel-path time / torch fp32 time), ``slowdown`` per point, and the provenance
of benchmarks/harness.py.
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
from pimsim.kernels import int8_enabled
from pimsim.models import build_model
from pimsim.simulate import evaluate, prepare, quantize_network

POINTS = {   # name: (label, weight bits, act bits, quant.tile, quant.splits)
    "w4a8-128x128": ("W4A8 128x128", 4, 8, [128, 128], None),
    "w4a8-channelwise": ("W4A8 channelwise", 4, 8, "channelwise", None),
    "w4a8-m2r4": ("W4A8 Method 2 r=m=4", 4, 8, [4, None], 4),
    "w8a8-128x128": ("W8A8 128x128", 8, 8, [128, 128], None),
}
HEADLINE = "w4a8-128x128"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each (best kept)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    common_args(ap, seeds=(0,))
    args = ap.parse_args(argv)

    bench = Bench(args)
    threads = bench.threads
    nets, calib_s, prep = {}, {}, None
    for name in args.points:
        _, wb, ab, tile, splits = POINTS[name]
        quant = {"weight_bits": wb, "act_bits": ab, "tile": tile, "seed": args.seeds[0]}
        if splits is not None:
            quant["splits"] = splits
        cfg = validate({"model": {"name": "resnet20"}, "quant": quant,
                        "eval": {"batch_size": args.batch_size, "backend": "kernel"}})
        p = prepare(cfg)
        t0 = time.perf_counter()
        quantize_network(p, progress=False)
        calib_s[name] = time.perf_counter() - t0
        p.net.set_mode("kernel")
        nets[name] = p.net
        prep = prep or p
        print(f"calibrated {name} in {calib_s[name]:.1f} s", file=sys.stderr)
    images, labels = bench.test_set(prep)
    torch_model = build_model("resnet20", checkpoint=prep.checkpoint)   # BN unfolded, eager
    for net in nets.values():
        evaluate(net, images[:500], labels[:500], args.batch_size, progress=False)  # JIT warm-up

    models = [("torch_fp32", torch_model)] + list(nets.items())
    runs = {k: [] for k, _ in models}
    acc = {}
    for rep in range(args.repeats):
        for name, model in models:
            t = time.perf_counter()
            acc[name], _ = evaluate(model, images, labels, args.batch_size, progress=False)
            runs[name].append(time.perf_counter() - t)
            print(f"repeat {rep + 1}: {name:<18} {runs[name][-1]:7.2f} s  "
                  f"top-1 {100 * acc[name]:.2f}%", file=sys.stderr)
    best = {k: min(v) for k, v in runs.items()}
    slow = {k: best[k] / best["torch_fp32"] for k in nets}
    rows = [{"run": k, "label": POINTS[k][0] if k in POINTS else "torch fp32",
             "seconds": round(best[k], 3), "images_per_s": round(len(images) / best[k], 1),
             "top1": acc[k], "slowdown": round(slow[k], 3) if k in slow else 1.0,
             "calibration_s": round(calib_s[k], 1) if k in calib_s else None} for k in runs]
    res = {
        "slowdown": {k: round(v, 3) for k, v in slow.items()},
        "images": int(len(images)),
        "int8_path": int8_enabled(),
        "threads": threads,
        "torch": torch.__version__,
        "numba": numba.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "seconds_all_repeats": {k: [round(t, 3) for t in v] for k, v in runs.items()},
        "rows": rows,
    }
    if HEADLINE in slow:
        res["slowdown_vs_torch_fp32"] = round(slow[HEADLINE], 3)
        res["tile"], res["bits"] = POINTS[HEADLINE][3], "W4A8"
    md = ["| run | seconds | images/s | top-1 | slowdown vs torch fp32 |",
          "|---|---:|---:|---:|---:|"]
    md += [f"| {r['label']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} | "
           f"{100 * r['top1']:.2f}% | {r['slowdown']:.2f}x |" for r in rows]
    md.append(f"\n{len(images)} images, batch {args.batch_size}, {threads} thread(s), best of "
              f"{args.repeats} interleaved repeats; int8 path "
              f"{'on' if int8_enabled() else 'off'}.")
    print(f"wrote {bench.write_json('inference.json', res)}")
    bench.write_md("inference.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
