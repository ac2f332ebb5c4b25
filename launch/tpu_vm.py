"""Cloud TPU VM lifecycle through gcloud: create, setup, train, logs, delete.

    python -m launch.tpu_vm create my-tpu --zone=us-west4-a --accelerator-type=v5litepod-16 --spot
    python -m launch.tpu_vm setup my-tpu --zone=us-west4-a
    python -m launch.tpu_vm train my-tpu --zone=us-west4-a --config=configs/ctm_maze.py:large \\
        --workdir=gs://my-bucket/maze_large -- --config.train.batch_size=128
    python -m launch.tpu_vm logs my-tpu --zone=us-west4-a
    python -m launch.tpu_vm delete my-tpu --zone=us-west4-a

`--dry-run` (before or after the subcommand) prints the exact commands, one per line, shell-quoted,
instead of running them. `setup` copies this checkout (git's tracked and untracked-but-not-ignored
files) to every worker, or clones `--repo` at `--ref`, installs Python 3.12 (deadsnakes; the TPU
images ship 3.10), and builds a venv with requirements.txt plus `jax[tpu]` at the version pinned in
requirements.txt. `train` starts the same `python -m launch.train --multihost ...` on every worker
in the background (nohup, log file, pid file); re-running it after a preemption resumes from the
latest checkpoint in the gs:// workdir.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

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


class TpuVmError(Exception):
    """A bad argument or a failed command; the CLI prints it as one `error: ...` line."""


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
            f"--accelerator-type={accelerator_type!r} is invalid: expected GENERATION-SIZE with "
            f"GENERATION one of {known} (e.g. v5litepod-8, v5p-16, v6e-8)"
        )
    if generation in ("v5litepod", "v6e"):
        if size not in _CHIP_COUNTS:
            raise TpuVmError(
                f"--accelerator-type={accelerator_type!r} is invalid: {generation} slices have "
                f"{', '.join(map(str, _CHIP_COUNTS))} chips"
            )
    elif size < 8 or size % 8:
        raise TpuVmError(
            f"--accelerator-type={accelerator_type!r} is invalid: {generation} sizes count "
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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="TPU VM name")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b")
    common.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    common.add_argument(
        "--dry-run",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the commands instead of running them",
    )
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu_vm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", parents=[common], help="create a TPU VM (slice)")
    p.add_argument("--accelerator-type", required=True, help="v5litepod-8, v5p-16, v6e-8, ...")
    p.add_argument("--version", help="runtime; default: the generation's (e.g. v2-alpha-tpuv6e)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="spot VM (cheaper, preemptible)")
    kind.add_argument("--preemptible", action="store_true", help="legacy preemptible VM")

    p = sub.add_parser("setup", parents=[common], help="copy the project and install on workers")
    p.add_argument("--repo", help="git URL to clone on the workers instead of copying this tree")
    p.add_argument("--ref", help="branch, tag or commit of --repo (default: its HEAD)")

    p = sub.add_parser("train", parents=[common], help="start launch.train on every worker")
    p.add_argument("--config", required=True, help="e.g. configs/ctm_maze.py:large")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH shared by the workers")
    p.add_argument("--log-file", default=LOG_FILE, help=f"under ~/{REMOTE_DIR}/ on each worker")
    p.epilog = "Config overrides (--config.FIELD=VALUE) follow, optionally after `--`."

    p = sub.add_parser("logs", parents=[common], help="tail the training log")
    p.add_argument("--worker", default="0", help="worker index or 'all' (default 0)")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--follow", action="store_true", help="keep printing (tail -F)")
    p.add_argument("--log-file", default=LOG_FILE)

    sub.add_parser("delete", parents=[common], help="delete the TPU VM")
    return parser


def commands_for(args: argparse.Namespace) -> list[list[str]]:
    """The gcloud commands a parsed command line stands for."""
    if args.command == "create":
        return create_commands(
            args.name,
            args.zone,
            args.accelerator_type,
            args.version,
            spot=args.spot,
            preemptible=args.preemptible,
            project=args.project,
        )
    if args.command == "setup":
        return setup_commands(
            args.name, args.zone, repo=args.repo, ref=args.ref, project=args.project
        )
    if args.command == "train":
        return train_commands(
            args.name,
            args.zone,
            args.config,
            args.workdir,
            args.overrides,
            project=args.project,
            log_file=args.log_file,
        )
    if args.command == "logs":
        return logs_commands(
            args.name,
            args.zone,
            worker=args.worker,
            lines=args.lines,
            follow=args.follow,
            project=args.project,
            log_file=args.log_file,
        )
    return delete_commands(args.name, args.zone, project=args.project)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line; `train` keeps its `--config.FIELD=VALUE` overrides in order."""
    argv = list(sys.argv[1:] if argv is None else argv)
    after_dashes: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, after_dashes = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    extra = [*unknown, *after_dashes]
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        commands = commands_for(args)
        if args.command == "setup" and not args.repo:
            tarball = Path(commands[0][5])
            if args.dry_run:
                print(f"# pack this checkout (git ls-files: tracked + untracked) into {tarball}")
            else:
                count = pack_project(tarball)
                print(f"packed {count} files of {REPO} into {tarball}", flush=True)
        run_commands(commands, dry_run=args.dry_run)
    except TpuVmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
