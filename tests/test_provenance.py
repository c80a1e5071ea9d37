"""Every committed result records where it came from; the benchmark harness writes it so."""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pimsim import provenance as pv

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _results(ext: str) -> list[Path]:
    return sorted(p for p in RESULTS.rglob(f"*.{ext}") if ".tmp" not in p.name)


def _check_prov(where: str, prov: dict) -> None:
    missing = [k for k in pv.PROVENANCE_FIELDS if k not in prov or prov[k] in ("", None)]
    assert not missing, f"{where}: provenance lacks {missing}"
    assert len(str(prov["commit"]).split("+")[0]) == 40 or str(prov["commit"]).startswith("unknown"), where
    dt.datetime.fromisoformat(str(prov["date"]))


@pytest.mark.parametrize("path", _results("json"), ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_json_result_records_its_provenance(path):
    data = json.loads(path.read_text())
    assert isinstance(data.get("provenance"), dict), f"{path}: no provenance object"
    _check_prov(str(path), data["provenance"])


@pytest.mark.parametrize("path", _results("csv"), ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_csv_row_records_its_provenance(path):
    manifest = path.parent / "manifest.json"
    if path.name == "tiles.csv" and manifest.is_file():
        # an export folder (pimsim export): the tile table is described by its manifest,
        # which carries the provenance of both
        data = json.loads(manifest.read_text())
        assert isinstance(data.get("provenance"), dict), f"{manifest}: no provenance object"
        _check_prov(str(manifest), data["provenance"])
        return
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path}: no rows"
    for i, row in enumerate(rows, start=2):
        prov = {**row, "seeds": row.get("seeds", row.get("seed"))}
        _check_prov(f"{path}:{i}", prov)


@pytest.mark.parametrize("path", _results("md"), ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_markdown_result_names_its_provenance(path):
    text = path.read_text()
    assert "at commit `" in text and "Produced by `" in text, f"{path}: no provenance footer"


_TABLES = [p for p in _results("md") if p.with_suffix(".csv").is_file()]


@pytest.mark.parametrize("path", _TABLES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_markdown_table_names_every_commit_its_rows_came_from(path):
    """A table made from a CSV whose rows were computed at several commits must name them all
    (a footer naming only the commit that wrote the markdown hid mixed-code tables)."""
    with path.with_suffix(".csv").open() as f:
        commits = {row["commit"] for row in csv.DictReader(f)}
    text = path.read_text()
    missing = sorted(c[:12] for c in commits if c not in text)
    assert not missing, f"{path}: rows from commit(s) {missing} not named"
    if len(commits) > 1:
        assert f"computed at {len(commits)} commits" in text, f"{path}: mixed commits not flagged"


def test_rows_provenance_names_each_commit():
    harness = pytest.importorskip("harness")
    one = [{"commit": "a" * 40, "date": "2026-12-03T01:00:00"},
           {"commit": "a" * 40, "date": "2026-12-04T01:00:00"}]
    assert harness.rows_provenance(one) == (
        f"Every row of the table was computed at commit `{'a' * 40}` (2 rows, 2026-12-03 to "
        "2026-12-04).")
    two = one + [{"commit": "b" * 40, "date": "2026-12-02T09:00:00"}]
    line = harness.rows_provenance(two)
    assert "computed at 2 commits" in line
    assert line.index("b" * 40) < line.index("a" * 40)          # oldest first
    assert "(1 row, 2026-12-02)" in line


def test_git_commit_is_the_checkout_head_and_sees_dirty_code(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "pkg" / "code.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results" / "r.csv").write_text("a\n")

    def git(*a):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo,
                              check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    head = git("rev-parse", "HEAD")
    assert pv.git_commit(repo / "pkg") == head
    (repo / "README.md").write_text("x\n")
    git("add", "README.md")
    git("commit", "-qm", "readme")
    head = git("rev-parse", "HEAD")
    (repo / "benchmarks" / "results" / "r.csv").write_text("a\n1\n")   # an output changed
    (repo / "README.md").write_text("y\n")                              # prose changed
    assert pv.git_commit(repo / "pkg") == head
    (repo / "pkg" / "code.py").write_text("x = 2\n")                    # the code changed
    assert pv.git_commit(repo / "pkg") == head + "+dirty"
    assert pv.git_commit(tmp_path) .startswith("unknown")


def test_provenance_record_and_footer():
    p = pv.provenance(seeds=[0, 1, 2], threads=3, command="python benchmarks/x.py --a 1")
    _check_prov("record", p)
    assert p["seeds"] == [0, 1, 2] and p["threads"] == 3
    assert "`python benchmarks/x.py --a 1`" in pv.footer(p) and "seeds: 0, 1, 2" in pv.footer(p)


def test_command_line_quotes_arguments():
    assert pv.command_line(["benchmarks/b.py", "--set", "a=[1, 2]"]).endswith("--set 'a=[1, 2]'")


def test_harness_rows_carry_provenance_and_resume(tmp_path):
    harness = pytest.importorskip("harness")
    prov = pv.provenance(seeds=[0], threads=1, command="python bench.py")
    res = harness.Results(tmp_path / "r.csv", ["x"], prov)
    res.append({"point": "p1", "seed": 0, "x": 1})
    with (tmp_path / "r.csv").open("a") as f:
        f.write("p2,2,0,abc")                  # a torn last line (killed while writing)
    again = harness.Results(tmp_path / "r.csv", ["x"], prov)
    assert "p1" in again and "p2" not in again
    (row,) = again.rows()
    assert row["commit"] == prov["commit"] and row["command"] == "python bench.py"
    assert row["threads"] == "1" and row["seed"] == "0"
    with pytest.raises(ValueError, match="lacks"):
        again.append({"point": "p3", "x": 3})


def test_fewer_rows_counts_a_tie_as_a_tie():
    bg = pytest.importorskip("bench_granularity")
    # (r, c) -> {seed: top1}; pairs at equal r*c: (1,4)-(2,2), (1,4)-(4,1), (2,2)-(4,1)
    m1 = {(1, 4): {0: 0.90, 1: 0.91}, (2, 2): {0: 0.90, 1: 0.89}, (4, 1): {0: 0.95, 1: 0.80}}
    got = bg.fewer_rows(m1, [0, 1])
    assert got["pairs"] == 3
    # seed 0: (1,4)=(2,2) tie; (1,4)<(4,1) loss; (2,2)<(4,1) loss
    assert got["per_seed"][0] == (0, 1, 2)
    # seed 1: 0.91>0.89 win; 0.91>0.80 win; 0.89>0.80 win
    assert got["per_seed"][1] == (3, 0, 0)
