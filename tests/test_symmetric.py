"""Calibration in the symmetric integer range of crossbar arrays: with ``symmetric`` the
methods CHOOSE their scales for ``[-(2^(b-1)-1), 2^(b-1)-1]`` -- checked against brute-force
references (``ptqsl_reference``) computed in that range, on layers where the symmetric choice
differs from the asymmetric one -- gram and direct mode still agree, every path (``calibrate``,
the reorder search, ``pimsim run`` with a ``crossbar:`` section) produces layers that choose and
run in the symmetric range, and a method that ignores the flag is clamped afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pimsim.calibrate as calib
import ptqsl_reference as ref
from pimsim import methods
from pimsim import ptqsl
from pimsim import reorder as R
from pimsim.config import ConfigError, validate
from pimsim.network import GemmLayer, LayerQuant, build_network
from pimsim.quant import Granularity, max_scales, qrange, quantize, quantize_weight
from pimsim.simulate import symmetric_range

PROP = settings(deadline=None, max_examples=40, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def problem(kind, O, C, seed, noise=0.1, hw=5):
    torch.manual_seed(seed)
    mod = nn.Linear(C, O) if kind == "linear" else nn.Conv2d(C, O, 3, 1, 1)
    layer = GemmLayer("l", mod)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((3, C) if kind == "linear" else (3, C, hw, hw), generator=g)
    with torch.no_grad():
        y = layer.float_forward(x)
    return layer, x, y + noise * y.std() * torch.randn(y.shape, generator=g)


def test_qrange_and_quantize_symmetric():
    assert qrange(4) == (-8, 7) and qrange(4, True) == (-7, 7)
    assert qrange(2, True) == (-1, 1) and qrange(8, True) == (-127, 127)
    x = np.array([-9.0, -7.6, -7.4, 0.2, 7.6, 9.0])
    assert quantize(x, 1.0, 4).tolist() == [-8, -8, -7, 0, 7, 7]
    assert quantize(x, 1.0, 4, symmetric=True).tolist() == [-7, -7, -7, 0, 7, 7]
    assert quantize(torch.from_numpy(x), 1.0, 4, symmetric=True).tolist() == [-7, -7, -7, 0, 7, 7]
    grid = Granularity.layerwise().resolve(2, 3)
    w = np.array([[-8.0, 1, 2], [3, -7.9, 7]])
    assert quantize_weight(w, grid, np.ones((1, 1)), 4, symmetric=True).min() == -7


FACTORS = np.linspace(0.5, 1.2, 12)     # 1.0 not among them: the max init stays distinct
MARGIN = 1e-7                           # reference decisions not near a tie


def crafted(seed):
    """A linear layer whose every row has its largest magnitude negative (-1.0) and an input
    whose first feature is negative: shrinking a scale below max calibration is cheap when
    -2^(b-1) is available and costly when it is not, so the two ranges choose differently."""
    torch.manual_seed(seed)
    mod = nn.Linear(6, 3)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(3, 6) * 0.3)
        mod.weight[:, 0] = -1.0
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(40, 6, generator=g)
    x[:, 0] = -x[:, 0].abs() - 0.5
    with torch.no_grad():
        y = mod(x)
    return mod, x, y + 0.1 * y.std() * torch.randn(y.shape, generator=g)


@pytest.mark.parametrize("mode", ["gram", "direct"])
@pytest.mark.parametrize("gran", [Granularity.channelwise(), Granularity.tile(1, 3)], ids=str)
def test_symmetric_search_chooses_the_symmetric_optimum(gran, mode):
    """PTQ-SL's scales (weights and input) are the brute-force choice of the paper's steps in
    the range asked for; on these layers the symmetric choice differs from the asymmetric one,
    so a search that ignored the flag (and only clamped afterwards) would fail."""
    params = {"candidates": len(FACTORS), "alpha": 0.5, "beta": 1.2, "act_search": "grid",
              "mode": mode}
    for seed in range(3):
        mod, x, t = crafted(seed)
        layer, L = GemmLayer("l", mod), ref.Layer(mod, x, t)
        grid = gran.resolve(layer.O, layer.K)
        want = {sym: ref.pipeline(L, grid.r, grid.c, 3, 4, FACTORS, 3, sym) for sym in (False, True)}
        assert not np.array_equal(want[True]["S"], want[False]["S"]), seed   # the flag matters
        for sym in (False, True):
            assert want[sym]["margin"] > MARGIN, (seed, sym)
            q = ptqsl.ptqsl_method(layer, x, t, gran, 3, 4, {**params, "symmetric": sym})
            np.testing.assert_allclose(q.w_scales, want[sym]["S"], rtol=1e-14,
                                       err_msg=f"seed {seed}, symmetric={sym}")
            assert q.act_scale == pytest.approx(want[sym]["s_x"], rel=1e-14), (seed, sym)
            assert q.info["err"] == pytest.approx(want[sym]["err"], rel=1e-5)
            assert q.symmetric == q.info["symmetric"] == sym


@PROP
@given(kind=st.sampled_from(["conv", "linear"]), O=st.integers(1, 8), C=st.integers(1, 5),
       gkind=st.sampled_from(["tile", "channelwise", "layerwise"]), ga=st.integers(1, 6),
       gb=st.integers(1, 20), wb=st.integers(2, 5), ab=st.integers(3, 8), seed=st.integers(0, 99),
       metric=st.sampled_from(["euclidean", "cosine"]))
def test_symmetric_gram_equals_direct(kind, O, C, gkind, ga, gb, wb, ab, seed, metric):
    layer, x, t = problem(kind, O, C, seed)
    gran = {"tile": Granularity.tile(ga, gb), "channelwise": Granularity.channelwise(),
            "layerwise": Granularity.layerwise()}[gkind]
    p = {"candidates": 15, "alpha": 0.4, "beta": 1.3, "metric": metric, "symmetric": True}
    g = ptqsl.ptqsl_method(layer, x, t, gran, wb, ab, {**p, "mode": "gram"})
    d = ptqsl.ptqsl_method(layer, x, t, gran, wb, ab, {**p, "mode": "direct"})
    assert np.array_equal(g.w_scales, d.w_scales) and g.act_scale == d.act_scale
    # the error the search reports is Eq. 6 of its scales in the symmetric range (weights and
    # input), recomputed here tile by tile: the search optimized what the arrays will hold
    grid = gran.resolve(layer.O, layer.K)
    L = ref.Layer(layer, x, t)
    err = L.objective(ref.dequant_tiles(L.W, g.w_scales, grid.r, grid.c, wb, True),
                      L.xq(g.act_scale, ab, True), metric)
    assert g.info["err"] == pytest.approx(err, rel=1e-5, abs=1e-7)


def test_mse_symmetric_brute_force():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 6))
    grid = Granularity.tile(2, 3).resolve(4, 6)
    f = np.linspace(0.4, 1.3, 10)
    S = ptqsl.mse_scales(W, grid, 3, f, symmetric=True)
    S0 = max_scales(W, grid, 3)
    for i in range(2):
        for j in range(2):
            w = W[2 * i:2 * i + 2, 3 * j:3 * j + 3]

            def err(s):
                return float(((w - s * np.clip(np.rint(w / s), -3, 3)) ** 2).sum())
            best = min([S0[i, j]] + list(f * S0[i, j]), key=lambda s: (err(s), s != S0[i, j]))
            assert err(S[i, j]) == pytest.approx(err(best))


def small_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    return build_network(model.eval())


def reference_output(layer, xin, a_bits):
    """The layer's output on ``xin`` in the symmetric range, by hand: its weights quantized
    tile by tile to +-(2^(w-1)-1) and ``xin`` to +-(2^(a-1)-1), float64 (batch first)."""
    q = layer.quant
    L = ref.Layer(layer, xin, ref.float_target(layer, xin))
    W_hat = ref.dequant_tiles(L.W, q.w_scales, q.grid.r, q.grid.c, q.w_bits, True)
    Y = W_hat @ L.xq(q.act_scale, a_bits, True) + L.b[:, None]              # O x (B * pixels)
    if layer.kind == "linear":
        return Y.T
    ho, wo = layer.out_hw(xin.shape[2], xin.shape[3])
    return Y.reshape(layer.O, xin.shape[0], ho, wo).transpose(1, 0, 2, 3)


def check_runs_symmetric(net, x, a_bits):
    """Every layer, fed the input it saw in calibration with random signs and scaled to 1.5x
    its integer range (so that inputs clamp at both ends), computes in the symmetric range on
    both the fake and the kernel path."""
    ins = ref.layer_inputs(net, x, "fake")
    g = torch.Generator().manual_seed(5)
    for l in net.layers:
        signs = torch.randint(0, 2, ins[l.name].shape, generator=g) * 2.0 - 1.0
        x0 = ins[l.name]
        xin = x0 * signs * (1.5 * 2 ** (a_bits - 1) * l.quant.act_scale / float(x0.abs().max()))
        want = reference_output(l, xin, a_bits)
        assert (xin / l.quant.act_scale).min() < -(2 ** (a_bits - 1)), l.name   # clamps
        for y in (l.fake_forward(xin), l.kernel_forward(xin)):
            err = np.abs(y.double().numpy() - want).max() / np.abs(want).max()
            assert err <= 1e-5, f"{l.name}: {err:.3g}"


def check_chose_symmetric(net, x, method, gran, w_bits, a_bits, params):
    """Every layer's scales are the reference choice of ``method`` in the symmetric range on
    the input it saw in calibration; returns how many layers the asymmetric choice differs on."""
    ins_q, ins_f = ref.layer_inputs(net, x, "fake"), ref.layer_inputs(net, x, "float")
    differ = 0
    for l in net.layers:
        grid = gran.resolve(l.O, l.K)
        W = l.weight_matrix().astype(np.float64)
        if method == "mse":
            want = {sym: ref.mse_reference(W, grid.r, grid.c, w_bits, FACTORS, sym)
                    for sym in (False, True)}
            assert want[True][1] > MARGIN, l.name
            np.testing.assert_allclose(l.quant.w_scales, want[True][0], rtol=1e-14, err_msg=l.name)
            differ += not np.array_equal(want[True][0], want[False][0])
        else:
            L = ref.Layer(l, ins_q[l.name], ref.float_target(l, ins_f[l.name]))
            want = {sym: ref.pipeline(L, grid.r, grid.c, w_bits, a_bits, FACTORS,
                                      params.get("rounds", 3), sym) for sym in (False, True)}
            assert want[True]["margin"] > MARGIN, l.name
            np.testing.assert_allclose(l.quant.w_scales, want[True]["S"], rtol=1e-14,
                                       err_msg=l.name)
            assert l.quant.act_scale == pytest.approx(want[True]["s_x"], rel=1e-14), l.name
            differ += not np.array_equal(want[True]["S"], want[False]["S"])
    return differ


SEARCH = {"candidates": len(FACTORS), "alpha": 0.5, "beta": 1.2, "act_search": "grid"}


@pytest.mark.parametrize("method", ["max", "mse", "ptqsl", "ignores-flag"])
def test_calibrate_symmetric_every_method(method):
    if method == "ignores-flag":
        def fn(layer, x, target, gran, w_bits, a_bits, params):   # a third-party method
            grid = gran.resolve(layer.O, layer.K)
            return LayerQuant(grid, max_scales(layer.weight_matrix(), grid, w_bits) * 0.6, 0.05,
                              w_bits, a_bits)
        methods.register_method("ignores-flag", fn)
    net = small_net()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gran = Granularity.tile(4, 9)
    try:
        calib.calibrate(net, x, gran, 3, 6, method=method, float_layers=[], progress=False,
                        params=SEARCH if method in ("mse", "ptqsl") else {}, symmetric=True)
    finally:
        if method == "ignores-flag":
            methods.unregister_method("ignores-flag")
    for l in net.layers:
        assert l.quant.symmetric
    if method in ("mse", "ptqsl"):
        assert check_chose_symmetric(net, x, method, gran, 3, 6, SEARCH) > 0
    if method == "ignores-flag":      # clamped afterwards: its 0.6 x max scales reach -4
        W = [l.weight_matrix().astype(np.float64) for l in net.layers]
        assert any((ref.quantize_tiles(w, l.quant.w_scales, 4, 9, 3, False) == -4).any()
                   for w, l in zip(W, net.layers))
    check_runs_symmetric(net, x, 6)


def test_reorder_search_symmetric():
    """The evolutionary search calibrates in the symmetric range: every layer of the network
    it leaves holds the symmetric PTQ-SL choice for its final order and runs symmetric."""
    net = small_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gran = Granularity.split(2, 2)
    params = {**SEARCH, "rounds": 1}
    res = R.evolve(net, x, gran, 3, 8, params=params, float_layers=[], population=3,
                   generations=1, seed=0, progress=False,
                   reorderer=R.Reorderer(net, R.find_groups(net, x[:1])), symmetric=True)
    assert res["orders"]
    for l in net.layers:
        assert l.quant.symmetric
    assert check_chose_symmetric(net, x, "ptqsl", gran, 3, 8, params) > 0
    check_runs_symmetric(net, x, 8)


def test_symmetric_follows_the_crossbar_section():
    assert symmetric_range(validate({"crossbar": {"rows": 64, "cols": 64}}, "x.yaml"))
    assert not symmetric_range(validate({}, "x.yaml"))
    with pytest.raises(ConfigError, match="quant.search.*crossbar: section"):
        validate({"quant": {"search": {"symmetric": True}}}, "x.yaml")
