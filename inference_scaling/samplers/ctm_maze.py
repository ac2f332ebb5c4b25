"""A maze CTM (bare or P-stream) as a `Sampler` of routes for `inference_scaling.tasks.maze`.

Compute knobs (the `label`, e.g. "T=16,P=1"):

  ticks           T, the internal ticks of every forward (the trained `iterations` by default; the
                  tick parameters are shared, so any T runs with the same variables)
  exit_threshold  certainty-threshold exit: each sample stops at its first tick whose certainty
                  reaches the threshold (at T at the latest) and is read out there; its cost is
                  the ticks it used (`ctm_jax.adaptive.adaptive_forward` for a bare CTM; for a
                  P-stream CTM, whose per-tick read-out depends on ticks <= t only, the same
                  exit tick is found on the full run)
  P               the model's parallel streams (`n_streams`, 1 for a bare CTM), reported only

Diversity sources, combinable with '+' and named in `diversity` (e.g. "dihedral+temperature=0.5"):

  dihedral        test-time augmentation: sample j sees the maze under one of the 8 rotations /
                  reflections of the square, drawn from its key (so a sample re-runs identically
                  in any batch), and its actions are mapped back to the original frame with
                  `tasks.ctm_maze.data.action_permutation`
  temperature=t   each route step's action drawn from softmax(logits / t) at the read-out tick,
                  with the sample's key (without it: the argmax)
  tick=last | tick=most_certain
                  the read-out tick without an exit threshold (default: most_certain, the tick the
                  maze metrics and loss read; the exit tick with one)

With no source ("none") every sample of an instance is the same greedy route.

Score: the CTM's certainty (1 - normalised entropy of the route logits) at the read-out tick, an
imperfect verifier. Cost: `SampleCost(native=ticks used, unit="ticks", streams=P, flops=analytic
FLOPs of one example for those ticks)` (`ctm_jax.flops`; P streams plus the per-tick aggregator).

Feedback: F3 contexts (`feedback` with `first_error` / `last_correct_cell`, and
`previous_answer`) restart the maze at the last correct cell (`restart_image`) and splice the
new route after the previous answer's correct prefix (`splice`); when that prefix already reaches
the goal (`prefix_solves`) the spliced prefix is the answer and no model call is needed (cost 0).
F0-F2 contexts re-sample the instance as it is (the keys make rounds differ).

Sizes: a ResNet-backbone CTM reads mazes of any side, but its head predicts a fixed number of
route steps (`route_length`); answers are padded with wait (or cut) to the instance's route
length, so routes longer than the head cannot be solved in one application.

One jitted call per batch (per image size within a batch): the batch is one CTM forward, with
the per-sample transforms and draws vmapped over the keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core.errors import ConfigError
from ctm_jax import flops as ctm_flops
from ctm_jax.adaptive import adaptive_forward
from ctm_jax.model import CTM
from inference_scaling.engine import Sample, Sampler
from inference_scaling.ledger import SampleCost
from inference_scaling.tasks import maze as maze_task
from inference_scaling.tasks.base import Instance
from tasks.ctm_maze import data as maze_data
from tasks.ctm_maze.generalise import with_ticks

Array = jax.Array
N_ACTIONS = maze_data.NUM_ACTIONS
TICK_READOUTS = ("most_certain", "last")
# Folded into a sample's key for each use, so the draws are independent of each other.
DIHEDRAL_STREAM = 0xD1
TEMPERATURE_STREAM = 0x7E


# ------------------------------------------------------------------------------------------------
# The dihedral group of the square: element g = k + 4 f is "rotate k x 90 degrees
# counter-clockwise (np.rot90 on axes 0, 1), then mirror left-right if f".


def dihedral_numpy(x: np.ndarray, g: int) -> np.ndarray:
    """Element g (0..7) applied to an (H, W, ...) array."""
    out = np.rot90(x, g % 4, axes=(0, 1))
    return np.flip(out, axis=1) if g >= 4 else out


def dihedral_jax(x: Array, g: Array) -> Array:
    """`dihedral_numpy` for a square (S, S, ...) array and a traced g."""

    def element(k: int, mirror: bool):
        def apply(a: Array) -> Array:
            out = jnp.rot90(a, k, axes=(0, 1))
            return jnp.flip(out, axis=1) if mirror else out

        return apply

    branches = [element(k, mirror) for mirror in (False, True) for k in range(4)]
    return jax.lax.switch(g, branches, x)


def dihedral_permutations() -> np.ndarray:
    """(8, 5) int32: row g maps an action in the original frame to the same move in the frame
    transformed by g (`action_permutation`, derived from the geometry)."""
    return np.stack(
        [maze_data.action_permutation(lambda x, g=g: dihedral_numpy(x, g)) for g in range(8)]
    )


def inverse_permutations() -> np.ndarray:
    """(8, 5) int32: row g maps an action in the frame transformed by g back to the original."""
    forward = dihedral_permutations()
    inverse = np.zeros_like(forward)
    for g in range(8):
        inverse[g, forward[g]] = np.arange(N_ACTIONS, dtype=np.int32)
    return inverse


# ------------------------------------------------------------------------------------------------
# Options


@dataclasses.dataclass(frozen=True)
class Diversity:
    """The parsed diversity spec (see the module docstring)."""

    dihedral: bool = False
    temperature: float | None = None
    tick: str | None = None  # None: the default read-out

    @classmethod
    def parse(cls, spec: str) -> Diversity:
        """'none', '' or '+'-joined parts: dihedral, temperature=<t > 0>, tick=last|most_certain."""
        values: dict[str, Any] = {}
        text = str(spec).strip()
        parts = [] if text in ("", "none") else [p.strip() for p in text.split("+")]
        for part in parts:
            name, _, value = part.partition("=")
            if name in values or (name == "dihedral" and value):
                raise ConfigError(f"diversity={spec!r} is invalid: {part!r} repeats or has a value")
            if name == "dihedral":
                values["dihedral"] = True
            elif name == "temperature":
                try:
                    t = float(value)
                except ValueError:
                    t = float("nan")
                if not t > 0 or not np.isfinite(t):
                    raise ConfigError(
                        f"diversity={spec!r} is invalid: temperature must be a number > 0"
                    )
                values["temperature"] = t
            elif name == "tick":
                if value not in TICK_READOUTS:
                    raise ConfigError(
                        f"diversity={spec!r} is invalid: tick must be one of "
                        f"{', '.join(TICK_READOUTS)}"
                    )
                values["tick"] = value
            else:
                raise ConfigError(
                    f"diversity={spec!r} is invalid: unknown part {part!r}; use 'none' or "
                    "'+'-joined dihedral, temperature=<t>, tick=last|most_certain"
                )
        return cls(**values)

    def name(self) -> str:
        parts = ["dihedral"] if self.dihedral else []
        if self.temperature is not None:
            parts.append(f"temperature={self.temperature:g}")
        if self.tick is not None:
            parts.append(f"tick={self.tick}")
        return "+".join(parts) or "none"


def _streams(model: Any) -> int:
    return int(getattr(model, "n_streams", 1))


def _ticks_model(model: Any, ticks: int) -> Any:
    """The model running `ticks` internal ticks (variables unchanged)."""
    if isinstance(model, CTM):
        return with_ticks(model, ticks)
    if ticks < 1:
        raise ConfigError(f"ticks={ticks} is invalid: must be >= 1")
    return model.clone(config=dataclasses.replace(model.config, iterations=int(ticks)))


# ------------------------------------------------------------------------------------------------
# The sampler


class CTMMazeSampler(Sampler):
    """Routes from a maze CTM: `model` is a `ctm_jax.model.CTM` or any module with a CTM
    `config` whose `apply(variables, x, train=False)` returns a `CTMOutput` (the P-stream
    `tasks.ctm_maze.task.StreamedCTM`; its `n_streams` is P). `route_length` is the route steps
    the head predicts (out_dims / 5) and `expand_range` the model's input scaling ([-1, 1] when
    True, as `MazeTask` feeds it). See the module docstring for `ticks`, `exit_threshold` and
    `diversity`."""

    def __init__(
        self,
        model: Any,
        variables: Mapping[str, Any],
        route_length: int,
        expand_range: bool,
        *,
        ticks: int | None = None,
        exit_threshold: float | None = None,
        diversity: str = "none",
    ) -> None:
        config = model.config
        if route_length * N_ACTIONS != config.out_dims:
            raise ConfigError(
                f"route_length={route_length} is invalid: the model predicts "
                f"out_dims={config.out_dims} = {config.out_dims // N_ACTIONS} steps x 5 actions"
            )
        self.ticks = int(config.iterations if ticks is None else ticks)
        self.model = _ticks_model(model, self.ticks) if self.ticks != config.iterations else model
        self.variables = variables
        self.route_length = int(route_length)
        self.expand_range = bool(expand_range)
        self.options = Diversity.parse(diversity)
        if exit_threshold is not None:
            exit_threshold = float(exit_threshold)
            if not np.isfinite(exit_threshold):
                raise ConfigError(f"exit_threshold={exit_threshold!r} is invalid: must be finite")
            if self.options.tick is not None:
                raise ConfigError(
                    f"diversity={diversity!r} is invalid with exit_threshold={exit_threshold}: "
                    "the read-out tick is the exit tick"
                )
        self.exit_threshold = exit_threshold
        self.n_streams = _streams(model)
        self.label = f"T={self.ticks},P={self.n_streams}"
        if exit_threshold is not None:
            self.label += f",exit={exit_threshold:g}"
        self.diversity = self.options.name()
        self._inverse = jnp.asarray(inverse_permutations())
        self._run = jax.jit(self._forward)
        self._flops: dict[tuple[int, ...], ctm_flops.CTMFlops] = {}

    @classmethod
    def from_workdir(cls, workdir: str, **options: Any) -> CTMMazeSampler:
        """The sampler of a maze training run's latest checkpoint (a `MazeTask` or
        `MazeStreamsTask` workdir); `options` as for the constructor."""
        from tasks.ctm_maze.task import MazeTask
        from train_lib.trainer import restore_run

        exp, state, _ = restore_run(workdir)
        if not isinstance(exp.task, MazeTask):
            raise ConfigError(
                f"workdir={str(workdir)!r} is invalid: it is a {exp.config.task.name!r} run, not "
                "a maze run"
            )
        _, route_length = maze_data.PRESETS[exp.task.size]
        variables = {"params": state.params, **state.buffers}
        expand = bool(exp.config.task.expand_range)
        return cls(exp.model, variables, route_length, expand, **options)

    # -- the jitted batch --------------------------------------------------------------------
    def _forward(
        self, variables: Mapping[str, Any], images: Array, keys: Array
    ) -> tuple[Array, Array, Array]:
        """images (B, H, W, 3) in [0, 1], keys (B,) -> (actions (B, R) in the original frame,
        scores (B,), ticks used (B,))."""
        opts, batch = self.options, images.shape[0]
        if opts.dihedral:
            draw = lambda k: jax.random.randint(  # noqa: E731
                jax.random.fold_in(k, DIHEDRAL_STREAM), (), 0, 8
            )
            group = jax.vmap(draw)(keys)
            images = jax.vmap(dihedral_jax)(images, group)
        else:
            group = jnp.zeros((batch,), jnp.int32)
        x = images * 2.0 - 1.0 if self.expand_range else images
        ticks = self.ticks
        if self.exit_threshold is not None and isinstance(self.model, CTM):
            out = adaptive_forward(self.model, variables, x, self.exit_threshold, ticks)
            logits, score, used = out.predictions, out.certainties[:, 1], out.exit_tick
        else:
            out = self.model.apply(variables, x, train=False)
            certain = out.certainties[:, 1]  # (B, T)
            if self.exit_threshold is not None:  # the first tick at the threshold, else T
                reached = certain >= self.exit_threshold
                tick = jnp.where(jnp.any(reached, -1), jnp.argmax(reached, -1), ticks - 1)
            elif opts.tick == "last":
                tick = jnp.full((batch,), ticks - 1, jnp.int32)
            else:
                tick = jnp.argmax(certain, axis=-1)
            logits = jnp.take_along_axis(out.predictions, tick[:, None, None], axis=-1)[..., 0]
            score = jnp.take_along_axis(certain, tick[:, None], axis=-1)[:, 0]
            used = tick.astype(jnp.int32) + 1
            if self.exit_threshold is None:
                used = jnp.full((batch,), ticks, jnp.int32)  # every tick ran
        logits = logits.reshape(batch, self.route_length, N_ACTIONS).astype(jnp.float32)
        if opts.temperature is not None:
            t = opts.temperature

            def draw_route(key: Array, step_logits: Array) -> Array:
                key = jax.random.fold_in(key, TEMPERATURE_STREAM)
                return jax.random.categorical(key, step_logits / t, axis=-1)

            actions = jax.vmap(draw_route)(keys, logits)
        else:
            actions = jnp.argmax(logits, axis=-1)
        actions = jnp.take_along_axis(self._inverse[group], actions, axis=-1)
        return actions.astype(jnp.int32), score, used.astype(jnp.int32)

    def _example_flops(self, shape: tuple[int, ...], ticks: int) -> float:
        if shape not in self._flops:
            self._flops[shape] = ctm_flops.ctm_flops(self.model.config, shape)
        single = self._flops[shape]
        if self.n_streams == 1:
            return float(single.total(ticks))
        return float(
            ctm_flops.streamed_flops(
                single,
                ticks,
                self.n_streams,
                feature_dim=self.model.config.out_dims,
                hidden_dim=getattr(self.model, "aggregator_hidden_dim", None),
            )
        )

    # -- the Sampler interface ---------------------------------------------------------------
    def sample(
        self,
        instances: Sequence[Instance],
        keys: jax.Array,
        contexts: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Sample]:
        n = len(instances)
        if keys.shape != (n,):
            raise ConfigError(f"keys.shape={keys.shape} is invalid: need ({n},), one per instance")
        if contexts is not None and len(contexts) != n:
            raise ConfigError(f"contexts has {len(contexts)} entries for {n} instances")
        prefixes: list[np.ndarray] = []
        images: list[np.ndarray] = []
        done: list[np.ndarray | None] = []  # answers that need no model call
        for j, instance in enumerate(instances):
            context = {} if contexts is None else dict(contexts[j] or {})
            prefix, image, answer = self._restart(instance, context)
            prefixes.append(prefix)
            images.append(image)
            done.append(answer)
        if self.options.dihedral and any(im.shape[0] != im.shape[1] for im in images):
            raise ConfigError("diversity='dihedral' is invalid: it needs square maze images")

        actions = np.zeros((n, self.route_length), np.int32)
        scores = np.zeros(n)
        used = np.zeros(n, np.int64)
        todo = [j for j in range(n) if done[j] is None]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for j in todo:
            by_shape.setdefault(images[j].shape, []).append(j)
        for shape, rows in by_shape.items():
            self.model.config.validate_input_shape((len(rows), *shape))
            batch = jnp.asarray(np.stack([images[j] for j in rows]), jnp.float32)
            out = self._run(self.variables, batch, keys[np.asarray(rows)])
            got_actions, got_scores, got_used = jax.device_get(out)
            actions[rows], scores[rows], used[rows] = got_actions, got_scores, got_used

        samples = []
        for j, instance in enumerate(instances):
            length = int(instance.meta["route_length"])
            if done[j] is not None:
                cost = SampleCost(0.0, "ticks", self.n_streams, 0.0)
                samples.append(Sample(done[j], float("nan"), cost))
                continue
            route = maze_task.splice(prefixes[j], actions[j], length)
            flops = self._example_flops(images[j].shape, int(used[j]))
            cost = SampleCost(float(used[j]), "ticks", self.n_streams, flops)
            samples.append(Sample(route, float(scores[j]), cost))
        return samples

    def _restart(
        self, instance: Instance, context: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(correct prefix, image in [0, 1] to solve, finished answer or None) of one pair.

        F3 feedback: the prefix is the previous answer's first `first_error` steps, the image
        restarts at `last_correct_cell`; with `prefix_solves` the spliced prefix is the answer.
        Anything else: no prefix, the instance's own image."""
        image = np.asarray(instance.problem)
        feedback = context.get("feedback")
        empty = np.zeros((0,), np.int32)
        if not isinstance(feedback, Mapping) or feedback.get("last_correct_cell") is None:
            return empty, maze_data.to_float(image), None
        previous = context.get("previous_answer", feedback.get("previous_answer"))
        route = maze_task.parse_route(previous) if previous is not None else None
        first_error = int(feedback.get("first_error") or 0)
        prefix = empty if route is None else route[:first_error].astype(np.int32)
        if len(prefix) < first_error:  # an unreadable or short previous answer: start over
            return empty, maze_data.to_float(image), None
        if feedback.get("prefix_solves"):
            return (
                prefix,
                maze_data.to_float(image),
                maze_task.splice(prefix, empty, int(instance.meta["route_length"])),
            )
        cell = feedback["last_correct_cell"]
        restarted = maze_task.restart_image(instance, cell)
        return prefix, maze_data.to_float(restarted), None
