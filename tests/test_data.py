"""Tests for pimsim.data: batch loading, data-dir search, archive extraction, calibration sampling."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from pimsim import data


def _write_batch(path, n=6, bytes_keys=False, seed=0):
    """Write a small CIFAR-style batch pickle; return its (flat data, labels)."""
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    keys = (b"data", b"labels") if bytes_keys else ("data", "labels")
    with open(path, "wb") as f:
        pickle.dump({keys[0]: flat, keys[1]: labels}, f)
    return flat, labels


def _make_cifar_root(root, n_train=20, n_test=6):
    """Create ``root/cifar-10-batches-py`` with a train batch, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    _write_batch(folder / "data_batch_1", n=n_train, seed=1)
    _write_batch(folder / "test_batch", n=n_test, seed=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile"]}, f)
    return root


@pytest.fixture
def no_env(monkeypatch):
    """Remove $PIMSIM_DATA so the search order is predictable."""
    monkeypatch.delenv("PIMSIM_DATA", raising=False)


# --------------------------------------------------------------------------- load_batch


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_load_batch_key_styles(tmp_path, bytes_keys):
    flat, labels = _write_batch(tmp_path / "b", bytes_keys=bytes_keys)
    images, lab = data.load_batch(tmp_path / "b")
    assert images.dtype == np.uint8 and images.shape == (6, 3, 32, 32)
    assert lab.dtype == np.int64 and lab.tolist() == labels
    # R, G, B planes of 32x32, row-major
    assert images[0, 0, 0, 1] == flat[0, 1]
    assert images[0, 1, 0, 0] == flat[0, 1024]
    assert images[0, 2, 31, 31] == flat[0, 3071]
    assert images[0, 0, 1, 0] == flat[0, 32]


def test_load_batch_missing_key(tmp_path):
    path = tmp_path / "bad"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match=r"bad.*'labels'"):
        data.load_batch(path)


def test_load_batch_not_a_pickle(tmp_path):
    path = tmp_path / "garbage"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="garbage"):
        data.load_batch(path)


def test_load_batch_wrong_shape(tmp_path):
    path = tmp_path / "short"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="short.*3072"):
        data.load_batch(path)


# --------------------------------------------------------------------------- find_data_dir


def test_candidate_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PIMSIM_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cands = data.candidate_data_dirs(tmp_path / "explicit")
    paths = [p for _, p in cands]
    assert paths[0] == tmp_path / "explicit"
    assert paths[1] == tmp_path / "env"
    assert paths[2].parts[-2:] == ("shared", "data")
    assert paths[3] == tmp_path / "home" / ".cache" / "pimsim"
    assert all(label for label, _ in cands)


def test_candidate_without_explicit_or_env(no_env):
    labels = [label for label, _ in data.candidate_data_dirs()]
    assert len(labels) == 2 and "PIMSIM_DATA" not in " ".join(labels)


def test_find_prefers_env_over_home(tmp_path, monkeypatch):
    env_root = _make_cifar_root(tmp_path / "env")
    _make_cifar_root(tmp_path / "home" / ".cache" / "pimsim")
    monkeypatch.setenv("PIMSIM_DATA", str(env_root))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.find_data_dir() == env_root


def test_find_skips_candidates_without_data(tmp_path, monkeypatch):
    home_root = _make_cifar_root(tmp_path / "home" / ".cache" / "pimsim")
    cands = [("$PIMSIM_DATA", tmp_path / "empty"), ("user cache", home_root)]
    monkeypatch.setattr(data, "candidate_data_dirs", lambda explicit=None: cands)
    assert data.find_data_dir() == home_root


def test_find_explicit(tmp_path, no_env):
    root = _make_cifar_root(tmp_path / "mine")
    assert data.find_data_dir(root) == root


def test_find_explicit_without_data_is_an_error(tmp_path, monkeypatch):
    """An explicit folder without data must not fall through to $PIMSIM_DATA."""
    monkeypatch.setenv("PIMSIM_DATA", str(_make_cifar_root(tmp_path / "env")))
    with pytest.raises(data.DataNotFoundError, match="wrong"):
        data.find_data_dir(tmp_path / "wrong")


def test_find_nothing_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv("PIMSIM_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cands = [("$PIMSIM_DATA", tmp_path / "env"), ("user cache", tmp_path / "home" / ".cache" / "pimsim")]
    monkeypatch.setattr(data, "candidate_data_dirs", lambda explicit=None: cands)
    with pytest.raises(data.DataNotFoundError) as exc:
        data.find_data_dir()
    msg = str(exc.value)
    for label, path in cands:
        assert label in msg and str(path) in msg
    assert "pimsim fetch --dest ~/.cache/pimsim" in msg and "PIMSIM_DATA" in msg
    assert isinstance(exc.value, FileNotFoundError)


# --------------------------------------------------------------------------- load_cifar10 etc. on fake data


def test_load_cifar10_splits_and_limit(tmp_path, no_env):
    root = _make_cifar_root(tmp_path)
    images, labels = data.load_cifar10("train", root)
    assert images.shape == (20, 3, 32, 32) and labels.shape == (20,)
    images, labels = data.load_cifar10("test", root, limit=4)
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    with pytest.raises(ValueError, match="split"):
        data.load_cifar10("val", root)


def test_load_cifar10_is_cached(tmp_path, no_env):
    root = _make_cifar_root(tmp_path)
    a, _ = data.load_cifar10("test", root)
    b, _ = data.load_cifar10("test", root)
    assert a is b and not a.flags.writeable


def test_label_names_bytes(tmp_path, no_env):
    assert data.label_names(_make_cifar_root(tmp_path)) == ["airplane", "automobile"]


def test_to_tensor_normalizes():
    images = np.zeros((2, 3, 32, 32), np.uint8)
    images[:, :, 0, 0] = 255
    x = data.to_tensor(images)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)
    for c in range(3):
        assert x[0, c, 1, 1].item() == pytest.approx(-data.MEAN[c] / data.STD[c], rel=1e-6)
        assert x[0, c, 0, 0].item() == pytest.approx((1 - data.MEAN[c]) / data.STD[c], rel=1e-6)


def test_calibration_set_determinism(tmp_path, no_env):
    root = _make_cifar_root(tmp_path)
    a_img, a_lab = data.calibration_set(8, seed=3, data_dir=root)
    b_img, b_lab = data.calibration_set(8, seed=3, data_dir=root)
    c_img, _ = data.calibration_set(8, seed=4, data_dir=root)
    assert a_img.shape == (8, 3, 32, 32)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    # drawn without replacement: all 20 distinct images when n equals the whole set
    all_img, _ = data.calibration_set(20, seed=0, data_dir=root)
    assert len({im.tobytes() for im in all_img}) == 20


def test_calibration_set_too_large(tmp_path, no_env):
    with pytest.raises(ValueError, match="1..20"):
        data.calibration_set(21, seed=0, data_dir=_make_cifar_root(tmp_path))


# --------------------------------------------------------------------------- archives


def _tar(path, members):
    """Write a tar.gz with {name: bytes} regular-file members."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_extract_cifar_archive(tmp_path):
    archive = _tar(tmp_path / "c.tar.gz", {"cifar-10-batches-py/test_batch": b"abc", "cifar-10-batches-py/batches.meta": b"m"})
    out = data.extract_cifar_archive(archive, tmp_path / "dest", md5=data.md5sum(archive))
    assert out == tmp_path / "dest" / "cifar-10-batches-py"
    assert (out / "test_batch").read_bytes() == b"abc"


def test_extract_wrong_md5(tmp_path):
    archive = _tar(tmp_path / "c.tar.gz", {"cifar-10-batches-py/test_batch": b"abc"})
    with pytest.raises(ValueError, match="expected 0+, got [0-9a-f]{32}"):
        data.extract_cifar_archive(archive, tmp_path / "dest", md5="0" * 32)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("name", ["cifar-10-batches-py/../../evil", "/tmp/evil"])
def test_extract_refuses_traversal(tmp_path, name):
    archive = _tar(tmp_path / "c.tar.gz", {"cifar-10-batches-py/test_batch": b"abc", name: b"x"})
    with pytest.raises(ValueError, match="unsafe"):
        data.extract_cifar_archive(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_extract_refuses_symlink(tmp_path):
    archive = tmp_path / "c.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="not a regular file"):
        data.extract_cifar_archive(archive, tmp_path / "dest")


def test_extract_requires_cifar_folder(tmp_path):
    archive = _tar(tmp_path / "c.tar.gz", {"other/test_batch": b"abc"})
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        data.extract_cifar_archive(archive, tmp_path / "dest")


def test_download_file_url(tmp_path):
    """download() via a file:// URL (no network): md5 checked, no .part left behind."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    out = data.download(src.as_uri(), tmp_path / "out" / "f.bin", md5=data.md5sum(src), progress=False)
    assert out.read_bytes() == src.read_bytes()
    assert not (tmp_path / "out" / "f.bin.part").exists()
    with pytest.raises(ValueError, match="md5 mismatch"):
        data.download(src.as_uri(), tmp_path / "out" / "g.bin", md5="0" * 32, progress=False)
    assert list((tmp_path / "out").iterdir()) == [out]
    with pytest.raises(RuntimeError, match="download of .* failed"):
        data.download((tmp_path / "absent").as_uri(), tmp_path / "out" / "h.bin", progress=False)


def test_fetch_skips_present_files(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(b"")
    (tmp_path / "models").mkdir()
    for name in data.CHECKPOINT_URLS:
        (tmp_path / "models" / name).write_bytes(b"")

    def no_download(*args, **kwargs):
        raise AssertionError("fetch must not download files already present")

    monkeypatch.setattr(data, "download", no_download)
    assert data.fetch(tmp_path, progress=False) == {"cifar10": folder, "models": tmp_path / "models"}


def test_fetch_rejects_unknown_item(tmp_path):
    with pytest.raises(ValueError, match="imagenet"):
        data.fetch(tmp_path, what=("imagenet",))


def test_checkpoint_urls():
    assert set(data.CHECKPOINT_URLS) == {
        "resnet20-12fca82f.th",
        "resnet32-d509ac18.th",
        "resnet44-014dd654.th",
        "resnet56-4bfd9763.th",
        "resnet110-1d1ed7c2.th",
    }
    for name, url in data.CHECKPOINT_URLS.items():
        assert url == f"https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{name}"


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_data_dir():
    """The real CIFAR-10 folder, or skip."""
    try:
        return data.find_data_dir()
    except data.DataNotFoundError as e:
        pytest.skip(f"CIFAR-10 not found: {e}")


def test_real_test_batch(real_data_dir):
    images, labels = data.load_cifar10("test", real_data_dir)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.min() == 0 and labels.max() == 9
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_real_label_names(real_data_dir):
    names = data.label_names(real_data_dir)
    assert len(names) == 10 and names[0] == "airplane" and names[-1] == "truck"


def test_real_calibration_set(real_data_dir):
    images, labels = data.calibration_set(256, seed=0, data_dir=real_data_dir)
    again, _ = data.calibration_set(256, seed=0, data_dir=real_data_dir)
    assert images.shape == (256, 3, 32, 32) and labels.shape == (256,)
    np.testing.assert_array_equal(images, again)
