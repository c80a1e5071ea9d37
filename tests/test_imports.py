"""The shape of pimsim's own imports, read with ``ast`` (nothing is imported to find them).

1. No import cycle among pimsim's modules. Every ``import`` / ``from ... import`` counts, also
   inside functions (a lazy import only moves a cycle to run time), and
   ``importlib.import_module("pimsim....")`` with a literal name. Relative imports are resolved
   against the importing module's package. Importing ``pimsim.a.b`` also runs the package
   ``pimsim.a`` (its ``__init__``) unless the importer is inside ``pimsim.a`` (then the package
   is initialising already); ``from pimsim.a import b`` imports the submodule ``b`` when there
   is one, and waits for ``pimsim.a``'s ``__init__`` when ``b`` is a name defined there.
2. No module uses another module's private names: no ``from .mod import _name``, no
   ``mod._name`` on an imported pimsim module, no ``obj._attr`` (or ``getattr(obj, "_attr")``)
   of an attribute that another pimsim module defines (on ``self`` / ``cls`` or in a class body)
   and this one does not.

Each walker is first run on a small package written to ``tmp_path`` with a known answer, so a
walker that misses edges or names cannot pass silently.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import pimsim

PIMSIM_DIR = Path(pimsim.__file__).resolve().parent


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class Module:
    name: str          # dotted, e.g. pimsim.reorder.groups
    rel: str           # path inside the package directory, e.g. reorder/groups.py
    is_package: bool   # an __init__.py
    tree: ast.Module

    @property
    def package(self) -> str:
        """The package that relative imports are resolved against."""
        return self.name if self.is_package else self.name.rpartition(".")[0]

    def inside(self, package: str) -> bool:
        """True if this module is ``package`` or one of its submodules."""
        return self.name == package or self.name.startswith(package + ".")

    def where(self, node) -> str:
        return f"{self.rel}:{node.lineno}"


def discover(root: Path, top: str) -> dict[str, Module]:
    """Every module of the package ``top`` whose directory is ``root``."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = list(rel.with_suffix("").parts)
        if not all(p.isidentifier() for p in parts):
            continue
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        if not all((root.joinpath(*parts[:i]) / "__init__.py").is_file()
                   for i in range(len(parts))):
            continue                                    # not inside a chain of packages
        name = ".".join([top] + parts)
        mods[name] = Module(name, rel.as_posix(), is_pkg, ast.parse(path.read_text(), str(path)))
    return mods


def _resolve_from(mod: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <...> import``."""
    if node.level == 0:
        return node.module or ""
    base = mod.package.split(".")
    if node.level > len(base):
        raise AssertionError(f"{mod.where(node)}: relative import beyond the top package")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(mod: Module, target: str, mods: dict, need_target: bool = True) -> list[str]:
    """The modules that importing ``target`` from ``mod`` waits for: the packages above
    ``target`` that ``mod`` is not inside of (those are initialising already), and ``target``
    itself (or its longest known prefix) when ``need_target``."""
    parts = target.split(".")
    while parts and ".".join(parts) not in mods:
        parts.pop()
    out = [".".join(parts[:i]) for i in range(1, len(parts))
           if not mod.inside(".".join(parts[:i]))]
    name = ".".join(parts)
    if parts and need_target and name != mod.name:
        out.append(name)
    return out


def _is_import_module_call(node) -> bool:
    f = node.func
    return (bool(node.args) and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and ((isinstance(f, ast.Attribute) and f.attr == "import_module")
                 or (isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))))


def import_edges(mods: dict[str, Module], top: str) -> dict[str, dict[str, str]]:
    """``{importer: {imported: "file:line" of the first such import}}`` within ``top``."""
    edges: dict[str, dict[str, str]] = {m: {} for m in mods}
    for mod in mods.values():
        def add(target, node, need_target=True):
            if target == top or target.startswith(top + "."):
                for t in _targets(mod, target, mods, need_target):
                    edges[mod.name].setdefault(t, mod.where(node))

        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name, node)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(mod, node)
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                # waits for base's __init__ unless mod is inside base and imports only
                # submodules of it
                add(base, node, not mod.inside(base) or len(subs) < len(node.names))
                for sub in subs:
                    add(sub, node)
            elif isinstance(node, ast.Call) and _is_import_module_call(node):
                add(node.args[0].value, node)
    return edges


def find_cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Import cycles as closed paths of module names: for every module in a strongly connected
    component of more than one module, the shortest cycle through it (each cycle once, written
    from its alphabetically first module)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def strong(v):                                  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            strong(v)
    cycles = set()
    for comp in comps:
        for start in sorted(comp):                  # breadth-first back to start
            prev, queue, end = {start: None}, [start], None
            while end is None:
                v = queue.pop(0)
                for w in sorted(edges[v]):
                    if w == start:
                        end = v
                        break
                    if w in comp and w not in prev:
                        prev[w] = v
                        queue.append(w)
            path = [end]
            while prev[path[-1]] is not None:
                path.append(prev[path[-1]])
            path.reverse()
            i = path.index(min(path))
            cycles.add(tuple(path[i:] + path[:i]))
    return sorted(list(c) + [c[0]] for c in cycles)


def describe(cycle: list[str], edges) -> str:
    return " -> ".join(cycle) + "  (" + ", ".join(
        edges[a][b] for a, b in zip(cycle, cycle[1:])) + ")"


def _owned(mod: Module) -> set[str]:
    """Private attribute names ``mod`` defines: stored on ``self`` / ``cls``, or defined in a
    class body."""
    names = set()
    for node in ast.walk(mod.tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del))
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(item.name)
                targets = getattr(item, "targets", None) or [getattr(item, "target", None)]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {n for n in names if _private(n)}


def private_uses(mods: dict[str, Module], top: str) -> list[str]:
    """``file:line: what`` for each use, in one module, of another module's private names."""
    owned = {m.name: _owned(m) for m in mods.values()}
    problems = set()
    for mod in mods.values():
        aliases = {}                                # local name -> the pimsim module it binds
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == top or a.name.startswith(top + "."):
                        if a.asname:
                            aliases[a.asname] = a.name
                        else:
                            aliases[top] = top
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(mod, node)
                if not (base == top or base.startswith(top + ".")):
                    continue
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
                    if _private(a.name) and base != mod.name:
                        problems.add(f"{mod.where(node)}: from {base} import {a.name}")

        def dotted(e):
            if isinstance(e, ast.Name):
                return aliases.get(e.id)
            if isinstance(e, ast.Attribute):
                d = dotted(e.value)
                return None if d is None else f"{d}.{e.attr}"
            return None

        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Attribute):
                attr, value = node.attr, node.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str)):
                attr, value = node.args[1].value, node.args[0]
            else:
                continue
            if not _private(attr):
                continue
            base = dotted(value)
            if base is not None and base in mods:   # mod._name of an imported module
                if base != mod.name:
                    problems.add(f"{mod.where(node)}: {base}.{attr}")
                continue
            if attr in owned[mod.name]:
                continue
            others = sorted(m for m, names in owned.items() if attr in names and m != mod.name)
            if others:
                problems.add(f"{mod.where(node)}: .{attr} (defined in {', '.join(others)})")
    return sorted(problems)


# --------------------------------------------------------------------------------------------
# the walkers on a package with known answers
# --------------------------------------------------------------------------------------------

TOY = {
    "toy/__init__.py": "",
    "toy/a.py": "def f():\n    from . import b   # lazy: still an edge\n",
    "toy/b.py": "import toy.sub.m\n",
    "toy/sub/__init__.py": "from .m import g\n",
    "toy/sub/m.py": "from . import n\nfrom .n import h\n",
    "toy/sub/n.py": "import importlib\n\n\ndef h():\n    importlib.import_module('toy.c')\n",
    "toy/sub/k.py": "from . import g   # a name of toy.sub's __init__, not a module\n",
    "toy/c.py": "from toy import a\nimport numpy as np\n",
    "toy/d.py": "from .sub import m\n",
    "toy/e.py": "class E:\n    def __init__(self):\n        self._own = 1\n\n\n"
                "def _helper():\n    return 1\n",
    "toy/f.py": "from .e import E, _helper\nfrom . import e as emod\nimport toy.e\n\n\n"
                "def use(x):\n    y = E()\n    a = emod._helper()\n    b = toy.e._helper()\n"
                "    c = getattr(y, '_own')\n    return y._own, x._shape, x.__class__, a, b, c\n",
    "toy/g.py": "class G:\n    _tag = 0\n\n    def __init__(self):\n        self._own = 2\n\n"
                "    def get(self, other):\n        return self._own, other._tag\n",
    "toy/h.py": "def poke(e):\n    e._own = 3       # a store into another module's attribute\n",
    "toy/not-a-module.py": "import toy.a\n",
}


def write_toy(tmp_path) -> Path:
    for rel, text in TOY.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path / "toy"


def test_cycle_walker_on_a_known_package(tmp_path):
    root = write_toy(tmp_path)
    mods = discover(root, "toy")
    assert set(mods) == {"toy", "toy.a", "toy.b", "toy.c", "toy.d", "toy.e", "toy.f", "toy.g",
                         "toy.h", "toy.sub", "toy.sub.k", "toy.sub.m", "toy.sub.n"}
    edges = import_edges(mods, "toy")
    assert {m: set(e) for m, e in edges.items()} == {
        "toy": set(),
        "toy.a": {"toy.b"},                            # inside a function
        "toy.b": {"toy.sub", "toy.sub.m"},             # the package's __init__ runs first
        "toy.c": {"toy.a"},                            # from toy import <submodule>
        "toy.d": {"toy.sub", "toy.sub.m"},
        "toy.e": set(),
        "toy.f": {"toy.e"},
        "toy.g": set(),
        "toy.h": set(),
        "toy.sub": {"toy.sub.m"},
        "toy.sub.k": {"toy.sub"},                      # reads a name of the __init__
        "toy.sub.m": {"toy.sub.n"},                    # not its own, initialising, package
        "toy.sub.n": {"toy.c"},                        # importlib with a literal
    }
    cycles = find_cycles(edges)
    # through a: b -> sub.m directly; through sub: b -> sub -> sub.m
    assert cycles == [["toy.a", "toy.b", "toy.sub", "toy.sub.m", "toy.sub.n", "toy.c", "toy.a"],
                      ["toy.a", "toy.b", "toy.sub.m", "toy.sub.n", "toy.c", "toy.a"]]
    assert describe(cycles[1], edges) == ("toy.a -> toy.b -> toy.sub.m -> toy.sub.n -> toy.c -> "
                                          "toy.a  (a.py:2, b.py:1, sub/m.py:1, sub/n.py:5, c.py:1)")
    (root / "a.py").write_text("def f():\n    return 1\n")     # break it at the lazy import
    assert find_cycles(import_edges(discover(root, "toy"), "toy")) == []


def test_private_walker_on_a_known_package(tmp_path):
    root = write_toy(tmp_path)
    assert private_uses(discover(root, "toy"), "toy") == sorted([
        "f.py:1: from toy.e import _helper",
        "f.py:10: ._own (defined in toy.e, toy.g)",  # getattr with a literal
        "f.py:11: ._own (defined in toy.e, toy.g)",
        "f.py:8: toy.e._helper",                    # through the alias emod
        "f.py:9: toy.e._helper",
        "h.py:2: ._own (defined in toy.e, toy.g)",   # a store counts too
    ])
    # not reported: x._shape (no toy module defines it), x.__class__ (a dunder), and g's
    # self._own and other._tag (g defines both)


# --------------------------------------------------------------------------------------------
# pimsim itself
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pimsim_modules():
    mods = discover(PIMSIM_DIR, "pimsim")
    assert {"pimsim", "pimsim.calibrate", "pimsim.methods", "pimsim.reorder",
            "pimsim.reorder.search"} <= set(mods)
    return mods


def test_no_import_cycles(pimsim_modules):
    edges = import_edges(pimsim_modules, "pimsim")
    assert {"pimsim.methods", "pimsim.network"} <= set(edges["pimsim.calibrate"])
    cycles = find_cycles(edges)
    assert not cycles, "import cycle(s):\n" + "\n".join(describe(c, edges) for c in cycles)


def test_no_private_names_across_modules(pimsim_modules):
    found = private_uses(pimsim_modules, "pimsim")
    assert not found, ("private names used outside the module that defines them (make them "
                       "public and documented, or move them):\n" + "\n".join(found))
