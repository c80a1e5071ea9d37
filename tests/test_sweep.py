"""Tests of parameter sweeps (pimsim.sweep, ``pimsim sweep``): validation, resumable CSV rows,
crash + rerun, local processes vs a Dask LocalCluster."""

from __future__ import annotations

import collections
import csv
import functools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pimsim.cli import main
from pimsim.config import ConfigError
from pimsim.sweep import (TIMING_COLUMNS, ResultsFile, SweepError, load, parse, point_key,
                          read_results, run_sweep)
from pimsim.testing import data_dir_or_skip, restored_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "hwconfigs" / "default.yaml"

FAST = {"eval.limit": 100, "quant.calibration": "max", "quant.calib_images": 16}
GRID = {"quant.weight_bits": [3, 4],
        "granularity": [{"quant.tile": "channelwise"}, {"quant.tile": [16, 36]},
                        {"quant.tile": [4, None], "quant.splits": 4}]}


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs set the process's torch and Numba thread counts; undo that."""
    with restored_threads():
        yield



def _write_sweep(tmp_path, body: dict, name="s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body, sort_keys=False))
    return p


def fake_point(base_raw, base_source, overrides, data_dir=None):
    """A stand-in for run_point: instant, deterministic, no data."""
    return {"model": "resnet20", "wbits": overrides.get("quant.weight_bits", 4),
            "top1": 0.5 + 0.01 * overrides.get("quant.weight_bits", 4)}


def crashing_point(bad_key, base_raw, base_source, overrides, data_dir=None):
    """fake_point, except that the point ``bad_key`` raises (a crashed worker)."""
    if point_key(overrides) == bad_key:
        raise RuntimeError("simulated worker crash")
    return fake_point(base_raw, base_source, overrides, data_dir)


def slow_point(base_raw, base_source, overrides, data_dir=None):
    time.sleep(0.4)
    return fake_point(base_raw, base_source, overrides, data_dir)


# --------------------------------------------------------------------------- parsing


def test_parse_builds_the_product_and_keys(tmp_path):
    sw = load(_write_sweep(tmp_path, {"base": str(DEFAULT_YAML), "set": FAST, "grid": GRID}))
    assert len(sw.points) == 6
    assert sw.out == tmp_path / "s.csv"
    assert sw.grid_columns == ["quant.weight_bits", "granularity"]
    p = sw.points[2]
    assert p.overrides == {**FAST, "quant.weight_bits": 3, "quant.tile": [4, None],
                           "quant.splits": 4}
    assert p.cfg["quant.splits"] == 4 and p.cfg["model.name"] == "resnet20"
    assert p.axes == {"quant.weight_bits": "3",
                      "granularity": '{"quant.tile":[4,null],"quant.splits":4}'}
    # the key is canonical: the order overrides were written in does not matter
    assert point_key(dict(reversed(list(p.overrides.items())))) == p.key
    assert len({q.key for q in sw.points}) == 6


def test_parse_inline_base_and_out(tmp_path):
    sw = load(_write_sweep(tmp_path, {"base": {"quant": {"weight_bits": 3}}, "out": "r/x.csv",
                                      "grid": {"quant.tile": ["channelwise", [8, 16]]}}))
    assert [p.cfg["quant.weight_bits"] for p in sw.points] == [3, 3]
    assert sw.out == tmp_path / "r" / "x.csv"


def test_parse_base_as_a_grid_axis(tmp_path):
    (tmp_path / "a.yaml").write_text("quant: {weight_bits: 3}\n")
    (tmp_path / "b.yaml").write_text("model: {name: resnet56}\ncrossbar: {rows: 64, cols: 64}\n")
    sw = load(_write_sweep(tmp_path, {"grid": {"base": ["a.yaml", "b.yaml"],
                                               "quant.tile": ["channelwise", [8, 16]]}}))
    assert sw.grid_columns == ["base", "quant.tile"]
    got = [(p.axes["base"], p.cfg["quant.weight_bits"], p.cfg["model.name"], p.axes["quant.tile"])
           for p in sw.points]
    assert got == [("a.yaml", 3, "resnet20", "channelwise"), ("a.yaml", 3, "resnet20", "[8,16]"),
                   ("b.yaml", 4, "resnet56", "channelwise"), ("b.yaml", 4, "resnet56", "[8,16]")]
    assert sw.points[2].cfg.crossbar.rows == 64 and sw.points[0].cfg.crossbar is None
    assert '"base":"b.yaml"' in sw.points[2].key and len({p.key for p in sw.points}) == 4
    with pytest.raises(ConfigError, match="not both"):
        parse({"base": "a.yaml", "grid": {"base": ["b.yaml"]}}, str(tmp_path / "s.yaml"))
    with pytest.raises(ConfigError, match="grid.base: \\[3\\]: must be a non-empty list of"):
        parse({"grid": {"base": [3]}}, str(tmp_path / "s.yaml"))
    # a point that does not fit its base's crossbar is an error before any work starts
    with pytest.raises(ConfigError, match=r"grid point .* \(base b.yaml\): .*quant.tile"):
        parse({"grid": {"base": ["b.yaml"], "quant.tile": [[64, 64]]}}, str(tmp_path / "s.yaml"))


@pytest.mark.parametrize("body, needle", [
    ({"grid": {"quant.tile": [[0, 4]]}}, "quant.tile: [0, 4]: must be"),
    ({"grid": {"quant.tile": [[4, None]]}}, "needs quant.splits"),
    ({"grid": {"quant.bogus": [1]}}, "quant.bogus: 1: unknown key"),
    ({"grid": {"quant.tile": []}}, "grid.quant.tile: []: must be a non-empty list"),
    ({"grid": {"g": [5]}}, "grid.g: 5: a grid axis without a dot"),
    ({"grid": {"g": [{"tile": 3}]}}, "grid.g: tile: override keys are dotted"),
    ({"grid": {"quant.tile": ["channelwise"]}, "extra": 1}, "extra: 1: unknown key"),
    ({"set": [1], "grid": {"quant.tile": ["channelwise"]}}, "set: [1]: must be a mapping"),
    ({}, "grid: null: must be a non-empty mapping"),
    ({"base": "nope.yaml", "grid": {"quant.tile": ["channelwise"]}}, "config file not found"),
    ({"grid": {"quant.tile": ["channelwise"],
               "g": [{"quant.tile": "layerwise"}]}}, "which another grid axis also sets"),
    ({"grid": {"quant.tile": ["channelwise", "channelwise"]}}, "occurs twice"),
])
def test_parse_errors_name_file_key_value(tmp_path, body, needle):
    path = _write_sweep(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith(str(path)), str(e.value)
    assert needle in str(e.value), str(e.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="sweep file not found"):
        load(tmp_path / "none.yaml")


# --------------------------------------------------------------------------- results file


def test_results_file_drops_a_torn_last_line(tmp_path):
    out = tmp_path / "r.csv"
    cols = ["point", "top1"]
    rf = ResultsFile(out, cols)
    rf.append({"point": '{"a":1}', "top1": 0.5})
    rf.append({"point": '{"a":2}', "top1": 0.6})
    with open(out, "a") as f:
        f.write('"{""a"":3}",0.')                 # a kill in the middle of a write
    rows, header = read_results(out, cols)
    assert header == cols and [r["point"] for r in rows] == ['{"a":1}', '{"a":2}']
    rf = ResultsFile(out, cols)                    # reopening rewrites the file without it
    assert rf.done == {'{"a":1}', '{"a":2}'}
    assert out.read_text().endswith('"{""a"":2}",0.6\n')
    rf.append({"point": '{"a":3}', "top1": 0.7})
    assert [r["top1"] for r in read_results(out, cols)[0]] == ["0.5", "0.6", "0.7"]


def test_results_file_rejects_another_sweeps_header(tmp_path):
    out = tmp_path / "r.csv"
    ResultsFile(out, ["point", "top1"])
    with pytest.raises(ConfigError, match="does not match this sweep's columns"):
        ResultsFile(out, ["point", "x", "top1"])


# --------------------------------------------------------------------------- crash + rerun


def _points_in(out):
    return collections.Counter(r["point"] for r in read_results(out)[0])


def test_crash_then_rerun_gives_every_point_once(tmp_path):
    sw = parse({"base": {}, "set": FAST, "grid": GRID}, str(tmp_path / "s.yaml"))
    out = tmp_path / "r.csv"
    bad = sw.points[2].key
    with pytest.raises(SweepError) as e:
        run_sweep(sw, out=out, workers=2, progress=False, fn=functools.partial(crashing_point, bad))
    assert list(e.value.failures) == [bad] and "simulated worker crash" in str(e.value)
    assert set(_points_in(out)) == {p.key for p in sw.points} - {bad}
    res = run_sweep(sw, out=out, workers=2, progress=False, fn=fake_point)
    assert res == {"out": str(out), "points": 6, "skipped": 5, "ran": 1}
    counts = _points_in(out)
    assert counts == {p.key: 1 for p in sw.points}
    rows = read_results(out, sw.columns)[0]
    assert {r["wbits"] for r in rows} == {"3", "4"}


def test_killed_sweep_process_resumes(tmp_path):
    """A sweep process killed (SIGKILL) after its first row, then rerun: every point once."""
    sweep_file = _write_sweep(tmp_path, {"base": {}, "set": FAST, "grid": GRID})
    out = tmp_path / "r.csv"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_sweep import slow_point
        from pimsim.sweep import load, run_sweep
        run_sweep(load({str(sweep_file)!r}), out={str(out)!r}, workers=1, progress=False,
                  fn=slow_point)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.is_file() and len(read_results(out)[0]) >= 1:
                break
            assert proc.poll() is None, "sweep process ended before writing a row"
            time.sleep(0.05)
        else:
            pytest.fail("no row written within 60 s")
    finally:
        os.killpg(proc.pid, 9)                     # the sweep and its worker process
        proc.wait()
    done = _points_in(out)
    assert 1 <= len(done) < 6 and set(done.values()) == {1}
    with open(out, "a") as f:                      # and a torn line, as if killed mid-write
        f.write('"{""eval.limit"":1')
    sw = load(sweep_file)
    res = run_sweep(sw, out=out, workers=2, progress=False, fn=fake_point)
    assert res["skipped"] == len(done) and res["ran"] == 6 - len(done)
    assert _points_in(out) == {p.key: 1 for p in sw.points}


# --------------------------------------------------------------------------- real points


@pytest.mark.slow
def test_dask_and_local_processes_give_identical_rows(tmp_path):
    data_dir_or_skip()
    from distributed import LocalCluster
    grid = {"quant.weight_bits": [4], "granularity": GRID["granularity"]}
    sw = parse({"base": str(DEFAULT_YAML), "set": FAST, "grid": grid}, str(tmp_path / "s.yaml"))
    local, dask = tmp_path / "local.csv", tmp_path / "dask.csv"
    run_sweep(sw, out=local, workers=2, progress=False)
    # a separate worker process reached through the scheduler's address, as on a real cluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        run_sweep(sw, out=dask, scheduler=cluster.scheduler_address, progress=False)
    strip = lambda rows: sorted(({k: v for k, v in r.items() if k not in TIMING_COLUMNS}  # noqa
                                 for r in rows), key=lambda r: r["point"])
    a, b = read_results(local, sw.columns)[0], read_results(dask, sw.columns)[0]
    assert len(a) == 3 and strip(a) == strip(b)
    by_method = {r["method"]: r for r in a}
    assert set(by_method) == {"channelwise", "method1", "method2"}
    assert by_method["channelwise"]["scales"] == "672"     # 16+16*6+32*6+64*6 output channels
    assert all(0.5 < float(r["top1"]) <= 1 and r["images"] == "100" for r in a)


@pytest.mark.slow
def test_cli_sweep_runs_and_resumes(tmp_path, capsys):
    data_dir_or_skip()
    sweep_file = _write_sweep(tmp_path, {"base": str(DEFAULT_YAML), "set": FAST,
                                         "grid": {"quant.tile": ["channelwise"]}})
    out = tmp_path / "o.csv"
    assert main(["sweep", str(sweep_file), "--workers", "1", "--out", str(out), "-q"]) == 0
    assert "ran 1 point(s), skipped 0" in capsys.readouterr().out
    assert main(["sweep", str(sweep_file), "--out", str(out), "-q"]) == 0
    assert "ran 0 point(s), skipped 1" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 1 and rows[0]["method"] == "channelwise"


def test_cli_sweep_bad_file_is_exit_2(tmp_path, capsys):
    bad = _write_sweep(tmp_path, {"grid": {"quant.weight_bits": [1]}})
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "quant.weight_bits: 1: must be in 2..16" in err
