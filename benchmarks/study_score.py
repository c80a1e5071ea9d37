"""How well do the reordering searches' scores track accuracy? (issue 17, part 2)

    python benchmarks/study_score.py [--model resnet20] [--wbits 4] [--n 20] [--seeds 0]
        [--limit N] [--threads T] [--out DIR]

At ResNet-20 W4A8 Method 2 r = m = 4 (the paper's reordering point), for a set of complete
channel orders -- the identity, ``--n`` seeded random joint orders (sample k = the orders of
``pimsim run --set reorder.method=random --set reorder.seed=k``), and the orders the ``cluster``
and ``evolution`` searches chose at that calibration seed (benchmarks/results/
reorder-orders-<model>.json, when present) -- the network is put in that order and scored
segment by segment exactly as the searches see it (``search_segments`` with a chooser that
returns the given orders: each segment's scorers are built with the segments before it at the
given orders and calibrated): ``gram``, the evolutionary search's error estimate (minus its
score: the sum over the segment's layers of Algorithm 1's layer-output error from Gram
statistics, upstream layers at the identity-order calibration), and ``output``, the
segment calibrated for real at those orders and the error of the next layer's output
(``reorder.score: output``). Then the network is calibrated at those orders (PTQ-SL, the
search's own final calibration) and top-1 is measured on the test set (fake path).

One CSV row per (seed, order) appended as it finishes (resumable); the markdown gives, per
calibration seed, Spearman's rank correlation of each score with top-1 over all orders and
over the random orders alone (a score that tracks accuracy has a strongly negative one: lower
error, higher top-1). Writes DIR/score-study-<model>-W<b>A8-m2r4[-limit<N>].{csv,md}.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from tqdm.auto import tqdm

from harness import Bench, common_args, log, mean_sd
from pimsim.quant import Granularity
from pimsim.reorder import Reorderer
from pimsim.reorder.search import search_segments
from pimsim.simulate import calibration_params, evaluate

GRAN = Granularity.split(4, 4)
FIELDS = ["point", "model", "wbits", "abits", "order", "seed", "gram", "output", "top1",
          "images", "search_s"]


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for x in np.unique(v):                  # ties: their mean rank
            m = v == x
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def fixed_orders(target: dict, record: list):
    """A ``search_segments`` chooser that returns ``target``'s orders for the segment and
    records both scores of them (``gram``: ``sc.score``; ``output``: ``measure``)."""
    def choose(sc, sizes, base, rng, bar, measure):
        o = {g: np.asarray(target[g], dtype=np.int64) for g in sizes}
        s = float(sc.score(o))                      # minus the sum of layer errors
        out = float(measure(o))                     # an error
        record.append((-s, out))
        bar.update(1)
        return {"orders": o, "identity_score": float(sc.score(base)), "score": s,
                "evaluations": 1, "history": [s]}
    return choose


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--n", type=int, default=20, help="random joint orders")
    common_args(ap, seeds=(0,))
    args = ap.parse_args(argv)
    bench = Bench(args)
    prep = bench.prepare(args.model)
    cfg = prep.cfg
    if args.wbits != 4 or args.abits != 8:
        log("note: the cluster / evolution orders are looked up for these bits")
    images, labels = bench.test_set(prep)
    suffix = f"-limit{args.limit}" if args.limit else ""
    name = f"score-study-{args.model}-W{args.wbits}A{args.abits}-m2r4{suffix}"
    res = bench.results(f"{name}.csv", FIELDS)
    saved_path = bench.out / f"reorder-orders-{args.model}{suffix}.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    net = prep.net
    ro = Reorderer(net)
    key = f"W{args.wbits}A{args.abits}-m2r4"
    todo = []
    for seed in args.seeds:
        sfx = f"-seed{seed}" if seed else ""
        sets = [("identity", ro.identity())]
        sets += [(f"random-{k}", ro.random_orders(np.random.default_rng(k)))
                 for k in range(args.n)]
        for label, k in (("cluster", f"{key}-cluster{sfx}"), ("evolution", f"{key}{sfx}")):
            if k in saved:
                sets.append((label, {g: np.asarray(v) for g, v in saved[k].items()}))
            else:
                log(f"no {label} orders for seed {seed} in {saved_path.name} ({k}): skipped")
        todo += [(seed, label, o) for label, o in sets
                 if f"seed={seed}/{label}" not in res.file.done]
    log(f"{len(res.file.done)} points done, {len(todo)} to compute -> {res.path}")
    for seed, label, orders in tqdm(todo, desc="score study", unit="order"):
        calib = bench.calibration(prep, seed)
        ro.reset()
        rec: list = []
        r = search_segments(net, calib, GRAN, args.wbits, args.abits, fixed_orders(orders, rec),
                            1, "ptqsl", calibration_params(cfg), "auto", 0, False, ro,
                            False, cfg["quant.act_signed"], "fixed", "segment")
        net.set_mode("fake")
        top1, _ = evaluate(net, images, labels, 500, progress=False)
        res.append({"point": f"seed={seed}/{label}", "model": args.model, "wbits": args.wbits,
                    "abits": args.abits, "order": label, "seed": seed,
                    "gram": f"{sum(s for s, _ in rec):.6g}",
                    "output": f"{sum(o for _, o in rec):.6g}",
                    "top1": f"{top1:.4f}", "images": len(images),
                    "search_s": f"{r['search_s']:.1f}"})
    ro.reset()
    rows = res.rows()
    md = [f"# Do the reordering scores track accuracy? {args.model} W{args.wbits}A{args.abits} "
          "Method 2 r = m = 4", "",
          f"Top-1 (%) on {len(images)} CIFAR-10 test images (fake path) after PTQ-SL at each "
          "order, and the two search scores of the same orders (sums over segments; lower = "
          "smaller estimated error). Spearman's rho of each score with top-1: a score that "
          "tracks accuracy has rho near -1.", "",
          "| seed | orders | n | top-1 mean ± sd | rho(gram, top-1) | rho(output, top-1) |",
          "|---|---|---:|---:|---:|---:|"]
    for seed in sorted({int(r["seed"]) for r in rows}):
        rs = [r for r in rows if int(r["seed"]) == seed]
        for what, sub in (("all", rs), ("random only",
                                        [r for r in rs if r["order"].startswith("random-")])):
            if len(sub) < 3:
                continue
            t = [100 * float(r["top1"]) for r in sub]
            g = [float(r["gram"]) for r in sub]
            o = [float(r["output"]) for r in sub]
            m, sd = mean_sd(t)
            md.append(f"| {seed} | {what} | {len(sub)} | {m:.2f} ± {sd:.2f} | "
                      f"{spearman(g, t):+.2f} | {spearman(o, t):+.2f} |")
        md += ["", "| order | gram | output | top-1 |", "|---|---:|---:|---:|"]
        md += [f"| {r['order']} | {float(r['gram']):.4g} | {float(r['output']):.4g} | "
               f"{100 * float(r['top1']):.2f} |"
               for r in sorted(rs, key=lambda r: float(r["gram"]))]
    bench.write_md(f"{name}.md", md, rows=res.rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
