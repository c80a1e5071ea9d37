"""Accuracy under ADC limits on the ISAAC-like crossbar, and the speed of the array simulation.

    python benchmarks/bench_adc.py --model resnet20 [--limit N] [--out DIR] [--speed-images 1000]
        [--signed differential] [--policies full calibrated] [--threads T]

The network is calibrated once (PTQ-SL, W4A8, ``quant.tile: crossbar`` = 63 x 128 on the
ISAAC-like preset hwconfigs/isaac.yaml: 128x128 arrays, 2-bit cells, offset weights, 1-bit
DAC; 128 calibration images of data_batch_1, seed 0; first and last layer in float) and put
on the arrays. Then every point of adc_bits (ideal, 8, 7, 6, 5, 4) x ADC range policy
(full, calibrated, calibrated_slice) is evaluated with the array-level simulation
(``eval.backend: crossbar``) on the test set (all 10,000 images unless --limit).
``calibrated`` ranges are fitted on the calibration batch (largest column sum per array),
``calibrated_slice`` ones per array and weight slice (run by the analog array model
``pimsim.crossbar.noisy`` with ideal cells). The ideal ADC is one point (it does not depend
on the policy). One CSV row per point (``seed=0/adc_bits=<b>/<policy>``) is appended as soon as
it is done, through benchmarks/harness.py (with its provenance columns); a rerun computes only
the missing points. Speed: the first --speed-images test images through the tiled-integer
kernel and through the array simulation (the preset as shipped: 8-bit ADC, full range), same
process, after a warm-up, best of two; ``slowdown_vs_tiled`` = array time / kernel time; a
rerun keeps an earlier speed measurement (its provenance under ``provenance_of``).
Writes DIR/adc-<model>-W4A8-isaac.{csv,md,png} and DIR/adc.json (default DIR:
benchmarks/results/). ``--signed differential``
runs the same sweep with the preset's offset weights replaced by differential column pairs
(tile 32 x 128) and writes DIR/adc-<model>-W4A8-isaac-differential.{csv,md,png,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from harness import Bench, common_args, log
from pimsim.config import load
from pimsim.cost import config_cost
from pimsim.crossbar import adc_stats, attach, fit_adc_ranges, reset_adc_stats
from pimsim.data import load_cifar10
from pimsim.simulate import calibration_batch, evaluate, prepare, quantize_network

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "hwconfigs" / "isaac.yaml"
ADC_BITS = (8, 7, 6, 5, 4)
POLICIES = ("full", "calibrated", "calibrated_slice")
FIELDS = ["model", "preset", "adc_bits", "policy", "top1", "adc_clip_fraction", "images",
          "eval_s"]


def point_name(seed, adc_bits, policy) -> str:
    return f"seed={seed}/adc_bits={adc_bits}/{policy}"


def by_point(rows) -> dict:
    """{(adc_bits, policy): row} of the CSV rows (values as CSV text)."""
    return {(r["adc_bits"], r["policy"]): r for r in rows}


def set_adc(net, mapping, crossbar) -> None:
    """Rebuild every layer's array operator for ``crossbar`` (same placement)."""
    for l in net.quantized_layers:
        l.set_crossbar(crossbar, mapping.layer(l.name))


def clip_fraction(net) -> float:
    st = adc_stats(net).values()
    conv = sum(n for _, n in st)
    return sum(c for c, _ in st) / conv if conv else 0.0


def timed_eval(net, mode, images, labels, bs):
    net.set_mode(mode)
    t0 = time.perf_counter()
    top1, _ = evaluate(net, images, labels, bs, progress=False)
    return time.perf_counter() - t0, top1


def plot(rows: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ideal = rows.get(("0", "ideal"))
    for pol, mark in zip(POLICIES, ("o-", "s-", "^-")):
        pts = sorted((int(b), 100 * float(r["top1"])) for (b, p), r in rows.items() if p == pol)
        if pts:
            ax.plot([b for b, _ in pts], [a for _, a in pts], mark, label=f"{pol} range")
    if ideal:
        ax.axhline(100 * float(ideal["top1"]), color="k", ls="--", lw=1, label="ideal ADC")
    ax.set_xlabel("ADC bits")
    ax.set_ylabel("top-1 (%)")
    ax.set_xticks(list(ADC_BITS))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def energies(sets: list[str]) -> dict:
    """``{adc_bits: (ADC energy, total energy)}`` in uJ per inference from the cost model
    (pimsim.cost; ideal = 0 is charged at the lossless resolution of a full array)."""
    out = {}
    for b in (0,) + ADC_BITS:
        t = config_cost(load(PRESET, sets + [f"crossbar.adc_bits={b}"]))["totals"]
        out[b] = (t["energy_breakdown_nj"]["adc"] / 1e3, t["energy_nj"] / 1e3)
    return out


def table(rows: dict, energy: dict | None = None) -> list[str]:
    energy = energy or {}
    md = ["| ADC bits | range | top-1 (%) | clipped conversions (%) | ADC energy (uJ) | "
          "energy / inference (uJ) |", "|---|---|---:|---:|---:|---:|"]
    keys = [("0", "ideal")] + [(str(b), p) for p in POLICIES for b in ADC_BITS]
    for k in keys:
        if k in rows:
            r = rows[k]
            bits = "ideal" if k[0] == "0" else k[0]
            e = energy.get(int(k[0]))
            ecells = "- | -" if e is None else f"{e[0]:.1f} | {e[1]:.1f}"
            md.append(f"| {bits} | {'-' if k[1] == 'ideal' else k[1]} | "
                      f"{100 * float(r['top1']):.2f} | {100 * float(r['adc_clip_fraction']):.4f} "
                      f"| {ecells} |")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--speed-images", type=int, default=1000,
                    help="test images of the speed measurement (0 = skip it)")
    ap.add_argument("--signed", choices=["differential", "offset"], default=None,
                    help="override the preset's signed-weight scheme (a variant: written to "
                         "adc-<model>-W4A8-isaac-<scheme>.{csv,md,png,json}, no speed run)")
    ap.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES),
                    help="range policies to compute this time (default: all; a rerun resumes)")
    common_args(ap, seeds=None)
    args = ap.parse_args(argv)

    sets = [f"model.name={args.model}", "quant.calibration=ptqsl", "quant.tile=crossbar",
            "quant.weight_bits=4", "quant.act_bits=8"]
    variant = args.signed is not None and args.signed != load(PRESET).crossbar.signed
    if variant:
        sets.append(f"crossbar.signed={args.signed}")
        args.speed_images = 0
    cfg = load(PRESET, sets)
    xb0 = cfg.crossbar
    seed = cfg["quant.seed"]
    bench = Bench(args)
    threads = bench.threads
    stem = f"adc-{args.model}-W4A8-{xb0.name}" + (f"-{xb0.signed}" if variant else "")
    res = bench.results(f"{stem}.csv", FIELDS)
    json_name = f"{stem}.json" if variant else "adc.json"
    json_path = bench.out / json_name
    prev = json.loads(json_path.read_text()) if json_path.exists() else {}
    points = [(0, "ideal")] + [(b, p) for p in args.policies for b in ADC_BITS]
    todo = [pt for pt in points if point_name(seed, *pt) not in res]
    need_speed = args.speed_images > 0 and "slowdown_vs_tiled" not in prev
    log(f"{len(res.file.done)} points done, {len(todo)} to compute -> {res.path}")

    prep = prepare(cfg)
    images, labels = bench.test_set(prep)
    net, bs = prep.net, cfg["eval.batch_size"]
    mapping = None
    speed = {}
    if todo or need_speed:
        t0 = time.perf_counter()
        quantize_network(prep, progress=True)
        calib_s = time.perf_counter() - t0
        mapping = attach(net, xb0, cfg.granularity, strict=True)
        calib = calibration_batch(prep)
        log(f"calibrated in {calib_s:.1f}s; {mapping.arrays} arrays, utilization "
            f"{100 * mapping.utilization:.1f}%")
    if need_speed:
        n = min(args.speed_images, 10000)
        simg, slab = load_cifar10("test", prep.data_dir, limit=n)
        set_adc(net, mapping, xb0)                            # the preset: 8-bit, full range
        timed_eval(net, "kernel", simg[:50], slab[:50], bs)   # warm-up (compilation)
        timed_eval(net, "crossbar", simg[:50], slab[:50], bs)
        tk = min(timed_eval(net, "kernel", simg, slab, bs)[0] for _ in range(2))
        tx = min(timed_eval(net, "crossbar", simg, slab, bs)[0] for _ in range(2))
        speed = {"slowdown_vs_tiled": tx / tk,
                 "speed": {"images": n, "kernel_s": tk, "crossbar_s": tx, "threads": threads,
                           "preset": xb0.to_dict(), "timing": "best of 2 after a warm-up"}}
        log(f"speed on {n} images: kernel {tk:.2f}s, arrays {tx:.2f}s, slowdown {tx / tk:.2f}x")
    for bits, pol in tqdm(todo, desc=stem, unit="point"):
        xb = dataclasses.replace(xb0, adc_bits=bits, adc_range="full" if pol == "ideal" else pol)
        set_adc(net, mapping, xb)
        if pol in ("calibrated", "calibrated_slice"):
            fit_adc_ranges(net, calib, bs)
        reset_adc_stats(net)
        dt, top1 = timed_eval(net, "crossbar", images, labels, bs)
        res.append({"point": point_name(seed, bits, pol), "model": args.model,
                    "preset": xb0.name, "adc_bits": bits, "policy": pol, "seed": seed,
                    "top1": f"{top1:.4f}", "adc_clip_fraction": f"{clip_fraction(net):.6g}",
                    "images": len(images), "eval_s": f"{dt:.1f}"})
    done = by_point(res.rows())
    title = f"{args.model} W4A8 PTQ-SL on {xb0.name} ({xb0.rows}x{xb0.cols}, {xb0.cell_bits}-bit " \
            f"cells, {xb0.signed})"
    n_img = {r["images"] for r in done.values()}
    energy = energies(sets)
    md = [f"# ADC resolution x range policy: {title}", "",
          f"Top-1 on {', '.join(sorted(n_img))} CIFAR-10 test images, array-level simulation "
          "(`eval.backend: crossbar`). Energy per inference from `pimsim.cost` (default `cost:` "
          "constants; the ADC energy per conversion scales as 2^bits, the ideal ADC is charged "
          "at the lossless resolution of a full array).", ""] + table(done, energy)
    shown = speed or {k: prev[k] for k in ("slowdown_vs_tiled", "speed") if k in prev}
    if shown:
        s = shown["speed"]
        md += ["", f"Speed ({s['images']} images, {s['threads']} threads): tiled-integer kernel "
               f"{s['kernel_s']:.2f} s, array simulation {s['crossbar_s']:.2f} s: "
               f"**{shown['slowdown_vs_tiled']:.2f}x**."]
    plot(done, title, bench.out / f"{stem}.png")
    # keys measured now get this run's provenance; an earlier speed measurement, mapping
    # figures not recomputed, ... keep theirs (write_json's ``provenance_of``)
    result = {**speed, "energy_uj": {str(b): {"adc": a, "total": t} for b, (a, t) in energy.items()},
              "model": args.model, "preset": xb0.to_dict(), "csv": res.path.name,
              "points": [done[k] for k in sorted(done, key=lambda k: (k[1], -int(k[0])))]}
    if mapping is not None:
        result["arrays"], result["utilization"] = mapping.arrays, mapping.utilization
    bench.write_json(json_name, result, merge=True)
    bench.write_md(f"{stem}.md", md, rows=res.rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
