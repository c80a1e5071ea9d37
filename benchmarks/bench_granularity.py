"""The paper's granularity study (its Tables 1-4) on a real CIFAR ResNet, over calibration seeds.

    python benchmarks/bench_granularity.py --model resnet20 [--wbits 4 --abits 8]
        [--calibration ptqsl] [--seeds 0 1 2] [--limit N] [--grids method1 method2 extremes]
        [--threads T] [--out DIR]

Method 1: every layer uses the same r x c (r in 16,8,4,2,1 x c in 576,288,144,72,36);
Method 2: r rows, c = ceil(K/m) (r in 16,8,4,2,1 x m in 1,2,4,8,16); ``diagonal``: its m = r
points only (as many scales as channelwise); plus channelwise and layerwise (``extremes``). Each point and seed: calibrate (128 images of data_batch_1 drawn with ``quant.seed``
= the seed; first and last layer in float), then top-1 on the test set with the fake-quant path
(which the tests show agrees with the exact kernel path). One CSV row per point and seed is
appended as soon as it finishes (benchmarks/harness.py); a rerun only computes what is missing.
Writes DIR/granularity-<model>-W<b>A<b>-<calibration>.{csv,md} (tables of mean ± sd over the
seeds, the paper's findings per seed and over seeds, wins / ties / losses) and a heatmap PNG of
the seed means per grid.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from tqdm.auto import tqdm

from harness import Bench, common_args, granularity, log, mean_sd, pm

R_GRID = (16, 8, 4, 2, 1)
C_GRID = (576, 288, 144, 72, 36)
M_GRID = (1, 2, 4, 8, 16)
FIELDS = ["model", "wbits", "abits", "calibration", "method", "r", "c", "m", "seed", "scales",
          "top1", "calibration_s", "images"]


def grid_points(grids) -> list[tuple[str, int | None, int | None, int | None]]:
    """(method, r, c, m) of every point of the chosen grids."""
    pts = []
    if "extremes" in grids:
        pts += [("channelwise", None, None, None), ("layerwise", None, None, None)]
    if "method1" in grids:
        pts += [("method1", r, c, None) for r in R_GRID for c in C_GRID]
    if "method2" in grids:
        pts += [("method2", r, None, m) for r in R_GRID for m in M_GRID]
    elif "diagonal" in grids:
        pts += [("method2", r, None, r) for r in R_GRID]
    return pts


def _s(v) -> str:
    """A CSV cell as text: None is the empty cell."""
    return "" if v is None else str(v)


def point_name(seed, method, r=None, c=None, m=None) -> str:
    return f"seed={seed}/{method}/r={_s(r)}/c={_s(c)}/m={_s(m)}"


def _gkey(row) -> tuple:
    """A row's granularity, seeds aside: (method, r, c, m) as CSV text."""
    return (row["method"], _s(row["r"]), _s(row["c"]), _s(row["m"]))


def by_point(rows) -> dict:
    """{(method, r, c, m): {seed: top1}} of the CSV rows."""
    out = defaultdict(dict)
    for row in rows:
        out[_gkey(row)][int(row["seed"])] = float(row["top1"])
    return out


def _cell_key(method, r, col):
    return (method, _s(r), *((_s(col), "") if method == "method1" else ("", _s(col))))


def table(acc: dict, method: str, cols, col_name: str) -> list[str]:
    """A markdown table shaped like the paper's: rows r, columns c (Method 1) or m (Method 2);
    cells: top-1 mean ± sd over the seeds; a cell measured on fewer seeds than the table's
    most names them (``(seed 0)``)."""
    head = f"| r \\ {col_name} | " + " | ".join(str(c) for c in cols) + " |"
    out = [head, "|---" * (len(cols) + 1) + "|"]
    most = max((len(acc.get(_cell_key(method, r, c), {})) for r in R_GRID for c in cols), default=0)

    def cell(v: dict) -> str:
        if v and len(v) < most:
            return f"{pm(v.values())} (seed {', '.join(map(str, sorted(v)))})"
        return pm(v.values())

    for r in R_GRID:
        cells = [cell(acc.get(_cell_key(method, r, c), {})) for c in cols]
        out.append(f"| {r} | " + " | ".join(cells) + " |")
    return out


def fewer_rows(m1: dict, seeds) -> dict:
    """Pairs at equal r*c with different r: per seed, (wins, ties, losses) of the tile with
    fewer rows (a tie is a tie: the same number of test images right); over seeds, pairs whose
    mean difference exceeds its seed-to-seed sd (``wins_beyond_sd`` / ``losses_beyond_sd``)."""
    pts = sorted(m1)
    pairs = [(a, b) for i, a in enumerate(pts) for b in pts[i + 1:]
             if a[0] * a[1] == b[0] * b[1] and a[0] != b[0]]
    per_seed = {}
    for s in seeds:
        w = t = l = 0
        for a, b in pairs:
            few, many = (a, b) if a[0] < b[0] else (b, a)
            d = m1[few][s] - m1[many][s]
            if abs(d) < 1e-9:
                t += 1
            elif d > 0:
                w += 1
            else:
                l += 1
        per_seed[s] = (w, t, l)
    beyond_w = beyond_l = 0
    if len(seeds) > 1:
        for a, b in pairs:
            few, many = (a, b) if a[0] < b[0] else (b, a)
            m, sd = mean_sd([m1[few][s] - m1[many][s] for s in seeds])
            beyond_w += m > sd
            beyond_l += -m > sd
    return {"pairs": len(pairs), "per_seed": per_seed, "wins_beyond_sd": beyond_w,
            "losses_beyond_sd": beyond_l}


def findings(acc: dict, seeds) -> list[str]:
    """The paper's findings, computed per seed and summarized over seeds: Pearson correlation of
    Method 1 top-1 with log2(r*c); fewer rows at equal r*c (wins / ties / losses); Method 2 with
    m = r against channelwise."""
    m1 = {(int(k[1]), int(k[2])): v for k, v in acc.items() if k[0] == "method1"}
    all_seeds = seeds
    seeds = [s for s in all_seeds if all(s in v for v in m1.values())]   # seeds with every point
    out = []
    full = len(R_GRID) * len(C_GRID)
    if m1 and len(m1) < full:
        out.append(f"Method 1 grid incomplete ({len(m1)} of {full} points): its findings (Pearson "
                   "correlation, fewer rows at equal r*c) are computed once the grid is complete.")
    elif m1 and not seeds:
        out.append("Method 1 grid: no seed has every point yet; findings wait for one.")
    if len(m1) == full and seeds:
        size = np.log2([r * c for r, c in m1])
        rs = [float(np.corrcoef(size, [m1[p][s] for p in m1])[0, 1]) for s in seeds]
        out.append(f"Method 1: Pearson correlation of top-1 with log2(r*c): **{pm(rs, 1)}** "
                   f"over seeds {', '.join(map(str, seeds))} (per seed: "
                   f"{', '.join(f'{r:.2f}' for r in rs)}; paper: -0.92 to -0.95 on ImageNet).")
        fr = fewer_rows(m1, seeds)
        per = "; ".join(f"seed {s}: {w} / {t} / {l}" for s, (w, t, l) in fr["per_seed"].items())
        out.append(f"At equal r*c, the tile with fewer rows: wins / ties / losses of {fr['pairs']} "
                   f"pairs: {per} (paper: fewer rows is better).")
        if len(seeds) > 1:
            out.append(f"Over the seeds, fewer rows is ahead by more than the seed-to-seed sd of "
                       f"the difference in {fr['wins_beyond_sd']} pairs, behind by more than it in "
                       f"{fr['losses_beyond_sd']}, within it in "
                       f"{fr['pairs'] - fr['wins_beyond_sd'] - fr['losses_beyond_sd']}.")
    cw = acc.get(("channelwise", "", "", ""))
    diag = [(r, acc.get(("method2", _s(r), "", _s(r)))) for r in R_GRID if r > 1]
    seeds = [s for s in all_seeds if cw and s in cw and all(v and s in v for _, v in diag)]
    if seeds:
        cells = []
        for r, v in diag:
            d = [v[s] - cw[s] for s in seeds]
            m, sd = mean_sd(d)
            word = ("" if len(d) < 2 else " (within the spread)" if abs(m) <= sd
                    else " (above, beyond the spread)" if m > 0 else " (below, beyond the spread)")
            cells.append(f"r = {r}: {pm(d, signed=True)}{word}")
        out.append(f"Method 2 with m = r (the channelwise number of scales) minus channelwise, "
                   f"points, mean ± sd over seeds {', '.join(map(str, seeds))}: "
                   + "; ".join(cells) + ".")
    return out + [""] if out else []


def heatmap(acc: dict, method: str, cols, col_name: str, title: str, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = np.full((len(R_GRID), len(cols)), np.nan)
    for i, r in enumerate(R_GRID):
        for j, c in enumerate(cols):
            v = acc.get(_cell_key(method, r, c))
            if v:
                a[i, j] = 100 * float(np.mean(list(v.values())))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(a, cmap="viridis")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(R_GRID)), [str(r) for r in R_GRID])
    ax.set_xlabel(col_name)
    ax.set_ylabel("r (rows per sub-matrix)")
    ax.set_title(title)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not np.isnan(a[i, j]):
                ax.text(j, i, f"{a[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="top-1 (%), mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--calibration", default="ptqsl")
    ap.add_argument("--grids", nargs="+", default=["extremes", "method1", "method2"],
                    choices=["extremes", "method1", "method2", "diagonal"],
                    help="point sets; diagonal: the Method 2 points with m = r only")
    ap.add_argument("--report-only", action="store_true",
                    help="compute nothing: write the markdown and heatmaps from the CSV as it is")
    common_args(ap, seeds=(0, 1, 2))
    args = ap.parse_args(argv)

    bench = Bench(args)
    prep = bench.prepare(args.model, weight_bits=args.wbits, act_bits=args.abits)
    stem = f"granularity-{args.model}-W{args.wbits}A{args.abits}-{args.calibration}"
    if args.limit:
        stem += f"-limit{args.limit}"
    res = bench.results(f"{stem}.csv", FIELDS)
    todo = [] if args.report_only else [(s, p) for s in args.seeds for p in grid_points(args.grids)
                                        if point_name(s, *p) not in res]
    log(f"{len(res.file.done)} points done, {len(todo)} to compute -> {res.path}")
    for seed, (method, r, c, m) in tqdm(todo, desc=stem, unit="point"):
        got = bench.point(prep, granularity(method, r, c, m), args.wbits, args.abits,
                          args.calibration, seed)
        res.append({"point": point_name(seed, method, r, c, m), "model": args.model,
                    "wbits": args.wbits, "abits": args.abits, "calibration": args.calibration,
                    "method": method, "r": _s(r), "c": _s(c), "m": _s(m), "seed": seed, **got})
    rows = res.rows()
    acc = by_point(rows)
    seeds = sorted({int(r["seed"]) for r in rows})
    images = sorted({r["images"] for r in rows})
    title = f"{args.model} W{args.wbits}A{args.abits} {args.calibration}"
    md = [f"# Granularity study: {title}", "",
          f"Top-1 (%) on {'/'.join(images)} CIFAR-10 test images, mean ± sd over calibration "
          f"seeds {', '.join(map(str, seeds))} (quant.seed; 128 calibration images of "
          "data_batch_1 each); first and last layer in float; fake-quant path.", ""]
    for method, cols, name in (("method1", C_GRID, "c"), ("method2", M_GRID, "m")):
        if any(k[0] == method for k in acc):
            md += [f"## {'Method 1: r x c' if method == 'method1' else 'Method 2: r x ceil(K/m)'}",
                   ""] + table(acc, method, cols, name) + [""]
            heatmap(acc, method, cols, name, f"{title}: {method}",
                    bench.out / f"{stem}-{method}.png")
    md += findings(acc, seeds)
    extra = [k for k in acc if k[0] in ("channelwise", "layerwise")]
    if extra:
        scales = {_gkey(r): r["scales"] for r in rows}
        md += ["| granularity | scales | top-1 |", "|---|---:|---:|"]
        md += [f"| {k[0]} | {scales[k]} | {pm(acc[k].values())} |" for k in extra]
    bench.write_md(f"{stem}.md", md, rows=res.rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
