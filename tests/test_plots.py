"""Tests of pimsim.plots and ``pimsim plot``: Pareto front on hand-made points, PNGs written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pimsim.cli import main
from pimsim.plots import add_cost, granularity_of, pareto_front, plot_results, read_rows
from pimsim.quant import Granularity

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

HEADER = "model,wbits,abits,calibration,method,r,c,m,scales,top1,calibration_s,images\n"
ROWS = """resnet20,4,8,ptqsl,channelwise,,,,672,0.8738,26.71,10000
resnet20,4,8,ptqsl,layerwise,,,,18,0.8375,38.06,10000
resnet20,4,8,ptqsl,method1,16,576,,42,0.8535,4.55,10000
resnet20,4,8,ptqsl,method1,16,36,,464,0.8738,4.32,10000
resnet20,4,8,ptqsl,method1,8,576,,84,0.8690,4.36,10000
resnet20,4,8,ptqsl,method1,8,36,,928,0.8752,4.05,10000
resnet20,4,8,ptqsl,method2,4,,2,336,0.8750,3.81,10000
resnet20,4,8,ptqsl,method2,4,,4,672,,3.56,10000
resnet20,4,8,ptqsl,method2,2,,2,672,0.8767,3.80,10000
"""


def test_pareto_front_hand_made():
    cost = [1, 2, 3, 4, 2, 5, 3, np.nan]
    acc = [80, 85, 84, 90, 85, 90, 86, 99]
    # (1,80) cheapest; (2,85) twice: both kept (neither is strictly better); (3,84) beaten by
    # (2,85); (3,86) kept; (4,90) kept; (5,90) beaten by (4,90); NaN never on the front
    assert pareto_front(cost, acc).tolist() == [True, True, False, True, True, False, True,
                                                False]
    assert pareto_front([], []).tolist() == []
    assert pareto_front([3, 2, 1], [1, 2, 3]).tolist() == [False, False, True]


def test_read_rows_and_granularity(tmp_path):
    p = tmp_path / "g.csv"
    p.write_text(HEADER + ROWS)
    rows = read_rows(p)
    assert rows[0]["scales"] == 672 and rows[0]["r"] is None and rows[7]["top1"] is None and len(rows) == 9
    assert granularity_of(rows[3]) == Granularity.tile(16, 36)
    assert granularity_of(rows[6]) == Granularity.split(4, 2)
    add_cost(rows)
    assert rows[0]["cost_scales"] == 672 and rows[3]["cost_scales"] == 464
    assert rows[0]["cost_scale_overhead"] == pytest.approx(672 * 16 / (4 * 267264))
    assert all(r["cost_energy_nj"] > 0 for r in rows)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        read_rows(bad)


def test_plot_results_writes_pngs(tmp_path):
    p = tmp_path / "g.csv"
    p.write_text(HEADER + ROWS)
    files = plot_results(p, tmp_path / "out")
    names = sorted(f.name for f in files)
    assert names == sorted(f"g-resnet20-W4A8-ptqsl-{k}.png" for k in
                           ("heatmap-method1", "heatmap-method2", "pareto-scale",
                            "pareto-energy"))
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000


def test_cli_plot_committed_granularity_csv(tmp_path, capsys):
    csv = RESULTS / "granularity-resnet20-W4A8-ptqsl.csv"
    if not csv.is_file():
        pytest.skip(f"{csv} not committed")
    assert main(["plot", str(csv), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == 4
    assert len(list(tmp_path.glob("*.png"))) == 4


def test_cli_plot_missing_file(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "none.csv")]) == 2
    assert "results file not found" in capsys.readouterr().err


def test_sweep_csv_heatmaps_per_setting_and_one_scatter(tmp_path):
    from pimsim.sweep import RESULT_COLUMNS, ResultsFile
    cols = ["point", "base", "granularity", *RESULT_COLUMNS, "cost_scale_overhead",
            "cost_energy_nj"]
    rf = ResultsFile(tmp_path / "s.csv", cols)
    n = 0
    for base, e in (("hw/a.yaml", 1.0), ("hw/b.yaml", 2.0)):
        for r, m, top1 in ((4, 2, 0.87), (4, 4, 0.88), (2, 2, 0.875)):
            gran = f'{{"quant.splits":{m},"quant.tile":[{r},null]}}'
            rf.append({"point": f"{base}{gran}", "base": base, "granularity": gran,
                       "model": "resnet20", "wbits": 4, "abits": 8, "calibration": "max",
                       "method": "method2", "r": r, "m": m, "top1": top1 - (e - 1) / 100,
                       "cost_scale_overhead": 0.001 * m / r, "cost_energy_nj": 1000 * e * m})
            n += 1
    rows = read_rows(tmp_path / "s.csv")
    from pimsim.plots import setting_columns
    assert setting_columns(rows) == ["base"]
    names = sorted(p.name for p in plot_results(tmp_path / "s.csv"))
    assert names == ["s-resnet20-W4A8-max-a-heatmap-method2.png",
                     "s-resnet20-W4A8-max-b-heatmap-method2.png",
                     "s-resnet20-W4A8-max-pareto-energy.png",
                     "s-resnet20-W4A8-max-pareto-scale.png"]


def test_read_rows_averages_the_seeds_of_a_point(tmp_path):
    p = tmp_path / "g.csv"
    head = "point,model,wbits,abits,calibration,method,r,c,m,seed,scales,top1,commit,date\n"
    p.write_text(head
                 + "a,resnet20,4,8,ptqsl,channelwise,,,,0,672,0.80,x,d\n"
                 + "b,resnet20,4,8,ptqsl,channelwise,,,,1,672,0.90,y,e\n"
                 + "c,resnet20,4,8,ptqsl,method1,16,36,,0,464,0.70,x,d\n"
                 + "d,resnet20,3,8,ptqsl,channelwise,,,,0,672,0.60,x,d\n")
    rows = read_rows(p)
    assert len(rows) == 3                      # the two W4 channelwise seeds are one point
    (cw,) = [r for r in rows if r["method"] == "channelwise" and r["wbits"] == 4]
    assert cw["seeds"] == 2 and abs(cw["top1"] - 0.85) < 1e-12
    assert abs(cw["top1_sd"] - 0.0707106781) < 1e-9      # sample sd of 0.80, 0.90
    (w3,) = [r for r in rows if r["wbits"] == 3]
    assert w3["seeds"] == 1 and w3["top1"] == 0.60 and w3["top1_sd"] == 0.0
