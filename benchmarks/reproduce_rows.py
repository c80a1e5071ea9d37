"""Recompute sampled rows of a committed accuracy table at the current commit and compare.

    python benchmarks/reproduce_rows.py benchmarks/results/<stem>.csv [--per-commit N]
        [--threads T] [--out DIR]

For a table whose rows were computed at several commits (``harness.rows_provenance`` flags it),
this answers the question that matters before its rows are compared: does today's code give the
same numbers? From the rows of every commit other than the current one it takes ``N`` (spread
evenly over that commit's rows in file order), recomputes each exactly as its benchmark computes
a point (``harness.Bench.point``: PTQ-SL / max / mse calibration with the row's seed, top-1 on
the row's number of test images, fake-quant path) and records the stored and the recomputed
top-1. Tables it reads: ``bench_granularity`` (columns method, r, c, m) and ``bench_baselines``
(column granularity). Writes DIR/reproduce-<stem>.{csv,md}; resumable (one row per point).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from tqdm.auto import tqdm

from harness import Bench, common_args, granularity, log

FIELDS = ["source", "row_point", "row_commit", "model", "wbits", "abits", "calibration",
          "granularity", "seed", "images", "top1_stored", "top1_now", "equal"]


def row_granularity(row: dict) -> tuple:
    """``(method, r, c, m)`` of a granularity or baselines row."""
    if "method" in row:
        val = [row.get(k) or None for k in ("r", "c", "m")]
        return (row["method"], *val)
    import bench_baselines
    if row.get("granularity") not in bench_baselines.GRANS:
        raise ValueError(f"row {row.get('point')}: granularity {row.get('granularity')!r} is "
                         f"not one of {sorted(bench_baselines.GRANS)}")
    return bench_baselines.GRANS[row["granularity"]]


def pick(rows: list[dict], head: str, per_commit: int) -> list[dict]:
    """Up to ``per_commit`` rows of each commit other than ``head``, evenly spread."""
    by = {}
    for r in rows:
        if r["commit"] != head:
            by.setdefault(r["commit"], []).append(r)
    out = []
    for c in sorted(by):
        rs = by[c]
        n = min(per_commit, len(rs))
        out += [rs[(i * len(rs)) // n] for i in range(n)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="a committed results CSV (granularity-* or baselines-*)")
    ap.add_argument("--per-commit", type=int, default=3, help="rows recomputed per older commit")
    common_args(ap, seeds=None, limit=False)
    args = ap.parse_args(argv)
    src = Path(args.csv)
    if not src.is_file():
        print(f"{src}: not found", file=sys.stderr)
        return 2
    with src.open() as f:
        rows = list(csv.DictReader(f))
    need = {"model", "wbits", "abits", "calibration", "seed", "images", "top1", "commit"}
    if not rows or need - set(rows[0]):
        print(f"{src}: not a granularity / baselines table (needs columns {sorted(need)})",
              file=sys.stderr)
        return 2
    bench = Bench(args)
    head = bench.prov["commit"]
    res = bench.results(f"reproduce-{src.stem}.csv", FIELDS)
    todo = [r for r in pick(rows, head, args.per_commit)
            if f"{src.stem}/{r['point']}" not in res]
    log(f"{len(res.file.done)} rows done, {len(todo)} to recompute -> {res.path}")
    for r in tqdm(todo, desc=f"reproduce {src.stem}", unit="row"):
        prep = bench.prepare(r["model"], weight_bits=int(r["wbits"]), act_bits=int(r["abits"]))
        images = bench.test_set(prep)[0]
        if len(images) != int(r["images"]):
            print(f"{src}: row {r['point']} used {r['images']} test images, this test set has "
                  f"{len(images)}", file=sys.stderr)
            return 2
        got = bench.point(prep, granularity(*row_granularity(r)), int(r["wbits"]),
                          int(r["abits"]), r["calibration"], int(r["seed"]))
        res.append({"point": f"{src.stem}/{r['point']}", "source": src.name,
                    "row_point": r["point"], "row_commit": r["commit"], "model": r["model"],
                    "wbits": r["wbits"], "abits": r["abits"], "calibration": r["calibration"],
                    "granularity": "/".join(str(v) for v in row_granularity(r) if v),
                    "seed": r["seed"], "images": got["images"], "top1_stored": r["top1"],
                    "top1_now": got["top1"],
                    "equal": str(float(got["top1"]) == float(r["top1"]))})
    done = [x for x in res.rows() if x["source"] == src.name]
    bench.write_md(f"reproduce-{src.stem}.md", markdown(done, src.name, head), rows=res.rows())
    return 0


def markdown(rows: list[dict], name: str, head: str) -> list[str]:
    md = [f"# {name}: older rows recomputed at commit `{head[:12]}`", "",
          "| row | computed at | stored top-1 | top-1 now | same |", "|---|---|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['row_point']} | `{r['row_commit'][:7]}` | "
                  f"{100 * float(r['top1_stored']):.2f} | {100 * float(r['top1_now']):.2f} | "
                  f"{'yes' if r['equal'] == 'True' else 'no'} |")
    same = sum(r["equal"] == "True" for r in rows)
    diffs = [abs(float(r["top1_now"]) - float(r["top1_stored"])) for r in rows]
    md += ["", f"{same} of {len(rows)} recomputed rows give the stored top-1 exactly"
           + (f"; the largest difference is {100 * max(diffs):.2f} points." if diffs else ".")]
    return md


if __name__ == "__main__":
    raise SystemExit(main())
