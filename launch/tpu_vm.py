"""Cloud TPU VM lifecycle through gcloud: create, setup, train, logs, delete.

    python -m launch.tpu_vm create my-tpu --zone=us-west4-a --accelerator_type=v5litepod-16 --spot
    python -m launch.tpu_vm setup my-tpu --zone=us-west4-a
    python -m launch.tpu_vm train my-tpu --zone=us-west4-a --config=configs/ctm_maze.py:large \\
        --workdir=gs://my-bucket/maze_large -- --config.train.batch_size=128
    python -m launch.tpu_vm logs my-tpu --zone=us-west4-a
    python -m launch.tpu_vm delete my-tpu --zone=us-west4-a

The subcommand and the TPU name are positional; flags may come before or after them, and `--help`
lists the flags with the subcommands they belong to. `train` passes its `--config.FIELD=VALUE`
overrides (before or after `--`) on to launch.train, in order. `--dry_run` prints the exact
commands, one per line, shell-quoted, instead of running them. `setup` copies this checkout
(git's tracked and untracked-but-not-ignored files) to every worker, or clones `--repo` at
`--ref`, installs Python 3.12 (deadsnakes; the TPU images ship 3.10), and builds a venv with
requirements.txt plus `jax[tpu]` at the version pinned in requirements.txt. `train` starts the
same `python -m launch.train --multihost ...` on every worker in the background (nohup, log file,
pid file); re-running it after a preemption resumes from the latest checkpoint in the gs:// workdir.

A failed gcloud command or a bad value is one `error: ...` line and exit status 1; a wrong
command line (unknown subcommand or flag, missing name or flag) is one `error: ...` line and exit
status 2 (`--help` prints this usage).
"""

from __future__ import annotations

import difflib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from core.errors import Error
from launch import cli

REPO = Path(__file__).resolve().parents[1]
REMOTE_DIR = "compute-scaling-jax"  # under the worker's home directory
REMOTE_VENV = ".venv"  # inside REMOTE_DIR
TARBALL = "compute-scaling-jax.tar.gz"
LOG_FILE = "train.log"  # inside REMOTE_DIR
PID_FILE = "train.pid"

# Accelerator-type prefix -> default runtime (--version) for that generation.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Slice sizes Cloud TPU offers for the chip-counted generations (v5e, v6e).
_CHIP_COUNTS = (1, 4, 8, 16, 32, 64, 128, 256)


class TpuVmError(Error):
    """A failed gcloud command or a bad argument value; main prints it as one `error: ...` line."""


# ------------------------------------------------------------------------------------------------
# Validation


def validate_name(name: str) -> str:
    """A Cloud TPU node name: lowercase letters, digits and hyphens, starting with a letter."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise TpuVmError(
            f"TPU name {name!r} is invalid: use 1-63 lowercase letters, digits or hyphens, "
            "starting with a letter and not ending with a hyphen"
        )
    return name


def validate_zone(zone: str) -> str:
    """A Compute Engine zone such as us-central2-b or europe-west4-a."""
    if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", zone):
        raise TpuVmError(f"--zone={zone!r} is invalid: expected a zone such as us-central2-b")
    return zone


def validate_accelerator_type(accelerator_type: str) -> str:
    """v5litepod-8, v5p-16, v6e-8, v4-32, ...: a known generation and a slice size it comes in."""
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type)
    generation, size = (match.group(1), int(match.group(2))) if match else ("", 0)
    known = ", ".join(RUNTIME_VERSIONS)
    if generation not in RUNTIME_VERSIONS:
        raise TpuVmError(
            f"--accelerator_type={accelerator_type!r} is invalid: expected GENERATION-SIZE with "
            f"GENERATION one of {known} (e.g. v5litepod-8, v5p-16, v6e-8)"
        )
    if generation in ("v5litepod", "v6e"):
        if size not in _CHIP_COUNTS:
            raise TpuVmError(
                f"--accelerator_type={accelerator_type!r} is invalid: {generation} slices have "
                f"{', '.join(map(str, _CHIP_COUNTS))} chips"
            )
    elif size < 8 or size % 8:
        raise TpuVmError(
            f"--accelerator_type={accelerator_type!r} is invalid: {generation} sizes count "
            "TensorCores and are multiples of 8 (e.g. v4-8, v5p-16)"
        )
    return accelerator_type


def validate_workdir(workdir: str) -> str:
    """Every worker writes checkpoints to one place, so the workdir must be a gs:// path."""
    if not re.fullmatch(r"gs://[a-z0-9][-a-z0-9_.]{1,221}[a-z0-9](/[^\n]*)?", workdir):
        raise TpuVmError(
            f"--workdir={workdir!r} is invalid: a TPU pod needs a shared gs://BUCKET/PATH workdir "
            "(Orbax writes the checkpoints there from every worker)"
        )
    return workdir


def validate_overrides(overrides: Sequence[str]) -> list[str]:
    """Arguments passed through to launch.train: only `--config.FIELD=VALUE` overrides."""
    for item in overrides:
        if not re.match(r"--config\.[A-Za-z_][\w.]*=", item):
            raise TpuVmError(
                f"{item!r} is not a config override: pass `--config.FIELD=VALUE` after `--`"
            )
    return list(overrides)


def pinned_jax_version(requirements: Path = REPO / "requirements.txt") -> str:
    """The `jax==X` pin of requirements.txt (the TPU venv gets `jax[tpu]==X`)."""
    for line in requirements.read_text().splitlines():
        match = re.fullmatch(r"\s*jax==([\w.]+)\s*(#.*)?", line)
        if match:
            return match.group(1)
    raise TpuVmError(f"{requirements} has no `jax==VERSION` line")


# ------------------------------------------------------------------------------------------------
# Commands (lists of argv; nothing here runs anything)


def one_line(statements: Sequence[str]) -> str:
    """Shell statements as one line (`;` between them; nothing after a backgrounding `&`)."""
    out = ""
    for statement in statements:
        if out:
            out += " " if out.endswith("&") else "; "
        out += statement
    return out


def _gcloud(
    verb: str, positionals: Sequence[str], zone: str, project: str | None, *rest: str
) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB POSITIONALS... --zone=Z [--project=P] REST...`."""
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positionals, f"--zone={zone}"]
    if project:
        cmd.append(f"--project={project}")
    return [*cmd, *rest]


def _ssh(name: str, zone: str, project: str | None, worker: str, script: str) -> list[str]:
    return _gcloud("ssh", [name], zone, project, f"--worker={worker}", f"--command={script}")


def create_commands(
    name: str,
    zone: str,
    accelerator_type: str,
    version: str | None = None,
    *,
    spot: bool = False,
    preemptible: bool = False,
    project: str | None = None,
) -> list[list[str]]:
    """`gcloud compute tpus tpu-vm create` with the generation's default runtime version."""
    if spot and preemptible:
        raise TpuVmError("--spot and --preemptible are exclusive (spot is the newer kind)")
    validate_name(name)
    validate_zone(zone)
    generation = validate_accelerator_type(accelerator_type).rsplit("-", 1)[0]
    extra = ["--spot"] if spot else ["--preemptible"] if preemptible else []
    cmd = _gcloud(
        "create",
        [name],
        zone,
        project,
        f"--accelerator-type={accelerator_type}",
        f"--version={version or RUNTIME_VERSIONS[generation]}",
        *extra,
    )
    return [cmd]


_VERSIONS_PY = (
    "import importlib.metadata as m; "
    "print(*(f'{p} {m.version(p)}' for p in ('jax', 'jaxlib', 'libtpu', 'flax')))"
)


def setup_script(jax_version: str, repo: str | None = None, ref: str | None = None) -> str:
    """The shell script `setup` runs on every worker."""
    q = shlex.quote
    lines = [
        "set -euo pipefail",
        "if ! command -v python3.12 >/dev/null; then "
        "sudo apt-get update -q && sudo apt-get install -y -q software-properties-common && "
        "sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q && "
        "sudo apt-get install -y -q python3.12 python3.12-venv; fi",
    ]
    if repo:
        checkout = q(ref or "HEAD")
        lines.append(
            f"if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} fetch -q origin {checkout}; "
            f"else git clone -q {q(repo)} {REMOTE_DIR} && "
            f"git -C {REMOTE_DIR} fetch -q origin {checkout}; fi",
        )
        lines.append(f"git -C {REMOTE_DIR} checkout -q FETCH_HEAD")
    else:
        lines.append(f"mkdir -p {REMOTE_DIR} && tar -xzf {TARBALL} -C {REMOTE_DIR} && rm {TARBALL}")
    lines += [
        f"cd {REMOTE_DIR}",
        f"[ -x {REMOTE_VENV}/bin/python ] || python3.12 -m venv {REMOTE_VENV}",
        f"{REMOTE_VENV}/bin/pip install -q --upgrade pip",
        f"{REMOTE_VENV}/bin/pip install -q -r requirements.txt -r requirements-tpu.txt "
        f"{q(f'jax[tpu]=={jax_version}')}",
        # Versions only: touching the TPUs here, without jax.distributed, could hang a pod.
        f"{REMOTE_VENV}/bin/python -c {q(_VERSIONS_PY)}",
    ]
    return one_line(lines)


def setup_commands(
    name: str,
    zone: str,
    *,
    repo: str | None = None,
    ref: str | None = None,
    project: str | None = None,
    jax_version: str | None = None,
    tarball: str = f"/tmp/{TARBALL}",
) -> list[list[str]]:
    """Copy the project (scp of a tarball, or git clone on the workers), then install."""
    validate_name(name)
    validate_zone(zone)
    if ref and not repo:
        raise TpuVmError("--ref needs --repo (without --repo this checkout is copied as it is)")
    script = setup_script(jax_version or pinned_jax_version(), repo, ref)
    cmds = []
    if not repo:
        # scp's positionals are SRC DEST: the tarball goes to the home directory of every worker.
        cmds.append(_gcloud("scp", [tarball, f"{name}:{TARBALL}"], zone, project, "--worker=all"))
    cmds.append(_ssh(name, zone, project, "all", script))
    return cmds


def train_script(
    config: str, workdir: str, overrides: Sequence[str], log_file: str = LOG_FILE
) -> str:
    """Starts launch.train on one worker in the background, unless it is already running."""
    argv = [
        f"{REMOTE_VENV}/bin/python",
        "-m",
        "launch.train",
        "--multihost",
        f"--config={config}",
        f"--workdir={workdir}",
        *overrides,
    ]
    log = shlex.quote(log_file)
    return one_line(
        [
            "set -euo pipefail",
            f"cd {REMOTE_DIR}",
            f'if [ -f {PID_FILE} ] && kill -0 "$(cat {PID_FILE})" 2>/dev/null; then '
            f'echo "launch.train is already running (pid $(cat {PID_FILE}))" >&2; exit 1; fi',
            f"nohup {shlex.join(argv)} >> {log} 2>&1 < /dev/null &",
            f"echo $! > {PID_FILE}",
            f'echo "started launch.train (pid $!), log: ~/{REMOTE_DIR}/"{log}',
        ]
    )


def train_commands(
    name: str,
    zone: str,
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    *,
    project: str | None = None,
    log_file: str = LOG_FILE,
) -> list[list[str]]:
    """The same `launch.train --multihost` command on every worker (one process per host)."""
    validate_name(name)
    validate_zone(zone)
    if not config.strip():
        raise TpuVmError("--config is required, e.g. --config=configs/ctm_maze.py:large")
    script = train_script(
        config, validate_workdir(workdir), validate_overrides(overrides), log_file
    )
    return [_ssh(name, zone, project, "all", script)]


def logs_commands(
    name: str,
    zone: str,
    *,
    worker: str = "0",
    lines: int = 100,
    follow: bool = False,
    project: str | None = None,
    log_file: str = LOG_FILE,
) -> list[list[str]]:
    """Tail the training log of one worker (or all: gcloud prints theirs when each finishes)."""
    validate_name(name)
    validate_zone(zone)
    if worker != "all" and not worker.isdigit():
        raise TpuVmError(f"--worker={worker!r} is invalid: a worker index (0, 1, ...) or 'all'")
    if lines < 1:
        raise TpuVmError(f"--lines={lines} is invalid: must be >= 1")
    if follow and worker == "all":
        raise TpuVmError("--follow needs one worker: --worker=all prints only when tail exits")
    tail = ["tail", f"-n{lines}", *(["-F"] if follow else []), f"{REMOTE_DIR}/{log_file}"]
    return [_ssh(name, zone, project, worker, shlex.join(tail))]


def delete_commands(name: str, zone: str, *, project: str | None = None) -> list[list[str]]:
    return [_gcloud("delete", [validate_name(name)], validate_zone(zone), project, "--quiet")]


# ------------------------------------------------------------------------------------------------
# Running


def pack_project(destination: Path, repo: Path = REPO) -> int:
    """Tarball of git's tracked and untracked-but-not-ignored files; returns the file count."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "-c", "-o", "--exclude-standard"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise TpuVmError(f"cannot list the files of {repo} with git ({e}); use --repo") from e
    files = [f for f in listed.decode().split("\0") if f and (repo / f).is_file()]
    with tarfile.open(destination, "w:gz") as tar:
        for f in files:
            tar.add(repo / f, arcname=f)
    return len(files)


def run_commands(commands: Sequence[Sequence[str]], *, dry_run: bool) -> None:
    """Prints the commands (dry run) or runs them in order, stopping at the first failure."""
    if dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return
    if shutil.which("gcloud") is None:
        raise TpuVmError(
            "gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk) "
            "and run `gcloud auth login`, or use --dry-run to print the commands"
        )
    for cmd in commands:
        print(f"+ {shlex.join(cmd)}", flush=True)
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError as e:
            raise TpuVmError(
                f"command failed with exit status {e.returncode}: {shlex.join(cmd[:6])} ..."
            ) from e


# ------------------------------------------------------------------------------------------------
# Command line (absl, with the flags in a private FlagValues; see the module docstring)

PROG = "python -m launch.tpu_vm"
# The flags live in a private FlagValues, not in absl's global FLAGS: --config and --workdir would
# collide with launch.train's when both modules are imported in one process (a test run).
FV = flags.FlagValues()

_ZONE = flags.DEFINE_string(
    "zone", None, "[all] Compute Engine zone, e.g. us-central2-b.", flag_values=FV
)
_PROJECT = flags.DEFINE_string(
    "project", None, "[all] Google Cloud project (default: gcloud's).", flag_values=FV
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "[all] Print the commands instead of running them.", flag_values=FV
)
_ACCELERATOR_TYPE = flags.DEFINE_string(
    "accelerator_type", None, "[create] v5litepod-8, v5p-16, v6e-8, ...", flag_values=FV
)
_VERSION = flags.DEFINE_string(
    "version",
    None,
    "[create] Runtime; default: the generation's (e.g. v2-alpha-tpuv6e).",
    flag_values=FV,
)
_SPOT = flags.DEFINE_bool("spot", False, "[create] Spot VM (cheaper, preemptible).", flag_values=FV)
_PREEMPTIBLE = flags.DEFINE_bool(
    "preemptible", False, "[create] Legacy preemptible VM (not with --spot).", flag_values=FV
)
_REPO = flags.DEFINE_string(
    "repo",
    None,
    "[setup] Git URL to clone on the workers instead of copying this tree.",
    flag_values=FV,
)
_REF = flags.DEFINE_string(
    "ref", None, "[setup] Branch, tag or commit of --repo (default: its HEAD).", flag_values=FV
)
_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "[train] Config file and preset, e.g. configs/ctm_maze.py:large.",
    flag_values=FV,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "[train] gs://BUCKET/PATH shared by the workers.", flag_values=FV
)
_LOG_FILE = flags.DEFINE_string(
    "log_file",
    LOG_FILE,
    f"[train, logs] Log file under ~/{REMOTE_DIR}/ on each worker.",
    flag_values=FV,
)
_WORKER = flags.DEFINE_string("worker", "0", "[logs] Worker index or 'all'.", flag_values=FV)
_LINES = flags.DEFINE_integer("lines", 100, "[logs] Lines to print first.", flag_values=FV)
_FOLLOW = flags.DEFINE_bool("follow", False, "[logs] Keep printing (tail -F).", flag_values=FV)

# Subcommand -> the flags it needs; flag -> the subcommands it belongs to (absent: all of them).
REQUIRED = {
    "create": ("zone", "accelerator_type"),
    "setup": ("zone",),
    "train": ("zone", "config", "workdir"),
    "logs": ("zone",),
    "delete": ("zone",),
}
_OWNERS = {
    "accelerator_type": ("create",),
    "version": ("create",),
    "spot": ("create",),
    "preemptible": ("create",),
    "repo": ("setup",),
    "ref": ("setup",),
    "config": ("train",),
    "workdir": ("train",),
    "log_file": ("train", "logs"),
    "worker": ("logs",),
    "lines": ("logs",),
    "follow": ("logs",),
}
_HELP_ARGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")
_OVERRIDE_PREFIX = "--config."


def help_text() -> str:
    return f"{__doc__}\nflags:\n{FV.get_help(include_special_flags=False)}\n"


def parse_flags(
    argv: Sequence[str], absl_flags: flags.FlagValues | None = flags.FLAGS
) -> list[str]:
    """absl `flags_parser` (argv[0] first): parses FV, then `absl_flags` (absl's own: --verbosity,
    ...; None: no other flags are known, for an in-process call).

    Returns [argv[0], *positionals, *overrides]: the positionals in order (subcommand, name, any
    strays), then the `--config.FIELD=VALUE` arguments found before `--` and everything after
    `--`, in order. Those are set aside before absl parses, which would reject them as unknown
    flags. A flag error raises absl's flags.Error (`cli.run` and `run` print `error: ...`)."""
    program, *args = argv
    after_dashes: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, after_dashes = args[:cut], args[cut + 1 :]
    if any(a in _HELP_ARGS for a in args):
        print(help_text(), end="")
        if "--helpfull" in args:
            print(flags.FLAGS.get_help())
        sys.exit(0)
    overrides = [a for a in args if a.startswith(_OVERRIDE_PREFIX)]
    args = [a for a in args if not a.startswith(_OVERRIDE_PREFIX)]
    rest = FV([program, *args], known_only=True)
    if absl_flags is not None:
        rest = absl_flags(rest, known_only=True)
    unknown = [a for a in rest[1:] if a.startswith("-") and a != "-"]
    if unknown:
        name = unknown[0].lstrip("-").split("=", 1)[0]
        known = [*FV, *(absl_flags or ())]
        raise flags.UnrecognizedFlagError(
            name, unknown[0], suggestions=difflib.get_close_matches(name, known, n=3)
        )
    return [*rest, *overrides, *after_dashes]


def check_usage(argv: Sequence[str]) -> tuple[str, str, list[str]]:
    """(subcommand, name, overrides) of a parsed command line; app.UsageError if it is wrong."""
    commands = ", ".join(REQUIRED)
    if len(argv) < 2:
        raise app.UsageError(f"missing subcommand: one of {commands}")
    command = argv[1]
    if command not in REQUIRED:
        raise app.UsageError(f"unknown subcommand {command!r}: expected one of {commands}")
    if len(argv) < 3:
        raise app.UsageError(f"missing TPU name: {PROG} {command} NAME --zone=ZONE ...")
    name, extra = argv[2], list(argv[3:])
    if extra and command != "train":
        raise app.UsageError(
            f"unrecognized arguments: {' '.join(extra)} (only train passes arguments on)"
        )
    for flag, owners in _OWNERS.items():
        if FV[flag].present and command not in owners:
            raise app.UsageError(
                f"--{flag} is not a flag of {command} (only of {', '.join(owners)})"
            )
    missing = [f"--{flag}" for flag in REQUIRED[command] if FV[flag].value is None]
    if missing:
        raise app.UsageError(f"{command} needs {' and '.join(missing)}")
    if _SPOT.value and _PREEMPTIBLE.value:
        raise app.UsageError("--spot is not allowed with --preemptible (spot is the newer kind)")
    return command, name, extra


def commands_for(command: str, name: str, overrides: Sequence[str] = ()) -> list[list[str]]:
    """The gcloud commands a parsed command line stands for."""
    zone, project = _ZONE.value, _PROJECT.value
    if command == "create":
        return create_commands(
            name,
            zone,
            _ACCELERATOR_TYPE.value,
            _VERSION.value,
            spot=_SPOT.value,
            preemptible=_PREEMPTIBLE.value,
            project=project,
        )
    if command == "setup":
        return setup_commands(name, zone, repo=_REPO.value, ref=_REF.value, project=project)
    if command == "train":
        return train_commands(
            name,
            zone,
            _CONFIG.value,
            _WORKDIR.value,
            overrides,
            project=project,
            log_file=_LOG_FILE.value,
        )
    if command == "logs":
        return logs_commands(
            name,
            zone,
            worker=_WORKER.value,
            lines=_LINES.value,
            follow=_FOLLOW.value,
            project=project,
            log_file=_LOG_FILE.value,
        )
    return delete_commands(name, zone, project=project)


def main(argv: Sequence[str]) -> None:
    """absl main; `argv` is what `parse_flags` returns."""
    cli.start(argv, positional=True)
    command, name, overrides = check_usage(argv)
    with cli.one_line_errors():
        commands = commands_for(command, name, overrides)
        if command == "setup" and not _REPO.value:
            tarball = Path(commands[0][5])
            if _DRY_RUN.value:
                print(f"# pack this checkout (git ls-files: tracked + untracked) into {tarball}")
            else:
                count = pack_project(tarball)
                print(f"packed {count} files of {REPO} into {tarball}", flush=True)
        run_commands(commands, dry_run=_DRY_RUN.value)


def run(argv: Sequence[str]) -> int:
    """In-process `python -m launch.tpu_vm ARGV...` (argv without the program name): the same
    parser and main as `cli.run`; returns 0, or 1 after printing the `error: ...` line. A usage
    or flag error prints its `error: ...` line and raises SystemExit(2), as on the command
    line. absl's global FLAGS are the host process's and stay untouched (parsing them would run
    the validators of every launcher it imported, e.g. launch.train's required --workdir), so
    absl's own flags (-v, ...) are unknown here. FV is reset afterwards, so calls do not leak
    values into each other."""
    try:
        with cli.flag_errors([PROG, *argv], (FV,)):
            parsed = parse_flags([PROG, *argv], absl_flags=None)
        try:
            with cli.usage_errors():
                main(parsed)
        except SystemExit as e:
            if not isinstance(e.code, str):
                raise
            print(e.code, file=sys.stderr)
            return 1
        return 0
    finally:
        FV.unparse_flags()


if __name__ == "__main__":
    cli.run(main, flags_parser=parse_flags, flag_values=(FV, flags.FLAGS))
