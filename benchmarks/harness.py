"""The shared harness of pimsim's benchmark scripts.

Every benchmark parses the same common options (``common_args``), sets its thread count once
(``Bench``: the library never changes it behind a caller's back), prepares the model and data
through ``pimsim.simulate`` exactly as ``pimsim run`` does, and writes its results through
``Results`` (an append-only CSV on ``pimsim.sweep.ResultsFile``: header on creation, torn tail
dropped, fsync per row, so an interrupted benchmark resumes where it stopped) and
``write_json`` / ``write_md``. Each of those records the provenance of ``pimsim.provenance``:
git commit, command, seeds, threads and date (CSV: a column each, per row).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from pimsim.calibrate import calibrate
from pimsim.config import validate
from pimsim.data import calibration_set, load_cifar10, to_tensor
from pimsim.kernels import set_threads
from pimsim.provenance import CSV_FIELDS, footer, now, provenance
from pimsim.quant import Granularity
from pimsim.simulate import calibration_params, evaluate, prepare
from pimsim.sweep import ResultsFile, read_results

RESULTS = Path(__file__).resolve().parent / "results"


def common_args(ap: argparse.ArgumentParser, seeds=(0,), threads: int = 0,
                limit: bool = True) -> argparse.ArgumentParser:
    """Add the options every benchmark shares: --limit (unless ``limit`` is False: a benchmark
    that reads no test images), --threads, --out and, unless ``seeds`` is None (a benchmark
    with one fixed seed), --seeds."""
    if limit:
        ap.add_argument("--limit", type=positive_int, default=None, help="first N test images only")
    ap.add_argument("--threads", type=int, default=threads,
                    help=f"torch/Numba threads (0 = all cores; default {threads})")
    if seeds is not None:
        ap.add_argument("--seeds", type=int, nargs="+", default=list(seeds),
                        help="calibration seeds (quant.seed); one result per seed "
                             f"(default {' '.join(map(str, seeds))})")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    return ap


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def granularity(method: str, r=None, c=None, m=None) -> Granularity:
    """The Granularity of a benchmark point: channelwise, layerwise, method1 (r x c tiles) or
    method2 (r rows x ceil(K/m) columns)."""
    if method == "channelwise":
        return Granularity.channelwise()
    if method == "layerwise":
        return Granularity.layerwise()
    if method == "method1":
        return Granularity.tile(int(r), int(c))
    if method == "method2":
        return Granularity.split(int(r), int(m))
    raise ValueError(f"unknown granularity method {method!r}")


class Bench:
    """One benchmark run: threads set once, provenance taken once, models prepared on demand."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.threads = set_threads(args.threads)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prov = provenance(seeds=list(getattr(args, "seeds", None) or [0]), threads=self.threads)
        self._preps = {}
        self._test = {}

    # ----------------------------------------------------------------- model and data
    def prepare(self, model: str, **quant):
        """``pimsim.simulate.prepare`` of a default config for ``model`` (cached per model)."""
        key = (model, tuple(sorted(quant.items())))
        if key not in self._preps:
            self._preps[key] = prepare(validate({"model": {"name": model}, "quant": dict(quant)}))
        return self._preps[key]

    def test_set(self, prep):
        key = str(prep.data_dir)
        if key not in self._test:
            self._test[key] = load_cifar10("test", prep.data_dir,
                                           limit=getattr(self.args, "limit", None))
        return self._test[key]

    def calibration(self, prep, seed: int):
        """The calibration images of ``pimsim run`` with ``quant.seed = seed``."""
        return to_tensor(calibration_set(prep.cfg["quant.calib_images"], seed, prep.data_dir)[0])

    def point(self, prep, gran: Granularity, wbits: int, abits: int, method: str, seed: int,
              mode: str = "fake", params: dict | None = None) -> dict:
        """Calibrate ``prep.net`` (first and last layer in float) and measure top-1 on the
        test set in ``mode``: ``{"top1", "scales", "calibration_s", "images"}``. ``params``:
        search parameters over the config's (``quant.search.*``)."""
        net = prep.net
        t0 = time.perf_counter()
        calibrate(net, self.calibration(prep, seed), gran, wbits, abits, method=method,
                  progress=False, params={**calibration_params(prep.cfg), **(params or {})})
        calib_s = time.perf_counter() - t0
        net.set_mode(mode)
        images, labels = self.test_set(prep)
        top1, _ = evaluate(net, images, labels, 500, progress=False)
        return {"top1": f"{top1:.4f}", "calibration_s": f"{calib_s:.2f}",
                "scales": sum(l.quant.grid.n_tiles for l in net.quantized_layers),
                "images": len(images)}

    # ----------------------------------------------------------------- results
    def results(self, name: str, columns) -> "Results":
        return Results(self.out / name, columns, self.prov)

    def write_json(self, name: str, data: dict, merge: bool = False) -> Path:
        """Write ``data`` plus this run's ``provenance`` to ``out/name``; ``merge``: update an
        existing file's keys (each merged key keeps its own provenance under
        ``provenance_of``)."""
        path = self.out / name
        if merge and path.is_file():
            old = json.loads(path.read_text())
            of = old.pop("provenance_of", {})
            prov_old = old.pop("provenance", None)
            for k in old:
                of.setdefault(k, prov_old)
            old.update(data)
            for k in data:
                of[k] = self.prov
            data = {**old, "provenance_of": of, "provenance": self.prov}
        else:
            data = {**data, "provenance": self.prov}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
        return path

    def write_md(self, name: str, lines: list[str], echo: bool = True, rows=None) -> Path:
        """Write ``lines`` and the provenance footer to ``out/name``. ``rows``: the CSV rows
        the table was made from; their commits are named under the footer (a table made at
        one commit from rows computed at others must say so)."""
        path = self.out / name
        tail = [footer(self.prov)]
        if rows is not None:
            tail.append(rows_provenance(rows))
        text = "\n".join(lines + [""] + tail) + "\n"
        path.write_text(text)
        if echo:
            print(text)
        return path


class Results:
    """A benchmark's resumable CSV: one row per point, keyed by its ``point`` column, with the
    provenance columns of ``pimsim.provenance.CSV_FIELDS`` filled in on every row."""

    def __init__(self, path: Path, columns, prov: dict):
        cols = ["point"] + [c for c in columns if c not in ("point", *CSV_FIELDS)] + list(CSV_FIELDS)
        self.path = Path(path)
        self.prov = prov
        self.file = ResultsFile(self.path, cols)
        self.columns = cols

    def __contains__(self, point: str) -> bool:
        return point in self.file.done

    def append(self, row: dict) -> None:
        full = {"commit": self.prov["commit"], "threads": self.prov["threads"],
                "date": now(), "command": self.prov["command"], **row}
        missing = [c for c in ("point", "seed") if c not in full]
        if missing:
            raise ValueError(f"{self.path}: row lacks {missing}")
        self.file.append(full)

    def rows(self) -> list[dict]:
        return read_results(self.path, self.columns)[0]


def rows_provenance(rows) -> str:
    """A markdown line naming the commit(s) the table's rows were computed at, with row
    counts and dates; several commits are flagged (compare rows of one commit only)."""
    by = {}
    for r in rows:
        c = r.get("commit") or "unknown"
        by.setdefault(c, []).append(str(r.get("date") or "")[:10])
    if not by:
        return "No rows computed yet."
    parts = []
    for c, dates in sorted(by.items(), key=lambda kv: min(kv[1])):
        span = min(dates) if min(dates) == max(dates) else f"{min(dates)} to {max(dates)}"
        parts.append(f"`{c}` ({len(dates)} row{'s' if len(dates) != 1 else ''}, {span})")
    note = ""
    if any("provenance reconstructed" in str(r.get("command", "")) for r in rows):
        note = (" Some rows' provenance is reconstructed from git history (see the CSV's "
                "command column).")
    if len(parts) == 1:
        return f"Every row of the table was computed at commit {parts[0]}.{note}"
    return (f"The table's rows were computed at {len(parts)} commits (rows of different "
            f"commits may differ because the code did): " + "; ".join(parts) + "." + note)


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values, scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    """``mean ± sd`` of ``values`` (times ``scale``), or the one value; ``-`` for none.
    ``signed``: a difference, written with its sign (``+0.17 ± 0.11``)."""
    vals = [scale * float(v) for v in values]
    if not vals:
        return "-"
    sign = "+" if signed else ""
    if len(vals) == 1:
        return f"{vals[0]:{sign}.{digits}f}"
    m, s = mean_sd(vals)
    return f"{m:{sign}.{digits}f} ± {s:.{digits}f}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
