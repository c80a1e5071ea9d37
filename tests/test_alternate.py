"""``quant.search.alternate``: PTQ-SL with the weight and activation searches alternated.
References: the paper's pipeline written out step by step from the module's own building
blocks (alternate = 1 must equal it bit for bit), and a fixed-point check (neither search,
run again from the result, can improve it)."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from pimsim import ptqsl
from pimsim.quant import Granularity, act_max_scale, max_scales
from test_ptqsl import make_problem

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P = {"candidates": 25, "rounds": 3, "act_search": "grid"}


def paper_pipeline(layer, x, t, gran, wb, ab, params):
    """Steps 1-3 of the paper, written out (no alternation)."""
    p = ptqsl.check_params(params)
    grid = gran.resolve(layer.O, layer.K, layer.groups)
    prob = ptqsl.LayerProblem(layer, x, t, ab)
    W32 = layer.weight_matrix()
    W = W32.astype(np.float64)
    f = ptqsl.candidate_factors(p)
    s_max = float(act_max_scale(prob.x_absmax, ab, False))
    s1, _, _ = ptqsl.search_act_scale(prob, W32, f * s_max, s_max, "euclidean", p["act_search"])
    ev = ptqsl.GramEval(prob.gram_stats(s1), prob.bias, "euclidean")
    S, _ = ptqsl.algorithm1(W, grid, wb, f, p["rounds"], ev, "euclidean", prob.t2)
    s3, e3, _ = ptqsl.search_act_scale(prob, ptqsl._dequant(W, grid, S, wb), f * s_max, s1,
                                       "euclidean", p["act_search"])
    return S, s3, e3, prob, W, grid, f, s_max


CASES = [("conv", 8, 6, Granularity.tile(4, 18), 3), ("conv", 12, 4, Granularity.split(4, 2), 4),
         ("linear", 10, 24, Granularity.tile(5, 8), 3)]


@pytest.mark.parametrize("kind,O,C,gran,wb", CASES)
def test_alternate_1_is_the_paper_pipeline(kind, O, C, gran, wb):
    layer, x, t = make_problem(kind, O, C, seed=O)
    q = ptqsl.ptqsl_method(layer, x, t, gran, wb, 8, {**P, "alternate": 1})
    S, s3, e3, *_ = paper_pipeline(layer, x, t, gran, wb, 8, P)
    assert not q.info["fallback"]
    np.testing.assert_array_equal(q.w_scales, S)
    assert q.act_scale == s3 and q.info["err"] == e3 and q.info["alternations"] == 1


@pytest.mark.parametrize("kind,O,C,gran,wb,seed,noise", [c + (c[1] + 1, 0.2) for c in CASES]
                         + [("linear", 10, 24, Granularity.tile(5, 8), 3, 0, 0.5)])
def test_alternation_never_worse_and_ends_at_a_fixed_point(kind, O, C, gran, wb, seed, noise):
    layer, x, t = make_problem(kind, O, C, seed=seed, noise=noise)
    q1 = ptqsl.ptqsl_method(layer, x, t, gran, wb, 8, {**P, "alternate": 1})
    q = ptqsl.ptqsl_method(layer, x, t, gran, wb, 8, {**P, "alternate": 50})
    errs = q.info["err_per_alternation"]
    assert errs[0] == q1.info["err"]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:]))     # non-increasing
    assert q.info["err"] <= q1.info["err"] * (1 + 1e-9)
    assert q.info["alternations"] < 50                                   # it converged
    if seed == 0:                         # a case where the second alternation improves
        assert errs[-1] < errs[0] * (1 - 1e-3) and q.info["alternations"] >= 3
    # fixed point: Algorithm 1 from the result (statistics at its activation scale) and the
    # activation search from the result change nothing
    _, _, _, prob, W, grid, f, s_max = paper_pipeline(layer, x, t, gran, wb, 8, P)
    ev = ptqsl.GramEval(prob.gram_stats(q.act_scale), prob.bias, "euclidean")
    S2, info = ptqsl.algorithm1(W, grid, wb, f, 3, ev, "euclidean", prob.t2, S_init=q.w_scales)
    np.testing.assert_array_equal(S2, q.w_scales)
    assert info["changes"] == [0]
    s2, _, _ = ptqsl.search_act_scale(prob, ptqsl._dequant(W, grid, q.w_scales, wb),
                                      f * s_max, q.act_scale, "euclidean", "grid")
    assert s2 == q.act_scale


def test_algorithm1_from_max_init_equals_default_start():
    layer, x, t = make_problem("conv", 8, 6, seed=3)
    _, _, _, prob, W, grid, f, _ = paper_pipeline(layer, x, t, Granularity.tile(4, 18), 3, 8, P)
    ev = ptqsl.GramEval(prob.gram_stats(0.05), prob.bias, "euclidean")
    a, _ = ptqsl.algorithm1(W, grid, 3, f, 3, ev, "euclidean", prob.t2)
    b, _ = ptqsl.algorithm1(W, grid, 3, f, 3, ev, "euclidean", prob.t2,
                            S_init=max_scales(W, grid, 3))
    np.testing.assert_array_equal(a, b)


def test_alternation_gram_and_direct_agree():
    layer, x, t = make_problem("conv", 6, 4, seed=11, noise=0.2)
    gran = Granularity.tile(3, 12)
    g = ptqsl.ptqsl_method(layer, x, t, gran, 3, 8, {**P, "alternate": 4, "mode": "gram"})
    d = ptqsl.ptqsl_method(layer, x, t, gran, 3, 8, {**P, "alternate": 4, "mode": "direct"})
    np.testing.assert_array_equal(g.w_scales, d.w_scales)
    assert g.act_scale == d.act_scale


def test_bad_alternate_in_yaml_is_one_line():
    from pimsim.config import ConfigError, validate
    for v in (0, 1001, 2.5, "3"):
        with pytest.raises(ConfigError) as e:
            validate({"quant": {"search": {"alternate": v}}}, "c.yaml")
        assert str(e.value).startswith("c.yaml: quant.search: ")
        assert "alternate must be an integer in 1..1000" in str(e.value)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# quant.search.extend: a refinement pass on candidates extended below alpha
# --------------------------------------------------------------------------------------------

def test_extended_factors_keep_the_grid_and_its_spacing():
    p = ptqsl.check_params({"candidates": 15, "alpha": 0.5, "beta": 1.2, "extend": 0.1})
    f, e = ptqsl.candidate_factors(p), ptqsl.extended_factors(p)
    np.testing.assert_array_equal(e[-len(f):], f)                      # the old grid, bit for bit
    step = (1.2 - 0.5) / 14
    np.testing.assert_allclose(np.diff(e)[1:], step, rtol=1e-9)       # same spacing below alpha
    assert e[0] == pytest.approx(0.1) and 0 < e[1] - e[0] <= step * (1 + 1e-9)
    assert len(ptqsl.extended_factors(ptqsl.check_params({}))) == 100   # extend null: the grid


@pytest.mark.parametrize("value", [0.5, 0.6, 0.0, -0.1, float("nan"), "0.1", True])
def test_extend_must_lie_below_alpha(value):
    with pytest.raises(ValueError, match="extend"):
        ptqsl.check_params({"alpha": 0.5, "extend": value})


@pytest.mark.parametrize("kind,O,C,gran,wb", CASES)
def test_extend_is_never_worse_and_starts_from_the_pipeline(kind, O, C, gran, wb):
    for seed in range(3):
        layer, x, t = make_problem(kind, O, C, seed=seed, noise=0.2)
        q1 = ptqsl.ptqsl_method(layer, x, t, gran, wb, 8, P)
        qe = ptqsl.ptqsl_method(layer, x, t, gran, wb, 8, {**P, "extend": 0.1})
        assert qe.info["err_per_alternation"][0] == q1.info["err"]    # the pipeline, then more
        assert qe.info["err"] <= q1.info["err"] * (1 + 1e-9)
        assert len(qe.info["err_per_alternation"]) == 2


def test_extend_reaches_below_alpha_where_clipping_pays():
    """One outlier per row: the best scale clips it, far below 0.5 x the max init. The refined
    scales go below alpha, the error drops, and the result is what the paper's building blocks
    give from the pipeline's scales on the extended candidates (an independent composition)."""
    layer, x, _ = make_problem("linear", 6, 24, B=40, seed=5, noise=0.0)
    w = layer.weight_matrix().copy()
    w[:, 0] = 8 * np.abs(w).max()                      # an outlier column whose input is 0
    layer.set_weight_matrix(w)
    x = x.clone()
    x[:, 0] = 0.0
    with torch.no_grad():
        t = layer.float_forward(x)
    gran = Granularity.channelwise()
    q1 = ptqsl.ptqsl_method(layer, x, t, gran, 3, 8, P)
    qe = ptqsl.ptqsl_method(layer, x, t, gran, 3, 8, {**P, "extend": 0.05})
    grid = gran.resolve(layer.O, layer.K, layer.groups)
    W = layer.weight_matrix().astype(np.float64)
    S0 = max_scales(W, grid, 3)
    assert (q1.w_scales / S0).min() >= 0.5 - 1e-12
    assert (qe.w_scales / S0).min() < 0.5 and qe.info["err"] < 0.5 * q1.info["err"]
    p = ptqsl.check_params({**P, "extend": 0.05})
    prob = ptqsl.LayerProblem(layer, x, t, 8)
    ev = ptqsl.GramEval(prob.gram_stats(q1.act_scale), prob.bias, "euclidean")
    S, _ = ptqsl.algorithm1(W, grid, 3, ptqsl.extended_factors(p), 3, ev, "euclidean", prob.t2,
                            S_init=q1.w_scales)
    np.testing.assert_array_equal(qe.w_scales, S)
