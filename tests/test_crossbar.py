"""Tests of pimsim.crossbar: geometry, the tile-to-array mapping, config validation, and the
array-level simulation against the tiled-integer kernel and its NumPy reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pimsim.config import ConfigError, load, validate
from pimsim.crossbar import Crossbar, LayerSpec, Mapping, map_layer
from pimsim.quant import Granularity, TileGrid

ROOT = Path(__file__).resolve().parents[1]
ISAAC = ROOT / "hwconfigs" / "isaac.yaml"

# the 18 quantized GEMM layers of ResNet-20 (first conv and fc stay in float): (name, O, K)
RESNET20 = ([(f"layer1.{b}.conv{i}", 16, 144) for b in range(3) for i in (1, 2)]
            + [("layer2.0.conv1", 32, 144), ("layer2.0.conv2", 32, 288)]
            + [(f"layer2.{b}.conv{i}", 32, 288) for b in (1, 2) for i in (1, 2)]
            + [("layer3.0.conv1", 64, 288), ("layer3.0.conv2", 64, 576)]
            + [(f"layer3.{b}.conv{i}", 64, 576) for b in (1, 2) for i in (1, 2)])


def specs(gran, layers, w_bits=4, a_bits=8):
    return [LayerSpec(n, O, K, gran.resolve(O, K), w_bits, a_bits, gran) for n, O, K in layers]


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def test_geometry_counts():
    d = Crossbar()                                             # 128x128, 2-bit cells, diff.
    assert (d.slices(4), d.cols_per_weight(4), d.ref_cols(4)) == (2, 4, 0)   # |w| <= 7: 3 bits
    assert (d.slices(8), d.cols_per_weight(8)) == (4, 8)                     # 7 bits -> 4 cells
    assert d.input_cycles(8) == 7 and d.tile_for(4) == (32, 128)
    o = Crossbar(signed="offset")                              # w + 7 in 0..14: 4 bits
    assert (o.slices(4), o.cols_per_weight(4), o.ref_cols(4)) == (2, 2, 2)
    assert o.tile_for(4) == ((128 - 2) // 2, 128)
    p = Crossbar(rows=256, cols=256, cell_bits=4, dac_bits=3)
    assert p.slices(4) == 1 and p.input_cycles(8) == 3 and p.tile_for(4) == (128, 256)
    assert p.full_range(100) == 100 * 15 * 7


@pytest.mark.parametrize("kw, msg", [
    ({"rows": 0}, "crossbar.rows: 0: must be an integer in 1..4096"),
    ({"cell_bits": 9}, "crossbar.cell_bits"),
    ({"signed": "twos"}, "must be one of differential, offset"),
    ({"adc_range": -1}, "must be full, calibrated or a positive number"),
    ({"adc_bits": True}, "crossbar.adc_bits"),
])
def test_crossbar_rejects_bad_fields(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        Crossbar(**kw)


def test_weight_must_fit_columns():
    xb = Crossbar(rows=8, cols=3, cell_bits=1)                 # 4-bit weight: 2 x 3 columns
    with pytest.raises(ValueError, match="needs 6 bit lines .* cols=3"):
        xb.tile_for(4)
    spec = LayerSpec("l", 4, 4, TileGrid(4, 4, 1, 4), 4, 8)
    with pytest.raises(ValueError, match="layer l: a 4-bit weight needs 6"):
        map_layer(spec, xb, strict=False)


# --------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------

def test_mapping_small_layer_by_hand():
    # 10 x 20 layer, tiles 3 x 7, on 8x16 arrays, 2-bit cells, 4-bit weights, differential:
    # cols_per_weight 4 -> a row block needs 12 of 16 bit lines: 1 row block per array.
    # column blocks 7, 7, 6 (each <= 8 rows: 1 segment each) -> 3 segments;
    # row blocks 3, 3, 3, 1 -> 4 arrays per segment -> 12 arrays.
    xb = Crossbar(rows=8, cols=16)
    gran = Granularity.tile(3, 7)
    m = map_layer(LayerSpec("l", 10, 20, gran.resolve(10, 20), 4, 8, gran), xb)
    assert (m.row_blocks, m.col_blocks, m.segments, m.row_blocks_per_array) == (4, 3, 3, 1)
    assert (m.arrays_per_segment, m.arrays) == (4, 12)
    assert m.used_cells == 10 * 20 * 4 and m.total_cells == 12 * 8 * 16
    assert m.utilization == pytest.approx(800 / 1536)
    # tiles of 2 rows: 8 bit lines -> 2 row blocks per array; 5 row blocks -> 3 arrays/segment
    gran = Granularity.tile(2, 7)
    m = map_layer(LayerSpec("l", 10, 20, gran.resolve(10, 20), 4, 8, gran), xb)
    assert (m.row_blocks_per_array, m.arrays_per_segment, m.arrays) == (2, 3, 9)
    # channelwise (c = K = 20 > 8 rows): 3 segments (8, 8, 4); 1-row blocks, 4 per array
    m = map_layer(LayerSpec("l", 10, 20, TileGrid(10, 20, 1, 20), 4, 8), xb)
    assert (m.segments, m.row_blocks_per_array, m.arrays_per_segment, m.arrays) == (3, 4, 3, 9)
    assert m.seg_bounds == (0, 8, 16, 20)
    # layerwise: one 10-row block = 40 bit lines > 16 -> spans ceil(40/16) = 3 arrays
    m = map_layer(LayerSpec("l", 10, 20, TileGrid(10, 20, 10, 20), 4, 8), xb)
    assert (m.arrays_per_segment, m.arrays) == (3, 9)
    cols = m.column_arrays(xb)                     # bit lines filled in order, 16 per array
    assert cols.shape == (10, 4)
    assert cols[3].tolist() == [0, 0, 0, 0] and cols[4].tolist() == [1, 1, 1, 1]
    assert cols[9].tolist() == [2, 2, 2, 2]


def test_mapping_offset_reference_columns():
    # offset: 4-bit weight in 2 cells of 2 bits + 2 reference columns per array.
    # 6 x 8 layer, tiles 3 x 8 on 8x8 arrays: avail 6 bit lines = 1 row block of 3 rows
    xb = Crossbar(rows=8, cols=8, signed="offset")
    gran = Granularity.tile(3, 8)
    m = map_layer(LayerSpec("l", 6, 8, gran.resolve(6, 8), 4, 8, gran), xb)
    assert (m.ref_cols, m.cols_per_weight, m.arrays) == (2, 2, 2)
    assert m.used_cells == 8 * (6 * 2 + 2 * 2) and m.total_cells == 2 * 64
    with pytest.raises(ValueError, match="tile 4x8 does not fit a 8x8 array"):
        g = Granularity.tile(4, 8)
        map_layer(LayerSpec("l", 6, 8, g.resolve(6, 8), 4, 8, g), xb)
    g = Granularity.tile(4, 8)                  # non-strict: 8 bit lines > 6 -> 2 arrays each
    m = map_layer(LayerSpec("l", 6, 8, g.resolve(6, 8), 4, 8, g), xb, strict=False)
    assert m.arrays_per_segment == 2 + 1 and m.used_cells == 8 * (12 + 2 * 3)


def test_mapping_resnet20_isaac_by_hand():
    # ISAAC: 128x128, 2-bit cells, offset -> cols_per_weight 2 + 2 reference columns,
    # quant.tile: crossbar = 63 x 128. Per layer (O, K): segments = ceil(K/128) pieces;
    #  16x144: r=16 (32 bit lines, 1 array/segment), 2 segments -> 2 arrays,
    #          used = 144 * (16*2 + 2) = 4896
    #  32x144: 2 arrays, used = 144 * (64 + 2) = 9504;  32x288: 3 arrays, used = 288*66 = 19008
    #  64x288: row blocks 63 + 1 (126 bit lines each fits avail 126: 1 per array) -> 2 arrays per
    #          segment, 3 segments -> 6 arrays, used = 288 * (128 + 2*2) = 38016
    #  64x576: 5 segments x 2 = 10 arrays, used = 576 * 132 = 76032
    cfg = load(ISAAC)
    xb = cfg.crossbar
    m = Mapping.from_layers(specs(cfg.granularity, RESNET20), xb, strict=True)
    assert [l.arrays for l in m.layers] == [2] * 6 + [2] + [3] * 5 + [6] + [10] * 5
    assert m.arrays == 85
    assert m.used_cells == 6 * 4896 + 9504 + 5 * 19008 + 38016 + 5 * 76032 == 552096
    assert m.total_cells == 85 * 128 * 128
    assert m.utilization == pytest.approx(552096 / (85 * 16384))
    d = json.loads(json.dumps(m.to_dict()))
    assert d["arrays"] == 85 and len(d["layers"]) == 18
    assert m.layer("layer3.0.conv1").row_blocks == 2


def test_mapping_strict_explicit_tile():
    xb = Crossbar()                                             # differential: 4 columns/weight
    gran = Granularity.tile(128, 128)                           # 512 bit lines: does not fit
    with pytest.raises(ValueError, match="layer layer3.0.conv1: tile 64x128 does not fit"):
        Mapping.from_layers(specs(gran, RESNET20), xb, strict=True)
    m = Mapping.from_layers(specs(gran, RESNET20), xb, strict=False)
    # 64 x 576: 64 rows x 4 = 256 bit lines -> 2 arrays per segment, 5 segments
    assert m.layer("layer3.1.conv1").arrays == 10
    # channelwise is never an explicit tile: maps under strict too
    m = Mapping.from_layers(specs(Granularity.channelwise(), RESNET20), xb, strict=True)
    assert m.layer("layer3.1.conv1").arrays == 5 * 2          # 32 rows per array


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def _cfg_error(raw, overrides=()):
    with pytest.raises(ConfigError) as e:
        validate(raw, "x.yaml", overrides)
    return str(e.value)


def test_config_crossbar_section():
    assert validate({}).crossbar is None and validate({})["model.name"] == "resnet20"
    cfg = validate({"crossbar": {}})
    assert cfg.crossbar == Crossbar()
    cfg = validate({"crossbar": {"rows": 64}, "quant": {"tile": "crossbar"}})
    assert cfg.granularity == Granularity.tile(32, 64)
    cfg = validate({}, "x.yaml", [("crossbar.adc_range", "calibrated")])
    assert cfg.crossbar.adc_range == "calibrated"
    for name in ("isaac", "prime", "neurosim-rram-128", "crossbar-64x64", "crossbar-256x256"):
        c = load(ROOT / "hwconfigs" / f"{name}.yaml")
        assert c.crossbar.name == name and c["eval.backend"] == "crossbar"


@pytest.mark.parametrize("raw, msg", [
    ({"crossbar": {"rows": -3}}, "x.yaml: crossbar.rows: -3: must be an integer in 1..4096"),
    ({"crossbar": {"signed": "twos"}},
     "x.yaml: crossbar.signed: twos: must be one of differential, offset"),
    ({"crossbar": {"adc_range": "auto"}},
     "x.yaml: crossbar.adc_range: auto: must be full, calibrated or a positive number"),
    ({"crossbar": {"adc_bits": 17}}, "x.yaml: crossbar.adc_bits: 17: must be an integer in 0..16"),
    ({"crossbar": {"colls": 3}}, "x.yaml: crossbar.colls: 3: unknown key; allowed in crossbar"),
    ({"crossbar": {"cols": 4, "cell_bits": 1}},
     "x.yaml: crossbar.cols: 4: a 4-bit weight needs 6 bit lines (differential, 3 slice(s) of 1 "
     "bit(s)) but the array has cols=4"),
    ({"crossbar": {}, "quant": {"tile": [64, 128]}},
     "x.yaml: quant.tile: [64, 128]: tile 64x128 does not fit a 128x128 array at 4-bit weights"),
    ({"crossbar": {}, "quant": {"tile": [16, 144]}}, "needs c <= 128 word lines"),
    ({"quant": {"tile": "crossbar"}}, "x.yaml: quant.tile: crossbar: needs a crossbar: section"),
    ({"eval": {"backend": "crossbar"}},
     "x.yaml: eval.backend: crossbar: needs a crossbar: section"),
])
def test_config_crossbar_errors(raw, msg):
    assert msg in _cfg_error(raw)
