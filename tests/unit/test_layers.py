"""Layers point one way: the pure core at the bottom; collectives, training and elasticity
above it; the driver loop, the CLIs and the benchmarks on top. No product module imports
a benchmark, and no two packages of flashtrain import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "flashtrain"
# Each package's allowed flashtrain packages (the core modules at the top level are
# allowed everywhere). Growing this map is a design decision, not a test fix.
ALLOWED = {
    "collective": set(),
    "train": {"collective"},
    "elastic": {"collective", "train"},
    # The tasks that ship (the image classifier, the diabetes regression) are built
    # from the training layer's data sets and models; the driver resolves a config
    # into one of them.
    "tasks": {"train"},
    "driver": {"elastic", "tasks", "train"},
    "jobs": {"driver", "tasks", "train"},
    "bench": {"collective", "driver", "elastic", "tasks", "train"},
    # The simulator runs the driver loop and the controller against simulated members.
    "sim": {"driver", "elastic", "train"},
}


def imported_names(path: Path) -> set[str]:
    """Every dotted name ``path`` imports: ``import a.b`` gives ``a.b``; ``from a.b
    import c`` gives ``a.b`` and ``a.b.c``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def imported_packages(path: Path) -> set[str]:
    """The flashtrain sub-packages ``path`` imports (``flashtrain.X...`` or ``from
    flashtrain import X`` where X is a package)."""
    found = set()
    for name in imported_names(path):
        parts = name.split(".")
        if parts[0] == "flashtrain" and len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
            found.add(parts[1])
    return found


def test_packages_import_only_the_layers_below_them():
    packages = sorted(p.name for p in PACKAGE.iterdir()
                      if p.is_dir() and (p / "__init__.py").exists())
    assert set(packages) == set(ALLOWED), "a new package needs its place in ALLOWED"
    for package in packages:
        for path in (PACKAGE / package).rglob("*.py"):
            extra = imported_packages(path) - ALLOWED[package] - {package}
            assert not extra, f"{path.relative_to(PACKAGE.parent)} imports {sorted(extra)}"


# ``flashtrain.fit`` and ``python -m flashtrain.run``: the job's front doors, on top of
# everything (as the jobs package is); nothing in the product imports them.
ENTRY_POINTS = {"api.py", "run.py"}


def test_core_modules_import_no_package_above_them():
    for path in PACKAGE.glob("*.py"):
        if path.name in ENTRY_POINTS:
            continue
        assert not imported_packages(path) & {"bench", "driver", "jobs", "elastic"}, path


def test_nothing_in_the_product_imports_the_launcher():
    """The launcher is a CLI on top of everything: it runs the job as a process, and no
    module of flashtrain may depend on it (its node agent is its own)."""
    launcher = {"flashtrain.launch", "flashtrain.launch_node"}
    for path in PACKAGE.rglob("*.py"):
        if path.name not in ("launch.py", "launch_node.py"):
            assert not launcher & imported_names(path), f"{path} imports the launcher"
