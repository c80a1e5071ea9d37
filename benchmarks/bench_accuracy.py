"""Float and quantized top-1 of the zoo's CIFAR ResNets through `pimsim run`, as a table.

    python benchmarks/bench_accuracy.py [--models resnet20 resnet56] [--limit N] [--threads T]
        [--out DIR]

Each point is one `pimsim run` (full test set, exact kernel path, calibration seed 0) whose JSON
(with its provenance) goes to DIR/runs/<name>.json; a point whose JSON exists is not run again
(delete it to rerun), so an interrupted run resumes. Writes DIR/accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import Bench, common_args
from pimsim.cli import main as pimsim_main

ROOT = Path(__file__).resolve().parents[1]

# (label, --set overrides)
POINTS = [
    ("W8A8 channelwise max", ["quant.weight_bits=8", "quant.act_bits=8", "quant.tile=channelwise",
                              "quant.calibration=max"]),
    ("W4A8 channelwise max", ["quant.tile=channelwise", "quant.calibration=max"]),
    ("W4A8 128x128 max", ["quant.tile=[128, 128]", "quant.calibration=max"]),
    ("W4A8 channelwise ptqsl", ["quant.tile=channelwise", "quant.calibration=ptqsl"]),
    ("W4A8 128x128 ptqsl", ["quant.tile=[128, 128]", "quant.calibration=ptqsl"]),
]


def run_point(model: str, label: str, sets: list[str], runs: Path, limit, threads: int) -> dict:
    out = runs / f"{model}-{label.replace(' ', '-')}.json"
    if not out.exists():
        argv = ["run", str(ROOT / "hwconfigs" / "default.yaml"), "--set", f"model.name={model}",
                "--set", f"eval.threads={threads}", "--out", str(out)]
        for s in sets:
            argv += ["--set", s]
        if limit:
            argv += ["--limit", str(limit)]
        print(f"== {model} {label}", file=sys.stderr)
        if pimsim_main(argv) != 0:
            raise SystemExit(f"pimsim run failed for {model} {label}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    common_args(ap, seeds=None)
    args = ap.parse_args(argv)
    bench = Bench(args)
    runs = bench.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    lines = ["| model | float top-1 | " + " | ".join(l for l, _ in POINTS) + " |",
             "|---|---:|" + "---:|" * len(POINTS)]
    for m in args.models:
        res = [run_point(m, label, sets, runs, args.limit, bench.threads) for label, sets in POINTS]
        cells = [f"{100 * r['top1']:.2f}%" for r in res]
        lines.append(f"| {m} | {100 * res[0]['fp_top1']:.2f}% | " + " | ".join(cells) + " |")
        images = res[0]["images"]
    lines.append(f"\nTop-1 on {images} CIFAR-10 test images (JPEG copy); calibration on 128 "
                 "images of data_batch_1 (seed 0); first and last layer in float; exact "
                 "tiled-integer kernel path; each run's JSON in runs/ records its own provenance.")
    bench.write_md("accuracy.md", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
