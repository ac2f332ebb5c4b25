"""Damaged checkpoints, a second writer, stale locks and Ctrl-C, through `python -m launch.train`.

Every case starts from a copy of one finished parity run (checkpoints at steps 4, 8 and 12, each
with its checksums.json) and checks two things: what the run says (one line naming the step and
the file, or the other process) and that every checkpoint that was complete before the run is
still there afterwards with the same bytes (in checkpoints/ or, when set aside, in
damaged_checkpoints/). A run that falls back from a damaged step must end bit-identical to the
uninterrupted run: it never trained from the damaged values.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import (
    REPO,
    launcher_command,
    launcher_env,
    load_state_arrays,
    run_launcher,
)

from core.errors import DamagedCheckpointError
from train_lib import checkpointing, trainer, workdir_lock

TOTAL, EVERY = 12, 4
OVERRIDES = (
    f"--config.train.total_steps={TOTAL}",
    f"--config.train.checkpoint_every={EVERY}",
    "--config.train.eval_every=0",
    "--config.train.log_every=1",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache) -> Path:
    """A finished run: committed checkpoints at steps 4, 8, 12."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = run_launcher(workdir, *OVERRIDES, cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpointing.committed_steps(workdir / "checkpoints") == [4, 8, 12]
    return workdir


def _copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _digests(step_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(step_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(step_dir.rglob("*"))
        if p.is_file()
    }


def _snapshot(workdir: Path) -> dict[int, dict[str, str]]:
    """step -> {file: sha256} of every committed checkpoint."""
    ckpt = workdir / "checkpoints"
    return {s: _digests(ckpt / str(s)) for s in checkpointing.committed_steps(ckpt)}


def _assert_kept(before: dict[int, dict[str, str]], workdir: Path) -> None:
    """Every checkpoint of `before` is still in checkpoints/ or damaged_checkpoints/, unchanged."""
    for step, files in before.items():
        places = [workdir / "checkpoints" / str(step)]
        places += sorted((workdir / "damaged_checkpoints").glob(f"{step}*"))
        assert any(p.is_dir() and _digests(p) == files for p in places), (
            f"checkpoint {step} was changed or removed by the run"
        )


def _lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text[-3000:]
    last = _lines(result)[-1]
    assert last.startswith("error: "), text[-3000:]
    return last


def _garble(path: Path, count: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    start = min(64, len(data) // 4)
    stop = min(len(data), start + count)
    data[start:stop] = rng.integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _biggest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


# What each kind of damage does to step 12, and the words the one-line report must contain.
DAMAGE = {
    "garbled_array_bytes": (
        lambda d: _garble(_biggest_array_file(d)),
        "contents differ from the SHA-256 recorded at save time",
    ),
    "truncated_array_file": (
        lambda d: (f := _biggest_array_file(d)).write_bytes(
            f.read_bytes()[: f.stat().st_size // 2]
        ),
        "when saved (truncated?)",
    ),
    "missing_METADATA": (
        lambda d: (d / "state" / "_METADATA").unlink(),
        "state/_METADATA: missing",
    ),
    "invalid_json_meta": (
        lambda d: (d / "meta" / "metadata").write_text("{not json"),
        "meta/metadata: ",
    ),
    "invalid_json_step_metadata": (
        lambda d: (d / "_CHECKPOINT_METADATA").write_text("{not json"),
        "_CHECKPOINT_METADATA: not valid JSON",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_and_ends_bit_identical(
    damage, finished, cache, tmp_path
):
    workdir = _copy(finished, tmp_path)
    damage_fn, words = DAMAGE[damage]
    damage_fn(workdir / "checkpoints" / "12")
    before = _snapshot(workdir)

    result = run_launcher(workdir, *OVERRIDES, cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [line for line in _lines(result) if "is damaged" in line]
    assert len(reports) == 1, reports
    assert "checkpoint step 12 is damaged: " in reports[0]
    assert str(workdir / "checkpoints" / "12") in reports[0] and words in reports[0]
    assert "resuming from step 8 instead" in reports[0]
    assert "restored checkpoint at step 8" in result.stderr
    _assert_kept(before, workdir)  # the damaged step 12 is kept, in damaged_checkpoints/12
    assert (workdir / "damaged_checkpoints" / "12").is_dir()
    # Resumed from 8, not from the damaged values: the new step 12 is the original step 12.
    new, original = load_state_arrays(workdir, 12), load_state_arrays(finished, 12)
    assert new.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(new[name], original[name], err_msg=name)


def test_every_checkpoint_damaged_stops_naming_them_and_moves_nothing(finished, cache, tmp_path):
    workdir = _copy(finished, tmp_path)
    for step in (4, 8, 12):
        _garble(_biggest_array_file(workdir / "checkpoints" / str(step)))
    before = _snapshot(workdir)
    line = _error_line(run_launcher(workdir, *OVERRIDES, cache_dir=cache))
    assert line.startswith(f"error: no intact checkpoint in {workdir / 'checkpoints'}: ")
    for step in (4, 8, 12):
        assert f"checkpoint step {step} is damaged" in line
    assert "Nothing was moved" in line
    assert not (workdir / "damaged_checkpoints").exists()
    _assert_kept(before, workdir)


def test_checkpoint_without_checksums_restores_unverified(finished, cache, tmp_path):
    """Also: a metrics line cut short by a kill mid-write is dropped on resume, with a line."""
    workdir = _copy(finished, tmp_path)
    (workdir / "checkpoints" / "12" / "checksums.json").unlink()
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "split": "tra')
    result = run_launcher(workdir, *OVERRIDES, "--config.train.total_steps=16", cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint step 12 has no checksums.json: restoring it unverified" in result.stderr
    assert "restored checkpoint at step 12" in result.stderr
    assert "metrics.jsonl: dropping a cut-short last line" in result.stderr
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
    assert steps == list(range(1, 17))
    # New saves carry checksums again.
    assert (workdir / "checkpoints" / "16" / "checksums.json").is_file()


def test_garbled_metrics_line_and_config_json_are_named(finished, cache, tmp_path):
    """A metrics.jsonl line that is not a record (not the last one: not a cut-short write) stops
    the resume naming the file and line; a workdir whose config.json is not JSON is named by
    the readers (launch.export_lm, launch.eval)."""
    workdir = _copy(finished, tmp_path)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    lines[3] = "garbage"
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = _snapshot(workdir)
    line = _error_line(run_launcher(workdir, *OVERRIDES, "--config.train.total_steps=16"))
    assert line == (
        f"error: {workdir / 'metrics.jsonl'}: line 4 is not a metrics record: 'garbage'"
    )
    _assert_kept(before, workdir)
    (workdir / "config.json").write_text("{not json")
    for launcher in ("launch.export_lm", "launch.eval"):
        command = [launcher_command(workdir)[0], "-m", launcher, f"--workdir={workdir}"]
        if launcher == "launch.export_lm":
            command.append(f"--out={tmp_path / 'out'}")
        result = subprocess.run(
            command, cwd=REPO, env=launcher_env(None), capture_output=True, text=True, timeout=300
        )
        line = _error_line(result)
        assert line.startswith(f"error: {workdir / 'config.json'} is not a run's config ("), line


def test_bad_runs_leave_complete_checkpoints_as_they_were(finished, cache, tmp_path):
    """Runs that fail on an existing workdir (another model, a typo, bad values) end with one
    line and change no byte of any checkpoint."""
    workdir = _copy(finished, tmp_path)
    before = _snapshot(workdir)
    bad_runs = {
        "--config.model.d_model=48": "does not match the model the config builds",
        "--config.train.totl_steps=3": "totl_steps",
        "--config.train.batch_size=0": "train.batch_size=0 is invalid",
        "--config.optim.lr=-1": "optim.lr=-1.0 is invalid",
    }
    for override, words in bad_runs.items():
        # total_steps=16: the run would resume from step 12, not just report a finished run.
        result = run_launcher(
            workdir, *OVERRIDES, "--config.train.total_steps=16", override, cache_dir=cache
        )
        line = _error_line(result)
        assert words in line, (override, line)
        _assert_kept(before, workdir)
        assert not (workdir / workdir_lock.LOCK_FILE).exists()  # released on the way out


def _start(workdir: Path, log: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(
            launcher_command(workdir, *OVERRIDES, *overrides),
            cwd=REPO,
            env=launcher_env(cache),
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_second_trainer_refuses_and_ctrl_c_saves_the_first(finished, cache, tmp_path):
    """A live run (resumed from step 12 towards 100000): a second trainer on its workdir refuses
    at once naming the first's pid and host, and the first is unharmed; Ctrl-C then saves the
    current step, exits 0, and a re-run resumes there."""
    workdir = _copy(finished, tmp_path)
    log = tmp_path / "first.log"
    first = _start(workdir, log, cache, "--config.train.total_steps=100000")
    try:
        _wait_for(log, "training from step 12", first)
        second = run_launcher(workdir, *OVERRIDES, cache_dir=cache)
        line = _error_line(second)
        assert line.startswith(f"error: workdir {workdir} is in use by pid {first.pid} on host ")
        assert repr(socket.gethostname()) in line and "LOCK" in line
        assert first.poll() is None  # still training
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        first.kill()
    text = log.read_text()
    assert "Traceback" not in text
    stopped = int(text.split("interrupted (Ctrl-C) at step ")[1].split(":")[0])
    assert stopped > 12
    steps = checkpointing.committed_steps(workdir / "checkpoints")
    assert steps[-1] == stopped
    assert not (workdir / workdir_lock.LOCK_FILE).exists()
    resumed = run_launcher(
        workdir, *OVERRIDES, f"--config.train.total_steps={stopped + 2}", cache_dir=cache
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"restored checkpoint at step {stopped} " in resumed.stderr


def test_ctrl_c_while_compiling_saves_the_first_step(finished, tmp_path):
    """Ctrl-C while the step compiles (no cache: compiling takes seconds; the handler runs when
    XLA returns): the run takes one step, saves it and exits 0; nothing earlier changes (but
    step 4, which keep_checkpoints=3 retires once step 13 is saved)."""
    workdir = _copy(finished, tmp_path)
    before = {step: files for step, files in _snapshot(workdir).items() if step != 4}
    log = tmp_path / "run.log"
    proc = _start(workdir, log, tmp_path / "fresh_cache", "--config.train.total_steps=16")
    try:
        _wait_for(log, "compiling train step", proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    text = log.read_text()
    assert "Traceback" not in text
    assert "Ctrl-C: saving at the next step boundary (Ctrl-C again: stop now)" in text
    assert "interrupted (Ctrl-C) at step 13: saved checkpoint, exiting" in text
    assert checkpointing.committed_steps(workdir / "checkpoints") == [8, 12, 13]
    _assert_kept(before, workdir)


def test_a_second_ctrl_c_stops_at_once_and_names_the_resume_point(finished, tmp_path):
    """In process (signal timing in a subprocess is not deterministic): the watch turns the
    first SIGINT into a flag and the second into KeyboardInterrupt, which launch.train reports
    as one line naming the checkpoint a re-run resumes from (trainer.resume_point)."""
    with checkpointing.PreemptionWatch(None, signals=(signal.SIGINT,)) as watch:
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.reached(1) and watch.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; it raises before this returns
    assert trainer.resume_point(str(finished)) == (
        f"re-running the command resumes from the checkpoint at step 12 in {finished}"
    )
    assert trainer.resume_point(str(tmp_path / "new")) == (
        f"no checkpoint in {tmp_path / 'new'}: re-running the command starts from step 0"
    )


def _write_lock(workdir: Path, **fields) -> None:
    record = {"host": socket.gethostname(), "pid": 1, "started": time.time(), **fields}
    record.setdefault("heartbeat", record["started"])
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(record))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "holder, taken_over, words",
    [
        ({"pid": "dead"}, True, "is not running"),
        ({"host": "tpu-vm-that-was-preempted", "heartbeat": 0.0}, True, "heartbeat is"),
        ({"host": "another-host", "pid": 4242}, False, "pid 4242 on host 'another-host'"),
        ({"pid": "self-parent"}, False, "on host"),
    ],
    ids=["dead_pid_same_host", "old_heartbeat_other_host", "live_other_host", "live_same_host"],
)
def test_lock_file_of_another_writer(holder, taken_over, words, finished, cache, tmp_path):
    """Stale locks (dead pid here; no heartbeat for minutes elsewhere) are taken over with a
    warning; live ones refuse. The finished run only reports, so nothing compiles."""
    workdir = _copy(finished, tmp_path)
    holder = dict(holder)
    if holder.get("pid") == "dead":
        holder["pid"] = _dead_pid()
    elif holder.get("pid") == "self-parent":
        holder["pid"] = os.getpid()  # this pytest process: alive on this host
    _write_lock(workdir, **holder)
    before = _snapshot(workdir)
    result = run_launcher(workdir, *OVERRIDES, cache_dir=cache)
    if taken_over:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "taking over the stale lock" in result.stderr and words in result.stderr
        assert "already finished at step 12" in result.stderr
        assert not (workdir / workdir_lock.LOCK_FILE).exists()
    else:
        line = _error_line(result)
        assert f"error: workdir {workdir} is in use by " in line and words in line
        assert (workdir / workdir_lock.LOCK_FILE).exists()  # not ours to remove
    _assert_kept(before, workdir)


def test_readers_skip_a_damaged_checkpoint_and_touch_nothing(finished, tmp_path, caplog):
    """restore_run (evaluation) and read_variables (init_from) take the newest intact step,
    say which one they skipped, move nothing and leave a live run's temporary save alone."""
    workdir = _copy(finished, tmp_path)
    _garble(_biggest_array_file(workdir / "checkpoints" / "12"))
    in_progress = workdir / "checkpoints" / "16.orbax-checkpoint-tmp"
    in_progress.mkdir()
    before = _snapshot(workdir)
    exp, state, step = trainer.restore_run(workdir)
    assert step == 8 and int(state.step) == 8
    assert "checkpoint step 12 is damaged" in caplog.text
    variables, step = trainer.read_variables(workdir, exp.mesh)
    assert step == 8
    saved = load_state_arrays(finished, 8)
    for path, leaf in ocp.tree.to_flat_dict(variables["params"]).items():
        name = "params/" + "/".join(map(str, path))
        np.testing.assert_array_equal(np.asarray(leaf), saved[name], err_msg=name)
    assert in_progress.is_dir()
    assert not (workdir / "damaged_checkpoints").exists()
    _assert_kept(before, workdir)
    for s in (4, 8):
        _garble(_biggest_array_file(workdir / "checkpoints" / str(s)))
    with pytest.raises(DamagedCheckpointError, match="no intact checkpoint"):
        trainer.restore_run(workdir)
