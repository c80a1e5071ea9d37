"""Errors after config validation: each gives exit 2 and one line naming the file / layer /
value (issue 12, item 5). Runs on a fake data folder made here (no network, no shared/)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import pytest
import torch

from fakedata import DEFAULT_YAML, QUICK, make_fetch_layout, save_checkpoint
from pimsim import data, simulate
from pimsim.cli import main
from pimsim.testing import restored_threads



@pytest.fixture(autouse=True)
def _restore_threads():
    with restored_threads():
        yield


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return make_fetch_layout(tmp_path_factory.mktemp("fetched"), n_test=30)


def _exit_2(argv, capsys) -> str:
    """main(argv) returns 2 with exactly one line ``pimsim: error: ...`` on stderr."""
    try:
        rc = main(argv)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"main({argv}) raised {type(e).__name__}: {e}")
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pimsim: error: "), err
    return lines[0]


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fail the test if any evaluation starts (errors must come before any work)."""
    def evaluate(*a, **k):
        raise AssertionError("an evaluation started before the error was found")
    monkeypatch.setattr(simulate, "evaluate", evaluate)


# --------------------------------------------------------------------------- test_batch


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_test_batch(tmp_path, capsys, damage, no_evaluation):
    root = make_fetch_layout(tmp_path / "d")
    batch = root / data.CIFAR_FOLDER / "test_batch"
    raw = batch.read_bytes()
    batch.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x00\xffnot a pickle" * 9,
                       "empty": b""}[damage])
    line = _exit_2(["run", str(DEFAULT_YAML), "--data-dir", str(root), *QUICK], capsys)
    assert f"{batch}: not a readable CIFAR-10 batch" in line
    assert "re-fetch it" in line


# --------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("tensor, value", [
    ("linear.weight", math.nan),          # the last layer: kept in float by quant.float_layers auto
    ("conv1.weight", math.inf),           # the first layer: float too
    ("layer2.1.bn1.running_var", -math.inf),
])
def test_nan_or_inf_in_checkpoint(tmp_path, capsys, layout, tensor, value, no_evaluation):
    ck = tmp_path / "broken.th"
    save_checkpoint(ck)
    obj = torch.load(ck, weights_only=True)
    obj["state_dict"]["module." + tensor].view(-1)[3] = value
    torch.save(obj, ck)
    line = _exit_2(["run", str(DEFAULT_YAML), "--data-dir", str(layout),
                    "--set", f"model.checkpoint={ck}", *QUICK], capsys)
    assert f"{ck}: tensor {tensor} holds" in line
    assert ("1 NaN" if math.isnan(value) else "1 inf") in line


# --------------------------------------------------------------------------- float_layers


def test_unknown_float_layer_before_any_evaluation(capsys, layout, no_evaluation):
    line = _exit_2(["run", str(DEFAULT_YAML), "--data-dir", str(layout),
                    "--set", "quant.float_layers=[conv1, layer9.conv1]", *QUICK], capsys)
    assert "default.yaml: quant.float_layers: unknown layer(s) layer9.conv1 for resnet20" in line
    assert "layer1.0.conv1" in line                      # lists the layers there are


# --------------------------------------------------------------------------- --out


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the config is even read (--out is checked before anything)."""
    import pimsim.config

    def load(*a, **k):
        raise AssertionError("work started before --out was checked")
    monkeypatch.setattr(pimsim.config, "load", load)


@pytest.mark.parametrize("cmd", ["run", "cost"])
def test_out_is_a_folder(tmp_path, capsys, cmd, no_work):
    line = _exit_2([cmd, str(DEFAULT_YAML), "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} is a folder" in line


@pytest.mark.parametrize("cmd", ["run", "cost"])
def test_out_under_a_file(tmp_path, capsys, cmd, no_work):
    (tmp_path / "plain.txt").write_text("x")
    out = tmp_path / "plain.txt" / "sub" / "r.json"
    line = _exit_2([cmd, str(DEFAULT_YAML), "--out", str(out)], capsys)
    assert f"--out {out}: {tmp_path / 'plain.txt'} is a file, not a folder" in line


def test_out_check_leaves_nothing_behind(tmp_path, capsys):
    """The probe of a writable --out creates and removes its file and folders again."""
    from pimsim.cli import check_out_file
    out = tmp_path / "a" / "b" / "r.json"
    assert check_out_file(out) == out
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- plot


@pytest.mark.parametrize("text, expect", [
    ("", "empty file: no header and no rows in t.csv"),
    ("model,wbits,abits,calibration,method,r,c,m,scales,top1\n", "no rows in t.csv"),
    ("model,wbits,abits,method,top1\nresnet20,4,8,channelwise,0.8\n",
     "missing column(s) calibration"),
    ("model,wbits,abits,calibration,method,r,c,m,scales,top1\n"
     "resnet20,4,8,ptqsl,method1,16,,,10,0.8\n", "line 2: method1 needs column c"),
    ("model,wbits,abits,calibration,method,r,c,m,scales,top1\n"
     "resnet20,4,8,ptqsl,tiles,16,4,,10,0.8\n", "line 2: method 'tiles' unknown"),
])
def test_plot_bad_csv(tmp_path, capsys, text, expect):
    csv = tmp_path / "t.csv"
    csv.write_text(text)
    line = _exit_2(["plot", str(csv), "--out", str(tmp_path / "png")], capsys)
    assert f"{csv}: {expect}" in line
    assert not (tmp_path / "png").exists() or not any((tmp_path / "png").iterdir())


# --------------------------------------------------------------------------- fetch


def test_fetch_without_network(tmp_path, capsys, monkeypatch):
    def no_network(*a, **k):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    line = _exit_2(["fetch", "--dest", str(tmp_path), "-q"], capsys)
    assert f"download of {data.CIFAR10_URL} failed" in line
    assert "name resolution" in line and "check the internet connection" in line
    assert f"download that URL by hand to {tmp_path / 'cifar-10-python.tar.gz'}" in line
    assert not list(tmp_path.glob("*.part"))


# --------------------------------------------------------------------------- --limit


def test_limit_above_test_set_is_capped_and_said(tmp_path, capsys, layout):
    out = tmp_path / "r.json"
    rc = main(["run", str(DEFAULT_YAML), "--data-dir", str(layout), "--limit", "50",
               "--out", str(out), *QUICK])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(out.read_text())
    assert res["images"] == 30 and res["limit_capped"] is True
    assert res["config"]["eval"]["limit"] == 50                      # what was asked
    note = (f"limit 50 is above the 30 images of {layout / data.CIFAR_FOLDER / 'test_batch'}: "
            f"capped, evaluating all 30")
    assert res["notes"] == [note]
    assert f"pimsim: note: {note}" in cap.err
    assert "images 30 (limit capped)" in cap.out


@pytest.mark.parametrize("argv, usage, shown", [
    (["run", str(DEFAULT_YAML), "--limit", "0"], "usage: pimsim run", "got 0"),
    (["run", str(DEFAULT_YAML), "--limit", "-3"], "usage: pimsim run", "got -3"),
    (["run", str(DEFAULT_YAML), "--limit", "ten"], "usage: pimsim run", "got 'ten'"),
    (["sweep", "x.yaml", "--workers", "0"], "usage: pimsim sweep", "got 0"),
])
def test_bad_counts_under_the_subcommand_usage(capsys, argv, usage, shown):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert f"argument {argv[2]}: must be an integer >= 1, {shown}" in err


# --------------------------------------------------------------------------- config files


def test_empty_config_says_so(tmp_path, capsys):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("# nothing here yet\n")
    assert main(["cost", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert err.strip() == f"pimsim: note: {cfg}: empty config: every key takes its default"


def test_config_path_is_a_folder(tmp_path, capsys):
    line = _exit_2(["run", str(tmp_path), "-q"], capsys)
    assert f"{tmp_path} is a folder" in line and "not found" not in line


# --------------------------------------------------------------------------- quant.act_signed


def test_unsigned_activations_on_a_signed_input_name_the_layer(capsys, layout, no_evaluation):
    # conv1 quantized (no float layers) sees the normalized image, which is negative
    line = _exit_2(["run", str(DEFAULT_YAML), "--data-dir", str(layout),
                    "--set", "quant.float_layers=[]", "--set", "quant.act_signed=unsigned",
                    *QUICK], capsys)
    assert "layer conv1: quant.act_signed unsigned needs a non-negative input" in line
    assert "use auto or signed" in line


def test_bad_act_signed_value(capsys, layout, no_evaluation):
    line = _exit_2(["run", str(DEFAULT_YAML), "--data-dir", str(layout),
                    "--set", "quant.act_signed=sometimes", *QUICK], capsys)
    assert "quant.act_signed" in line and "signed, unsigned, auto" in line
