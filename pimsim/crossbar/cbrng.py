"""Counter-based standard normals for the analog model's read noise.

``normal(k0, k1, pos)`` is a function of a 128-bit key and a 64-bit position only, so a draw is
addressed, not consumed: the read noise of every column sum is computed where it is added
(no buffer of normals, no generator state), in any order and on any thread, with the same value.

Uniform bits: the SplitMix64 output function (Steele, Lea & Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014; the finalizer is Stafford's "Mix13") applied to
``k0 + (pos + 1) * gamma`` -- the SplitMix64 sequence of seed ``k0`` read at index ``pos``,
which passes BigCrush. The rare extra uniforms of the rejection steps come from a second
SplitMix64 sequence seeded by ``mix(k1 ^ mix(k0 + pos * gamma'))``, unbounded.

Normals: the ziggurat of Marsaglia & Tsang ("The ziggurat method for generating random
variables", J. Stat. Softw. 5(8), 2000) with 128 layers, its tables computed here. The layer
index and the 32-bit signed value come from disjoint bits of one 64-bit output (bits 0-6 and
32-63), which avoids the index/value correlation Doornik (2005) found in the original (which
took both from one 32-bit word). Exact: the result has the standard normal distribution (up
to the 2^-31 resolution of the fast path), tails included.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uint64

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_GAMMA2 = np.uint64(0xD1B54A32D192ED03)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_R = 3.442619855899          # start of the tail (128 layers)
_V = 9.91256303526217e-3     # area of each layer


def _tables():
    """kn, wn, fn of the 128-layer ziggurat (Marsaglia & Tsang 2000, ``zigset``)."""
    m1 = 2147483648.0
    kn = np.zeros(128, np.float64)
    wn = np.zeros(128, np.float64)
    fn = np.zeros(128, np.float64)
    dn = tn = _R
    q = _V / math.exp(-0.5 * dn * dn)
    kn[0] = (dn / q) * m1
    kn[1] = 0.0
    wn[0] = q / m1
    wn[127] = dn / m1
    fn[0] = 1.0
    fn[127] = math.exp(-0.5 * dn * dn)
    for i in range(126, 0, -1):
        dn = math.sqrt(-2.0 * math.log(_V / dn + math.exp(-0.5 * dn * dn)))
        kn[i + 1] = (dn / tn) * m1
        tn = dn
        fn[i] = math.exp(-0.5 * dn * dn)
        wn[i] = dn / m1
    return kn, wn, fn


KN, WN, FN = _tables()


@njit(cache=True)
def mix64(z):
    """The SplitMix64 output function of a uint64."""
    z = (z ^ (z >> uint64(30))) * _M1
    z = (z ^ (z >> uint64(27))) * _M2
    return z ^ (z >> uint64(31))


@njit(cache=True)
def _uniform(state):
    """(uniform in (0, 1), next state) of the SplitMix64 sequence at ``state``."""
    state = state + _GAMMA
    u = np.float64(mix64(state) >> uint64(11))
    return (u + 0.5) * (1.0 / 9007199254740992.0), state


@njit(cache=True)
def _slow(k0, k1, pos, hz, iz, kn, wn, fn):
    """The ziggurat's rejection steps (wedges and tail), on the second sequence."""
    state = mix64(k1 ^ mix64(k0 + pos * _GAMMA2))
    while True:
        x = hz * wn[iz]
        if iz == 0:                                    # the tail beyond R
            while True:
                u1, state = _uniform(state)
                u2, state = _uniform(state)
                x = -math.log(u1) / _R
                y = -math.log(u2)
                if y + y >= x * x:
                    break
            return _R + x if hz > 0 else -_R - x
        u, state = _uniform(state)
        if fn[iz] + u * (fn[iz - 1] - fn[iz]) < math.exp(-0.5 * x * x):
            return x
        state = state + _GAMMA
        b = mix64(state)
        iz = np.int64(b & uint64(127))
        hz = np.int64(b >> uint64(32)) - 2147483648
        if abs(hz) < kn[iz]:
            return hz * wn[iz]


# The fast path (98.8 % of draws), mix64 included, is written out in the kernel below and the
# tables are arguments: a call into another cached Numba function is not inlined, and the
# kernel ran 5-25x slower that way.

def normals(k0, k1, pos0, out):
    """``out[i]`` = the standard normal at position ``pos0 + i`` of stream (k0, k1): the draws
    ``add_read_noise`` adds (the same kernel, on one row with amplitude 1)."""
    v = np.zeros((1, out.shape[0]))
    add_read_noise(v, np.ones(1, np.bool_), np.ones(1), np.array([k0], np.uint64),
                   np.array([k1], np.uint64), np.array([pos0], np.int64), np.zeros(1, np.int64),
                   KN, WN, FN)
    out[:] = v[0]


@njit(cache=True)
def add_read_noise(v, act, amp, K0, K1, cursor, owner, kn, wn, fn):
    """Read noise of one cycle: every driven row n (``act[n]``) of ``v`` (rows x W) takes the
    next W normals of its image's stream (key ``K0[k], K1[k]``, ``k = owner[n]``, from
    position ``cursor[k]``, which advances by W): ``v[n, :] += amp[n] * z``; ``kn, wn, fn``:
    ``KN, WN, FN``."""
    W = v.shape[1]
    for n in range(v.shape[0]):
        if act[n]:
            k = owner[n]
            k0, k1 = K0[k], K1[k]
            pos0 = uint64(cursor[k])
            a = amp[n]
            for j in range(W):
                pos = pos0 + uint64(j)
                b = k0 + (pos + uint64(1)) * _GAMMA           # mix64, written out
                b = (b ^ (b >> uint64(30))) * _M1
                b = (b ^ (b >> uint64(27))) * _M2
                b = b ^ (b >> uint64(31))
                iz = np.int64(b & uint64(127))
                hz = np.int64(b >> uint64(32)) - 2147483648
                if abs(hz) < kn[iz]:
                    z = hz * wn[iz]
                else:
                    z = _slow(k0, k1, pos, hz, iz, kn, wn, fn)
                v[n, j] += a * z
            cursor[k] = cursor[k] + W


def stream_key(entropy) -> np.ndarray:
    """The (k0, k1) uint64 key of a stream, from a ``SeedSequence`` of ``entropy``."""
    return np.random.SeedSequence(entropy).generate_state(2, np.uint64)
