"""Which package may import which: the layers of docs/architecture.md, read from the AST.

``mappings`` (HL7 v2 ↔ FHIR) imports no other project package; the FHIR store ``fhir_server``
knows no domain (``cases``), no bridge and not the app; ``cases`` (the second-opinion case) is
called by the bridges and wired by the app, never the other way round. ``testbed``, which the
tests and the benchmarks share, imports neither, and the benchmarks never import the tests. No
module uses another module's private (``_name``) names. Only the executor opens units of work on
the ``Database``: every other module goes through ``fhir_server.executor`` (docs/architecture.md,
"Threads and event loops").
"""

import ast
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("overread", "fhir_server", "cases", "hl7_bridge", "dicom_bridge", "mappings", "conformance")
#: package → the project packages it must not import.
FORBIDDEN = {
    "mappings": frozenset(PACKAGES) - {"mappings"},
    "fhir_server": frozenset({"cases", "hl7_bridge", "dicom_bridge", "overread", "mappings"}),
    "cases": frozenset({"hl7_bridge", "dicom_bridge", "overread"}),
    "testbed": frozenset({"tests", "bench"}),
    "bench": frozenset({"tests"}),
}


def modules(package: str) -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        yield name, ast.parse(path.read_text(), str(path))


def imported(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, module) of every import, at any depth (a function's lazy import counts too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module


#: The modules that open units of work on a ``Database`` itself: the database and its executors.
UNIT_OPENERS = frozenset({"fhir_server.db", "fhir_server.executor", "fhir_server.executor_sqlite",
                          "fhir_server.executor_postgres"})  # fmt: skip
#: ``Database``'s ways into a transaction or a connection.
UNIT_METHODS = frozenset({"begin", "transaction", "autocommit"})


def units_opened(tree: ast.Module) -> Iterator[int]:
    """The line of each ``db.begin(...)``, ``self.db.transaction()`` or ``….db.autocommit()``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in UNIT_METHODS:
            owner = node.func.value
            if (isinstance(owner, ast.Name) and owner.id == "db") or (
                isinstance(owner, ast.Attribute) and owner.attr == "db"
            ):
                yield node.lineno


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def private_uses(module: str, tree: ast.Module) -> Iterator[tuple[int, str, str]]:
    """(line, other module, name) of each private name of another project module used here:
    ``from other import _name``, or ``other._name`` on a module imported by name."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # ``import a.b`` binds ``a``; ``import a.b as c`` binds ``c`` to ``a.b``
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                if _private(alias.name) and node.module != module:
                    yield node.lineno, node.module, alias.name
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            other = aliases.get(node.value.id, "")
            if other != module and other.split(".")[0] in PACKAGES and _is_module(other):
                yield node.lineno, other, node.attr


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_its_layer_may(package):
    found = [
        f"{module}:{line} imports {name}"
        for module, tree in modules(package)
        for line, name in imported(tree)
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert found == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_uses_another_modules_private_names(package):
    found = [
        f"{module}:{line} uses {other}.{name}"
        for module, tree in modules(package)
        for line, other, name in private_uses(module, tree)
    ]
    assert found == []


@pytest.mark.parametrize("package", PACKAGES)
def test_only_the_executor_opens_units_on_the_database(package):
    found = [
        f"{module}:{line}"
        for module, tree in modules(package)
        if module not in UNIT_OPENERS
        for line in units_opened(tree)
    ]
    assert found == []


def test_the_walk_finds_units_opened_on_a_database():
    tree = ast.parse(
        dedent("""
            with db.begin(write=False) as conn:
                pass
            with self.db.transaction() as session, executor.begin() as conn:
                pass
            engine.begin()
        """)
    )
    assert list(units_opened(tree)) == [2, 4]


def test_the_walk_finds_a_lazy_import_and_a_private_name():
    tree = ast.parse(
        dedent("""
            def f():
                from hl7_bridge.intake import _change_case
                import fhir_server.search as s
                return s._x, s.__name__
        """)
    )
    assert (3, "hl7_bridge.intake") in set(imported(tree))
    assert list(private_uses("cases.task", tree)) == [
        (3, "hl7_bridge.intake", "_change_case"),
        (5, "fhir_server.search", "_x"),
    ]
