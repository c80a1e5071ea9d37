"""Parameter sweeps: a grid of config overrides, one ``pimsim.simulate.run`` per point, one CSV
row per finished point, resumable, on local processes or on a Dask cluster.

A sweep file (YAML)::

    base: hwconfigs/default.yaml     # a config file (relative to the sweep file, then the cwd)
                                     # or an inline config mapping; [pimsim defaults]
                                     # or, as a grid axis, a list of config files (hardware
                                     # presets, models): grid: {base: [a.yaml, b.yaml]}
    set:                             # overrides applied to every point (dotted keys)   [none]
      eval.limit: 1000
      quant.calibration: max
    grid:                            # the cartesian product of these axes
      quant.weight_bits: [3, 4]      # a dotted config key: a list of values
      granularity:                   # any other name: a list of override mappings, for values
        - {quant.tile: channelwise}  #   that only make sense together
        - {quant.tile: [16, 36]}
        - {quant.tile: [4, null], quant.splits: 4}
    out: results/sweep.csv           # default --out (relative to the sweep file)  [<sweep>.csv]

Every point is validated (``pimsim.config.validate``) before any work starts. A point's key is
the canonical JSON of its overrides (``set`` and grid values, and ``base`` when it is a grid
axis); rows go to the CSV in the parent
process as points finish, each written with one ``write`` + flush + fsync, so a killed sweep
loses at most the points still running. On rerun, rows already in the file are skipped and a
partial last line (a kill in the middle of a write) is dropped. A point that raises is reported
and not written; the other points still run, and a rerun retries it.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import Config, ConfigError, fmt_value, read_yaml, validate
from .provenance import CSV_FIELDS, now, provenance

SWEEP_KEYS = ("base", "set", "grid", "out")

# Result columns after the point key and the grid-key columns. The first block matches the
# columns of benchmarks/results/granularity-*.csv, so pimsim.plots reads both.
RESULT_COLUMNS = ("model", "wbits", "abits", "calibration", "method", "r", "c", "m", "scales",
                  "top1", "fp_top1", "images", "calibration_s", "eval_s")
# Cost totals (pimsim.cost) copied into each row as cost_<name>, when the run reports them.
COST_COLUMNS = ("weight_bits", "scale_bits", "scale_overhead", "macs", "rescale_mults",
                "psum_adds", "arrays", "utilization", "adc_conversions", "energy_nj", "latency_us")
# Provenance of each row (pimsim.provenance): the calibration seed, code commit, threads, date
# and command line of the sweep that wrote it.
PROVENANCE_COLUMNS = CSV_FIELDS
# Columns that differ between two runs of the same point (timings, the date it finished).
TIMING_COLUMNS = ("calibration_s", "eval_s", "date")


class SweepError(RuntimeError):
    """Some points of a sweep failed; ``failures`` maps point key -> error text."""

    def __init__(self, failures: dict):
        self.failures = failures
        lines = [f"  {k}: {v}" for k, v in failures.items()]
        super().__init__(f"{len(failures)} point(s) failed (rerun the sweep to retry them):\n"
                         + "\n".join(lines))


@dataclass
class Point:
    """One point of a sweep: its overrides (dotted key -> value) and the validated config."""

    overrides: dict
    cfg: Config
    axes: dict = field(default_factory=dict)     # grid column -> value shown in the CSV
    base_raw: dict = field(default_factory=dict)  # the base config of this point
    base_source: str = "<defaults>"
    base: str | None = None                       # the base file when base is a grid axis

    @property
    def key(self) -> str:
        return point_key(self.overrides if self.base is None
                         else {**self.overrides, "base": self.base})


def point_key(overrides: dict) -> str:
    """Canonical JSON of a point's overrides: the identity of a row in the results file."""
    return json.dumps(overrides, sort_keys=True, separators=(",", ":"))


@dataclass
class Sweep:
    """A parsed sweep file: the base config, the points in grid order and the default output."""

    source: str
    base_raw: dict
    base_source: str
    points: list
    out: Path
    grid_columns: list

    @property
    def columns(self) -> list:
        return ["point", *self.grid_columns, *RESULT_COLUMNS,
                *(f"cost_{k}" for k in COST_COLUMNS), *PROVENANCE_COLUMNS]


def _err(source, key, value, what) -> ConfigError:
    return ConfigError(f"{source}: {key}: {fmt_value(value)}: {what}")


def _check_dotted(source, where, key):
    if not isinstance(key, str) or key.count(".") < 1:
        raise _err(source, where, key, "override keys are dotted config keys, e.g. quant.tile")


def _load_base(source: str, base) -> tuple[dict, str]:
    if base is None:
        return {}, "<defaults>"
    if isinstance(base, dict):
        return base, source
    if not isinstance(base, str) or not base:
        raise _err(source, "base", base, "must be a config file path or an inline config mapping")
    looked = [Path(base)] if Path(base).is_absolute() else [Path(source).resolve().parent / base,
                                                             Path.cwd() / base]
    for p in looked:
        if p.is_file():
            try:
                raw = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                raise _err(source, "base", base, f"not valid YAML: {e}") from None
            return raw or {}, str(p)
    raise _err(source, "base", base,
               "config file not found; looked in " + ", ".join(str(p) for p in looked))


def _axis_values(source, name, values) -> list[dict]:
    """A grid axis -> list of override mappings (one per value)."""
    where = f"grid.{name}"
    if not isinstance(values, list) or not values:
        raise _err(source, where, values, "must be a non-empty list of values")
    if "." in name:
        return [{name: v} for v in values]
    out = []
    for v in values:
        if not isinstance(v, dict) or not v:
            raise _err(source, where, v, "a grid axis without a dot in its name lists mappings "
                                         "of overrides, e.g. {quant.tile: [4, null], "
                                         "quant.splits: 4}")
        for k in v:
            _check_dotted(source, where, k)
        out.append(dict(v))
    return out


def _show(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def parse(raw, source: str = "<sweep>") -> Sweep:
    """Validate a sweep mapping (see the module docstring) and build all its points."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of {', '.join(SWEEP_KEYS)}")
    for k in raw:
        if k not in SWEEP_KEYS:
            raise _err(source, k, raw[k], f"unknown key; allowed: {', '.join(SWEEP_KEYS)}")
    grid = raw.get("grid")
    base_axis = isinstance(grid, dict) and "base" in grid
    if base_axis and raw.get("base") is not None:
        raise _err(source, "base", raw["base"], "give base either at the top or as a grid axis "
                                                "(grid: {base: [...]}), not both")
    base_raw, base_source = _load_base(source, raw.get("base"))
    fixed = raw.get("set") or {}
    if not isinstance(fixed, dict):
        raise _err(source, "set", fixed, "must be a mapping of dotted config keys to values")
    for k in fixed:
        _check_dotted(source, "set", k)
    if not isinstance(grid, dict) or not grid:
        raise _err(source, "grid", grid, "must be a non-empty mapping of axes to lists of values")
    axes = {name: _axis_values(source, name, vals) for name, vals in grid.items()
            if name != "base"}
    bases = [(None, base_raw, base_source)]
    if base_axis:
        vals = grid["base"]
        if not isinstance(vals, list) or not vals or not all(isinstance(v, str) and v
                                                              for v in vals):
            raise _err(source, "grid.base", vals, "must be a non-empty list of config files")
        bases = [(v, *_load_base(source, v)) for v in vals]
        axes = {"base": [{"base": i} for i in range(len(vals))], **axes}   # index into bases
    points, seen = [], {}
    for combo in itertools.product(*axes.values()):
        overrides = dict(fixed)
        shown = {}
        base_name, b_raw, b_source = bases[0]
        for name, ov in zip(axes, combo):
            if name == "base":
                base_name, b_raw, b_source = bases[ov["base"]]
                shown["base"] = base_name
                continue
            for k in ov:
                if k in overrides and k not in fixed:
                    raise _err(source, f"grid.{name}", ov,
                               f"sets {k}, which another grid axis also sets")
            overrides.update(ov)
            shown[name] = _show(ov[name]) if name in ov else _show(ov)
        try:
            cfg = validate(b_raw, b_source, list(overrides.items()))
        except ConfigError as e:
            where = "" if base_name is None else f" (base {base_name})"
            raise ConfigError(f"{source}: grid point {point_key(overrides)}{where}: {e}") from None
        p = Point(overrides, cfg, shown, b_raw, b_source, base_name)
        if p.key in seen:
            raise _err(source, "grid", grid, f"point {p.key} occurs twice")
        seen[p.key] = p
        points.append(p)
    out = raw.get("out")
    if out is None:
        out = Path(source).with_suffix(".csv") if source != "<sweep>" else Path("sweep.csv")
    elif not isinstance(out, str) or not out:
        raise _err(source, "out", out, "must be a file path")
    else:
        out = Path(out) if Path(out).is_absolute() or source == "<sweep>" else \
            Path(source).resolve().parent / out
    return Sweep(source, base_raw, base_source, points, Path(out), list(axes))


def load(path) -> Sweep:
    """Read and validate a sweep YAML file."""
    return parse(read_yaml(path, "sweep file"), str(path))


# --------------------------------------------------------------------------- one point


def result_row(res: dict) -> dict:
    """The result columns of one ``pimsim.simulate.run`` result (granularity CSV layout)."""
    cfg = res["config"]
    q = cfg["quant"]
    tile, splits = q["tile"], q["splits"]
    if tile in ("channelwise", "layerwise"):
        method, r, c, m = tile, "", "", ""
    elif tile == "crossbar":                        # the tile that fills one array
        g = Config(cfg).granularity
        method, r, c, m = "method1", g.r, g.c, ""
    elif tile[1] is None:
        method, r, c, m = "method2", tile[0], "", splits
    else:
        method, r, c, m = "method1", tile[0], tile[1], ""
    row = {"model": cfg["model"]["name"] or cfg["model"].get("factory"), "wbits": q["weight_bits"], "abits": q["act_bits"],
           "calibration": q["calibration"], "method": method, "r": r, "c": c, "m": m,
           "scales": sum(l["scales"] for l in res["layers"]),
           "top1": res["top1"], "fp_top1": res["fp_top1"], "images": res["images"],
           "calibration_s": round(res["calibration_s"], 3), "eval_s": round(res["eval_s"], 3),
           "seed": q["seed"]}
    cost = res.get("cost") or {}
    for k in COST_COLUMNS:
        row[f"cost_{k}"] = cost.get(k, "")
    return row


def run_point(base_raw: dict, base_source: str, overrides: dict, data_dir=None) -> dict:
    """Run one point in this process with 1 thread for torch and Numba (``eval.threads: 1``,
    which ``simulate.run`` sets for the run only); its result columns.

    The same function runs in a local worker process and on a Dask worker.
    """
    from .simulate import run
    cfg = validate(base_raw, base_source, list(overrides.items()) + [("eval.threads", 1)])
    return result_row(run(cfg, data_dir=data_dir, progress=False))


def worker_init() -> None:
    """Entry point of a local sweep worker process (its own top level): one thread for torch
    and Numba for the life of the process."""
    from .kernels import set_threads
    set_threads(1)


# --------------------------------------------------------------------------- results file


def _parse_line(line: str, ncols: int):
    rows = list(csv.reader([line]))
    return rows[0] if rows and len(rows[0]) == ncols else None


def read_results(path, columns=None) -> tuple[list[dict], list[str]]:
    """Rows of a results CSV (as string dicts) and its header; a partial or malformed last line
    (a sweep killed while writing) is left out. ``columns``: the header the file must have."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return [], list(columns or [])
    text = p.read_text()
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]          # tail: text after the last newline
    if not complete:
        return [], list(columns or [])
    header = next(csv.reader([complete[0]]))
    if columns is not None and header != list(columns):
        raise ConfigError(f"{p}: header {','.join(header)} does not match this sweep's columns "
                          f"{','.join(columns)}; use another --out file")
    rows = []
    for i, line in enumerate(complete[1:], start=2):
        vals = _parse_line(line, len(header))
        if vals is None:
            if i == len(complete):                  # a torn last line: drop it
                break
            raise ConfigError(f"{p}: line {i}: expected {len(header)} fields: {line[:80]!r}")
        rows.append(dict(zip(header, vals)))
    del tail                                        # a partial line without newline: dropped
    return rows, header


class ResultsFile:
    """Append-only CSV of sweep rows: header on creation, torn tail dropped, fsync per row."""

    def __init__(self, path, columns):
        self.path = Path(path)
        self.columns = list(columns)
        rows, _ = read_results(self.path, self.columns)
        self.done = {r["point"] for r in rows}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = self._header() + "".join(self._line(r) for r in rows)
        if not self.path.is_file() or self.path.read_text() != keep:
            tmp = self.path.with_name(self.path.name + ".tmp")  # rewrite without the torn tail
            with open(tmp, "w", newline="") as f:
                f.write(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def _header(self) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(self.columns)
        return buf.getvalue()

    def _line(self, row: dict) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([row.get(c, "") for c in self.columns])
        return buf.getvalue()

    def append(self, row: dict) -> None:
        data = self._line(row).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done.add(row["point"])


# --------------------------------------------------------------------------- running


def _local_executor(workers: int):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    # spawn: a fresh interpreter per worker (torch/OpenMP do not survive fork); it inherits
    # sys.path, so the worker imports the same pimsim as the parent.
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=worker_init)


def run_sweep(sweep: Sweep, out=None, workers: int | None = None, scheduler=None,
              data_dir=None, progress: bool = True, fn=run_point) -> dict:
    """Run the points of ``sweep`` not yet in ``out`` and append one row per finished point.

    ``scheduler``: a Dask scheduler address (or a ``distributed.Client``) to run the points on;
    otherwise a local process pool of ``workers`` processes (default: all cores).
    ``fn(base_raw, base_source, overrides, data_dir) -> dict`` computes one point.
    Returns ``{"out", "points", "skipped", "ran"}``; raises ``SweepError`` if points failed.
    """
    from tqdm.auto import tqdm
    path = Path(out) if out is not None else sweep.out
    results = ResultsFile(path, sweep.columns)
    prov = provenance(threads=1)        # each point runs with one thread (run_point)
    todo = [p for p in sweep.points if p.key not in results.done]
    skipped = len(sweep.points) - len(todo)
    failures = {}
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress,
               postfix={"skipped": skipped} if skipped else None)

    def finish(p: Point, row=None, error=None):
        if error is not None:
            failures[p.key] = f"{type(error).__name__}: {error}"
            bar.write(f"point {p.key} failed: {type(error).__name__}: {error}")
        else:
            results.append({"point": p.key, **p.axes, **row, "commit": prov["commit"],
                            "threads": prov["threads"], "command": prov["command"],
                            "date": now()})
        bar.update(1)

    args = lambda p: (p.base_raw, p.base_source, p.overrides, data_dir)  # noqa: E731
    try:
        if not todo:
            pass
        elif scheduler is not None:
            from distributed import Client, as_completed
            client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
            try:
                futs = {client.submit(fn, *args(p), pure=False): p for p in todo}
                for fut in as_completed(futs):
                    try:
                        finish(futs[fut], fut.result())
                    except Exception as e:           # noqa: BLE001 — reported per point
                        finish(futs[fut], error=e)
            finally:
                if client is not scheduler:
                    client.close()
        else:
            from concurrent.futures import as_completed as cf_completed
            n = max(1, min(workers or os.cpu_count() or 1, len(todo)))
            ex = _local_executor(n)
            try:
                futs = {ex.submit(fn, *args(p)): p for p in todo}
                for fut in cf_completed(futs):
                    try:
                        finish(futs[fut], fut.result())
                    except Exception as e:           # noqa: BLE001 — reported per point
                        finish(futs[fut], error=e)
            except BaseException:                    # Ctrl-C: drop the points not started
                ex.shutdown(wait=False, cancel_futures=True)
                raise
            ex.shutdown(wait=True)
    finally:
        bar.close()
    if failures:
        raise SweepError(failures)
    return {"out": str(path), "points": len(sweep.points), "skipped": skipped, "ran": len(todo)}
