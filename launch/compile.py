"""AOT-compile the train step for a TPU topology on a CPU host: memory per device, no hardware.

    python -m launch.compile --config=configs/ctm_maze.py:cpu --topology=v5e:2x2
    python -m launch.compile --config=configs/ctm_maze.py:cpu --topology=v5p:2x2x1
    python -m launch.compile --config=configs/ctm_maze.py:test --topology=cpu:4   # no libtpu

The mesh comes from the config's `mesh` section (-1: the topology's remaining devices), the state
and batch are ShapeDtypeStructs with the trainer's own NamedShardings on that mesh, and the step
lowered is the one `train_lib.trainer` jits (`trainer.jit_train_step`). The TPU compiler in libtpu
then reports the memory one device needs (arguments, outputs, temporaries, generated code), so a
sharding mistake or a config that would not fit in HBM shows up before any TPU is rented.

TPU topologies need libtpu in the running interpreter (`make tpu-venv` builds .venv-tpu with
`jax[tpu]`; keep it out of the main venv, where it makes JAX probe for TPUs). `cpu:N` lowers the
same step against N local CPU devices instead: the same path, with the CPU compiler's numbers.
Config fields can be overridden as for training, e.g. `--config.train.batch_size=256`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from core.errors import ConfigError, Error
from launch import cli
from train_lib import checkpointing, sharding, trainer

# TPU generation -> (number of topology dimensions, HBM bytes per JAX device).
TPU_GENERATIONS: dict[str, tuple[int, int]] = {
    "v4": (3, 32 * 2**30),  # megacore: one device per chip
    "v5e": (2, 16 * 2**30),
    "v5p": (3, 95 * 2**30),  # megacore
    "v6e": (2, 32 * 2**30),
}
_MEGACORE = ("v4", "v5p")
LIBTPU_HINT = (
    f'pip install "jax[tpu]=={jax.__version__}" (which pulls the matching libtpu; or '
    "`pip install libtpu` at the version jax[tpu] pins), e.g. `make tpu-venv` and run this "
    "command with .venv-tpu/bin/python"
)


class CompileError(Error):
    """An impossible request (topology, mesh, missing libtpu) or a failed compilation."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed --topology: 'v5e:2x2' (TPU, compile-only devices from libtpu) or 'cpu:N'."""

    generation: str  # 'v4' | 'v5e' | 'v5p' | 'v6e' | 'cpu'
    dims: tuple[int, ...]

    @property
    def platform(self) -> str:
        return "cpu" if self.generation == "cpu" else "tpu"

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.dims))}"

    @property
    def num_devices(self) -> int:
        return math.prod(self.dims)

    @property
    def hbm_bytes(self) -> int | None:
        return TPU_GENERATIONS[self.generation][1] if self.platform == "tpu" else None


def parse_topology(text: str) -> Topology:
    """'v5e:2x2', 'v6e:2x4', 'v5p:2x2x1', 'v4:2x2x2' or 'cpu:8'; CompileError otherwise."""
    examples = "e.g. v5e:2x2, v6e:2x4, v5p:2x2x1, v4:2x2x2, or cpu:8 for local CPU devices"
    match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text.strip().lower())
    if not match:
        raise CompileError(f"--topology={text!r} is invalid: expected GENERATION:SHAPE, {examples}")
    generation, shape = match.groups()
    dims = tuple(int(d) for d in shape.split("x"))
    if generation == "cpu":
        if len(dims) != 1:
            raise CompileError(f"--topology={text!r} is invalid: write cpu:N (N devices)")
    elif generation not in TPU_GENERATIONS:
        known = ", ".join(TPU_GENERATIONS)
        raise CompileError(
            f"--topology={text!r} is invalid: unknown TPU generation {generation!r} "
            f"(known: {known}, or cpu)"
        )
    else:
        rank = TPU_GENERATIONS[generation][0]
        if len(dims) != rank:
            form = "x".join("ABC"[:rank])
            raise CompileError(
                f"--topology={text!r} is invalid: {generation} topologies are {form} chips "
                f"({rank} dimensions), {examples}"
            )
    if any(d < 1 for d in dims):
        raise CompileError(f"--topology={text!r} is invalid: every dimension must be >= 1")
    return Topology(generation, dims)


def libtpu_available() -> bool:
    """Whether the running interpreter can import libtpu (the TPU compiler)."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology) -> list[Any]:
    """The devices to build the mesh over: libtpu's compile-only TPU devices, or local CPUs."""
    if topology.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < topology.num_devices:
            raise CompileError(
                f"--topology={topology.name} needs {topology.num_devices} CPU devices but this "
                f"process has {len(devices)}: run `python -m launch.compile` as its own process "
                f"(it sets jax_num_cpu_devices before JAX starts) or set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={topology.num_devices}"
            )
        return list(devices[: topology.num_devices])
    if not libtpu_available():
        raise CompileError(
            f"cannot compile for {topology.name}: libtpu is not installed in this Python "
            f"interpreter, and the TPU compiler comes from libtpu. Install it with {LIBTPU_HINT}"
        )
    from jax.experimental import topologies

    # Compile-only use opens no chip: let several of these (or a test run) load libtpu at once
    # instead of failing on libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims3 = (*topology.dims, 1, 1)[:3]
    try:
        desc = topologies.get_topology_desc(
            topology_name=topology.name,
            platform="tpu",
            chip_config_name="megacore" if topology.generation in _MEGACORE else "default",
            # Hosts hold at most 2x2 chips, as on Cloud TPU VMs (the number of hosts only
            # changes how the compiler numbers processes, not the program it builds).
            chips_per_host_bounds=tuple(min(d, 2) if i < 2 else 1 for i, d in enumerate(dims3)),
            # One slice: the trainer's mesh (jax.make_mesh) does not span slices.
            num_slices=1,
        )
    except Exception as e:  # libtpu raises assorted runtime errors; report which and why
        raise CompileError(
            f"libtpu could not describe topology {topology.name}: {type(e).__name__}: {e}"
        ) from e
    return list(desc.devices)


def topology_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any]) -> jax.sharding.Mesh:
    """The config's ('data', 'fsdp', 'tensor') mesh over `devices`, built as in training."""
    try:
        return sharding.make_mesh(mesh_config, devices)
    except ConfigError as e:
        raise CompileError(f"the config's mesh does not fit the {len(devices)} devices: {e}") from e


def _nbytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs that carry NamedShardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What one AOT compilation of the train step measured (bytes are per device)."""

    topology: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    data_parallel: int  # devices the batch is split over (the rules' 'batch' axes)
    global_batch: int
    lower_seconds: float
    compile_seconds: float
    arguments: int
    outputs: int
    temporaries: int
    generated_code: int
    aliased: int  # donated arguments whose buffers the outputs reuse
    params: int
    opt_state: int
    buffers: int
    batch: int
    num_params: int
    hbm_bytes: int | None  # known HBM per device (TPU only)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.generated_code - self.aliased

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.total <= self.hbm_bytes


def compile_train_step(config: ml_collections.ConfigDict, topology: Topology) -> CompileReport:
    """Lowers and compiles the trainer's train step for `topology`; reports memory per device."""
    devices = topology_devices(topology)
    mesh = topology_mesh(config.mesh, devices)
    exp = trainer.build_experiment(config, mesh)  # ConfigError for impossible configs
    state = checkpointing.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    global_batch = int(config.train.batch_size)
    batch = {
        name: jax.ShapeDtypeStruct(
            (global_batch, *np.shape(value)[1:]),
            np.asarray(value).dtype,
            sharding=exp.batch_sharding,
        )
        for name, value in exp.example_batch.items()
    }
    step = trainer.jit_train_step(exp)
    # Traced as the trainer traces it: under the mesh and the config's logical axis rules.
    with sharding.activate(exp.mesh, exp.logical_rules):
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # XlaRuntimeError, e.g. RESOURCE_EXHAUSTED when HBM is too small
            raise CompileError(
                f"compiling the train step for {topology.name} failed: {type(e).__name__}: {e}"
            ) from e
        t2 = time.perf_counter()
    stats = compiled.memory_analysis()
    if stats is None:
        raise CompileError(f"the {topology.platform} compiler returned no memory analysis")
    return CompileReport(
        topology=topology.name,
        device_kind=str(devices[0].device_kind),
        num_devices=len(devices),
        mesh=dict(mesh.shape),
        data_parallel=sharding.data_parallel_size(mesh, exp.logical_rules),
        global_batch=global_batch,
        lower_seconds=t1 - t0,
        compile_seconds=t2 - t1,
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        temporaries=int(stats.temp_size_in_bytes),
        generated_code=int(stats.generated_code_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        params=_nbytes_per_device(state.params),
        opt_state=_nbytes_per_device(state.opt_state),
        buffers=_nbytes_per_device(state.buffers),
        batch=_nbytes_per_device(batch),
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        hbm_bytes=topology.hbm_bytes,
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_report(report: CompileReport, config_name: str = "") -> str:
    """The printed report: one `name  size (N bytes)` line per quantity, all per device."""
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.items())
    line = lambda name, n: f"  {name:<16} {_size(n):>12}  ({n:,} bytes)"
    lines = [
        f"AOT compile of the train step{f' of {config_name}' if config_name else ''} for "
        f"{report.topology}: {report.num_devices} x {report.device_kind}",
        f"mesh: {mesh}; global batch {report.global_batch} "
        f"({report.global_batch // report.data_parallel} per data-parallel shard)",
        f"lowered in {report.lower_seconds:.1f}s, compiled in {report.compile_seconds:.1f}s",
        "memory per device (compiler's memory analysis):",
        line("arguments", report.arguments),
        line("outputs", report.outputs),
        line("temporaries", report.temporaries),
        line("generated code", report.generated_code),
        line("aliased", report.aliased) + "  donated state reused by the outputs",
        line("total", report.total) + "  arguments + outputs + temporaries + code - aliased",
    ]
    if report.hbm_bytes is not None:
        share = 100 * report.total / report.hbm_bytes
        verdict = "fits" if report.fits else "DOES NOT FIT"
        lines.append(f"  {'HBM':<16} {_size(report.hbm_bytes):>12}  {verdict} ({share:.1f}% used)")
    lines += [
        "train state per device (under the config's mesh and shardings):",
        line("params", report.params) + f"  {report.num_params:,} parameters",
        line("optimizer state", report.opt_state),
        line("buffers", report.buffers),
        line("batch", report.batch),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with a preset: path/to/config.py:preset.",
    lock_config=True,
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology (v5e:2x2, v6e:2x4, v5p:2x2x1, v4:2x2x2) or cpu:N."
)
flags.mark_flags_as_required(["config", "topology"])


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    with cli.one_line_errors():
        topology = parse_topology(_TOPOLOGY.value)
        # Compile-only: never start a TPU backend (with libtpu installed JAX would look for chips).
        jax.config.update("jax_platforms", "cpu")
        if topology.platform == "cpu":
            jax.config.update("jax_num_cpu_devices", topology.num_devices)
        report = compile_train_step(_CONFIG.value, topology)
    print(format_report(report, config_flags.get_config_filename(flags.FLAGS["config"])))
    if not report.fits:
        raise SystemExit(
            f"error: the train step needs {_size(report.total)} per device, more than the "
            f"{_size(report.hbm_bytes or 0)} of HBM a {report.device_kind} has"
        )


if __name__ == "__main__":
    cli.run(main)
