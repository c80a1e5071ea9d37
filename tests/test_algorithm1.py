"""Algorithm 1 and the PTQ-SL per-layer pipeline against brute force on layers small enough to
enumerate every combination of candidate scales (``ptqsl_reference``: plain numpy, written from
the paper, objective Eq. 6 evaluated on all the calibration samples).

- With one column block and the Euclidean metric (layerwise, channelwise, r x K tiles) the
  row blocks touch disjoint output rows, so the coordinate descent is exact: Algorithm 1 must
  reach the optimum over ALL combinations of per-tile scales (init or candidate per tile).
  With a single tile (layerwise) that holds for the cosine metric too.
- With several column blocks the greedy search is not exact: Algorithm 1 must then give what
  the paper's procedure gives (tile by tile, the best candidate with the others fixed, round
  after round), never be worse than its max init, and never beat the brute-force optimum.
- The whole pipeline (activation search, Algorithm 1, activation search again, fallback to
  max) against the same steps done by brute force, and against the joint optimum over all
  weight-scale combinations x all activation candidates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import ptqsl_reference as ref
from pimsim import ptqsl
from pimsim.network import GemmLayer
from pimsim.quant import Granularity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACTORS = np.linspace(0.5, 1.2, 6)          # 1.0 is not a candidate: the init is a choice of its own
MARGIN = 1e-7                                # data must not be near a tie (float32 vs float64 sums)


def tiny(kind: str, seed: int, O: int = 3, noise: float = 0.2):
    """A tiny layer, its input and a target (float output plus noise: upstream error)."""
    torch.manual_seed(seed)
    mod = nn.Linear(6, O) if kind == "linear" else nn.Conv2d(2, O, 2, padding=1)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn((24, 6) if kind == "linear" else (2, 2, 4, 4), generator=g)
    with torch.no_grad():
        y = mod(x)
    t = y + noise * y.std() * torch.randn(y.shape, generator=g)
    return GemmLayer("l", mod), ref.Layer(mod, x, t), x, t


def run_algorithm1(layer, x, t, grid, s, w_bits, a_bits, rounds, metric, mode, symmetric):
    prob = ptqsl.LayerProblem(layer, x, t, a_bits, symmetric)
    if mode == "gram":
        ev = ptqsl.GramEval(prob.gram_stats(s), prob.bias, metric)
    else:
        ev = ptqsl.DirectEval(*prob.direct_data(s), prob.bias, metric)
    return ptqsl.algorithm1(layer.weight_matrix().astype(np.float64), grid, w_bits, FACTORS,
                            rounds, ev, metric, prob.t2, symmetric)


def objective(L, S, grid, w_bits, Xq, metric, symmetric):
    return L.objective(ref.dequant_tiles(L.W, S, grid.r, grid.c, w_bits, symmetric), Xq, metric)


CASES_EXACT = [  # (kind, granularity, metric): one column block -> the greedy search is exact
    ("linear", Granularity.channelwise(), "euclidean"),
    ("linear", Granularity.tile(2, 6), "euclidean"),
    ("conv", Granularity.channelwise(), "euclidean"),
    ("conv", Granularity.layerwise(), "euclidean"),
    ("conv", Granularity.layerwise(), "cosine"),
    ("linear", Granularity.layerwise(), "cosine"),
]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("mode", ["gram", "direct"])
@pytest.mark.parametrize("kind,gran,metric", CASES_EXACT, ids=lambda v: str(v))
def test_algorithm1_reaches_the_brute_force_optimum_where_exact(kind, gran, metric, mode,
                                                                symmetric):
    moved = 0
    for seed in range(3):
        layer, L, x, t = tiny(kind, seed, O=4 if gran.kind == "channelwise" else 3)
        grid = gran.resolve(layer.O, layer.K)
        assert grid.n_col_blocks == 1
        w_bits, a_bits = 3, 6
        s = 0.8 * L.absmax / (2 ** (a_bits - 1) - 1)
        Xq = L.xq(s, a_bits, symmetric)
        S_bf, e_bf, margin = ref.all_combinations(L, Xq, grid.r, grid.c, w_bits, FACTORS, metric,
                                                  symmetric)
        assert margin > MARGIN, f"seed {seed}: brute-force optimum not unique ({margin:.2g})"
        e_init = objective(L, ref.max_init(L.W, grid.r, grid.c, w_bits), grid, w_bits, Xq, metric,
                           symmetric)
        for rounds in (1, 3):
            S, info = run_algorithm1(layer, x, t, grid, s, w_bits, a_bits, rounds, metric, mode,
                                     symmetric)
            e = objective(L, S, grid, w_bits, Xq, metric, symmetric)
            assert e <= e_init
            assert e == pytest.approx(e_bf, rel=1e-9, abs=1e-12), (seed, rounds)
            np.testing.assert_allclose(S, S_bf, rtol=1e-14, err_msg=f"seed {seed}")
        # one round reaches the optimum, a second one (if the first moved) confirms it
        assert info["changes"][-1] == 0 and info["rounds"] == (2 if info["changes"][0] else 1)
        moved += e_bf < e_init
    assert moved                          # the optimum is not the init on every layer


CASES_GREEDY = [  # several column blocks: the paper's tile-by-tile coordinate descent
    ("linear", Granularity.tile(2, 3), "euclidean"),
    ("linear", Granularity.tile(2, 3), "cosine"),
    ("conv", Granularity.split(2, 2), "euclidean"),
    ("conv", Granularity.tile(3, 3), "cosine"),
]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("mode", ["gram", "direct"])
@pytest.mark.parametrize("kind,gran,metric", CASES_GREEDY, ids=lambda v: str(v))
def test_algorithm1_is_the_coordinate_descent(kind, gran, metric, mode, symmetric):
    greedy_gap = []
    for seed in range(2):
        layer, L, x, t = tiny(kind, seed)
        grid = gran.resolve(layer.O, layer.K)
        assert grid.n_col_blocks > 1 and grid.n_tiles <= 6
        w_bits, a_bits = 3, 6
        s = 0.8 * L.absmax / (2 ** (a_bits - 1) - 1)
        Xq = L.xq(s, a_bits, symmetric)
        e_init = objective(L, ref.max_init(L.W, grid.r, grid.c, w_bits), grid, w_bits, Xq, metric,
                           symmetric)
        _, e_bf, _ = ref.all_combinations(L, Xq, grid.r, grid.c, w_bits, FACTORS, metric,
                                          symmetric)
        for rounds in (1, 2, 5):
            S_ref, margin, changes = ref.coordinate_descent(L, Xq, grid.r, grid.c, w_bits, FACTORS,
                                                            rounds, metric, symmetric)
            assert margin > MARGIN, f"seed {seed}: a near tie in the reference ({margin:.2g})"
            S, info = run_algorithm1(layer, x, t, grid, s, w_bits, a_bits, rounds, metric, mode,
                                     symmetric)
            np.testing.assert_allclose(S, S_ref, rtol=1e-14, err_msg=f"seed {seed}, {rounds} rounds")
            assert info["changes"] == changes
            e = objective(L, S, grid, w_bits, Xq, metric, symmetric)
            assert e <= e_init
            assert e >= e_bf * (1 - 1e-12)
        assert changes[0] > 0
        greedy_gap.append(float(e / e_bf - 1))
    print(f"greedy / brute-force optimum - 1: {greedy_gap}")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("kind,gran", [("linear", Granularity.channelwise()),
                                       ("conv", Granularity.layerwise()),
                                       ("conv", Granularity.split(3, 2))], ids=str)
def test_ptqsl_pipeline_brute_force(kind, gran, symmetric):
    """ptqsl_method (every activation candidate tried) = the paper's steps 1-3 done by brute
    force (+ the fallback); never better than the joint optimum over all weight-scale
    combinations x all activation candidates, never worse than max calibration."""
    n_act = 12                                   # 1.0 not on the grid: s_max stays distinct
    params = {"alpha": 0.5, "beta": 1.2, "candidates": n_act, "rounds": 3, "act_search": "grid",
              "symmetric": symmetric}
    factors = np.linspace(0.5, 1.2, n_act)
    w_bits, a_bits = 3, 4
    for seed in range(2):
        layer, L, x, t = tiny(kind, seed, O=2 if gran.kind == "channelwise" else 3)
        grid = gran.resolve(layer.O, layer.K)
        want = ref.pipeline(L, grid.r, grid.c, w_bits, a_bits, factors, 3, symmetric)
        assert want["margin"] > MARGIN, f"seed {seed}: a near tie in the reference"
        for mode in ("gram", "direct"):
            q = ptqsl.ptqsl_method(layer, x, t, gran, w_bits, a_bits, {**params, "mode": mode})
            assert q.act_scale == pytest.approx(want["s_x"], rel=1e-14), (seed, mode)
            np.testing.assert_allclose(q.w_scales, want["S"], rtol=1e-14)
            assert q.info["err"] == pytest.approx(want["err"], rel=1e-5)
            assert q.info["err_max"] == pytest.approx(want["err_max"], rel=1e-5)
        assert want["err"] <= want["err_max"]
        # all combinations of (per-tile weight scale: init or candidate) x (activation scale:
        # s_max or candidate): the alternating search is not exact there, but its result is one
        # of these points, so it can never beat their optimum
        s_max = L.absmax / (2 ** (a_bits - 1) - 1)
        joint = min(ref.all_combinations(L, L.xq(float(sx), a_bits, symmetric), grid.r, grid.c,
                                         w_bits, factors, symmetric=symmetric)[1]
                    for sx in [s_max, *(factors * s_max)])
        got = L.objective(ref.dequant_tiles(L.W, q.w_scales, grid.r, grid.c, w_bits, symmetric),
                          L.xq(q.act_scale, a_bits, symmetric))
        assert got == pytest.approx(want["err"], rel=1e-12)
        assert got >= joint * (1 - 1e-12)
        print(f"{kind} {gran} seed {seed}: PTQ-SL / joint optimum - 1 = {got / joint - 1:.3g}")


@pytest.mark.parametrize("kind,gran", [("linear", Granularity.channelwise()),
                                       ("conv", Granularity.split(3, 2))], ids=str)
def test_ptqsl_start_max_and_best_brute_force(kind, gran):
    """``start="max"`` = the reference pipeline without step 1 (Algorithm 1 at the max
    activation scale, then the activation search); ``start="best"`` = whichever of the two
    reference pipelines has the lower Eq. 6 error. The data must make the two starts differ
    somewhere, or the test could not tell them apart."""
    n_act = 12
    params = {"alpha": 0.5, "beta": 1.2, "candidates": n_act, "rounds": 3, "act_search": "grid"}
    factors = np.linspace(0.5, 1.2, n_act)
    w_bits, a_bits = 3, 3
    differ, picks = 0, set()
    for seed in range(6):
        layer, L, x, t = tiny(kind, seed, O=2 if gran.kind == "channelwise" else 3)
        grid = gran.resolve(layer.O, layer.K)
        want = {st: ref.pipeline(L, grid.r, grid.c, w_bits, a_bits, factors, 3, start=st)
                for st in ("act", "max")}
        assert min(w["margin"] for w in want.values()) > MARGIN, f"seed {seed}: a near tie"
        q = ptqsl.ptqsl_method(layer, x, t, gran, w_bits, a_bits, {**params, "start": "max"})
        assert q.act_scale == pytest.approx(want["max"]["s_x"], rel=1e-14), seed
        np.testing.assert_allclose(q.w_scales, want["max"]["S"], rtol=1e-14)
        assert q.info["err"] == pytest.approx(want["max"]["err"], rel=1e-5)
        b = ptqsl.ptqsl_method(layer, x, t, gran, w_bits, a_bits, {**params, "start": "best"})
        pick = "max" if want["max"]["err"] < want["act"]["err"] else "act"
        assert b.info["start_chosen"] == pick, seed
        np.testing.assert_allclose(b.w_scales, want[pick]["S"], rtol=1e-14)
        assert b.info["err"] == pytest.approx(min(w["err"] for w in want.values()), rel=1e-5)
        differ += not np.array_equal(want["act"]["S"], want["max"]["S"])
        picks.add(pick)
    assert differ > 0
    if kind == "conv":
        assert picks == {"act", "max"}          # "best" took each start at least once
