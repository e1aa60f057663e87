"""The house: each layer imports only the layers beneath it, and the wheel installs one name.

    detserve (CLI) > benchmarks > serve > adapters > export > training > runtime

Static (every import statement, lazy ones inside functions included) and
dynamic (importing every runtime module loads no module above it).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT


#: folder -> (its subpackage, the subpackages it may import besides itself)
LAYERS = {
    "runtime": ("detserve.runtime", set()),
    "training": ("detserve.training", {"detserve.runtime"}),
    "export": ("detserve.export", {"detserve.runtime", "detserve.training"}),
    "adapters": ("detserve.adapters", {"detserve.runtime", "detserve.training", "detserve.export"}),
    # serve/ wraps an adapter; it never exports models (the CLI does, before serving).
    "serve": ("detserve.serve", {"detserve.runtime", "detserve.adapters"}),
    "benchmarks": (
        "detserve.benchmarks",
        {"detserve.runtime", "detserve.training", "detserve.export", "detserve.adapters", "detserve.serve"},
    ),
}
UPPER = {"detserve.training", "detserve.export", "detserve.adapters", "detserve.serve", "detserve.benchmarks", "detserve.cli"}
GENERIC = {"runtime", "training", "export", "adapters", "serve", "benchmarks"}


def imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "detserve":  # from detserve import runtime, ...
                names += [f"detserve.{a.name}" for a in node.names]
    return names


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "detserve" and len(parts) > 1 else None


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_each_layer_imports_only_the_layers_beneath_it(folder):
    own, allowed = LAYERS[folder]
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_names(path):
            top = name.split(".")[0]
            if top in GENERIC:
                wrong.append(f"{path.relative_to(ROOT)} imports the generic top-level name {name!r}")
            layer = layer_of(name)
            if layer and layer != own and layer not in allowed and layer != "detserve.__version__":
                wrong.append(f"{path.relative_to(ROOT)} imports {name} ({layer} is not beneath {own})")
    assert not wrong, "\n".join(wrong)


def test_tests_and_scripts_use_the_namespace():
    wrong = [
        f"{path.relative_to(ROOT)}: {name}"
        for folder in ("tests", "scripts", "detserve")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name in imported_names(path)
        if name.split(".")[0] in GENERIC
    ]
    assert not wrong, wrong


def test_importing_the_runtime_loads_nothing_above_it():
    code = (
        "import importlib, pkgutil, sys, detserve.runtime as rt; "
        "mods = [m.name for m in pkgutil.walk_packages(rt.__path__, 'detserve.runtime.')]; "
        "[importlib.import_module(m) for m in mods]; "
        f"upper = {sorted(UPPER)!r}; "
        "bad = sorted(m for m in sys.modules if any(m == u or m.startswith(u + '.') for u in upper)); "
        "generic = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{sorted(GENERIC)!r}); "
        "assert 'detserve.runtime.engines.tensorrt' in sys.modules and not bad and not generic, (bad, generic)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd="/", env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_wheel_installs_only_the_detserve_namespace():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "detserve" or p.startswith("detserve.") for p in config["packages"])
    mapping = config["package-dir"]
    # every layer folder of the design card is mapped into the namespace, nothing else at top level
    assert {v for k, v in mapping.items() if k != "detserve"} == set(LAYERS) | {"training"}
    assert all(k == "detserve" or k.startswith("detserve.") for k in mapping)


def test_every_name_used_from_a_detserve_module_exists():
    """Lazy imports inside functions fail only when the function runs: a name moved to another module (as
    ``serve_logging_config`` and ``raw.jpeg_payloads`` once did, leaving the adapter benchmark unable to start)
    is caught here instead: every ``from detserve... import name``, and every ``module.name`` read from a
    detserve module imported by name."""
    import importlib
    import importlib.util
    import types

    missing = []
    for folder in [*LAYERS, "detserve", "tests"]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            modules = {}  # a local name -> the detserve module it is bound to
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("detserve"):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        local, sub = alias.asname or alias.name, f"{node.module}.{alias.name}"
                        if hasattr(module, alias.name):
                            if isinstance(getattr(module, alias.name), types.ModuleType):
                                modules[local] = getattr(module, alias.name)
                        elif importlib.util.find_spec(sub) is not None:  # a submodule not imported yet
                            modules[local] = importlib.import_module(sub)
                        else:
                            missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {sub}")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("detserve.") and alias.asname:
                            modules[alias.asname] = importlib.import_module(alias.name)
            rebound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            rebound |= {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
            for name in rebound:  # the same name is something else somewhere in the file: not checked
                modules.pop(name, None)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                    if isinstance(node.ctx, ast.Load) and not hasattr(modules[node.value.id], node.attr):
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {modules[node.value.id].__name__}.{node.attr}")
    assert not missing, missing
