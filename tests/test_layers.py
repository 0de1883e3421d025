"""The package's wings and what each may import (each wing's __init__ docstring states it), read from the
source with ast: module-level and function-level imports alike, relative ones resolved."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ffcv_transfer"
TOP = "top"  # settings.py, config.py, threading_layer.py: every wing may import them
MAY_IMPORT = {
    TOP: {TOP},
    "store": {TOP, "store"},
    "writers": {TOP, "store", "writers"},
    "engine": {TOP, "store", "engine"},
    "findings": {TOP, "store", "findings"},
    "experiments": {TOP, "store", "writers", "engine", "findings", "experiments"},
    "cli": {TOP, "store", "writers", "engine", "findings", "experiments", "cli"},
}
# third-party packages a wing must not import at module level (inside a function is allowed where noted)
HEAVY = {"torch", "ffcv", "numba", "cupy"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else TOP


def imports(module: str, path: Path) -> list[tuple[str, list[str], int, bool]]:
    """(imported module, names, line, at module level) for each import of `path`."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.append((name, [alias.name for alias in node.names], node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno, id(node) in top_level) for alias in node.names]
    return found


MODULES = modules()


def test_every_module_sits_in_a_known_wing():
    assert {wing(m) for m in MODULES} == set(MAY_IMPORT), sorted(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_wings(module):
    allowed = MAY_IMPORT[wing(module)]
    for name, names, line, _ in imports(module, MODULES[module]):
        if name.split(".")[0] != "ffcv_transfer":
            continue
        targets = [f"{name}.{n}" if f"{name}.{n}" in MODULES else name for n in names] or [name]
        for target in targets:
            assert wing(target) in allowed, f"{MODULES[module]}:{line}: {wing(module)} may not import {target}"
        private = [n for n in names if n.startswith("_") and f"{name}.{n}" not in MODULES]
        assert not private, f"{MODULES[module]}:{line}: private names from another module: {private}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if wing(m) in {"store", "findings", TOP}))
def test_store_findings_and_settings_import_no_training_stack_at_module_level(module):
    """Reading stores and computing findings needs no torch, ffcv or GPU library; a function that reads beton
    records (store.betons) or runs a backend (findings.kernel) imports its library when called."""
    for name, _, line, module_level in imports(module, MODULES[module]):
        assert not (module_level and name.split(".")[0] in HEAVY), f"{MODULES[module]}:{line}: imports {name}"


def test_the_kernel_imports_nothing_of_the_package():
    """`findings.kernel` stands alone: numpy and the standard library at module level."""
    for name, _, line, module_level in imports(
        "ffcv_transfer.findings.kernel", MODULES["ffcv_transfer.findings.kernel"]
    ):
        assert name.split(".")[0] != "ffcv_transfer", f"kernel.py:{line}: imports {name}"
        if module_level:
            assert name.split(".")[0] in {"numpy", *sys.stdlib_module_names}, f"kernel.py:{line}: imports {name}"
