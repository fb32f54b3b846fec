"""The layering rules of issue #14, checked on the source: the pure policy core depends on no engine type, the data
plane depends on the control plane only through that pure core, and the vocabulary depends on nothing.

An AST walk rather than an import-time check: an import under ``TYPE_CHECKING`` or inside a function is still a
dependency (it is how ``policy/snapshot.py`` leaned on the engine's ``LoadSnapshot`` before), so every import
statement of every module counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pyllumnix"


def module_name(path: Path, root: Path = ROOT) -> str:
    """``control_plane/policy/core.py`` -> ``pyllumnix.control_plane.policy.core`` (``__init__`` -> the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pyllumnix import data_plane`` imports the subpackage: count each imported name as a module too.
            found += [(node.lineno, mod)] + [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
    return found


def violations(folder: str, forbidden: str, allowed: tuple[str, ...] = (), root: Path = ROOT) -> list[str]:
    """``file:line module`` for each import under ``forbidden`` (a dotted prefix) not under an ``allowed`` prefix."""

    def under(mod: str, prefix: str) -> bool:
        return mod == prefix or mod.startswith(prefix + ".")

    files = sorted((root / folder).rglob("*.py"))
    assert files, f"no modules under {folder}"
    return [
        f"{path.relative_to(root)}:{line} {mod}"
        for path in files
        for line, mod in imported_modules(path, root)
        if under(mod, forbidden) and not any(under(mod, a) for a in allowed)
    ]


def test_policy_core_imports_nothing_of_the_data_plane() -> None:
    assert violations("control_plane/policy", f"{PACKAGE}.data_plane") == []


def test_data_plane_imports_only_the_pure_policy_core_of_the_control_plane() -> None:
    assert violations("data_plane", f"{PACKAGE}.control_plane", allowed=(f"{PACKAGE}.control_plane.policy",)) == []


def test_policy_core_imports_no_io() -> None:
    """The pure core reaches no etcd, gRPC channel, security runtime or clock-driven loop."""
    for io in (f"{PACKAGE}.infra.etcd", f"{PACKAGE}.infra.grpc_server", f"{PACKAGE}.infra.security", "grpc", "asyncio"):
        assert violations("control_plane/policy", io) == [], io


def test_policy_core_imports_no_proto() -> None:
    """The wire→view adapters and ``PolicyConfig``'s ``ClusterConfig`` round trip live with the scheduler
    (``control_plane/scheduler/views.py``, ``config_wire.py``, enums through ``infra/wire``), not in the core."""
    assert violations("control_plane/policy", f"{PACKAGE}.protos") == []


@pytest.mark.parametrize("folder", ["control_plane", "data_plane"])
def test_components_import_nothing_of_the_cli_tools(folder: str) -> None:
    """``tools/`` (the CLI, launcher, benchmarks, simulator) sits on top of the components; what a component shares
    with it lives in ``infra/`` (e.g. ``infra/processes.describe_exit``, once ``tools.launch``'s)."""
    assert violations(folder, f"{PACKAGE}.tools") == []


@pytest.mark.parametrize("folder", ["infra", "clients"])
def test_shared_layers_import_no_component(folder: str) -> None:
    """``infra/`` (I/O helpers, vocabulary, wire) sits under every component and the client library is what users
    import: neither may pull in the control plane, the data plane or the CLI tools."""
    for component in ("control_plane", "data_plane", "tools"):
        assert violations(folder, f"{PACKAGE}.{component}") == [], component


def test_vocabulary_is_pure() -> None:
    """No proto, no I/O: every layer may import it without pulling in anything else of the project."""
    mods = {mod for _, mod in imported_modules(ROOT / "infra" / "vocabulary.py")}
    assert {m for m in mods if m.startswith(PACKAGE) or m.split(".")[0] in {"grpc", "google", "asyncio"}} == set()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from pyllumnix.data_plane.engine.base import LoadSnapshot\n",
            ["pyllumnix.data_plane.engine.base", "pyllumnix.data_plane.engine.base.LoadSnapshot"],
        ),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pyllumnix.data_plane import engine\n",
            ["pyllumnix.data_plane", "pyllumnix.data_plane.engine"],
        ),
        ("def f():\n    import pyllumnix.data_plane.engine.sim\n", ["pyllumnix.data_plane.engine.sim"]),
        (
            "from ...data_plane.engine import base\n",
            ["pyllumnix.data_plane.engine", "pyllumnix.data_plane.engine.base"],
        ),
        ("from pyllumnix import data_plane\n", ["pyllumnix.data_plane"]),
        ("from pyllumnix.control_plane.policy import views\n", []),
    ],
)
def test_the_walk_finds_every_kind_of_import(tmp_path: Path, source: str, expected: list[str]) -> None:
    """The checks above would pass vacuously if the walk missed an import form: each form is found here, in a module
    placed like ``control_plane/policy/x.py`` (so that ``...`` resolves to the package root)."""
    folder = tmp_path / "control_plane" / "policy"
    folder.mkdir(parents=True)
    (folder / "x.py").write_text(source)
    found = [v.split(" ", 1)[1] for v in violations("control_plane/policy", f"{PACKAGE}.data_plane", root=tmp_path)]
    assert found == expected
