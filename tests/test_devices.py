"""Real devices on the crossbar (issue 15 items 1, 2, 5, 6): the ``crossbar.device`` schema,
the analog array model ``pimsim.crossbar.noisy``, per-slice ADC ranges and drift compensation.

Every statistical test compares the simulated column sums / conductances with the analytic
value of the model (hand-derived below), within a sampling interval wide enough (>= 4.5 sd)
that a correct implementation fails with negligible probability, and narrow enough to catch a
wrong factor (e.g. sigma in level steps vs fractions of g_max, variance per cell vs per sum).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from pimsim.config import ConfigError, validate
from pimsim.crossbar import Crossbar, CrossbarGemm
from pimsim.crossbar.device import Device, load_model
from pimsim.crossbar.noisy import NoisyCrossbarGemm
from pimsim.kernels import TiledGemm, partial_sums_reference
from pimsim.quant import Granularity, TileGrid

from test_crossbar import PROP, array_problems


def dev(**kw) -> dict:
    """A full crossbar.device mapping: defaults plus ``kw``."""
    return {**Device().to_dict(), **kw}


# --------------------------------------------------------------------------- zero noise

@settings(PROP, max_examples=40)
@given(p=array_problems(adc=True))
def test_ideal_cells_equal_the_crossbar_backend_bit_for_bit(p):
    """Every device key at its default (and g_min > 0 or another seed, still ideal cells): the
    analog model gives CrossbarGemm's outputs and clip counts exactly (signed inputs, and
    unsigned ones, ``a_unsigned``, when the input is non-negative)."""
    seed = int(p["rng"].integers(0, 1000))
    uns = bool((p["x"] >= 0).all() and p["rng"].random() < 0.5)
    for device in (dev(), dev(g_min=0.3, seed=seed)):
        xb = dataclasses.replace(p["xb"], device=device)
        a = CrossbarGemm(p["wq"], p["grid"], p["scales"], xb, p["wb"], p["ab"], shortcut=False,
                         a_unsigned=uns)
        b = NoisyCrossbarGemm(p["wq"], p["grid"], p["scales"], xb, p["wb"], p["ab"],
                              a_unsigned=uns)
        if xb.adc_range == "calibrated":
            r = p["rng"].integers(1, 3 * xb.rows + 2, size=a.n_arrays)
            a.set_ranges(r)
            b.set_ranges(r)
        ya = a(p["x"], p["sx"], bias=p["bias"])
        yb = b(p["x"], p["sx"], bias=p["bias"])
        np.testing.assert_array_equal(ya.view(np.uint32), yb.view(np.uint32))
        assert (a.clipped, a.conversions) == (b.clipped, b.conversions)


def test_backend_uses_the_analog_model_only_when_needed():
    ideal = Crossbar()
    assert not ideal.analog and ideal.dev.ideal
    assert Crossbar(device=dev(programming_noise=0.01)).analog
    assert Crossbar(device=dev(model="rram")).analog
    assert Crossbar(compensation="tile").analog
    assert Crossbar(adc_bits=6, adc_range="calibrated_slice").analog
    assert not Crossbar(device=dev(g_min=0.5, seed=3, t_inference=100.0)).analog   # no drift


# --------------------------------------------------------------------------- statistics

def _column_op(device, O=200, rows=64, signed="differential", a_bits=2):
    """One segment of ``rows`` word lines, O outputs, every weight +2 (3-bit weights, 2-bit
    cells: positive column level 2, negative column level 0), 2-bit inputs (one cycle; a_bits
    3: two cycles of 1 bit)."""
    xb = Crossbar(rows=rows, cols=4 * O, cell_bits=2, signed=signed, device=device)
    grid = TileGrid(O, rows, O, rows)
    wq = np.full((O, rows), 2)
    return NoisyCrossbarGemm(wq, grid, np.ones(grid.shape), xb, 3, a_bits)


def _check_mean_var(samples, mean, var, k=4.5):
    n = samples.size
    assert abs(samples.mean() - mean) < k * math.sqrt(var / n), (samples.mean(), mean)
    # sample variance of normal data: sd of s^2 is var * sqrt(2 / (n - 1))
    assert abs(samples.var(ddof=1) - var) < k * var * math.sqrt(2 / (n - 1)), \
        (samples.var(ddof=1), var)


def test_programming_noise_column_sum_mean_and_variance():
    """P = sum_i (G+_i - G-_i) with G = level + sigma / delta * z: mean 2 * rows, variance
    2 * rows * (sigma / delta)^2 (delta = (1 - g_min) / 3); g_min keeps the level-0 cells far
    from the clip at g = 0."""
    sigma, g_min, rows = 0.01, 0.25, 64
    delta = (1 - g_min) / 3
    x = np.ones((1, rows))
    ps = []
    for seed in range(5):
        op = _column_op(dev(programming_noise=sigma, g_min=g_min, seed=seed), rows=rows)
        ps.append(op._psums(x, 1)[0, 0])
    P = np.concatenate(ps)
    _check_mean_var(P, 2 * rows, 2 * rows * (sigma / delta) ** 2)


def test_relative_programming_noise_follows_the_target():
    """sigma = rel * g_T: positive cells (g_T = g_min + 2 delta) and negative ones (g_T = g_min)
    add rows * (rel * g_T / delta)^2 each."""
    rel, g_min, rows = 0.05, 0.25, 64
    delta = (1 - g_min) / 3
    op = _column_op(dev(programming_noise_rel=rel, g_min=g_min, seed=1), rows=rows, O=1000)
    P = op._psums(np.ones((1, rows)), 1)[0, 0]
    var = rows * (rel / delta) ** 2 * ((g_min + 2 * delta) ** 2 + g_min ** 2)
    _check_mean_var(P, 2 * rows, var)


def test_read_noise_is_fresh_per_cycle_with_the_analytic_variance():
    """Read noise only: each column sum gets N(0, (sigma_r / delta)^2 * sum_i d_i^2); the next
    images get new draws; half the word lines driven halves the variance; the two cycles of a
    2-bit input (P = v_0 + 2 v_1) draw independently: variance (1 + 4) times one cycle's."""
    sig, rows = 0.02, 64
    delta = 1 / 3
    op = _column_op(dev(read_noise=sig), rows=rows, O=100)
    x = np.ones((40, rows))
    P1 = op._psums(x, 1)[0]
    _check_mean_var(P1, 2 * rows, 2 * rows * (sig / delta) ** 2)
    y1, y2 = op(x, 1.0), op(x, 1.0)                          # images 0..39, then 40..79
    assert not np.array_equal(y1, y2)
    np.testing.assert_array_equal(y1, P1.astype(np.float32))
    # rows drawn for different vectors are independent: their differences have twice the var
    _check_mean_var((P1[0] - P1[1]), 0.0, 4 * rows * (sig / delta) ** 2)
    half = x.copy()
    half[:, rows // 2:] = 0
    Ph = op._psums(half, 1)[0]
    _check_mean_var(Ph, rows, rows * (sig / delta) ** 2)
    op3 = _column_op(dev(read_noise=sig), rows=rows, O=100, a_bits=3)
    P3 = op3._psums(3 * x, 1)[0]
    _check_mean_var(P3, 3 * 2 * rows, 5 * 2 * rows * (sig / delta) ** 2)


def test_stuck_fractions_within_a_binomial_interval():
    """Targets at level 1: a stuck-on cell reads level 3 (g_max), stuck-off level 0 (g_min)."""
    off, on = 0.05, 0.1
    xb = Crossbar(rows=128, cols=256, cell_bits=2, signed="offset",
                  device=dev(stuck_off=off, stuck_on=on, seed=7))
    O, K = 120, 128
    wq = np.full((O, K), -6)            # offset: -6 + 7 = 1 -> slices (1, 0): level 1 and 0
    op = NoisyCrossbarGemm(wq, TileGrid(O, K, O, K), np.ones((1, 1)), xb, 4, 8)
    G = op.G[0].reshape(K, 2, O)[:, 0]                       # slice 0: target level 1
    n = G.size
    for frac, level in ((on, 3.0), (off, 0.0)):
        k = int((G == level).sum())
        assert abs(k - n * frac) < 4.5 * math.sqrt(n * frac * (1 - frac)), (k, n * frac)
    assert ((G == 1.0) | (G == 3.0) | (G == 0.0)).all()


def test_drift_mean_exponent():
    """G(t) = G(t0) (t / t0)^-nu with nu ~ N(0.05, 0.01) per cell: the exponent recovered from
    each cell has that mean and sd; the column sum of the drifted chip is that of the ideal one
    times the mean of (t / t0)^-nu."""
    nu, nu_sd, t0 = 0.05, 0.01, 20.0
    t = t0 * 1000.0
    op = _column_op(dev(drift_nu=nu, drift_nu_std=nu_sd, t0=t0, t_inference=t - t0, seed=3),
                    O=500)
    G = op.G[0].reshape(64, 2, 500)[:, 0].astype(np.float64)          # target level 2
    est = -np.log(G / 2.0) / math.log(t / t0)
    _check_mean_var(est.ravel(), nu, nu_sd ** 2)
    P = op._psums(np.ones((1, 64)), 1)[0, 0]
    expect = 2 * 64 * math.exp(-nu * math.log(1000) + 0.5 * (nu_sd * math.log(1000)) ** 2)
    assert abs(P.mean() - expect) < 0.01 * expect


def test_pcm_model_coefficients_by_hand():
    """hwconfigs/devices/pcm.yaml holds aihwkit's PCMLikeNoiseModel coefficients rescaled to
    fractions of g_max = 25 uS: sigma(1) = (0.26348 + 1.9650 - 1.1731) / 25, nu mean at g = 1
    is clipped up to 0.049, at g = 0.01 it is -0.0155 ln 0.01 + 0.0244."""
    ph = Device(model="pcm", t_inference=3600.0).physics(2)
    assert ph.prog_sigma(np.array(1.0)) == pytest.approx((0.26348 + 1.9650 - 1.1731) / 25, 1e-5)
    assert ph.prog_sigma(np.array(0.0)) == pytest.approx(0.26348 / 25, 1e-5)
    mean, sd = ph.nu_params(np.array([1.0, 0.01]))
    assert mean[0] == pytest.approx(0.049) and sd[0] == pytest.approx(0.008)
    assert mean[1] == pytest.approx(-0.0155 * math.log(0.01) + 0.0244)
    assert ph.t == 3620.0 and not ph.ideal
    # explicit keys override the model's functions
    ph2 = Device(model="pcm", programming_noise=0.0, drift_nu=0.0, read_noise=0.0).physics(2)
    assert ph2.ideal
    rr = Device(model="rram").physics(2)
    assert rr.g_min == pytest.approx(50 / 225, 1e-6)
    assert rr.prog_sigma(np.array(1.0)) == pytest.approx((4.782321 - 0.009107 * 225) / 225, 1e-4)
    assert "Milo" in (load_model("rram") is not None and
                      open(__import__("pimsim.crossbar.device", fromlist=["x"]).DEVICES_DIR
                           / "rram.yaml").read())


# --------------------------------------------------------------------------- reproducibility

def _conv_op(device, a_bits=6):
    rng = np.random.default_rng(5)
    O, C = 6, 3
    K = C * 9
    xb = Crossbar(rows=16, cols=64, cell_bits=2, signed="offset", adc_bits=6, device=device)
    wq = rng.integers(-7, 8, (O, K))
    grid = Granularity.tile(3, 16).resolve(O, K)
    return NoisyCrossbarGemm(wq, grid, np.full(grid.shape, 0.01), xb, 4, a_bits)


def test_same_seed_same_outputs_for_batch_sizes_7_and_50_and_any_threads_other_seed_differs():
    device = dev(programming_noise=0.02, read_noise=0.02, seed=11)
    x = torch.from_numpy(np.random.default_rng(2).integers(-31, 32, (50, 3, 6, 6))
                         .astype(np.float32))

    def run(op, bs):
        op.reset_stats()
        return np.concatenate([op.conv(x[i:i + bs], 0.1, (3, 3), padding=(1, 1))
                               for i in range(0, 50, bs)])
    op = _conv_op(device)
    y50, y7 = run(op, 50), run(op, 7)
    np.testing.assert_array_equal(y50, y7)
    np.testing.assert_array_equal(run(_conv_op(device), 7), y50)        # same chip rebuilt
    other = _conv_op(dev(programming_noise=0.02, read_noise=0.02, seed=12))
    assert not np.array_equal(run(other, 50), y50)
    op.program(12)                                                       # = chip 12
    np.testing.assert_array_equal(run(op, 50), run(other, 50))
    # nor on the thread count (torch / Numba threads; the analog path's BLAS runs on one)
    from pimsim.kernels import threads
    with threads(1):
        y1 = run(_conv_op(device), 7)
    with threads(2):
        y2 = run(_conv_op(device), 50)
    np.testing.assert_array_equal(y1, y50)
    np.testing.assert_array_equal(y2, y50)
    # without the reset the next images get new read noise
    op.reset_stats()
    first = op.conv(x[:7], 0.1, (3, 3), padding=(1, 1))
    again = op.conv(x[:7], 0.1, (3, 3), padding=(1, 1))
    assert not np.array_equal(first, again)


# --------------------------------------------------------------------------- ADC per slice

def test_calibrated_slice_is_never_worse_than_calibrated():
    """5-bit weights, 2-bit cells: 2 magnitude slices. |w| is 8 or 12 plus, for 10 % of the
    weights, 1..3: the high slice is dense, the low one sparse with small column sums. The one
    range per array is the high slice's, which keeps it per slice (same high-slice errors);
    the low slice gets its own smaller range and a finer step. On the calibration data neither
    clips and the per-slice error (against the exact product) is smaller at every ADC
    resolution."""
    rng = np.random.default_rng(0)
    O, K, N = 16, 64, 64
    mag = rng.choice([8, 12], (O, K)) + rng.integers(1, 4, (O, K)) * (rng.random((O, K)) < 0.1)
    w = rng.choice([-1, 1], (O, K)) * mag
    x = rng.integers(0, 128, (N, K)) * (rng.random((N, K)) < 0.5)
    grid = TileGrid(O, K, O, K)
    exact = partial_sums_reference(w, x.T, grid)[0].T.astype(np.float64)       # (N, O)
    for bits in (3, 4, 5):
        errs, clips, fitted = {}, {}, {}
        for pol in ("calibrated", "calibrated_slice"):
            xb = Crossbar(rows=64, cols=128, cell_bits=2, adc_bits=bits, adc_range=pol)
            op = NoisyCrossbarGemm(w, grid, np.ones((1, 1)), xb, 5, 8)
            op.start_fit()
            op._psums(x, 1)
            fitted[pol] = np.asarray(op.finish_fit())
            op.reset_stats()
            errs[pol] = np.abs(op._psums(x, 1)[0] - exact).sum()
            clips[pol] = op.clipped
        per_slice, per_array = fitted["calibrated_slice"], fitted["calibrated"]
        assert per_slice.shape == (1, 2) and per_array.shape == (1,)
        assert per_slice[0, 1] == per_array[0]                 # the high slice sets the array's
        assert per_slice[0, 0] <= per_array[0] / 3
        assert clips == {"calibrated": 0, "calibrated_slice": 0}
        assert errs["calibrated_slice"] < errs["calibrated"], (bits, errs)


# --------------------------------------------------------------------------- compensation

def _drift_op(compensation, nu=0.06, nu_sd=0.0, adc_bits=0, O=12, K=40, r=6, c=20):
    rng = np.random.default_rng(4)
    wq = rng.integers(-7, 8, (O, K))
    grid = Granularity.tile(r, c).resolve(O, K)
    scales = 10.0 ** rng.uniform(-2, 0, grid.shape)
    device = dev(drift_nu=nu, drift_nu_std=nu_sd, t_inference=86400.0)
    xb = Crossbar(rows=64, cols=128, cell_bits=2, adc_bits=adc_bits, compensation=compensation,
                  device=device)
    x = rng.integers(-31, 32, (30, K)).astype(np.float32)
    ideal = TiledGemm(wq, grid, scales, w_bits=4, a_bits=6)(x, 0.05, layout="NK")
    return NoisyCrossbarGemm(wq, grid, scales, xb, 4, 6), x, ideal


def test_global_compensation_restores_pure_drift_within_rounding():
    """Constant nu, no noise, g_min = 0: every conductance is scaled by (t/t0)^-nu, so the one
    factor measured on the reference inputs undoes it up to float32 rounding."""
    drifted, x, ideal = _drift_op("none")
    y0 = drifted(x, 0.05)
    d = (86420.0 / 20.0) ** -0.06
    np.testing.assert_allclose(y0, d * ideal, rtol=1e-5, atol=1e-6)    # drift, uncompensated
    comp, _, _ = _drift_op("global")
    y = comp(x, 0.05)
    np.testing.assert_allclose(y, ideal, rtol=1e-5, atol=1e-6)
    assert comp.factors == pytest.approx(np.full(comp.scales.shape, 1 / d))
    # with an 8-bit ADC (full range): within the ADC's rounding, far better than no compensation
    comp8, _, _ = _drift_op("global", adc_bits=8)
    none8, _, _ = _drift_op("none", adc_bits=8)
    e_c = np.abs(comp8(x, 0.05) - ideal).mean()
    e_n = np.abs(none8(x, 0.05) - ideal).mean()
    assert e_c < 0.25 * e_n


def test_tile_compensation_beats_global_when_nu_varies_per_tile():
    """nu set per crossbar tile (2 row blocks x 2 column blocks): one factor per tile undoes
    each tile's drift, one per layer cannot."""
    nus = np.array([[0.02, 0.08], [0.05, 0.11]])
    errs = {}
    for comp in ("global", "tile"):
        op, x, ideal = _drift_op(comp)
        rb = op.grid.row_block_index()
        O = op.grid.O
        for s, cells in enumerate(op.cells):
            j = op.seg_col[s]
            o_of_col = np.arange(cells["nu"].shape[1]) % O
            cells["nu"][:] = nus[rb[o_of_col], j][None, :]
        op.refresh()
        y = op(x, 0.05)
        errs[comp] = np.abs(y - ideal).mean()
        if comp == "tile":
            np.testing.assert_allclose(y, ideal, rtol=1e-5, atol=1e-5)
    assert errs["tile"] < 0.1 * errs["global"]


# --------------------------------------------------------------------------- bad input

BAD = [
    ("g_min", 1.0, "[0, 1)"), ("g_min", -0.1, "[0, 1)"), ("g_min", "x", "[0, 1)"),
    ("programming_noise", -0.01, ">= 0"), ("programming_noise_rel", -1, ">= 0"),
    ("read_noise", -0.5, ">= 0"), ("drift_nu", -0.1, ">= 0"), ("drift_nu_std", -1e-3, ">= 0"),
    ("t0", 0, "> 0"), ("t_inference", -1, ">= 0"), ("stuck_off", 1.5, "[0, 1]"),
    ("stuck_on", -0.1, "[0, 1]"), ("model", "flash", "none, pcm, rram"),
    ("seed", -1, ">= 0"), ("seed", 1.5, "integer"), ("instances", 0, ">= 1"),
    ("instances", True, "integer"), ("wire_resistance", 1, "unknown key"),
    ("wire_r", -1e-4, "[0, 1]"), ("wire_r", 2, "[0, 1]"), ("wire_r", "low", "[0, 1]"),
]


@pytest.mark.parametrize("key,value,what", BAD)
def test_bad_device_value_is_one_line_naming_the_key(key, value, what):
    with pytest.raises(ConfigError) as e:
        validate({"crossbar": {"device": {key: value}}}, "hw.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"hw.yaml: crossbar.device.{key}: ") and what in msg
    with pytest.raises(ConfigError) as e:                  # --set names it the same way
        validate({"crossbar": {}}, "hw.yaml", [(f"crossbar.device.{key}", value)])
    assert str(e.value).startswith(f"--set: crossbar.device.{key}: ")


def test_bad_device_combinations_and_sections():
    with pytest.raises(ConfigError, match=r"crossbar\.device\.stuck_on: 0\.6: stuck_off \+ "
                                          r"stuck_on must be <= 1"):
        validate({"crossbar": {"device": {"stuck_off": 0.5, "stuck_on": 0.6}}}, "hw.yaml")
    with pytest.raises(ConfigError, match="crossbar.device: 3: must be a mapping"):
        validate({"crossbar": {"device": 3}}, "hw.yaml")
    with pytest.raises(ConfigError, match="crossbar.compensation: drift: must be one of none, "
                                          "global, tile"):
        validate({"crossbar": {"compensation": "drift"}}, "hw.yaml")
    with pytest.raises(ConfigError, match="calibrated_slice"):
        validate({"crossbar": {"adc_range": "per_slice"}}, "hw.yaml")
    with pytest.raises(ValueError, match=r"^crossbar\.device\.read_noise: -1: must be"):
        Crossbar(device=dev(read_noise=-1))
    with pytest.raises(ValueError, match=r"^crossbar\.device\.bogus: 1: unknown key"):
        Device.from_dict({"bogus": 1})


def test_device_keys_from_yaml_and_set_merge():
    cfg = validate({"crossbar": {"device": {"model": "pcm", "t_inference": 3600}}}, "hw.yaml",
                   [("crossbar.device.seed", 4), ("crossbar.device.instances", 3)])
    d = cfg.crossbar.dev
    assert (d.model, d.t_inference, d.seed, d.instances) == ("pcm", 3600, 4, 3)
    assert validate({"crossbar": {}}).crossbar.dev == Device()
    from pimsim.simulate import chip_seeds
    cfg = validate({"crossbar": {"device": {"read_noise": 0.01, "seed": 5, "instances": 3}},
                    "eval": {"backend": "crossbar"}})
    assert chip_seeds(cfg) == [5, 6, 7]
    cfg = validate({"crossbar": {"device": {"seed": 5, "instances": 3}},
                    "eval": {"backend": "crossbar"}})
    assert chip_seeds(cfg) == [None]                         # ideal cells: one evaluation


def test_sweep_over_the_chip_seed():
    from pimsim.sweep import parse
    sw = parse({"base": {"crossbar": {"device": {"programming_noise": 0.02}},
                         "eval": {"backend": "crossbar"}},
                "grid": {"crossbar.device.seed": [0, 1, 2]}})
    assert [p.cfg.crossbar.dev.seed for p in sw.points] == [0, 1, 2]
    assert all(p.cfg.crossbar.dev.programming_noise == 0.02 for p in sw.points)


def test_grouped_layer_ideal_equality_noise_per_group_and_fits():
    """A grouped convolution (3 groups, each on arrays of its own): ideal cells equal
    CrossbarGemm; noisy cells differ per group (each group's cells have their own key); the
    per-slice fit and the tile compensation run through the groups."""
    rng = np.random.default_rng(3)
    g, cg, og = 3, 4, 6
    O, K = g * og, cg * 9
    grid = Granularity.tile(3, 20).resolve(O, K, g)
    wq = rng.integers(-7, 8, (O, K))
    scales = rng.uniform(1e-3, 1e-1, grid.shape)
    x = torch.from_numpy(rng.integers(-31, 32, (4, g * cg, 5, 5)).astype(np.float32))
    xb = Crossbar(rows=16, cols=32, signed="offset", adc_bits=7)
    a = CrossbarGemm(wq, grid, scales, xb, 4, 6, shortcut=False)
    b = NoisyCrossbarGemm(wq, grid, scales, xb, 4, 6)
    ya, yb = (op.conv(x, 0.1, (3, 3), padding=(1, 1)) for op in (a, b))
    np.testing.assert_array_equal(ya.view(np.uint32), yb.view(np.uint32))
    assert a.clipped == b.clipped
    noisy = dataclasses.replace(xb, device=dev(programming_noise=0.05), compensation="tile",
                                adc_range="calibrated_slice")
    n = NoisyCrossbarGemm(wq, grid, scales, noisy, 4, 6)
    assert len({p.key for p in n.parts}) == g                # layer-name keys per group
    assert not np.array_equal(n.parts[0].G[0], n.parts[1].G[0])
    n.start_fit()
    n.conv(x, 0.1, (3, 3), padding=(1, 1))
    ranges = n.finish_fit()
    assert np.asarray(ranges).shape == (n.n_arrays, 2)
    y = n.conv(x, 0.1, (3, 3), padding=(1, 1))
    assert n.factors.shape == grid.shape and np.isfinite(y).all()
    assert np.abs(y - ya).mean() < 0.5 * np.abs(ya).mean()


def test_run_reports_every_chip_and_a_chip_is_the_same_in_another_run(tmp_path):
    """pimsim run with 3 chips: top1 is their mean, the spread is reported, and chip 1 of that
    run is the chip of a separate run with crossbar.device.seed 1 (same accuracy)."""
    import json

    from pimsim.cli import main
    from pimsim.testing import data_dir_or_skip
    data_dir_or_skip()
    from pathlib import Path
    cfg = Path(__file__).resolve().parents[1] / "hwconfigs" / "isaac.yaml"
    sets = ["--set", "quant.calibration=max", "--set", "quant.calib_images=16",
            "--set", "eval.threads=1", "--set", "crossbar.device.programming_noise=0.08",
            "--set", "crossbar.device.read_noise=0.01"]
    out3, out1 = tmp_path / "three.json", tmp_path / "one.json"
    assert main(["run", str(cfg), "--limit", "12", "-q", "--out", str(out3)] + sets
                + ["--set", "crossbar.device.instances=3"]) == 0
    assert main(["run", str(cfg), "--limit", "12", "-q", "--out", str(out1)] + sets
                + ["--set", "crossbar.device.seed=1"]) == 0
    r3, r1 = json.loads(out3.read_text()), json.loads(out1.read_text())
    tops = r3["top1_instances"]
    assert r3["chip_seeds"] == [0, 1, 2] and len(tops) == 3
    assert r3["top1"] == pytest.approx(sum(tops) / 3)
    assert r3["top1_sd"] == pytest.approx(float(np.std(tops, ddof=1)))
    assert (r3["top1_min"], r3["top1_max"]) == (min(tops), max(tops))
    assert r1["chip_seeds"] == [1] and r1["top1"] == tops[1]


def test_bitline_layout_puts_every_column_on_its_own_bit_line():
    """Two arrays per segment (row blocks of 5 outputs x 2 columns, 12 bit lines, 2 of them
    reference): every (array, bit line) is used once, weight columns before the reference
    ones, the arrays those of the mapping."""
    xb = Crossbar(rows=16, cols=12, cell_bits=2, signed="offset",
                  device=dev(programming_noise=0.01))
    grid = Granularity.tile(5, 16).resolve(10, 16)
    op = NoisyCrossbarGemm(np.zeros((10, 16), int), grid, np.ones(grid.shape), xb, 4, 6)
    arr, line = op.bitline_layout()
    assert op.aps == 2 and len(arr) == op.G_all[0].shape[1]
    assert len(set(zip(arr.tolist(), line.tolist()))) == len(arr)
    assert (line[:-4] < 10).all() and sorted(line[-4:].tolist()) == [10, 10, 11, 11]
    np.testing.assert_array_equal(arr[:20], op.col_arr.reshape(-1))
    # output 0's two columns are bit lines 0 and 1 of array 0, output 5's of array 1
    O = 10
    assert (arr[0], line[0], arr[O], line[O]) == (0, 0, 0, 1)
    assert (arr[5], line[5], arr[O + 5], line[O + 5]) == (1, 0, 1, 1)


def test_unsigned_inputs_use_all_bits_and_equal_the_integer_path():
    """quant.act_signed unsigned: inputs up to 2^a - 1 in ceil(a / dac) cycles of one pass; the
    analog model with ideal cells equals CrossbarGemm, and refuses a negative input."""
    rng = np.random.default_rng(8)
    O, K = 9, 50
    wq = rng.integers(-7, 8, (O, K))
    grid = Granularity.tile(4, 24).resolve(O, K)
    scales = rng.uniform(0.01, 0.1, grid.shape)
    x = rng.integers(0, 64, (30, K)).astype(np.float32)              # a_bits 6: 0..63
    for adc in (0, 6):
        xb = Crossbar(rows=32, cols=40, signed="offset", dac_bits=2, adc_bits=adc)
        a = CrossbarGemm(wq, grid, scales, xb, 4, 6, shortcut=False, a_unsigned=True)
        b = NoisyCrossbarGemm(wq, grid, scales, xb, 4, 6, a_unsigned=True)
        np.testing.assert_array_equal(a(x, 0.1).view(np.uint32), b(x, 0.1).view(np.uint32))
        assert (a.clipped, a.conversions) == (b.clipped, b.conversions)
    with pytest.raises(ValueError, match="unsigned 6-bit integers in \\[0, 63\\]"):
        b(-x, 0.1)


# --------------------------------------------------------------------------- wire resistance

@pytest.mark.parametrize("exact_cells", [128 * 128, 0], ids=["exact", "coupled-line-model"])
def test_wire_resistance_folds_the_exact_nodal_solve_into_the_conductances(exact_cells,
                                                                           monkeypatch):
    """wire_r > 0: the matrix the ADC sees is (T - g_min) / delta of each physical array, T the
    sensed-current transfer of the resistive network; checked against the exact nodal solve
    of ``irdrop.solve_exact`` (one word line driven at a time), the conductances placed on
    the bit lines of ``bitline_layout`` and g_min on the unused cells; on arrays above
    WIRE_EXACT_CELLS the coupled line model (here forced) is within 1e-3 level steps of it."""
    import pimsim.crossbar.noisy as noisy
    from pimsim.crossbar.irdrop import solve_exact
    monkeypatch.setattr(noisy, "WIRE_EXACT_CELLS", exact_cells)
    rows, g_min, r = 8, 0.1, 2e-3
    ideal = _column_op(dev(g_min=g_min), O=2, rows=rows)
    op = _column_op(dev(g_min=g_min, wire_r=r), O=2, rows=rows)
    xb, delta = op.crossbar, (1 - g_min) / 3
    arr, line = op.bitline_layout()
    assert (arr == 0).all()                                       # one array
    g = np.full((xb.rows, xb.cols), g_min)
    g[:, line] = g_min + delta * ideal.G_all[0].astype(np.float64)
    T = solve_exact(np.eye(xb.rows), g, r)                        # row i: word line i at 1
    want = (T[:, line] - g_min) / delta
    got = op.G_all[0].astype(np.float64)
    assert np.abs(got - ideal.G_all[0]).max() > 1e-3              # the wires matter here
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 if exact_cells else 1e-3)


def test_wire_resistance_lowers_the_column_sums_more_for_larger_arrays_and_wires():
    """All weights +2, all inputs 1: the ideal column sum is 2 * rows; with wire resistance the
    sensed currents are lower, more so for larger wire_r and for more word lines."""
    x = lambda rows: np.ones((1, rows))  # noqa: E731
    drop = {}
    for rows in (16, 64):
        for r in (1e-4, 1e-3):
            op = _column_op(dev(wire_r=r), O=2, rows=rows)
            P = op._psums(x(rows), 1)[0, 0]
            drop[rows, r] = 1 - float(np.mean(P)) / (2 * rows)
    assert all(d > 0 for d in drop.values()), drop
    assert drop[16, 1e-4] < drop[16, 1e-3] and drop[64, 1e-4] < drop[64, 1e-3], drop
    assert drop[16, 1e-4] < drop[64, 1e-4] and drop[16, 1e-3] < drop[64, 1e-3], drop


def test_wire_resistance_alone_is_one_chip():
    """Ideal cells with wire resistance: the analog model runs (the wires bend the sums), but
    nothing is drawn at random, so a run evaluates one chip whatever `instances` says; noisy
    cells give one chip per seed."""
    from pimsim.simulate import chip_seeds
    cfg = validate({"eval": {"backend": "crossbar"},
                    "crossbar": {"device": {"wire_r": 1e-5, "instances": 3, "seed": 4}}})
    assert cfg.crossbar.analog and not cfg.crossbar.dev.ideal and cfg.crossbar.dev.cells_ideal
    assert chip_seeds(cfg) == [None]
    cfg = validate({"eval": {"backend": "crossbar"},
                    "crossbar": {"device": {"wire_r": 1e-5, "read_noise": 0.01,
                                            "instances": 3, "seed": 4}}})
    assert chip_seeds(cfg) == [4, 5, 6]
