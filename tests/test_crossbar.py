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
from pimsim.testing import data_dir_or_skip

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
    ({"adc_range": -1}, "must be full, calibrated, calibrated_slice or a positive number"),
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
     "x.yaml: crossbar.adc_range: auto: must be full, calibrated, calibrated_slice or a positive number"),
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


# --------------------------------------------------------------------------------------------
# Array-level simulation
# --------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings          # noqa: E402
from hypothesis import strategies as st                      # noqa: E402

from pimsim import array_kernels as ak                       # noqa: E402
from pimsim.crossbar import CrossbarGemm                     # noqa: E402
from pimsim.kernels import TiledGemm, combine_nk            # noqa: E402

PROP = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])


@st.composite
def array_problems(draw, adc=False):
    """A random layer on a random array geometry (ragged edges, both signed schemes)."""
    O = draw(st.integers(1, 24))
    K = draw(st.integers(1, 90))
    N = draw(st.integers(1, 40))
    wb = draw(st.integers(2, 8))
    ab = draw(st.integers(2, 9))
    cell = draw(st.integers(1, 4))
    dac = draw(st.integers(1, 4))
    signed = draw(st.sampled_from(["differential", "offset"]))
    probe = Crossbar(cell_bits=cell, signed=signed)
    need = probe.cols_per_weight(wb) + probe.ref_cols(wb)
    rows = draw(st.one_of(st.integers(1, 70), st.sampled_from([64, 128, 200])))
    cols = draw(st.integers(need, need + 40))
    r = draw(st.integers(1, O + 3))
    c = draw(st.integers(1, K + 10))
    seed = draw(st.integers(0, 2**32 - 1))
    neg = draw(st.booleans())
    adc_bits, adc_range = 0, "full"
    if adc:
        adc_bits = draw(st.integers(1, 8))
        adc_range = draw(st.sampled_from(["full", "number", "calibrated"]))
    rng = np.random.default_rng(seed)
    hw, ha = (1 << (wb - 1)) - 1, (1 << (ab - 1)) - 1
    wq = rng.integers(-hw, hw + 1, size=(O, K)) * (rng.random((O, K)) < 0.8)
    lo = -ha if neg else 0
    x = (rng.integers(lo, ha + 1, size=(N, K)) * (rng.random((N, K)) < 0.6)).astype(np.float32)
    grid = Granularity.tile(r, c).resolve(O, K)
    number = float(rng.uniform(0.5, 3 * rows)) if adc_range == "number" else None
    xb = Crossbar(rows=rows, cols=cols, cell_bits=cell, signed=signed, dac_bits=dac,
                  adc_bits=adc_bits, adc_range=number if adc_range == "number" else adc_range)
    return dict(wq=wq.astype(np.int8 if wb <= 8 else np.int16), x=x, grid=grid, xb=xb, wb=wb,
                ab=ab, scales=10.0 ** rng.uniform(-3, 1, size=grid.shape),
                sx=float(10.0 ** rng.uniform(-3, 0)), bias=rng.standard_normal(O).astype(np.float32),
                rng=rng)


@settings(PROP, max_examples=80)
@given(p=array_problems())
def test_ideal_adc_equals_tiled_kernel_bit_for_bit(p):
    """The array path itself (no shortcut): bit slicing, bit-serial inputs, shift-add, offset
    reference subtraction and segment sums reproduce TiledGemm exactly."""
    op = CrossbarGemm(p["wq"], p["grid"], p["scales"], p["xb"], p["wb"], p["ab"],
                      shortcut=False)
    y = op(p["x"], p["sx"], bias=p["bias"])
    ref = TiledGemm(p["wq"], p["grid"], p["scales"], w_bits=p["wb"], a_bits=p["ab"])(
        p["x"], p["sx"], bias=p["bias"], layout="NK")
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
    passes = 2 if (p["x"] < 0).any() else 1
    assert op.clipped == 0
    assert op.conversions == len(p["x"]) * op.conversions_per_vector(passes)
    # and the shortcut gives the same
    short = CrossbarGemm(p["wq"], p["grid"], p["scales"], p["xb"], p["wb"], p["ab"])
    np.testing.assert_array_equal(short(p["x"], p["sx"], bias=p["bias"]).view(np.uint32),
                                  ref.view(np.uint32))


def _reference(op, p, ranges):
    lm = op.lm
    passes = 2 if (p["x"] < 0).any() else 1
    return ak.array_psums_reference(
        p["wq"], p["x"], p["wb"], p["ab"], p["xb"].signed, p["xb"].cell_bits, p["xb"].dac_bits,
        lm.seg_bounds, op.seg_col, p["grid"].n_col_blocks, lm.column_arrays(p["xb"]),
        lm.arrays_per_segment, ranges, p["xb"].adc_bits, passes), passes


@settings(PROP, max_examples=120)
@given(p=array_problems(adc=True))
def test_numba_array_kernel_equals_numpy_reference(p):
    """Non-ideal ADC (full, fixed and per-array ranges): partial sums, outputs and clip counts
    of the Numba kernel equal the plain NumPy reference exactly."""
    op = CrossbarGemm(p["wq"], p["grid"], p["scales"], p["xb"], p["wb"], p["ab"])
    if p["xb"].adc_range == "calibrated":
        op.set_ranges(p["rng"].integers(1, 3 * p["xb"].rows + 2, size=op.n_arrays))
    (P_ref, clip_ref, seen_ref), passes = _reference(op, p, op.range_used)
    P = op._psums(p["x"], passes)
    np.testing.assert_array_equal(P, P_ref)
    assert op.clipped == clip_ref
    y = op(p["x"], p["sx"], bias=p["bias"])
    y_ref = np.empty_like(y)
    combine_nk(P_ref, op.tiled.row_scales, op.tiled.row_limits, p["sx"], p["bias"], y_ref, 0)
    np.testing.assert_array_equal(y.view(np.uint32), y_ref.view(np.uint32))
    assert op.clipped == 2 * clip_ref
    # recording (the calibrated range): the largest column sum per array, as the reference sees
    op.start_fit()
    op(p["x"], p["sx"])
    np.testing.assert_array_equal(op.seen, seen_ref)
    ranges = op.finish_fit()
    np.testing.assert_array_equal(ranges, np.maximum(seen_ref, 1))
    op.reset_stats()
    op(p["x"], p["sx"])
    assert op.clipped == 0                    # the fitted range covers the data it saw


def test_adc_clips_and_rounds_by_hand():
    # 1 x 4 layer, one array of 4 rows, 2-bit cells, 1-bit DAC, differential, 3-bit weights:
    # |w| <= 3 fits one slice; w = [3, 3, 3, -1], x = [1, 1, 1, 1] (a_bits 2: one cycle).
    # positive column sum 9, negative 1. ADC 2 bits, range 6: step 2, levels 0..3:
    # 9 -> clip, level 3 -> 6; 1 -> rint(0.5) = 0 (half to even). P = 6 - 0 = 6; 1 of 2 clipped.
    xb = Crossbar(rows=4, cols=2, cell_bits=2, adc_bits=2, adc_range=6)
    g = TileGrid(1, 4, 1, 4)
    op = CrossbarGemm(np.array([[3, 3, 3, -1]]), g, np.ones((1, 1)), xb, 3, 2)
    y = op(np.ones((1, 4), np.float32), 1.0)
    assert y.tolist() == [[6.0]] and (op.clipped, op.conversions) == (1, 2)


def test_offset_by_hand():
    # offset, 3-bit weights on 2-bit cells: u = w + 3 in 0..6 in 2 slices (bits 0-1, bit 2),
    # reference columns hold 3 = (slice0 3, slice1 0). w = [-3, 2], x = [1, 1]:
    # u = [0, 5] -> slice0 [0, 1], slice1 [0, 1]; sums: slice0 1, slice1 1, ref0 6, ref1 0.
    # ideal: (1 - 6) + 4 * (1 - 0) = -1 = -3 + 2. 2-bit ADC, full range 2 * 3 = 6, step 2:
    # levels: 1 -> 0 (rint(0.5)), 6 -> 3, so (0 - 3) * 2 + 4 * ((0 - 0) * 2) = -6.
    g = TileGrid(1, 2, 1, 2)
    w = np.array([[-3, 2]])
    ideal = CrossbarGemm(w, g, np.ones((1, 1)), Crossbar(rows=2, cols=4, signed="offset"), 3, 2,
                         shortcut=False)
    assert ideal(np.ones((1, 2), np.float32), 1.0).tolist() == [[-1.0]]
    op = CrossbarGemm(w, g, np.ones((1, 1)), Crossbar(rows=2, cols=4, signed="offset",
                                                      adc_bits=2), 3, 2)
    assert op(np.ones((1, 2), np.float32), 1.0).tolist() == [[-6.0]]
    assert op.conversions == 4 and op.clipped == 0


def test_crossbar_rejects_asymmetric_values():
    g = TileGrid(2, 3, 2, 3)
    with pytest.raises(ValueError, match=r"symmetric 4-bit integers in \[-7, 7\]"):
        CrossbarGemm(np.full((2, 3), -8), g, np.ones((1, 1)), Crossbar(), 4, 8)
    op = CrossbarGemm(np.ones((2, 3)), g, np.ones((1, 1)), Crossbar(adc_bits=4), 4, 8)
    with pytest.raises(ValueError, match=r"inputs must be symmetric 8-bit integers"):
        op(np.full((1, 3), -128, np.float32), 1.0)
    cal = CrossbarGemm(np.ones((2, 3)), g, np.ones((1, 1)),
                       Crossbar(adc_bits=4, adc_range="calibrated"), 4, 8)
    with pytest.raises(ValueError, match="fit the ranges first"):
        cal(np.ones((1, 3), np.float32), 1.0)


def test_conv_on_arrays_equals_tiled_kernel():
    import torch
    rng = np.random.default_rng(3)
    wq = rng.integers(-7, 8, size=(6, 5 * 9))
    g = TileGrid(6, 45, 4, 20)
    x = torch.from_numpy(rng.integers(0, 128, size=(2, 5, 7, 6)).astype(np.float32))
    scales = rng.uniform(0.1, 1, size=g.shape)
    op = CrossbarGemm(wq, g, scales, Crossbar(rows=16, cols=16), 4, 8, shortcut=False)
    y = op.conv(x, 0.1, (3, 3), (2, 1), (1, 1))
    ref = op.tiled.conv(x, 0.1, (3, 3), (2, 1), (1, 1))
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))


# --------------------------------------------------------------------------------------------
# pimsim run on the ISAAC preset (real data)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adc_range", ["full", "calibrated"])
def test_run_isaac_reports_arrays_utilization_clips(tmp_path, adc_range):
    data_dir_or_skip()
    from pimsim.cli import main
    out = tmp_path / "r.json"
    rc = main(["run", str(ISAAC), "--limit", "20", "--out", str(out), "-q",
               "--set", "quant.calibration=max", "--set", "quant.calib_images=32",
               "--set", "eval.threads=1", "--set", f"crossbar.adc_range={adc_range}"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["arrays"] == 85                       # test_mapping_resnet20_isaac_by_hand
    assert res["utilization"] == pytest.approx(552096 / (85 * 16384))
    assert 0.0 <= res["adc_clip_fraction"] <= 1.0
    assert len(res["layers"]) == 18
    assert all(l["symmetric"] for l in res["layers"])   # calibrated in the arrays' range
    assert sum(l["arrays"] for l in res["layers"]) == 85
    assert all(0 <= l["adc_clip_fraction"] <= 1 for l in res["layers"])
    if adc_range == "full":
        assert res["adc_clip_fraction"] == 0.0      # the full range cannot clip
