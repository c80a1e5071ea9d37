"""The committed results of the benchmarks on benchmarks/harness.py are in the layout those
scripts write, so a rerun resumes them, and their markdown still follows from their CSV."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

harness = pytest.importorskip("harness")
from pimsim.provenance import CSV_FIELDS  # noqa: E402
from pimsim.sweep import read_results  # noqa: E402


def _module(name):
    return pytest.importorskip(name)


def _point(script: str, row: dict) -> str:
    """The point name the script gives a row (what a rerun looks up to skip it)."""
    mod = _module(script)
    s = int(row["seed"])
    if script == "bench_random_orders":
        return mod.point_name(s, row["kind"], row["sample"])
    if script == "bench_symmetric":
        return mod.point_name(s, row["wbits"], row["tile"], row["variant"])
    if script == "bench_adc":
        return mod.point_name(s, row["adc_bits"], row["policy"])
    if script == "bench_granularity":
        return mod.point_name(s, row["method"], row["r"], row["c"], row["m"])
    if script == "bench_irdrop":
        return mod.point_name(s, row["rows"], row["wire_r"])
    raise AssertionError(script)


CSVS = ([(p, "bench_random_orders") for p in sorted(RESULTS.rglob("random-orders-*.csv"))]
        + [(p, "bench_symmetric") for p in sorted(RESULTS.rglob("symmetric-*.csv"))]
        + [(p, "bench_adc") for p in sorted(RESULTS.rglob("adc-*.csv"))]
        + [(RESULTS / "granularity-resnet56-W4A8-ptqsl.csv", "bench_granularity")]
        + [(RESULTS / "irdrop.csv", "bench_irdrop")])


@pytest.mark.parametrize("path,script", CSVS, ids=lambda v: v if isinstance(v, str)
                         else str(v.relative_to(RESULTS)))
def test_committed_csv_is_in_its_scripts_layout_and_resumes(path, script):
    mod = _module(script)
    cols = ["point"] + [c for c in mod.FIELDS if c not in CSV_FIELDS] + list(CSV_FIELDS)
    assert path.read_text().split("\n", 1)[0] == ",".join(cols), f"{path}: header"
    rows, _ = read_results(path, cols)             # raises on a header the script rejects
    assert rows
    for i, r in enumerate(rows, start=2):
        assert r["point"] == _point(script, r), f"{path}:{i}: point {r['point']!r}"
    assert len({r["point"] for r in rows}) == len(rows), f"{path}: duplicate points"
    res = harness.Results(path, mod.FIELDS, {})     # what the script opens: nothing to redo
    assert all(r["point"] in res for r in rows)
    assert path.read_text().count("\n") == len(rows) + 1      # and the file was left as it was


def _body(md: Path) -> list[str]:
    """The markdown before its provenance footer."""
    text = md.read_text()
    return text[:text.rindex("\nProduced by `")].rstrip("\n").split("\n")


def test_random_orders_markdown_follows_from_its_csv():
    mod = _module("bench_random_orders")
    stem = RESULTS / "random-orders-resnet20-W4A8-r4m4"
    rows = mod.by_point(read_results(stem.with_suffix(".csv"))[0])
    assert len(rows) == 41 and rows[("identity", 0)]["top1"] == "0.8775"   # README: 87.75
    got = mod.summary(rows, "resnet20 W4A8 Method 2 r=4 m=4", 10000)
    assert got == _body(stem.with_suffix(".md"))


def test_symmetric_markdown_reads_old_single_seed_rows():
    """The single-seed file of older code (kept for reference) still reads: one seed, n = 1."""
    mod = _module("bench_symmetric")
    rows = mod.by_point(read_results(RESULTS / "symmetric-resnet20-89d3ebf.csv")[0])
    assert rows[("0", "4", "crossbar", "symmetric")]["top1"] == "0.8686"
    table = mod.markdown(rows, "resnet20")
    assert "| 4 | crossbar | 1 | 86.69 | 86.48 | 86.86 | +0.38 | 0.12 % |" in table


@pytest.mark.parametrize("stem", ["adc-resnet20-W4A8-isaac", "adc-resnet20-W4A8-isaac-differential",
                                  "adc-limit2000/adc-resnet20-W4A8-isaac"])
def test_adc_table_follows_from_its_csv(stem):
    mod = _module("bench_adc")
    rows = mod.by_point(read_results(RESULTS / f"{stem}.csv")[0])
    assert len(rows) == 11
    def cells(line):                               # bits, range, top-1, clipping; energy aside
        return [c.strip() for c in line.strip().strip("|").split("|")][:4]
    body = [cells(b) for b in _body(RESULTS / f"{stem}.md") if b.startswith("|")]
    for line in mod.table(rows)[2:]:
        assert cells(line) in body, f"{stem}: {line}"


def test_common_args_without_limit():
    ap = harness.common_args(argparse.ArgumentParser(), seeds=None, limit=False)
    opts = {o for a in ap._actions for o in a.option_strings}
    assert {"--threads", "--out"} <= opts and not opts & {"--limit", "--seeds"}
    ap = harness.common_args(argparse.ArgumentParser())
    assert ap.parse_args(["--limit", "5"]).limit == 5
    with pytest.raises(SystemExit):
        ap.parse_args(["--limit", "0"])


def test_no_benchmark_hand_rolls_its_csv():
    for p in sorted(BENCH.glob("bench_*.py")):
        src = p.read_text()
        assert "DictWriter" not in src and "csv.writer" not in src, f"{p.name} writes a CSV by hand"


def test_irdrop_markdown_and_readme_follow_from_its_csv():
    mod = _module("bench_irdrop")
    rows = read_results(RESULTS / "irdrop.csv")[0]
    assert {(int(r["rows"]), float(r["wire_r"])) for r in rows} == {
        (n, x) for n in (64, 128, 256) for x in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)}
    table = mod.table(rows)
    assert table == _body(RESULTS / "irdrop.md")
    readme = (ROOT / "README.md").read_text()
    assert all(line in readme for line in table if line.startswith("| "))


def test_reproduce_rows_picks_older_commits_evenly_and_reads_both_layouts():
    rr = _module("reproduce_rows")
    rows = ([{"point": f"a{i}", "commit": "A"} for i in range(6)]
            + [{"point": "h0", "commit": "HEAD"}] + [{"point": "b0", "commit": "B"}])
    got = [r["point"] for r in rr.pick(rows, "HEAD", 3)]
    assert got == ["a0", "a2", "a4", "b0"]          # every 2nd of A's six, B's only row, no HEAD
    assert rr.row_granularity({"method": "method2", "r": "4", "c": "", "m": "4"}) == \
        ("method2", "4", None, "4")
    assert rr.row_granularity({"granularity": "tile 128x128"}) == ("method1", 128, 128, None)
    with pytest.raises(ValueError, match="not one of"):
        rr.row_granularity({"granularity": "tile 3x3", "point": "p"})
