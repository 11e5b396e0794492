"""The layering rule: no module of ``nexfs/`` or ``valve/`` touches another module's private
names (issue 13: the tools reached into the core's private helpers).

A name with one leading underscore is private to the module that defines it.  ruff's SLF001
(enabled in pyproject.toml) catches ``obj._name`` outside ``self``/``cls``, but it cannot tell
a module's own classes cooperating (``Reservation`` calling ``Store._end_reservation`` in
store.py, the valve's capability objects) from a reach into another module, and it does not
see ``from m import _name``.  This test checks the module-level rule exactly: an attribute
access ``x._name`` (``x`` not ``self``/``cls``) must name something the same module defines,
and no ``_name`` may be imported from elsewhere.  ``ALLOWED`` lists today's offenders; it only
shrinks (an entry that is no longer needed fails the test too).

``tests/`` is exempt: white-box tests may use private names on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nexfs", "valve")

# (module path, private name) -> why it is still allowed.  Shrink it; never grow it without a
# reason a reviewer would accept.
ALLOWED: dict[tuple[str, str], str] = {
    # Empty: checker.py and repair.py went onto nexfs/core/objects.py and public methods.
}

# Names the standard library documents as public despite the underscore.
STDLIB_PUBLIC = {
    "_replace",  # namedtuple._replace (acl.py)
    "_exit",  # os._exit (mount.py's forked child)
    "_Pointer",  # ctypes._Pointer, the documented type of a POINTER() (fusecaps.py)
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(tree: ast.Module) -> set[str]:
    """Every name the module defines: functions, classes, class attributes, attributes set
    on ``self``/``cls``, ``__slots__`` entries and module globals."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries, getattr names
    return names


def offences(path: Path, rel: str | None = None) -> set[tuple[str, str]]:
    """(module path, private name) for every reach into another module's private names."""
    rel = rel or path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), str(path))
    own = _own_names(tree)
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _private(alias.name):
                    found.add((rel, alias.name))
            if node.module and any(_private(p) for p in node.module.split(".")):
                found.add((rel, node.module))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(p) for p in alias.name.split(".")):
                    found.add((rel, alias.name))
        elif isinstance(node, ast.Attribute) and _private(node.attr) \
                and node.attr not in STDLIB_PUBLIC:
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr not in own:
                found.add((rel, node.attr))
    return found


def all_offences() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found |= offences(path)
    return found


def test_no_module_touches_another_modules_private_names() -> None:
    new = sorted(all_offences() - ALLOWED.keys())
    assert not new, f"private names of other modules used (add a public API instead): {new}"


def test_allow_list_only_shrinks() -> None:
    stale = sorted(ALLOWED.keys() - all_offences())
    assert not stale, f"no longer needed, remove from ALLOWED: {stale}"


def test_the_check_sees_both_kinds_of_reach(tmp_path: Path) -> None:
    """The checker itself: a cross-module attribute and a private import are caught, a
    module's own private names are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from .dirindex import _hidden\n"
        "class A:\n"
        "    def __init__(self): self._mine = 1\n"
        "def f(a, fs):\n"
        "    a._mine\n"
        "    fs._theirs\n"
    )
    assert offences(sample, "sample.py") == {("sample.py", "_hidden"), ("sample.py", "_theirs")}


# The layers of nexfs/, lowest first (docs/DESIGN.md, "Layers and who may touch what").  A
# module may import from its own subpackage and from lower layers, never from a higher one or
# a sibling of the same rank: lower layers never call back up.  ``nexfs.types`` (units and
# error classes) is below everything.
LAYERS: dict[str, int] = {
    "ondisk": 0,  # record codecs and on-disk trees over the MetaStore protocol
    "store": 1,  # block store: cache, transactions, journal, allocators, data path, failure
    "core": 2,  # the filesystem: object layer, inode cache, POSIX rules
    "fuse": 3,  # the pyfuse3 adapter and its loop
    "check": 3,  # fsck's passes and repairs (over the object layer)
    "tools": 4,  # the command-line tools
}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "nexfs" or len(parts) < 3 or parts[1] == "types":
        return None  # nexfs itself, nexfs.types (below every layer), or not ours
    return parts[1]


def layer_offences(path: Path, package: str, rel: str | None = None) -> set[tuple[str, str]]:
    """(module path, imported module) for every import of a higher or sibling layer."""
    rel = rel or path.relative_to(ROOT).as_posix()
    found: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                found.add((rel, f"relative import {'.' * node.level}{node.module}"))
                continue
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            target = _layer_of(name)
            if target is None or target == package:
                continue
            if target not in LAYERS or LAYERS[target] >= LAYERS[package]:
                found.add((rel, name))
    return found


def test_every_module_lives_in_a_layer() -> None:
    top = sorted(p.name for p in (ROOT / "nexfs").glob("*.py"))
    assert top == ["__init__.py", "types.py"], f"modules outside a layer's subpackage: {top}"
    assert sorted(p.name for p in (ROOT / "nexfs").iterdir()
                  if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)


def test_no_layer_imports_a_higher_one() -> None:
    found: set[tuple[str, str]] = set()
    for package in LAYERS:
        for path in sorted((ROOT / "nexfs" / package).rglob("*.py")):
            found |= layer_offences(path, package)
    assert not found, f"imports against the layering (move the code or invert the call): " \
                      f"{sorted(found)}"


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from nexfs.store.store import Store\nfrom nexfs.types import FsError\n"
                      "from nexfs.ondisk import checksum\nfrom nexfs.check import repair\n")
    assert layer_offences(sample, "ondisk", "s.py") == {
        ("s.py", "nexfs.store.store"), ("s.py", "nexfs.store.store.Store"),
        ("s.py", "nexfs.check.repair")}
    assert layer_offences(sample, "tools", "s.py") == set()
