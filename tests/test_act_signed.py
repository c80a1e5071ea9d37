"""quant.act_signed (signed | unsigned | auto): unsigned activations in [0, 2^b - 1] for
non-negative inputs, through calibration, the kernel's exactness bound, the crossbar's one
input pass and the cost model's cycles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimsim import array_kernels as ak
from pimsim.calibrate import calibrate
from pimsim.config import ConfigError, load, validate
from pimsim.cost import CostParams, layer_cost, probe_unsigned
from pimsim.crossbar import Crossbar, CrossbarGemm, LayerSpec, attach, map_layer
from pimsim.kernels import TiledGemm, combine_nk, plan_path, tiled_matmul_reference
from pimsim.network import LayerQuant, build_network
from pimsim.quant import Granularity, TileGrid, act_max_scale, act_qrange, act_unsigned

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROP = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])


# ---------------------------------------------------------------- the quantizer
def test_ranges_and_max_scale_by_hand():
    assert act_qrange(8) == (-128, 127)
    assert act_qrange(8, symmetric=True) == (-127, 127)
    assert act_qrange(8, unsigned=True) == (0, 255)
    assert act_qrange(4, symmetric=True, unsigned=True) == (0, 15)
    assert act_max_scale(2.0, 8) == pytest.approx(2.0 / 127)
    assert act_max_scale(2.0, 8, unsigned=True) == pytest.approx(2.0 / 255)
    assert act_max_scale(0.0, 8, unsigned=True) == 1.0


def test_unsigned_has_strictly_smaller_error_on_relu_inputs_by_hand():
    """x = [0.12, 0.45, 0.88, 1.0] (a post-ReLU input, max 1) at 4 bits, max calibration.
    signed: s = 1/7, x/s = [0.84, 3.15, 6.16, 7] -> [1, 3, 6, 7], values [1/7, 3/7, 6/7, 1];
    unsigned: s = 1/15, x/s = [1.8, 6.75, 13.2, 15] -> [2, 7, 13, 15], values
    [2/15, 7/15, 13/15, 1]. Squared errors below, by hand."""
    xs = [0.12, 0.45, 0.88, 1.0]
    x = torch.tensor(xs, dtype=torch.float32)
    layer = build_network(torch.nn.Sequential(torch.nn.Linear(4, 2))).layers[0]
    g = Granularity.layerwise().resolve(2, 4)
    out = {}
    for uns in (False, True):
        s = float(act_max_scale(1.0, 4, uns))
        layer.set_quant(LayerQuant(g, np.ones(g.shape), s, 4, 4, act_unsigned=uns))
        out[uns] = (layer.quantize_input(x) * np.float32(s)).double().numpy()
    np.testing.assert_allclose(out[False], [1 / 7, 3 / 7, 6 / 7, 1], rtol=1e-6)
    np.testing.assert_allclose(out[True], [2 / 15, 7 / 15, 13 / 15, 1], rtol=1e-6)
    err = {u: float(((out[u] - np.array(xs)) ** 2).sum()) for u in out}
    hand_signed = (1 / 7 - 0.12) ** 2 + (0.45 - 3 / 7) ** 2 + (0.88 - 6 / 7) ** 2   # 0.001504
    hand_unsigned = (2 / 15 - 0.12) ** 2 + (7 / 15 - 0.45) ** 2 + (0.88 - 13 / 15) ** 2  # 0.000633
    assert err[False] == pytest.approx(hand_signed, rel=1e-5)
    assert err[True] == pytest.approx(hand_unsigned, rel=1e-5)
    assert err[True] < err[False]


def test_act_unsigned_decision():
    assert act_unsigned("signed", "l", -1.0) is False
    assert act_unsigned("signed", "l", 0.0) is False
    assert act_unsigned("auto", "l", 0.0) is True
    assert act_unsigned("auto", "l", -1e-9) is False
    assert act_unsigned("unsigned", "l", 0.5) is True
    with pytest.raises(ValueError, match=r"^layer conv7: quant.act_signed unsigned needs a "
                                         r"non-negative input.*min -0.25") as e:
        act_unsigned("unsigned", "conv7", -0.25)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="quant.act_signed must be one of signed, unsigned, auto"):
        act_unsigned("maybe", "l", 0.0)


# ---------------------------------------------------------------- calibration
def _relu_net(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 12, 3, stride=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(12, 6, 1),           # input >= 0 (after ReLU)
                                torch.nn.Conv2d(6, 5, 1),            # input signed (no ReLU)
                                torch.nn.Flatten(), torch.nn.Linear(5 * 7 * 7, 4))
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return build_network(model, input_shape=(3, 16, 16)), x


def _layer_inputs(net, x):
    """The float network's input of every GEMM layer (min and max), by forward pre-hooks."""
    seen = {}
    hooks = [l.register_forward_pre_hook(lambda m, a, n=l.name: seen.__setitem__(
        n, (float(a[0].min()), float(a[0].max())))) for l in net.layers]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("method", ["max", "mse", "ptqsl"])
def test_auto_marks_post_relu_layers_unsigned(method):
    net, x = _relu_net()
    names = [l.name for l in net.layers]
    calibrate(net, x, Granularity.tile(4, 20), 4, 8, method=method, progress=False,
              act_signed="auto", params={"candidates": 8, "rounds": 1})
    q = {l.name: l.quant for l in net.quantized_layers}
    # first and last layer float (auto); conv 2 and conv 3 follow a ReLU, conv 4 does not
    assert [n for n in names if n in q] == names[1:-1]
    assert [q[n].act_unsigned for n in names[1:-1]] == [True, True, False]
    if method == "max":                    # the scale spans [0, 255] of the layer's input
        first = names[1]
        net_f, _ = _relu_net()
        lo, hi = _layer_inputs(net_f, x)[first]
        assert lo >= 0 and q[first].act_scale == pytest.approx(hi / 255)


def test_signed_default_is_unchanged():
    a, x = _relu_net()
    b, _ = _relu_net()
    calibrate(a, x, Granularity.tile(4, 20), 4, 8, method="ptqsl", progress=False,
              params={"candidates": 8, "rounds": 1})
    calibrate(b, x, Granularity.tile(4, 20), 4, 8, method="ptqsl", progress=False,
              params={"candidates": 8, "rounds": 1}, act_signed="signed")
    for la, lb in zip(a.quantized_layers, b.quantized_layers):
        assert not la.quant.act_unsigned and not lb.quant.act_unsigned
        assert la.quant.act_scale == lb.quant.act_scale
        np.testing.assert_array_equal(la.quant.w_scales, lb.quant.w_scales)


def test_unsigned_refuses_a_negative_input_naming_the_layer():
    net, x = _relu_net()
    bad = net.layers[3].name                 # the 1x1 conv fed without a ReLU
    with pytest.raises(ValueError, match=rf"^layer {bad}: quant.act_signed unsigned needs a "
                                         "non-negative input"):
        calibrate(net, x, Granularity.tile(4, 20), 4, 8, progress=False, act_signed="unsigned")


def test_calibrate_rejects_bad_act_signed():
    net, x = _relu_net()
    with pytest.raises(ValueError, match="^quant.act_signed must be one of signed, unsigned, "
                                         "auto, got 'yes'$"):
        calibrate(net, x, Granularity.tile(4, 20), 4, 8, progress=False, act_signed="yes")


# ---------------------------------------------------------------- kernel exactness
def test_plan_path_uses_the_unsigned_range():
    # 8-bit weights and inputs: signed terms <= 2^7 * 2^7, unsigned <= 2^7 * 2^8
    assert plan_path(1024, 8, 8, int8=False) == "f32"            # 1024 * 2^14 = 2^24
    assert plan_path(1024, 8, 8, a_unsigned=True, int8=False) == "f64"
    assert plan_path(512, 8, 8, a_unsigned=True, int8=False) == "f32"
    # int8 tier: unsigned 8-bit inputs (up to 255) do not fit int8, 7-bit ones do
    assert plan_path(1024, 8, 8, int8=True) == "int8"
    assert plan_path(1024, 8, 8, a_unsigned=True, int8=True) == "f64"
    assert plan_path(1024, 8, 7, a_unsigned=True, int8=True) == "int8"
    grid = TileGrid(2, 1024, 2, 1024)
    with pytest.raises(ValueError, match="not exact.*a_bits=8 unsigned"):
        TiledGemm(np.ones((2, 1024), np.int8), grid, np.ones(grid.shape), w_bits=8, a_bits=8,
                  path="f32", a_unsigned=True)


def test_unsigned_kernel_equals_int64_reference_where_float32_would_round():
    # c = 1023: the signed bound 1023 * 2^7 * 2^7 fits float32, the unsigned one (x up to 255)
    # does not; the partial sums (1023 odd products, ~3.3e7 > 2^24) are odd integers.
    rng = np.random.default_rng(0)
    O, K, N = 3, 1023, 5
    wq = rng.choice([127, 125], size=(O, K)).astype(np.int8)
    x = rng.choice([255, 253], size=(K, N)).astype(np.float32)
    grid = TileGrid(O, K, O, K)
    assert TiledGemm(wq, grid, np.ones(grid.shape), w_bits=8, a_bits=8, path="f32").path == "f32"
    op = TiledGemm(wq, grid, np.ones(grid.shape), w_bits=8, a_bits=8, a_unsigned=True)
    assert op.path == "f64"
    exact = wq.astype(np.int64) @ x.astype(np.int64)
    assert exact.min() > 2 ** 24 and np.all(exact % 2 == 1)
    y = op(x, 1.0)
    np.testing.assert_array_equal(y, tiled_matmul_reference(wq, x, np.ones(grid.shape), grid, 1.0))
    np.testing.assert_array_equal(y, exact.astype(np.float64).astype(np.float32))
    # what the float32 path would have summed: not the exact integers
    f32 = (torch.from_numpy(wq.astype(np.float32)) @ torch.from_numpy(x)).numpy()
    assert not np.array_equal(f32.astype(np.int64), exact)


# ---------------------------------------------------------------- crossbar
@st.composite
def unsigned_problems(draw, adc=False):
    O, K, N = draw(st.integers(1, 16)), draw(st.integers(1, 70)), draw(st.integers(1, 20))
    wb, ab = draw(st.integers(2, 8)), draw(st.integers(2, 9))
    cell, dac = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    signed = draw(st.sampled_from(["differential", "offset"]))
    probe = Crossbar(cell_bits=cell, signed=signed)
    need = probe.cols_per_weight(wb) + probe.ref_cols(wb)
    rows = draw(st.one_of(st.integers(1, 70), st.sampled_from([64, 128])))
    cols = draw(st.integers(need, need + 30))
    r, c = draw(st.integers(1, O + 3)), draw(st.integers(1, K + 10))
    adc_bits = draw(st.integers(1, 8)) if adc else 0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    hw = (1 << (wb - 1)) - 1
    wq = rng.integers(-hw, hw + 1, size=(O, K)) * (rng.random((O, K)) < 0.8)
    x = (rng.integers(0, 1 << ab, size=(N, K)) * (rng.random((N, K)) < 0.7)).astype(np.float32)
    x[0, : min(K, 3)] = (1 << ab) - 1                 # the top of the unsigned range is used
    grid = Granularity.tile(r, c).resolve(O, K)
    xb = Crossbar(rows=rows, cols=cols, cell_bits=cell, signed=signed, dac_bits=dac,
                  adc_bits=adc_bits)
    return dict(wq=wq.astype(np.int8), x=x, grid=grid, xb=xb, wb=wb, ab=ab,
                scales=10.0 ** rng.uniform(-3, 1, size=grid.shape),
                sx=float(10.0 ** rng.uniform(-3, 0)),
                bias=rng.standard_normal(O).astype(np.float32))


@settings(PROP, max_examples=60)
@given(p=unsigned_problems())
def test_unsigned_crossbar_ideal_adc_equals_kernel_bit_for_bit(p):
    op = CrossbarGemm(p["wq"], p["grid"], p["scales"], p["xb"], p["wb"], p["ab"],
                      shortcut=False, a_unsigned=True)
    y = op(p["x"], p["sx"], bias=p["bias"])
    ref = TiledGemm(p["wq"], p["grid"], p["scales"], w_bits=p["wb"], a_bits=p["ab"],
                    a_unsigned=True)(p["x"], p["sx"], bias=p["bias"], layout="NK")
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
    # one pass of ceil(a / dac) cycles, every used column converted in each
    lm = op.lm
    assert lm.input_cycles == math.ceil(p["ab"] / p["xb"].dac_bits)
    assert op.conversions == len(p["x"]) * lm.input_cycles * lm.used_columns


@settings(PROP, max_examples=60)
@given(p=unsigned_problems(adc=True))
def test_unsigned_array_kernel_equals_numpy_reference(p):
    op = CrossbarGemm(p["wq"], p["grid"], p["scales"], p["xb"], p["wb"], p["ab"],
                      a_unsigned=True)
    lm = op.lm
    P_ref, clip_ref, _ = ak.array_psums_reference(
        p["wq"], p["x"], p["wb"], p["ab"], p["xb"].signed, p["xb"].cell_bits, p["xb"].dac_bits,
        lm.seg_bounds, op.seg_col, p["grid"].n_col_blocks, lm.column_arrays(p["xb"]),
        lm.arrays_per_segment, op.range_used, p["xb"].adc_bits, 1, a_unsigned=True)
    np.testing.assert_array_equal(op._psums(p["x"], 1), P_ref)
    assert op.clipped == clip_ref
    y = op(p["x"], p["sx"], bias=p["bias"])
    y_ref = np.empty_like(y)
    combine_nk(P_ref, op.tiled.row_scales, op.tiled.row_limits, p["sx"], p["bias"], y_ref, 0)
    np.testing.assert_array_equal(y.view(np.uint32), y_ref.view(np.uint32))


def test_unsigned_crossbar_refuses_negative_and_out_of_range_inputs():
    grid = TileGrid(2, 4, 2, 4)
    op = CrossbarGemm(np.ones((2, 4), np.int8), grid, np.ones(grid.shape), Crossbar(rows=8,
                      cols=16), 4, 4, shortcut=False, a_unsigned=True)
    op(np.array([[0, 15, 3, 1]], np.float32), 1.0)           # the whole unsigned range
    for bad in ([[0, 16, 0, 0]], [[-1, 0, 0, 0]]):
        with pytest.raises(ValueError, match=r"unsigned 4-bit integers in \[0, 15\]"):
            op(np.array(bad, np.float32), 1.0)


def test_network_auto_kernel_crossbar_fake_agree():
    """A calibrated network with auto (some layers unsigned) on arrays with an ideal ADC:
    crossbar == kernel bit for bit; fake within float rounding of kernel."""
    net, x = _relu_net(1)
    gran = Granularity.tile(4, 20)
    calibrate(net, x, gran, 4, 8, method="max", progress=False, symmetric=True,
              act_signed="auto")
    assert any(l.quant.act_unsigned for l in net.quantized_layers)
    mapping = attach(net, Crossbar(rows=32, cols=64, cell_bits=2, dac_bits=1, adc_bits=0,
                                   signed="offset"), gran, strict=False)
    assert [lm.a_unsigned for lm in mapping.layers] == [l.quant.act_unsigned
                                                         for l in net.quantized_layers]
    out = {}
    for mode in ("kernel", "crossbar", "fake"):
        net.set_mode(mode)
        for l in net.quantized_layers:
            op = l.backend_of("crossbar")
            if op is not None:
                op.op.shortcut = False                 # the array path, not the kernel
        with torch.no_grad():
            out[mode] = net(x).numpy()
    np.testing.assert_array_equal(out["crossbar"].view(np.uint32), out["kernel"].view(np.uint32))
    np.testing.assert_allclose(out["fake"], out["kernel"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- mapping and cost
def test_cycles_and_passes_in_mapping_and_cost():
    xb = Crossbar(rows=128, cols=128, cell_bits=2, dac_bits=1, signed="offset")
    grid = Granularity.tile(63, 128).resolve(16, 144)
    signed = map_layer(LayerSpec("l", 16, 144, grid, 4, 8), xb, strict=False)
    uns = map_layer(LayerSpec("l", 16, 144, grid, 4, 8, a_unsigned=True), xb, strict=False)
    assert (signed.input_cycles, uns.input_cycles) == (7, 8)     # ceil(7/1), ceil(8/1)
    assert Crossbar(dac_bits=2).input_cycles(8) == 4 and Crossbar(dac_bits=2).input_cycles(8, True) == 4
    assert Crossbar(dac_bits=3).input_cycles(8) == 3 and Crossbar(dac_bits=3).input_cycles(9, True) == 3
    P = 10
    for passes in (1, 2):
        cs = layer_cost(signed, P, xb, CostParams(input_passes=passes))
        cu = layer_cost(uns, P, xb, CostParams(input_passes=passes))
        assert cs["input_cycles"] == 7 * passes
        assert cu["input_cycles"] == 8                          # one pass, whatever input_passes
        assert cs["adc_conversions"] == P * 7 * passes * signed.used_columns
        assert cu["adc_conversions"] == P * 8 * uns.used_columns
        assert cu["dac_conversions"] == 144 * uns.arrays_per_segment * 8 * P


def test_probe_unsigned_on_an_uncalibrated_network():
    net, _ = _relu_net()
    layers = net.layers[1:-1]
    assert probe_unsigned(net, layers, "signed") == {l.name: False for l in layers}
    assert list(probe_unsigned(net, layers, "auto").values()) == [True, True, False]
    with pytest.raises(ValueError, match=rf"^layer {layers[2].name}: quant.act_signed unsigned"):
        probe_unsigned(net, layers, "unsigned")


# ---------------------------------------------------------------- config
def test_config_key_default_and_presets():
    assert validate({})["quant.act_signed"] == "signed"
    assert validate({"quant": {"act_signed": "auto"}})["quant.act_signed"] == "auto"
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "hwconfigs"
    for p in sorted(root.glob("*.yaml")):
        cfg = load(p)
        # the presets keep signed inputs until the benchmarks made from them (bench_adc,
        # bench_symmetric, the preset sweep) are rerun with auto
        assert cfg["quant.act_signed"] == "signed", p.name


@pytest.mark.parametrize("raw, shown", [
    ({"quant": {"act_signed": "maybe"}}, "quant.act_signed"),
    ({"quant": {"act_signed": True}}, "quant.act_signed"),
    ({"quant": {"search": {"act_unsigned": True}}}, "quant.search"),
])
def test_config_rejects_bad_values_in_one_line(raw, shown):
    with pytest.raises(ConfigError) as e:
        validate(raw, "bad.yaml")
    msg = str(e.value)
    assert "\n" not in msg and shown in msg and "bad.yaml" in msg
    if "act_signed" in raw["quant"]:
        assert "signed, unsigned, auto" in msg
    else:
        assert "quant.act_signed" in msg
