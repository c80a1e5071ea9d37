"""The default config works where ``pimsim fetch`` ran (issue 12, item 6): ``model.checkpoint:
null`` resolves to a checkpoint present in ``<data dir>/models/`` (the fine-tuned one beside the
JPEG copy, else the published one ``pimsim fetch`` downloads), the run says which, and the
calibration images come from ``data_batch_1`` only, whatever other batches exist."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from fakedata import DEFAULT_YAML, QUICK, float_top1, make_fetch_layout
from pimsim import data, models
from pimsim.cli import main
from pimsim.config import ConfigError, load, resolve_checkpoint
from pimsim.testing import restored_threads



@pytest.fixture(autouse=True)
def _restore_threads():
    with restored_threads():
        yield


def _raw_batch(path):
    with open(path, "rb") as f:                 # files this test wrote itself
        return pickle.load(f, encoding="bytes")


def test_fetch_lays_out_what_the_fake_layout_has(tmp_path, monkeypatch):
    """The fake layout is what ``fetch`` leaves: fetch, pointed at it, downloads nothing."""
    root = make_fetch_layout(tmp_path / "d")

    def no_download(*a, **k):
        raise AssertionError("fetch would download into the fake layout: it is incomplete")
    monkeypatch.setattr(data, "download", no_download)
    assert data.fetch(root, progress=False) == {"cifar10": root / data.CIFAR_FOLDER,
                                                "models": root / "models"}
    assert {p.name for p in (root / "models").iterdir()} == set(data.CHECKPOINT_URLS)


def test_default_run_after_fetch_uses_the_published_checkpoint(tmp_path, capsys):
    root = make_fetch_layout(tmp_path / "d")
    ck = root / "models" / "resnet20-12fca82f.th"
    out = tmp_path / "r.json"
    rc = main(["run", str(DEFAULT_YAML), "--data-dir", str(root), "--out", str(out), *QUICK])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"checkpoint {ck}\n" in cap.out
    res = json.loads(out.read_text())
    assert res["checkpoint"] == str(ck) and res["config"]["model"]["checkpoint"] == str(ck)
    # the float accuracy is that of the weights in that file, evaluated here independently
    import torch
    state = {k.removeprefix("module."): v for k, v in
             torch.load(ck, weights_only=True)["state_dict"].items()}
    batch = _raw_batch(root / data.CIFAR_FOLDER / "test_batch")
    assert res["fp_top1"] == pytest.approx(
        float_top1(state, "resnet20", batch[b"data"], batch[b"labels"]), abs=1e-12)
    assert res["images"] == 30


def test_fine_tuned_checkpoint_wins_beside_the_jpeg_copy(tmp_path):
    root = make_fetch_layout(tmp_path / "d", fine_tuned=("resnet20",))
    cfg = load(DEFAULT_YAML)
    assert resolve_checkpoint(cfg, root) == root / "models" / "resnet20-cifar10jpg.th"
    assert models.default_checkpoint_path("resnet20", root) == \
        root / "models" / "resnet20-cifar10jpg.th"
    (root / "models" / "resnet20-cifar10jpg.th").unlink()
    assert resolve_checkpoint(cfg, root) == root / "models" / "resnet20-12fca82f.th"
    assert models.default_checkpoint_path("resnet20", root) == \
        root / "models" / "resnet20-12fca82f.th"


def test_published_defaults_for_every_fetched_model(tmp_path):
    """Every architecture pimsim fetch downloads a checkpoint for has a default there."""
    root = make_fetch_layout(tmp_path / "d")
    for name, file in {"resnet32": "resnet32-d509ac18.th", "resnet44": "resnet44-014dd654.th",
                       "resnet56": "resnet56-4bfd9763.th",
                       "resnet110": "resnet110-1d1ed7c2.th"}.items():
        cfg = load(DEFAULT_YAML, [f"model.name={name}"])
        assert resolve_checkpoint(cfg, root) == root / "models" / file


def test_no_default_checkpoint_says_what_to_do(tmp_path, capsys):
    root = make_fetch_layout(tmp_path / "d")
    shutil.rmtree(root / "models")
    rc = main(["run", str(DEFAULT_YAML), "--data-dir", str(root), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2
    assert (f"default.yaml: model.checkpoint: null: no default checkpoint of resnet20 in "
            f"{root / 'models'} (looked for resnet20-cifar10jpg.th or resnet20-12fca82f.th); "
            f"pimsim fetch --what models --dest {root} downloads resnet20-12fca82f.th") in err
    with pytest.raises(ConfigError, match="resnet18 has no default checkpoint"):
        resolve_checkpoint(load(DEFAULT_YAML, ["model.name=resnet18"]), root)


def test_missing_published_file_hints_fetch(tmp_path):
    with pytest.raises(ConfigError, match="pimsim fetch --what models --dest .* downloads "
                                          "resnet56-4bfd9763.th"):
        resolve_checkpoint(load(DEFAULT_YAML, ["model.checkpoint=resnet56-4bfd9763.th"]),
                           tmp_path)


def test_calibration_draws_from_data_batch_1_only(tmp_path):
    """The draw equals ``default_rng(seed).choice`` over data_batch_1 read here, and stays the
    same with one training batch (the shared copy) or five (after pimsim fetch)."""
    five = make_fetch_layout(tmp_path / "five")
    one = tmp_path / "one"
    (one / data.CIFAR_FOLDER).mkdir(parents=True)
    for f in ("data_batch_1", "test_batch", "batches.meta"):
        shutil.copy(five / data.CIFAR_FOLDER / f, one / data.CIFAR_FOLDER / f)
    raw = _raw_batch(five / data.CIFAR_FOLDER / "data_batch_1")
    for seed in (0, 1, 7):
        idx = np.random.default_rng(seed).choice(len(raw[b"labels"]), size=12, replace=False)
        want = raw[b"data"][idx].reshape(-1, 3, 32, 32)
        for root in (five, one):
            images, labels = data.calibration_set(12, seed, root)
            np.testing.assert_array_equal(images, want)
            assert labels.tolist() == [raw[b"labels"][i] for i in idx]
    with pytest.raises(data.DataError, match=r"data_batch_1: holds 40 images; .* 1\.\.40, got 41"):
        data.calibration_set(41, 0, five)


def test_calibration_needs_data_batch_1(tmp_path, capsys):
    root = make_fetch_layout(tmp_path / "d")
    (root / data.CIFAR_FOLDER / "data_batch_1").unlink()
    rc = main(["run", str(DEFAULT_YAML), "--data-dir", str(root), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2 and f"calibration batch {root / data.CIFAR_FOLDER / 'data_batch_1'} not found" in err
