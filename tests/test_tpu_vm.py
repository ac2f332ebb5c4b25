"""launch.tpu_vm: the gcloud commands printed by --dry_run, argument validation, the absl command
line (in-process through `tpu_vm.run`, and as `python -m` for the exit statuses), and the packing
of this checkout. Nothing here talks to Google Cloud."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from absl import flags

from launch import tpu_vm

REPO = Path(__file__).resolve().parents[1]
ZONE = "us-west4-a"


def _pinned_jax() -> str:
    (version,) = re.findall(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    return version


def _dry_run(capsys, *argv: str) -> list[list[str]]:
    """The printed commands, each split back into argv (comment lines dropped)."""
    assert tpu_vm.run(["--dry_run", *argv]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _flag(cmd: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    return value


def _shell_words(script: str) -> list[str]:
    """Words of a one-line shell script; runs of `;&|<>` (`;`, `&&`, `>>`, ...) are words too."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    return list(lexer)


def _error(capsys, *argv: str) -> str:
    assert tpu_vm.run(["--dry_run", *argv]) == 1
    return capsys.readouterr().err


def test_create_commands(capsys):
    (cmd,) = _dry_run(
        capsys, "create", "my-tpu", f"--zone={ZONE}", "--accelerator_type=v5litepod-8", "--spot"
    )
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "my-tpu",
        f"--zone={ZONE}",
        "--accelerator-type=v5litepod-8",
        "--version=v2-alpha-tpuv5-lite",
        "--spot",
    ]
    (cmd,) = _dry_run(
        capsys, "create", "pod", "--zone=us-east5-a", "--accelerator_type=v5p-16", "--preemptible"
    )
    assert _flag(cmd, "version") == "v2-alpha-tpuv5" and cmd[-1] == "--preemptible"
    (cmd,) = _dry_run(
        capsys,
        "create",
        "t6",
        "--zone=us-east1-d",
        "--accelerator_type=v6e-8",
        "--version=tpu-ubuntu2204-base",
        "--project=my-project",
    )
    assert _flag(cmd, "version") == "tpu-ubuntu2204-base"
    assert _flag(cmd, "project") == "my-project"
    assert "--spot" not in cmd and "--preemptible" not in cmd


def test_setup_copies_the_checkout_and_installs_the_pinned_jax(capsys):
    scp, ssh = _dry_run(capsys, "setup", "my-tpu", f"--zone={ZONE}")
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in scp and scp[6] == "my-tpu:compute-scaling-jax.tar.gz"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh
    script = _flag(ssh, "command")
    assert "\n" not in script  # one line per command
    words = _shell_words(script)
    assert f"jax[tpu]=={_pinned_jax()}" in words
    assert "python3.12" in words and "ppa:deadsnakes/ppa" in words
    assert "-r" in words and "requirements.txt" in words
    assert "tar" in words and "compute-scaling-jax.tar.gz" in words


def test_setup_from_a_git_repository(capsys):
    (ssh,) = _dry_run(
        capsys,
        "setup",
        "my-tpu",
        f"--zone={ZONE}",
        "--repo=https://example.com/me/project.git",
        "--ref=v1.2",
    )
    assert "--worker=all" in ssh  # no scp: the workers clone
    words = _shell_words(_flag(ssh, "command"))
    assert "https://example.com/me/project.git" in words
    fetch = words.index("fetch")
    assert words[fetch : fetch + 4] == ["fetch", "-q", "origin", "v1.2"]
    assert words[words.index("checkout") : words.index("checkout") + 3] == [
        "checkout",
        "-q",
        "FETCH_HEAD",
    ]
    assert f"jax[tpu]=={_pinned_jax()}" in words
    assert "--ref needs --repo" in _error(capsys, "setup", "my-tpu", f"--zone={ZONE}", "--ref=x")


def test_train_runs_the_multihost_launcher_on_every_worker(capsys):
    (ssh,) = _dry_run(
        capsys,
        "train",
        "my-tpu",
        f"--zone={ZONE}",
        "--config=configs/ctm_maze.py:large",
        "--workdir=gs://my-bucket/runs/maze large",
        "--config.optim.lr=3e-4",  # overrides before and after `--` both pass through, in order
        "--",
        "--config.train.batch_size=128",
        "--config.task.image_folder=/mnt/data/my mazes",
    )
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh
    script = _flag(ssh, "command")
    words = _shell_words(script)
    start = words.index("nohup")
    end = words.index(">>")
    assert words[start + 1 : end] == [
        ".venv/bin/python",
        "-m",
        "launch.train",
        "--multihost",
        "--config=configs/ctm_maze.py:large",
        "--workdir=gs://my-bucket/runs/maze large",
        "--config.optim.lr=3e-4",
        "--config.train.batch_size=128",
        "--config.task.image_folder=/mnt/data/my mazes",
    ]
    assert words[end + 1] == "train.log"  # appended to, so a resumed run keeps the history
    assert words[end + 2 : end + 8] == ["2", ">&", "1", "<", "/dev/null", "&"]  # background


def test_train_rejects_local_workdirs_and_stray_arguments(capsys):
    base = ("train", "my-tpu", f"--zone={ZONE}", "--config=configs/ctm_parity.py")
    assert "gs://" in _error(capsys, *base, "--workdir=runs/local")
    assert "not a config override" in _error(
        capsys, *base, "--workdir=gs://my-bucket/x", "--", "oops"
    )


def test_logs_and_delete(capsys):
    (cmd,) = _dry_run(capsys, "logs", "my-tpu", f"--zone={ZONE}")
    assert "--worker=0" in cmd
    assert shlex.split(_flag(cmd, "command")) == ["tail", "-n100", "compute-scaling-jax/train.log"]
    (cmd,) = _dry_run(capsys, "logs", "my-tpu", f"--zone={ZONE}", "--worker=all", "--lines=20")
    assert "--worker=all" in cmd and "-n20" in _flag(cmd, "command")
    (cmd,) = _dry_run(capsys, "logs", "my-tpu", f"--zone={ZONE}", "--worker=3", "--follow")
    assert "--worker=3" in cmd and "-F" in shlex.split(_flag(cmd, "command"))
    assert "--follow needs one worker" in _error(
        capsys, "logs", "my-tpu", f"--zone={ZONE}", "--worker=all", "--follow"
    )
    (cmd,) = _dry_run(capsys, "delete", "my-tpu", f"--zone={ZONE}")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", f"--zone={ZONE}"] + [
        "--quiet"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("delete", "My_TPU", f"--zone={ZONE}"), "TPU name 'My_TPU' is invalid"),
        (("delete", "my-tpu", "--zone=us-west4"), "--zone='us-west4' is invalid"),
        (
            ("create", "my-tpu", f"--zone={ZONE}", "--accelerator_type=v5e-8"),
            "--accelerator_type='v5e-8' is invalid",
        ),
        (
            ("create", "my-tpu", f"--zone={ZONE}", "--accelerator_type=v6e-6"),
            "v6e slices have 1, 4, 8",
        ),
        (
            ("create", "my-tpu", f"--zone={ZONE}", "--accelerator_type=v5p-12"),
            "multiples of 8",
        ),
    ],
)
def test_bad_arguments_fail_early_with_one_line(capsys, argv, message):
    err = _error(capsys, *argv)
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_spot_and_preemptible_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        tpu_vm.run(
            ["create", "x", f"--zone={ZONE}", "--accelerator_type=v4-8", "--spot", "--preemptible"]
        )
    assert "not allowed with" in capsys.readouterr().err


def test_without_dry_run_the_same_commands_run_and_a_missing_gcloud_is_named(capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(tpu_vm.shutil, "which", lambda _: "/usr/bin/gcloud")
    monkeypatch.setattr(tpu_vm.subprocess, "run", lambda cmd, check: ran.append((cmd, check)))
    assert tpu_vm.run(["delete", "my-tpu", f"--zone={ZONE}"]) == 0
    assert ran == [(cmd, True) for cmd in tpu_vm.delete_commands("my-tpu", ZONE)]
    capsys.readouterr()

    monkeypatch.setattr(tpu_vm.shutil, "which", lambda _: None)
    assert tpu_vm.run(["delete", "my-tpu", f"--zone={ZONE}"]) == 1
    assert "gcloud is not on PATH" in capsys.readouterr().err

    def failing(cmd, check):
        raise subprocess.CalledProcessError(3, cmd)

    monkeypatch.setattr(tpu_vm.shutil, "which", lambda _: "/usr/bin/gcloud")
    monkeypatch.setattr(tpu_vm.subprocess, "run", failing)
    assert tpu_vm.run(["delete", "my-tpu", f"--zone={ZONE}"]) == 1
    assert "exit status 3" in capsys.readouterr().err


def test_pack_project_takes_tracked_and_untracked_files_but_not_ignored_ones(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)
    git("init", "-q")
    (repo / ".gitignore").write_text(".venv/\n*.log\n")
    (repo / "tracked.py").write_text("x = 1\n")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "new.py").write_text("y = 2\n")  # untracked, not ignored
    (repo / "run.log").write_text("ignored\n")
    (repo / ".venv").mkdir()
    (repo / ".venv" / "big.bin").write_text("ignored\n")
    git("add", ".gitignore", "tracked.py")
    out = tmp_path / "project.tar.gz"
    assert tpu_vm.pack_project(out, repo) == 3
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "pkg/new.py", "tracked.py"]


@pytest.mark.parametrize(
    "argv",
    [
        ("setup", "my-tpu", f"--zone={ZONE}"),
        ("setup", "my-tpu", f"--zone={ZONE}", "--repo=https://example.com/p.git", "--ref=main"),
        (
            "train",
            "my-tpu",
            f"--zone={ZONE}",
            "--config=configs/ctm_maze.py:large",
            "--workdir=gs://my-bucket/x y",
            "--config.task.image_folder=/data/it's here",
        ),
        ("logs", "my-tpu", f"--zone={ZONE}", "--follow"),
    ],
)
def test_remote_scripts_are_valid_bash(capsys, argv):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    *_, ssh = _dry_run(capsys, *argv)
    script = _flag(ssh, "command")
    check = subprocess.run([bash, "-n", "-c", script], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_flags_are_reset_between_calls_and_stay_out_of_absls_global_flags(capsys):
    was_parsed = flags.FLAGS.is_parsed()
    (cmd,) = _dry_run(capsys, "create", "x", f"--zone={ZONE}", "--accelerator_type=v4-8", "--spot")
    assert cmd[-1] == "--spot"
    (cmd,) = _dry_run(capsys, "create", "x", f"--zone={ZONE}", "--accelerator_type=v4-8")
    assert "--spot" not in cmd  # not left over from the call before
    assert flags.FLAGS.is_parsed() == was_parsed  # absl's global FLAGS are not touched
    # launch.train defines --config and --workdir in absl's global FLAGS: no collision.
    assert "launch.tpu_vm" not in flags.FLAGS.flags_by_module_dict()
    assert {"config", "workdir"} <= set(tpu_vm.FV)


def test_required_flags_of_other_launchers_do_not_break_an_in_process_call(capsys):
    """Like launch.train imported by another test: a required global flag that nobody set."""
    flags.DEFINE_string("tpu_vm_test_required", None, "Required, never given.")
    flags.mark_flag_as_required("tpu_vm_test_required")
    try:
        (cmd,) = _dry_run(capsys, "delete", "my-tpu", f"--zone={ZONE}")
        assert cmd[4:6] == ["delete", "my-tpu"]
    finally:
        delattr(flags.FLAGS, "tpu_vm_test_required")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "missing subcommand"),
        (("frob", "my-tpu", f"--zone={ZONE}"), "unknown subcommand 'frob'"),
        (("delete", f"--zone={ZONE}"), "missing TPU name"),
        (("delete", "my-tpu"), "delete needs --zone"),
        (("train", "my-tpu", f"--zone={ZONE}", "--config=c.py"), "train needs --workdir"),
        (("delete", "my-tpu", f"--zone={ZONE}", "--spot"), "--spot is not a flag of delete"),
        (("delete", "my-tpu", f"--zone={ZONE}", "--", "--config.a=1"), "unrecognized arguments"),
        (("delete", "my-tpu", "--zone", ZONE, "--dry-run"), "did you mean --dry_run?"),
        (("logs", "my-tpu", f"--zone={ZONE}", "--lines=many"), "expected an int, got 'many'"),
    ],
)
def test_a_wrong_command_line_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tpu_vm.run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_the_absl_command_line_exit_statuses(capsys):
    def cli(*argv: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "launch.tpu_vm", *argv]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)

    train = ("train", "my-tpu", f"--zone={ZONE}", "--config=configs/ctm_maze.py:large")
    ok = cli("--dry_run", *train, "--workdir=gs://my-bucket/x", "--", "--config.train.steps=9")
    assert ok.returncode == 0, ok.stderr
    assert [shlex.split(line) for line in ok.stdout.splitlines()] == _dry_run(
        capsys, *train, "--workdir=gs://my-bucket/x", "--config.train.steps=9"
    )
    bad = cli(*train, "--workdir=runs/local", "--dry_run")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("error: --workdir=") and bad.stderr.count("\n") == 1
    usage = cli("frob", "my-tpu", f"--zone={ZONE}")
    assert usage.returncode == 2
    assert (
        usage.stderr.startswith("error: unknown subcommand 'frob'")
        and usage.stderr.count("\n") == 1
    )
    helped = cli("--help")
    assert helped.returncode == 0 and "--accelerator_type: [create]" in helped.stdout
