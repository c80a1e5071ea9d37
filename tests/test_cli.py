"""Tests of the ``pimsim`` command line (pimsim.cli)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pimsim
from pimsim.cli import main
from pimsim.testing import data_dir_or_skip, restored_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "hwconfigs" / "default.yaml"


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs set the process's torch and Numba thread counts; undo that."""
    with restored_threads():
        yield



# --------------------------------------------------------------------------------------------
# --version / --help
# --------------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"pimsim {pimsim.__version__}"


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: pimsim" in out
    assert "run" in out and "fetch" in out and "--version" in out


def test_run_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--set", "--limit", "--out", "--data-dir", "--backend", "--quiet"):
        assert opt in out, opt


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: pimsim" in capsys.readouterr().out


def test_version_subprocess():
    r = subprocess.run([sys.executable, "-m", "pimsim", "--version"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"pimsim {pimsim.__version__}"


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert "frobnicate" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# run: errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("quant.weight_bits=99", "quant.weight_bits"),
    ("quant.tile=big", "quant.tile"),
    ("quant.bogus=1", "quant.bogus"),
    ("quant.tile=[16, 36", "quant.tile"),             # not valid YAML
    ("quant.tile", "quant.tile"),                     # no '='
])
def test_run_bad_set_exits_2(capsys, override, key):
    rc = main(["run", str(DEFAULT_YAML), "--set", override, "-q"])
    assert rc == 2
    cap = capsys.readouterr()
    assert "pimsim: error:" in cap.err
    assert key in cap.err
    assert "Traceback" not in cap.err


def test_run_missing_config_exits_2(capsys, tmp_path):
    missing = tmp_path / "no-such-config.yaml"
    rc = main(["run", str(missing), "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pimsim: error:" in err and "no-such-config.yaml" in err


def test_run_invalid_config_file_exits_2(capsys, tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("quant:\n  tile: [0, 4]\n")
    assert main(["run", str(p), "-q"]) == 2
    err = capsys.readouterr().err
    assert "pimsim: error:" in err and "broken.yaml" in err and "quant.tile" in err


def test_run_bad_data_dir_exits_2(capsys, tmp_path):
    rc = main(["run", str(DEFAULT_YAML), "--data-dir", str(tmp_path / "empty"), "--limit", "10", "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pimsim: error:" in err and "empty" in err


def test_run_missing_checkpoint_exits_2(capsys, tmp_path):
    data_dir_or_skip()
    rc = main(["run", str(DEFAULT_YAML), "--set", "model.checkpoint=missing-ckpt.th", "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pimsim: error:" in err and "model.checkpoint" in err and "missing-ckpt.th" in err


def _run_expect_exit_2(argv, capsys) -> str:
    """main(argv) must report a user error as ``pimsim: error: ...`` with exit code 2, not a
    traceback; returns stderr."""
    try:
        rc = main(argv)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"main({argv}) raised {type(e).__name__}: {e} instead of returning 2 "
                    "with 'pimsim: error:'")
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert "pimsim: error:" in err
    return err


def test_run_checkpoint_of_another_model_exits_2(capsys):
    """A checkpoint that does not fit the configured model (ResNet-56 weights, model resnet20)."""
    ddir = data_dir_or_skip()
    ck = ddir / "models" / "resnet56-cifar10jpg.th"
    if not ck.is_file():
        pytest.skip(f"{ck} missing")
    err = _run_expect_exit_2(["run", str(DEFAULT_YAML), "--set", f"model.checkpoint={ck}",
                              "--limit", "10", "-q"], capsys)
    assert ck.name in err


def test_run_garbage_checkpoint_exits_2(capsys, tmp_path):
    """A checkpoint file that is not a torch checkpoint at all."""
    data_dir_or_skip()
    ck = tmp_path / "garbage.th"
    ck.write_text("this is not a checkpoint\n")
    err = _run_expect_exit_2(["run", str(DEFAULT_YAML), "--set", f"model.checkpoint={ck}",
                              "--limit", "10", "-q"], capsys)
    assert ck.name in err


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_run_limit_must_be_positive(capsys, limit):
    with pytest.raises(SystemExit) as e:
        main(["run", str(DEFAULT_YAML), "--limit", limit, "-q"])
    assert e.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_run_bad_backend_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(DEFAULT_YAML), "--backend", "gpu"])
    assert e.value.code == 2


# --------------------------------------------------------------------------------------------
# run: real data
# --------------------------------------------------------------------------------------------

def test_run_writes_json(capsys, tmp_path):
    data_dir_or_skip()
    out = tmp_path / "sub" / "r.json"
    # one thread: predictable run time when other processes share the cores
    rc = main(["run", str(DEFAULT_YAML), "--limit", "200", "--out", str(out), "-q",
               "--set", "eval.threads=1"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "top-1" in stdout and str(out) in stdout
    res = json.loads(out.read_text())
    for key in ("fp_top1", "top1", "images", "calibration_s", "eval_s", "config", "layers"):
        assert key in res, key
    assert res["images"] == 200
    assert 0.0 <= res["top1"] <= 1.0 and 0.8 <= res["fp_top1"] <= 1.0
    assert res["calibration_s"] >= 0 and res["eval_s"] > 0
    cfg = res["config"]
    ckpt = Path(cfg["model"]["checkpoint"])
    assert ckpt.is_absolute() and ckpt.is_file() and ckpt.name == "resnet20-cifar10jpg.th"
    assert cfg["quant"]["tile"] == [128, 128]
    assert cfg["eval"]["limit"] == 200
    assert cfg["eval"]["threads"] == 1 and res["threads"] == 1
    assert Path(cfg["data"]["dir"]).is_dir()
    layers = res["layers"]
    assert isinstance(layers, list) and len(layers) == 18          # ResNet-20 minus first and last
    names = [l["name"] for l in layers]
    assert names[0] == "layer1.0.conv1" and names[-1] == "layer3.2.conv2"
    assert "conv1" not in names and "linear" not in names
    for l in layers:
        assert set(l) >= {"name", "O", "K", "tile", "scales"}
        r, c = l["tile"]
        assert (r, c) == (min(128, l["O"]), min(128, l["K"]))
        assert l["scales"] == -(-l["O"] // r) * -(-l["K"] // c)
    assert res["float_layers"] == ["conv1", "linear"]


def test_run_fake_backend_and_set(capsys, tmp_path):
    data_dir_or_skip()
    out = tmp_path / "f.json"
    rc = main(["run", str(DEFAULT_YAML), "--limit", "100", "--backend", "fake", "--set",
               "quant.tile=channelwise", "--set", "quant.calib_images=32", "--out", str(out), "-q"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["images"] == 100
    assert res["config"]["eval"]["backend"] == "fake"
    assert res["config"]["quant"]["tile"] == "channelwise"
    assert res["config"]["quant"]["calib_images"] == 32
    assert res["threads"] == (os.cpu_count() or 1)                  # eval.threads 0 = all cores
    assert all(l["tile"][0] == 1 and l["tile"][1] == l["K"] and l["scales"] == l["O"]
               for l in res["layers"])
