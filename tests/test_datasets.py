"""data.dataset beyond CIFAR-10 (issue 14, item 2): image folders, .npz files and CIFAR-100 made
here, checked against references computed in this file with plain PIL / numpy / torch; the
default CIFAR-10 path against the old functions and the raw batch files; every new error, one
line naming the file or key."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fakedata import make_fetch_layout, write_batch
from pimsim import data, datasets, simulate
from pimsim.cli import main
from pimsim.config import ConfigError, validate
from pimsim.cost import config_cost
from pimsim.data import DataError, DataNotFoundError
from pimsim.models import build_model
from pimsim.testing import restored_threads

IMNET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMNET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(autouse=True)
def _restore_threads():
    with restored_threads():
        yield


def _norm(x_nchw_float01, mean, std):
    """Reference normalization in numpy (float32, per channel)."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return (x_nchw_float01.astype(np.float32) - m) / s


def _all(ds, bs=4, limit=None):
    xs, ys = zip(*ds.test_batches(bs, limit))
    return torch.cat(xs).numpy(), np.concatenate(ys)


# --------------------------------------------------------------------------- image folders

SIZES = [(40, 30), (30, 50), (33, 33), (64, 20), (25, 41), (37, 29)]   # (w, h), both orientations


def make_imagefolder(root, classes=("cat", "dog", "eel"), per_class=2, seed=0):
    """train/ and val/ with ``per_class`` JPEGs of assorted sizes per class."""
    rng = np.random.default_rng(seed)
    k = 0
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                w, h = SIZES[k % len(SIZES)]
                k += 1
                a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"img{i}.jpg", quality=95)
    (root / "train" / classes[0] / "notes.txt").write_text("not an image, skipped")
    return root


def reference_image(path, resize, size):
    """Short side to ``resize`` (bilinear), center crop ``size``, as torchvision documents it:
    computed here with PIL for the resize and numpy slicing for the crop; float in [0, 1]."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    scale = resize / min(w, h)
    ow, oh = (resize, int(h * scale)) if w <= h else (int(w * scale), resize)
    a = np.asarray(im.resize((ow, oh), Image.BILINEAR))
    top = int(round((oh - size) / 2))
    left = int(round((ow - size) / 2))
    return a[top:top + size, left:left + size].transpose(2, 0, 1) / np.float32(255)


def folder_cfg(root, **data_keys):
    return validate({"data": {"dataset": "imagefolder", "root": str(root), "image_size": 16,
                              "resize": 20, **data_keys}})


def test_imagefolder_resize_crop_order_and_labels(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    ds = datasets.open_dataset(folder_cfg(root))
    assert ds.num_classes == 3 and ds.input_shape == (3, 16, 16) and ds.test_size == 6
    files = [(root / "val" / c / f"img{i}.jpg", lab)
             for lab, c in enumerate(("cat", "dog", "eel")) for i in range(2)]
    ref = np.stack([reference_image(p, 20, 16) for p, _ in files])
    x, y = _all(ds, bs=4)                     # 4 + 2: a partial last batch
    np.testing.assert_allclose(x, _norm(ref, IMNET_MEAN, IMNET_STD), rtol=0, atol=1e-5)
    assert y.tolist() == [lab for _, lab in files] and y.dtype == np.int64
    x3, y3 = _all(ds, bs=2, limit=3)
    np.testing.assert_allclose(x3, x[:3], rtol=0, atol=0)
    assert len(y3) == 3


def test_imagefolder_calibration_draw_and_mean_std(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class=3)
    ds = datasets.open_dataset(folder_cfg(root, mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0]))
    train = sorted((root / "train").glob("*/*.jpg"))            # class by class, file by file
    idx = np.random.default_rng(7).choice(len(train), size=5, replace=False)
    ref = np.stack([reference_image(train[i], 20, 16) for i in idx])
    got = ds.calibration(5, seed=7).numpy()
    np.testing.assert_allclose(got, _norm(ref, [0.5] * 3, [0.25, 0.5, 1.0]), rtol=0, atol=1e-5)
    d = ds.describe()
    assert d["calibration"] == str(root / "train") and d["classes"] == ["cat", "dog", "eel"]


def test_imagefolder_run_end_to_end(tmp_path):
    """pimsim run on an image folder with a 3-class resnet20 at 16x16: float top-1 equals a
    plain-torch evaluation of the same weights on the reference images; cost at 16x16."""
    root = make_imagefolder(tmp_path / "imgs")
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=3)
    ckpt = tmp_path / "r20c3.pt"
    torch.save(model.state_dict(), ckpt)
    cfg = validate({"model": {"checkpoint": str(ckpt)},
                    "data": {"dataset": "imagefolder", "root": str(root), "image_size": 16,
                             "resize": 20},
                    "quant": {"calibration": "max", "calib_images": 4, "weight_bits": 8},
                    "eval": {"backend": "fake", "threads": 1, "batch_size": 4}})
    res = simulate.run(cfg, progress=False)
    files = sorted((root / "val").glob("*/*.jpg"))
    labels = np.array([["cat", "dog", "eel"].index(p.parent.name) for p in files])
    x = torch.tensor(_norm(np.stack([reference_image(p, 20, 16) for p in files]),
                          IMNET_MEAN, IMNET_STD))
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).numpy()
    assert res["fp_top1"] == pytest.approx(float((pred == labels).mean()))
    assert res["images"] == 6 and res["dataset"]["dataset"] == "imagefolder"
    assert res["dataset"]["input_shape"] == [3, 16, 16] and res["dataset"]["num_classes"] == 3
    assert res["layers"] and res["cost"]["macs"] > 0
    # cost without reading the images: the first conv has 16 x 16 output pixels
    cost = config_cost(cfg)
    assert cost["input_shape"] == [3, 16, 16]
    assert max(l["pixels"] for l in cost["layers"]) == 16 * 16


# --------------------------------------------------------------------------- npz


def npz_cfg(path, **keys):
    return validate({"data": {"dataset": "npz", "path": str(path), **keys}})


def test_npz_nhwc_uint8(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    y = rng.integers(0, 4, size=7)
    y[0] = 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = datasets.open_dataset(npz_cfg(tmp_path / "d.npz", mean=[0.1, 0.2, 0.3],
                                       std=[0.5, 0.5, 2.0]))
    assert ds.input_shape == (3, 5, 6) and ds.num_classes == 4 and ds.test_size == 7
    got, labels = _all(ds, bs=3)
    ref = _norm(x.transpose(0, 3, 1, 2) / np.float32(255), [0.1, 0.2, 0.3], [0.5, 0.5, 2.0])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert labels.tolist() == y.tolist()
    idx = np.random.default_rng(3).choice(7, size=4, replace=False)
    np.testing.assert_allclose(ds.calibration(4, 3).numpy(), ref[idx], rtol=0, atol=1e-6)
    assert "no data.calib_path" in ds.describe()["calibration"]


def test_npz_nchw_float_and_calib_file(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 1, 4, 4)).astype(np.float32)
    xc = rng.standard_normal((9, 1, 4, 4)).astype(np.float32)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=np.array([0, 1, 1, 0, 1]))
    np.savez(tmp_path / "c.npz", x=xc)
    cfg = npz_cfg(tmp_path / "d.npz", calib_path=str(tmp_path / "c.npz"), num_classes=5)
    ds = datasets.open_dataset(cfg)
    assert ds.num_classes == 5 and ds.input_shape == (1, 4, 4)
    got, _ = _all(ds)
    np.testing.assert_array_equal(got, x)                           # mean 0, std 1: as stored
    idx = np.random.default_rng(0).choice(9, size=3, replace=False)
    np.testing.assert_array_equal(ds.calibration(3, 0).numpy(), xc[idx])
    assert ds.describe()["calibration"].endswith("c.npz (data.calib_path)")
    # the cheap spec reads the header of a compressed file
    assert datasets.input_spec(cfg) == (5, (1, 4, 4))
    assert datasets.input_spec(npz_cfg(tmp_path / "d.npz")) == (2, (1, 4, 4))


def test_npz_path_relative_to_yaml(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 3, 3), np.uint8), y=np.array([0, 1]))
    cfg = validate({"data": {"dataset": "npz", "path": "d.npz"}}, source=str(tmp_path / "c.yaml"))
    assert datasets.open_dataset(cfg).path == tmp_path / "d.npz"


# --------------------------------------------------------------------------- CIFAR-100


def make_cifar100(root, n_train=20, n_test=9):
    folder = root / data.CIFAR100_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        flat = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        fine[0] = 99
        with open(folder / split, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": split.encode(),
                         b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine],
                         b"data": flat}, f, protocol=2)
        out[split] = (flat, fine)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f, protocol=2)
    return out


def test_cifar100(tmp_path):
    raw = make_cifar100(tmp_path)
    cfg = validate({"data": {"dataset": "cifar100", "dir": str(tmp_path)}})
    ds = datasets.open_dataset(cfg)
    assert ds.num_classes == 100 and ds.input_shape == (3, 32, 32) and ds.test_size == 9
    mean, std = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]
    flat, fine = raw["test"]
    got, labels = _all(ds, bs=4)
    ref = _norm(flat.reshape(-1, 3, 32, 32) / np.float32(255), mean, std)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert labels.tolist() == fine
    tflat, _ = raw["train"]
    idx = np.random.default_rng(4).choice(20, size=6, replace=False)
    np.testing.assert_allclose(ds.calibration(6, 4).numpy(),
                               _norm(tflat.reshape(-1, 3, 32, 32)[idx] / np.float32(255), mean,
                                     std), rtol=0, atol=1e-5)
    assert data.cifar100_label_names(tmp_path)[99] == "c99"
    assert datasets.input_spec(cfg) == (100, (3, 32, 32))


def test_cifar100_refuses_code_and_bad_labels(tmp_path):
    make_cifar100(tmp_path)
    test = tmp_path / data.CIFAR100_FOLDER / "test"
    d = {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}
    test.write_bytes(pickle.dumps(d, protocol=2))
    ds = datasets.open_dataset(validate({"data": {"dataset": "cifar100", "dir": str(tmp_path)}}))
    with pytest.raises(DataError, match=r"test: labels must be 0\.\.99, found 0\.\.100"):
        ds.test_size


def test_cifar100_fetch_uses_the_cifar_site(tmp_path, monkeypatch):
    """fetch --what cifar100 downloads the CIFAR site's archive, checks its md5, extracts it."""
    calls = []

    def fake_download(url, dest, md5=None, progress=True):
        calls.append((url, md5))
        raise data.FetchError("offline")
    monkeypatch.setattr(data, "download", fake_download)
    with pytest.raises(data.FetchError):
        data.fetch(tmp_path, what=("cifar100",), progress=False)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                      "eb9058c3a382ffc7106e4002c42a8d85")]


# --------------------------------------------------------------------------- default CIFAR-10


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return make_fetch_layout(tmp_path_factory.mktemp("fetched"), n_test=30)


def test_cifar10_default_unchanged(layout):
    cfg = validate({})
    assert cfg["data.dataset"] == "cifar10"
    ds = datasets.open_dataset(cfg, layout)
    images, labels = data.load_cifar10("test", layout)
    got, y = _all(ds, bs=8)
    old = torch.cat([data.to_tensor(images[s:s + 8]) for s in range(0, 30, 8)]).numpy()
    np.testing.assert_array_equal(got, old)                        # bit for bit
    raw = pickle.loads((layout / data.CIFAR_FOLDER / "test_batch").read_bytes(), encoding="bytes")
    np.testing.assert_allclose(got, _norm(raw[b"data"].reshape(-1, 3, 32, 32) / np.float32(255),
                                          IMNET_MEAN, IMNET_STD), rtol=0, atol=1e-5)
    assert y.tolist() == raw[b"labels"] == labels.tolist()
    calib = ds.calibration(16, 3)
    np.testing.assert_array_equal(calib.numpy(),
                                  data.to_tensor(data.calibration_set(16, 3, layout)[0]).numpy())
    flat, _ = write_batch(layout / "scratch", 40, seed=11)          # = data_batch_1's images
    idx = np.random.default_rng(3).choice(40, size=16, replace=False)
    np.testing.assert_allclose(calib.numpy(), _norm(flat.reshape(-1, 3, 32, 32)[idx] / 255.0,
                                                     IMNET_MEAN, IMNET_STD), atol=1e-5)
    assert ds.describe()["calibration"].endswith("data_batch_1")


def test_cifar10_run_matches_old_evaluate(layout):
    cfg = validate({"quant": {"calibration": "max", "calib_images": 16},
                    "eval": {"backend": "fake", "threads": 1, "limit": 20}})
    res = simulate.run(cfg, data_dir=layout, progress=False)
    prep = simulate.prepare(validate({}), layout)
    images, labels = data.load_cifar10("test", layout, limit=20)
    top1, _ = simulate.evaluate(prep.net, images, labels, 500, progress=False)
    assert res["fp_top1"] == top1 and res["images"] == 20
    assert res["dataset"]["dataset"] == "cifar10" and res["cost"]["macs"] > 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("keys, match", [
    ({"dataset": "imagenet"}, r"data\.dataset: imagenet: must be one of cifar10, cifar100"),
    ({"dataset": "imagefolder"}, r"data\.dataset: imagefolder: needs data\.root"),
    ({"dataset": "npz"}, r"data\.dataset: npz: needs data\.path"),
    ({"root": "x"}, r"data\.root: x: only with data\.dataset: imagefolder"),
    ({"path": "x.npz"}, r"data\.path: x\.npz: only with data\.dataset: npz"),
    ({"calib_path": "c.npz"}, r"data\.calib_path: c\.npz: only with data\.dataset: npz"),
    ({"num_classes": 7}, r"data\.num_classes: 7: only with data\.dataset: npz"),
    ({"dataset": "imagefolder", "root": "r", "image_size": 300},
     r"data\.image_size: 300: must be <= data\.resize \(256\)"),
    ({"mean": [0.5, 0.5]}, r"data\.mean: \[0\.5, 0\.5\]: must have 3 values"),
    ({"std": [0.5, 0.0, 0.5]}, r"data\.std: .*positive numbers"),
    ({"std": 0.5}, r"data\.std: 0\.5: must be a list of positive numbers"),
    ({"mean": ["a", 1, 2]}, r"data\.mean: .*must be a list of numbers"),
    ({"image_size": 0}, r"data\.image_size: 0: must be in 1\.\.4096"),
])
def test_config_errors(keys, match):
    with pytest.raises(ConfigError, match=match):
        validate({"data": keys}, source="c.yaml")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"c\.yaml: data\.root: nowhere: folder not found; "
                                                r"looked in .*errors0/nowhere, "):
        datasets.open_dataset(validate({"data": {"dataset": "imagefolder", "root": "nowhere"}},
                                       source=str(tmp_path / "c.yaml")))
    (tmp_path / "a").mkdir()
    with pytest.raises(DataNotFoundError, match=r"a: has no train/ folder"):
        datasets.open_dataset(folder_cfg(tmp_path / "a"))
    (tmp_path / "a" / "train" / "x").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "train" / "x" / "0.png")
    with pytest.raises(DataNotFoundError, match=r"a: has no val/ folder"):
        datasets.open_dataset(folder_cfg(tmp_path / "a"))
    (tmp_path / "a" / "val").mkdir()
    with pytest.raises(DataError, match=r"val: no class folders"):
        datasets.open_dataset(folder_cfg(tmp_path / "a"))
    (tmp_path / "a" / "val" / "y").mkdir()
    with pytest.raises(DataError, match=r"different class folders \(only in train: x; only in "
                                        r"val: y\)"):
        datasets.open_dataset(folder_cfg(tmp_path / "a"))
    (tmp_path / "a" / "val" / "y").rename(tmp_path / "a" / "val" / "x")
    with pytest.raises(DataError, match=r"val/x: empty class folder"):
        datasets.open_dataset(folder_cfg(tmp_path / "a"))
    bad = tmp_path / "a" / "val" / "x" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    ds = datasets.open_dataset(folder_cfg(tmp_path / "a"))
    with pytest.raises(DataError, match=r"broken\.jpg: unreadable image"):
        _all(ds)
    with pytest.raises(DataError, match=r"train: holds 1 images; .*quant\.calib_images.* got 2"):
        ds.calibration(2, 0)


def _npz(tmp_path, name="d.npz", **arrays):
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


@pytest.mark.parametrize("arrays, keys, match", [
    ({"y": np.zeros(2, int)}, {}, r"d\.npz: no array 'x' in this \.npz \(arrays: y\)"),
    ({"x": np.zeros((2, 3, 3, 3), np.uint8)}, {}, r"d\.npz: no array 'y'"),
    ({"x": np.zeros((2, 9), np.uint8), "y": np.zeros(2, int)}, {}, r"x has shape \(2, 9\): must be 4-D"),
    ({"x": np.zeros((2, 3, 3, 3), np.int32), "y": np.zeros(2, int)}, {}, r"x has dtype int32"),
    ({"x": np.zeros((2, 3, 3, 3), np.uint8), "y": np.zeros(3, int)}, {}, r"3 labels in y for 2 images"),
    ({"x": np.zeros((2, 3, 3, 3), np.uint8), "y": np.array([0.5, 1.0])}, {}, r"y has .*dtype float64: must be a 1-D integer"),
    ({"x": np.zeros((2, 3, 3, 3), np.uint8), "y": np.array([0, -1])}, {}, r"y holds label -1: labels must be >= 0"),
    ({"x": np.zeros((2, 3, 3, 3), np.uint8), "y": np.array([0, 4])}, {"num_classes": 4},
     r"y holds label 4: out of range for data\.num_classes 4"),
    ({"x": np.zeros((2, 3, 3, 1), np.uint8), "y": np.array([0, 1])}, {"mean": [0.5, 0.5, 0.5]},
     r"data\.mean: \[0\.5, 0\.5, 0\.5\]: 3 value\(s\) for the 1-channel images of .*d\.npz; give 1"),
])
def test_npz_errors(tmp_path, arrays, keys, match):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=match):
        datasets.open_dataset(npz_cfg(path, **keys))


def test_npz_file_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"data\.path: .*missing\.npz: file not found"):
        datasets.open_dataset(npz_cfg(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        datasets.open_dataset(npz_cfg(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        datasets.input_spec(npz_cfg(tmp_path / "junk.npz"))
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(DataError, match=r"single\.npz: a single array, not an \.npz"):
        datasets.open_dataset(npz_cfg(tmp_path / "single.npz"))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DataError, match=r"obj\.npz: not a readable \.npz"):
        datasets.open_dataset(npz_cfg(tmp_path / "obj.npz"))
    good = _npz(tmp_path, x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, 1]))
    _npz(tmp_path, "c.npz", x=np.zeros((5, 3, 4, 4), np.float32))
    ds = datasets.open_dataset(npz_cfg(good, calib_path=str(tmp_path / "c.npz")))
    with pytest.raises(DataError, match=r"c\.npz: x is float32 \(5, 3, 4, 4\): calibration "
                                        r"images must be uint8"):
        ds.calibration(2, 0)
    _npz(tmp_path, "c2.npz", y=np.zeros(5, int))
    ds = datasets.open_dataset(npz_cfg(good, calib_path=str(tmp_path / "c2.npz")))
    with pytest.raises(DataError, match=r"c2\.npz: no array 'x'.*data\.calib_path needs x"):
        ds.calibration(2, 0)
    with pytest.raises(DataError, match=r"d\.npz: holds 2 images; .* got 3"):
        datasets.open_dataset(npz_cfg(good)).calibration(3, 0)


def test_cli_one_line_errors(tmp_path, capsys):
    """A data error through pimsim run / pimsim cost: exit 2, one line naming the file."""
    (tmp_path / "r" / "train").mkdir(parents=True)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  dataset: imagefolder\n  root: r\n")
    for argv in (["run", str(yaml_file), "-q"], ["cost", str(yaml_file)]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "train: no class folders" in lines[0], lines
    yaml_file.write_text("data:\n  dataset: npz\n  path: none.npz\n")
    assert main(["cost", str(yaml_file)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "data.path: none.npz: file not found" in lines[0], lines


def test_reorder_traces_with_the_data_shape(tmp_path, monkeypatch):
    """reorder.method random on an image folder: the permutation groups are found with an
    input of the data's shape (1 x 3 x 12 x 12), not CIFAR's 32 x 32."""
    import pimsim.reorder as reorder
    root = make_imagefolder(tmp_path / "imgs", per_class=1)
    torch.manual_seed(1)
    ckpt = tmp_path / "r20c3.pt"
    torch.save(build_model("resnet20", num_classes=3).state_dict(), ckpt)
    seen = []
    real = reorder.find_groups

    def spy(net, example=None):
        seen.append(None if example is None else tuple(example.shape))
        return real(net, example)
    monkeypatch.setattr(reorder, "find_groups", spy)
    cfg = validate({"model": {"checkpoint": str(ckpt)}, "reorder": {"method": "random"},
                    "data": {"dataset": "imagefolder", "root": str(root), "image_size": 12,
                             "resize": 14},
                    "quant": {"calibration": "max", "calib_images": 2},
                    "eval": {"backend": "fake", "threads": 1}})
    res = simulate.run(cfg, progress=False)
    assert seen == [(1, 3, 12, 12)]
    assert res["reorder"]["method"] == "random" and res["images"] == 3
