"""Bad command lines on the real launchers (`python -m launch.X` subprocesses): a missing or broken
config file, an unknown preset, a typo'd or mistyped `--config.` field, an unknown, missing or
mistyped plain flag, a usage error, and config values the library refuses. Each ends in ONE line
`error: <message>` naming the flag, file, preset or field (and what was expected and received),
with no traceback: exit status 2 for the command line (launch.cli.run), 1 for a config value
(core.errors.ConfigError). `-v 1` keeps the traceback.

Nothing here trains or compiles: every case fails while parsing flags or validating the config.
The subprocesses run concurrently (each is ~1 s of imports), once for the module."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARITY = "--config=configs/ctm_parity.py:test"
WORKDIR = "--workdir={tmp}/run"  # never created: every case fails first

# Config files with a syntax error, one that raises, one whose get_config takes no preset.
CONFIG_FILES = {
    "syntax.py": "def get_config(:\n    pass\n",
    "raises.py": "def get_config():\n    return undefined_name\n",
    "no_presets.py": "def get_config():\n    return {'a': 1}\n",
}


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    launcher: str
    args: tuple[str, ...]  # "{tmp}" stands for the module's temporary directory
    expect: tuple[str, ...]  # substrings of the `error: ...` line
    status: int = 2  # 2: a bad command line; 1: a config value the library refuses


CASES = [
    # Config files and presets.
    Case(
        "train-missing-config-file",
        "launch.train",
        ("--config=configs/nonexist.py", WORKDIR),
        ("--config=configs/nonexist.py", "config file configs/nonexist.py not found"),
    ),
    Case(
        "train-unknown-maze-preset",
        "launch.train",
        ("--config=configs/ctm_maze.py:nopreset", WORKDIR),
        ("unknown preset 'nopreset' for configs/ctm_maze.py", "use one of large, reference,"),
    ),
    Case(
        "train-config-syntax-error",
        "launch.train",
        ("--config={tmp}/syntax.py", WORKDIR),
        ("--config={tmp}/syntax.py: {tmp}/syntax.py, line 1: SyntaxError",),
    ),
    Case(
        "train-config-raises",
        "launch.train",
        ("--config={tmp}/raises.py", WORKDIR),
        ("{tmp}/raises.py, line 2: NameError: name 'undefined_name' is not defined",),
    ),
    Case(
        "train-preset-of-a-config-without-presets",
        "launch.train",
        ("--config={tmp}/no_presets.py:big", WORKDIR),
        ("--config={tmp}/no_presets.py:big: TypeError: get_config() takes 0 positional",),
    ),
    Case(
        "compile-unknown-parity-preset",
        "launch.compile",
        ("--config=configs/ctm_parity.py:huge", "--topology=cpu:1"),
        ("unknown preset 'huge'", "use one of reference, tiny, test"),
    ),
    Case(
        "scale_inference-unknown-preset",
        "launch.scale_inference",
        ("--config=configs/inference_scaling.py:nope",),
        ("unknown preset 'nope'", "use one of maze, arith, frontier-maze, frontier-arith, test"),
    ),
    # `--config.` overrides: a field that does not exist, a value of the wrong type.
    Case(
        "train-typo-field",
        "launch.train",
        (PARITY, WORKDIR, "--config.train.totl_steps=3"),
        ("--config.train.totl_steps:", "did you mean --config.train.total_steps?"),
    ),
    Case(
        "train-typo-section",
        "launch.train",
        (PARITY, WORKDIR, "--config.trian.total_steps=3"),
        ("config has no field 'trian'", "did you mean --config.train.total_steps?"),
    ),
    Case(
        "train-field-wrong-type",
        "launch.train",
        (PARITY, WORKDIR, "--config.train.total_steps=abc"),
        ("--config.train.total_steps=abc is invalid", "expected an int", "got 'abc'"),
    ),
    Case(
        "demo-typo-field-of-the-default-config",
        "launch.demo",
        (WORKDIR, "--config.train.totl_steps=3"),
        ("did you mean --config.train.total_steps?",),
    ),
    Case(
        "demo-field-wrong-type-bool",
        "launch.demo",
        (WORKDIR, "--config.model.deep_nlms=maybe"),
        ("--config.model.deep_nlms=maybe", "expected a bool (true or false)", "got 'maybe'"),
    ),
    # Plain flags: unknown, missing, of the wrong type; usage errors.
    Case(
        "train-unknown-flag",
        "launch.train",
        (PARITY, "--worckdir={tmp}/run"),
        ("unknown flag --worckdir=", "did you mean --workdir?"),
    ),
    Case(
        "train-missing-workdir",
        "launch.train",
        (PARITY,),
        ("missing required flag --workdir",),
    ),
    Case(
        "train-positional-argument",
        "launch.train",
        (PARITY, WORKDIR, "extra"),
        ("unexpected arguments: extra",),
    ),
    Case(
        "frontier-unknown-task",
        "launch.frontier",
        ("--task=sudoku",),
        ("--task=sudoku is invalid", "expected one of maze, arith", "got 'sudoku'"),
    ),
    Case(
        "eval-int-flag-wrong-type",
        "launch.eval",
        (WORKDIR, "--num_mazes=many"),
        ("--num_mazes=many is invalid", "expected an int", "got 'many'"),
    ),
    Case(
        "generate-missing-prompt",
        "launch.generate",
        ("--checkpoint={tmp}/ckpt",),
        ("missing required flag --prompt",),
    ),
    Case(
        "tpu_vm-unknown-flag",
        "launch.tpu_vm",
        ("delete", "my-tpu", "--zone=us-west4-a", "--dry-run"),
        ("unknown flag --dry-run", "did you mean --dry_run?"),
    ),
    Case(
        "tpu_vm-unknown-subcommand",
        "launch.tpu_vm",
        ("frob", "my-tpu", "--zone=us-west4-a"),
        ("unknown subcommand 'frob'", "expected one of create, setup, train, logs, delete"),
    ),
    # Config values the library refuses after parsing (ConfigError: status 1).
    Case(
        "train-batch-size-0",
        "launch.train",
        (PARITY, WORKDIR, "--config.train.batch_size=0"),
        ("train.batch_size=0 is invalid: must be >= 1",),
        status=1,
    ),
    Case(
        "train-negative-lr",
        "launch.train",
        (PARITY, WORKDIR, "--config.optim.lr=-1"),
        ("optim.lr=-1.0 is invalid: must be > 0",),
        status=1,
    ),
    Case(
        "train-model-d-model-0",
        "launch.train",
        (PARITY, WORKDIR, "--config.model.d_model=0"),
        ("model.d_model=0 is invalid",),
        status=1,
    ),
    Case(
        "train-unknown-task-class",
        "launch.train",
        (PARITY, WORKDIR, "--config.task.name=nope:Nope"),
        ("task.name='nope:Nope' is invalid: cannot import nope:Nope",),
        status=1,
    ),
]
# `-v 1` (absl's verbosity) keeps the traceback of a command-line error.
VERBOSE = Case(
    "verbose-unknown-preset",
    "launch.train",
    ("--config=configs/ctm_maze.py:nopreset", WORKDIR, "-v", "1"),
    ("ValueError: unknown preset 'nopreset'",),
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(case: Case, tmp: Path) -> subprocess.CompletedProcess:
    args = [a.format(tmp=tmp) for a in case.args]
    return subprocess.run(
        [sys.executable, "-m", case.launcher, *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_inputs")
    for name, text in CONFIG_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def results(tmp: Path) -> dict[str, subprocess.CompletedProcess]:
    """Every case's finished subprocess, run a few at a time."""
    cases = [*CASES, VERBOSE]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        done = pool.map(lambda case: _run(case, tmp), cases)
        return {case.id: result for case, result in zip(cases, done, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line(case: Case, results, tmp: Path) -> None:
    result = results[case.id]
    output = result.stdout + result.stderr
    assert result.returncode == case.status, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, output
    last = lines[-1]
    assert last.startswith("error: "), output[-3000:]
    for expected in case.expect:
        assert expected.format(tmp=tmp) in last, last


def test_verbose_keeps_the_traceback(results) -> None:
    result = results[VERBOSE.id]
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert all(e in result.stderr for e in VERBOSE.expect), result.stderr[-3000:]
    assert not result.stderr.strip().splitlines()[-1].startswith("error: ")
