"""What storing weights in the crossbar's symmetric range costs, and what calibrating for it wins.

    python benchmarks/bench_symmetric.py [--model resnet20] [--wbits 4 3] [--seeds 0 1 2]
        [--backend fake|kernel] [--limit N] [--threads T] [--out DIR]

Crossbar arrays hold b-bit weights as integers in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (a magnitude
with a sign, or an offset code): the level ``-2^(b-1)`` of an ordinary b-bit quantizer does not
exist. Three ways to get there, each evaluated on the exact tiled-integer kernel path (the
same integers an ideal-ADC crossbar computes with; ``--backend fake``, the default, runs the
dequantized torch path, which the tests show agrees with it per layer), PTQ-SL, A8, 128
calibration images of data_batch_1 drawn with each seed of ``--seeds`` (``quant.seed``), first
and last layer in float, on the CIFAR-10 test set:

- ``asymmetric``: calibrated and run in ``[-2^(b-1), 2^(b-1)-1]`` (not storable on the arrays;
  the reference);
- ``clamped``: the same scales, weights at ``-2^(b-1)`` stored as ``-(2^(b-1)-1)`` (what
  pimsim did before calibration knew the range);
- ``symmetric``: calibrated for the symmetric range (``calibrate(symmetric=True)``, what
  ``pimsim run`` does when the config has a ``crossbar:`` section).

Granularities: the ISAAC-like preset's array tile (``quant.tile: crossbar`` on
hwconfigs/isaac.yaml: 63 x 128), channelwise, and Method 1 (16, 36). One CSV row per point
and seed (``seed=S/W<b>/<tile>/<variant>``), appended as it finishes through
benchmarks/harness.py (with its provenance columns); a rerun computes only the missing points.
Writes DIR/symmetric-<model>[-limit<N>].{csv,md} (default DIR: benchmarks/results/): top-1 as
mean ± sd over the seeds, and ``symmetric - clamped`` as mean ± sd of the per-seed differences.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from tqdm.auto import tqdm

from harness import Bench, common_args, log, pm
from pimsim.config import load
from pimsim.quant import qrange
from pimsim.simulate import evaluate, prepare, quantize_network

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "hwconfigs" / "isaac.yaml"
TILES = {"crossbar": "crossbar", "channelwise": "channelwise", "16x36": [16, 36]}
VARIANTS = ("asymmetric", "clamped", "symmetric")
FIELDS = ["model", "wbits", "abits", "tile", "variant", "backend", "top1", "weights_at_neg_end",
          "weights", "images", "calibration_s"]


def point_name(seed, wbits, tile, variant) -> str:
    return f"seed={seed}/W{wbits}/{tile}/{variant}"


def by_point(rows) -> dict:
    """{(seed, wbits, tile, variant): row} of the CSV rows (values as CSV text)."""
    return {(r["seed"], r["wbits"], r["tile"], r["variant"]): r for r in rows}


def count_neg_end(net) -> tuple[int, int]:
    """Weights at -2^(b-1) (before any symmetric clamp) and all quantized weights."""
    neg = tot = 0
    for l in net.quantized_layers:
        q = dataclasses.replace(l.quant, symmetric=False)
        wq = q.weight_int(l.weight_matrix())
        neg += int((wq == qrange(q.w_bits)[0]).sum())
        tot += wq.size
    return neg, tot


def markdown(done: dict, model: str) -> list[str]:
    n = sorted({r["images"] for r in done.values()})
    seeds = sorted({k[0] for k in done}, key=int)
    paths = sorted({r.get("backend") or "kernel" for r in done.values()})
    md = [f"# Symmetric weight range on crossbar arrays: {model}, PTQ-SL, A8", "",
          f"Top-1 (%) on {', '.join(n)} CIFAR-10 test images, {'/'.join(paths)} path, "
          f"mean ± sd over calibration seeds {', '.join(seeds)} (n = seeds with the point). "
          "`symmetric - clamped`: mean ± sd of the per-seed differences. `at -2^(b-1)`: "
          "weights the asymmetric calibration puts on the level the arrays cannot store (mean "
          "over seeds).", "",
          "| W bits | tile | n | asymmetric | clamped | symmetric | symmetric - clamped | "
          "at -2^(b-1) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for wb in sorted({k[1] for k in done}, reverse=True):
        for t in TILES:
            top = {v: {s: float(done[(s, wb, t, v)]["top1"]) for s in seeds
                       if (s, wb, t, v) in done} for v in VARIANTS}
            if not any(top.values()):
                continue
            cell = lambda v: pm(list(top[v].values())) if top[v] else "-"  # noqa: E731
            both = [s for s in top["symmetric"] if s in top["clamped"]]
            d = (pm([top["symmetric"][s] - top["clamped"][s] for s in both], signed=True)
                 if both else "-")
            a = [done[(s, wb, t, "asymmetric")] for s in top["asymmetric"]]
            neg = ("-" if not a else
                   f"{100 * sum(int(x['weights_at_neg_end']) / int(x['weights']) for x in a) / len(a):.2f} %")
            k = max(len(x) for x in top.values())
            md.append(f"| {wb} | {t} | {k} | {cell('asymmetric')} | {cell('clamped')} | "
                      f"{cell('symmetric')} | {d} | {neg} |")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--wbits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--backend", choices=("fake", "kernel"), default="fake",
                    help="evaluation path (they agree per layer; default fake, the faster)")
    common_args(ap, seeds=(0, 1, 2))
    args = ap.parse_args(argv)
    bench = Bench(args)
    suffix = f"-limit{args.limit}" if args.limit else ""
    res = bench.results(f"symmetric-{args.model}{suffix}.csv", FIELDS)
    done = by_point(res.rows())
    todo = [(seed, wb, t) for seed in args.seeds for wb in args.wbits for t in TILES
            if any((str(seed), str(wb), t, v) not in done for v in VARIANTS)]
    log(f"{len(done)} points done -> {res.path}")
    for seed, wb, t in tqdm(todo, desc=f"symmetric {args.model}", unit="setting"):
        for variant in ("asymmetric", "symmetric"):
            sets = [f"model.name={args.model}", "quant.calibration=ptqsl", f"quant.seed={seed}",
                    f"quant.weight_bits={wb}", "quant.act_bits=8", f"eval.backend={args.backend}"]
            cfg = load(PRESET, sets + [f"quant.tile={TILES[t]}".replace(" ", "")])
            prep = prepare(cfg)
            images, labels = bench.test_set(prep)
            net = prep.net
            t0 = time.perf_counter()
            # asymmetric: as if there were no crossbar section
            quantize_network(prep, progress=False, symmetric=variant == "symmetric")
            assert all(l.quant.symmetric == (variant == "symmetric")
                       for l in net.quantized_layers)
            calib_s = time.perf_counter() - t0
            neg, tot = count_neg_end(net)
            runs = [variant] if variant == "symmetric" else ["asymmetric", "clamped"]
            for v in runs:
                if v == "clamped":
                    for l in net.quantized_layers:
                        l.set_quant(l.quant.as_symmetric())
                if (str(seed), str(wb), t, v) in done:
                    continue
                net.set_mode(args.backend)
                top1, _ = evaluate(net, images, labels, 500, progress=False)
                assert cfg["quant.seed"] == seed
                row = {"point": point_name(seed, wb, t, v), "model": args.model, "wbits": wb,
                       "abits": 8, "tile": t, "variant": v, "seed": seed, "backend": args.backend,
                       "top1": f"{top1:.4f}",
                       "weights_at_neg_end": neg, "weights": tot, "images": len(images),
                       "calibration_s": f"{calib_s:.1f}"}
                res.append(row)
                done[(str(seed), str(wb), t, v)] = {k: str(x) for k, x in row.items()}
                log(f"seed {seed} W{wb} {t} {v}: {100 * top1:.2f}%")
    bench.write_md(f"symmetric-{args.model}{suffix}.md", markdown(by_point(res.rows()), args.model),
                   rows=res.rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
