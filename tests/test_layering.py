"""The import layering of docs/architecture.md, checked on every module (function-level imports
included): a package may import only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = (
    "core",
    "ctm_jax",
    "parscale_jax",
    "train_lib",
    "tasks",
    "inference_scaling",
    "configs",
    "launch",
    "bench",
    "tests",
)
# Package -> the packages of ours it may import (itself always allowed).
ALLOWED = {
    "core": set(),
    "ctm_jax": {"core", "parscale_jax"},  # a P-stream CTM may use the ParScale stream wrapper
    "parscale_jax": {"core"},
    "train_lib": {"core"},
    "tasks": {"core", "ctm_jax", "parscale_jax", "train_lib"},
    "inference_scaling": {"core", "ctm_jax", "parscale_jax", "train_lib", "tasks"},
    "configs": {"core"},
    "launch": set(OURS) - {"tests", "bench"},
    "bench": set(OURS) - {"tests"},
}
# A task's data modules (generation, loading, tfds builders) know no model and no trainer.
DATA_MODULES = ("data.py", "tfds_builder.py")
DATA_ALLOWED = {"core", "tasks"}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages of ours that `path` imports anywhere (module or function level)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in OURS}
    return found


def violations() -> list[str]:
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            used = imported_packages(path) - {package}
            limit = DATA_ALLOWED if package == "tasks" and path.name in DATA_MODULES else allowed
            for name in sorted(used - limit):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_every_package_imports_only_the_layers_below_it():
    assert violations() == []


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from configs import ctm_maze  # noqa\n    import train_lib.task\n"
    )
    assert imported_packages(module) == {"configs", "train_lib"}


def test_model_packages_name_no_task_config_or_trainer():
    for package in ("ctm_jax", "parscale_jax"):
        for path in (REPO / package).rglob("*.py"):
            assert not imported_packages(path) & {"configs", "train_lib", "tasks", "launch"}, path
