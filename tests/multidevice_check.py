"""Sharded training on 8 fake CPU devices vs one device, for tests/test_sharding.py.

Run from the repo root: `python tests/multidevice_check.py [case ...]`. It forces 8 host devices
(XLA_FLAGS must be set before JAX starts, hence a separate process), then for every case trains
a few steps with the trainer's own pieces (build_experiment: mesh rules and state shardings; the
jitted train step with explicit in/out shardings under `sharding.activate`) on one device and on
the meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2). It prints one JSON line: per case and
mesh the losses, the largest parameter difference from the one-device run, and the partition
spec of every parameter and of its Adam mu as the arrays actually came out of the step.
"""

from __future__ import annotations

import os
import sys

# 8 fake devices; the lower LLVM optimisation level only makes the many small compiles quicker.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import common  # noqa: E402
from core.tree_paths import path_str  # noqa: E402
from parscale_jax.config import ParScaleConfig  # noqa: E402
from parscale_jax.model import ParScaleLM  # noqa: E402
from train_lib import checkpointing, sharding, trainer  # noqa: E402
from train_lib.task import Batch, Metrics, Task  # noqa: E402

MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
STEPS = 3
# Parameters agree to rtol 1e-5; atol 1e-6 (params are O(0.01 - 1)) covers the ones whose true
# gradient is zero (e.g. attention key biases), where Adam scales float noise up to ~1e-8.
RTOL, ATOL = 1e-5, 1e-6
# Adam's early updates are ~lr * sign(g) for |g| >> eps: a gradient entry that is float noise
# around zero (different, equally valid summation orders on different meshes) would move by
# +-lr on one mesh and -+lr on the other. eps = 1e-4 keeps updates continuous in such entries.
ADAM_EPS = 1e-4
BATCH = 8


class RandomTokensLMTask(Task):
    """Next-token cross-entropy of a ParScale LM on seeded random tokens (no corpus needed)."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__(config)
        self.model_config = ParScaleConfig.from_mapping(dict(config.model.items()))
        self.seq_len = int(config.task.seq_len)

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        vocab, length = self.model_config.vocab_size, self.seq_len
        offset = 0 if split == "train" else 10_000

        def make(index: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng([offset + index, shard_index])
            tokens = rng.integers(0, vocab, (batch_size, length + 1), dtype=np.int32)
            return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

        return grain.MapDataset.range(1000).map(make)

    def build_model(self) -> ParScaleLM:
        return ParScaleLM(self.model_config)

    def apply(self, model, variables, batch, *, train, rng=None, mutable=False) -> Any:  # noqa: ANN001
        return model.apply(variables, batch["inputs"])

    def loss_and_metrics(self, outputs: Any, batch: Batch) -> tuple[jax.Array, Metrics]:
        losses = optax.softmax_cross_entropy_with_integer_labels(outputs.logits, batch["targets"])
        return jnp.mean(losses), {}


def parscale_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=67,  # odd: the vocab dim cannot split over tensor=2 and is replicated
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            parscale_n=2,
            parscale_n_tokens=3,
            parscale_attn_smooth=0.1,
        )
    )
    config.task = ml_collections.ConfigDict(
        dict(name="tests.multidevice_check:RandomTokensLMTask", seq_len=8)
    )
    config.optim = common.optim_section(
        lr=1e-3,
        warmup_steps=0,
        schedule="constant",
        clip="global_norm",
        weight_decay=0.01,
        eps=ADAM_EPS,
    )
    config.train = common.train_section(total_steps=100, batch_size=BATCH, eval_every=0)
    config.mesh = common.mesh_section()
    return config


def ctm_parity_config() -> ml_collections.ConfigDict:
    from configs.ctm_parity import get_config

    config = get_config("test")
    _quick(config)
    return config


def ctm_maze_config() -> ml_collections.ConfigDict:
    """ResNet18-1 backbone with BatchNorm statistics updated by the step."""
    from configs.ctm_maze import get_config

    config = get_config("test")
    _quick(config)
    return config


def _quick(config: ml_collections.ConfigDict) -> None:
    """Full-size updates from step 0; global-norm clipping and no tick remat keep the programs
    (and their compile times) small; the real CTM otherwise."""
    config.model.remat_ticks = False
    config.optim.update(warmup_steps=0, clip="global_norm", eps=ADAM_EPS)
    config.train.update(batch_size=BATCH, eval_every=0, total_steps=100)


# case -> (config, meshes it runs on); the ResNet case is the slowest to compile: one mesh.
CASES = {
    "ctm_parity": (ctm_parity_config, tuple(MESHES)),
    "ctm_maze": (ctm_maze_config, ("2x2x2",)),
    "parscale": (parscale_config, tuple(MESHES)),
}


def flat(tree: Any) -> dict[str, Any]:
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def spec_str(array: jax.Array) -> list[Any]:
    """The array's PartitionSpec as JSON: one entry per dim (None, 'axis' or ['a', 'b'])."""
    spec = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
    return [list(s) if isinstance(s, tuple) else s for s in spec]


def train(
    config: ml_collections.ConfigDict, devices: list[jax.Device], initial: Any = None
) -> dict[str, Any]:
    """STEPS train steps on a mesh over `devices` (sizes from config.mesh), starting from a fresh
    init (jit with the state shardings as out_shardings) or from `initial`, put on the mesh."""
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh, devices)
    exp = trainer.build_experiment(config, mesh)
    data = exp.dataset("train")
    step = jax.jit(
        trainer.make_train_step(exp.task, exp.model, exp.tx, exp.schedule),
        in_shardings=(exp.state_shardings, exp.batch_sharding),
        out_shardings=(exp.state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    with sharding.activate(mesh, exp.logical_rules):
        if initial is None:
            init = jax.jit(exp.init, out_shardings=exp.state_shardings)
            state = init(jax.random.key(int(config.train.seed)))
        else:
            state = jax.device_put(initial, exp.state_shardings)
        initial_host = jax.device_get(state)
        losses = []
        for i in range(STEPS):
            state, metrics = step(state, sharding.put_batch(data[i], exp.batch_sharding))
            losses.append(float(metrics["loss"]))
    mu = {}
    for path, leaf in flat(state.opt_state).items():
        if "/mu/" in f"/{path}/":
            mu[path.split("/mu/", 1)[1]] = spec_str(leaf)
    print(f"{dict(mesh.shape)}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return {
        "exp": exp,
        "state": state,
        "initial": initial_host,
        "losses": losses,
        "params": {k: np.asarray(v) for k, v in flat(state.params).items()},
        "buffers": {k: np.asarray(v) for k, v in flat(state.buffers).items()},
        "specs": {k: spec_str(v) for k, v in flat(state.params).items()},
        "mu_specs": mu,
    }


def worst_difference(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float, atol: float
) -> dict[str, Any]:
    """The leaf furthest from `np.allclose(got, want, rtol, atol)`: its path, its largest
    |got - want| and `ratio` = max |got - want| / (atol + rtol |want|) (<= 1 means close)."""
    worst: dict[str, Any] = {"path": None, "ratio": 0.0, "abs": 0.0}
    for path, w in want.items():
        g = got[path]
        if w.dtype.kind not in "fc":
            if not np.array_equal(g, w):
                return {"path": path, "ratio": float("inf"), "abs": float("inf")}
            continue
        diff = np.abs(g.astype(np.float64) - w)
        ratio = float(np.max(diff / (atol + rtol * np.abs(w)))) if diff.size else 0.0
        if ratio > worst["ratio"]:
            worst = {"path": path, "ratio": ratio, "abs": float(diff.max())}
    return worst


def run_case(name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    make, meshes = CASES[name]
    single = make()
    single.mesh.update(data=1, fsdp=1, tensor=1)
    base = train(single, jax.devices()[:1])  # initialised on one device, then the same state

    out: dict[str, Any] = {"single": {"losses": base["losses"]}}
    for mesh_name in meshes:
        d, f, t = MESHES[mesh_name]
        config = make()
        config.mesh.update(data=d, fsdp=f, tensor=t)
        got = train(config, jax.devices(), base["initial"])
        out[mesh_name] = {
            "losses": got["losses"],
            "params": worst_difference(got["params"], base["params"], RTOL, ATOL),
            "buffers": worst_difference(got["buffers"], base["buffers"], RTOL, ATOL),
            "specs": got["specs"],
            "mu_specs": got["mu_specs"],
        }
        if name == "parscale" and mesh_name == "2x2x2":
            out["reshard"] = reshard(got["state"], got["exp"], make())
    out["seconds"] = time.perf_counter() - t0
    return out


def reshard(state: Any, exp: trainer.Experiment, config: ml_collections.ConfigDict) -> dict:
    """Saves `state` (trained on exp's mesh) and restores it for a (2, 4, 1) mesh, with that
    mesh's shardings as the restore target, as a resumed run on another mesh does."""
    config.mesh.update(data=2, fsdp=4, tensor=1)
    target_exp = trainer.build_experiment(config, sharding.make_mesh(config.mesh))
    with tempfile.TemporaryDirectory() as tmp:
        data = iter(exp.dataset("train").to_iter_dataset())
        with checkpointing.Checkpointer(tmp, save_every=1, keep=1, async_save=False) as ckpt:
            ckpt.save(1, state, data, {"step": 1}, force=True)
            ckpt.wait_until_finished()
            target = checkpointing.abstract_with_shardings(
                target_exp.abstract_state, target_exp.state_shardings
            )
            with jax.set_mesh(target_exp.mesh):
                restored, _ = ckpt.restore(1, target, None)
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(restored.params), strict=True
        )
    )
    kernel = "layers_0/mlp/gate_proj/kernel"
    before, after = flat(state.params)[kernel], flat(restored.params)[kernel]
    return {
        "values_equal": same,
        "shard_shapes": [
            list(before.sharding.shard_shape(before.shape)),
            list(after.sharding.shard_shape(after.shape)),
        ],
        "saved_specs": {k: spec_str(v) for k, v in flat(state.params).items()},
        "specs": {k: spec_str(v) for k, v in flat(restored.params).items()},
        "mu_specs": {
            k.split("/mu/", 1)[1]: spec_str(v)
            for k, v in flat(restored.opt_state).items()
            if "/mu/" in f"/{k}/"
        },
    }


def main(argv: list[str]) -> None:
    assert jax.device_count() == 8, jax.devices()
    names = argv or list(CASES)
    results = {name: run_case(name) for name in names}
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
