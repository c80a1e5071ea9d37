"""The ``cluster`` channel orders (pimsim.reorder.cluster): the proxy against a tile-by-tile
reference, the swap deltas against recomputation, local optimality of the descent, and the
search as ``evolve`` is held to (never worse than the identity on its score, the network left
calibrated exactly as a fresh calibration at the chosen orders)."""

from __future__ import annotations

import numpy as np
import pytest

from pimsim import reorder as R
from pimsim.calibrate import calibrate
from pimsim.config import ConfigError, validate
from pimsim.quant import Granularity
from test_reorder import branchy_net, images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeScorer:
    """What ``layer_blocks`` reads of a LayerScorer: W, H, grid, kk."""

    def __init__(self, W, H, grid, kk):
        self.W, self.stats, self.grid, self.kk = W, {"H": H}, grid, kk


def tile_energy(W, h, grid) -> float:
    """Reference: sum over the grid's tiles of (max |W| in the tile)^2 * sum of H_kk over its
    elements, one tile at a time."""
    e = 0.0
    for _, _, rs, cs in grid.tiles():
        t = np.abs(W[rs, cs])
        e += t.max() ** 2 * (np.broadcast_to(h[cs], t.shape)).sum()
    return e


def random_layer(rng, O, C, kk, r, c):
    W = rng.standard_normal((O, C * kk)) * rng.uniform(0.1, 3, (O, 1))
    X = rng.standard_normal((C * kk, 50)) * rng.uniform(0.2, 2, (C * kk, 1))
    return W, X @ X.T, Granularity.tile(r, c).resolve(O, C * kk)


@pytest.mark.parametrize("O,C,kk,r,c", [(12, 6, 3, 4, 6), (10, 8, 1, 3, 3), (9, 4, 9, 2, 18)])
def test_proxy_equals_tile_reference_for_rows_and_columns(O, C, kk, r, c):
    rng = np.random.default_rng(O + C)
    W, H, grid = random_layer(rng, O, C, kk, r, c)
    h = np.diag(H)
    s = FakeScorer(W, H, grid, kk)
    rows, ch = rng.permutation(O), rng.permutation(C)
    cols = (ch[:, None] * kk + np.arange(kk)).reshape(-1)
    # rows permuted by the group, input channels by another order
    cb = R.layer_blocks(s, "rows", cols=ch)
    assert cb.energy(rows) == pytest.approx(tile_energy(W[rows][:, cols], h[cols], grid),
                                            rel=1e-12)
    # input channels permuted by the group, rows by another order
    cb = R.layer_blocks(s, "cols", rows=rows)
    if c % kk:
        assert cb is None
    else:
        assert cb.energy(ch) == pytest.approx(tile_energy(W[rows][:, cols], h[cols], grid),
                                              rel=1e-12)


def test_swap_deltas_match_recomputation():
    rng = np.random.default_rng(3)
    for n, F, size in ((10, 3, 4), (16, 5, 4), (7, 2, 3), (9, 4, 1), (5, 2, 5)):
        cb = R.ChannelBlocks(rng.random((n, F)), rng.random((n, F)), size)
        o = rng.permutation(n)
        D, E = cb.swap_deltas(o), cb.energy(o)
        for p in range(n):
            for q in range(n):
                o2 = o.copy()
                o2[p], o2[q] = o2[q], o2[p]
                assert D[p, q] == pytest.approx(cb.energy(o2) - E, abs=1e-12)


def _segment_scorer():
    """A SegmentScorer-like object over a producer and a consumer of one group of 8."""
    rng = np.random.default_rng(5)
    Wp, Hp, gp = random_layer(rng, 8, 6, 3, 2, 6)           # rows: the group
    Wc, Hc, gc = random_layer(rng, 5, 8, 3, 5, 6)           # input channels: the group

    class SC:
        scorers = [FakeScorer(Wp, Hp, gp, 3), FakeScorer(Wc, Hc, gc, 3)]
        out = {}
        inp = {}
        base = {"g": np.arange(8)}

        def relative(self, orders, group):
            return None if group is None else orders.get(group)
    sc = SC()
    sc.scorers[0].name, sc.scorers[1].name = "p", "c"
    sc.out, sc.inp = {"p": "g", "c": None}, {"p": None, "c": "g"}
    return sc


def test_descent_ends_where_no_swap_helps():
    sc = _segment_scorer()
    px = R.ProxyScorer(sc, "g", {"g": np.arange(8)})
    assert len(px.parts) == 2
    start = np.random.default_rng(0).permutation(8)
    order, v = px.descend(start, 1000)
    assert sorted(order) == list(range(8))
    assert v == pytest.approx(px.value(order), rel=1e-12)
    assert v < px.value(start)
    for p in range(8):                    # brute force: no single swap lowers the proxy
        for q in range(p + 1, 8):
            o2 = order.copy()
            o2[p], o2[q] = o2[q], o2[p]
            assert px.value(o2) >= v * (1 - 1e-9)


PARAMS = {"candidates": 15, "rounds": 1}


@pytest.mark.parametrize("score", ["gram", "output"])
def test_cluster_never_worse_than_identity_and_leaves_a_fresh_calibration(score):
    net = branchy_net()
    ro = R.Reorderer(net, R.find_groups(net, images(1)))
    x = images(12, seed=3)
    res = R.cluster(net, x, Granularity.split(2, 2), 3, 8, params=PARAMS, float_layers=[],
                    seed=0, progress=False, reorderer=ro, score=score)
    assert res["method"] == "cluster" and res["score"] == score
    assert set(res["orders"]) == {"stem", "conv1", "conv2", "conv4"}
    assert any(res["orders"][g] != list(range(len(res["orders"][g]))) for g in res["orders"])
    for s in res["segments"]:
        assert s["score"] >= s["identity_score"]
    # seeded: the same call again gives the same orders
    net_b = branchy_net()
    res_b = R.cluster(net_b, x, Granularity.split(2, 2), 3, 8, params=PARAMS, float_layers=[],
                      seed=0, progress=False, score=score,
                      reorderer=R.Reorderer(net_b, R.find_groups(net_b, images(1))))
    assert res_b["orders"] == res["orders"]
    # the network holds the orders, calibrated exactly as a plain calibration at them
    net2 = branchy_net()
    R.Reorderer(net2, R.find_groups(net2, images(1))).set_orders(res["orders"])
    calibrate(net2, x, Granularity.split(2, 2), 3, 8, method="ptqsl", float_layers=[],
              progress=False, params=PARAMS)
    for l in net.layers:
        q2 = net2.layer(l.name).quant
        np.testing.assert_array_equal(l.quant.w_scales, q2.w_scales)
        assert l.quant.act_scale == q2.act_scale


def test_cluster_rejects_bad_parameters_and_config():
    net = branchy_net()
    with pytest.raises(ValueError, match="restarts must be an integer >= 0"):
        R.cluster(net, images(2), Granularity.channelwise(), 4, 8, restarts=-1)
    with pytest.raises(ValueError, match="score must be one of gram, output"):
        R.cluster(net, images(2), Granularity.channelwise(), 4, 8, score="mse")
    cfg = validate({"reorder": {"method": "cluster", "restarts": 2, "score": "output"}})
    assert (cfg["reorder.method"], cfg["reorder.restarts"], cfg["reorder.score"]) == \
        ("cluster", 2, "output")
    for key, value, msg in (("restarts", -1, "must be in 0..1000"),
                            ("score", "mse", "must be one of gram, output")):
        with pytest.raises(ConfigError) as e:
            validate({"reorder": {key: value}}, "c.yaml")
        assert str(e.value).startswith(f"c.yaml: reorder.{key}: ") and msg in str(e.value)
