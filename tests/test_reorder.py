"""Tests of pimsim.reorder: permutation groups found from the graph (which layers tie, what
freezes), function preservation of joint and independent orders (custom branch model, ResNet-18,
real ResNet-20), exact reset, Gram-permuted scoring against the samples, independent = joint for
consistent orders, segments, seeded determinism of the search, and the reorder config keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimsim import reorder as R
from pimsim.calibrate import calibrate
from pimsim.config import ConfigError, validate
from pimsim.models import build_model, resnet18
from pimsim.network import GemmLayer, build_network
from pimsim.ptqsl import (DirectEval, LayerProblem, algorithm1, candidate_factors, check_params,
                          fake_quant)
from pimsim.quant import Granularity, qrange
from pimsim.testing import CHECKPOINT, data_dir_or_skip, restored_threads

PROP = settings(deadline=None, max_examples=25, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Branchy(nn.Module):
    """stem -> {conv1 -> relu -> conv2, 1x1 conv3} -> add -> BN (not foldable) -> relu -> conv4
    -> relu -> global pool -> flatten -> fc. conv2 and conv3 outputs share one order."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(8, 10, 1)
        self.bn = nn.BatchNorm2d(10)
        self.conv4 = nn.Conv2d(10, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        t = F.relu(self.stem(x))
        u = self.conv2(F.relu(self.conv1(t)))
        v = self.conv3(t)
        z = F.relu(self.bn(u + v)) * 0.5
        z = F.relu(self.conv4(z))
        return self.fc(torch.flatten(self.pool(z), 1))


class Catty(nn.Module):
    """Channel concatenation and a non-1x1 flatten: both must freeze their groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.d = nn.Conv2d(6, 2, 3, padding=1)
        self.e = nn.Conv2d(2, 3, 1)
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        y = F.relu(self.c(torch.cat([self.a(x), self.b(x)], 1)))
        y = self.e(F.relu(self.d(y)))
        return self.fc(torch.flatten(y, 1))


def branchy_net(seed=0):
    torch.manual_seed(seed)
    return build_network(Branchy().eval())


def rel_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def images(n=4, hw=8, seed=0):
    return torch.randn(n, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------

def test_groups_of_branch_model():
    net = branchy_net()
    groups = {g.name: g for g in R.find_groups(net, images(1))}
    free = {n for n, g in groups.items() if g.free}
    assert free == {"stem", "conv1", "conv2", "conv4"}
    assert groups["stem"].consumers == ["conv1", "conv3"]
    joint = groups["conv2"]                                   # spans the residual add
    assert joint.producers == ["conv2", "conv3"] and joint.consumers == ["conv4"]
    assert joint.channel_modules == ["bn"] and joint.size == 10
    assert groups["conv4"].consumers == ["fc"]                # flatten of N x 16 x 1 x 1
    assert groups["fc"].frozen == ["network output"]
    assert not groups["<x>"].free and groups["<x>"].frozen == ["network input"]
    text = R.describe_groups(net)
    assert "conv2, conv3 -> conv4" in text and "4 free group(s), 2 frozen" in text


def test_groups_freeze_cat_and_flatten_with_reasons():
    torch.manual_seed(0)
    net = build_network(Catty().eval())
    groups = {g.name: g for g in R.find_groups(net, images(1))}
    assert not groups["a"].free and not groups["b"].free
    assert any("cat()" in r for r in groups["a"].frozen)
    assert groups["c"].free                                    # c -> d is an ordinary pair
    assert not groups["e"].free
    assert any("flatten()" in r and "reshapes the channel axis" in r for r in groups["e"].frozen)
    ro = R.Reorderer(net, list(groups.values()))
    with pytest.raises(KeyError, match="not a free permutation group"):
        ro.set_orders({"a": [1, 0, 2, 3]})


def test_resnet20_streams_frozen_by_pad_blocks_free():
    net = build_network(build_model("resnet20"))
    groups = R.find_groups(net)
    free = [g for g in groups if g.free]
    assert [g.name for g in free] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert all(g.consumers == [g.name.replace("conv1", "conv2")] for g in free)
    streams = [g for g in groups if len(g.producers) > 1]
    assert len(streams) == 3 and all(any("pad()" in r for r in g.frozen) for g in streams)
    segs = R.find_segments(net, groups)
    assert [s.groups for s in segs] == [[g.name] for g in free]
    assert all(len(s.layers) == 2 for s in segs)


def test_segments_partition_free_groups_branch_and_resnet18():
    for net, ex in ((branchy_net(), images(1)),
                    (build_network(resnet18(num_classes=10, cifar_stem=True)), None)):
        groups = R.find_groups(net, ex)
        segs = R.find_segments(net, groups)
        names = [g for s in segs for g in s.groups]
        assert sorted(names) == sorted(g.name for g in groups if g.free)   # each exactly once
        for s in segs:
            touched = {l for g in groups if g.name in s.groups for l in g.layers}
            assert set(s.layers) == touched
    net = branchy_net()
    segs = R.find_segments(net, R.find_groups(net, images(1)))
    assert [s.groups for s in segs] == [["stem", "conv1"], ["conv2"], ["conv4"]]


# --------------------------------------------------------------------------------------------
# joint and independent permutations
# --------------------------------------------------------------------------------------------

def test_joint_orders_preserve_function_branch_model():
    net = branchy_net()
    x = images(6)
    with torch.no_grad():
        y0 = net(x)
    ro = R.Reorderer(net, R.find_groups(net, x[:1]))
    for seed in range(3):
        ro.set_orders(ro.random_orders(np.random.default_rng(seed)))
        assert any(not np.array_equal(p, np.arange(len(p))) for p in ro.orders.values())
        with torch.no_grad():
            assert rel_diff(net(x), y0) <= 1e-5


def test_joint_orders_preserve_function_resnet18_conv_shortcuts():
    net = build_network(resnet18(num_classes=10, cifar_stem=True))
    x = images(2, 16)
    with torch.no_grad():
        y0 = net(x)
    ro = R.Reorderer(net)
    assert len(ro.free) == 12                      # streams too: conv shortcuts, no pad
    ro.set_orders(ro.random_orders(np.random.default_rng(0)))
    with torch.no_grad():
        assert rel_diff(net(x), y0) <= 1e-5


def test_permutation_then_inverse_restores_exactly():
    net = branchy_net()
    ro = R.Reorderer(net, R.find_groups(net, images(1)))
    w0 = {l.name: (l.weight.clone(), None if l.bias is None else l.bias.clone()) for l in net.layers}
    bn0 = {k: v.clone() for k, v in net.gm.get_submodule("bn").state_dict().items()}
    rng = np.random.default_rng(3)
    p = ro.random_orders(rng)
    ro.set_orders(p)
    assert not torch.equal(net.layer("conv2").weight, w0["conv2"][0])
    # the inverse applied on top of the permuted network (a fresh Reorderer that takes the
    # permuted weights as its original): the original weights again, bit for bit
    ro2 = R.Reorderer(net, ro.groups)
    ro2.set_orders({n: np.argsort(q) for n, q in p.items()})
    for l in net.layers:
        assert torch.equal(l.weight, w0[l.name][0])
        assert (l.bias is None and w0[l.name][1] is None) or torch.equal(l.bias, w0[l.name][1])
    for k, v in net.gm.get_submodule("bn").state_dict().items():
        assert torch.equal(v, bn0[k])
    # and reset() of the first one restores them too
    ro.reset()
    assert all(torch.equal(l.weight, w0[l.name][0]) for l in net.layers)
    # conv consumers move whole kh*kw column groups (conv2: rows by its own group's order)
    ro.set_orders(p)
    W = net.layer("conv2").weight_matrix()
    W0 = w0["conv2"][0].reshape(10, -1).numpy()
    assert np.array_equal(W, W0[p["conv2"]][:, R.column_index(p["conv1"], 9)])
    assert np.array_equal(net.layer("fc").weight_matrix(),
                          w0["fc"][0].numpy()[:, p["conv4"]])          # linear: columns


def test_set_orders_drops_quantization_of_touched_layers_only():
    net = branchy_net()
    calibrate(net, images(8), Granularity.split(2, 2), 4, 8, method="max",
              float_layers=[], progress=False)
    ro = R.Reorderer(net, R.find_groups(net, images(1)))
    ro.set_orders({"conv1": np.random.default_rng(0).permutation(12)})
    assert {l.name for l in net.layers if l.quant is None} == {"conv1", "conv2"}


def test_check_order_rejects_non_permutations():
    with pytest.raises(ValueError, match="permutation of 0..3"):
        R.check_order([0, 1, 1, 2], 4)
    with pytest.raises(ValueError, match="permutation of 0..2"):
        R.check_order([0, 1], 3)


def test_independent_network_preserves_function_and_is_a_copy():
    net = branchy_net()
    x = images(5)
    with torch.no_grad():
        y0 = net(x)
    rng = np.random.default_rng(0)
    orders = R.random_independent_orders(net, [l.name for l in net.layers], rng)
    ind = R.independent_network(net, orders)
    assert all(a is ind.gm.get_submodule(a.name) for a in ind.layers)
    with torch.no_grad():
        assert rel_diff(ind(x), y0) <= 1e-5
        assert torch.equal(net(x), y0)              # the original is untouched


def test_independent_equals_joint_for_consistent_orders():
    """Joint order p of group conv1 == producer rows p, consumer input channels p."""
    x, cal = images(6, seed=1), images(16, seed=2)
    net = branchy_net()
    ro = R.Reorderer(net, R.find_groups(net, x[:1]))
    p = {"conv1": np.random.default_rng(5).permutation(12),
         "conv2": np.random.default_rng(6).permutation(10)}
    ind = R.independent_network(net, {"conv1": (p["conv1"], None),
                                       "conv2": (p["conv2"], p["conv1"]),
                                       "conv3": (p["conv2"], None),
                                       "conv4": (None, p["conv2"])})
    ro.set_orders(p)
    gran = Granularity.split(4, 2)
    outs = []
    for n in (net, ind):
        calibrate(n, cal, gran, 4, 8, method="ptqsl", progress=False,
                  params={"candidates": 20, "rounds": 1})
        n.set_mode("fake")
        with torch.no_grad():
            outs.append(n(x))
    for a, b in zip(net.quantized_layers, [ind.layer(l.name) for l in net.quantized_layers]):
        assert np.allclose(a.quant.w_scales, b.quant.w_scales, rtol=1e-6)
        assert a.quant.act_scale == pytest.approx(b.quant.act_scale, rel=1e-6)
    assert rel_diff(outs[1], outs[0]) <= 1e-5
    assert torch.equal(outs[0].argmax(1), outs[1].argmax(1))
    ind.set_mode("kernel")                          # the gather runs on the exact kernel too
    with torch.no_grad():
        assert rel_diff(ind(x), outs[1]) <= 1e-3


# --------------------------------------------------------------------------------------------
# scoring: Gram permutations against the samples
# --------------------------------------------------------------------------------------------

@PROP
@given(O=st.integers(2, 7), C=st.integers(1, 5), k=st.sampled_from([1, 3]),
       r=st.integers(1, 4), m=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_permute_stats_equals_stats_of_permuted_data(O, C, k, r, m, seed):
    torch.manual_seed(seed)
    layer = GemmLayer("l", nn.Conv2d(C, O, k, padding=k // 2))
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(2, C, 4, 4, generator=g))
    with torch.no_grad():
        y = layer.float_forward(x) + 0.1 * torch.randn(2, O, 4, 4, generator=g)
    rng = np.random.default_rng(seed)
    pr, pc = rng.permutation(O), rng.permutation(C)
    prob = LayerProblem(layer, x, y, 8)
    s = float(x.abs().max()) / 100
    st0 = prob.gram_stats(s)
    st1, b1 = R.permute_stats(st0, prob.bias, pr, R.column_index(pc, k * k))
    lp = GemmLayer("l", nn.Conv2d(C, O, k, padding=k // 2))
    lp.set_weight_matrix(layer.weight[pr][:, pc].reshape(O, -1).numpy())
    lp.bias = layer.bias[pr].clone()
    ref = LayerProblem(lp, x[:, pc], y[:, pr], 8).gram_stats(s)
    for key in ("H", "Gs", "u", "ys", "yy"):
        np.testing.assert_allclose(st1[key], ref[key], rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(b1, lp.bias.double().numpy())


def test_layer_scorer_equals_direct_scoring_on_permuted_data():
    """The evolutionary score of an order (Gram statistics permuted, Algorithm 1, error from
    the quadratic form) equals Algorithm 1 in direct mode on the permuted samples, with the
    error measured on those samples."""
    torch.manual_seed(0)
    layer = GemmLayer("l", nn.Conv2d(6, 8, 3, padding=1))
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(4, 6, 6, 6, generator=g))
    with torch.no_grad():
        y = layer.float_forward(x) + 0.05 * torch.randn(4, 8, 6, 6, generator=g)
    gran = Granularity.split(2, 3)
    params = {"candidates": 30, "rounds": 2}
    sc = R.LayerScorer(layer, x, y, gran, 4, 8, params)
    p = check_params(params)
    rng = np.random.default_rng(2)
    for _ in range(3):
        pr, pc = rng.permutation(8), rng.permutation(6)
        got = sc.error(pr, pc)
        lp = GemmLayer("l", nn.Conv2d(6, 8, 3, padding=1))
        lp.set_weight_matrix(layer.weight[pr][:, pc].reshape(8, -1).numpy())
        lp.bias = layer.bias[pr].clone()
        prob = LayerProblem(lp, x[:, pc], y[:, pr], 8)
        Xq, Y = prob.direct_data(sc.act_scale)
        W = lp.weight_matrix().astype(np.float64)
        grid = gran.resolve(8, 54)
        S, _ = algorithm1(W, grid, 4, candidate_factors(p), p["rounds"],
                          DirectEval(Xq, Y, prob.bias, "euclidean"), "euclidean")
        lo, hi = qrange(4)
        What = fake_quant(W, grid.expand(S), lo, hi)
        want = float(np.linalg.norm(Y - What @ Xq - prob.bias[:, None]))
        assert got == pytest.approx(want, rel=1e-9)
        assert R.ptqsl_weight_error(W, grid, 4, candidate_factors(p), p["rounds"],
                                    *R.permute_stats(sc.stats, sc.bias, pr,
                                                     R.column_index(pc, 9)))[1] == \
            pytest.approx(S, rel=0, abs=0)
    assert sc.error() == pytest.approx(sc.error(np.arange(8), np.arange(6)), rel=1e-12)


# --------------------------------------------------------------------------------------------
# the evolutionary search
# --------------------------------------------------------------------------------------------

def _search(seed, pop=4, gens=2):
    net = branchy_net()
    ro = R.Reorderer(net, R.find_groups(net, images(1)))
    res = R.evolve(net, images(12, seed=3), Granularity.split(2, 2), 3, 8,
                   params={"candidates": 15, "rounds": 1}, float_layers=[], population=pop,
                   generations=gens, swaps=2, seed=seed, progress=False, reorderer=ro)
    with torch.no_grad():
        out = net(images(4, seed=9))
    return res, out, net


def test_search_is_seeded_and_never_worse_than_identity():
    a, ya, net = _search(0)
    b, yb, _ = _search(0)
    c, _, _ = _search(1)
    assert a["orders"] == b["orders"] and torch.equal(ya, yb)
    assert a["orders"] != c["orders"]
    assert set(a["orders"]) == {"stem", "conv1", "conv2", "conv4"}
    assert all(l.quant is not None for l in net.layers)
    for s in a["segments"]:
        assert s["score"] >= s["identity_score"]
        assert s["history"] == sorted(s["history"])             # elitist: never decreases
        assert s["evaluations"] <= 4 + 2 * 2
    # the network holds the chosen orders, calibrated as a plain calibration would do
    net2 = branchy_net()
    R.Reorderer(net2, R.find_groups(net2, images(1))).set_orders(a["orders"])
    calibrate(net2, images(12, seed=3), Granularity.split(2, 2), 3, 8, method="ptqsl",
              float_layers=[], progress=False, params={"candidates": 15, "rounds": 1})
    for l in net.layers:
        np.testing.assert_array_equal(l.quant.w_scales, net2.layer(l.name).quant.w_scales)


def test_search_rejects_bad_parameters():
    net = branchy_net()
    with pytest.raises(ValueError, match="population must be an integer >= 2"):
        R.evolve(net, images(2), Granularity.channelwise(), 4, 8, population=1)
    with pytest.raises(ValueError, match="swaps"):
        R.evolve(net, images(2), Granularity.channelwise(), 4, 8, swaps=0)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

def test_config_reorder_defaults_and_errors():
    cfg = validate({})
    assert [cfg[f"reorder.{k}"] for k in ("method", "population", "generations", "swaps",
                                          "seed")] == ["none", 20, 30, 2, 0]
    cfg = validate({"reorder": {"method": "evolution", "population": 8}}, "c.yaml",
                   [("reorder.seed", 3)])
    assert (cfg["reorder.method"], cfg["reorder.population"], cfg["reorder.seed"]) == \
        ("evolution", 8, 3)
    for key, value, msg in (("method", "genetic", "must be one of none, random, evolution"),
                            ("population", 1, "must be in 2..10000"),
                            ("generations", -1, "must be in 0..100000"),
                            ("swaps", 0, "must be in 1..10000"),
                            ("seed", "x", "must be an integer"),
                            ("size", 3, "unknown key; allowed in reorder")):
        with pytest.raises(ConfigError) as e:
            validate({"reorder": {key: value}}, "c.yaml")
        assert str(e.value).startswith(f"c.yaml: reorder.{key}: ") and msg in str(e.value)


# --------------------------------------------------------------------------------------------
# real ResNet-20
# --------------------------------------------------------------------------------------------

def test_real_resnet20_joint_orders_preserve_function():
    from pimsim.data import load_cifar10, to_tensor
    data = data_dir_or_skip()
    net = build_network(build_model("resnet20", checkpoint=data / "models" / CHECKPOINT))
    x = to_tensor(load_cifar10("test", data, limit=32)[0])
    with torch.no_grad():
        y0 = net(x)
    ro = R.Reorderer(net)
    ro.set_orders(ro.random_orders(np.random.default_rng(0)))
    with torch.no_grad():
        y1 = net(x)
    assert rel_diff(y1, y0) <= 1e-5
    assert torch.equal(y1.argmax(1), y0.argmax(1))


def test_pimsim_run_evolution_writes_orders_and_runs_kernel_without_gather(tmp_path, capsys):
    import json

    from pimsim.cli import main
    from pimsim.config import load
    from pimsim.simulate import prepare, quantize_network, reorder_network
    data_dir_or_skip()
    yaml = tmp_path / "c.yaml"
    yaml.write_text("quant: {tile: [4, null], splits: 4, calib_images: 16, "
                    "search: {candidates: 10, rounds: 1}}\n"
                    "reorder: {method: evolution, population: 4, generations: 1, seed: 7}\n"
                    "eval: {threads: 1}\n")
    out = tmp_path / "r.json"
    with restored_threads():
        assert main(["run", str(yaml), "--limit", "40", "--out", str(out), "-q"]) == 0
    assert "reorder evolution: 9 free channel group(s)" in capsys.readouterr().out
    ro = json.loads(out.read_text())["reorder"]
    assert ro["method"] == "evolution" and len(ro["orders"]) == 9
    assert sorted(ro["orders"]["layer3.2.conv1"]) == list(range(64))
    assert all(any("pad()" in r for r in why) for g, why in ro["frozen_groups"].items()
               if g in ("conv1", "layer2.0.conv2", "layer3.0.conv2"))
    assert len(ro["segments"]) == 9 and ro["search_s"] > 0
    # the same search again through the library: the same orders, exactly
    prep = prepare(load(yaml))
    info = reorder_network(prep, progress=False)
    assert info["method"] == "evolution" and info["orders"] == ro["orders"]
    assert [s["score"] for s in info["segments"]] == [s["score"] for s in ro["segments"]]
    # (another seed, other orders: test_search_is_seeded_and_never_worse_than_identity)
    # random orders: the seed decides them (same seed, same orders; another seed, others)
    rnd = [reorder_network(prepare(load(yaml, ["reorder.method=random", f"reorder.seed={s}"])),
                           progress=False)["orders"] for s in (7, 7, 8)]
    assert rnd[0] == rnd[1] and all(rnd[0][g] != rnd[2][g] for g in rnd[0])
    # the chosen orders live in plain weights (no gather) and the exact kernel runs them: every
    # layer's kernel output equals its fake-quant output on the input it sees (layer by layer:
    # through 20 layers, float32 rounding of the fake path flips a few activation codes)
    quantize_network(prep, progress=False)
    assert not any(isinstance(m, R.ChannelGather) for m in prep.net.modules())
    seen = {}

    def keep(layer, inp):
        seen[layer.name] = inp
        return None
    prep.net.set_mode("fake")
    prep.net.run_with_hooks(images(4, 32), {l.name: keep for l in prep.net.quantized_layers})
    assert len(seen) == 18
    with torch.no_grad():
        for l in prep.net.quantized_layers:
            assert rel_diff(l.kernel_forward(seen[l.name]), l.fake_forward(seen[l.name])) <= 1e-5
