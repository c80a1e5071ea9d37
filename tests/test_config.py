"""Tests of pimsim.config: schema defaults, the shipped hwconfigs, error messages and --set."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pimsim import config
from pimsim.config import Config, ConfigError, defaults, load, parse_override, resolve_checkpoint, validate
from pimsim.quant import Granularity

ROOT = Path(__file__).resolve().parents[1]
HWCONFIGS = sorted((ROOT / "hwconfigs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load_error(tmp_path, text, name="bad-config.yaml", overrides=()) -> tuple[str, Path]:
    p = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as e:
        load(p, overrides)
    return str(e.value), p


# --------------------------------------------------------------------------------------------
# Defaults and shipped configs
# --------------------------------------------------------------------------------------------

def test_defaults_validate():
    d = defaults()
    cfg = validate(d, "<defaults>")
    assert cfg.data == d
    assert validate({}).data == d
    assert validate(None).data == d
    assert cfg["model.name"] == "resnet20"
    assert cfg["quant.weight_bits"] == 4 and cfg["quant.act_bits"] == 8
    assert cfg["quant.tile"] == "channelwise"
    assert cfg.granularity == Granularity.channelwise()


def test_defaults_are_independent_copies():
    a = defaults()
    a["quant"]["float_layers"] = ["x"]
    assert defaults()["quant"]["float_layers"] == "auto"


def test_empty_sections_are_allowed(tmp_path):
    cfg = load(write(tmp_path, "model:\nquant:\n"))
    assert cfg.data == defaults()


@pytest.mark.parametrize("path", HWCONFIGS, ids=lambda p: p.name)
def test_hwconfig_loads(path):
    cfg = load(path)
    assert isinstance(cfg, Config)
    assert cfg.source == str(path)
    assert isinstance(cfg.granularity, Granularity)
    # every key of the file survives into the resolved config
    raw = yaml.safe_load(path.read_text())
    for sec, body in raw.items():
        for k, v in (body or {}).items():
            assert cfg[f"{sec}.{k}"] == v


def test_hwconfigs_exist():
    names = {p.name for p in HWCONFIGS}
    assert {"default.yaml", "channelwise.yaml"} <= names


def test_default_yaml_is_schema_defaults_plus_tile():
    cfg = load(ROOT / "hwconfigs" / "default.yaml")
    want = defaults()
    want["quant"]["tile"] = [128, 128]
    assert cfg.data == want


@pytest.mark.parametrize("path", HWCONFIGS, ids=lambda p: p.name)
def test_hwconfig_checkpoint_resolves(path):
    from pimsim.data import DataNotFoundError, find_data_dir
    try:
        ddir = find_data_dir()
    except DataNotFoundError:
        pytest.skip("CIFAR-10 data / checkpoints not found")
    cfg = load(path)
    p = resolve_checkpoint(cfg, ddir)
    assert p.is_file() and p.is_absolute()


# --------------------------------------------------------------------------------------------
# Errors: file name, dotted key and offending value in every message
# --------------------------------------------------------------------------------------------

def test_unknown_section(tmp_path):
    msg, p = load_error(tmp_path, "hardware:\n  rows: 128\n")
    assert p.name in msg and "hardware" in msg
    assert "quant" in msg                                    # lists the allowed sections


def test_unknown_key(tmp_path):
    msg, p = load_error(tmp_path, "quant:\n  weigth_bits: 4\n")
    assert p.name in msg and "quant.weigth_bits" in msg and "4" in msg
    assert "weight_bits" in msg.replace("weigth_bits", "")   # lists the allowed keys


@pytest.mark.parametrize("text, key, shown", [
    ('quant:\n  weight_bits: "4"\n', "quant.weight_bits", "'4'"),
    ('quant:\n  act_bits: "8"\n', "quant.act_bits", "'8'"),
    ("quant:\n  weight_bits: true\n", "quant.weight_bits", "true"),
    ("quant:\n  weight_bits: 4.0\n", "quant.weight_bits", "4.0"),
    ("quant:\n  tile: big\n", "quant.tile", "big"),
    ("quant:\n  tile: [16]\n", "quant.tile", "[16]"),
    ("quant:\n  tile: [16, 36, 1]\n", "quant.tile", "[16, 36, 1]"),
    ("quant:\n  tile: [16, x]\n", "quant.tile", "[16, x]"),
    ("quant:\n  tile: [1.5, 36]\n", "quant.tile", "[1.5, 36]"),
    ("quant:\n  calib_images: 1.5\n", "quant.calib_images", "1.5"),
    ("quant:\n  calibration: ptq\n", "quant.calibration", "ptq"),
    ("quant:\n  float_layers: first\n", "quant.float_layers", "first"),
    ("eval:\n  backend: gpu\n", "eval.backend", "gpu"),
    ("eval:\n  batch_size: many\n", "eval.batch_size", "many"),
    ("model:\n  name: 20\n", "model.name", "20"),
    ("quant: [1, 2]\n", "quant", "[1, 2]"),
], ids=lambda v: v if isinstance(v, str) and "\n" not in v else None)
def test_wrong_type(tmp_path, text, key, shown):
    msg, p = load_error(tmp_path, text)
    assert p.name in msg, msg
    assert key in msg, msg
    assert shown in msg, msg


@pytest.mark.parametrize("text, key, shown", [
    ("quant:\n  weight_bits: 0\n", "quant.weight_bits", "0"),
    ("quant:\n  weight_bits: 1\n", "quant.weight_bits", "1"),
    ("quant:\n  weight_bits: 17\n", "quant.weight_bits", "17"),
    ("quant:\n  act_bits: -8\n", "quant.act_bits", "-8"),
    ("quant:\n  tile: [0, 4]\n", "quant.tile", "[0, 4]"),
    ("quant:\n  tile: [4, 0]\n", "quant.tile", "[4, 0]"),
    ("quant:\n  tile: [-1, 4]\n", "quant.tile", "[-1, 4]"),
    ("quant:\n  tile: [0, null]\n  splits: 2\n", "quant.tile", "[0, null]"),
    ("quant:\n  tile: [4, null]\n  splits: 0\n", "quant.splits", "0"),
    ("quant:\n  calib_images: 0\n", "quant.calib_images", "0"),
    ("quant:\n  calib_images: 20000\n", "quant.calib_images", "20000"),
    ("quant:\n  seed: -1\n", "quant.seed", "-1"),
    ("eval:\n  batch_size: 0\n", "eval.batch_size", "0"),
    ("eval:\n  limit: 0\n", "eval.limit", "0"),
    ("eval:\n  threads: -2\n", "eval.threads", "-2"),
], ids=lambda v: v if isinstance(v, str) and "\n" not in v else None)
def test_impossible_values(tmp_path, text, key, shown):
    msg, p = load_error(tmp_path, text)
    assert p.name in msg and key in msg and shown in msg, msg


def test_bits_error_says_allowed_range(tmp_path):
    msg, _ = load_error(tmp_path, "quant:\n  weight_bits: 17\n")
    assert "2..16" in msg


def test_r_null_without_splits(tmp_path):
    msg, p = load_error(tmp_path, "quant:\n  tile: [4, null]\n")
    assert p.name in msg and "quant.tile" in msg and "[4, null]" in msg
    assert "splits" in msg


def test_splits_without_r_null(tmp_path):
    for tile in ("[4, 36]", "channelwise", "layerwise"):
        msg, p = load_error(tmp_path, f"quant:\n  tile: {tile}\n  splits: 4\n")
        assert p.name in msg and "quant.splits" in msg and "4" in msg, msg


def test_unknown_model_name(tmp_path):
    msg, p = load_error(tmp_path, "model:\n  name: vgg16\n")
    assert p.name in msg and "model.name" in msg and "vgg16" in msg
    assert "resnet20" in msg                                  # lists the allowed models


def test_missing_checkpoint_file(tmp_path):
    p = write(tmp_path, "model:\n  checkpoint: no-such-ckpt.th\n", "ckpt-config.yaml")
    cfg = load(p)
    with pytest.raises(ConfigError) as e:
        resolve_checkpoint(cfg, tmp_path / "data")
    msg = str(e.value)
    assert p.name in msg and "model.checkpoint" in msg and "no-such-ckpt.th" in msg
    assert str(tmp_path) in msg                               # says where it looked


def test_missing_absolute_checkpoint(tmp_path):
    ck = tmp_path / "gone" / "x.th"
    p = write(tmp_path, f"model:\n  checkpoint: {ck}\n")
    with pytest.raises(ConfigError) as e:
        resolve_checkpoint(load(p), None)
    assert p.name in str(e.value) and "model.checkpoint" in str(e.value) and "x.th" in str(e.value)


def test_checkpoint_beside_yaml_and_in_data_dir(tmp_path):
    (tmp_path / "a.th").write_bytes(b"x")
    p = write(tmp_path, "model:\n  checkpoint: a.th\n")
    assert resolve_checkpoint(load(p), None) == tmp_path / "a.th"
    ddir = tmp_path / "data"
    (ddir / "models").mkdir(parents=True)
    (ddir / "models" / "b.th").write_bytes(b"y")
    sub = tmp_path / "sub"
    sub.mkdir()
    p2 = write(sub, "model:\n  checkpoint: b.th\n")
    assert resolve_checkpoint(load(p2), ddir) == ddir / "models" / "b.th"
    # the zoo default, found in <data dir>/models/
    (ddir / "models" / "resnet20-cifar10jpg.th").write_bytes(b"z")
    assert resolve_checkpoint(load(write(sub, "model:\n  name: resnet20\n", "d.yaml")), ddir) \
        == ddir / "models" / "resnet20-cifar10jpg.th"


def test_model_without_default_checkpoint(tmp_path):
    p = write(tmp_path, "model:\n  name: resnet110\n")
    with pytest.raises(ConfigError) as e:
        resolve_checkpoint(load(p), tmp_path)
    assert p.name in str(e.value) and "model.checkpoint" in str(e.value) and "resnet110" in str(e.value)


def test_top_level_not_a_mapping(tmp_path):
    msg, p = load_error(tmp_path, "- 1\n- 2\n")
    assert p.name in msg


def test_invalid_yaml_file(tmp_path):
    msg, p = load_error(tmp_path, "quant: [1, 2\n")
    assert p.name in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load(tmp_path / "nope.yaml")


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------------------------
# --set overrides
# --------------------------------------------------------------------------------------------

def test_parse_override_values():
    assert parse_override("quant.tile=[16, 36]") == ("quant.tile", [16, 36])
    k, v = parse_override("quant.weight_bits=3")
    assert (k, v) == ("quant.weight_bits", 3) and type(v) is int
    assert parse_override("quant.tile=channelwise") == ("quant.tile", "channelwise")
    assert parse_override("quant.tile=[4, null]") == ("quant.tile", [4, None])
    assert parse_override("eval.limit=null") == ("eval.limit", None)
    assert parse_override("quant.float_layers=[conv1, linear]") == ("quant.float_layers",
                                                                    ["conv1", "linear"])
    assert parse_override(" quant.seed =7") == ("quant.seed", 7)
    assert parse_override("data.dir=a=b") == ("data.dir", "a=b")     # split at the first '='


@pytest.mark.parametrize("text", ["quant.tile=[16, 36", "quant.tile={a: [1}", "quant.tile=: :"])
def test_parse_override_bad_yaml(text):
    with pytest.raises(ConfigError) as e:
        parse_override(text)
    assert "quant.tile" in str(e.value)


def test_parse_override_without_equals():
    with pytest.raises(ConfigError, match="quant.tile"):
        parse_override("quant.tile")


def test_overrides_win_over_file(tmp_path):
    p = write(tmp_path, "quant:\n  weight_bits: 2\n  tile: [8, 8]\n")
    cfg = load(p, ["quant.weight_bits=3", "quant.tile=[16, 36]"])
    assert cfg["quant.weight_bits"] == 3
    assert cfg["quant.tile"] == [16, 36]
    assert cfg.granularity == Granularity.tile(16, 36)
    # later overrides win over earlier ones
    assert load(p, ["quant.weight_bits=3", "quant.weight_bits=5"])["quant.weight_bits"] == 5
    # an override can satisfy a cross-field rule the file alone breaks
    p2 = write(tmp_path, "quant:\n  tile: [4, null]\n", "m2.yaml")
    assert load(p2, ["quant.splits=4"]).granularity == Granularity.split(4, 4)


@pytest.mark.parametrize("override, key, shown", [
    ("quant.weight_bits=99", "quant.weight_bits", "99"),
    ("quant.nope=1", "quant.nope", "1"),
    ("hw.rows=128", "hw.rows", "128"),
    ("quant.tile=big", "quant.tile", "big"),
])
def test_bad_override_message(tmp_path, override, key, shown):
    p = write(tmp_path, "quant:\n  weight_bits: 4\n")
    with pytest.raises(ConfigError) as e:
        load(p, [override])
    msg = str(e.value)
    assert key in msg and shown in msg and "--set" in msg, msg


def test_validate_with_overrides_directly():
    cfg = validate({"quant": {"weight_bits": 2}}, "x.yaml", [("quant.weight_bits", 6)])
    assert cfg["quant.weight_bits"] == 6


# --------------------------------------------------------------------------------------------
# Config.granularity
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant, want", [
    ({"tile": "channelwise"}, Granularity.channelwise()),
    ({"tile": "layerwise"}, Granularity.layerwise()),
    ({"tile": [16, 36]}, Granularity.tile(16, 36)),
    ({"tile": [1, 576]}, Granularity.tile(1, 576)),
    ({"tile": [4, None], "splits": 4}, Granularity.split(4, 4)),
    ({"tile": [2, None], "splits": 16}, Granularity.split(2, 16)),
], ids=str)
def test_granularity(quant, want):
    cfg = validate({"quant": quant})
    g = cfg.granularity
    assert g == want
    # and the resolved grid of a ResNet-20 3x3 conv (O=32, K=288) is what the form says
    grid = g.resolve(32, 288)
    if want.kind == "channelwise":
        assert (grid.r, grid.c) == (1, 288)
    elif want.kind == "layerwise":
        assert (grid.r, grid.c) == (32, 288)
    elif want.kind == "tile":
        assert (grid.r, grid.c) == (min(want.r, 32), min(want.c, 288))
    else:
        assert (grid.r, grid.c) == (want.r, -(-288 // want.m))


def test_to_dict_is_a_copy():
    cfg = validate({})
    d = cfg.to_dict()
    d["quant"]["weight_bits"] = 7
    assert cfg["quant.weight_bits"] == 4


def test_schema_defaults_pass_their_own_checks():
    for sec, keys in config.SCHEMA.items():
        for k, key in keys.items():
            assert key.check(key.default) is None, f"{sec}.{k}"
            assert key.doc
