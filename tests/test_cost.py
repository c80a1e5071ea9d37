"""Tests of the cost model (pimsim.cost, ``pimsim cost``): counts against hand-computed values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pimsim.cli import main
from pimsim.config import ConfigError, load, validate
from pimsim.cost import (CostParams, LayerShape, config_cost, model_shapes, network_cost,
                         network_shapes)
from pimsim.crossbar import Crossbar
from pimsim.quant import Granularity

ROOT = Path(__file__).resolve().parents[1]

# Two layers on a small 8 x 16 array; 4-bit weights differential with 2-bit cells: 2 slices,
# 4 bit lines per weight; 4-bit inputs with a 1-bit DAC: 3 cycles.
XB = Crossbar(rows=8, cols=16, cell_bits=2, signed="differential", dac_bits=1, scale_bits=16)
SHAPES = [LayerShape("a", O=4, K=10, pixels=9), LayerShape("b", O=6, K=20, pixels=4)]
UNIT = CostParams(array_read_pj=1, adc_pj=1, adc_ref_bits=0, dac_pj=1, mult_pj=1, add_pj=1,
                  buffer_pj=1, cycle_ns=100, digital_op_ns=1, digital_lanes=128, input_passes=1)


def test_small_network_counts_by_hand():
    res = network_cost(SHAPES, Granularity.tile(2, 5), 4, 4, XB, UNIT, strict=True)
    a, b = res["layers"]
    # layer a: 4 x 10, tiles 2 x 5 -> 2 x 2 tiles; each column block (5 inputs) on its own
    # array; an array holds 16 // (2 * 4) = 2 row blocks -> 1 array per column block.
    assert (a["row_blocks"], a["col_blocks"], a["scales"], a["segments"], a["arrays"]) == \
        (2, 2, 4, 2, 2)
    assert a["weight_bits"] == 4 * 10 * 4 and a["scale_bits"] == 4 * 16
    assert a["macs"] == 4 * 10 * 9
    assert a["rescale_mults"] == 4 * 2 * 9                 # O x col_blocks x P
    assert a["tile_adds"] == 4 * 1 * 9 and a["segment_adds"] == 0
    assert a["used_columns"] == 2 * 4 * 4                 # segments x O x bit lines per weight
    assert a["adc_conversions"] == 32 * 3 * 9
    assert a["dac_conversions"] == 10 * 3 * 9
    assert a["array_reads"] == 2 * 3 * 9
    assert a["buffer_accesses"] == 10 * 9 + 4 * 9 + 72
    assert a["used_cells"] == 10 * 16 and a["total_cells"] == 2 * 8 * 16
    assert a["utilization"] == pytest.approx(160 / 256)
    # channelwise on the same array: 1 x 10 tiles, K = 10 > 8 rows -> 2 segments, 1 add each
    assert a["chw_scale_bits"] == 4 * 16 and a["chw_digital_ops"] == 4 * 9 + 4 * 1 * 9
    assert a["digital_vs_channelwise"] == pytest.approx((72 + 36) / 72)
    assert a["scale_vs_layerwise"] == pytest.approx(4)
    # layer b: 6 x 20 -> 3 x 4 tiles; 4 segments, ceil(3 / 2) = 2 arrays each
    assert (b["scales"], b["segments"], b["arrays"]) == (12, 4, 8)
    assert b["rescale_mults"] == 6 * 4 * 4 and b["tile_adds"] == 6 * 3 * 4
    assert b["adc_conversions"] == 4 * 6 * 4 * 3 * 4
    assert b["dac_conversions"] == 20 * 2 * 3 * 4          # every array of a segment is driven
    assert b["array_reads"] == 8 * 3 * 4
    # energy with every constant 1 pJ: the sum of the operation counts
    ops = 96 + 1152 + 480 + 96 + (72 + 1152) + (80 + 24 + 96)
    assert b["energy_nj"] == pytest.approx(ops / 1e3)
    assert b["latency_us"] == pytest.approx(4 * (3 * 100 + 1) / 1e3)
    # overlapped digital work: a two-stage pipeline over the 4 pixels, a = 300 ns, d = 1 ns
    piped = network_cost(SHAPES, Granularity.tile(2, 5), 4, 4, XB,
                         dataclasses.replace(UNIT, overlap_digital=True), strict=True)
    assert piped["layers"][1]["latency_us"] == pytest.approx((300 + 1 + 3 * 300) / 1e3)
    assert piped["layers"][1]["energy_nj"] == b["energy_nj"]
    t = res["totals"]
    assert t["scale_bits"] == 16 * 16 and t["weight_bits"] == 160 + 480
    assert t["scale_overhead"] == pytest.approx(256 / 640)
    assert t["macs"] == 360 + 480 and t["arrays"] == 10
    assert t["digital_overhead"] == pytest.approx((108 + 168) / 840)
    assert t["energy_nj"] == pytest.approx(a["energy_nj"] + b["energy_nj"])


def test_split_arrays_and_offset_reference_columns():
    # c = 10 > 8 rows: every column block spans 2 segments whose results are added digitally
    res = network_cost(SHAPES[:1], Granularity.tile(2, 10), 4, 4, XB, UNIT, strict=False)
    a = res["layers"][0]
    assert (a["col_blocks"], a["segments"], a["segment_adds"], a["tile_adds"]) == (1, 2, 4 * 9, 0)
    # offset: 2 slices, 2 bit lines per weight + 2 reference columns per array
    xb = Crossbar(rows=8, cols=16, cell_bits=2, signed="offset", dac_bits=1)
    a = network_cost(SHAPES[:1], Granularity.tile(2, 5), 4, 4, xb, UNIT)["layers"][0]
    assert a["arrays"] == 2                       # 14 // 4 = 3 row blocks per array
    assert a["used_columns"] == 2 * (4 * 2 + 2)


def test_strict_tile_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        network_cost(SHAPES, Granularity.tile(5, 5), 4, 4, XB, UNIT, strict=True)
    res = network_cost(SHAPES, Granularity.tile(5, 5), 4, 4, XB, UNIT, strict=False)
    # layer b, 6 rows: a 5-row block needs 20 > 16 bit lines (2 arrays), the 1-row block 1;
    # 4 column blocks of 5 inputs
    assert res["layers"][1]["arrays"] == 4 * (2 + 1)


def test_network_shapes_from_one_forward():
    import torch.nn as nn
    from pimsim.network import build_network
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 15 * 15, 10))
    shapes = network_shapes(build_network(model))
    assert [(s.O, s.K, s.pixels) for s in shapes] == [(4, 27, 1024), (6, 36, 225),
                                                      (10, 1350, 1)]


RESNET20_MACS = 6 * 16 * 144 * 1024 + (32 * 144 + 5 * 32 * 288) * 256 + (64 * 288 + 5 * 64 * 576) * 64


def test_resnet20_channelwise_vs_16x36_by_hand():
    shapes = model_shapes("resnet20")
    assert len(shapes) == 18                       # first conv and the fc stay in float
    assert [s.pixels for s in shapes] == [1024] * 6 + [256] * 6 + [64] * 6
    cw = network_cost(shapes, Granularity.channelwise(), 4, 8, Crossbar(), strict=False)["totals"]
    t = network_cost(shapes, Granularity.tile(16, 36), 4, 8, Crossbar(), strict=False)["totals"]
    assert cw["scales"] == 6 * 16 + 6 * 32 + 6 * 64 == 672
    # 16 x 36: 16x144 -> 1 x 4 tiles; 32x144 -> 2 x 4; 32x288 -> 2 x 8; 64x288 -> 4 x 8;
    # 64x576 -> 4 x 16
    assert t["scales"] == 6 * 4 + 8 + 5 * 16 + 32 + 5 * 64 == 464
    assert cw["scale_bits"] == 672 * 16 and t["scale_bits"] == 464 * 16
    weights = 6 * 16 * 144 + 32 * 144 + 5 * 32 * 288 + 64 * 288 + 5 * 64 * 576
    assert cw["weight_bits"] == t["weight_bits"] == 4 * weights == 4 * 267264
    assert t["scale_vs_channelwise"] == pytest.approx(464 / 672)
    assert cw["macs"] == t["macs"] == RESNET20_MACS == 40108032
    assert cw["rescale_mults"] == 6 * 16 * 1024 + 6 * 32 * 256 + 6 * 64 * 64 == 172032
    assert t["rescale_mults"] == (6 * 16 * 4 * 1024 + 32 * 4 * 256 + 5 * 32 * 8 * 256
                                  + 64 * 8 * 64 + 5 * 64 * 16 * 64) == 1114112
    # 36-input tiles always fit the 128 rows, so the only additions are between tiles
    assert t["segment_adds"] == 0
    assert t["psum_adds"] == t["rescale_mults"] - (6 * 16 * 1024 + 6 * 32 * 256 + 6 * 64 * 64)


def test_config_cost_section_and_default_crossbar():
    cfg = load(ROOT / "hwconfigs" / "default.yaml", ["cost.adc_pj=3.0"])
    res = config_cost(cfg)
    assert res["strict"] is False and res["params"]["adc_pj"] == 3.0
    # the default crossbar has an ideal ADC, charged at the lossless resolution of a full
    # 128-row array of 2-bit cells with a 1-bit DAC: column sums 0..384 -> 9 bits = 2x 8 bits
    assert res["adc_bits"] == 9 and res["adc_pj"] == pytest.approx(6.0)
    assert res["totals"]["energy_breakdown_nj"]["adc"] == pytest.approx(
        6.0 * res["totals"]["adc_conversions"] / 1e3)
    with pytest.raises(ConfigError, match="cost.adc_pj: -1: must be a positive number"):
        validate({"cost": {"adc_pj": -1}}, "x.yaml")
    with pytest.raises(ConfigError, match="cost.input_passes: 3: must be in 1..2"):
        validate({"cost": {"input_passes": 3}}, "x.yaml")
    two = config_cost(load(ROOT / "hwconfigs" / "default.yaml", ["cost.input_passes=2"]))
    assert two["totals"]["adc_conversions"] == 2 * res["totals"]["adc_conversions"]


def test_cli_cost_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["cost", str(ROOT / "hwconfigs" / "channelwise.yaml"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layer3.2.conv2" in text and text.count("\n") > 20 and "total" in text
    res = json.loads(out.read_text())
    assert res["totals"]["scales"] == 672 and len(res["layers"]) == 18
    assert res["totals"]["macs"] == RESNET20_MACS


def test_cli_cost_bad_config_is_exit_2(tmp_path, capsys):
    assert main(["cost", str(ROOT / "hwconfigs" / "default.yaml"), "--set", "cost.dac_pj=0"]) == 2
    assert "cost.dac_pj: 0: must be a positive number" in capsys.readouterr().err


def test_adc_energy_scales_with_resolution():
    params = CostParams()                                   # adc_pj 1.5625 at 8 bits
    conv = None
    for bits, pj in ((8, 1.5625), (6, 1.5625 / 4), (4, 1.5625 / 16), (10, 1.5625 * 4)):
        xb = dataclasses.replace(XB, adc_bits=bits)
        res = network_cost(SHAPES, Granularity.tile(2, 5), 4, 4, xb, params)
        assert res["adc_bits"] == bits and res["adc_pj"] == pytest.approx(pj)
        t = res["totals"]
        conv = conv or t["adc_conversions"]
        assert t["adc_conversions"] == conv                 # resolution changes energy only
        assert t["energy_breakdown_nj"]["adc"] == pytest.approx(pj * conv / 1e3)
    # ideal ADC on the 8-row array: column sums up to 8 * 3 = 24 -> 5 lossless bits
    res = network_cost(SHAPES, Granularity.tile(2, 5), 4, 4, XB, params)
    assert res["adc_bits"] == 5 and res["adc_pj"] == pytest.approx(1.5625 / 8)
    # adc_ref_bits = 0: no scaling
    flat = dataclasses.replace(params, adc_ref_bits=0)
    res = network_cost(SHAPES, Granularity.tile(2, 5), 4, 4, dataclasses.replace(XB, adc_bits=4),
                       flat)
    assert res["adc_pj"] == 1.5625
    with pytest.raises(ConfigError, match="cost.overlap_digital: 1: must be true or false"):
        validate({"cost": {"overlap_digital": 1}}, "x.yaml")
    with pytest.raises(ConfigError, match="cost.adc_ref_bits: 17: must be in 0..16"):
        validate({"cost": {"adc_ref_bits": 17}}, "x.yaml")
