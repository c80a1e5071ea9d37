"""The counter-based read-noise normals (pimsim.crossbar.cbrng) against the standard normal
distribution itself (math.erf), and the fused noise kernel against the addressed draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pimsim.crossbar.cbrng import FN, KN, WN, add_read_noise, normals, stream_key

N = 2_000_000


@pytest.fixture(scope="module")
def z():
    k0, k1 = stream_key([7, 1, 2])
    out = np.empty(N)
    normals(k0, k1, 0, out)
    return out


def test_cdf_matches_the_standard_normal(z):
    """Kolmogorov-Smirnov distance to Phi below the 0.1 % critical value 1.95 / sqrt(n)."""
    s = np.sort(z)
    phi = 0.5 * (1.0 + np.vectorize(math.erf)(s[::50] / math.sqrt(2.0)))   # 40,000 points
    emp = (np.arange(0, N, 50) + 1) / N
    assert np.abs(emp - phi).max() < 1.95 / math.sqrt(N)


@pytest.mark.parametrize("a", [1.0, 2.0, 3.0, 3.442619855899, 4.0])
def test_tails_within_binomial_bounds(z, a):
    """P(|z| > a) for a around the ziggurat's tail start R = 3.4426 (where a broken tail or
    wedge step shows) within 5 binomial sd of erfc(a / sqrt 2)."""
    p = math.erfc(a / math.sqrt(2.0))
    k = int((np.abs(z) > a).sum())
    assert abs(k - N * p) < 5 * math.sqrt(N * p * (1 - p)) + 1, (k, N * p)


def test_moments_and_neighbour_independence(z):
    assert abs(z.mean()) < 5 / math.sqrt(N)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / N)
    assert abs((z ** 3).mean()) < 5 * math.sqrt(15 / N)
    for lag in (1, 2, 128):                      # 128: the ziggurat's layer count
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 5 / math.sqrt(N)
    # signs and layers of neighbours independent: sign agreement 1/2
    same = (np.sign(z[:-1]) == np.sign(z[1:])).mean()
    assert abs(same - 0.5) < 5 * 0.5 / math.sqrt(N)


def test_addressed_not_consumed_and_keys_differ():
    k0, k1 = stream_key([7, 1, 2])
    a = np.empty(1000)
    normals(k0, k1, 0, a)
    b = np.empty(300)
    normals(k0, k1, 500, b)                      # positions 500..799, drawn alone
    np.testing.assert_array_equal(a[500:800], b)
    o0, o1 = stream_key([7, 1, 3])
    c = np.empty(1000)
    normals(o0, o1, 0, c)
    assert abs(np.corrcoef(a, c)[0, 1]) < 0.15 and not np.array_equal(a, c)


def test_fused_kernel_adds_the_draws_at_each_images_cursor():
    """Rows of two images, some not driven: row n gets amp[n] * the next W normals of its
    image's stream; undriven rows get nothing and do not advance the cursor."""
    W = 37
    keys = np.array([stream_key([1, i]) for i in range(2)], dtype=np.uint64)
    K0, K1 = keys[:, 0].copy(), keys[:, 1].copy()
    owner = np.array([0, 0, 1, 1, 1, 0])
    act = np.array([True, False, True, True, False, True])
    amp = np.array([0.5, 9.0, 2.0, 1.5, 9.0, 3.0])
    v = np.ones((6, W))
    cursor = np.array([10, 0], dtype=np.int64)
    add_read_noise(v, act, amp, K0, K1, cursor, owner, KN, WN, FN)
    want = np.ones((6, W))
    pos = {0: 10, 1: 0}
    for n in range(6):
        if act[n]:
            zz = np.empty(W)
            normals(K0[owner[n]], K1[owner[n]], pos[owner[n]], zz)
            want[n] += amp[n] * zz
            pos[owner[n]] += W
    np.testing.assert_array_equal(v, want)
    assert list(cursor) == [pos[0], pos[1]]
