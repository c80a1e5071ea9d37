"""One definition per configuration section (issue 13, item 5).

1. README's "Configuration (YAML)" tables (every table with a ``key`` and a ``default`` column)
   list exactly the keys of ``pimsim.config.SCHEMA`` (sub-keys of a mapping key such as
   ``quant.search.alpha`` one by one) with the same defaults, value and YAML type. The checker
   is first shown to catch a missing row, an extra row, a changed default, a default of another
   type and a repeated row on doctored copies of README.
2. The code uses the same definitions: ``Crossbar()``, ``CostParams()``, ``evolve``'s keyword
   defaults and ``ptqsl.DEFAULTS`` equal the schema's defaults; ``config.defaults()`` is the
   schema; config.py assigns nothing into ``SCHEMA`` after building it (read with ``ast``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml

import pimsim.config as config
from pimsim import ptqsl, schema
from pimsim.cost import COST_KEYS, CostParams
from pimsim.crossbar import INT_FIELDS, Crossbar
from pimsim.reorder import DEFAULTS as REORDER_DEFAULTS
from pimsim.reorder import ReorderParams, evolve

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Configuration (YAML)"


# --------------------------------------------------------------------------- README parsing

def config_section(text: str) -> str:
    """The text of README's configuration section (up to the next ``## `` heading)."""
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    return text[start:] if nxt < 0 else text[start:nxt]


def _cells(line: str) -> list[str]:
    """The cells of a table row; ``\\|`` is a literal pipe (GitHub tables), not a separator."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def readme_rows(text: str) -> tuple[list[tuple[str, object]], list[str]]:
    """``[(dotted key, default)]`` of every table row of the configuration section whose table
    has a ``key`` and a ``default`` column, and the problems met while reading them (a cell
    that is not one backticked key / YAML value). Tables without those columns are skipped."""
    rows, problems = [], []
    lines = config_section(text).splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not (line.startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip())):
            i += 1
            continue
        header = [h.lower() for h in _cells(line)]
        i += 2
        body = []
        while i < len(lines) and lines[i].startswith("|"):
            body.append(lines[i])
            i += 1
        if "key" not in header or "default" not in header:
            continue
        ki, di = header.index("key"), header.index("default")
        for row in body:
            cells = _cells(row)
            if len(cells) != len(header):
                problems.append(f"row with {len(cells)} cells, header has {len(header)}: {row}")
                continue
            key = re.fullmatch(r"`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)`", cells[ki])
            default = re.fullmatch(r"`([^`]*)`", cells[di])
            if key is None:
                problems.append(f"key cell is not one `dotted.key`: {cells[ki]!r}")
                continue
            if default is None:
                problems.append(f"{key[1]}: default cell is not one `value`: {cells[di]!r}")
                continue
            try:
                value = yaml.safe_load(default[1])
            except yaml.YAMLError:
                problems.append(f"{key[1]}: default {default[1]!r} is not YAML")
                continue
            rows.append((key[1], value))
    return rows, problems


def schema_defaults(sch=None) -> dict[str, object]:
    """``{dotted key: default}`` of a schema; a mapping default is listed by its sub-keys (an
    empty one, e.g. ``model.kwargs: {}``, as itself)."""
    out = {}
    for sec, keys in (sch or config.SCHEMA).items():
        for k, key in keys.items():
            if isinstance(key.default, dict) and key.default:
                for sub, v in key.default.items():
                    out[f"{sec}.{k}.{sub}"] = v
            else:
                out[f"{sec}.{k}"] = key.default
    return out


def drift(text: str, sch=None) -> list[str]:
    """Every difference between README's configuration tables and the schema."""
    rows, problems = readme_rows(text)
    want = schema_defaults(sch)
    seen = {}
    for key, value in rows:
        if key in seen:
            problems.append(f"{key}: listed twice")
        seen[key] = value
    for key in want.keys() - seen.keys():
        problems.append(f"{key}: in the schema, missing from README")
    for key in seen.keys() - want.keys():
        problems.append(f"{key}: in README, not in the schema")
    for key in want.keys() & seen.keys():
        a, b = seen[key], want[key]
        if type(a) is not type(b) or a != b:
            problems.append(f"{key}: README default {a!r} ({type(a).__name__}), schema "
                            f"{b!r} ({type(b).__name__})")
    return sorted(problems)


# --------------------------------------------------------------------------- the checker itself

@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


def _edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_parser_reads_every_config_table(readme):
    rows, problems = readme_rows(readme)
    assert problems == []
    keys = [k for k, _ in rows]
    # one row from each of the three tables, read with its YAML type
    assert ("model.name", "resnet20") in rows and ("data.dir", None) in rows
    assert ("quant.search.beta", 1.2) in rows and ("crossbar.adc_bits", 0) in rows
    assert ("cost.overlap_digital", False) in rows and ("cost.cycle_ns", 100.0) in rows
    assert len(keys) > 40
    # the presets table (no key / default columns) and the other sections are not read
    assert not any(k.startswith(("isaac", "prime")) for k in keys)
    assert "## Results" not in config_section(readme)


def test_drift_finds_a_missing_row(readme):
    text = _edit(readme, "| `reorder.swaps` | `2` | 1..10000 | random channel transpositions "
                         "per mutation |\n", "")
    assert drift(text) == ["reorder.swaps: in the schema, missing from README"]


def test_drift_finds_a_row_the_schema_lacks(readme):
    text = _edit(readme, "| `eval.limit` |", "| `eval.speed` | `1` | x | y |\n| `eval.limit` |")
    assert drift(text) == ["eval.speed: in README, not in the schema"]


def test_drift_finds_a_changed_default(readme):
    text = _edit(readme, "| `crossbar.cell_bits` | bits per cell | `2` |",
                 "| `crossbar.cell_bits` | bits per cell | `4` |")
    assert drift(text) == ["crossbar.cell_bits: README default 4 (int), schema 2 (int)"]
    text = _edit(readme, "| `quant.search.candidates` | `100` |", "| `quant.search.candidates` "
                                                                   "| `50` |")
    assert drift(text) == ["quant.search.candidates: README default 50 (int), schema 100 (int)"]


def test_drift_finds_a_default_of_another_type(readme):
    text = _edit(readme, "| `cost.overlap_digital` | `false` |", "| `cost.overlap_digital` | `0` |")
    assert drift(text) == ["cost.overlap_digital: README default 0 (int), schema False (bool)"]
    text = _edit(readme, "| `cost.cycle_ns` | `100.0` |", "| `cost.cycle_ns` | `100` |")
    assert drift(text) == ["cost.cycle_ns: README default 100 (int), schema 100.0 (float)"]


def test_drift_finds_repeated_and_unreadable_rows(readme):
    row = "| `quant.seed` | `0` | integer >= 0 | seed of that draw |\n"
    assert drift(_edit(readme, row, row + row)) == ["quant.seed: listed twice"]
    text = _edit(readme, "| `quant.seed` | `0` |", "| `quant.seed` | 0 |")
    assert drift(text) == ["quant.seed: default cell is not one `value`: '0'",
                           "quant.seed: in the schema, missing from README"]


def test_drift_follows_the_schema():
    """A default changed in the schema (here: a copy of it) is drift too."""
    sch = {sec: dict(keys) for sec, keys in config.SCHEMA.items()}
    sch["eval"]["batch_size"] = dataclasses.replace(sch["eval"]["batch_size"], default=250)
    assert drift(README.read_text(), sch) == [
        "eval.batch_size: README default 500 (int), schema 250 (int)"]


# --------------------------------------------------------------------------- README vs schema

def test_readme_tables_match_the_schema(readme):
    assert drift(readme) == []


# --------------------------------------------------------------------------- one definition

def test_sections_are_the_documented_dataclasses():
    assert list(config.SCHEMA) == list(config.SECTIONS) == [
        "model", "quant", "data", "eval", "reorder", "crossbar", "cost"]
    assert config.SECTIONS["crossbar"] is Crossbar and config.SECTIONS["cost"] is CostParams
    assert config.SECTIONS["reorder"] is ReorderParams
    for sec, cls in config.SECTIONS.items():
        assert dataclasses.is_dataclass(cls) and cls.__doc__, sec
        fields = dataclasses.fields(cls)
        assert [f.name for f in fields] == list(config.SCHEMA[sec]), sec
        for f in fields:
            key = config.SCHEMA[sec][f.name]
            assert f.metadata["doc"] == key.doc and f.metadata["check"] is key.check, f.name


def test_code_defaults_are_the_schema_defaults():
    sch = config.SCHEMA
    assert dataclasses.asdict(Crossbar()) == {k: v.default for k, v in sch["crossbar"].items()}
    assert dataclasses.asdict(CostParams()) == {k: v.default for k, v in sch["cost"].items()}
    assert COST_KEYS == tuple((k, v.default, v.doc) for k, v in sch["cost"].items())
    sig = inspect.signature(evolve).parameters
    for k in ("population", "generations", "swaps", "seed"):
        assert sig[k].default == sch["reorder"][k].default == REORDER_DEFAULTS[k], k
    assert ptqsl.DEFAULTS == {**sch["quant"]["search"].default,
                              "metric": sch["quant"]["metric"].default, "symmetric": False,
                              "act_unsigned": False}
    assert list(ptqsl.DEFAULTS) == [f.name for f in dataclasses.fields(ptqsl.SearchParams)]
    assert ptqsl.check_params({}) == ptqsl.DEFAULTS
    defaults = config.defaults()
    assert defaults["crossbar"] is None                       # optional section
    assert {s: d for s, d in defaults.items() if d is not None} == {
        s: {k: v.default for k, v in keys.items()}
        for s, keys in sch.items() if s not in config.OPTIONAL_SECTIONS}


def test_crossbar_checks_come_from_its_fields():
    assert INT_FIELDS["rows"][:2] == (1, 4096) and INT_FIELDS["adc_bits"][:2] == (0, 16)
    assert set(INT_FIELDS) == {"rows", "cols", "cell_bits", "dac_bits", "adc_bits", "scale_bits"}
    with pytest.raises(ValueError, match=r"crossbar\.cell_bits: 9: must be an integer in 1\.\.8"):
        Crossbar(cell_bits=9)
    with pytest.raises(ValueError, match=r"crossbar\.name: '': must be a non-empty string"):
        Crossbar(name="")
    with pytest.raises(config.ConfigError, match=r"crossbar\.dac_bits: 0: must be an integer"):
        config.validate({"crossbar": {"dac_bits": 0}})


def test_schema_is_not_assigned_into_after_it_is_built():
    """``SCHEMA`` is one expression read off the section classes: no ``SCHEMA[...] = ...``,
    ``SCHEMA.update`` / ``setdefault`` or similar anywhere in config.py."""
    tree = ast.parse((ROOT / "pimsim" / "config.py").read_text())
    assigned = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign,
                                                           ast.AnnAssign))]
    targets = []
    for n in assigned:
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
            targets += [x for x in ast.walk(t) if isinstance(x, ast.Subscript)
                        and isinstance(x.value, ast.Name) and x.value.id == "SCHEMA"]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
             and n.func.value.id == "SCHEMA"
             and n.func.attr in ("update", "setdefault", "pop", "__setitem__")]
    assert targets == [] and calls == []
    # and the name is bound once, at module level
    binds = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
             and any(isinstance(t, ast.Name) and t.id == "SCHEMA"
                     for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]
    assert len(binds) == 1


def test_setting_needs_a_doc_and_keeps_mutable_defaults_apart():
    with pytest.raises(ValueError, match="doc"):
        schema.setting(1)

    @dataclasses.dataclass(frozen=True)
    class S:
        m: dict = schema.setting(doc="a mapping", factory=lambda: {"a": 1})
        n: int = schema.setting(3, "a number", schema.int_in(1, 5))

    keys = schema.keys_of(S)
    keys["m"].default["a"] = 2
    assert schema.keys_of(S)["m"].default == {"a": 1} == S().m
    assert keys["n"].check(6) == "must be in 1..5" and keys["n"].check(True) == \
        "must be an integer in 1..5" and keys["n"].check(4) is None
    assert schema.defaults_of(S) == {"m": {"a": 1}, "n": 3}
