"""The equal-budget comparison: channelwise against sub-layerwise quantization with and without
channel reordering (the paper's headline claim).

    python benchmarks/bench_reorder.py --model resnet20 [--wbits 4 3] [--abits 8]
        [--grans channelwise m2r2 m2r4 m2r8 m1] [--orders none evolution cluster random-best]
        [--seeds 0 1 2] [--limit N] [--threads T] [--out DIR]

Granularities: channelwise; Method 2 with m = r for r in 2, 4, 8 (``m2r<r>``: as many scales as
channelwise); Method 1 16 x 36 (``m1``). Orders: ``none`` (identity), ``evolution`` (the
evolutionary search of ``pimsim.reorder.evolve`` with the YAML defaults: population 20,
30 generations, 2 swaps, seed 0), ``cluster`` (``pimsim.reorder.cluster`` with the YAML
defaults: 4 restarts, gram score, seed 0; its search time goes to reorder.json as
``"<model>_cluster_search_s"`` for the default point) and, for m2r4 only, ``random-best``: the joint order of the
random-order study (bench_random_orders.py, same model and bits, full test set unless --limit)
with the best top-1 — picked on the test set, as the paper's "best of the random orders" is.
Channelwise has one row per scale, so the order cannot matter: it is run with ``none`` only.
Each point and calibration seed (``--seeds``: ``quant.seed``, the draw of the 128 calibration
images of data_batch_1 that both the search and the calibration see; the search's own seed stays
``reorder.seed`` = 0): PTQ-SL calibration (first and last layer in float), then top-1 with the
fake-quant path. One CSV row per point and seed, appended as it finishes (benchmarks/harness.py);
a rerun computes only the missing points. The markdown gives mean ± sd over the seeds, and the
gain of reordering as the mean ± sd of the per-seed gains. Writes DIR/reorder-<model>[-limit<N>].{csv,md}, the
chosen orders to DIR/reorder-orders-<model>[-limit<N>].json (key ``W<b>A<b>-<gran>``, with
``-seed<S>`` for seeds other than 0), and the search time of the default point (W4A8, m2r4,
seed 0) to DIR/reorder.json as ``"<model>_search_s"``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import numpy as np
from tqdm.auto import tqdm

from harness import Bench, common_args, log, mean_sd, pm
from pimsim.calibrate import calibrate
from pimsim.config import defaults
from pimsim.quant import Granularity
from pimsim.reorder import Reorderer, cluster, evolve
from pimsim.simulate import calibration_params, evaluate
from pimsim.sweep import read_results

GRANS = {"channelwise": Granularity.channelwise(), "m2r2": Granularity.split(2, 2),
         "m2r4": Granularity.split(4, 4), "m2r8": Granularity.split(8, 8),
         "m1": Granularity.tile(16, 36)}
ORDERS = ("none", "evolution", "cluster", "random-best")
FIELDS = ["model", "wbits", "abits", "granularity", "order", "seed", "scales", "top1", "gain",
          "calibration_s", "search_s", "images", "detail"]
LABELS = {"channelwise": "channelwise", "m2r2": "Method 2, r = m = 2",
          "m2r4": "Method 2, r = m = 4", "m2r8": "Method 2, r = m = 8", "m1": "Method 1, 16 x 36"}


def point_name(seed, wbits, gran, order) -> str:
    return f"seed={seed}/W{wbits}/{gran}/{order}"


def best_random_seed(out, model, wbits, abits, limit):
    """Seed and top-1 of the best joint order of the random-order study, or None."""
    stem = f"random-orders-{model}-W{wbits}A{abits}-r4m4" + (f"-limit{limit}" if limit else "")
    path = out / f"{stem}.csv"
    rows = [r for r in read_results(path)[0] if r["kind"] == "joint"] if path.is_file() else []
    if not rows:
        return None
    best = max(rows, key=lambda r: (float(r["top1"]), -int(r["sample"])))
    return int(best["sample"]), float(best["top1"])


def points(seeds, wbits_list, grans, orders):
    pts = []
    for s in seeds:
        for wb in wbits_list:
            for g in grans:
                for o in orders:
                    if g == "channelwise" and o != "none":
                        continue                   # one scale per row: the order cannot matter
                    if o == "random-best" and (g != "m2r4" or s != 0):
                        continue                   # the random-order study used seed 0
                    pts.append((s, wb, g, o))
    return pts


def verdict(diffs) -> str:
    """How a difference over seeds reads: a gain or a loss only beyond its seed-to-seed sd."""
    m, sd = mean_sd(diffs)
    if len(diffs) < 2:
        return "one seed: no spread to judge it by"
    if abs(m) <= sd:
        return "within the seed-to-seed spread"
    return "a gain beyond the spread" if m > 0 else "a loss beyond the spread"


def markdown(rows: list[dict], model: str, rdef: dict) -> list[str]:
    acc = defaultdict(dict)                      # (wbits, gran, order) -> {seed: top1}
    scales = {}
    for r in rows:
        acc[(int(r["wbits"]), r["granularity"], r["order"])][int(r["seed"])] = float(r["top1"])
        scales[r["granularity"]] = r["scales"]
    wbits_list = sorted({k[0] for k in acc}, reverse=True)
    images = sorted({r["images"] for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})

    def cell(wb, g, o):
        return pm(acc.get((wb, g, o), {}).values())

    def gains(wb, g, other="evolution"):
        a, b = acc.get((wb, g, "none"), {}), acc.get((wb, g, other), {})
        return [b[s] - a[s] for s in sorted(set(a) & set(b))]

    md = [f"# Channel reordering, equal budget: {model}", "",
          f"Top-1 (%) on {'/'.join(images)} CIFAR-10 test images, mean ± sd over the calibration "
          f"seeds each cell has (quant.seed; seeds in this file: {', '.join(map(str, seeds))}); "
          "PTQ-SL, 128 calibration images, first and last layer in float; evolution: population "
          f"{rdef['population']}, {rdef['generations']} generations, {rdef['swaps']} swaps, "
          f"search seed {rdef['seed']}. Gain: mean ± sd of the per-seed gains (n = seeds).", ""]
    head, sep = "| granularity | scales |", "|---|---:|"
    for wb in wbits_list:
        head += (f" W{wb} none | W{wb} evolution | W{wb} gain (n) | W{wb} cluster | "
                 f"W{wb} gain (n) | W{wb} random-best |")
        sep += "---:|---:|---:|---:|---:|---:|"
    md += [head, sep]
    for g in GRANS:
        if g not in scales:
            continue
        line = f"| {LABELS[g]} | {scales[g]} |"
        for wb in wbits_list:
            def gain(other):
                gs = gains(wb, g, other)
                if not gs:
                    return "-"
                m, sd = mean_sd([100 * v for v in gs])
                return (f"{m:+.2f} ± {sd:.2f}" if len(gs) > 1 else f"{m:+.2f}") + f" ({len(gs)})"
            line += (f" {cell(wb, g, 'none')} | {cell(wb, g, 'evolution')} | {gain('evolution')}"
                     f" | {cell(wb, g, 'cluster')} | {gain('cluster')}"
                     f" | {cell(wb, g, 'random-best')} |")
        md.append(line)
    md.append("")
    for wb in wbits_list:
        cw = acc.get((wb, "channelwise", "none"), {})
        for g in ("m2r2", "m2r4", "m2r8", "m1"):
            for other in ("evolution", "cluster"):
                gs = gains(wb, g, other)
                if gs:
                    md.append(f"W{wb}A8 {g}: {other} minus identity order "
                              f"{pm(gs, signed=True)} points over {len(gs)} seed(s): "
                              f"{verdict(gs)}.")
            ev, cl = acc.get((wb, g, "evolution"), {}), acc.get((wb, g, "cluster"), {})
            both = sorted(set(ev) & set(cl))
            if both:
                d = [cl[s] - ev[s] for s in both]
                md.append(f"W{wb}A8 {g}: cluster minus evolution {pm(d, signed=True)} points "
                          f"over {len(both)} seed(s): {verdict(d)}.")
            evo = acc.get((wb, g, "evolution"), {})
            both = sorted(set(evo) & set(cw))
            if g != "m1" and both:
                d = [evo[s] - cw[s] for s in both]
                md.append(f"W{wb}A8 {g} with evolution minus channelwise (same number of scales) "
                          f"{pm(d, signed=True)} points over {len(both)} seed(s): {verdict(d)}.")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--wbits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--grans", nargs="+", default=list(GRANS), choices=list(GRANS))
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS))
    ap.add_argument("--population", type=int, default=None, help="default: reorder.population")
    ap.add_argument("--generations", type=int, default=None,
                    help="default: reorder.generations (reorder.json is written only with the "
                         "defaults)")
    ap.add_argument("--report-only", action="store_true",
                    help="compute nothing: write the markdown from the CSV as it is")
    common_args(ap, seeds=(0,))
    args = ap.parse_args(argv)

    rdef = defaults()["reorder"]
    is_default = args.population in (None, rdef["population"]) and \
        args.generations in (None, rdef["generations"])
    rdef["population"] = args.population or rdef["population"]
    rdef["generations"] = rdef["generations"] if args.generations is None else args.generations
    bench = Bench(args)
    prep = bench.prepare(args.model)
    cfg = prep.cfg
    images, labels = bench.test_set(prep)
    out = bench.out
    suffix = f"-limit{args.limit}" if args.limit else ""
    res = bench.results(f"reorder-{args.model}{suffix}.csv", FIELDS)
    orders_path = out / f"reorder-orders-{args.model}{suffix}.json"
    todo = [] if args.report_only else [p for p in points(args.seeds, args.wbits, args.grans,
                                                          args.orders) if point_name(*p) not in res]
    log(f"{len(res.file.done)} points done, {len(todo)} to compute -> {res.path}")
    net = prep.net
    ro = Reorderer(net)
    saved_orders = json.loads(orders_path.read_text()) if orders_path.exists() else {}
    saved_orders.pop("provenance", None)
    top = {(int(r["seed"]), int(r["wbits"]), r["granularity"], r["order"]): float(r["top1"])
           for r in res.rows()}
    for seed, wb, g, o in tqdm(todo, desc=f"reorder {args.model}", unit="point"):
        gran = GRANS[g]
        calib = bench.calibration(prep, seed)
        ro.reset()
        detail, search_s = "", ""
        t0 = time.perf_counter()
        if o in ("cluster", "evolution"):
            if o == "cluster":
                r = cluster(net, calib, gran, wb, args.abits, method="ptqsl",
                            params=calibration_params(cfg), restarts=rdef["restarts"],
                            score=rdef["score"], seed=rdef["seed"], progress=False,
                            reorderer=ro)
                key, prefix, timed = f"W{wb}A{args.abits}-{g}-cluster", "cluster_", True
                conditions = (f"cluster, {rdef['restarts']} restarts, {rdef['score']} score")
            else:
                r = evolve(net, calib, gran, wb, args.abits, method="ptqsl",
                           params=calibration_params(cfg),
                           population=rdef["population"], generations=rdef["generations"],
                           swaps=rdef["swaps"], seed=rdef["seed"], progress=True, reorderer=ro)
                key, prefix, timed = f"W{wb}A{args.abits}-{g}", "", is_default
                conditions = (f"population {rdef['population']}, generations "
                              f"{rdef['generations']}, swaps {rdef['swaps']}")
            search_s = f"{r['search_s']:.1f}"
            gains = [s["score"] - s["identity_score"] for s in r["segments"] if "score" in s]
            detail = f"score gain per segment (sum of layer errors): {sum(gains):.3g}"
            saved_orders[key + (f"-seed{seed}" if seed else "")] = r["orders"]
            bench.write_json(orders_path.name, saved_orders)
            saved_orders.pop("provenance", None)
            if wb == 4 and args.abits == 8 and g == "m2r4" and timed and seed == 0:
                bench.write_json("reorder.json", {
                    f"{args.model}_{prefix}search_s": round(r["search_s"], 1),
                    f"{args.model}_{prefix}search_conditions": (
                        f"W4A8 Method 2 r=m=4, {conditions}, 128 calibration images, "
                        f"{bench.threads} torch/Numba thread(s), {os.cpu_count()} cores, "
                        f"load average at the end {os.getloadavg()[0]:.2f}")}, merge=True)
        else:
            if o == "random-best":
                best = best_random_seed(out, args.model, wb, args.abits, args.limit)
                if best is None:
                    log(f"skipping W{wb} m2r4 random-best: run bench_random_orders.py "
                        f"--model {args.model} --wbits {wb}"
                        + (f" --limit {args.limit}" if args.limit else "") + " first")
                    continue
                ro.set_orders(ro.random_orders(np.random.default_rng(best[0])))
                detail = f"random-order study seed {best[0]}"
            calibrate(net, calib, gran, wb, args.abits, method="ptqsl", progress=False,
                      params=calibration_params(cfg))
        calib_s = time.perf_counter() - t0
        net.set_mode("fake")
        top1, _ = evaluate(net, images, labels, 500, progress=False)
        base = top.get((seed, wb, g, "none"))
        top[(seed, wb, g, o)] = top1
        res.append({"point": point_name(seed, wb, g, o), "model": args.model, "wbits": wb,
                    "abits": args.abits, "granularity": g, "order": o, "seed": seed,
                    "scales": sum(l.quant.grid.n_tiles for l in net.quantized_layers),
                    "top1": f"{top1:.4f}",
                    "gain": "" if base is None or o == "none" else f"{top1 - base:+.4f}",
                    "calibration_s": f"{calib_s:.1f}", "search_s": search_s,
                    "images": len(images), "detail": detail})
    ro.reset()
    bench.write_md(f"reorder-{args.model}{suffix}.md", markdown(res.rows(), args.model, rdef),
                   rows=res.rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
