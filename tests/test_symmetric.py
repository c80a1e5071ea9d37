"""Calibration in the symmetric integer range of crossbar arrays: with ``symmetric`` the
methods search their scales for ``[-(2^(b-1)-1), 2^(b-1)-1]`` (no weight or input at
``-2^(b-1)``), gram and direct mode still agree, every path (``calibrate``, the reorder search,
``pimsim run`` with a ``crossbar:`` section) produces symmetric layers, and a method that ignores
the flag is clamped afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pimsim.calibrate as calib
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


def test_symmetric_search_never_uses_the_negative_end():
    found = 0
    for seed in range(30):
        layer, x, t = problem("conv", 6, 3, seed)
        params = {"candidates": 40, "alpha": 0.4, "beta": 1.3}
        gran = Granularity.tile(2, 9)
        a = ptqsl.ptqsl_method(layer, x, t, gran, 3, 8, params)
        s = ptqsl.ptqsl_method(layer, x, t, gran, 3, 8, {**params, "symmetric": True})
        W = layer.weight_matrix()
        found += int((a.weight_int(W) == -4).any())
        assert s.symmetric and s.info["symmetric"] and not a.symmetric
        assert s.weight_int(W).min() >= -3
        assert s.info["err"] <= s.info["err_max"]
    assert found > 0          # the asymmetric search does use -2^(b-1) on some of these layers


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
    assert g.weight_int(layer.weight_matrix()).min() >= -qrange(wb, True)[1]


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


@pytest.mark.parametrize("method", ["max", "mse", "ptqsl", "ignores-flag"])
def test_calibrate_symmetric_every_method(method):
    if method == "ignores-flag":
        def fn(layer, x, target, gran, w_bits, a_bits, params):   # a third-party method
            grid = gran.resolve(layer.O, layer.K)
            return LayerQuant(grid, max_scales(layer.weight_matrix(), grid, w_bits) * 0.6, 0.05,
                              w_bits, a_bits)
        methods.register_method("ignores-flag", fn)
    try:
        net = small_net()
        x = torch.randn(6, 3, 8, 8)
        calib.calibrate(net, x, Granularity.tile(4, 9), 3, 6, method=method, float_layers=[],
                        progress=False, params={"candidates": 15} if method != "max" else {},
                        symmetric=True)
        for l in net.layers:
            assert l.quant.symmetric
            assert l.quant.weight_int(l.weight_matrix()).min() >= -3
        net.set_mode("fake")
        with torch.no_grad():
            assert torch.isfinite(net(x)).all()
    finally:
        if method == "ignores-flag":
            methods.unregister_method("ignores-flag")


def test_reorder_search_symmetric():
    net = small_net()
    x = torch.randn(8, 3, 8, 8)
    res = R.evolve(net, x, Granularity.split(2, 2), 3, 8, params={"candidates": 10, "rounds": 1},
                   float_layers=[], population=3, generations=1, seed=0, progress=False,
                   reorderer=R.Reorderer(net, R.find_groups(net, x[:1])), symmetric=True)
    assert res["orders"]
    for l in net.layers:
        assert l.quant.symmetric and l.quant.weight_int(l.weight_matrix()).min() >= -3


def test_symmetric_follows_the_crossbar_section():
    assert symmetric_range(validate({"crossbar": {"rows": 64, "cols": 64}}, "x.yaml"))
    assert not symmetric_range(validate({}, "x.yaml"))
    with pytest.raises(ConfigError, match="quant.search.*crossbar: section"):
        validate({"quant": {"search": {"symmetric": True}}}, "x.yaml")
