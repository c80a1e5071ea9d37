"""Thread-pool interference: plain torch fp32 inference speed in one process before and after
each simulation backend ran in it, for each Numba threading layer (issue #16).

    python benchmarks/bench_threads.py [--layers workqueue omp] [--limit 200]
        [--backend-images 50] [--threads 0] [--out DIR]

For each layer a fresh process (``NUMBA_THREADING_LAYER`` set for it; ``workqueue`` is pimsim's
policy, see pimsim/__init__.py) calibrates ResNet-20 W4A8 on the ISAAC-like preset
(hwconfigs/isaac.yaml, ``quant.tile: crossbar``), times torch fp32 on the first --limit test
images (best of 3), runs the ``kernel`` backend on --backend-images images, times torch again,
runs the ``crossbar`` backend (array simulation), times torch again. ``after_over_before`` is
the torch time after a backend ran over the time before it (1.0: no interference). Writes
DIR/threads.{json,md} (default benchmarks/results/) with the provenance of benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import Bench, common_args

PRESET = Path(__file__).resolve().parents[1] / "hwconfigs" / "isaac.yaml"
BACKENDS = ("kernel", "crossbar")


def child(args) -> dict:
    import numba
    import torch

    from pimsim.config import load
    from pimsim.crossbar import attach
    from pimsim.data import load_cifar10
    from pimsim.kernels import set_threads
    from pimsim.models import build_model
    from pimsim.simulate import evaluate, prepare, quantize_network

    set_threads(args.threads)
    cfg = load(PRESET, ["model.name=resnet20", "quant.calibration=ptqsl", "quant.tile=crossbar",
                        "quant.weight_bits=4", "quant.act_bits=8"])
    prep = prepare(cfg)
    images, labels = load_cifar10("test", prep.data_dir, limit=args.limit)
    torch_model = build_model("resnet20", checkpoint=prep.checkpoint)
    bs = cfg["eval.batch_size"]

    def torch_s():
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            evaluate(torch_model, images, labels, bs, progress=False)
            best = min(best, time.perf_counter() - t)
        return best

    evaluate(torch_model, images[:50], labels[:50], bs, progress=False)      # warm-up
    rows = [{"after": "nothing", "torch_s": torch_s()}]     # before anything Numba ran
    quantize_network(prep, progress=False)
    attach(prep.net, cfg.crossbar, cfg.granularity, strict=True)
    nb = args.backend_images
    for backend in BACKENDS:
        prep.net.set_mode(backend)
        t = time.perf_counter()
        evaluate(prep.net, images[:nb], labels[:nb], bs, progress=False)
        backend_s = time.perf_counter() - t
        rows.append({"after": backend, "backend_s": backend_s, "torch_s": torch_s()})
    for r in rows:
        r["after_over_before"] = r["torch_s"] / rows[0]["torch_s"]
    return {"layer": numba.threading_layer(), "rows": rows, "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=["workqueue", "omp"],
                    choices=["workqueue", "omp", "tbb"], help="Numba threading layers to compare")
    ap.add_argument("--backend-images", type=int, default=50,
                    help="images each backend runs on before torch is timed again")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    common_args(ap, seeds=None)
    args = ap.parse_args(argv)
    args.limit = args.limit or 200
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    bench = Bench(args)
    out = {"images": args.limit, "backend_images": args.backend_images, "threads": bench.threads,
           "layers": {}}
    for layer in args.layers:
        env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
        cmd = [sys.executable, __file__, "--child", "--limit", str(args.limit),
               "--backend-images", str(args.backend_images), "--threads", str(args.threads)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            raise SystemExit(f"bench_threads: layer {layer} failed:\n{p.stderr[-2000:]}")
        res = json.loads(line[-1][7:])
        out["layers"][layer] = res
        for r in res["rows"]:
            print(f"{layer:<10} after {r['after']:<9} torch {r['torch_s']:.3f} s  "
                  f"x{r['after_over_before']:.2f}", file=sys.stderr)
    md = ["| Numba layer | torch fp32 after | seconds | vs before |", "|---|---|---|---|"]
    for layer, res in out["layers"].items():
        for r in res["rows"]:
            md.append(f"| {layer} | {r['after']} | {r['torch_s']:.3f} | "
                      f"{r['after_over_before']:.2f}x |")
    md.append(f"\ntorch fp32 ResNet-20 on {args.limit} images, best of 3, {bench.threads} threads; "
              f"each backend ran on {args.backend_images} images in between")
    print(f"wrote {bench.write_json('threads.json', out)}")
    bench.write_md("threads.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
