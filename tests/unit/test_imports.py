"""The package's import structure: no cycles between its modules (nested imports included), and
importing the package, its pure model or the queue worker loads no Dagster code."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lifecycle_dagster"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports, at module level or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lifecycle_dagster"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
    return out


def test_the_package_has_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert len(graph) > 25
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


@pytest.mark.parametrize(
    ("module", "loads_psycopg"),
    [
        ("lifecycle_dagster", False),
        ("lifecycle_dagster.core.dag", False),
        ("lifecycle_dagster.queue.worker", True),
        # the command (and so `agent serve`) loads Dagster only inside the commands that need it
        ("lifecycle_dagster.cli.main", True),
        ("lifecycle_dagster.agents.builtin", False),
    ],
)
def test_importing_loads_no_dagster(module: str, loads_psycopg: bool) -> None:
    code = f"import sys, {module}; print('dagster' in sys.modules, 'psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", str(loads_psycopg)]


def test_the_code_location_is_found_on_the_package() -> None:
    """``dagster ... -m lifecycle_dagster`` finds ``defs`` (imported on first access)."""
    import inspect

    import lifecycle_dagster

    assert "defs" in dir(lifecycle_dagster)
    assert [name for name, _ in inspect.getmembers(lifecycle_dagster) if name == "defs"] == ["defs"]


#: the layers, lowest first: a module imports only from its own layer and the ones before it
LAYERS = ("settings", "tracing", "core", "store", "agents", "queue", "engine", "location", "cli")


def test_each_layer_imports_only_the_layers_below_it() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in LAYERS:
            continue  # the package itself and its entry point (definitions.py)
        mine = LAYERS.index(parts[1])
        for target in _imports(path, modules):
            layer = target.split(".")[1] if target.count(".") else None
            if layer in LAYERS and LAYERS.index(layer) > mine:
                wrong.append(f"{name} imports {target}")
    assert wrong == []
