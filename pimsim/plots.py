"""Plots of sweep and granularity results: accuracy heatmaps over (r, c) and (r, m) like the
paper's tables, and accuracy vs scale-memory overhead and vs energy with the Pareto front.

Reads the CSV rows of ``pimsim sweep`` and of ``benchmarks/results/granularity-*.csv`` (columns
model, wbits, abits, calibration, method, r, c, m, scales, top1, ...). Rows without cost columns
get them from ``pimsim.cost`` (default ``Crossbar()``, non-strict placement, default constants).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .quant import Granularity

GROUP = ("model", "wbits", "abits", "calibration")
METHOD_COLUMNS = {"channelwise": (), "layerwise": (), "method1": ("r", "c"), "method2": ("r", "m")}


class ResultsError(ValueError):
    """A results CSV that cannot be plotted (missing columns, no rows, bad values); the message
    names the file and, for a bad value, the row and column."""


def _num(v):
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


def read_rows(path) -> list[dict]:
    """The rows of a results CSV with numbers parsed and empty cells as None.

    ResultsError naming the file for a CSV without the columns the plots need (model, wbits,
    abits, calibration, method, top1), without rows, or with a row whose method is unknown or
    lacks its r / c / m; FileNotFoundError when it is absent (or a folder)."""
    p = Path(path)
    if p.is_dir():
        raise ResultsError(f"{p} is a folder; give a results CSV")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: results file not found")
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = [{k: _num(v) for k, v in r.items()} for r in reader]
    except (csv.Error, UnicodeDecodeError) as e:
        raise ResultsError(f"{p}: not a readable CSV ({e})") from None
    missing = [k for k in (*GROUP, "method", "top1") if k not in header]
    if not header:
        raise ResultsError(f"{p}: empty file: no header and no rows in {p.name}")
    if missing:
        raise ResultsError(f"{p}: missing column(s) {', '.join(missing)}; expected a pimsim "
                           f"sweep or granularity CSV (columns {', '.join((*GROUP, 'method', 'top1'))}, ...)")
    if not rows:
        raise ResultsError(f"{p}: no rows in {p.name} (only the header)")
    for i, r in enumerate(rows, start=2):                 # line 1 is the header
        m = r["method"]
        if m not in METHOD_COLUMNS:
            raise ResultsError(f"{p}: line {i}: method {m!r} unknown; allowed: "
                               f"{', '.join(METHOD_COLUMNS)}")
        for col in METHOD_COLUMNS[m]:
            v = r.get(col)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ResultsError(f"{p}: line {i}: {m} needs column {col} = an integer >= 1, "
                                   f"got {'nothing' if v is None else repr(v)}")
        v = r["top1"]
        if v is not None and (not isinstance(v, (int, float)) or not 0 <= v <= 1):
            raise ResultsError(f"{p}: line {i}: top1 must be a fraction in 0..1 or empty, "
                               f"got {v!r}")
    return mean_over_seeds(rows)


# Columns that differ between runs of the same point (one row per calibration seed).
PER_RUN = ("point", "seed", "top1", "fp_top1", "calibration_s", "eval_s", "commit", "threads",
           "date", "command")


def mean_over_seeds(rows: list[dict]) -> list[dict]:
    """One row per point: rows that differ only in their per-run columns (``PER_RUN``: the
    seed, accuracies, timings, provenance) are merged into their first, with ``top1`` (and
    ``fp_top1``) the mean over them, ``top1_sd`` their sample sd and ``seeds`` their count."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple(sorted((k, str(v)) for k, v in r.items() if k not in PER_RUN))
        groups.setdefault(key, []).append(r)
    out = []
    for rs in groups.values():
        row = dict(rs[0])
        for col in ("top1", "fp_top1"):
            vals = [r[col] for r in rs if isinstance(r.get(col), (int, float))]
            if vals:
                row[col] = float(np.mean(vals))
                if col == "top1":
                    row["top1_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        row["seeds"] = len(rs)
        out.append(row)
    return out


def granularity_of(row: dict) -> Granularity:
    """The ``Granularity`` of a result row (columns method, r, c, m)."""
    m = row["method"]
    if m == "channelwise":
        return Granularity.channelwise()
    if m == "layerwise":
        return Granularity.layerwise()
    if m == "method1":
        return Granularity.tile(int(row["r"]), int(row["c"]))
    if m == "method2":
        return Granularity.split(int(row["r"]), int(row["m"]))
    raise ValueError(f"unknown method {m!r} (channelwise, layerwise, method1, method2)")


def add_cost(rows: list[dict], crossbar=None, params=None) -> list[dict]:
    """Fill ``cost_scale_overhead``, ``cost_energy_nj`` (and the other totals) of rows that do
    not have them, with ``pimsim.cost`` on the default crossbar; returns ``rows``."""
    from .cost import model_shapes, network_cost
    from .crossbar import Crossbar
    xb = crossbar or Crossbar()
    cache = {}
    for r in rows:
        if r.get("cost_energy_nj") is not None and r.get("cost_scale_overhead") is not None:
            continue
        key = (r["model"], r["method"], r.get("r"), r.get("c"), r.get("m"), r["wbits"], r["abits"])
        if key not in cache:
            cache[key] = network_cost(model_shapes(r["model"]), granularity_of(r), int(r["wbits"]),
                                      int(r["abits"]), xb, params, strict=False)["totals"]
        for k, v in cache[key].items():
            if not isinstance(v, dict):
                r[f"cost_{k}"] = v
    return rows


def pareto_front(cost, acc) -> np.ndarray:
    """Boolean mask of the points no other point beats: lower-or-equal cost and higher-or-equal
    accuracy, one of them strictly. NaN points are never on the front."""
    x, y = np.asarray(cost, float), np.asarray(acc, float)
    ok = ~(np.isnan(x) | np.isnan(y))
    front = np.zeros(len(x), bool)
    for i in np.flatnonzero(ok):
        dom = ok & (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        front[i] = not dom.any()
    return front


GRANULARITY_KEYS = {"quant.tile", "quant.splits"}
SAME_AS_GROUP = {"model.name", "quant.weight_bits", "quant.act_bits", "quant.calibration"}


def _is_granularity_column(rows, col) -> bool:
    """A sweep grid column that only chooses the granularity (quant.tile / quant.splits)."""
    import json
    if col in GRANULARITY_KEYS:
        return True
    for r in rows:
        try:
            v = json.loads(r[col]) if isinstance(r[col], str) else None
        except ValueError:
            return False
        if not isinstance(v, dict) or not set(v) <= GRANULARITY_KEYS:
            return False
    return True


def setting_columns(rows) -> list[str]:
    """Sweep grid columns (between ``point`` and ``model``) other than the granularity ones,
    e.g. ``base`` (a hardware preset) or ``crossbar.rows``: the heatmaps are drawn per value."""
    if not rows or "point" not in rows[0]:
        return []
    cols = list(rows[0])
    grid = cols[cols.index("point") + 1:cols.index("model")]
    return [c for c in grid if c not in SAME_AS_GROUP and not _is_granularity_column(rows, c)]


def _short(v) -> str:
    s = str(v)
    return Path(s).stem if s.endswith((".yaml", ".yml")) else s


def _groups(rows, extra=()):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in (*GROUP, *extra)), []).append(r)
    return out


def _label(key) -> str:
    model, w, a, calib, *extra = key
    return " ".join([f"{model} W{w}A{a} {calib}", *(_short(e) for e in extra)])


def _stem(path: Path, key) -> str:
    """File stem of a group's plots: the CSV stem, plus model-bits-calibration unless the stem
    already says it, plus the setting values."""
    model, w, a, calib, *extra = key
    slug = f"{model}-W{w}A{a}-{calib}"
    parts = [path.stem] if slug in path.stem else [path.stem, slug]
    return "-".join(parts + [_short(e).replace("/", "_") for e in extra])


def heatmap(rows, method: str, path, title: str):
    """Top-1 (%) over r (rows) x c (method1) or r x m (method2); returns the path or None
    when ``rows`` has no point of ``method``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    col = "c" if method == "method1" else "m"
    pts = [r for r in rows if r["method"] == method and r.get("top1") is not None]
    if len(pts) < 2:                                   # one cell is no map
        return None
    rs = sorted({int(r["r"]) for r in pts}, reverse=True)
    cs = sorted({int(r[col]) for r in pts}, reverse=(method == "method1"))
    grid = np.full((len(rs), len(cs)), np.nan)
    for r in pts:
        grid[rs.index(int(r["r"])), cs.index(int(r[col]))] = 100 * float(r["top1"])
    fig, ax = plt.subplots(figsize=(1.2 * len(cs) + 2.5, 0.7 * len(rs) + 2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for i in range(len(rs)):
        for j in range(len(cs)):
            v = grid[i, j]
            txt = "-" if np.isnan(v) else f"{v:.2f}"
            dark = not np.isnan(v) and (v - lo) < 0.5 * (hi - lo)
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(cs)), [str(c) for c in cs])
    ax.set_yticks(range(len(rs)), [str(r) for r in rs])
    ax.set_xlabel("c, inputs per tile (weight-matrix columns)" if method == "method1"
                  else "m, splits per row block (c = ceil(K/m))")
    ax.set_ylabel("r, output rows per tile")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="top-1 accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _kind(r) -> str:
    return r["method"]


MARKERS = {"channelwise": ("*", "tab:red"), "layerwise": ("X", "tab:purple"),
           "method1": ("o", "tab:blue"), "method2": ("s", "tab:green")}


def pareto_scatter(rows, x_key: str, x_scale: float, xlabel: str, path, title: str,
                   log_x: bool = False, label_columns=()):
    """Top-1 (%) against ``x_key * x_scale`` with the Pareto front drawn and its points
    ringed; returns the path (None when no row has both values)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in rows if r.get(x_key) is not None and r.get("top1") is not None]
    if not pts:
        return None
    x = np.array([float(r[x_key]) * x_scale for r in pts])
    y = np.array([100 * float(r["top1"]) for r in pts])
    front = pareto_front(x, y)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for kind, (marker, color) in MARKERS.items():
        sel = np.array([_kind(r) == kind for r in pts])
        if sel.any():
            ax.scatter(x[sel], y[sel], marker=marker, color=color, s=60 if marker == "*" else 28,
                       label=kind, alpha=0.8, zorder=5 if kind in ("channelwise", "layerwise") else 3)
    order = np.argsort(x[front])
    ax.step(x[front][order], y[front][order], where="post", color="black", lw=1.2,
            label="Pareto front", zorder=2)
    ax.scatter(x[front], y[front], facecolors="none", edgecolors="black", s=110, zorder=4)
    for i in np.flatnonzero(front):
        g = granularity_of(pts[i])
        text = " ".join([g.label(), *(_short(pts[i][c]) for c in label_columns)])
        ax.annotate(text, (x[i], y[i]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_results(path, out_dir=None, progress: bool = False) -> list[Path]:
    """All plots of one results CSV, per (model, bits, calibration) group; returns the files."""
    path = Path(path)
    out = Path(out_dir) if out_dir is not None else path.parent
    out.mkdir(parents=True, exist_ok=True)
    rows = add_cost(read_rows(path))
    written = []
    extra = setting_columns(rows)
    for key, grp in _groups(rows, extra).items():         # heatmaps: one per setting
        stem = _stem(path, key)
        for method, what in (("method1", "Method 1 tiles r x c"),
                             ("method2", "Method 2: r rows x m splits")):
            p = heatmap(grp, method, out / f"{stem}-heatmap-{method}.png",
                        f"{_label(key)}: top-1 (%), {what}")
            if p:
                written.append(p)
    for key, grp in _groups(rows).items():                # scatters: settings compete
        stem = _stem(path, key)
        for x_key, scale, xlabel, name, what, log_x in (
                ("cost_scale_overhead", 100, "scale memory overhead (% of weight memory bits)",
                 "pareto-scale", "accuracy vs scale memory", True),
                ("cost_energy_nj", 1e-3, "energy per inference (uJ)", "pareto-energy",
                 "accuracy vs energy", False)):
            p = pareto_scatter(grp, x_key, scale, xlabel, out / f"{stem}-{name}.png",
                               f"{_label(key)}: {what}", log_x, extra)
            if p:
                written.append(p)
    return written

