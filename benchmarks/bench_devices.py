"""Accuracy with real devices: ResNet-20 W4A8 PTQ-SL on ISAAC-like arrays whose cells are noisy,
drift and get stuck (issue 15), and the speed of the analog array model.

    python benchmarks/bench_devices.py [--parts a b c d speed] [--sizes 64 128 256]
        [--instances 5] [--limit N] [--speed-images 1000] [--threads T] [--out DIR]

The network is calibrated ONCE per array size (PTQ-SL, W4A8, ``quant.tile: crossbar`` on the
ISAAC-like presets hwconfigs/crossbar-64x64.yaml, isaac.yaml (128x128) and
crossbar-256x256.yaml: 2-bit cells, offset weights, 1-bit DAC, 8-bit ADC with the full range;
128 calibration images of data_batch_1, seed 0; first and last layer in float) and put on
the arrays; every noise point and chip instance reuses it (only the cells change: the layers'
analog models are rebuilt with the point's ``crossbar.device`` and reprogrammed per chip).
Each point is evaluated on ``--instances`` chips (``crossbar.device.seed`` 0..n-1; a point
with ideal cells is deterministic: one chip) on the test set (all 10,000 images unless
--limit). Parts:

- ``a``: ``programming_noise`` in {0, 0.01, 0.02, 0.05, 0.1} (fraction of g_max) for every
  array size of ``--sizes``;
- ``b``: the PCM model (``model: pcm``, hwconfigs/devices/pcm.yaml) at ``t_inference`` in
  {1 s, 1 h, 1 day, 1 month, 1 year} with ``compensation`` none / global / tile (128x128);
- ``d``: stuck cells, rate in {0.1 %, 1 %, 5 %} (half stuck at g_min, half at g_max), every
  size of ``--sizes``;
- ``speed``: the first --speed-images test images through the ideal array backend (the preset
  as shipped) and through the analog model with programming noise 0.02 and read noise 0.01
  (128x128), same process, after a warm-up; ``slowdown_vs_ideal_arrays`` = analog / ideal.

- ``c``: wire resistance ``wire_r`` in {1e-6, 1e-5, 3e-5, 1e-4} (fraction of the cell's lowest
  resistance 1/g_max; ``pimsim.crossbar.irdrop`` folded into each array's conductances, ideal
  cells: one chip per point) for every size of ``--sizes``, with each compensation of
  ``--c-compensation`` (default none; global / tile: does the drift compensation's
  reference-vector rescale also undo the IR drop?);

One CSV row per (point, chip) is appended as soon as it is done, through benchmarks/harness.py
(with its provenance columns); a rerun computes only the missing rows. Writes
DIR/devices-<model>-W4A8.{csv,md,png} and DIR/devices.json (default DIR: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from harness import Bench, common_args, log
from pimsim.config import load
from pimsim.crossbar import adc_stats, attach, fit_adc_ranges, reset_adc_stats
from pimsim.crossbar.device import Device
from pimsim.crossbar.noisy import program_chips
from pimsim.data import load_cifar10
from pimsim.simulate import calibration_batch, evaluate, prepare, quantize_network

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {64: "crossbar-64x64.yaml", 128: "isaac.yaml", 256: "crossbar-256x256.yaml"}
PROG_NOISE = (0.0, 0.01, 0.02, 0.05, 0.1)
TIMES = {"1 s": 1.0, "1 h": 3600.0, "1 day": 86400.0, "1 month": 30 * 86400.0,
         "1 year": 365 * 86400.0}
COMPENSATION = ("none", "global", "tile")
STUCK = (0.001, 0.01, 0.05)
WIRE_R = (1e-6, 1e-5, 3e-5, 1e-4)
SPEED_DEVICE = {"programming_noise": 0.02, "read_noise": 0.01}
FIELDS = ["part", "model", "size", "key", "value", "compensation", "chip", "top1",
          "adc_clip_fraction", "images", "eval_s"]


def part_a(sizes):
    return [("a", s, "programming_noise", v, {"programming_noise": v}, "none")
            for s in sizes for v in PROG_NOISE]


def part_b(sizes):
    return [("b", 128, "t_inference", name, {"model": "pcm", "t_inference": t}, comp)
            for comp in COMPENSATION for name, t in TIMES.items()]


def part_c(sizes, compensations=("none",)):
    return [("c", s, "wire_r", v, {"wire_r": v}, comp) for comp in compensations
            for s in sizes for v in WIRE_R]


def part_d(sizes):
    return [("d", s, "stuck", v, {"stuck_off": v / 2, "stuck_on": v / 2}, "none")
            for s in sizes for v in STUCK]


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def point_name(part, size, key, value, comp) -> str:
    return f"{part}/size={size}/{key}={value}/comp={comp}"


def clip_fraction(net) -> float:
    st = adc_stats(net).values()
    conv = sum(n for _, n in st)
    return sum(c for c, _ in st) / conv if conv else 0.0


class Sizes:
    """One calibrated network per array size (calibrated once, reused by every point)."""

    def __init__(self, model: str, bench: Bench):
        self.model, self.bench, self.cache = model, bench, {}

    def get(self, size: int):
        if size not in self.cache:
            sets = [f"model.name={self.model}", "quant.calibration=ptqsl", "quant.tile=crossbar",
                    "quant.weight_bits=4", "quant.act_bits=8"]
            cfg = load(ROOT / "hwconfigs" / PRESETS[size], sets)
            prep = prepare(cfg)
            t0 = time.perf_counter()
            quantize_network(prep, progress=False)
            mapping = attach(prep.net, cfg.crossbar, cfg.granularity, strict=True)
            log(f"{size}x{size}: calibrated in {time.perf_counter() - t0:.1f}s; "
                f"{mapping.arrays} arrays")
            self.cache[size] = (cfg, prep, mapping)
        return self.cache[size]

    def set_cells(self, size: int, device: dict, compensation: str):
        """Rebuild every layer's array model for these cells (same placement and scales)."""
        cfg, prep, mapping = self.get(size)
        xb = dataclasses.replace(cfg.crossbar, device={**Device().to_dict(), **device},
                                 compensation=compensation)
        for l in prep.net.quantized_layers:
            l.set_crossbar(xb, mapping.layer(l.name))
        if xb.adc_range in ("calibrated", "calibrated_slice") and xb.adc_bits > 0:
            fit_adc_ranges(prep.net, calibration_batch(prep), cfg["eval.batch_size"])
        prep.net.set_mode("crossbar")
        return xb, prep


def timed(net, images, labels, bs):
    t0 = time.perf_counter()
    top1, _ = evaluate(net, images, labels, bs, progress=False)
    return time.perf_counter() - t0, top1


def speed(sizes: Sizes, n: int, bs: int) -> dict:
    _, prep, _ = sizes.get(128)
    img, lab = load_cifar10("test", prep.data_dir, limit=n)
    out = {}
    for name, device in (("ideal_arrays_s", {}), ("analog_s", SPEED_DEVICE)):
        xb, prep = sizes.set_cells(128, device, "none")
        timed(prep.net, img[:20], lab[:20], bs)                    # warm-up (compilation)
        out[name] = timed(prep.net, img, lab, bs)[0]
    log(f"speed on {n} images: ideal arrays {out['ideal_arrays_s']:.1f}s, analog "
        f"{out['analog_s']:.1f}s")
    return {"slowdown_vs_ideal_arrays": out["analog_s"] / out["ideal_arrays_s"],
            "speed": {**out, "images": n, "device": SPEED_DEVICE, "preset": "isaac (128x128)",
                      "timing": "one run each after a 20-image warm-up, same process"}}


def summary(rows) -> dict:
    """{point: {mean, sd, min, max, chips, ...}} of the CSV rows."""
    groups = {}
    for r in rows:
        k = point_name(r["part"], r["size"], r["key"], r["value"], r["compensation"])
        groups.setdefault(k, []).append(r)
    out = {}
    for k, rs in groups.items():
        t = [float(r["top1"]) for r in rs]
        out[k] = {"part": rs[0]["part"], "size": int(rs[0]["size"]), "key": rs[0]["key"],
                  "value": rs[0]["value"], "compensation": rs[0]["compensation"],
                  "chips": len(t), "mean": statistics.fmean(t),
                  "sd": statistics.stdev(t) if len(t) > 1 else 0.0, "min": min(t), "max": max(t),
                  "images": int(rs[0]["images"]),
                  "adc_clip_fraction": statistics.fmean(float(r["adc_clip_fraction"]) for r in rs)}
    return out


def cell(p) -> str:
    if p is None:
        return "-"
    spread = f" ± {100 * p['sd']:.2f} [{100 * p['min']:.2f}, {100 * p['max']:.2f}]" \
        if p["chips"] > 1 else " (1 chip)"
    return f"{100 * p['mean']:.2f}{spread}"


# the parts swept per array size: part -> (CSV key, values, title, row label, label format)
SIZE_TABLES = {
    "a": ("programming_noise", PROG_NOISE, "(a) top-1 (%) vs programming noise (sigma, fraction "
          "of g_max): mean ± sd [min, max] over chips", "sigma", lambda v: f"{v}"),
    "c": ("wire_r", WIRE_R, "(c) top-1 (%) vs wire resistance (one segment, fraction of "
          "1/g_max; ideal cells, one chip)", "wire_r", lambda v: f"{v:g}"),
    "d": ("stuck", STUCK, "(d) top-1 (%) vs stuck cells (half at g_min, half at g_max)",
          "stuck", lambda v: f"{100 * v:g} %"),
}


def tables(summ: dict) -> list[str]:
    md = []
    get = lambda *k: summ.get(point_name(*k))              # noqa: E731
    parts = {p["part"] for p in summ.values()}
    sizes = sorted({p["size"] for p in summ.values() if p["part"] in SIZE_TABLES})

    def size_table(part, comp="none"):
        key, values, title, label, fmt = SIZE_TABLES[part]
        if comp != "none":
            title += f", compensation: {comp}"
        rows = ["", title, "", f"| {label} | " + " | ".join(f"{s}x{s}" for s in sizes) + " |",
                "|---|" + "---:|" * len(sizes)]
        return rows + [f"| {fmt(v)} | " + " | ".join(cell(get(part, s, key, str(v), comp))
                                                    for s in sizes) + " |" for v in values]

    if "a" in parts:
        md += size_table("a")
    if "b" in parts:
        md += ["", "(b) PCM model (128x128): top-1 (%) vs time since programming and drift "
               "compensation", "", "| t_inference | " + " | ".join(COMPENSATION) + " |",
               "|---|" + "---:|" * len(COMPENSATION)]
        for name in TIMES:
            md.append(f"| {name} | " + " | ".join(cell(get("b", 128, "t_inference", name, c))
                                                  for c in COMPENSATION) + " |")
    if "c" in parts:
        comps = {p["compensation"] for p in summ.values() if p["part"] == "c"}
        for comp in [c for c in COMPENSATION if c in comps]:
            md += size_table("c", comp)
    if "d" in parts:
        md += size_table("d")
    return md


def plot(summ: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for part, ax, key in (("a", axes[0], "programming_noise"), ("c", axes[2], "wire_r"),
                          ("d", axes[3], "stuck")):
        for s in sorted({p["size"] for p in summ.values() if p["part"] == part}):
            for comp in COMPENSATION:           # part c may hold compensated rows too
                pts = sorted(((float(p["value"]), p) for p in summ.values()
                              if p["part"] == part and p["size"] == s
                              and p["compensation"] == comp), key=lambda t: t[0])
                if pts:
                    ax.errorbar([v for v, _ in pts], [100 * p["mean"] for _, p in pts],
                                yerr=[100 * p["sd"] for _, p in pts], marker="o", capsize=3,
                                ls="-" if comp == "none" else "--",
                                label=f"{s}x{s}" + ("" if comp == "none" else f" ({comp})"))
        ax.set_xlabel(key)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax = axes[1]
    for comp in COMPENSATION:
        pts = [(TIMES[p["value"]], p) for p in summ.values()
               if p["part"] == "b" and p["compensation"] == comp]
        pts.sort(key=lambda t: t[0])
        if pts:
            ax.errorbar([t for t, _ in pts], [100 * p["mean"] for _, p in pts],
                        yerr=[100 * p["sd"] for _, p in pts], marker="o", capsize=3, label=comp)
    ax.set_xscale("log")
    ax.set_xlabel("t_inference (s), PCM model")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="compensation")
    axes[0].set_title("(a) programming noise")
    axes[1].set_title("(b) PCM drift")
    axes[2].set_title("(c) wire resistance")
    axes[2].set_xscale("log")
    axes[3].set_title("(d) stuck cells")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--parts", nargs="+", choices=[*PARTS, "speed"],
                    default=[*PARTS, "speed"])
    ap.add_argument("--sizes", nargs="+", type=int, choices=sorted(PRESETS),
                    default=sorted(PRESETS), help="array sizes of parts a, c and d")
    ap.add_argument("--instances", type=int, default=5, help="chips per noisy point")
    ap.add_argument("--speed-images", type=int, default=1000)
    ap.add_argument("--c-compensation", nargs="+", default=["none"], choices=list(COMPENSATION),
                    help="part c: the drift compensations to run the wire resistances with "
                         "(tile / global: can the reference-vector rescale undo an IR drop?)")
    common_args(ap, seeds=None)
    args = ap.parse_args(argv)
    bench = Bench(args)
    stem = f"devices-{args.model}-W4A8"
    res = bench.results(f"{stem}.csv", FIELDS)
    sizes = Sizes(args.model, bench)
    prev = {}
    json_path = bench.out / "devices.json"
    if json_path.exists():
        import json
        prev = json.loads(json_path.read_text())
    spd = {}
    if "speed" in args.parts and "slowdown_vs_ideal_arrays" not in prev:
        spd = speed(sizes, args.speed_images, 500)
    points = [pt for part in args.parts if part in PARTS
              for pt in (part_c(args.sizes, args.c_compensation) if part == "c"
                         else PARTS[part](args.sizes))]
    for part, size, key, value, device, comp in points:
        # ideal cells (wires aside) draw nothing at random: every chip is the same
        ideal = Device(**device).cells_ideal
        chips = [0] if ideal else list(range(args.instances))
        name = point_name(part, size, key, value, comp)
        todo = [c for c in chips if f"{name}/chip={c}" not in res]
        if not todo:
            continue
        xb, prep = sizes.set_cells(size, device, comp)
        images, labels = bench.test_set(prep)
        for chip in todo:
            program_chips(prep.net, chip)
            reset_adc_stats(prep.net)
            dt, top1 = timed(prep.net, images, labels, 500)
            res.append({"point": f"{name}/chip={chip}", "part": part, "model": args.model,
                        "size": size, "key": key, "value": value, "compensation": comp,
                        "chip": chip, "seed": 0, "top1": f"{top1:.4f}",
                        "adc_clip_fraction": f"{clip_fraction(prep.net):.6g}",
                        "images": len(images), "eval_s": f"{dt:.1f}"})
            log(f"{name}/chip={chip}: top-1 {100 * top1:.2f}% ({dt:.1f}s)")
    summ = summary(res.rows())
    md = [f"# Real devices: {args.model} W4A8 PTQ-SL on ISAAC-like arrays", "",
          "Top-1 on the CIFAR-10 test images of each row of the CSV (images column), analog "
          "array model `pimsim.crossbar.noisy` (2-bit cells, offset weights, 1-bit DAC, 8-bit "
          "ADC, full range). Chips: `crossbar.device.seed` 0..n-1."] + tables(summ)
    shown = spd or {k: prev[k] for k in ("slowdown_vs_ideal_arrays", "speed") if k in prev}
    if shown:
        s = shown["speed"]
        md += ["", f"Speed ({s['images']} images, {bench.threads} threads, {s['preset']}, "
               f"programming noise 0.02 + read noise 0.01): ideal array backend "
               f"{s['ideal_arrays_s']:.1f} s, analog model {s['analog_s']:.1f} s: "
               f"**{shown['slowdown_vs_ideal_arrays']:.2f}x**."]
    if summ:
        plot(summ, bench.out / f"{stem}.png")
    bench.write_json("devices.json", {**spd, "model": args.model, "csv": res.path.name,
                                      "points": summ}, merge=True)
    bench.write_md(f"{stem}.md", md, rows=res.rows())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
