"""The random-order study (the paper's Figure 4): accuracy over random channel orders, joint and
independent reordering, at a granularity where the order matters.

    python benchmarks/bench_random_orders.py [--model resnet20] [--n 20] [--wbits 4 --abits 8]
        [--r 4 --m 4] [--limit N] [--threads T] [--out DIR]

Sample k (seed k) of ``joint`` gives every free permutation group of the traced network the
order ``Reorderer.random_orders(numpy.random.default_rng(k))`` (exactly what
``pimsim run --set reorder.method=random --set reorder.seed=k`` applies) and calibrates the
permuted float network. Sample k of ``independent`` gives every quantized layer its own random
row order and input-channel order (``random_independent_orders``, ``default_rng(k)``; runtime
gathers around each layer). Plus the identity order. Each point: PTQ-SL calibration (128
images of data_batch_1, seed 0; Method 2 r x ceil(K/m); first and last layer in float), then
top-1 with the fake-quant path. One CSV row per point (``seed=0/<kind>/sample=<k>``), appended
as it finishes through benchmarks/harness.py (with its provenance columns); a rerun computes only
the missing points. Writes DIR/random-orders-<model>-W<b>A<b>-r<r>m<m>[-limit<N>].{csv,md,png}
(default DIR: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from harness import Bench, common_args, log
from pimsim.calibrate import calibrate, resolve_float_layers
from pimsim.quant import Granularity
from pimsim.reorder import Reorderer, independent_network, random_independent_orders
from pimsim.simulate import evaluate

FIELDS = ["model", "wbits", "abits", "granularity", "kind", "sample", "top1", "calibration_s",
          "images"]
KINDS = ("identity", "joint", "independent")
SEED = 0          # quant.seed of the calibration draw (one draw for every order)


def stem_of(model, wbits, abits, r, m, limit) -> str:
    return f"random-orders-{model}-W{wbits}A{abits}-r{r}m{m}" + (f"-limit{limit}" if limit else "")


def point_name(seed, kind, sample) -> str:
    return f"seed={seed}/{kind}/sample={sample}"


def by_point(rows) -> dict:
    """{(kind, sample): row} of the CSV rows."""
    return {(row["kind"], int(row["sample"])): row for row in rows}


def summary(rows: dict, title: str, n_images: int) -> list[str]:
    md = [f"# Random channel orders: {title}", "",
          f"Top-1 (%) on {n_images} CIFAR-10 test images, PTQ-SL calibration; first and last "
          "layer in float.", "",
          "| order | samples | mean | std | min | max |", "|---|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        acc = np.array([100 * float(v["top1"]) for k, v in rows.items() if k[0] == kind])
        if len(acc):
            md.append(f"| {kind} | {len(acc)} | {acc.mean():.2f} | {acc.std():.2f} | "
                      f"{acc.min():.2f} | {acc.max():.2f} |")
    joint = [(float(v["top1"]), k[1]) for k, v in rows.items() if k[0] == "joint"]
    if joint:
        best = max(joint)
        md += ["", f"Best joint order: seed {best[1]} ({100 * best[0]:.2f}%), reproduced by "
               f"`pimsim run --set reorder.method=random --set reorder.seed={best[1]}`."]
    return md


def plot(rows: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = {k: [100 * float(v["top1"]) for kk, v in rows.items() if kk[0] == k]
            for k in ("joint", "independent")}
    kinds = [k for k in data if len(data[k]) >= 1]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    if kinds:
        vals = [data[k] for k in kinds]
        if all(len(v) >= 2 for v in vals):
            ax.violinplot(vals, positions=range(1, len(kinds) + 1), showmedians=True)
        rng = np.random.default_rng(0)
        for i, v in enumerate(vals, 1):
            ax.scatter(i + rng.uniform(-0.06, 0.06, len(v)), v, s=12, color="k", zorder=3)
        ax.set_xticks(range(1, len(kinds) + 1), [f"{k}\n(n={len(data[k])})" for k in kinds])
    ident = [100 * float(v["top1"]) for k, v in rows.items() if k[0] == "identity"]
    if ident:
        ax.axhline(ident[0], color="tab:red", ls="--", label=f"identity order {ident[0]:.2f}%")
        ax.legend(loc="lower right")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--n", type=int, default=20, help="random orders per kind")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--r", type=int, default=4, help="rows per sub-matrix (Method 2)")
    ap.add_argument("--m", type=int, default=4, help="horizontal splits (Method 2)")
    common_args(ap, seeds=None)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")

    bench = Bench(args)
    prep = bench.prepare(args.model, weight_bits=args.wbits, act_bits=args.abits)
    cfg = prep.cfg
    images, labels = bench.test_set(prep)
    calib = bench.calibration(prep, SEED)
    gran = Granularity.split(args.r, args.m)
    stem = stem_of(args.model, args.wbits, args.abits, args.r, args.m, args.limit)
    res = bench.results(f"{stem}.csv", FIELDS)
    points = [("identity", 0)] + [(k, s) for s in range(args.n) for k in ("joint", "independent")]
    todo = [p for p in points if point_name(SEED, *p) not in res]
    log(f"{len(res.file.done)} points done, {len(todo)} to compute -> {res.path}")
    net = prep.net
    ro = Reorderer(net)
    quantized = [l.name for l in net.layers
                 if l.name not in resolve_float_layers(net, cfg["quant.float_layers"])]
    for kind, sample in tqdm(todo, desc=stem, unit="point"):
        ro.reset()
        target = net
        if kind == "joint":
            ro.set_orders(ro.random_orders(np.random.default_rng(sample)))
        elif kind == "independent":
            target = independent_network(
                net, random_independent_orders(net, quantized, np.random.default_rng(sample)))
        t0 = time.perf_counter()
        calibrate(target, calib, gran, args.wbits, args.abits, method="ptqsl", progress=False)
        calib_s = time.perf_counter() - t0
        target.set_mode("fake")
        top1, _ = evaluate(target, images, labels, 500, progress=False)
        res.append({"point": point_name(SEED, kind, sample), "model": args.model,
                    "wbits": args.wbits, "abits": args.abits, "granularity": gran.label(),
                    "kind": kind, "sample": sample, "seed": SEED, "top1": f"{top1:.4f}",
                    "calibration_s": f"{calib_s:.2f}", "images": len(images)})
    ro.reset()
    done = by_point(res.rows())
    title = f"{args.model} W{args.wbits}A{args.abits} Method 2 r={args.r} m={args.m}"
    plot(done, f"{title}, {len(images)} test images", bench.out / f"{stem}.png")
    bench.write_md(f"{stem}.md", summary(done, title, len(images)), rows=res.rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
