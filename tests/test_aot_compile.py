"""launch.compile: the trainer's train step lowered and compiled ahead of time for a device
topology, with the memory one device needs.

Always run: topology parsing, mesh-fit and libtpu errors, and the whole command on 4 local CPU
devices (`--topology=cpu:4`, the same lowering path as for a TPU). With libtpu importable in this
interpreter, or a `.venv-tpu` built by `make tpu-venv`, the command also compiles for a TPU v5e
2x2 slice with the real TPU compiler."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from launch import compile as aot

REPO = Path(__file__).resolve().parents[1]
MAZE_TEST = "--config=configs/ctm_maze.py:test"
TPU_VENV_PY = REPO / ".venv-tpu" / "bin" / "python"
MEMORY_LINES = (
    "arguments",
    "outputs",
    "temporaries",
    "generated code",
    "aliased",
    "total",
    "params",
    "optimizer state",
    "buffers",
    "batch",
)


def _run(python: str | Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # launch.compile chooses its own device count
    env.pop("JAX_PLATFORMS", None)
    return subprocess.run(
        [str(python), "-m", "launch.compile", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _memory(stdout: str) -> dict[str, int]:
    """{'arguments': bytes, ...} from the report's `  name  1.23 MiB  (1,290,000 bytes)` lines."""
    found = re.findall(
        r"^  ([a-z][a-z ]*?)\s+[\d.]+ (?:B|KiB|MiB|GiB)\s+\(([\d,]+) bytes\)", stdout, re.M
    )
    return {name: int(n.replace(",", "")) for name, n in found}


def _check_report(stdout: str, *, devices: int, kind: str) -> dict[str, int]:
    mem = _memory(stdout)
    assert set(MEMORY_LINES) <= set(mem), stdout
    assert f": {devices} x {kind}" in stdout.splitlines()[0]
    assert f"mesh: data={devices} fsdp=1 tensor=1; global batch 4" in stdout
    assert re.search(r"^lowered in [\d.]+s, compiled in [\d.]+s$", stdout, re.M)
    total = mem["arguments"] + mem["outputs"] + mem["temporaries"] + mem["generated code"]
    assert mem["total"] == total - mem["aliased"]
    # Replicated float32 params: 4 bytes per parameter on every device.
    (count,) = re.findall(r"^  params .* ([\d,]+) parameters$", stdout, re.M)
    assert mem["params"] == 4 * int(count.replace(",", "")) > 0
    assert mem["optimizer state"] >= 2 * mem["params"]  # Adam's two moments at least
    # The compiled step's inputs are the train state and the batch (padded on TPU, never less).
    state_and_batch = mem["params"] + mem["optimizer state"] + mem["buffers"] + mem["batch"]
    assert mem["arguments"] >= state_and_batch
    assert mem["aliased"] > 0  # the state is donated: outputs reuse its buffers
    return mem


# ------------------------------------------------------------------------------------------------
# Always on


@pytest.mark.parametrize(
    ("text", "generation", "dims", "devices"),
    [
        ("v5e:2x2", "v5e", (2, 2), 4),
        ("v6e:2x4", "v6e", (2, 4), 8),
        ("v5p:2x2x1", "v5p", (2, 2, 1), 4),
        ("V4:2x2x2", "v4", (2, 2, 2), 8),
        ("cpu:8", "cpu", (8,), 8),
    ],
)
def test_parse_topology(text, generation, dims, devices):
    topology = aot.parse_topology(text)
    assert (topology.generation, topology.dims, topology.num_devices) == (generation, dims, devices)
    assert topology.platform == ("cpu" if generation == "cpu" else "tpu")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("v5e-8", "expected GENERATION:SHAPE"),
        ("v5litepod:2x2", "unknown TPU generation 'v5litepod'"),
        ("v5e:2x2x1", "v5e topologies are AxB chips"),
        ("v5p:2x2", "v5p topologies are AxBxC chips"),
        ("v6e:0x4", "every dimension must be >= 1"),
        ("cpu:2x2", "write cpu:N"),
        ("", "expected GENERATION:SHAPE"),
    ],
)
def test_bad_topologies_are_named(text, message):
    with pytest.raises(aot.CompileError, match=re.escape(message)):
        aot.parse_topology(text)


def test_meshes_that_do_not_fit_the_topology_are_named():
    devices = list(range(8))  # only the count matters before the mesh is built
    with pytest.raises(aot.CompileError, match=r"does not fit the 8 devices: .*needs 3 devices"):
        aot.topology_mesh({"data": 3, "fsdp": 1, "tensor": 1}, devices)
    with pytest.raises(aot.CompileError, match=r"other axes \(3\) do not divide the 8 devices"):
        aot.topology_mesh({"data": -1, "fsdp": 3, "tensor": 1}, devices)
    mesh = aot.topology_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_too_few_local_cpu_devices_are_named():
    n = len(jax.devices("cpu")) + 1
    with pytest.raises(aot.CompileError, match=f"needs {n} CPU devices.*jax_num_cpu_devices"):
        aot.topology_devices(aot.parse_topology(f"cpu:{n}"))


@pytest.mark.skipif(aot.libtpu_available(), reason="libtpu is installed in this interpreter")
def test_missing_libtpu_is_the_reason_given():
    with pytest.raises(aot.CompileError) as info:
        aot.topology_devices(aot.parse_topology("v5e:2x2"))
    message = str(info.value)
    assert "libtpu is not installed" in message and "pip install" in message
    assert "jax[tpu]" in message and "make tpu-venv" in message


def test_report_flags_a_step_that_does_not_fit_in_hbm():
    report = aot.CompileReport(
        topology="v5e:2x2",
        device_kind="TPU v5 lite",
        num_devices=4,
        mesh={"data": 4, "fsdp": 1, "tensor": 1},
        data_parallel=4,
        global_batch=64,
        lower_seconds=1.0,
        compile_seconds=2.0,
        arguments=3 * 2**30,
        outputs=3 * 2**30,
        temporaries=14 * 2**30,
        generated_code=2**20,
        aliased=3 * 2**30,
        params=2**30,
        opt_state=2 * 2**30,
        buffers=0,
        batch=2**20,
        num_params=2**28,
        hbm_bytes=16 * 2**30,
    )
    assert report.total == 17 * 2**30 + 2**20 and not report.fits
    text = aot.format_report(report, "configs/x.py:big")
    assert "  HBM                 16.00 GiB  DOES NOT FIT (106.3% used)" in text
    assert _memory(text)["total"] == report.total
    assert "global batch 64 (16 per data-parallel shard)" in text


def test_cpu_topology_compiles_the_train_step_and_reports_memory():
    """The always-on end-to-end check: 4 CPU devices, data-parallel mesh from `data=-1`."""
    result = _run(sys.executable, MAZE_TEST, "--topology=cpu:4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "configs/ctm_maze.py:test for cpu:4" in result.stdout
    _check_report(result.stdout, devices=4, kind="cpu")
    assert "HBM" not in result.stdout  # no capacity to compare with on CPU


def test_command_line_errors_are_one_line():
    # The mesh needs 3 devices, the topology has 4.
    bad_mesh = _run(sys.executable, MAZE_TEST, "--topology=cpu:4", "--config.mesh.data=3")
    assert bad_mesh.returncode == 1
    assert (
        bad_mesh.stderr.strip()
        .splitlines()[-1]
        .startswith("error: the config's mesh does not fit the 4 devices: mesh.data=3")
    )
    # 8 data-parallel devices cannot split a batch of 4.
    bad_batch = _run(sys.executable, MAZE_TEST, "--topology=cpu:8")
    assert bad_batch.returncode == 1
    last = bad_batch.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train.batch_size=4 is invalid") and "size 8" in last
    bad_topology = _run(sys.executable, MAZE_TEST, "--topology=v5e-8")
    assert bad_topology.returncode == 1
    assert "expected GENERATION:SHAPE" in bad_topology.stderr.strip().splitlines()[-1]
    if not aot.libtpu_available():
        no_tpu = _run(sys.executable, MAZE_TEST, "--topology=v5e:2x2")
        assert no_tpu.returncode == 1
        last = no_tpu.stderr.strip().splitlines()[-1]
        assert "libtpu is not installed" in last and "pip install" in last


# ------------------------------------------------------------------------------------------------
# With libtpu (this interpreter, or .venv-tpu from `make tpu-venv`)


def _check_tpu_v5e(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    mem = _check_report(result.stdout, devices=4, kind="TPU v5 lite")
    assert mem["generated code"] > 0
    hbm = re.search(r"^  HBM\s+16\.00 GiB  fits \(([\d.]+)% used\)$", result.stdout, re.M)
    assert hbm and float(hbm.group(1)) < 5


@pytest.mark.skipif(
    not (aot.libtpu_available() or TPU_VENV_PY.exists()),
    reason="needs libtpu: build .venv-tpu with `make tpu-venv` (.ci/run does)",
)
def test_tpu_v5e_compile_with_libtpu():
    python = sys.executable if aot.libtpu_available() else TPU_VENV_PY
    _check_tpu_v5e(_run(python, MAZE_TEST, "--topology=v5e:2x2"))
