"""What storing weights in the crossbar's symmetric range costs, and what calibrating for it wins.

    python benchmarks/bench_symmetric.py [--model resnet20] [--wbits 4 3] [--limit N]
        [--threads T] [--out DIR]

Crossbar arrays hold b-bit weights as integers in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (a magnitude
with a sign, or an offset code): the level ``-2^(b-1)`` of an ordinary b-bit quantizer does not
exist. Three ways to get there, each evaluated on the exact tiled-integer kernel path (the
same integers an ideal-ADC crossbar computes with), PTQ-SL, A8, 128 calibration images of
data_batch_1 (seed 0), first and last layer in float, on the CIFAR-10 test set:

- ``asymmetric``: calibrated and run in ``[-2^(b-1), 2^(b-1)-1]`` (not storable on the arrays;
  the reference);
- ``clamped``: the same scales, weights at ``-2^(b-1)`` stored as ``-(2^(b-1)-1)`` (what
  pimsim did before calibration knew the range);
- ``symmetric``: calibrated for the symmetric range (``calibrate(symmetric=True)``, what
  ``pimsim run`` does when the config has a ``crossbar:`` section).

Granularities: the ISAAC-like preset's array tile (``quant.tile: crossbar`` on
hwconfigs/isaac.yaml: 63 x 128), channelwise, and Method 1 (16, 36). One CSV row per point,
appended as it finishes; a rerun computes only the missing points. Writes
DIR/symmetric-<model>.{csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from pimsim.calibrate import symmetric_quant
from pimsim.config import load
from pimsim.data import load_cifar10
from pimsim.quant import qrange
from pimsim.simulate import evaluate, prepare, quantize_network, set_threads

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRESET = ROOT / "hwconfigs" / "isaac.yaml"
TILES = {"crossbar": "crossbar", "channelwise": "channelwise", "16x36": [16, 36]}
VARIANTS = ("asymmetric", "clamped", "symmetric")
FIELDS = ["model", "wbits", "abits", "tile", "variant", "top1", "weights_at_neg_end",
          "weights", "images", "calibration_s"]


def read_done(path: Path) -> dict:
    if not path.exists():
        return {}
    with path.open() as f:
        return {(r["wbits"], r["tile"], r["variant"]): r for r in csv.DictReader(f)}


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
    md = [f"# Symmetric weight range on crossbar arrays: {model}, PTQ-SL, A8", "",
          f"Top-1 (%) on {', '.join(n)} CIFAR-10 test images, exact tiled-integer kernel. "
          "`at -2^(b-1)`: weights the asymmetric calibration puts on the level the arrays "
          "cannot store.", "",
          "| W bits | tile | asymmetric | clamped | symmetric | symmetric - clamped | "
          "at -2^(b-1) |", "|---:|---|---:|---:|---:|---:|---:|"]
    for wb in sorted({k[0] for k in done}, reverse=True):
        for t in TILES:
            r = {v: done.get((wb, t, v)) for v in VARIANTS}
            if not any(r.values()):
                continue
            top = {v: (100 * float(x["top1"]) if x else None) for v, x in r.items()}
            cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            d = ("-" if top["symmetric"] is None or top["clamped"] is None
                 else f"{top['symmetric'] - top['clamped']:+.2f}")
            a = r["asymmetric"]
            neg = "-" if a is None else (f"{int(a['weights_at_neg_end'])} / {int(a['weights'])} "
                                         f"({100 * int(a['weights_at_neg_end']) / int(a['weights']):.2f} %)")
            md.append(f"| {wb} | {t} | {cell(top['asymmetric'])} | {cell(top['clamped'])} | "
                      f"{cell(top['symmetric'])} | {d} | {neg} |")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--wbits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--limit", type=int, default=None, help="first N test images only")
    ap.add_argument("--threads", type=int, default=0, help="torch/Numba threads, 0 = all")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-limit{args.limit}" if args.limit else ""
    csv_path = out / f"symmetric-{args.model}{suffix}.csv"
    done = read_done(csv_path)
    todo = [(wb, t) for wb in args.wbits for t in TILES
            if any((str(wb), t, v) not in done for v in VARIANTS)]
    print(f"{len(done)} points done -> {csv_path}", file=sys.stderr)
    images = labels = None
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            w.writeheader()
        for wb, t in tqdm(todo, desc=f"symmetric {args.model}", unit="setting"):
            for variant in ("asymmetric", "symmetric"):
                sets = [f"model.name={args.model}", "quant.calibration=ptqsl",
                        f"quant.weight_bits={wb}", "quant.act_bits=8", "eval.backend=kernel"]
                cfg = load(PRESET, sets + [f"quant.tile={TILES[t]}".replace(" ", "")])
                prep = prepare(cfg)
                if images is None:
                    images, labels = load_cifar10("test", prep.data_dir, limit=args.limit)
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
                            l.set_quant(symmetric_quant(l.quant, True))
                    if (str(wb), t, v) in done:
                        continue
                    net.set_mode("kernel")
                    top1, _ = evaluate(net, images, labels, 500, progress=False)
                    row = {"model": args.model, "wbits": wb, "abits": 8, "tile": t, "variant": v,
                           "top1": f"{top1:.4f}", "weights_at_neg_end": neg, "weights": tot,
                           "images": len(images), "calibration_s": f"{calib_s:.1f}"}
                    w.writerow(row)
                    f.flush()
                    done[(str(wb), t, v)] = {k: str(x) for k, x in row.items()}
                    print(f"W{wb} {t} {v}: {100 * top1:.2f}%", file=sys.stderr)
    md = markdown(done, args.model)
    (out / f"symmetric-{args.model}{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
