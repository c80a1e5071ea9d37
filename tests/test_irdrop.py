"""IR drop (pimsim.crossbar.irdrop): the exact nodal solve against hand-solved circuits and an
independent dense modified-nodal assembly, its limits and symmetry, and the fast decoupled
line model against the exact solve."""

from __future__ import annotations

import numpy as np
import pytest

from pimsim.crossbar import irdrop
from pimsim.crossbar.irdrop import (column_currents, cross_correction, effective_conductance,
                                    exact_conductance, level_sums, line_profile, solve_exact)


def series(*conductances):
    """Conductance of conductances in series."""
    return 1.0 / sum(1.0 / g for g in conductances)


def dense_reference(v, G, x):
    """Independent reference: stamp every resistor of the R x C array (module docstring) into
    the full 2RC x 2RC nodal matrix and solve it densely (small arrays only)."""
    R, C = G.shape
    n = 2 * R * C
    w = lambda i, j: i * C + j                # noqa: E731  word-line node of cell (i, j)
    b = lambda i, j: R * C + i * C + j        # noqa: E731  bit-line node of cell (i, j)
    A = np.zeros((n, n))
    rhs = np.zeros((len(v), n))

    def edge(p, q, g):
        A[p, p] += g
        A[q, q] += g
        A[p, q] -= g
        A[q, p] -= g

    for i in range(R):
        A[w(i, 0), w(i, 0)] += 1 / x          # driver segment, driver at v_i
        rhs[:, w(i, 0)] += v[:, i] / x
        for j in range(C - 1):
            edge(w(i, j), w(i, j + 1), 1 / x)
        for j in range(C):
            edge(w(i, j), b(i, j), G[i, j])
    for j in range(C):
        for i in range(R - 1):
            edge(b(i, j), b(i + 1, j), 1 / x)
        A[b(R - 1, j), b(R - 1, j)] += 1 / x  # sense segment to the virtual ground
    sol = np.linalg.solve(A, rhs.T).T
    return np.stack([sol[:, b(R - 1, j)] / x for j in range(C)], axis=1)


# ---------------------------------------------------------------- hand-solved circuits
@pytest.mark.parametrize("x", [1e-3, 0.2, 1.5])
def test_1x1_closed_form(x):
    # driver -x- cell G -x- sense: I = v / (x + 1/G + x)
    G, v = 0.7, 0.9
    assert solve_exact(np.array([v]), np.array([[G]]), x)[0] == pytest.approx(v * G / (1 + 2 * x * G), rel=1e-13)


@pytest.mark.parametrize("x", [1e-3, 0.3])
def test_1x2_closed_form(x):
    # one word line: driver -x- n1 -x- n2; each cell k in series with its bit segment:
    # h_k = series(G_k, 1/x). Beyond n1 the load is series(1/x, h2). V(n1) = v / (1 + x Y),
    # Y = h1 + series(1/x, h2); I1 = h1 V(n1), I2 = series(1/x, h2) V(n1).
    G1, G2, v = 0.8, 0.35, 1.0
    h1, h2 = series(G1, 1 / x), series(G2, 1 / x)
    g2 = series(1 / x, h2)
    vn1 = v / (1 + x * (h1 + g2))
    got = solve_exact(np.array([v]), np.array([[G1, G2]]), x)
    np.testing.assert_allclose(got, [h1 * vn1, g2 * vn1], rtol=1e-12)


@pytest.mark.parametrize("x", [1e-3, 0.3])
def test_2x1_closed_form(x):
    # two word lines, one bit line b0 -x- b1 -x- sense. Row branch h_i = series(1/x, G_i).
    # KCL at b0: h0 (v0 - b0) = (b0 - b1)/x, so the current b0 -> b1 is h0' (v0 - b1) with
    # h0' = series(h0, 1/x); KCL at b1: h0'(v0 - b1) + h1 (v1 - b1) = b1 / x, so
    # I = b1 / x = (h0' v0 + h1 v1) / (1 + x (h0' + h1)).
    G = np.array([[0.6], [0.9]])
    v = np.array([[0.7, 1.0], [1.0, 0.0], [0.0, 1.0]])
    h0, h1 = series(1 / x, 0.6), series(1 / x, 0.9)
    h0p = series(h0, 1 / x)
    want = (h0p * v[:, 0] + h1 * v[:, 1]) / (1 + x * (h0p + h1))
    np.testing.assert_allclose(solve_exact(v, G, x)[:, 0], want, rtol=1e-12)


def test_2x2_hand_written_kirchhoff():
    # The eight node equations of a 2 x 2 array written out by hand (w_ij word-line node,
    # b_ij bit-line node, g = 1/x, drivers at column 0, sense below row 1).
    x = 0.05
    g = 1 / x
    G = np.array([[0.9, 0.4], [0.2, 1.0]])
    v0, v1 = 1.0, 0.6
    (a, bb), (c, d) = G
    #        w00        w01     w10        w11     b00        b01        b10        b11
    A = np.array([
        [2 * g + a, -g, 0, 0, -a, 0, 0, 0],                 # w00: driver, w01, cell a
        [-g, g + bb, 0, 0, 0, -bb, 0, 0],                   # w01: w00, cell bb
        [0, 0, 2 * g + c, -g, 0, 0, -c, 0],                 # w10: driver, w11, cell c
        [0, 0, -g, g + d, 0, 0, 0, -d],                     # w11: w10, cell d
        [-a, 0, 0, 0, g + a, 0, -g, 0],                     # b00: cell a, b10
        [0, -bb, 0, 0, 0, g + bb, 0, -g],                   # b01: cell bb, b11
        [0, 0, -c, 0, -g, 0, 2 * g + c, 0],                 # b10: cell c, b00, sense
        [0, 0, 0, -d, 0, -g, 0, 2 * g + d],                 # b11: cell d, b01, sense
    ])
    rhs = np.array([g * v0, 0, g * v1, 0, 0, 0, 0, 0])
    nodes = np.linalg.solve(A, rhs)
    want = np.array([nodes[6], nodes[7]]) * g
    np.testing.assert_allclose(solve_exact(np.array([v0, v1]), G, x), want, rtol=1e-12)


def test_2x2_diagonal_closed_form():
    # Only cells (0,0) and (1,1) conduct: each current path is one cell and three segments
    # (cell (0,0): driver segment + two bit segments; cell (1,1): two word segments + sense).
    x, g = 0.1, 0.8
    G = np.array([[g, 0.0], [0.0, g]])
    got = solve_exact(np.array([1.0, 0.5]), G, x)
    np.testing.assert_allclose(got, [g / (1 + 3 * x * g), 0.5 * g / (1 + 3 * x * g)], rtol=1e-12)


@pytest.mark.parametrize("shape", [(3, 3), (4, 2), (2, 5)])
@pytest.mark.parametrize("x", [1e-4, 0.05, 2.0])
def test_exact_matches_dense_nodal_reference(shape, x):
    rng = np.random.default_rng(sum(shape))
    G = rng.uniform(0, 1, shape)
    v = rng.uniform(0, 1, (5, shape[0]))
    np.testing.assert_allclose(solve_exact(v, G, x), dense_reference(v, G, x),
                               rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- limits and symmetry
def test_zero_wire_resistance_is_the_ideal_product_bit_for_bit():
    rng = np.random.default_rng(0)
    G = rng.uniform(0, 1, (17, 9))
    v = rng.integers(0, 2, (6, 17)).astype(np.float64)
    ideal = v @ G
    assert np.array_equal(column_currents(v, G, 0.0), ideal)
    assert np.array_equal(column_currents(v, G, 0.0, method="decoupled"), ideal)
    assert np.array_equal(solve_exact(v, G, 0.0), ideal)
    # and the solve is continuous there (the recursion is scaled by wire_r)
    np.testing.assert_allclose(solve_exact(v, G, 1e-12), ideal, rtol=1e-9)


def test_zero_conductance_gives_zero_current():
    v = np.ones((3, 4))
    assert np.array_equal(solve_exact(v, np.zeros((4, 5)), 0.1), np.zeros((3, 5)))
    assert np.array_equal(column_currents(v, np.zeros((4, 5)), 0.1), np.zeros((3, 5)))


def _decoupled(G, x):
    return effective_conductance(G, x, "decoupled")


@pytest.mark.parametrize("fn", [exact_conductance, effective_conductance, _decoupled])
def test_reciprocity_symmetry(fn):
    # Swapping the roles of word and bit lines (drivers <-> sense ends) is the array
    # G' = G[::-1, ::-1].T; by reciprocity T(G') = T(G)[::-1, ::-1].T.
    rng = np.random.default_rng(3)
    G = rng.uniform(0, 1, (6, 4))
    x = 0.03
    np.testing.assert_allclose(fn(G[::-1, ::-1].T, x), fn(G, x)[::-1, ::-1].T, rtol=1e-10)


def test_wire_resistance_lowers_every_column_current():
    rng = np.random.default_rng(4)
    G = rng.uniform(0.1, 1, (8, 8))
    v = rng.integers(0, 2, (10, 8)).astype(np.float64)
    v[0] = 1
    ideal = v @ G
    lo, hi = solve_exact(v, G, 1e-2), solve_exact(v, G, 1e-3)
    assert np.all(lo[0] < hi[0]) and np.all(hi[0] < ideal[0])


def test_single_vector_and_batch_agree():
    rng = np.random.default_rng(5)
    G = rng.uniform(0, 1, (5, 3))
    v = rng.uniform(0, 1, (4, 5))
    batch = solve_exact(v, G, 0.02)
    for n in range(4):
        np.testing.assert_allclose(solve_exact(v[n], G, 0.02), batch[n], rtol=1e-13)
    np.testing.assert_allclose(exact_conductance(G, 0.02), solve_exact(np.eye(5), G, 0.02))
    np.testing.assert_allclose(v @ exact_conductance(G, 0.02), batch, rtol=1e-12)


# ---------------------------------------------------------------- the fast model
def test_line_profile_against_dense_tridiagonal_solve():
    rng = np.random.default_rng(6)
    g = rng.uniform(0, 1, (3, 7))
    x = 0.08
    got = line_profile(g, x)
    for l in range(3):
        # KCL, times x: node 0 has the driver segment (1 V) and node 1; the last node one segment
        M = 2 * np.eye(7) - np.eye(7, k=1) - np.eye(7, k=-1) + x * np.diag(g[l])
        M[-1, -1] -= 1
        np.testing.assert_allclose(got[l], np.linalg.solve(M, np.eye(7)[0]), rtol=1e-13)


def test_fast_models_orders_of_accuracy():
    # The IR drop (ideal - exact) is first order in wire_r: halving wire_r halves it. The
    # decoupled model is exact to first order (its error quarters), the coupled model through
    # third order (its error drops 16-fold).
    rng = np.random.default_rng(7)
    G = rng.uniform(0, 1, (12, 10))
    e1, e2 = exact_conductance(G, 1e-4), exact_conductance(G, 5e-5)
    assert np.abs(G - e1).max() / np.abs(G - e2).max() == pytest.approx(2.0, rel=0.05)
    for method, ratio in (("decoupled", 4.0), ("coupled", 16.0)):
        d1 = np.abs(effective_conductance(G, 1e-4, method) - e1).max()
        d2 = np.abs(effective_conductance(G, 5e-5, method) - e2).max()
        assert d1 / d2 == pytest.approx(ratio, rel=0.05), method


def _green(g, x):
    """Dense Green's functions x (L + x diag g_l)^-1 of lines (lines, n), node 0 driven."""
    n = g.shape[1]
    lap = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    lap[-1, -1] = 1
    return np.stack([x * np.linalg.inv(lap + x * np.diag(row)) for row in g])


def test_cross_correction_against_dense_greens_functions():
    # dT_kj' = sum_i sum_j J_kj Zb_j[i, k] G_ij Zw_i[j', j] G_ij' k_ij' with dense inverses
    rng = np.random.default_rng(10)
    R, C, x = 7, 5, 0.02
    G = rng.uniform(0, 1, (R, C))
    a = line_profile(G, x)
    kf = line_profile(G.T[:, ::-1], x)[:, ::-1].T
    Zw = _green(G, x)                                    # (i, j', j)
    Zb = _green(G.T[:, ::-1], x)[:, ::-1, ::-1]          # (j, i, k) in array row order
    want = np.zeros((R, C))
    for k in range(R):
        for jp in range(C):
            want[k, jp] = sum(G[k, j] * a[k, j] * Zb[j, i, k] * G[i, j] * Zw[i, jp, j]
                              * G[i, jp] * kf[i, jp] for i in range(R) for j in range(C))
    np.testing.assert_allclose(cross_correction(G, x), want, rtol=1e-12)
    # chunked over the inputs k the same
    np.testing.assert_allclose(cross_correction(G, x, chunk_elems=1), want, rtol=1e-12)
    assert np.array_equal(cross_correction(G, 0.0), np.zeros((R, C)))


def test_fast_models_error_small_against_the_drop():
    rng = np.random.default_rng(8)
    G = rng.choice([0.01, 0.34, 0.67, 1.0], (32, 32))
    v = rng.integers(0, 2, (20, 32)).astype(np.float64)
    x = 1e-4
    exact = solve_exact(v, G, x)
    drop = np.abs(v @ G - exact).max()
    dec = np.abs(column_currents(v, G, x, method="decoupled") - exact).max()
    cpl = np.abs(column_currents(v, G, x) - exact).max()
    assert 0 < dec < 0.05 * drop
    assert 0 < cpl < 0.01 * dec
    np.testing.assert_allclose(column_currents(v, G, x, method="exact"), exact, rtol=1e-12)


def test_level_sums():
    rng = np.random.default_rng(9)
    levels = rng.integers(0, 4, (16, 6))
    x = rng.integers(0, 2, (5, 16))
    assert np.array_equal(level_sums(x, levels, 2, 0.0, 0.0), x @ levels)
    # g_min > 0 with no wire resistance: the offset current is removed exactly (up to rounding)
    np.testing.assert_allclose(level_sums(x, levels, 2, 0.01, 0.0), x @ levels, rtol=1e-12, atol=1e-12)
    # with wire resistance: the exact T in conductance units, converted by hand
    Gc = 0.01 + levels * (0.99 / 3)
    T = exact_conductance(Gc, 1e-3)
    want = (x @ T - 0.01 * x.sum(1, keepdims=True)) / (0.99 / 3)
    np.testing.assert_allclose(level_sums(x, levels, 2, 0.01, 1e-3, method="exact"), want, rtol=1e-12)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, match", [
    (lambda: column_currents(np.ones(3), np.ones((3, 2)), -1e-3), "wire_r must be a finite number >= 0"),
    (lambda: solve_exact(np.ones(3), np.ones((3, 2)), float("nan")), "wire_r must be a finite number >= 0"),
    (lambda: column_currents(np.ones(4), np.ones((3, 2)), 1e-3), r"v must have shape \(3,\) or \(N, 3\)"),
    (lambda: solve_exact(np.ones(3), np.ones(3), 1e-3), "G must be a 2-D"),
    (lambda: column_currents(np.ones(3), -np.ones((3, 2)), 1e-3), "finite and >= 0"),
    (lambda: effective_conductance(np.ones((3, 2)), 1e-3, method="spice"), "method must be one of decoupled, coupled, exact"),
    (lambda: level_sums(np.ones((1, 3)), np.ones((3, 2)), 2, 1.0, 0.0), r"g_min must be in \[0, 1\)"),
])
def test_bad_input_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value) and str(e.value).startswith("irdrop:")


def test_module_exports():
    assert set(irdrop.__all__) >= {"column_currents", "solve_exact", "effective_conductance"}
