"""The package's import graph: every module imports, imports run one way (docs/architecture.md's
layers), there is no cycle, and no module reaches into another package's private names.

The graph is read from the source with `ast`: a function-local or TYPE_CHECKING import counts as much as a
module-level one (deferring an import hides a dependency from the interpreter, not from the design).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import opsd_jax

PACKAGE = Path(opsd_jax.__file__).parent

# docs/architecture.md's layers, top to bottom; a module may import its own layer and the layers below it. A
# name stands for the module and everything under it (but "opsd_jax" for the package's __init__ only); the
# longest name that matches a module gives its layer. A new module must fall under one of them.
LAYERS = {
    "opsd_jax.cli": "face",
    "opsd_jax.data_cli": "face",
    "opsd_jax.export_cli": "face",
    "opsd_jax.generate_cli": "face",
    "opsd_jax.eval.cli": "face",
    "opsd_jax.rationales.cli": "face",
    "opsd_jax.compile_check.cli": "face",
    "opsd_jax.demo": "face",
    "opsd_jax.config": "run",
    "opsd_jax.train": "run",
    "opsd_jax.trained": "run",
    "opsd_jax.generation": "run",
    "opsd_jax.checkpoint": "run",
    "opsd_jax.monitor": "run",
    "opsd_jax.eval.runner": "run",
    "opsd_jax.compile_check": "run",
    "opsd_jax.testing": "run",
    "opsd_jax.opsd": "method",
    "opsd_jax.sampling": "method",
    "opsd_jax.data": "method",
    "opsd_jax.rationales": "method",
    "opsd_jax.eval": "method",
    "opsd_jax.models": "models",
    "opsd_jax.sharding": "sharding",
    "opsd_jax.settings": "settings",
    "opsd_jax": "settings",  # the package's __init__: its version
}
ORDER = ("face", "run", "method", "models", "sharding", "settings")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_names(module: str) -> list[str]:
    return [name for name in LAYERS if module == name or (name != "opsd_jax" and module.startswith(name + "."))]


def layer_of(module: str) -> str:
    return LAYERS[max(layer_names(module), key=len)]


def unit_of(module: str) -> str:
    """The package a module belongs to for private names: `opsd_jax.eval` for `opsd_jax.eval.runner`, a
    top-level module itself."""
    return ".".join(module.split(".")[:2])


def package_imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for each import of the package anywhere in `module`'s source.
    `from opsd_jax.x import y` where y is a submodule counts as importing opsd_jax.x.y."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "opsd_jax":
                    found.append((alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "opsd_jax":
                continue
            names = [alias.name for alias in node.names]
            found.append((source, names))
            for name in names:
                if f"{source}.{name}" in MODULES:
                    found.append((f"{source}.{name}", []))
    return found


@pytest.mark.parametrize("module", [name for name in MODULES if not name.endswith("__main__")])
def test_each_module_imports(module):
    """Every module imports; with no cycle (below), the order others were imported in does not matter."""
    importlib.import_module(module)


def test_imports_have_no_cycle():
    graph = {
        module: sorted({source for source, _ in package_imports(module) if source in MODULES} - {module})
        for module in MODULES
    }
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_imports_run_down_the_layers():
    upward = []
    for module in MODULES:
        rank = ORDER.index(layer_of(module))
        for source, _ in package_imports(module):
            if source in MODULES and ORDER.index(layer_of(source)) < rank:
                upward.append(f"{module} ({layer_of(module)}) imports {source} ({layer_of(source)})")
    assert upward == []


def test_no_module_imports_another_packages_private_names():
    private = [
        f"{module} imports {source}.{name}"
        for module in MODULES
        for source, names in package_imports(module)
        for name in names
        if name.startswith("_") and unit_of(source) != unit_of(module)
    ]
    assert private == []


def test_every_module_has_a_layer():
    assert [module for module in MODULES if not layer_names(module)] == []


def test_settings_is_a_leaf():
    """The config sections that lower layers read import nothing of the package, so every layer may use them."""
    assert "opsd_jax.settings" in MODULES
    assert package_imports("opsd_jax.settings") == []
