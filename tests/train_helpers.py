"""Shared helpers for the training-infrastructure tests (not a test module itself)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX.proto import event_pb2

from ctm_jax.config import CTMConfig
from ctm_jax.model import CTMOutput
from tasks.ctm_parity.task import ParityTask
from train_lib.task import Batch, Metrics

# A small token-input CTM (no backbone) for the model-level tests.
SMALL_CTM = CTMConfig(
    iterations=4,
    d_model=32,
    d_input=8,
    heads=2,
    n_synch_out=6,
    n_synch_action=5,
    synapse_depth=1,
    memory_length=3,
    deep_nlms=True,
    memory_hidden_dims=2,
    do_layernorm_nlm=False,
    backbone_type="none",
    positional_embedding_type="none",
    out_dims=5,
)

REPO = Path(__file__).resolve().parents[1]
PARITY_CONFIG = "configs/ctm_parity.py"


def run_launcher(
    workdir: Path,
    *overrides: str,
    preset: str = "test",
    cache_dir: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Runs `python -m launch.train` from the repo root and waits for it."""
    return subprocess.run(
        launcher_command(workdir, *overrides, preset=preset),
        cwd=REPO,
        env=launcher_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def launcher_command(workdir: Path, *overrides: str, preset: str = "test") -> list[str]:
    config = f"--config={PARITY_CONFIG}:{preset}" if preset else f"--config={PARITY_CONFIG}"
    return [sys.executable, "-m", "launch.train", config, f"--workdir={workdir}", *overrides]


def launcher_env(cache_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, whatever the test session set for itself
    env["JAX_PLATFORMS"] = "cpu"
    if cache_dir is not None:
        # Identical commands compile identical programs: later runs load them from the cache.
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def checkpoint_steps(workdir: Path) -> list[int]:
    """Finished checkpoint steps (Orbax renames `<step>.orbax-checkpoint-tmp*` when done)."""
    ckpt = workdir / "checkpoints"
    if not ckpt.exists():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit())


def load_state_arrays(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Flat {'params/...': array} of a saved train state, read without a target structure."""
    with warnings.catch_warnings():
        # No target shardings on purpose (a plain read); Orbax warns that it uses the saved ones.
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        tree = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return {"/".join(map(str, k)): _numpy(v) for k, v in ocp.tree.to_flat_dict(tree).items()}


def _numpy(value: Any) -> np.ndarray:
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(value))
    return np.asarray(value)


def read_tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from tensorboardX event files (TFRecord framing, Event protos)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            payload = data[offset + 12 : offset + 12 + length]  # skip length + its crc
            offset += 12 + length + 4  # payload + its crc
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


class NanParityTask(ParityTask):
    """Parity whose training loss turns NaN on one batch of the stream (a poisoned batch).

    The parity backbone discretises its input, so NaN inputs would not propagate; instead each
    train batch carries a 'poison' vector (zeros, NaN on batch NAN_AT_BATCH) added to the loss.
    """

    NAN_AT_BATCH = 29  # 0-based: the update that produces step 30 is non-finite

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        ds = super().dataset(
            split, batch_size=batch_size, shard_index=shard_index, shard_count=shard_count
        )
        if split != "train":
            return ds
        bad = self.NAN_AT_BATCH

        def poison(index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            value = np.nan if index == bad else 0.0
            return {**batch, "poison": np.full((batch_size,), value, np.float32)}

        return ds.map_with_index(poison)

    def loss_and_metrics(self, outputs: Any, batch: Batch) -> tuple[Any, Metrics]:
        loss, metrics = super().loss_and_metrics(outputs, batch)
        if "poison" in batch:
            loss = loss + jnp.mean(batch["poison"])
        return loss, metrics


class ToyParityModel(nn.Module):
    """A non-CTM model with BatchNorm: MLP logits for every position at `ticks` fake ticks."""

    seq_len: int
    ticks: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> CTMOutput:
        h = nn.Dense(64)(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(h))
        logits = nn.Dense(2 * self.seq_len * self.ticks)(h)
        logits = logits.reshape(x.shape[0], 2 * self.seq_len, self.ticks)
        # Certainty rising with the tick: the last tick is the most certain.
        ramp = jnp.linspace(0.1, 0.9, self.ticks)
        certainties = jnp.broadcast_to(jnp.stack([1 - ramp, ramp]), (x.shape[0], 2, self.ticks))
        return CTMOutput(predictions=logits, certainties=certainties, synch_out=h)


class BatchNormParityTask(ParityTask):
    """Parity with a toy BatchNorm model: checks that the trainer is not CTM-specific and keeps
    the statistics a model updates in training."""

    mutable_collections = ("batch_stats",)

    def build_model(self) -> nn.Module:
        return ToyParityModel(self.seq_len)

    def project_params(self, params: Any) -> Any:
        return params
