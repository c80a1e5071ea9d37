"""No code from a user's file: checkpoints load as tensors only (torch ``weights_only`` or
safetensors) and CIFAR batches through an unpickler that builds arrays, lists and dicts only.

Each attack test first shows that its crafted file really does run code under plain
``pickle.load`` (the marker appears), so the test fails if pimsim ever unpickles it fully.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fakedata import (DEFAULT_YAML, QUICK, Payload, float_top1, make_fetch_layout, save_checkpoint,
                      write_batch)
from pimsim import data, models
from pimsim.cli import main
from pimsim.testing import restored_threads



@pytest.fixture(autouse=True)
def _restore_threads():
    with restored_threads():
        yield


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A data folder as ``pimsim fetch`` leaves it (fake batches, tiny published checkpoint)."""
    return make_fetch_layout(tmp_path_factory.mktemp("fetched"))


def _assert_payload_works(tmp_path, make_file):
    """The crafted file does run code under plain unpickling (so the tests below can fail)."""
    probe = tmp_path / "probe-marker"
    path = make_file(probe)
    with open(path, "rb") as f:
        try:
            pickle.load(f)
        except Exception:  # noqa: BLE001 — only the side effect matters
            pass
    if not probe.exists():                       # a torch zip file: full torch.load runs it
        torch.load(path, weights_only=False)
    assert probe.exists(), "the crafted file does not run its payload; the test proves nothing"


def _evil_checkpoint(kind):
    def make(marker, path=None):
        path = path or Path(marker).with_suffix(".th")
        if kind == "torch.save":                 # what an attacker would ship: a torch zip file
            torch.save({"state_dict": {"conv1.weight": Payload(marker)}}, path)
        else:                                    # a bare pickle, as the legacy .th format
            with open(path, "wb") as f:
                pickle.dump({"state_dict": Payload(marker), "best_prec1": 1.0}, f, protocol=2)
        return path
    return make


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys, layout, kind):
    make = _evil_checkpoint(kind)
    _assert_payload_works(tmp_path, make)
    marker = tmp_path / "marker"
    ck = make(marker, tmp_path / "evil.th")
    rc = main(["run", str(DEFAULT_YAML), "--data-dir", str(layout), "--set",
               f"model.checkpoint={ck}", "--limit", "10", *QUICK])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not marker.exists(), "pimsim ran code from the checkpoint"
    assert f"pimsim: error: {ck}: not a plain weights file (" in err
    assert "it needs io.open" in err                              # names what it refused
    assert err.rstrip().endswith("pimsim loads tensors only")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_load_checkpoint_refuses_crafted_file(tmp_path):
    marker = tmp_path / "marker"
    ck = _evil_checkpoint("torch.save")(marker, tmp_path / "evil.th")
    with pytest.raises(models.CheckpointError, match=r"evil\.th: not a plain weights file"):
        models.load_checkpoint(models.resnet20(), ck)
    assert not marker.exists()


def test_safetensors_round_trip_same_weights_and_accuracy(tmp_path, capsys, layout):
    """The same weights as .th and as .safetensors: identical tensors after loading, and
    identical float and quantized top-1 through pimsim run; the float top-1 matches an
    evaluation of the saved weights done here."""
    state = save_checkpoint(tmp_path / "w.th", seed=5)
    again = save_checkpoint(tmp_path / "w.safetensors", seed=5, fmt="safetensors")
    assert all(torch.equal(state[k], again[k]) for k in state)
    a = models.build_model("resnet20", checkpoint=tmp_path / "w.th").state_dict()
    b = models.build_model("resnet20", checkpoint=tmp_path / "w.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], state[k]) for k in state)
    res = {}
    for ext in ("th", "safetensors"):
        out = tmp_path / f"{ext}.json"
        rc = main(["run", str(DEFAULT_YAML), "--data-dir", str(layout), "--set",
                   f"model.checkpoint={tmp_path / f'w.{ext}'}", "--out", str(out), *QUICK])
        assert rc == 0, capsys.readouterr().err
        res[ext] = json.loads(out.read_text())
        assert res[ext]["checkpoint"] == str(tmp_path / f"w.{ext}")
    assert res["th"]["fp_top1"] == res["safetensors"]["fp_top1"]
    assert res["th"]["top1"] == res["safetensors"]["top1"]
    with open(layout / data.CIFAR_FOLDER / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    want = float_top1(state, "resnet20", batch[b"data"], batch[b"labels"])
    assert res["safetensors"]["fp_top1"] == pytest.approx(want, abs=1e-12)


def test_corrupt_safetensors_exits_2(tmp_path, capsys, layout):
    ck = tmp_path / "broken.safetensors"
    ck.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    rc = main(["run", str(DEFAULT_YAML), "--data-dir", str(layout), "--set",
               f"model.checkpoint={ck}", *QUICK])
    err = capsys.readouterr().err
    assert rc == 2 and f"{ck}: not a readable safetensors file" in err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- CIFAR batches


def test_crafted_test_batch_is_refused_and_runs_nothing(tmp_path, capsys):
    root = make_fetch_layout(tmp_path / "data")

    def make(marker):
        path = root / data.CIFAR_FOLDER / "test_batch"
        with open(path, "wb") as f:
            pickle.dump({b"data": Payload(marker), b"labels": [0]}, f, protocol=2)
        return path

    _assert_payload_works(tmp_path, make)
    marker = tmp_path / "marker"
    batch = make(marker)
    rc = main(["run", str(DEFAULT_YAML), "--data-dir", str(root), "--limit", "10", *QUICK])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not marker.exists(), "pimsim ran code from the test batch"
    assert f"pimsim: error: {batch}: refusing to unpickle io.open" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_plain_batches(tmp_path, protocol):
    """Batches pickled with the protocols numpy arrays use (reconstruct, frombuffer) load, with
    the same pixels and labels as written."""
    flat, labels = write_batch(tmp_path / "b", n=7, seed=protocol, protocol=protocol)
    images, lab = data.load_batch(tmp_path / "b")
    np.testing.assert_array_equal(images.reshape(7, -1), flat)
    assert lab.tolist() == labels


def test_real_batches_load_through_the_restricted_unpickler():
    """The shared copy (protocol 4, str keys) loads: the restricted unpickler allows what a
    real batch needs. Skips where the shared data is absent."""
    try:
        ddir = data.find_data_dir()
    except data.DataNotFoundError as e:
        pytest.skip(f"CIFAR-10 data not found: {str(e).splitlines()[0]}")
    path = ddir / data.CIFAR_FOLDER / "test_batch"
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    images, labels = data.load_batch(path)
    key = "data" if "data" in raw else b"data"
    np.testing.assert_array_equal(images.reshape(len(images), -1), raw[key])
    assert len(data.label_names(ddir)) == 10
