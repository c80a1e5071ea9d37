"""PTQ-SL with alternating weight and activation searches (``quant.search.alternate``) against
the paper's pipeline, per layer, on the very same layer input and float target.

    python benchmarks/bench_alternate.py [--model resnet20] [--tiles 16x36 4x144]
        [--alternate 5] [--seeds 0 1 2] [--threads T] [--out DIR]

One calibration pass per tile and seed (``pimsim.calibrate.run_lockstep``, the paper's
pipeline, W4A8, 100 candidates, 3 rounds, first and last layer in float): at every quantized
layer both pipelines run on the layer's input and float output in that pass, and the layer
keeps the paper's result, so both see the same inputs everywhere. Per layer: the layer-output
error (Euclidean, Eq. 6) of each, their ratio (alternate / paper; < 1: the alternation is
better), the alternations done and both times. Writes DIR/alternate-<model>.{csv,md}; the CSV
resumes (a rerun computes only the missing tile/seed passes).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness import Bench, common_args, log, pm
from pimsim.calibrate import resolve_float_layers, run_lockstep
from pimsim.ptqsl import ptqsl_method
from pimsim.quant import Granularity

PARAMS = {"candidates": 100, "rounds": 3, "alpha": 0.5, "beta": 1.2, "metric": "euclidean"}
FIELDS = ["model", "tile", "alternate", "seed", "layer", "err_paper", "err_alternate", "ratio",
          "alternations", "paper_s", "alternate_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--tiles", nargs="+", default=["16x36", "4x144"])
    ap.add_argument("--alternate", type=int, default=5)
    common_args(ap, seeds=(0, 1, 2), limit=False)
    args = ap.parse_args(argv)
    bench = Bench(args)
    prep = bench.prepare(args.model)
    net = prep.net
    res = bench.results(f"alternate-{args.model}.csv", FIELDS)
    done = {(r["tile"], int(r["seed"])) for r in res.rows()
            if int(r["alternate"]) == args.alternate}
    keep = resolve_float_layers(net, "auto")
    todo = [l.name for l in net.layers if l.name not in keep]
    for tile in args.tiles:
        r_, c_ = (int(v) for v in tile.split("x"))
        gran = Granularity.tile(r_, c_)
        for seed in args.seeds:
            if (tile, seed) in done:
                continue
            calib = bench.calibration(prep, seed)
            for l in net.layers:
                l.clear_quant()
            rows = []

            def visit(layer, x, t):
                t0 = time.perf_counter()
                qa = ptqsl_method(layer, x, t, gran, 4, 8, {**PARAMS, "alternate": args.alternate})
                ta = time.perf_counter() - t0
                t0 = time.perf_counter()
                qp = ptqsl_method(layer, x, t, gran, 4, 8, PARAMS)
                tp = time.perf_counter() - t0
                rows.append({"model": args.model, "tile": tile, "alternate": args.alternate,
                             "seed": seed, "layer": layer.name,
                             "err_paper": f"{qp.info['err']:.8g}",
                             "err_alternate": f"{qa.info['err']:.8g}",
                             "ratio": f"{qa.info['err'] / qp.info['err']:.6f}",
                             "alternations": qa.info["alternations"],
                             "paper_s": f"{tp:.2f}", "alternate_s": f"{ta:.2f}"})
                layer.set_quant(qp)
                layer.mode = "fake"
            run_lockstep(net, calib, {n: visit for n in todo}, targets=set(todo))
            for row in rows:
                res.append({"point": f"{tile}/alt{args.alternate}/seed={seed}/{row['layer']}",
                            **row})
            r = np.array([float(x["ratio"]) for x in rows])
            log(f"{tile} seed {seed}: median ratio {np.median(r):.4f}, max {r.max():.4f}, "
                f"min {r.min():.4f}")
    bench.write_md(f"alternate-{args.model}.md", markdown(res.rows(), args.model), rows=res.rows())
    return 0


def markdown(rows, model) -> list[str]:
    md = [f"# Alternating searches vs the paper's pipeline: {model}, W4A8", "",
          "Per quantized layer, on the same input and float target: layer-output error of "
          "`quant.search.alternate` = N over the paper's 4-step pipeline (ratio < 1: the "
          "alternation is better); 128 calibration images, 100 candidates, 3 rounds; "
          "seeds: quant.seed of the calibration images.", "",
          "| tile | N | seeds | layers | median ratio | max ratio | min ratio | layers better "
          "| layers worse | paper s (sum) | alternate s (sum) |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["tile"], int(r["alternate"])), []).append(r)
    for (tile, n), rs in sorted(groups.items()):
        ratio = np.array([float(r["ratio"]) for r in rs])
        seeds = sorted({int(r["seed"]) for r in rs})
        ps = [sum(float(r["paper_s"]) for r in rs if int(r["seed"]) == s) for s in seeds]
        als = [sum(float(r["alternate_s"]) for r in rs if int(r["seed"]) == s) for s in seeds]
        md.append(f"| {tile} | {n} | {', '.join(map(str, seeds))} | {len(rs)} | "
                  f"{np.median(ratio):.4f} | {ratio.max():.4f} | {ratio.min():.4f} | "
                  f"{int((ratio < 1).sum())} | {int((ratio > 1).sum())} | "
                  f"{pm(ps, scale=1.0, digits=1)} | {pm(als, scale=1.0, digits=1)} |")
    md.append("")
    md.append("Times are per calibration pass (sum over layers, mean ± sd over seeds), measured "
              "while other benchmarks shared the machine: compare them within a row only.")
    return md


if __name__ == "__main__":
    raise SystemExit(main())
