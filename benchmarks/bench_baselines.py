"""PTQ-SL against the max and mse calibration baselines, at three granularities and two bit widths.

    python benchmarks/bench_baselines.py --model resnet20 [--methods max mse ptqsl]
        [--wbits 4 3] [--abits 8] [--seeds 0] [--limit N] [--threads T] [--out DIR]

Granularities: channelwise, Method 1 tile 128 x 128, Method 2 r = 4, m = 4. Each point and
calibration seed (``quant.seed``): calibrate with the method (128 images of data_batch_1;
first and last layer in float; the method's YAML-default options), then top-1 on the test set
with the fake-quant path. One CSV row per point (benchmarks/harness.py; a rerun computes only
what is missing). Writes DIR/baselines-<model>[-limit<N>].{csv,md}.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from tqdm.auto import tqdm

from harness import Bench, common_args, granularity, log, pm

GRANS = {"channelwise": ("channelwise", None, None, None),
         "tile 128x128": ("method1", 128, 128, None),
         "Method 2 r=4 m=4": ("method2", 4, None, 4)}
FIELDS = ["model", "wbits", "abits", "calibration", "granularity", "seed", "scales", "top1",
          "calibration_s", "images"]


def point_name(seed, wbits, method, gran) -> str:
    return f"seed={seed}/W{wbits}/{method}/{gran}"


def markdown(rows, model: str) -> list[str]:
    acc = defaultdict(dict)
    for r in rows:
        acc[(int(r["wbits"]), r["granularity"], r["calibration"])][int(r["seed"])] = float(r["top1"])
    methods = [m for m in ("max", "mse", "ptqsl") if any(k[2] == m for k in acc)]
    methods += sorted({k[2] for k in acc} - set(methods))
    seeds = sorted({int(r["seed"]) for r in rows})
    images = sorted({r["images"] for r in rows})
    md = [f"# Calibration methods compared: {model}", "",
          f"Top-1 (%) on {'/'.join(images)} CIFAR-10 test images (mean ± sd over calibration seeds "
          f"{', '.join(map(str, seeds))} where there are several); 128 calibration images; first "
          "and last layer in float; fake-quant path. Bold: the best of the row, when it is ahead "
          "of the second by more than the spread (or, on one seed, by at least one test image).",
          "", "| | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for wb in sorted({k[0] for k in acc}, reverse=True):
        for g in GRANS:
            vals = {m: acc.get((wb, g, m), {}) for m in methods}
            if not any(vals.values()):
                continue
            means = {m: sum(v.values()) / len(v) for m, v in vals.items() if v}
            order = sorted(means, key=means.get, reverse=True)
            best = None
            if len(order) > 1:
                a, b = order[0], order[1]
                spread = max(_sd(vals[a]), _sd(vals[b]))
                if means[a] - means[b] > max(spread, 0.5 / int(images[0])):
                    best = a
            cells = [("**" + pm(vals[m].values()) + "**") if m == best else pm(vals[m].values())
                     for m in methods]
            md.append(f"| W{wb}A8 {g} | " + " | ".join(cells) + " |")
    return md


def _sd(v: dict) -> float:
    vals = list(v.values())
    if len(vals) < 2:
        return 0.0
    m = sum(vals) / len(vals)
    return (sum((x - m) ** 2 for x in vals) / (len(vals) - 1)) ** 0.5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--methods", nargs="+", default=["max", "mse", "ptqsl"])
    ap.add_argument("--wbits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--abits", type=int, default=8)
    common_args(ap, seeds=(0,))
    args = ap.parse_args(argv)

    bench = Bench(args)
    prep = bench.prepare(args.model)
    stem = f"baselines-{args.model}" + (f"-limit{args.limit}" if args.limit else "")
    res = bench.results(f"{stem}.csv", FIELDS)
    todo = [(s, wb, m, g) for s in args.seeds for wb in args.wbits for g in GRANS
            for m in args.methods if point_name(s, wb, m, g) not in res]
    log(f"{len(res.file.done)} points done, {len(todo)} to compute -> {res.path}")
    for seed, wb, method, g in tqdm(todo, desc=stem, unit="point"):
        got = bench.point(prep, granularity(*GRANS[g]), wb, args.abits, method, seed)
        res.append({"point": point_name(seed, wb, method, g), "model": args.model, "wbits": wb,
                    "abits": args.abits, "calibration": method, "granularity": g, "seed": seed,
                    **got})
    bench.write_md(f"{stem}.md", markdown(res.rows(), args.model), rows=res.rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
