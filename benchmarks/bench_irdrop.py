"""Accuracy and speed of the fast IR-drop models against the exact nodal solve.

    python benchmarks/bench_irdrop.py [--sizes 64 128 256] [--wire-r 1e-6 1e-5 1e-4 1e-3 1e-2]
        [--inputs 64] [--g-min 0.01] [--seeds 0 1] [--threads 1] [--out DIR]

For every array size n (n x n), wire resistance ``wire_r`` (one wire segment, in units of the
cell's lowest resistance 1/g_max) and seed, a random array is drawn as the crossbar sees it:
2-bit cells, every cell at one of the 4 levels linear in [g_min, 1] (uniform), and ``--inputs``
binary bit-serial input vectors (every word line on with probability 1/2, as one DAC cycle of
1-bit inputs). The column currents of ``pimsim.crossbar.irdrop`` are computed four ways: ideal
``v @ G``, the exact nodal solve (``solve_exact``, the reference) and the two line models of
``column_currents``: ``decoupled`` and ``coupled`` (the default). Relative errors are per
(input, column) entry, against the exact current (entries with zero exact current, i.e. no
active word line, are skipped): ``drop_*`` = ideal vs exact (how much the wires bend the sums),
``decoupled_*`` / ``coupled_*`` = model vs exact (the model's error); ``max`` and ``rms`` over
the entries. Times (one core unless --threads): ``exact_s`` = ``solve_exact`` of the batch,
``exact_T_s`` = the exact transfer matrix ``exact_conductance`` (what a backend would build once
per array), ``decoupled_s`` / ``coupled_s`` = ``column_currents`` of the batch (the model's
transfer matrix included). One CSV row per point
(``seed=<s>/n=<n>/wire_r=<r>``), resumable, through benchmarks/harness.py; writes
DIR/irdrop.csv and DIR/irdrop.md (default DIR: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness import Bench, common_args, log
from pimsim.crossbar.irdrop import column_currents, exact_conductance, solve_exact

MODELS = ("decoupled", "coupled")
FIELDS = (["seed", "rows", "cols", "wire_r", "g_min", "inputs", "drop_max", "drop_rms"]
          + [f"{m}_{k}" for m in MODELS for k in ("max", "rms")]
          + ["exact_s", "exact_T_s"] + [f"{m}_s" for m in MODELS])


def point_name(seed, n, wire_r) -> str:
    return f"seed={seed}/n={n}/wire_r={float(wire_r):g}"


def draw(n: int, inputs: int, g_min: float, seed: int):
    """The array (n, n) and the binary inputs (inputs, n) of one point."""
    rng = np.random.default_rng([seed, n])
    levels = rng.integers(0, 4, (n, n))
    G = g_min + levels * (1.0 - g_min) / 3.0
    v = (rng.random((inputs, n)) < 0.5).astype(np.float64)
    return G, v


def rel(approx, exact) -> tuple[float, float]:
    keep = exact > 0
    r = np.abs(approx - exact)[keep] / exact[keep]
    return float(r.max()), float(np.sqrt(np.mean(r * r)))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_point(n, wire_r, g_min, inputs, seed) -> dict:
    G, v = draw(n, inputs, g_min, seed)
    exact, t_exact = timed(lambda: solve_exact(v, G, wire_r))
    T, t_T = timed(lambda: exact_conductance(G, wire_r))
    assert np.allclose(v @ T, exact, rtol=1e-9), "exact transfer matrix disagrees with the solve"
    dmax, drms = rel(v @ G, exact)
    row = {"seed": seed, "rows": n, "cols": n, "wire_r": f"{wire_r:g}", "g_min": f"{g_min:g}",
           "inputs": inputs, "drop_max": f"{dmax:.3e}", "drop_rms": f"{drms:.3e}",
           "exact_s": f"{t_exact:.3f}", "exact_T_s": f"{t_T:.3f}"}
    for m in MODELS:
        I, t = timed(lambda: column_currents(v, G, wire_r, method=m))
        mx, rms = rel(I, exact)
        row.update({f"{m}_max": f"{mx:.3e}", f"{m}_rms": f"{rms:.3e}", f"{m}_s": f"{t:.4f}"})
    return row


def table(rows) -> list[str]:
    """Markdown: one line per (n, wire_r), the worst max and the mean rms over seeds, mean
    times."""
    groups = {}
    for r in rows:
        groups.setdefault((int(r["rows"]), float(r["wire_r"])), []).append(r)
    seeds = sorted({int(r["seed"]) for r in rows})
    first = rows[0] if rows else {}
    lines = ["# IR drop: line models vs exact nodal solve", "",
             f"n x n arrays, 2-bit cells (levels linear in [g_min, 1], g_min = "
             f"{first.get('g_min', '-')}), {first.get('inputs', '-')} binary input vectors "
             f"(word lines on with p = 1/2) per array, seeds {', '.join(map(str, seeds))}. "
             "Relative error per (input, column) entry against the exact current: max = worst "
             "over entries and seeds, rms = mean over seeds of the rms. drop = ideal `v @ G` vs "
             "exact (size of the effect); decoupled / coupled = `column_currents(..., method)` "
             "vs exact (the model's error). Times in seconds, mean over seeds.", "",
             "| array | wire_r | drop max | drop rms | decoupled max | decoupled rms | coupled max "
             "| coupled rms | exact solve s | exact T s | decoupled s | coupled s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (n, x), rs in sorted(groups.items()):
        def mean(k):
            return float(np.mean([float(r[k]) for r in rs]))

        def worst(k):
            return max(float(r[k]) for r in rs)
        errs = " | ".join(f"{worst(m + '_max'):.2e} | {mean(m + '_rms'):.2e}" for m in MODELS)
        lines.append(f"| {n}x{n} | {x:g} | {worst('drop_max'):.2e} | {mean('drop_rms'):.2e} | "
                     f"{errs} | {mean('exact_s'):.2f} | {mean('exact_T_s'):.2f} | "
                     f"{mean('decoupled_s'):.4f} | {mean('coupled_s'):.3f} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--wire-r", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    ap.add_argument("--inputs", type=int, default=64, help="binary input vectors per array")
    ap.add_argument("--g-min", type=float, default=0.01, help="lowest level (fraction of g_max)")
    common_args(ap, seeds=(0, 1), threads=1, limit=False)
    args = ap.parse_args(argv)
    bench = Bench(args)
    res = bench.results("irdrop.csv", FIELDS)
    for seed in args.seeds:
        for n in args.sizes:
            for x in args.wire_r:
                name = point_name(seed, n, x)
                if name in res:
                    continue
                row = run_point(n, x, args.g_min, args.inputs, seed)
                res.append({"point": name, **row})
                log(f"{name}: drop max {row['drop_max']}, decoupled max {row['decoupled_max']}, "
                    f"coupled max {row['coupled_max']}, exact {row['exact_s']} s, coupled "
                    f"{row['coupled_s']} s")
    bench.write_md("irdrop.md", table(res.rows()), rows=res.rows())


if __name__ == "__main__":
    main()
