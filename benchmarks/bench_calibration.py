"""Speed and memory of PTQ-SL calibration: ResNet-20, W4A8, (r, c) = (16, 36), 128 calibration
images, 100 candidates, 3 rounds.

    python benchmarks/bench_calibration.py [--model resnet20] [--tile 16 36]
        [--wbits 4 --abits 8] [--images 128] [--direct-layers N] [--threads T] [--out DIR]

Three measurements in one run:

1. ``resnet20_16x36_s``: wall time of the whole calibration (``pimsim.calibrate``, fast
   ``gram`` mode, all quantized layers, including the float pass that records the targets).
2. ``speedup_vs_direct``: a second pass over the same network in which, for ``--direct-layers``
   layers spread over the network (default 4: one per stage plus the deepest), the per-layer
   PTQ-SL pipeline is run twice on the very same input and float target, once with
   ``mode: gram`` and once with ``mode: direct`` (Eq. 6 on the samples). The ratio of the
   summed times of those layers is the speed-up; the chosen scales must agree (up to exact ties),
   which is checked and reported. The split of time (activation searches / statistics / weight
   search) is reported too, so the speed-up of the weight search alone is visible.
3. ``peak_rss_mb``: peak resident memory of this process after step 1 (``ru_maxrss``); step 1
   runs first, so this is the peak of loading, tracing and the gram-mode calibration.

Calibration images: seed 0 (``quant.seed``). Prints a table and writes DIR/calibration.{json,md}
(default DIR: benchmarks/results/) with the provenance of benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numba
import numpy as np
import torch

from harness import Bench, common_args, log
from pimsim.calibrate import calibrate
from pimsim.methods import register_method
from pimsim.config import validate
from pimsim.ptqsl import ptqsl_method
from pimsim.quant import Granularity
from pimsim.simulate import prepare

SEED = 0          # quant.seed of the calibration images
PARAMS = {"candidates": 100, "rounds": 3, "alpha": 0.5, "beta": 1.2, "metric": "euclidean"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def pick_layers(names: list[str], n: int) -> list[str]:
    """``n`` layer names spread evenly over the network (first and last included)."""
    if n >= len(names):
        return list(names)
    idx = np.unique(np.round(np.linspace(0, len(names) - 1, n)).astype(int))
    return [names[i] for i in idx]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--tile", type=int, nargs=2, default=[16, 36], metavar=("R", "C"))
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--images", type=int, default=128, help="calibration images (default 128)")
    ap.add_argument("--direct-layers", type=int, default=4,
                    help="layers timed in both modes (default 4; 0 = all)")
    common_args(ap, seeds=None, limit=False)
    args = ap.parse_args(argv)

    bench = Bench(args)
    threads = bench.threads
    cfg = validate({"model": {"name": args.model},
                    "quant": {"weight_bits": args.wbits, "act_bits": args.abits,
                              "calib_images": args.images, "seed": SEED}})
    prep = prepare(cfg)
    calib = bench.calibration(prep, SEED)
    gran = Granularity.tile(*args.tile)
    net = prep.net

    # warm-up (numba/oneDNN first-call costs) on a few images, not timed
    calibrate(net, calib[:8], gran, args.wbits, args.abits, method="ptqsl", progress=False,
              params={**PARAMS, "candidates": 4, "rounds": 1})

    # 1. the whole calibration, fast mode
    t0 = time.perf_counter()
    info = calibrate(net, calib, gran, args.wbits, args.abits, method="ptqsl", progress=True,
                     params={**PARAMS, "mode": "gram"})
    total_s = time.perf_counter() - t0
    rss = peak_rss_mb()
    gram_layer_s = {l.name: l.quant.info["seconds"] for l in net.quantized_layers}

    # 2. same inputs, both modes, on chosen layers
    names = [l.name for l in net.quantized_layers]
    chosen = set(pick_layers(names, args.direct_layers or len(names)))
    per_layer = []

    def both(layer, x, target, gran_, w_bits, a_bits, params):
        q = ptqsl_method(layer, x, target, gran_, w_bits, a_bits, {**params, "mode": "gram"})
        if layer.name in chosen:
            d = ptqsl_method(layer, x, target, gran_, w_bits, a_bits, {**params, "mode": "direct"})
            gi, di = q.info, d.info
            same = np.array_equal(q.w_scales, d.w_scales)
            per_layer.append({
                "layer": layer.name, "O": layer.O, "K": layer.K, "N": int(x.shape[0] * (
                    layer.out_hw(x.shape[2], x.shape[3])[0] * layer.out_hw(x.shape[2], x.shape[3])[1]
                    if layer.kind == "conv" else 1)),
                "tiles": int(q.grid.n_tiles),
                "gram_s": gi["seconds"], "direct_s": di["seconds"],
                "gram_weight_s": gi["stats_s"] + gi["search_s"],
                "direct_weight_s": di["stats_s"] + di["search_s"],
                "act_search_s": gi["act1_s"] + gi["act2_s"],
                "same_scales": bool(same),
                "scales_max_rel_diff": float(np.max(np.abs(q.w_scales - d.w_scales)
                                                    / np.abs(d.w_scales))),
                "err_gram": gi["err"], "err_direct": di["err"]})
            log(f"  {layer.name}: gram {gi['seconds']:.2f} s, direct {di['seconds']:.2f} s, "
                f"same scales: {same}")
        return q

    register_method("_bench_both", both, needs_target=True, replace=True)
    calibrate(net, calib, gran, args.wbits, args.abits, method="_bench_both", progress=True,
              params=PARAMS)

    g = sum(p["gram_s"] for p in per_layer)
    d = sum(p["direct_s"] for p in per_layer)
    gw = sum(p["gram_weight_s"] for p in per_layer)
    dw = sum(p["direct_weight_s"] for p in per_layer)
    result = {
        "model": args.model, "tile": args.tile, "wbits": args.wbits, "abits": args.abits,
        "calib_images": args.images, "params": PARAMS,
        f"{args.model}_{args.tile[0]}x{args.tile[1]}_s": round(total_s, 2),
        "speedup_vs_direct": round(d / g, 2),
        "weight_search_speedup_vs_direct": round(dw / gw, 2),
        "peak_rss_mb": round(rss, 1),
        "layers_quantized": len(names),
        "gram_layer_s": {k: round(v, 3) for k, v in gram_layer_s.items()},
        "direct_layers": per_layer,
        "all_same_scales": all(p["same_scales"] for p in per_layer),
        "threads": threads, "cpu_count": torch.get_num_threads(),
        "numba": numba.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "float_layers": info["float_layers"],
    }
    lines = [f"# PTQ-SL calibration speed: {args.model}, W{args.wbits}A{args.abits}, "
             f"tile {args.tile[0]}x{args.tile[1]}, {args.images} images, 100 candidates, 3 rounds",
             "",
             "| measure | value |", "|---|---:|",
             f"| whole calibration, fast mode ({len(names)} layers) | {total_s:.1f} s |",
             f"| speed-up over direct mode, whole per-layer pipeline ({len(per_layer)} layers) "
             f"| {d / g:.1f}x |",
             f"| speed-up over direct mode, weight search only | {dw / gw:.1f}x |",
             f"| peak RSS | {rss:.0f} MB |", "",
             "| layer | O x K | N | tiles | gram s | direct s | weight search gram / direct s | "
             "same scales |", "|---|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {p['layer']} | {p['O']} x {p['K']} | {p['N']} | {p['tiles']} | {p['gram_s']:.2f} "
              f"| {p['direct_s']:.2f} | {p['gram_weight_s']:.2f} / {p['direct_weight_s']:.2f} "
              f"| {p['same_scales']} |" for p in per_layer]
    bench.write_md("calibration.md", lines)
    log(f"wrote {bench.write_json('calibration.json', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
