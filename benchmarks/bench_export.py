"""The export of a calibration, and the ONNX model checked against pimsim by ONNX Runtime.

    python benchmarks/bench_export.py [--limit N] [--threads T] [--out DIR] [--exports-only]

1. ``pimsim export hwconfigs/default.yaml`` (ResNet-20, W4A8, 128x128 tiles, PTQ-SL on 128
   calibration images, seed 0) into a temporary folder; ``manifest.json`` and ``tiles.csv`` are
   copied to ``DIR/export/`` (the tensors and the ONNX model are not kept: they are rebuilt by
   the command). The same for ``hwconfigs/isaac.yaml`` into ``DIR/export-isaac/``: on the
   ISAAC-like arrays its manifest holds the placement of every tile and its CSV the arrays of
   every tile (``adc_range: full``, so there are no fitted ADC ranges to store).
2. For W4A8 ResNet-20 calibrated as ``hwconfigs/default.yaml`` says (PTQ-SL, 128 images, seed
   0) with tiles 16x36, channelwise and Method 2 (r = 16, m = 4) with a random joint channel
   order (``reorder.method: random``, seed 0): the network exported to ONNX
   (``pimsim.onnx_export``, opset 21 QDQ) runs in ONNX Runtime (CPU, default graph
   optimizations) on the first ``--limit`` (default 1,000) CIFAR-10 test images, next to
   pimsim's fake path (the network the export describes). Recorded per point: the fraction of
   identical predictions, both top-1s, the largest logit difference, the fraction of images
   whose logits agree within 1e-5 of their largest magnitude (end-to-end float32 rounding), and
   the worst per-layer relative difference when every layer gets ONNX Runtime's own input for
   it (the graph exposes each GEMM layer's input and output). For scale, the same agreement
   measures between pimsim's exact kernel path and its fake path (float32 rounding apart).

Writes DIR/export-ort.{json,md} (default DIR: benchmarks/results/) with the provenance of
benchmarks/harness.py. ``--exports-only``: step 1 only (the two export folders; the ONNX
Runtime figures are left as they are).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness import Bench, common_args
from pimsim.config import load
from pimsim.onnx_export import build_onnx
from pimsim.simulate import calibrate_or_load, dataset_of, export, prepare

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "hwconfigs" / "default.yaml"
ISAAC = ROOT / "hwconfigs" / "isaac.yaml"
POINTS = {
    "W4A8 16x36": ["quant.tile=[16, 36]"],
    "W4A8 channelwise": ["quant.tile=channelwise"],
    "W4A8 Method 2 r=16 m=4, random joint order": ["quant.tile=[16, null]", "quant.splits=4",
                                                  "reorder.method=random"],
}


def agreement(name: str, sets, limit: int, threads: int) -> dict:
    import onnxruntime as ort
    cfg = load(DEFAULT, sets + [f"eval.threads={threads}"])
    prep = prepare(cfg)
    t0 = time.perf_counter()
    calibrate_or_load(prep, progress=False)
    calib_s = time.perf_counter() - t0
    net = prep.net
    net.set_mode("fake")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    sess = ort.InferenceSession(build_onnx(net).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    exposed = ort.InferenceSession(build_onnx(net, expose=True).SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    same = n = right_p = right_o = within = same_k = within_k = 0
    max_diff = 0.0
    layer_worst = None
    for x, y in dataset_of(prep).test_batches(500, limit):
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = net(x).numpy()
            net.set_mode("kernel")
            ker = net(x).numpy()
            net.set_mode("fake")
        same += int((got.argmax(1) == ref.argmax(1)).sum())
        same_k += int((ker.argmax(1) == ref.argmax(1)).sum())
        within_k += int((np.abs(ker - ref).max(1) <= 1e-5 * np.abs(ref).max(1)).sum())
        right_p += int((ref.argmax(1) == np.asarray(y)).sum())
        right_o += int((got.argmax(1) == np.asarray(y)).sum())
        d = np.abs(got - ref).max(1)
        within += int((d <= 1e-5 * np.abs(ref).max(1)).sum())
        max_diff = max(max_diff, float(d.max()))
        n += len(y)
        if layer_worst is None:             # layer by layer, on the first batch
            names = [o.name for o in exposed.get_outputs()]
            res = dict(zip(names, exposed.run(None, {"input": x.numpy()})))
            layer_worst = 0.0
            for l in net.layers:
                with torch.no_grad():
                    r = l(torch.from_numpy(res[f"{l.name}:input"])).numpy()
                layer_worst = max(layer_worst, float(np.abs(res[f"{l.name}:output"] - r).max()
                                                     / np.abs(r).max()))
    return {"config": sets, "images": n, "calibration_s": round(calib_s, 2),
            "same_prediction": same / n, "top1_pimsim_fake": right_p / n,
            "top1_onnxruntime": right_o / n, "max_logit_diff": max_diff,
            "logits_within_1e-5": within / n, "worst_layer_rel_diff": layer_worst,
            "kernel_vs_fake_same_prediction": same_k / n,
            "kernel_vs_fake_logits_within_1e-5": within_k / n}


def main() -> None:
    ap = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), seeds=None)
    ap.set_defaults(limit=1000)
    ap.add_argument("--exports-only", action="store_true",
                    help="write the export folders only, not the ONNX Runtime agreement")
    args = ap.parse_args()
    bench = Bench(args)
    # 1. the exports of the default config and of the ISAAC-like preset (with the placement
    # of every tile on the arrays): manifest and CSV kept
    for path, folder in ((DEFAULT, "export"), (ISAAC, "export-isaac")):
        cfg = load(path, [f"eval.threads={args.threads}"])
        keep = bench.out / folder
        keep.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            r = export(cfg, Path(tmp) / "x", progress=False)
            for f in ("manifest.json", "tiles.csv"):
                shutil.copyfile(Path(tmp) / "x" / f, keep / f)
        if path == DEFAULT:
            res = r
        print(f"export of {path.name}: {', '.join(r['files'])}; kept manifest.json, tiles.csv "
              f"in {keep}")
    if args.exports_only:
        return
    # 2. ONNX Runtime against the fake path
    points = {}
    for name, sets in POINTS.items():
        points[name] = agreement(name, sets, args.limit, args.threads)
        p = points[name]
        print(f"{name}: {p['images']} images, identical predictions "
              f"{100 * p['same_prediction']:.2f}%, logits within 1e-5 "
              f"{100 * p['logits_within_1e-5']:.1f}%, worst layer {p['worst_layer_rel_diff']:.1e}")
    import onnxruntime
    bench.write_json("export-ort.json", {"onnxruntime": onnxruntime.__version__,
                                         "points": points,
                                         "export": {"config": str(DEFAULT.relative_to(ROOT)),
                                                    "files": res["files"],
                                                    "calibration_s": res["calibration_s"]}})
    md = ["# ONNX export checked by ONNX Runtime (ResNet-20, CIFAR-10)", "",
          f"ONNX Runtime {onnxruntime.__version__} (CPU) on the exported opset-21 QDQ model "
          "against pimsim's fake path (the network the export describes); calibration as "
          "hwconfigs/default.yaml (PTQ-SL, 128 images, seed 0). `layer`: worst relative "
          "difference of a layer's output given ONNX Runtime's own input for it (first 500 "
          "images). `logits within 1e-5`: images whose logits agree end to end within 1e-5 of "
          "their largest magnitude (the others cross a quantization step somewhere after a "
          "float32 rounding difference). `kernel vs fake`: the same two measures between "
          "pimsim's own exact kernel path and its fake path (they differ by float32 rounding "
          "only), for scale.", "",
          "| point | images | identical predictions | top-1 pimsim fake | top-1 ONNX Runtime "
          "| logits within 1e-5 | max logit diff | layer | kernel vs fake: identical / within "
          "1e-5 |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, p in points.items():
        md.append(f"| {name} | {p['images']} | {100 * p['same_prediction']:.2f} % | "
                  f"{100 * p['top1_pimsim_fake']:.2f} % | {100 * p['top1_onnxruntime']:.2f} % | "
                  f"{100 * p['logits_within_1e-5']:.1f} % | {p['max_logit_diff']:.3f} | "
                  f"{p['worst_layer_rel_diff']:.1e} | "
                  f"{100 * p['kernel_vs_fake_same_prediction']:.2f} % / "
                  f"{100 * p['kernel_vs_fake_logits_within_1e-5']:.1f} % |")
    bench.write_md("export-ort.md", md)


if __name__ == "__main__":
    main()
