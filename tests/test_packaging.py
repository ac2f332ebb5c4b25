"""`pip install .` outside the checkout: the wheel holds every package and the configs and the
project's metadata, and a launcher run from another directory finds `--config=NAME:PRESET` among
the packaged configs while config paths keep working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The checkout's packages: every top-level folder with an __init__.py.
PACKAGES = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))


def _run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh venv's python, the built wheel). The source is copied first (only what
    pyproject's build needs), so the build leaves nothing in the checkout."""
    root = tmp_path_factory.mktemp("pkg")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for name in PACKAGES:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), "."], source)
    (wheel,) = dist.glob("*.whl")
    env = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], root)
    python = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          str(wheel)], root)  # fmt: skip
    # The dependencies are this suite's own (installing jax & co. again would take minutes): a
    # .pth line puts .venv's site-packages on the path. A plain path line runs no .pth files
    # there, so the checkout's editable install stays invisible.
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   root).stdout.strip()  # fmt: skip
    Path(purelib, "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, wheel


def test_the_wheel_holds_every_package_the_configs_and_the_metadata(installed):
    from launch.cli import PROJECT_PACKAGES

    # The log filter's list of the project's packages is the checkout's.
    assert sorted(PROJECT_PACKAGES) == PACKAGES
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names, package
    for config in ("ctm_maze", "ctm_parity", "ctm_image", "ctm_rl", "parscale_lm"):
        assert f"configs/{config}.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "License-Expression: MIT" in text
    assert f"Project-URL: Repository, {project['urls']['Repository']}" in text
    assert "Description-Content-Type: text/markdown" in text
    assert "Provides-Extra: tpu" in text
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_a_launcher_runs_from_another_directory_with_a_config_by_name(installed, tmp_path):
    python, _ = installed
    where = _run([str(python), "-c", "import ctm_jax, configs; print(ctm_jax.__file__)"], tmp_path)
    assert str(python.parents[1]) in where.stdout  # the installed copy, not the checkout
    args = ["--workdir=run", "--config.train.total_steps=12", "--config.train.eval_every=12"]
    _run([str(python), "-m", "launch.train", "--config=ctm_parity:test", *args], tmp_path)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["d_model"] == 32  # the test preset, from the packaged file
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["step"] == 12
    # A misspelt name is one error line naming the packaged configs.
    bad = subprocess.run(
        [str(python), "-m", "launch.train", "--config=ctm_parit:test", "--workdir=bad"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: config 'ctm_parit' is neither a file nor a packaged config; packaged: ctm_image"
        )
    )


def test_config_names_resolve_to_the_packaged_files(tmp_path, monkeypatch):
    from launch.cli import packaged_configs, resolve_config_argument

    maze = packaged_configs()["ctm_maze"]
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert resolve_config_argument("ctm_maze:cpu") == f"{maze}:cpu"
    assert resolve_config_argument("ctm_maze") == str(maze)
    assert resolve_config_argument("configs/ctm_maze.py:small") == f"{maze}:small"
    own = tmp_path / "mine.py"
    own.write_text("")
    assert resolve_config_argument(f"{own}:x") == f"{own}:x"  # existing paths win
    assert resolve_config_argument("configs/missing.py") == "configs/missing.py"
    with pytest.raises(ValueError, match=r"^config 'ctm_mazes' is neither a file nor a packaged"):
        resolve_config_argument("ctm_mazes:cpu")
    assert "common" not in packaged_configs()  # helpers are not configs
