"""Tests of pimsim.ptqsl: the Gram form of the output error against Eq. 6 on the samples, gram
and direct modes picking identical scales, Algorithm 1 never worse than its init, the mse
baseline, parameter validation, and PTQ-SL against max calibration on the real ResNet-20."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pimsim.calibrate as calib
import ptqsl_reference as ref
from pimsim.backends import build_backend
from pimsim import ptqsl
from pimsim.methods import get_method
from pimsim.network import GemmLayer
from pimsim.quant import Granularity, max_scale, max_scales, qrange
from pimsim.testing import CHECKPOINT, data_dir_or_skip

PROP = settings(deadline=None, max_examples=150, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_layer(kind, O, C, k=3, stride=1, padding=1, dilation=1, seed=0):
    torch.manual_seed(seed)
    mod = nn.Linear(C, O) if kind == "linear" else nn.Conv2d(C, O, k, stride, padding, dilation)
    return GemmLayer("l", mod)


def make_problem(kind, O, C, B=3, hw=5, k=3, stride=1, padding=1, dilation=1, seed=0,
                 relu=True, noise=0.05):
    """A random layer, an input and a target (float output plus noise: upstream error)."""
    layer = make_layer(kind, O, C, k, stride, padding, dilation, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((B, C) if kind == "linear" else (B, C, hw, hw), generator=g)
    if relu:
        x = torch.relu(x)
    with torch.no_grad():
        y = layer.float_forward(x)
    target = y + noise * y.std() * torch.randn(y.shape, generator=g)
    return layer, x, target


def gran_from(kind, a, b):
    return {"tile": lambda: Granularity.tile(a, b), "split": lambda: Granularity.split(a, b),
            "channelwise": Granularity.channelwise, "layerwise": Granularity.layerwise}[kind]()


# --------------------------------------------------------------------------------------------
# registration and parameters
# --------------------------------------------------------------------------------------------

def test_methods_registered():
    assert get_method("ptqsl").fn is ptqsl.ptqsl_method and get_method("ptqsl").needs_target
    assert get_method("mse").fn is ptqsl.mse_method and not get_method("mse").needs_target


def test_defaults():
    p = ptqsl.check_params({})
    assert p == {"alpha": 0.5, "beta": 1.2, "candidates": 100, "rounds": 3, "mode": "gram",
                 "metric": "euclidean", "act_search": "golden", "alternate": 1,
                 "start": "act", "extend": None, "symmetric": False, "act_unsigned": False}
    f = ptqsl.candidate_factors(p)
    assert len(f) == 100 and f[0] == 0.5 and f[-1] == pytest.approx(1.2)


@pytest.mark.parametrize("key,value", [
    ("alpha", 0), ("alpha", -1.0), ("alpha", float("nan")), ("alpha", "0.5"), ("alpha", True),
    ("beta", float("inf")), ("beta", 0.4),            # beta < alpha
    ("candidates", 0), ("candidates", 2.5), ("candidates", True),
    ("rounds", 0), ("rounds", "3"), ("alternate", 0), ("alternate", 1.5),
    ("mode", "fast"), ("metric", "l1"), ("act_search", "brent"), ("start", "min"), ("bogus", 1),
    ("symmetric", 1), ("symmetric", "yes"),
])
def test_bad_params(key, value):
    with pytest.raises(ValueError, match=key):
        ptqsl.check_params({key: value})
    layer, x, t = make_problem("linear", 3, 4)
    with pytest.raises(ValueError, match=key):
        get_method("ptqsl").fn(layer, x, t, Granularity.channelwise(), 4, 8, {key: value})
    with pytest.raises(ValueError, match=key):
        get_method("mse").fn(layer, x, None, Granularity.channelwise(), 4, 8, {key: value})


def test_ptqsl_needs_target():
    layer, x, _ = make_problem("linear", 3, 4)
    with pytest.raises(ValueError, match="float"):
        ptqsl.ptqsl_method(layer, x, None, Granularity.channelwise(), 4, 8, {})


# --------------------------------------------------------------------------------------------
# im2col view and the Gram form
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,stride,padding,dilation,hw", [
    (3, 1, 1, 1, 6), (3, 2, 1, 1, 7), (1, 2, 0, 1, 6), (3, 1, 0, 2, 8), (2, 3, 2, 1, 9)])
def test_columns_match_unfold(k, stride, padding, dilation, hw):
    layer, x, t = make_problem("conv", 5, 3, B=3, hw=hw, k=k, stride=stride, padding=padding,
                               dilation=dilation)
    prob = ptqsl.LayerProblem(layer, x, t, 8)
    X, T = prob.columns(x, 0, 3)
    want = layer.im2col(x)                                     # F.unfold: B x K x L
    assert torch.equal(X, want.permute(1, 0, 2).reshape(layer.K, -1))
    assert torch.equal(T, t.permute(1, 0, 2, 3).reshape(layer.O, -1))


@pytest.mark.parametrize("a_bits", [3, 8, 14])               # 14: float64 path for H
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gram_stats_exact(kind, a_bits):
    layer, x, t = make_problem(kind, 6, 4, B=5, hw=6, relu=False)
    prob = ptqsl.LayerProblem(layer, x, t, a_bits)
    s = float(max_scale(float(x.abs().max()), a_bits)) * 0.7
    st_ = prob.gram_stats(s)
    Xq, Y = prob.direct_data(s)
    np.testing.assert_allclose(st_["H"], Xq @ Xq.T, rtol=1e-12, atol=1e-12 * np.abs(Xq @ Xq.T).max())
    np.testing.assert_allclose(st_["Gs"], Y @ Xq.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st_["u"], Xq.sum(1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st_["ys"], Y.sum(1), rtol=1e-10, atol=1e-12)
    assert st_["N"] == Xq.shape[1]
    # Xq really is the layer's quantized input (GemmLayer.quantize_input arithmetic)
    q = torch.div(x, s).round_().clamp_(*qrange(a_bits))
    X_ref = (layer.im2col(q) if kind == "conv" else q[:, :, None]).permute(1, 0, 2).reshape(layer.K, -1)
    assert np.array_equal(Xq, X_ref.double().numpy() * s)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gram_error_formula(kind):
    """||Y* - W^ Xq - b||^2 = c - 2 <W^, G> + tr(W^ H W^T) and the block-change formula."""
    layer, x, t = make_problem(kind, 7, 5, B=4, hw=6, relu=False, noise=0.3)
    prob = ptqsl.LayerProblem(layer, x, t, 8)
    s = float(max_scale(float(x.abs().max()), 8))
    st_ = prob.gram_stats(s)
    Xq, Y = prob.direct_data(s)
    b = prob.bias
    H, Gs, u = st_["H"], st_["Gs"], st_["u"]
    G = Gs - np.outer(b, u)
    R = Y - b[:, None]
    rng = np.random.default_rng(0)
    for _ in range(5):
        Wh = rng.normal(size=(layer.O, layer.K)) * 0.3
        E = Y - (Wh @ Xq + b[:, None])
        direct_rows = (E * E).sum(1)
        gram_rows = (R * R).sum(1) - 2 * (Wh * G).sum(1) + ((Wh @ H) * Wh).sum(1)
        np.testing.assert_allclose(gram_rows, direct_rows, rtol=1e-9)
        # change of the columns cs of every row: -2 (g - H w)^T d + d^T H_cc d
        cs = slice(2, 2 + layer.K // 3)
        d = rng.normal(size=(layer.O, cs.stop - cs.start)) * 0.1
        W2 = Wh.copy()
        W2[:, cs] += d
        E2 = Y - (W2 @ Xq + b[:, None])
        delta = -2 * ((G - Wh @ H)[:, cs] * d).sum(1) + ((d @ H[cs, cs]) * d).sum(1)
        np.testing.assert_allclose(direct_rows + delta, (E2 * E2).sum(1), rtol=1e-9)
        # cosine terms: <Y*, Y^> and ||Y^||^2
        Yh = Wh @ Xq + b[:, None]
        np.testing.assert_allclose((Wh * Gs).sum(1) + b * st_["ys"], (Y * Yh).sum(1), rtol=1e-9)
        nrm = ((Wh @ H) * Wh).sum(1) + 2 * b * (Wh @ u) + st_["N"] * b * b
        np.testing.assert_allclose(nrm, (Yh * Yh).sum(1), rtol=1e-9)


# --------------------------------------------------------------------------------------------
# gram and direct pick the same scales
# --------------------------------------------------------------------------------------------

def both_modes(layer, x, t, gran, wb, ab, **params):
    out = {}
    for mode in ("gram", "direct"):
        out[mode] = ptqsl.ptqsl_method(layer, x, t, gran, wb, ab, {**params, "mode": mode})
    return out["gram"], out["direct"]


@PROP
@given(kind=st.sampled_from(["conv", "linear"]), O=st.integers(1, 9), C=st.integers(1, 6),
       k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 1),
       gkind=st.sampled_from(["tile", "split", "channelwise", "layerwise"]),
       ga=st.integers(1, 10), gb=st.integers(1, 30), wb=st.integers(2, 6),
       ab=st.integers(3, 8), n=st.integers(1, 20), relu=st.booleans(), seed=st.integers(0, 99),
       ab_range=st.sampled_from([(0.4, 1.3), (0.5, 1.2), (1.0, 2.0)]),
       metric=st.sampled_from(["euclidean", "euclidean", "cosine"]))
def test_gram_equals_direct_random(kind, O, C, k, stride, pad, gkind, ga, gb, wb, ab, n, relu,
                                   seed, ab_range, metric):
    layer, x, t = make_problem(kind, O, C, B=3, hw=5, k=k, stride=stride, padding=pad, seed=seed,
                               relu=relu, noise=0.1)
    gran = gran_from(gkind, ga, gb)
    g, d = both_modes(layer, x, t, gran, wb, ab, candidates=n, alpha=ab_range[0],
                      beta=ab_range[1], metric=metric)
    assert np.array_equal(g.w_scales, d.w_scales)
    assert g.act_scale == d.act_scale
    assert g.info["changes"] == d.info["changes"]
    assert g.info["err"] <= g.info["err_max"]


def test_gram_equals_direct_exact_tie():
    """One weight -0.70, 4 bits, factors 0.4..1.3 step 0.05: q = -6 at 1.2 s0 and q = -8 at
    0.9 s0 give the same W^ = -7.2 s0 in exact arithmetic but not in floating point; both modes
    must still pick the lower index."""
    layer, x, t = make_problem("conv", 1, 1, B=3, hw=5, k=1, padding=0, seed=11, relu=False,
                               noise=0.1)
    g, d = both_modes(layer, x, t, Granularity.tile(1, 1), 4, 3, candidates=19, alpha=0.4,
                      beta=1.3)
    s0 = max_scales(layer.weight_matrix(), Granularity.tile(1, 1).resolve(1, 1), 4)[0, 0]
    assert g.w_scales[0, 0] == d.w_scales[0, 0] == np.linspace(0.4, 1.3, 19)[10] * s0


@pytest.mark.parametrize("kind,gran", [
    ("conv", Granularity.tile(3, 7)), ("conv", Granularity.channelwise()),
    ("linear", Granularity.tile(2, 5)), ("linear", Granularity.layerwise())])
def test_gram_equals_direct_cosine(kind, gran):
    layer, x, t = make_problem(kind, 7, 4, B=3, hw=5, noise=0.2)
    g, d = both_modes(layer, x, t, gran, 3, 8, candidates=20, metric="cosine")
    assert np.array_equal(g.w_scales, d.w_scales)
    assert g.act_scale == d.act_scale
    assert g.info["changes"] == d.info["changes"]
    assert g.info["err"] <= g.info["err_max"]
    assert g.info["changes"][0] > 0


def _real_inputs(names, n_images):
    from pimsim.data import calibration_set, to_tensor
    from pimsim.models import build_model
    from pimsim.network import build_network
    data = data_dir_or_skip()
    net = build_network(build_model("resnet20", checkpoint=data / "models" / CHECKPOINT))
    imgs, _ = calibration_set(n_images, 0, data)
    xs = {}

    def hook(layer, x):
        xs[layer.name] = x
        return None
    for name in names:
        net.layer(name).hook = hook
    with torch.no_grad():
        net(to_tensor(imgs))
    for name in names:
        net.layer(name).hook = None
    return net, xs


@pytest.mark.slow
def test_gram_equals_direct_resnet20_layer():
    name = "layer2.1.conv1"
    net, xs = _real_inputs([name], 32)
    layer, x = net.layer(name), xs[name]
    with torch.no_grad():
        t = layer.float_forward(x)
    x = torch.div(x, 0.05).round_().mul_(0.05)       # an input with upstream error
    g, d = both_modes(layer, x, t, Granularity.tile(4, 144), 4, 8, rounds=2)
    assert np.array_equal(g.w_scales, d.w_scales)
    assert g.act_scale == d.act_scale
    assert g.info["err"] < g.info["err_max"]


# --------------------------------------------------------------------------------------------
# Algorithm 1 and the activation search
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("gran", [Granularity.tile(2, 9), Granularity.channelwise(),
                                  Granularity.split(3, 4)])
def test_algorithm1_never_worse_than_init(metric, gran):
    """Every round keeps or lowers the layer-output error (evaluated on the samples)."""
    layer, x, t = make_problem("conv", 8, 5, B=4, hw=6, noise=0.2, seed=3)
    prob = ptqsl.LayerProblem(layer, x, t, 8)
    s = float(max_scale(float(x.abs().max()), 8))
    W = layer.weight_matrix().astype(np.float64)
    grid = gran.resolve(layer.O, layer.K)
    Xq, Y = prob.direct_data(s)
    b = prob.bias

    def err(S):
        Yh = ptqsl.fake_quant(W, grid.expand(S), *qrange(3)) @ Xq + b[:, None]
        if metric == "euclidean":
            return float(((Y - Yh) ** 2).sum())
        return 1 - float((Y * Yh).sum()) / np.sqrt(float((Yh * Yh).sum()) * float((Y * Y).sum()))

    S0 = max_scales(W, grid, 3)
    prev = err(S0)
    for rounds in (1, 2, 3):
        ev = ptqsl.GramEval(prob.gram_stats(s), b, metric)
        S, info = ptqsl.algorithm1(W, grid, 3, np.linspace(0.5, 1.2, 30), rounds, ev, metric, prob.t2)
        e = err(S)
        assert e <= prev * (1 + 1e-12)
        prev = e
    assert prev < err(S0)


def test_search_act_scale_golden_and_grid():
    class Stub:                                 # a unimodal error in s with its minimum at 0.9
        calls = 0

        def error(self, w, s, metric):
            Stub.calls += 1
            return (s - 0.9) ** 2

    grid = np.linspace(0.5, 1.2, 100)
    want = grid[np.argmin((grid - 0.9) ** 2)]
    s, e, n = ptqsl.search_act_scale(Stub(), None, grid, 1.0, "euclidean", "golden")
    assert s == want and n <= 16
    s, e, n = ptqsl.search_act_scale(Stub(), None, grid, 1.0, "euclidean", "grid")
    assert s == want and n == 101
    # the current scale is kept unless a candidate is strictly better
    s, e, n = ptqsl.search_act_scale(Stub(), None, grid, 0.9, "euclidean", "grid")
    assert s == 0.9


# --------------------------------------------------------------------------------------------
# mse baseline
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gran", [Granularity.tile(3, 5), Granularity.channelwise(),
                                  Granularity.layerwise()])
def test_mse_scales_brute_force(gran):
    rng = np.random.default_rng(1)
    W = rng.normal(size=(7, 13))
    W[0, :] = 0.0                                           # an all-zero row
    grid = gran.resolve(*W.shape)
    f = np.linspace(0.5, 1.2, 15)
    S = ptqsl.mse_scales(W, grid, 3, f)
    S0 = max_scales(W, grid, 3)
    lo, hi = qrange(3)
    for i, j, rows, cols in grid.tiles():
        w = W[rows, cols]
        e = lambda s: float(((w - s * np.clip(np.rint(w / s), lo, hi)) ** 2).sum())  # noqa: E731
        errs = [e(v) for v in f * S0[i, j]]
        best = min(range(len(f)), key=lambda t: (errs[t], t))
        want = f[best] * S0[i, j] if errs[best] < e(S0[i, j]) else S0[i, j]
        assert S[i, j] == want
        assert e(S[i, j]) <= e(S0[i, j])


def test_mse_method_act_scale_is_max():
    layer, x, _ = make_problem("conv", 4, 3)
    q = ptqsl.mse_method(layer, x, None, Granularity.channelwise(), 4, 8, {})
    assert q.act_scale == float(max_scale(float(x.abs().max()), 8))
    assert q.info["method"] == "mse"


# --------------------------------------------------------------------------------------------
# through pimsim.calibrate
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_calibrate_small_network(metric):
    from pimsim.network import build_network
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5))
    net = build_network(model.eval())
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        y_float = net(x)
    for method in ("ptqsl", "mse"):
        info = calib.calibrate(net, x, Granularity.tile(4, 20), 3, 6, method=method,
                               float_layers=[], progress=False,
                               params={"candidates": 20, "metric": metric})
        assert info["float_layers"] == []
        assert len(net.quantized_layers) == 3
        net.set_mode("fake")
        with torch.no_grad():
            assert torch.isfinite(net(x)).all()
        net.set_mode("float")
        with torch.no_grad():
            assert torch.equal(net(x), y_float)
    for l in net.layers:                                  # the last run was mse
        assert l.quant.info["method"] == "mse"
    calib.calibrate(net, x, Granularity.tile(4, 20), 3, 6, method="ptqsl", float_layers=[],
                    progress=False, params={"candidates": 20, "metric": metric})
    for l in net.layers:
        i = l.quant.info
        assert i["method"] == "ptqsl" and i["metric"] == metric
        assert i["err"] <= i["err_max"] and i["rounds"] >= 1


# --------------------------------------------------------------------------------------------
# the real network
# --------------------------------------------------------------------------------------------

def _conv(layer, x, w):
    """The layer's convolution with weights ``w`` (float32 operands: float64 convolutions of
    128 images would add half a minute; the comparison below allows float32 rounding)."""
    return F.conv2d(x.float(), w.float(), layer.bias, layer.stride, layer.padding, layer.dilation)


def _check_layers_run_what_calibration_reported(net, x):
    """Every PTQ-SL layer's integers (kernel and fake path) are ``clamp(round(w / s_ij))`` of
    its tile scales, done here tile by tile; and the error it reports is Eq. 6 of exactly these
    weights and its activation scale, recomputed on the input it saw in calibration (the
    fake-mode network's) against the float network's output."""
    ins_q, ins_f = ref.layer_inputs(net, x, "fake"), ref.layer_inputs(net, x, "float")
    for l in net.quantized_layers:
        q, i = l.quant, l.quant.info
        assert i["err"] <= i["err_max"], l.name
        assert i["err"] < i["err_init"], l.name
        W = l.weight_matrix().astype(np.float64)
        g = q.grid
        wq = ref.quantize_tiles(W, q.w_scales, g.r, g.c, q.w_bits, False)
        assert np.array_equal(build_backend("kernel", l).op.wq.astype(np.int64), wq), l.name
        w_hat = ref.dequant_tiles(W, q.w_scales, g.r, g.c, q.w_bits, False)
        np.testing.assert_allclose(build_backend("fake", l).weight.reshape(l.O, -1).double().numpy(), w_hat,
                                   rtol=1e-6, atol=0, err_msg=l.name)
        s = q.act_scale
        xq = (ins_q[l.name].double() / s).round().clamp(-128, 127) * s
        y = _conv(l, xq, torch.from_numpy(w_hat).reshape(l.weight.shape))
        t = _conv(l, ins_f[l.name], l.weight)
        err = float(torch.linalg.vector_norm(t.double() - y.double()))
        assert i["err"] == pytest.approx(err, rel=1e-5), l.name


@pytest.mark.slow
def test_resnet20_ptqsl_beats_max():
    from pimsim.data import calibration_set, load_cifar10, to_tensor
    from pimsim.models import build_model
    from pimsim.network import build_network
    from pimsim.simulate import evaluate
    data = data_dir_or_skip()
    net = build_network(build_model("resnet20", checkpoint=data / "models" / CHECKPOINT))
    imgs, _ = calibration_set(128, 0, data)
    x = to_tensor(imgs)
    test_x, test_y = load_cifar10("test", data, limit=1000)
    gran = Granularity.channelwise()
    acc = {}
    for method in ("max", "ptqsl"):
        calib.calibrate(net, x, gran, 4, 8, method=method, progress=False,
                        params={"candidates": 100, "rounds": 3})
        net.set_mode("fake")
        acc[method], _ = evaluate(net, test_x, test_y, progress=False)
        if method == "ptqsl":
            _check_layers_run_what_calibration_reported(net, x)
    print(acc)
    assert acc["ptqsl"] >= acc["max"]
