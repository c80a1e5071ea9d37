"""The paper's granularity study (its Tables 1-4) on a real CIFAR ResNet.

    python benchmarks/bench_granularity.py --model resnet20 [--wbits 4 --abits 8]
        [--calibration ptqsl] [--limit N] [--grids method1 method2 extremes] [--out DIR]

Method 1: every layer uses the same r x c (r in 16,8,4,2,1 x c in 576,288,144,72,36);
Method 2: r rows, c = ceil(K/m) (r in 16,8,4,2,1 x m in 1,2,4,8,16); plus channelwise and
layerwise. Each point: calibrate (128 images of data_batch_1, seed 0; first and last layer in
float), then top-1 on the test set with the fake-quant path (which the tests show agrees with
the exact kernel path). One CSV row per point is appended as soon as it finishes; a rerun only
computes the points missing from the CSV, so an interrupted study loses nothing. Writes
DIR/granularity-<model>-W<b>A<b>-<calibration>.{csv,md} and a heatmap PNG per grid.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pimsim.calibrate import calibrate
from pimsim.config import validate
from pimsim.data import load_cifar10
from pimsim.quant import Granularity
from pimsim.simulate import calibration_batch, evaluate, prepare, set_threads

RESULTS = Path(__file__).resolve().parent / "results"
R_GRID = (16, 8, 4, 2, 1)
C_GRID = (576, 288, 144, 72, 36)
M_GRID = (1, 2, 4, 8, 16)
FIELDS = ["model", "wbits", "abits", "calibration", "method", "r", "c", "m", "scales", "top1",
          "calibration_s", "images"]


def grid_points(grids) -> list[tuple[str, int | None, int | None, int | None]]:
    """(method, r, c, m) of every point of the chosen grids."""
    pts = []
    if "extremes" in grids:
        pts += [("channelwise", None, None, None), ("layerwise", None, None, None)]
    if "method1" in grids:
        pts += [("method1", r, c, None) for r in R_GRID for c in C_GRID]
    if "method2" in grids:
        pts += [("method2", r, None, m) for r in R_GRID for m in M_GRID]
    return pts


def granularity(method, r, c, m) -> Granularity:
    if method == "channelwise":
        return Granularity.channelwise()
    if method == "layerwise":
        return Granularity.layerwise()
    return Granularity.tile(r, c) if method == "method1" else Granularity.split(r, m)


def _s(v) -> str:
    """A CSV cell as text: None is the empty cell."""
    return "" if v is None else str(v)


def _key(row) -> tuple:
    return (row["method"], _s(row["r"]), _s(row["c"]), _s(row["m"]))


def _point_key(method, r, c=None, m=None) -> tuple:
    return (method, _s(r), _s(c), _s(m))


def read_done(path: Path) -> dict:
    if not path.exists():
        return {}
    with path.open() as f:
        return {_key(row): row for row in csv.DictReader(f)}


def table(rows: dict, method: str, cols, col_name: str) -> list[str]:
    """A markdown table shaped like the paper's: rows r, columns c (Method 1) or m (Method 2)."""
    head = f"| r \\ {col_name} | " + " | ".join(str(c) for c in cols) + " |"
    out = [head, "|---" * (len(cols) + 1) + "|"]
    for r in R_GRID:
        cells = []
        for c in cols:
            key = _point_key(method, r, *((c, None) if method == "method1" else (None, c)))
            cells.append(f"{100 * float(rows[key]['top1']):.2f}" if key in rows else "-")
        out.append(f"| {r} | " + " | ".join(cells) + " |")
    return out


def findings(rows: dict) -> list[str]:
    """The paper's two Method 1 findings, computed: correlation of top-1 with log2(r*c), and
    how often fewer rows win at a fixed r*c."""
    m1 = [(int(v["r"]), int(v["c"]), float(v["top1"])) for k, v in rows.items()
          if k[0] == "method1"]
    if len(m1) < 3:
        return []
    size = np.log2([r * c for r, c, _ in m1])
    acc = np.array([t for _, _, t in m1])
    pearson = float(np.corrcoef(size, acc)[0, 1])
    wins = total = 0
    for i, (ri, ci, ti) in enumerate(m1):
        for rj, cj, tj in m1[i + 1:]:
            if ri * ci == rj * cj and ri != rj:
                total += 1
                wins += (ti > tj) == (ri < rj)
    out = [f"Method 1: Pearson correlation of top-1 with log2(r*c): **{pearson:.2f}** "
           f"(paper: -0.92 to -0.95 on ImageNet)."]
    if total:
        out.append(f"At equal r*c, the tile with fewer rows is more accurate in {wins} of {total} "
                   "pairs (paper: fewer rows is better).")
    return out + [""]


def heatmap(rows: dict, method: str, cols, col_name: str, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = np.full((len(R_GRID), len(cols)), np.nan)
    for i, r in enumerate(R_GRID):
        for j, c in enumerate(cols):
            key = _point_key(method, r, *((c, None) if method == "method1" else (None, c)))
            if key in rows:
                a[i, j] = 100 * float(rows[key]["top1"])
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
    fig.colorbar(im, ax=ax, label="top-1 (%)")
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
                    choices=["extremes", "method1", "method2"])
    ap.add_argument("--limit", type=int, default=None, help="first N test images only")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch/Numba threads (default 0 = all cores; 1 on a shared machine)")
    args = ap.parse_args(argv)

    cfg = validate({"model": {"name": args.model},
                    "quant": {"weight_bits": args.wbits, "act_bits": args.abits}})
    set_threads(args.threads)
    prep = prepare(cfg)
    images, labels = load_cifar10("test", prep.data_dir, limit=args.limit)
    calib = calibration_batch(prep)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"granularity-{args.model}-W{args.wbits}A{args.abits}-{args.calibration}"
    csv_path = out / f"{stem}.csv"
    done = read_done(csv_path)
    todo = [p for p in grid_points(args.grids) if _point_key(*p) not in done]
    print(f"{len(done)} points done, {len(todo)} to compute -> {csv_path}", file=sys.stderr)
    net = prep.net
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            w.writeheader()
        for method, r, c, m in tqdm(todo, desc=stem, unit="point"):
            gran = granularity(method, r, c, m)
            t0 = time.perf_counter()
            calibrate(net, calib, gran, args.wbits, args.abits, method=args.calibration,
                      progress=False)
            calib_s = time.perf_counter() - t0
            net.set_mode("fake")
            top1, _ = evaluate(net, images, labels, 500, progress=False)
            row = {"model": args.model, "wbits": args.wbits, "abits": args.abits,
                   "calibration": args.calibration, "method": method, "r": r, "c": c, "m": m,
                   "scales": sum(l.quant.grid.n_tiles for l in net.quantized_layers),
                   "top1": f"{top1:.4f}", "calibration_s": f"{calib_s:.2f}",
                   "images": len(images)}
            w.writerow(row)
            f.flush()
            done[_key(row)] = {k: _s(v) for k, v in row.items()}
    rows = done
    title = f"{args.model} W{args.wbits}A{args.abits} {args.calibration}"
    md = [f"# Granularity study: {title}", "",
          f"Top-1 (%) on {len(images)} CIFAR-10 test images; {cfg['quant.calib_images']} "
          "calibration images; first and last layer in float.", ""]
    for method, cols, name in (("method1", C_GRID, "c"), ("method2", M_GRID, "m")):
        if any(k[0] == method for k in rows):
            md += [f"## {'Method 1: r x c' if method == 'method1' else 'Method 2: r x ceil(K/m)'}",
                   ""] + table(rows, method, cols, name) + [""]
            heatmap(rows, method, cols, name, f"{title}: {method}", out / f"{stem}-{method}.png")
    md += findings(rows)
    extra = [(k[0], rows[k]) for k in rows if k[0] in ("channelwise", "layerwise")]
    if extra:
        md += ["| granularity | scales | top-1 |", "|---|---:|---:|"]
        md += [f"| {name} | {row['scales']} | {100 * float(row['top1']):.2f} |" for name, row in extra]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
