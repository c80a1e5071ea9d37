"""Variants of the PTQ-SL search against the paper's pipeline: per-layer output error on the
very same layer input and float target, and (``--accuracy``) top-1 over calibration seeds.

    python benchmarks/bench_search.py [--model resnet20] [--tiles 16x36 4x144]
        [--variants alternate5 start-best alpha0.1x300 combined] [--seeds 0 1 2]
        [--accuracy] [--limit N] [--threads T] [--out DIR]

Per-layer part: one calibration pass per tile and seed (``pimsim.calibrate.run_lockstep``,
W4A8, first and last layer in float); at every quantized layer the paper's pipeline and each
variant run on that layer's input and float output, and the layer keeps the paper's result, so
every variant sees the same inputs everywhere. Written: the layer-output error (Euclidean,
Eq. 6) of each, the ratio variant / paper (< 1: the variant is better) and the time.

Accuracy part: the whole network calibrated with each variant (its own inputs downstream) and
evaluated on the test set (fake-quant path), per tile and seed; the difference to the paper's
pipeline is reported as mean ± sd of the per-seed differences.

Writes DIR/search-<model>.{csv,md} and DIR/search-accuracy-<model>.csv; both CSVs resume.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness import Bench, common_args, log, mean_sd, pm
from pimsim.calibrate import resolve_float_layers, run_lockstep
from pimsim.ptqsl import ptqsl_method
from pimsim.quant import Granularity

PAPER = {"candidates": 100, "rounds": 3, "alpha": 0.5, "beta": 1.2, "metric": "euclidean",
         "alternate": 1, "start": "act", "extend": None}
VARIANTS = {
    "paper": {},
    "alternate5": {"alternate": 5},
    "start-best": {"start": "best"},
    "alpha0.1x300": {"alpha": 0.1, "candidates": 300},
    "combined": {"alpha": 0.1, "candidates": 300, "alternate": 5, "start": "best"},
    "extend0.1": {"extend": 0.1},
    "extend0.1-alternate5": {"extend": 0.1, "alternate": 5},
}
FIELDS = ["model", "tile", "variant", "params", "seed", "layer", "err_paper", "err", "ratio",
          "paper_s", "seconds"]
ACC_FIELDS = ["model", "tile", "variant", "params", "seed", "top1", "calibration_s", "images"]


def describe(v: str) -> str:
    return " ".join(f"{k}={val}" for k, val in VARIANTS[v].items()) or "the paper's pipeline"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--tiles", nargs="+", default=["16x36", "4x144"])
    ap.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "paper"],
                    choices=[v for v in VARIANTS if v != "paper"])
    ap.add_argument("--accuracy", action="store_true",
                    help="also calibrate the whole network per variant and measure top-1")
    common_args(ap, seeds=(0, 1, 2))
    args = ap.parse_args(argv)
    bench = Bench(args)
    prep = bench.prepare(args.model)
    net = prep.net
    res = bench.results(f"search-{args.model}.csv", FIELDS)
    keep = resolve_float_layers(net, "auto")
    todo = [l.name for l in net.layers if l.name not in keep]
    for tile in args.tiles:
        r_, c_ = (int(v) for v in tile.split("x"))
        gran = Granularity.tile(r_, c_)
        for seed in args.seeds:
            want = [v for v in args.variants
                    if any(f"{tile}/{v}/seed={seed}/{n}" not in res for n in todo)]
            if not want:
                continue
            calib = bench.calibration(prep, seed)
            for l in net.layers:
                l.clear_quant()
            rows = []

            def visit(layer, x, t):
                t0 = time.perf_counter()
                qp = ptqsl_method(layer, x, t, gran, 4, 8, PAPER)
                tp = time.perf_counter() - t0
                for v in want:
                    t0 = time.perf_counter()
                    q = ptqsl_method(layer, x, t, gran, 4, 8, {**PAPER, **VARIANTS[v]})
                    tv = time.perf_counter() - t0
                    rows.append({"point": f"{tile}/{v}/seed={seed}/{layer.name}",
                                 "model": args.model, "tile": tile, "variant": v,
                                 "params": describe(v), "seed": seed, "layer": layer.name,
                                 "err_paper": f"{qp.info['err']:.8g}",
                                 "err": f"{q.info['err']:.8g}",
                                 "ratio": f"{q.info['err'] / qp.info['err']:.6f}",
                                 "paper_s": f"{tp:.2f}", "seconds": f"{tv:.2f}"})
                layer.set_quant(qp)
                layer.mode = "fake"
                log(f"{tile} seed {seed} {layer.name}: " + ", ".join(
                    f"{r['variant']} {r['ratio']}" for r in rows if r["layer"] == layer.name))
            run_lockstep(net, calib, {n: visit for n in todo}, targets=set(todo))
            for row in rows:
                if row["point"] not in res:
                    res.append(row)
    acc = bench.results(f"search-accuracy-{args.model}.csv", ACC_FIELDS)
    if args.accuracy:
        for tile in args.tiles:
            r_, c_ = (int(v) for v in tile.split("x"))
            for seed in args.seeds:
                for v in ["paper", *args.variants]:
                    point = f"{tile}/{v}/seed={seed}"
                    if point in acc:
                        continue
                    got = bench.point(prep, Granularity.tile(r_, c_), 4, 8, "ptqsl", seed,
                                      params={**PAPER, **VARIANTS[v]})
                    acc.append({"point": point, "model": args.model, "tile": tile,
                                "variant": v, "params": describe(v), "seed": seed,
                                "top1": got["top1"], "calibration_s": got["calibration_s"],
                                "images": got["images"]})
                    log(f"{point}: top-1 {got['top1']} ({got['calibration_s']} s calibration)")
    rows = res.rows() + acc.rows()
    bench.write_md(f"search-{args.model}.md", markdown(res.rows(), acc.rows(), args.model),
                   rows=rows)
    return 0


def verdict(diffs) -> str:
    m, s = mean_sd(diffs)
    if len(diffs) < 3:
        return f"{len(diffs)} seed(s) only"
    if abs(m) <= s:
        return "within the spread"
    return "above, beyond the spread" if m > 0 else "below, beyond the spread"


def markdown(rows, acc_rows, model) -> list[str]:
    md = [f"# PTQ-SL search variants vs the paper's pipeline: {model}, W4A8", "",
          "Per quantized layer, on the same input and float target: layer-output error "
          "(Euclidean, Eq. 6) of each variant over the paper's pipeline (alpha 0.5, beta 1.2, "
          "100 candidates, 3 rounds, activation search first; ratio < 1: the variant is "
          "better); 128 calibration images; seeds: quant.seed of the calibration images.", "",
          "| tile | variant | parameters | layer-seeds | median ratio | max ratio | min ratio "
          "| better | worse | time per pass, paper / variant (s) |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["tile"], r["variant"]), []).append(r)
    for (tile, v), rs in sorted(groups.items()):
        ratio = np.array([float(r["ratio"]) for r in rs])
        seeds = sorted({int(r["seed"]) for r in rs})
        ps = [sum(float(r["paper_s"]) for r in rs if int(r["seed"]) == s) for s in seeds]
        vs = [sum(float(r["seconds"]) for r in rs if int(r["seed"]) == s) for s in seeds]
        md.append(f"| {tile} | {v} | {rs[0]['params']} | {len(rs)} | {np.median(ratio):.4f} | "
                  f"{ratio.max():.4f} | {ratio.min():.4f} | {int((ratio < 1).sum())} | "
                  f"{int((ratio > 1).sum())} | {pm(ps, scale=1.0, digits=1)} / "
                  f"{pm(vs, scale=1.0, digits=1)} |")
    md += ["", "Times are sums over the layers of one pass, mean ± sd over seeds; compare them "
           "within a row (the machine may be shared)."]
    if acc_rows:
        md += ["", "## Top-1 (%), whole network calibrated with each variant", "",
               "| tile | variant | seeds | top-1 | minus paper | verdict | calibration s |",
               "|---|---|---|---:|---:|---|---:|"]
        by = {}
        for r in acc_rows:
            by.setdefault((r["tile"], r["variant"]), {})[int(r["seed"])] = r
        for (tile, v), rs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] != "paper",
                                                                 kv[0][1])):
            seeds = sorted(rs)
            top = [float(rs[s]["top1"]) for s in seeds]
            base = by.get((tile, "paper"), {})
            common = [s for s in seeds if s in base]
            diffs = [100 * (float(rs[s]["top1"]) - float(base[s]["top1"])) for s in common]
            diff = "" if v == "paper" else pm(diffs, scale=1.0, signed=True)
            ver = "" if v == "paper" else verdict(diffs)
            cal = pm([float(rs[s]["calibration_s"]) for s in seeds], scale=1.0, digits=1)
            md.append(f"| {tile} | {v} | {', '.join(map(str, seeds))} | {pm(top)} | {diff} | "
                      f"{ver} | {cal} |")
        md += ["", f"Test images per point: {acc_rows[0]['images']}; differences: mean ± sd of "
               "the per-seed differences, 'within the spread' when |mean| <= sd."]
    return md


if __name__ == "__main__":
    raise SystemExit(main())
