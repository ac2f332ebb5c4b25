"""`train_and_evaluate(config, workdir)`: the training loop every model in this repo shares.

Order of work: validate the whole config (task, model, optimiser, trainer, mesh) -> build the
mesh, model, optimiser and data -> restore the latest checkpoint or initialise -> compile the
train step (jit with explicit shardings, state donated) -> loop. Metrics are fetched one step
late so the host never makes the device wait; a step that is about to be checkpointed or
evaluated is fetched first, so a non-finite state is never saved.

Resume is exact: the train state holds the step, the optimiser state (including the quantile
clipper's history) and the base dropout key (each step folds its number into it), and the
checkpoint holds the grain iterator position, so a killed run that is re-run with the same
command ends with bit-identical parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from core.errors import ConfigError, DataError, NonFiniteError, WorkdirInUseError
from core.tree_paths import path_str
from train_lib import checkpointing, metrics, mfu, optim, sharding, workdir_lock
from train_lib.task import Batch, Task, make_task

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator.

    `buffers` holds the model's non-trainable variable collections (e.g. {'buffers': {...}} for
    the CTM's neuron indices); the optimiser never touches them, and only the task's
    `mutable_collections` (e.g. BatchNorm statistics) change, by the forward pass. `rng` is the base
    dropout key: step s uses `fold_in(rng, s)`, so no key chain has to be replayed on resume.
    """

    step: jax.Array
    params: Any
    buffers: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What `train_and_evaluate` returns."""

    step: int  # optimiser updates applied when the run ended
    eval_metrics: dict[str, float]  # final evaluation (empty if none ran)
    resumed_from: int | None  # checkpoint step the run started from, if any
    already_finished: bool  # the workdir held a finished run; nothing was trained
    preempted: bool = False  # SIGTERM: saved a checkpoint at `step` and stopped early


def log(message: str) -> None:
    """Progress output: an absl INFO record (timestamped, on stderr) on process 0 only. The other
    processes log the same line at DEBUG, so `-v 1` shows every process's view.

    The launchers (`launch.cli.start`) show this project's INFO records and hide the libraries'
    (Orbax logs every checkpoint save at INFO)."""
    level = logging.INFO if jax.process_index() == 0 else logging.DEBUG
    logging.log(level, "%s", message, stacklevel=2)  # the record names the caller's line


def warn(message: str) -> None:
    """Like `log`, at WARNING (damaged checkpoints, fallbacks): shown even when INFO is hidden."""
    level = logging.WARNING if jax.process_index() == 0 else logging.DEBUG
    logging.log(level, "%s", message, stacklevel=2)


# ------------------------------------------------------------------------------------------------
# Config validation (nothing here traces or compiles)


def validate_train_config(train: Mapping[str, Any]) -> None:
    """One-line ConfigError naming the first impossible field of the `train` section."""

    def fail(field: str, allowed: str) -> None:
        raise ConfigError(f"train.{field}={train[field]!r} is invalid: {allowed}")

    for name in ("total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(train[name]) < 1:
            fail(name, "must be >= 1")
    if int(train.get("microbatches", 1)) < 1:
        fail("microbatches", "must be >= 1")
    for name in ("eval_every", "eval_batches", "data_threads", "data_prefetch"):
        if int(train[name]) < 0:
            fail(name, "must be >= 0")
    if int(train["eval_every"]) > 0 and int(train["eval_batches"]) < 1:
        fail("eval_batches", "must be >= 1 when train.eval_every > 0")
    profile_window(train)
    for name in ("async_checkpointing", "checkpoint_checksums"):
        if not isinstance(train.get(name, True), bool):
            fail(name, "must be true or false")
    if train.get("transfer_guard", "allow") not in TRANSFER_GUARD_LEVELS:
        fail("transfer_guard", f"must be one of {', '.join(TRANSFER_GUARD_LEVELS)}")
    mfu_peak_setting(train)


# jax.transfer_guard levels for train.transfer_guard; "allow" (the default) checks nothing.
TRANSFER_GUARD_LEVELS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")


def mfu_peak_setting(train: Mapping[str, Any]) -> str | float:
    """`train.mfu_peak`: '' (the chip table), 'measure' (this machine's f32 matmul peak) or a
    positive FLOP/s per device (a number, or its string from the command line); ConfigError
    naming the field when it is none of them."""
    value = train.get("mfu_peak", "")
    if isinstance(value, str) and value.strip().lower() in ("", "measure"):
        return value.strip().lower()
    number = None
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ConfigError(
            f"train.mfu_peak={value!r} is invalid: must be '' (the chip table), 'measure' "
            "(this machine's f32 matmul peak) or a positive number of FLOP/s per device"
        )
    return number


def resolve_mfu_peak(train: Mapping[str, Any]) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it comes from) for the MFU column; None when no peak is
    known ('' on a chip the table lacks, e.g. CPU). 'measure' times a matmul now."""
    setting = mfu_peak_setting(train)
    kind = jax.devices()[0].device_kind
    if setting == "measure":
        return mfu.measured_matmul_peak(), f"measured f32 matmul peak on {kind}"
    if setting == "":
        peak = mfu.peak_flops(kind, "bfloat16")
        return peak, f"dense bf16 peak of {kind}, chip table"
    return float(setting), "train.mfu_peak"


def profile_window(train: Mapping[str, Any]) -> tuple[int, int] | None:
    """(START, STOP) of `train.profile_steps` ('START,STOP': trace the updates that take the
    state from step START to step STOP), None when it is off ('' or absent); ConfigError when
    it is neither."""
    value = train.get("profile_steps") or ""
    if isinstance(value, str) and not value.strip():
        return None
    window = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            window = tuple(int(part) for part in value.split(","))
    if (
        window is None
        or len(window) != 2
        or not 0 <= window[0] < window[1] <= int(train["total_steps"])
    ):
        raise ConfigError(
            f"train.profile_steps={value!r} is invalid: must be '' (off) or 'START,STOP' with "
            "0 <= START < STOP <= train.total_steps"
        )
    return window


def validate_config(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> tuple[Task, jax.sharding.Mesh]:
    """Validates every section and returns the task and mesh; raises ConfigError otherwise.

    `mesh` replaces the one built from `config.mesh` over the local devices (launch.compile
    passes a mesh over a TPU topology's compile-only devices)."""
    for section in ("task", "optim", "train", "mesh"):
        if section not in config:
            raise ConfigError(f"{section} is missing: the config needs a '{section}' section")
    validate_train_config(config.train)
    optim.validate_optim_config(config.optim, int(config.train.total_steps))
    task = make_task(config)  # validates the task and model sections
    if mesh is None:
        mesh = sharding.make_mesh(config.mesh)
    batch = int(config.train.batch_size)
    dp = sharding.data_parallel_size(mesh, sharding.logical_rules(config.mesh))
    if batch % dp or batch % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch} is invalid: must be divisible by the data-parallel size "
            f"{dp} and the process count {jax.process_count()}"
        )
    micro = int(config.train.get("microbatches", 1))
    if batch % (micro * dp):
        raise ConfigError(
            f"train.microbatches={micro} is invalid: train.batch_size={batch} must be divisible "
            f"by microbatches x the data-parallel size {dp} (every device takes equal rows of "
            "every microbatch)"
        )
    return task, mesh


# ------------------------------------------------------------------------------------------------
# Steps (pure functions of the state; jitted by the caller)


def init_state(
    task: Task,
    model: nn.Module,
    tx: optax.GradientTransformation,
    batch: Batch,
    rng: jax.Array,
) -> TrainState:
    """Fresh train state: params, buffers, optimiser state, step 0, base dropout key."""
    param_rng, dropout_rng = jax.random.split(rng)
    variables = dict(task.init_variables(model, param_rng, batch))
    variables["params"] = task.project_params(variables["params"])
    return state_from_variables(variables, tx, dropout_rng)


def state_from_variables(
    variables: Mapping[str, Any],
    tx: optax.GradientTransformation,
    dropout_rng: jax.Array,
    step: int = 0,
) -> TrainState:
    """A train state holding `variables` ({'params': ..., <collections>}) at `step`, with a fresh
    optimiser state and `dropout_rng` as the base dropout key."""
    variables = dict(variables)
    params = variables.pop("params")
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        buffers=variables,
        opt_state=tx.init(params),
        rng=dropout_rng,
    )


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(param init key, base dropout key) of `train.seed`: the one split every run makes."""
    param_rng, dropout_rng = jax.random.split(jax.random.key(int(seed)))
    return param_rng, dropout_rng


def checkpoint_meta(
    exp: Experiment, step: int, eval_metrics: Mapping[str, float], **extra: Any
) -> dict[str, Any]:
    """The JSON saved beside every checkpoint: config, step, last eval, finished flag."""
    return {
        "config": exp.config_json,
        "step": step,
        "eval": dict(eval_metrics),
        "finished": step >= exp.total_steps,
        **extra,
    }


def make_train_step(
    task: Task,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    microbatches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """state, batch -> new state, scalar metrics (loss, task metrics, norms, lr).

    `microbatches` > 1 (`train.microbatches`, gradient accumulation): the batch is split into
    that many equal microbatches, processed one after the other by a `lax.scan` (activations of
    one microbatch live at a time), and the mean of their gradients makes one optimiser update.
    Microbatch j takes rows j, j + k, j + 2k, ... of the batch, so each device's rows contribute
    to every microbatch (no data moves between devices). The loss and metrics are the means over
    the microbatches -- for a loss that is a mean over examples, the whole batch's -- and the
    mutable collections (BatchNorm statistics) are updated microbatch by microbatch. Microbatch
    j draws its dropout from `fold_in(step key, j)`."""
    trainable = task.trainable()
    mutable = list(task.mutable_collections)

    def loss_fn(
        params: Any, buffers: Any, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
        variables = {"params": params, **buffers}
        if mutable:
            outputs, updated = task.apply(
                model, variables, batch, train=True, rng=rng, mutable=mutable
            )
        else:
            outputs, updated = task.apply(model, variables, batch, train=True, rng=rng), {}
        loss, step_metrics = task.loss_and_metrics(outputs, batch)
        return loss, (step_metrics, updated)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated(
        params: Any, buffers: Any, batch: Batch, rng: jax.Array
    ) -> tuple[tuple[jax.Array, tuple[dict[str, jax.Array], Any]], Any]:
        """grad_fn's result for the whole batch, from `microbatches` sequential pieces."""

        def split(x: jax.Array) -> jax.Array:
            rows = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
            return jnp.moveaxis(rows, 1, 0)  # [j] = rows j, j + k, ...

        def one(carry: tuple[Any, Any], piece: tuple[Batch, jax.Array]) -> tuple[Any, Any]:
            grad_sum, buffers = carry
            micro, index = piece
            (loss, (step_metrics, updated)), grads = grad_fn(
                params, buffers, micro, jax.random.fold_in(rng, index)
            )
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, {**buffers, **updated}), (loss, step_metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        pieces = (jax.tree.map(split, dict(batch)), jnp.arange(microbatches))
        (grad_sum, buffers), (losses, step_metrics) = jax.lax.scan(one, (zeros, buffers), pieces)
        grads = jax.tree.map(lambda g: g / microbatches, grad_sum)
        step_metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), step_metrics)
        updated = {name: buffers[name] for name in mutable}
        return (jnp.mean(losses), (step_metrics, updated)), grads

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        compute = accumulated if microbatches > 1 else grad_fn
        (loss, (step_metrics, updated)), grads = compute(
            state.params, state.buffers, batch, dropout_rng
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = task.project_params(optax.apply_updates(state.params, updates))
        if trainable is not None:  # frozen params stay exactly as they were
            mask = optim.trainable_mask(params, trainable)
            params = jax.tree.map(lambda t, new, old: new if t else old, mask, params, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            buffers={**state.buffers, **updated},
            opt_state=opt_state,
        )
        out = {
            "loss": loss,
            **step_metrics,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(params),
            "lr": schedule(state.step),
        }
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}

    return train_step


def make_eval_step(
    task: Task, model: nn.Module
) -> Callable[[Any, Any, Batch], dict[str, jax.Array]]:
    def eval_step(params: Any, buffers: Any, batch: Batch) -> dict[str, jax.Array]:
        outputs = task.apply(model, {"params": params, **buffers}, batch, train=False)
        return {
            k: jnp.asarray(v, jnp.float32) for k, v in task.eval_metrics(outputs, batch).items()
        }

    return eval_step


# ------------------------------------------------------------------------------------------------
# Helpers of the loop


def _fetch(device_metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(device_metrics)).items()}


def _raise_if_non_finite(
    values: Mapping[str, float], step: int, split: str, ckpt: checkpointing.Checkpointer
) -> None:
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if not bad:
        return
    ckpt.wait_until_finished()  # an in-flight save is of an earlier, checked state: let it land
    latest = ckpt.latest_step()
    where = f"step {latest} in {ckpt.directory}" if latest is not None else "none"
    listed = ", ".join(f"{name}={values[name]}" for name in bad)
    raise NonFiniteError(
        f"non-finite {split} metric at step {step}: {listed}. Stopped without saving this "
        f"state; latest checkpoint: {where}.",
        step=step,
        metrics=tuple(bad),
    )


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    # to_json_best_effort turns tuples, placeholders and odd types into JSON; round trip to dict.
    return json.loads(config.to_json_best_effort())


def _log_config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    old, new = _flatten(saved), _flatten(current)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    for key in changed:
        log(f"config differs from the checkpoint's: {key}: {old.get(key)!r} -> {new.get(key)!r}")


def _read_options(train: Mapping[str, Any]) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=int(train["data_threads"]), prefetch_buffer_size=int(train["data_prefetch"])
    )


# ------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything built from a validated config, before anything is compiled."""

    config: ml_collections.ConfigDict
    config_json: dict[str, Any]
    task: Task
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    local_batch: int  # this process's share of train.batch_size
    example_batch: dict[str, Any]
    abstract_state: TrainState
    state_shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    # mesh.rules: trace under sharding.activate(mesh, logical_rules) for the activation constraints
    logical_rules: sharding.LogicalRules = ()

    @property
    def total_steps(self) -> int:
        return int(self.config.train.total_steps)

    def init(self, rng: jax.Array) -> TrainState:
        return init_state(self.task, self.model, self.tx, self.example_batch, rng)

    def dataset(self, split: str) -> grain.MapDataset:
        return self.task.dataset(
            split,
            batch_size=self.local_batch,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )


def build_experiment(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> Experiment:
    """Validates the config (raising ConfigError) and builds model, optimiser and shardings
    (on `mesh` when given, e.g. a TPU topology's devices for AOT compilation)."""
    task, mesh = validate_config(config, mesh)
    total_steps = int(config.train.total_steps)
    local_batch = int(config.train.batch_size) // jax.process_count()
    model = task.build_model()
    tx, schedule = optim.make_optimizer(config.optim, total_steps, task.trainable())
    example = task.example_batch(local_batch)
    abstract_state = jax.eval_shape(
        lambda key: init_state(task, model, tx, example, key), jax.random.key(0)
    )
    rules = sharding.logical_rules(config.mesh)
    return Experiment(
        config=config,
        config_json=_config_json(config),
        task=task,
        model=model,
        tx=tx,
        schedule=schedule,
        mesh=mesh,
        local_batch=local_batch,
        example_batch=example,
        abstract_state=abstract_state,
        state_shardings=sharding.state_shardings(
            mesh, abstract_state, rules, sharding.model_param_axes(model)
        ),
        batch_sharding=sharding.batch_sharding(mesh, rules),
        logical_rules=rules,
    )


def restore_run(workdir: str | Path) -> tuple[Experiment, TrainState, int]:
    """(experiment, train state, step) of the latest checkpoint of a finished or running workdir,
    for evaluation and analysis tools. Read-only: nothing in the workdir is written or pruned."""
    workdir = checkpointing.as_path(workdir)  # gs:// stays gs://
    config_path = workdir / CONFIG_FILE
    if not config_path.exists():
        raise ConfigError(f"{config_path} not found: is {workdir} a training workdir?")
    try:
        saved = json.loads(config_path.read_text())
        assert isinstance(saved, dict), f"expected a JSON object, got {type(saved).__name__}"
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError) as e:
        raise DataError(f"{config_path} is not a run's config ({e})") from None
    exp = build_experiment(ml_collections.ConfigDict(saved))
    # Read-only: opening the manager never prunes or cleans up (the run may be live).
    with checkpointing.Checkpointer(
        workdir / CHECKPOINT_DIR, save_every=1, keep=1_000_000, read_only=True
    ) as ckpt:
        step = checkpointing.newest_intact_readonly(workdir / CHECKPOINT_DIR, warn)
        if step is None:
            raise ConfigError(f"no checkpoint in {workdir / CHECKPOINT_DIR}")
        with jax.set_mesh(exp.mesh):
            target = checkpointing.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
            state, _ = ckpt.restore(step, target, None)
    return exp, state, step


def write_workdir(
    exp: Experiment,
    workdir: str | Path,
    variables: Mapping[str, Any],
    step: int = 0,
    **meta: Any,
) -> TrainState:
    """Starts a new training workdir from given variables (e.g. imported reference weights):
    config.json plus a checkpoint at `step` holding them, a fresh optimiser state, the base
    dropout key of train.seed and the data iterator at its start. `restore_run` reads it and
    `train_and_evaluate` resumes it like any other run. `meta` is added to the checkpoint's
    metadata. Refuses (ConfigError) a directory that already holds a run."""
    workdir = checkpointing.as_path(workdir)
    if (workdir / CONFIG_FILE).exists() or (workdir / CHECKPOINT_DIR).exists():
        raise ConfigError(
            f"{workdir} already holds a workdir (config.json or checkpoints/); pick a new one"
        )
    _, dropout_rng = seed_keys(exp.config.train.seed)
    state = state_from_variables(variables, exp.tx, dropout_rng, step)
    with jax.set_mesh(exp.mesh):
        state = jax.device_put(state, exp.state_shardings)
    workdir.mkdir(parents=True, exist_ok=True)
    train_iter = iter(exp.dataset("train").to_iter_dataset(_read_options(exp.config.train)))
    with checkpointing.Checkpointer(
        workdir / CHECKPOINT_DIR, save_every=1, keep=1_000_000, async_save=False
    ) as ckpt:
        ckpt.save(step, state, train_iter, checkpoint_meta(exp, step, {}, **meta), force=True)
    if jax.process_index() == 0:
        (workdir / CONFIG_FILE).write_text(json.dumps(exp.config_json, indent=2) + "\n")
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> RunSummary:
    """Trains (or resumes training) as `config` says, writing everything under `workdir`.

    Raises ConfigError before any compilation if the config is impossible, CheckpointMismatchError
    if the workdir holds a checkpoint of a differently shaped model, and NonFiniteError (after
    letting earlier saves finish, saving nothing new) if a metric becomes non-finite.

    SIGTERM (preemption) while it runs: the step in progress finishes, that state and the data
    iterator are saved (off-interval if need be), and it returns normally with `preempted` set;
    running it again resumes there. `workdir` may be a cloud URI (`gs://...`, via etils.epath).
    """
    exp = build_experiment(config)
    workdir = checkpointing.as_path(workdir)
    train = config.train
    with (
        _workdir_lock(workdir),  # before the manager: it would clean up a live run's saves
        contextlib.ExitStack() as stack,
    ):
        # Verified before the manager opens: it reads every step's metadata as it starts.
        latest = checkpointing.select_intact_step(workdir / CHECKPOINT_DIR, warn)
        ckpt = stack.enter_context(
            checkpointing.Checkpointer(
                workdir / CHECKPOINT_DIR,
                save_every=int(train.checkpoint_every),
                keep=int(train.keep_checkpoints),
                async_save=bool(train.async_checkpointing),
                checksums=bool(train.get("checkpoint_checksums", True)),
            )
        )
        watch = stack.enter_context(
            checkpointing.PreemptionWatch(ckpt, signals=(signal.SIGTERM, signal.SIGINT))
        )
        if latest is not None and latest >= exp.total_steps:
            final_eval = dict(ckpt.restore_meta(latest).get("eval") or {})
            log(
                f"run in {workdir} already finished at step {latest} (train.total_steps="
                f"{exp.total_steps}); nothing to do. Final eval: {_format(final_eval)}"
            )
            return RunSummary(latest, final_eval, latest, already_finished=True)
        train_iter = iter(exp.dataset("train").to_iter_dataset(_read_options(train)))
        state = _restore_or_init(exp, ckpt, latest, train_iter)
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / CONFIG_FILE).write_text(json.dumps(exp.config_json, indent=2) + "\n")
        last_eval, step = _train_loop(exp, ckpt, workdir, state, train_iter, watch=watch)
    if step < exp.total_steps:
        return RunSummary(step, last_eval, latest, already_finished=False, preempted=True)
    log(f"finished at step {exp.total_steps}; checkpoints in {workdir / CHECKPOINT_DIR}")
    return RunSummary(exp.total_steps, last_eval, latest, already_finished=False)


def resume_point(workdir: str | Path) -> str:
    """Where re-running a training command on `workdir` starts: its newest committed checkpoint
    (read from the directory names alone; nothing is opened or cleaned up)."""
    steps = checkpointing.committed_steps(checkpointing.as_path(workdir) / CHECKPOINT_DIR)
    if not steps:
        return f"no checkpoint in {workdir}: re-running the command starts from step 0"
    return f"re-running the command resumes from the checkpoint at step {steps[-1]} in {workdir}"


@contextlib.contextmanager
def _workdir_lock(workdir: epath.Path) -> Iterator[None]:
    """Holds `<workdir>/LOCK` (one writer per workdir; see train_lib.workdir_lock). With several
    processes, process 0 holds it and the others learn whether it could."""
    if jax.process_count() == 1:
        with workdir_lock.WorkdirLock(workdir):
            yield
        return
    lock, error = None, None
    if jax.process_index() == 0:
        lock = workdir_lock.WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirInUseError as e:
            lock, error = None, e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not ok:
        raise WorkdirInUseError(f"workdir {workdir} is in use (process 0 could not lock it)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _restore_or_init(
    exp: Experiment,
    ckpt: checkpointing.Checkpointer,
    latest: int | None,
    train_iter: grain.DatasetIterator,
) -> TrainState:
    """The latest checkpoint (state and data position), or a fresh state from train.seed."""
    with sharding.activate(exp.mesh, exp.logical_rules):
        if latest is not None:
            target = checkpointing.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
            state, meta = ckpt.restore(latest, target, train_iter)
            log(f"restored checkpoint at step {latest} from {ckpt.directory}")
            _log_config_changes(meta.get("config", {}), exp.config_json)
            return state
        source = _init_from_source(exp)  # before init: a bad init_from fails fast
        init = jax.jit(exp.init, out_shardings=exp.state_shardings)
        state = init(jax.random.key(int(exp.config.train.seed)))
        state = _warm_start(exp, state, source)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(f"initialised {type(exp.model).__name__} with {n_params:,} parameters")
    return state


def read_variables(
    workdir: str | Path, mesh: jax.sharding.Mesh, shardings: Any = None
) -> tuple[dict[str, Any], int]:
    """({'params': ..., <collections>}, step) of the latest checkpoint of a training workdir,
    without its optimiser state. Read-only (no checkpoint manager is opened on it). A leaf gets
    the sharding at its path in `shardings` (a tree like the variables) if any, else replicated.
    """
    directory = checkpointing.as_path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise ConfigError(
            f"init_from={str(workdir)!r} is invalid: {directory} does not exist (expected the "
            "workdir of a training run with a checkpoint)"
        )
    # Committed checkpoints only, newest intact one (checksums verified).
    step = checkpointing.newest_intact_readonly(directory, warn)
    if step is None:
        raise ConfigError(f"init_from={str(workdir)!r} is invalid: no checkpoint in {directory}")
    path = directory / str(step) / checkpointing.STATE
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(path).item_metadata
    saved = getattr(saved, "tree", saved)
    by_path = {}
    if shardings is not None:
        flat, _ = jax.tree_util.tree_flatten_with_path(shardings)
        by_path = {path_str(k): v for k, v in flat}
    replicated = sharding.replicated(mesh)
    wanted = {"params": saved["params"], **dict(saved.get("buffers") or {})}
    target = jax.tree_util.tree_map_with_path(
        lambda k, m: jax.ShapeDtypeStruct(
            m.shape, m.dtype, sharding=by_path.get(path_str(k), replicated)
        ),
        wanted,
    )
    restore_target = {"params": target["params"]}
    buffers = {k: v for k, v in target.items() if k != "params"}
    if buffers:
        restore_target["buffers"] = buffers
    restored = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(
            restore_target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(restore_target),
            partial_restore=True,
        ),
    )
    return {"params": restored["params"], **dict(restored.get("buffers") or {})}, step


def _init_from_source(exp: Experiment) -> dict[str, Any] | None:
    """The variables of the latest checkpoint of the `init_from` workdir (None when unset)."""
    init_from = exp.config.get("init_from") or None
    if not init_from:
        return None
    shardings = exp.state_shardings
    source, step = read_variables(
        init_from, exp.mesh, {"params": shardings.params, **shardings.buffers}
    )
    log(f"init_from: read the variables of step {step} of {init_from}")
    return source


def _warm_start(exp: Experiment, state: TrainState, source: Any = None) -> TrainState:
    """A fresh state's variables replaced by what the task starts from (`Task.warm_start`, given
    the `init_from` source variables); the optimiser state is re-initialised for them, the step
    stays 0."""
    shardings = exp.state_shardings
    started = exp.task.warm_start({"params": state.params, **state.buffers}, source)
    if started is None:
        return state
    started = dict(started)
    params = jax.device_put(started.pop("params"), shardings.params)
    buffers = jax.device_put(started, shardings.buffers)
    params = jax.jit(exp.task.project_params, out_shardings=shardings.params)(params)
    opt_state = jax.jit(exp.tx.init, out_shardings=shardings.opt_state)(params)
    return state.replace(params=params, buffers=buffers, opt_state=opt_state)


def jit_train_step(exp: Experiment) -> Any:
    """The jitted (not yet lowered) train step with the experiment's shardings, state donated.

    The training loop and `launch.compile` (AOT for a TPU topology) both lower this one."""
    microbatches = int(exp.config.train.get("microbatches", 1))
    step = exp.task.make_train_step(exp.model, exp.tx, exp.schedule, microbatches)
    if step is None:
        step = make_train_step(exp.task, exp.model, exp.tx, exp.schedule, microbatches)
    return jax.jit(
        step,
        in_shardings=(exp.state_shardings, exp.batch_sharding),
        out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
        donate_argnums=0,
    )


def _compile_steps(exp: Experiment, state: TrainState, batch: Batch, eval_batch: Batch | None):
    """AOT-compiled train step (state donated) and eval step (None without eval batches)."""
    replicated = sharding.replicated(exp.mesh)
    train_step = jit_train_step(exp)
    log("compiling train step ...")
    t0 = time.perf_counter()
    with sharding.activate(exp.mesh, exp.logical_rules):
        train_step = train_step.lower(state, batch).compile()
        eval_step = None
        if eval_batch is not None:
            shardings = exp.state_shardings
            eval_step = jax.jit(
                make_eval_step(exp.task, exp.model),
                in_shardings=(shardings.params, shardings.buffers, exp.batch_sharding),
                out_shardings=replicated,
            )
            eval_step = eval_step.lower(state.params, state.buffers, eval_batch).compile()
    log(f"compiled in {time.perf_counter() - t0:.1f}s")
    return train_step, eval_step


def _train_loop(
    exp: Experiment,
    ckpt: checkpointing.Checkpointer,
    workdir: epath.Path,
    state: TrainState,
    train_iter: grain.DatasetIterator,
    *,
    watch: checkpointing.PreemptionWatch | None = None,
) -> tuple[dict[str, float], int]:
    """Runs the steps from state.step to total_steps, or until `watch` reports a preemption
    (then that step is saved and waited for); returns the last eval metrics and the step."""
    train = exp.config.train
    total_steps, log_every, eval_every = (
        exp.total_steps,
        int(train.log_every),
        int(train.eval_every),
    )
    start_step = int(jax.device_get(state.step))
    put = lambda batch: sharding.put_batch(batch, exp.batch_sharding)

    # Eval batches: the first `eval_batches` of the held-out stream, the same at every eval.
    eval_batches = []
    if eval_every > 0:
        eval_ds = exp.dataset("eval")
        eval_batches = [put(eval_ds[i]) for i in range(int(train.eval_batches))]
    batch = put(next(train_iter))
    train_step, eval_step = _compile_steps(exp, state, batch, (eval_batches or [None])[0])

    # Records after start_step are of steps this run redoes (a run killed before its next
    # checkpoint, or before its first one): dropped, so the files describe this run.
    writer = metrics.MetricWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0)
    flops_per_example = exp.task.train_flops_per_example()
    peak, peak_source = resolve_mfu_peak(train) if flops_per_example else (None, "")
    if peak is not None:
        log(f"MFU against {peak:.4g} FLOP/s per device ({peak_source})")
    elif flops_per_example:
        log(
            f"no MFU: no peak for {jax.devices()[0].device_kind} "
            "(train.mfu_peak='measure' or a number sets one)"
        )
    progress = metrics.Progress(
        total_steps,
        int(train.batch_size),
        start_step,
        exp.task.tokens_per_example,
        n_devices=exp.mesh.size,
        flops_per_example=flops_per_example,
        peak_per_device=peak,
    )
    interval = metrics.MeanAccumulator()
    last_eval: dict[str, float] = {}

    # Batch i of the training stream's first batches (a fixed slice, read again at every eval):
    # what a task's `eval_buffers` may use, e.g. to re-estimate BatchNorm statistics.
    train_slice = exp.dataset("train")
    train_batch = lambda i: put(train_slice[i])

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with jax.set_mesh(exp.mesh):
            buffers = exp.task.eval_buffers(exp.model, state.params, state.buffers, train_batch)
            outs = [eval_step(state.params, buffers, b) for b in eval_batches]
        values = [_fetch(o) for o in outs]
        means = {k: sum(v[k] for v in values) / len(values) for k in values[0]}
        _raise_if_non_finite(means, step, "eval", ckpt)
        writer.write_scalars(step, means, split="eval")
        log(f"eval at step {step}: {_format(means)}")
        progress.exclude(time.perf_counter() - t0)  # step rates measure training only
        return means

    def consume(step: int, device_metrics: dict[str, jax.Array]) -> None:
        values = _fetch(device_metrics)
        _raise_if_non_finite(values, step, "train", ckpt)
        interval.add(values)
        if step % log_every == 0 or step == total_steps:
            means = interval.pop()
            writer.write_scalars(step, means, split="train")
            log(progress.line(step, means, exp.task.progress_keys))

    log(f"training from step {start_step} to {total_steps}")
    profiler = _Profiler(profile_window(train), workdir / metrics.TENSORBOARD_DIR)
    pending: tuple[int, dict[str, jax.Array]] | None = None
    # train.transfer_guard: implicit host<->device transfers in the steps are logged or refused
    # (batches go up with make_array_from_process_local_data, metrics come down with
    # jax.device_get: both explicit). Checkpoint saves are left to Orbax as they are ("allow").
    try:
        with jax.transfer_guard(str(train.get("transfer_guard", "allow"))):
            for step in range(start_step, total_steps):
                progress.exclude(profiler.before_step(step, state))  # writing a trace
                if batch is None:
                    batch = put(next(train_iter))
                with jax.set_mesh(exp.mesh):
                    state, step_metrics = train_step(state, batch)
                batch, done = None, step + 1
                if pending is not None:
                    consume(*pending)  # the previous step: its values are ready or nearly so
                pending = (done, step_metrics)
                want_eval = eval_every > 0 and (done % eval_every == 0 or done == total_steps)
                # Every process asks at every step (multi-host: they agree on the step to stop at).
                preempted = watch is not None and watch.reached(done) and done < total_steps
                want_save = ckpt.should_save(done) or done == total_steps or preempted
                if want_eval or want_save:
                    consume(*pending)  # check this step before it is evaluated or saved
                    pending = None
                    if want_eval:
                        last_eval = evaluate(state, done)
                    if want_save:
                        meta = checkpoint_meta(exp, done, last_eval)
                        with jax.transfer_guard("allow"):
                            ckpt.save(done, state, train_iter, meta, force=True)
                if preempted:
                    with jax.transfer_guard("allow"):
                        ckpt.wait_until_finished()
                    if watch.received == signal.SIGINT:
                        log(f"interrupted (Ctrl-C) at step {done}: saved checkpoint, exiting")
                    else:
                        log(f"preempted at step {done}: saved checkpoint, exiting")
                    return last_eval, done
            profiler.before_step(total_steps, state)
            if pending is not None:
                consume(*pending)
    finally:
        profiler.close()
        writer.close()
    ckpt.wait_until_finished()
    return last_eval, total_steps


class _Profiler:
    """`train.profile_steps`: an XLA trace (`jax.profiler`) of the updates that take the state
    from step START to STOP, written under `log_dir`/plugins/profile/<run>/ for TensorBoard's
    profile plugin. Process 0 only; a run resumed inside the window traces the rest of it."""

    def __init__(self, window: tuple[int, int] | None, log_dir: epath.Path) -> None:
        self._window = window if jax.process_index() == 0 else None
        self._log_dir = log_dir
        self._tracing = False

    def before_step(self, step: int, state: TrainState) -> float:
        """Called before the update from `step` (and with total_steps after the last one);
        returns the seconds it took (starting or writing a trace)."""
        if self._window is None:
            return 0.0
        t0 = time.perf_counter()
        start, stop = self._window
        if not self._tracing and start <= step < stop:
            jax.profiler.start_trace(str(self._log_dir))
            self._tracing = True
            log(f"profiling steps {step} to {stop} into {self._log_dir}")
        elif self._tracing and step >= stop:
            jax.block_until_ready(state)  # the traced updates have run on the device
            self.close()
            log(f"profile written to {self._log_dir / 'plugins' / 'profile'}")
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._tracing:
            self._tracing = False
            jax.profiler.stop_trace()


def _format(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items()) or "(none)"
