"""Wire resistance (IR drop) of a resistive crossbar: the exact nodal solve and the fast line
models used in runs.

Physical model
--------------
An ``R x C`` array. Input ``i`` drives word line ``i`` at voltage ``v_i`` from its row driver,
which sits at the column-0 end of the word line. Cell ``(i, j)`` is a linear conductance
``G_ij`` (a fraction of ``g_max``, so ``0 <= G_ij <= 1``) between word-line node ``(i, j)`` and
bit-line node ``(i, j)``. Bit line ``j`` is sensed at a virtual ground (the ADC side) at its
row ``R - 1`` end; the sensed current is the column current ``I_j``. Every wire segment has
resistance ``wire_r`` in units of ``1 / g_max`` (the cell's lowest resistance): the ``C - 1``
segments between adjacent cells of a word line plus one from the driver to cell ``(i, 0)``, and
the ``R - 1`` segments between adjacent cells of a bit line plus one from cell ``(R - 1, j)``
to the sense node. So a 1 x 1 array is the series ``wire_r + 1/G + wire_r`` and
``I = v G / (1 + 2 wire_r G)``. Drivers are ideal voltage sources (a row whose input is 0 is
held at 0 V, not left floating) and the sense node is an ideal virtual ground, so the network
is linear: ``I = v @ T`` for an ``R x C`` transfer matrix ``T(G, wire_r)`` that does not depend
on the input (``T = G`` at ``wire_r = 0``, ideal current ``I_j = sum_i v_i G_ij``). The cell
farthest from both ends, ``(0, C - 1)``, loses most. Currents are in units of
``g_max * (volt of v)``, the same units as ``v @ G``.

The exact solve (``solve_exact``, ``exact_conductance``)
--------------------------------------------------------
Kirchhoff's current law at the ``2 R C`` nodes (word-line and bit-line node of every cell),
multiplied by ``wire_r``: word line ``i``, ``(L_C + x D_i) W_i - x D_i B_i = v_i e_0`` with
``x = wire_r``, ``D_i = diag(G_i.)`` and ``L_C`` the ``C x C`` line Laplacian with the driver
end grounded (diagonal ``2, ..., 2, 1``, off-diagonals ``-1``); bit-line nodes of row ``i``,
``x D_i (B_i - W_i) + n_i B_i - B_{i-1} - B_{i+1} = 0`` (``n_i`` = number of segments at the
node: 1 in row 0, else 2; the sense node is ``B_R = 0``). Ordered row by row this is a block
tridiagonal system (blocks of ``2 C``, couplings only between bit-line nodes of adjacent rows).
It is solved directly by block Gaussian elimination from row 0 down, eliminating each row's
word-line nodes first: the bit-side Schur complements
``P_0 = x D_0 + n_0 I - x^2 D_0 M_0^{-1} D_0`` and
``P_i = x D_i + 2 I - x^2 D_i M_i^{-1} D_i - P_{i-1}^{-1}`` (``M_i = L_C + x D_i``), the
reduced right-hand sides ``u_i = P_{i-1}^{-1} u_{i-1} + v_i (G_i. * a_i)`` with
``a_i = M_i^{-1} e_0``, and the sensed currents ``I = B_{R-1} / x = P_{R-1}^{-1} u_{R-1}``
(scaled by ``x`` throughout, so no term blows up as ``wire_r -> 0``; only the forward sweep is
needed because only the last row's bit-line nodes are sensed). Cost ``O(R C^3)``, memory
``O(C^2)``: a 256 x 256 array (131,072 unknowns) takes seconds in float64 with NumPy's
LAPACK, no sparse solver needed (SciPy is not a pimsim dependency). This is the reference.

The fast models (``column_currents``, ``effective_conductance``)
-----------------------------------------------------------------
``decoupled``: each line is solved exactly on its own, with the other set of lines at 0 V:
``a_ij`` = word-line voltage at cell ``(i, j)`` when the driver applies 1 V and every bit-line
node is grounded (the tridiagonal system ``(L_C + x D_i) a_i = e_0``); ``k_ij`` = bit-line
voltage at cell ``(i, j)`` when the sense end is driven at 1 V and every word-line node is
grounded (the same system along the bit line, from its sense end). By reciprocity ``k_ij`` is
the fraction of a current injected at bit-line node ``(i, j)`` (through the cell) that reaches
the sense node, so the column current is ``I_j = sum_i v_i G_ij a_ij k_ij``, i.e.
``T ~= G * a * k``. It is exact to first order in ``wire_r`` (``a ~= 1 - x sum_j'
G_ij' (min(j, j') + 1)``, ``k ~= 1 - x sum_i' G_i'j (R - max(i, i'))``, the first-order
perturbation of both lines) and keeps each line's own non-linear saturation. ``a`` and ``k``
cost one vectorized Thomas sweep each (``O(R C)``). What it leaves out is the coupling of the
two sets of lines: current a raised bit line pushes back into the other word lines is treated as
lost to their drivers, but part of it flows on through their cells into other bit lines and is
sensed there. In the second-order expansion of ``T`` in ``wire_r`` this is the only term the
decoupled model misses.

``coupled`` (default) adds that term with every line's own response kept exact
(``cross_correction``): for an input on word line k the cell current ``J_kj = G_kj a_kj``
raises bit line j by its Green's function ``Zb_j = x (L_R + x D_j)^{-1}`` (other cells to
ground), cell (i, j) passes ``G_ij B_ij`` into word line i, which rises by its Green's function
``Zw_i``, and cell (i, j') passes ``G_ij' W_ij'`` into bit line j', of which ``k_ij'`` is sensed:
``T = G * a * k + dT``, ``dT_kj' = sum_i sum_j J_kj Zb_j[i, k] G_ij Zw_i[j', j] G_ij' k_ij'``,
computed by factorized line solves for all inputs k at once (``O(R^2 C)``). It is exact
through third order in ``wire_r`` (its error is ``O(wire_r^4)``; the decoupled model's
``O(wire_r^2)``; both tested). Both models satisfy the reciprocity symmetry of the exact network.

The column currents are then one BLAS product ``v @ T``, as for ideal cells; ``T`` depends only
on the programmed array, so it is built once per array. At ``wire_r = 0`` ``column_currents``
returns ``v @ G`` itself (bit for bit). The error of both models against the exact solve for
64, 128 and 256 arrays is measured by ``benchmarks/bench_irdrop.py`` (README, "Wire
resistance").

For comparison: CrossSim (Sandia) solves the line voltages per input vector by iterated,
under-relaxed updates until the voltage error is below a threshold; since the network is linear
pimsim instead builds ``T`` once per array and keeps runs at one matrix product per cycle.

Integer domain (the array backends): ``level_sums`` turns a cycle's integer column sums
``x @ levels`` into what the analog array delivers, in level units: conductances
``G = g_min + levels * (1 - g_min) / (2^cell_bits - 1)``, column currents ``x @ T``, minus the
``g_min`` offset current of the ideal array, rescaled back to levels. ``T`` depends only on the
programmed array, so a backend computes it once per array (``effective_conductance``, or
``exact_conductance``: about 0.25 s for a 128 x 128 array and 3 s for 256 x 256 on one core).
"""

from __future__ import annotations

import numpy as np

__all__ = ["METHODS", "attenuation", "column_currents", "cross_correction",
           "effective_conductance", "exact_conductance", "level_sums", "line_profile",
           "solve_exact"]


def _check(G, wire_r) -> tuple[np.ndarray, float]:
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] < 1 or G.shape[1] < 1:
        raise ValueError(f"irdrop: G must be a 2-D (rows, cols) array, got shape {G.shape}")
    x = float(wire_r)
    if not np.isfinite(x) or x < 0:
        raise ValueError(f"irdrop: wire_r must be a finite number >= 0, got {wire_r!r}")
    if not np.all(np.isfinite(G)) or np.any(G < 0):
        raise ValueError("irdrop: conductances G must be finite and >= 0")
    return G, x


def _inputs(v, R: int) -> tuple[np.ndarray, bool]:
    v = np.asarray(v)
    if v.ndim not in (1, 2) or v.shape[-1] != R:
        raise ValueError(f"irdrop: v must have shape ({R},) or (N, {R}) for an array of {R} "
                         f"rows, got {v.shape}")
    return v, v.ndim == 1


def line_profile(g, wire_r) -> np.ndarray:
    """Node voltages ``p`` (same shape as ``g``, ``(lines, n)``) of independent resistive lines:
    line ``l`` is driven at 1 V through one segment ``wire_r`` at its node-0 end, has ``n - 1``
    further segments between its nodes, and node ``m`` leaks to ground through ``g[l, m]``.
    Solves ``(L + wire_r diag(g_l)) p_l = e_0`` (``L``: diagonal ``2, ..., 2, 1``,
    off-diagonals ``-1``) by the Thomas algorithm vectorized over the lines."""
    g = np.asarray(g, dtype=np.float64)
    x = float(wire_r)
    lines, n = g.shape
    d = 2.0 + x * g
    d[:, -1] -= 1.0
    cp = np.empty_like(g)      # modified super-diagonal
    rp = np.empty_like(g)      # modified right-hand side
    cp[:, 0] = -1.0 / d[:, 0]
    rp[:, 0] = 1.0 / d[:, 0]
    for m in range(1, n):
        den = d[:, m] + cp[:, m - 1]
        cp[:, m] = -1.0 / den
        rp[:, m] = rp[:, m - 1] / den
    p = np.empty_like(g)
    p[:, -1] = rp[:, -1]
    for m in range(n - 2, -1, -1):
        p[:, m] = rp[:, m] - cp[:, m] * p[:, m + 1]
    return p


def attenuation(G, wire_r) -> np.ndarray:
    """``a * k`` (R, C) of the decoupled line model (``effective_conductance(G, x,
    "decoupled") = G * attenuation``). ``a``: word-line profiles (driver at column 0, bit
    lines grounded); ``k``: bit-line profiles (driven from the sense end at row R-1, word lines
    grounded)."""
    G, x = _check(G, wire_r)
    a = line_profile(G, x)
    k = line_profile(G.T[:, ::-1], x)[:, ::-1].T
    return a * k


def _factor(g, x: float):
    """Thomas factorization of the line matrices ``L + x diag(g_l)`` (``line_profile``), node
    axis first: ``(cp, den)`` each (n, lines)."""
    g = np.ascontiguousarray(np.asarray(g, dtype=np.float64).T)     # (n, lines)
    d = 2.0 + x * g
    d[-1] -= 1.0
    cp, den = np.empty_like(d), np.empty_like(d)
    den[0] = d[0]
    cp[0] = -1.0 / den[0]
    for m in range(1, d.shape[0]):
        den[m] = d[m] + cp[m - 1]
        cp[m] = -1.0 / den[m]
    return cp, den


def _solve(cp, den, rhs) -> np.ndarray:
    """``(L + x diag(g_l))^{-1} rhs`` for right-hand sides ``rhs`` (n, batch, lines), in place."""
    n = rhs.shape[0]
    rhs[0] /= den[0]
    for m in range(1, n):
        rhs[m] += rhs[m - 1]
        rhs[m] /= den[m]
    for m in range(n - 2, -1, -1):
        rhs[m] -= cp[m] * rhs[m + 1]
    return rhs


def cross_correction(G, wire_r, chunk_elems: int = 1 << 21) -> np.ndarray:
    """The coupling term ``dT`` (R, C) the decoupled model leaves out (module docstring,
    ``coupled``): for an input on word line k, the cell current ``J_kj = G_kj a_kj`` raises bit
    line j (its Green's function with every other cell to ground), the raised bit line pushes
    ``G_ij B_ij`` into word line i, which rises (its Green's function) and passes
    ``G_ij' W_ij'`` into bit line j', of which ``k_ij'`` reaches the sense node:
    ``dT_kj' = sum_i sum_j J_kj Zb_j[i, k] G_ij Zw_i[j', j] G_ij' k_ij'``. Computed by line
    solves (tridiagonal, factorized once) for chunks of inputs k: O(R^2 C) work."""
    G, x = _check(G, wire_r)
    R, C = G.shape
    dT = np.zeros((R, C))
    if x == 0.0:
        return dT
    a = line_profile(G, x)
    kf = line_profile(G.T[:, ::-1], x)[:, ::-1].T
    J = G * a
    out_w = G * kf                                      # (i, j') weight of word-line voltages
    cpb, denb = _factor(G[::-1].T, x)                   # bit lines, node 0 = sense end (row R-1)
    cpw, denw = _factor(G, x)                           # word lines, node 0 = driver (column 0)
    step = max(1, chunk_elems // (R * C))
    for k0 in range(0, R, step):
        ks = np.arange(k0, min(R, k0 + step))
        B = len(ks)
        rhs = np.zeros((R, B, C))                       # bit-line nodes (reversed rows)
        rhs[R - 1 - ks, np.arange(B), :] = x * J[ks]
        S = _solve(cpb, denb, rhs)[::-1]                # (i, b, j): bit voltage at row i
        inj = np.ascontiguousarray((S * G[:, None, :]).transpose(2, 1, 0)) * x   # (j, b, i)
        W = _solve(cpw, denw, inj)                      # (j', b, i): word voltage
        dT[ks] = np.einsum("jbi,ij->bj", W, out_w)
    return dT


METHODS = ("decoupled", "coupled", "exact")


def effective_conductance(G, wire_r, method: str = "coupled") -> np.ndarray:
    """The transfer matrix ``T`` (R, C) of the array (column currents ``v @ T``): ``coupled``
    (default) the line model with its coupling term (``G * attenuation + cross_correction``),
    ``decoupled`` the line model alone (``G * attenuation``), ``exact`` the nodal solve
    (``exact_conductance``). ``G`` itself (the same array values) at ``wire_r = 0``."""
    if method not in METHODS:
        raise ValueError(f"irdrop: method must be one of {', '.join(METHODS)}, got {method!r}")
    G, x = _check(G, wire_r)
    if x == 0.0:
        return G
    if method == "exact":
        return exact_conductance(G, x)
    T = G * attenuation(G, x)
    if method == "coupled":
        T += cross_correction(G, x)
    return T


def column_currents(v, G, wire_r, method: str = "coupled") -> np.ndarray:
    """Sensed column currents ``(N, C)`` (or ``(C,)`` for ``v`` of shape ``(R,)``) of inputs
    ``v`` (N, R) applied to the array ``G`` (R, C) with wire resistance ``wire_r`` (units of
    ``1/g_max``), by the line model (module docstring; ``method`` as for
    ``effective_conductance``): one BLAS product
    ``v @ effective_conductance(G, wire_r, method)``. ``wire_r = 0``: ``v @ G`` exactly."""
    G, x = _check(G, wire_r)
    v, _ = _inputs(v, G.shape[0])
    if x == 0.0:
        return v @ G
    return np.asarray(v, dtype=np.float64) @ effective_conductance(G, x, method)


def solve_exact(v, G, wire_r) -> np.ndarray:
    """Sensed column currents ``(N, C)`` (or ``(C,)``) of the full resistive network (module
    docstring: ``2 R C`` node voltages, Kirchhoff's laws, solved directly by block Gaussian
    elimination in float64) for inputs ``v`` (N, R) or (R,). ``wire_r = 0``: ``v @ G``."""
    G, x = _check(G, wire_r)
    R, C = G.shape
    v, single = _inputs(v, R)
    if x == 0.0:
        return v @ G
    V = np.atleast_2d(np.asarray(v, dtype=np.float64))
    a = line_profile(G, x)                        # (R, C): a_i = M_i^{-1} e_0
    src = G * a                                   # u_i += v_i * src_i
    lap = 2.0 * np.eye(C) - np.eye(C, k=1) - np.eye(C, k=-1)
    lap[-1, -1] = 1.0
    eye = np.eye(C)
    u = None
    Pinv = None
    for i in range(R):
        D = G[i]
        Minv = np.linalg.inv(lap + x * np.diag(D))
        P = (x * np.diag(D) + (1.0 if i == 0 else 2.0) * eye
             - (x * x) * (D[:, None] * Minv * D[None, :]))
        if i > 0:
            P -= Pinv
        ui = V[:, i:i + 1] * src[i][None, :]
        u = ui if u is None else ui + u @ Pinv     # Pinv symmetric: (Pinv u^T)^T = u Pinv
        P = 0.5 * (P + P.T)
        Pinv = np.linalg.inv(P)
        Pinv = 0.5 * (Pinv + Pinv.T)
    out = u @ Pinv
    return out[0] if single else out


def exact_conductance(G, wire_r) -> np.ndarray:
    """The exact transfer matrix ``T`` (R, C) of the network: ``solve_exact(I_R, G, wire_r)``."""
    G, x = _check(G, wire_r)
    return solve_exact(np.eye(G.shape[0]), G, x)


def level_sums(x, levels, cell_bits: int, g_min: float, wire_r,
               method: str = "coupled") -> np.ndarray:
    """The array backends' integer column sums ``x @ levels`` as the analog array delivers
    them with wire resistance, in level units (float64): cell conductances
    ``G = g_min + levels * (1 - g_min) / (2^cell_bits - 1)`` (fractions of ``g_max``), column
    currents ``x @ T`` (``method``, default the coupled line model), minus the ``g_min`` offset
    current the ideal array would carry, ``g_min * sum_i x_i``, rescaled to levels. Equals
    ``x @ levels`` itself when ``wire_r = 0`` and ``g_min = 0``. ``x``: (N, R) non-negative
    input cycle values (DAC codes, a linear DAC: the word-line voltage is proportional to the
    code); ``levels``: (R, C) integers of the WHOLE
    physical array, every column it holds (all weight slices, both columns of a differential
    pair, the reference columns) and unused cells at level 0, because every cell on a line
    loads that line; read only the columns you need from the result. ``T`` depends only on
    ``levels``: a backend computing many cycles on one array should build
    ``effective_conductance`` (or ``exact_conductance``) once and reuse it."""
    levels = np.asarray(levels)
    if not 0.0 <= float(g_min) < 1.0:
        raise ValueError(f"irdrop: g_min must be in [0, 1), got {g_min!r}")
    if float(wire_r) == 0.0 and float(g_min) == 0.0:
        return np.asarray(x) @ levels
    top = 2 ** int(cell_bits) - 1
    span = (1.0 - float(g_min)) / top
    G = float(g_min) + levels.astype(np.float64) * span
    I = column_currents(np.asarray(x, dtype=np.float64), G, wire_r, method)
    offset = float(g_min) * np.asarray(x, dtype=np.float64).sum(axis=-1, keepdims=True)
    return (I - offset) / span
