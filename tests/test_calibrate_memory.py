"""Calibration without every float target held at once (issue #14 item 5).

``pimsim.calibrate.calibrate`` computes each layer's float target in the same pass as the
quantized network (``run_lockstep``). Checked here against a copy of the algorithm it replaced
(every float output recorded up front by a separate float pass, then one hooked pass):
bit-identical scales, activation scales and integer weights for max / mse / ptqsl at every
granularity, on a CIFAR ResNet and on a model with a branch, a ``cat``, a value read by two
later layers, a float layer in the middle, a layer after a non-GEMM op and an in-place op mixing
a value both networks share with one they do not. Also: the float outputs alive during the
pass stay bounded (the old algorithm holds all of them: the probe sees that), and a model with
``ReLU(inplace=True)`` after a conv gets the conv's output as its target (plain torch), not
the ReLU'd tensor the recorded-up-front algorithm ended up holding.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pimsim.calibrate import (calibrate, method_params, quantize_layer, resolve_float_layers,
                              run_lockstep)
from pimsim.methods import get_method, register_method, unregister_method
from pimsim.models import build_model
from pimsim.network import GemmLayer, build_network
from pimsim.quant import Granularity
from pimsim.reorder import calibrate_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"candidates": 12, "rounds": 2}          # ptqsl kept quick; the search is not the point


# --------------------------------------------------------------------------------------------
# the algorithm calibrate used before: all float outputs recorded first, then one hooked pass
# --------------------------------------------------------------------------------------------

def reference_calibrate(net, images, gran, w_bits, a_bits, method="max", float_layers="auto",
                        params=None, symmetric=False, probe=None):
    m = get_method(method)
    params = method_params(params, symmetric)
    keep = resolve_float_layers(net, float_layers)
    todo = [l for l in net.layers if l.name not in keep]
    for l in net.layers:
        l.clear_quant()
    targets = {}
    if m.needs_target:
        def rec(layer, x):
            y = layer.float_forward(x)
            targets[layer.name] = y
            return y
        saved = {l.name: l.mode for l in net.layers}
        try:
            for l in net.layers:
                l.mode = "float"
            net.run_with_hooks(images, {l.name: rec for l in todo})
        finally:
            for l in net.layers:
                l.mode = saved[l.name]

    def hook(layer, x):
        layer.hook = None
        if probe is not None:
            probe(layer)
        quantize_layer(m.fn, layer, x, targets.pop(layer.name, None), gran, w_bits, a_bits,
                       params)
        return None
    net.run_with_hooks(images, {l.name: hook for l in todo})


def quant_state(net) -> dict:
    out = {}
    for l in net.layers:
        q = l.quant
        out[l.name] = None if q is None else (
            (q.grid.O, q.grid.K, q.grid.r, q.grid.c), np.asarray(q.w_scales).copy(),
            q.act_scale, l.wq.copy(), l.mode, q.symmetric, q.w_bits, q.a_bits)
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        if a[n] is None or b[n] is None:
            assert a[n] is None and b[n] is None, n
            continue
        ga, sa, xa, wa, *ra = a[n]
        gb, sb, xb, wb, *rb = b[n]
        assert ga == gb, n
        assert sa.tobytes() == sb.tobytes(), f"{n}: tile scales differ"
        assert xa == xb, f"{n}: act scale {xa} != {xb}"
        assert np.array_equal(wa, wb), f"{n}: integer weights differ"
        assert ra == rb, n


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

class Mixed(nn.Module):
    """stem (float) -> relu = s; s.add_(b(s)) mixes the shared s with b's quantized output
    in place; t is read by a and c (two later layers); cat; pool (non-GEMM) -> d; mid stays
    float (float_layers); e after a flatten; fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1)
        self.a = nn.Conv2d(6, 5, 3, padding=1)
        self.c = nn.Conv2d(6, 3, 1, bias=False)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 7, 3, stride=2, padding=1)
        self.e = nn.Linear(7 * 2 * 2, 9)
        self.fc = nn.Linear(9, 4)

    def forward(self, x):
        s = F.relu(self.stem(x))
        s2 = s.add_(self.b(s))              # in place on a value both networks still share
        t = F.relu(s2)
        y = torch.cat([F.relu(self.a(t)), self.c(t)], 1)
        y = F.relu(self.mid(y)) + y
        z = F.relu(self.d(F.avg_pool2d(y, 2)))
        return self.fc(F.relu(self.e(torch.flatten(z, 1))))


def mixed_net(seed=0):
    torch.manual_seed(seed)
    return build_network(Mixed().eval())


def images(n, hw, seed=1):
    return torch.randn(n, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


GRANS = {"layerwise": Granularity.layerwise, "channelwise": Granularity.channelwise,
         "tile": lambda: Granularity.tile(4, 20), "split": lambda: Granularity.split(2, 3)}


def both(make_net, x, gran, method, **kw):
    net_new, net_old = make_net(), make_net()
    calibrate(net_new, x, gran, progress=False, method=method, **kw)
    reference_calibrate(net_old, x, gran, method=method, **kw)
    return quant_state(net_new), quant_state(net_old)


# --------------------------------------------------------------------------------------------
# bit-identical to the old algorithm
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gran", list(GRANS))
@pytest.mark.parametrize("method", ["max", "mse", "ptqsl"])
def test_mixed_model_bit_identical(method, gran):
    params = FAST if method == "ptqsl" else None
    new, old = both(mixed_net, images(3, 8), GRANS[gran](), method, w_bits=4, a_bits=6,
                    float_layers=["stem", "mid", "fc"], params=params)
    assert sum(v is not None for v in new.values()) == 5
    assert_same(new, old)


@pytest.mark.parametrize("metric,symmetric", [("cosine", False), ("euclidean", True)])
def test_mixed_model_ptqsl_cosine_and_symmetric(metric, symmetric):
    new, old = both(mixed_net, images(2, 8, seed=4), Granularity.tile(3, 7), "ptqsl", w_bits=3,
                    a_bits=5, float_layers=["mid"],
                    params={**FAST, "metric": metric}, symmetric=symmetric)
    assert_same(new, old)


@pytest.mark.parametrize("method", ["max", "mse", "ptqsl"])
def test_resnet20_bit_identical(method):
    def make():
        torch.manual_seed(0)
        return build_network(build_model("resnet20"))
    params = {"candidates": 8, "rounds": 1} if method == "ptqsl" else None
    new, old = both(make, images(2, 32, seed=2), Granularity.tile(16, 36), method, w_bits=4,
                    a_bits=8, params=params)
    assert sum(v is not None for v in new.values()) == 18
    assert_same(new, old)


def test_reorder_segment_calibration_unchanged():
    """``pimsim.reorder.calibrate_layers`` (the reorder search's segment pass) on the lockstep
    pass: same quantization and same recorded (input, target) as the old recording."""
    x = images(2, 8, seed=5)
    net = mixed_net()
    names = ["b", "a", "c"]
    kept = calibrate_layers(net, x, names, Granularity.tile(3, 7), 4, 6, "ptqsl", FAST,
                            record=["a", "c"])
    ref = mixed_net()
    reference_calibrate(ref, x, Granularity.tile(3, 7), 4, 6, "ptqsl",
                        float_layers=["stem", "mid", "d", "e", "fc"], params=FAST)
    assert_same(quant_state(net), quant_state(ref))
    # the recorded targets: the float network's layer output, by plain torch on the model
    torch.manual_seed(0)
    model = Mixed().eval()
    with torch.no_grad():
        s = F.relu(model.stem(x))
        t = F.relu(s + model.b(s))
        assert torch.equal(kept["a"][1], model.a(t))
        assert torch.equal(kept["c"][1], model.c(t))
    assert kept["a"][0].shape == t.shape and not torch.equal(kept["a"][0], t)   # quantized b


def test_stop_after_and_unknown_layer():
    net = mixed_net()
    seen = []
    done = run_lockstep(net, images(1, 8), {n: lambda l, x, t: seen.append(l.name)
                                            for n in ("a", "d")}, stop_after="c")
    assert done == seen == ["a"]
    with pytest.raises(ValueError, match="no GEMM layer named"):
        run_lockstep(net, images(1, 8), {"nope": lambda l, x, t: None})


# --------------------------------------------------------------------------------------------
# in-place ReLU right after a conv: the target is the conv's output
# --------------------------------------------------------------------------------------------

class InplaceChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.c3(self.relu(self.c2(self.relu(self.c1(x)))))


def test_inplace_relu_target_is_the_conv_output():
    torch.manual_seed(0)
    model = InplaceChain().eval()
    x = images(2, 6, seed=7)
    with torch.no_grad():                             # plain torch, float network
        h1 = model.c1(x)
        want = {"c1": h1.clone(), "c2": model.c2(torch.relu(h1)).clone()}
        want["c3"] = model.c3(torch.relu(want["c2"]))
    net = build_network(model)
    got = {}
    run_lockstep(net, x, {n: lambda l, xi, t: got.__setitem__(l.name, t.clone())
                          for n in want}, targets=set(want))
    for n in want:
        assert torch.equal(got[n], want[n]), n
        assert (want[n] < 0).any()          # so a ReLU'd copy would differ
    # the recorded-up-front algorithm held the ReLU'd tensors instead (what was fixed)
    seen = {}
    calib = get_method("ptqsl")

    def spy(layer, xi, target, *a):
        seen[layer.name] = target.clone()
        return calib.fn(layer, xi, target, *a)
    register_method("spy_h4", spy, needs_target=True)
    try:
        reference_calibrate(build_network(model), x, Granularity.channelwise(), 4, 8,
                            method="spy_h4", float_layers=[], params=FAST)
    finally:
        unregister_method("spy_h4")
    assert not torch.equal(seen["c1"], want["c1"])
    assert torch.equal(seen["c1"], torch.relu(want["c1"]))


# --------------------------------------------------------------------------------------------
# the float outputs alive at once stay bounded
# --------------------------------------------------------------------------------------------

class Chain(nn.Module):
    def __init__(self, n=10):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4 if i else 3, 4, 3, padding=1) for i in range(n))

    def forward(self, x):
        for c in self.convs:
            x = F.relu(c(x))
        return x


def test_float_targets_not_all_alive(monkeypatch):
    """Every tensor ``GemmLayer.float_forward`` returns (targets, fake outputs, search
    outputs) is tracked by a weakref; at each layer the live ones are counted. Lockstep: a
    few; the old algorithm: every later layer's target (the probe must see that)."""
    n = 10
    live = weakref.WeakSet()
    orig = GemmLayer.float_forward

    def tracked(self, x, weight=None):
        y = orig(self, x, weight)
        live.add(y)
        return y
    monkeypatch.setattr(GemmLayer, "float_forward", tracked)
    counts = {"new": [], "old": []}
    real = get_method("ptqsl")

    def counting(layer, x, target, *a):
        counts[which].append(len(live))
        return real.fn(layer, x, target, *a)
    register_method("count_h4", counting, needs_target=True)
    x = images(2, 6, seed=3)
    try:
        for which in ("new", "old"):
            torch.manual_seed(0)
            net = build_network(Chain(n).eval())
            live.clear()
            if which == "new":
                calibrate(net, x, Granularity.channelwise(), 4, 8, method="count_h4",
                          float_layers=[], params=FAST, progress=False)
            else:
                reference_calibrate(net, x, Granularity.channelwise(), 4, 8, method="count_h4",
                                    float_layers=[], params=FAST)
    finally:
        unregister_method("count_h4")
    assert len(counts["new"]) == len(counts["old"]) == n
    assert max(counts["new"]) <= 3, counts["new"]
    assert counts["old"][0] >= n, counts["old"]            # the probe sees the old hoard
