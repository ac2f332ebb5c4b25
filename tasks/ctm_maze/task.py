"""CTM on 2-D mazes (the CTM paper's maze task): predict the route as a sequence of actions.

The model sees the maze image (walls black, corridors white, start red, goal green) and emits,
at every tick, route_length x 5 logits (0 up, 1 down, 2 left, 3 right, 4 wait). The loss is the
reference's auto-curriculum (`ctm_jax.losses.maze_loss`); metrics at the most certain tick are
per-step accuracy, the share of routes that reach the goal through corridors, and how far they
get.

`MazeStreamsTask` (`task.name = 'tasks.ctm_maze.task:MazeStreamsTask'`) trains the P-stream CTM
(`StreamedCTM`: ParScale's `ParallelStreams` around one CTM), configured by its own `streams`
section; with `init_from` + `freeze_backbone` it recycles a trained P = 1 maze CTM and trains only
the stream transforms and the aggregator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict

from core.errors import ConfigError
from core.tree_paths import path_str
from ctm_jax import config as ctm_config
from ctm_jax.flops import ctm_flops, streamed_flops
from ctm_jax.losses import maze_loss
from ctm_jax.model import CTM, CTMOutput, certainty, project_params
from ctm_jax.param_table import streamed_param_axes
from parscale_jax import parallel
from tasks.ctm_maze.data import PRESETS, maze_dataset
from tasks.ctm_maze.metrics import maze_metrics
from train_lib.task import Batch, Metrics, Task

N_ACTIONS = 5


def model_config(model: Mapping[str, Any], size: str) -> ctm_config.CTMConfig:
    """CTMConfig from the `model` section; out_dims and the reshaper follow from the route."""
    side, route = PRESETS[size]
    values = {
        **dict(model.items()),
        "out_dims": route * N_ACTIONS,
        "prediction_reshaper": (route, N_ACTIONS),
    }
    cfg = ctm_config.CTMConfig.from_mapping(values)
    cfg.validate_input_shape((1, side, side, 3))
    return cfg


class MazeTask(Task):
    """Config: `task.{size, seed, lookahead, expand_range, use_most_certain, data_dir,
    image_folder, num_train}` and the CTM fields in `model` (without out_dims/reshaper)."""

    progress_keys = ("loss", "step_accuracy", "solve_rate")

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__(config)
        task = config.task
        if task.size not in PRESETS:
            raise ConfigError(f"task.size={task.size!r} is invalid: allowed: {', '.join(PRESETS)}")
        if int(task.lookahead) < 1:
            raise ConfigError(f"task.lookahead={task.lookahead!r} is invalid: must be >= 1")
        self.size = str(task.size)
        self.model_config = model_config(config.model, self.size)
        uses_bn = self.model_config.backbone_type.startswith(("resnet", "shallow"))
        self.mutable_collections = ("batch_stats",) if uses_bn else ()

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        task = self.config.task
        num = task.get("num_train") if split == "train" else None
        # Stored mazes (an image folder, a tfds dir) and a num_train subset are finite: the train
        # split is shuffled per epoch and repeated. Generated mazes are an endless stream.
        finite = num is not None or bool(task.get("image_folder")) or bool(task.get("data_dir"))
        return maze_dataset(
            split,
            self.size,
            batch_size=batch_size,
            seed=int(task.seed),
            num_examples=num,
            data_dir=task.get("data_dir"),
            image_folder=task.get("image_folder"),
            expand=bool(task.expand_range),
            shuffle=split == "train" and finite,
            repeat=split == "train" and finite,
            shard_index=shard_index,
            shard_count=shard_count,
        )

    def build_model(self) -> nn.Module:
        return CTM(self.model_config)

    def project_params(self, params: Any) -> Any:
        return project_params(self.model_config, params)

    def forward_flops_per_example(self) -> float:
        """Analytic forward FLOPs of one maze (`ctm_jax.flops.ctm_flops`: backbone and K/V once,
        then `iterations` ticks)."""
        side, _ = PRESETS[self.size]
        cfg = self.model_config
        return float(ctm_flops(cfg, (side, side, 3)).total(cfg.iterations))

    def train_flops_per_example(self) -> float:
        """3 x `forward_flops_per_example` (the MFU convention, `Task.train_flops_per_example`)."""
        return 3.0 * self.forward_flops_per_example()

    def _images01(self, inputs: jax.Array) -> jax.Array:
        return (inputs + 1.0) / 2.0 if self.config.task.expand_range else inputs

    def loss_and_metrics(self, outputs: CTMOutput, batch: Batch) -> tuple[jax.Array, Metrics]:
        loss, where, upto = maze_loss(
            outputs.predictions,
            outputs.certainties,
            batch["targets"],
            int(self.config.task.lookahead),
            bool(self.config.task.use_most_certain),
        )
        b, route = batch["targets"].shape
        logits = outputs.predictions.reshape(b, route, N_ACTIONS, -1)
        chosen = jnp.take_along_axis(logits, where[:, None, None, None], axis=-1)[..., 0]
        metrics = maze_metrics(
            self._images01(batch["inputs"]), jnp.argmax(chosen, -1), batch["targets"]
        )
        metrics["curriculum_steps"] = upto.astype(jnp.float32).mean()
        return loss, metrics


# ------------------------------------------------------------------------------------------------
# The P-stream CTM

# stream transform name -> the input axes its per-stream offset varies along: 'additive' learns
# an offset per pixel and colour (a visual prompt; fixes the image size), 'additive_channel' one
# per colour (any image size).
STREAM_TRANSFORMS: dict[str, tuple[int, ...]] = {
    "additive": (-3, -2, -1),
    "additive_channel": (-1,),
}
# Name of the wrapped CTM's scope: its variables sit under it in every collection.
BACKBONE = "backbone"
_MAX_LISTED = 6


def tick_major_logits(out: CTMOutput) -> jax.Array:
    """A stream's per-tick logits, ticks before features: (..., out_dims, T) -> (..., T, out_dims)
    (the aggregator weighs each tick separately)."""
    return jnp.moveaxis(out.predictions, -1, -2)


class TickLogProbs:
    """The aggregator's features of a stream: per tick, the log-probabilities of every route
    step's actions, (..., T, route * 5). A plain callable class (not a lambda) so the module that
    holds it compares equal to a rebuilt one."""

    def __init__(self, prediction_shape: tuple[int, ...]) -> None:
        self.prediction_shape = tuple(prediction_shape)

    def __call__(self, out: CTMOutput) -> jax.Array:
        logits = tick_major_logits(out)
        steps = logits.reshape((*logits.shape[:-1], *self.prediction_shape))
        return jax.nn.log_softmax(steps, axis=-1).reshape(logits.shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TickLogProbs) and other.prediction_shape == self.prediction_shape

    def __hash__(self) -> int:
        return hash(self.prediction_shape)


def per_tick_certainty(predictions: jax.Array, prediction_shape: tuple[int, ...]) -> jax.Array:
    """`ctm_jax.model.certainty` at every tick: (B, out_dims, T) -> (B, 2, T)."""
    return jax.vmap(lambda y: certainty(y, prediction_shape), in_axes=-1, out_axes=-1)(predictions)


class StreamedCTM(nn.Module):
    """P streams of one CTM (ParScale's `ParallelStreams`), returning a `CTMOutput`.

    Stream p sees the image plus its own learned offset (`transform`); all streams share the
    CTM's weights. Aggregation is per tick: at tick t the stream weights are
    softmax(MLP(features_t)) with features_t each stream's log-probabilities of every route step
    at tick t -- what the stream currently believes and how sure it is -- so the combined
    prediction at tick t depends on ticks <= t only, as a CTM's read-out does (the most certain
    tick, the loss's per-tick curriculum and a certainty-threshold exit keep their meaning; the
    final synchronisation would make every tick's weights depend on the last tick). Combined are
    the per-tick logits; the certainties are recomputed from the combined logits (1 - normalised
    entropy of what the model actually predicts), not averaged over streams. `synch_out` is the
    streams' final synchronisation weighted by the last tick's weights.

    Variables: the CTM's under 'backbone' (params, 'buffers', 'batch_stats'), 'input_transform'
    (a leading P axis) and 'aggregator' (P > 1 only); P = 1 is the bare CTM under 'backbone'.
    `frozen_backbone` runs the CTM in inference mode even when training (BatchNorm running
    statistics, no dropout), so a recycled backbone's variables never change. In 'vmap' mode
    BatchNorm cannot update its statistics (they are shared by the streams): train BatchNorm
    backbones unfrozen in 'fold' mode.
    """

    config: ctm_config.CTMConfig
    n_streams: int
    transform: str = "additive"
    transform_stddev: float = parallel.TRANSFORM_INIT_STD
    smoothing: float = 0.1
    aggregator_hidden_dim: int | None = None
    mode: str = "fold"
    frozen_backbone: bool = False
    dtype: Any = jnp.float32
    param_axes: ClassVar = streamed_param_axes(BACKBONE)

    def setup(self) -> None:
        if self.transform not in STREAM_TRANSFORMS:
            raise ConfigError(
                f"streams.transform={self.transform!r} is invalid: allowed: "
                f"{', '.join(STREAM_TRANSFORMS)}"
            )
        self.streams = parallel.ParallelStreams(
            CTM(self.config, dtype=self.dtype),
            self.n_streams,
            input_transform=parallel.AdditiveStreamEmbedding(
                axes=STREAM_TRANSFORMS[self.transform], stddev=self.transform_stddev
            ),
            features_fn=TickLogProbs(self.config.prediction_shape()),
            outputs_fn=tick_major_logits,
            smoothing=self.smoothing,
            aggregator_hidden_dim=self.aggregator_hidden_dim,
            mode=self.mode,
            return_streams=True,
        )
        nn.share_scope(self, self.streams)  # no extra level: 'backbone', 'aggregator', ...

    def __call__(self, x: jax.Array, *, train: bool = False, track: bool = False) -> CTMOutput:
        """x (B, H, W, C) -> CTMOutput with predictions (B, out_dims, T), certainties (B, 2, T);
        with `track` (P > 1) `tracking` holds the stream weights (B, T, P)."""
        backbone_train = train and not self.frozen_backbone
        if self.n_streams == 1:
            return self.streams(x, train=backbone_train, track=track).output
        out = self.streams(x, train=backbone_train)
        predictions = jnp.moveaxis(out.output, -2, -1)
        return CTMOutput(
            predictions=predictions,
            certainties=per_tick_certainty(predictions, self.config.prediction_shape()),
            synch_out=parallel.weighted_sum(out.streams.synch_out, out.weights[..., -1, :]),
            tracking={"stream_weights": out.weights} if track else None,
        )


def _shapes(tree: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in flatten_dict(dict(tree)).items()}


def merge_backbone(
    variables: Mapping[str, Any], source: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """A fresh `StreamedCTM`'s `variables` with the CTM taken from `source`.

    `source` holds the variables of a bare maze CTM (a P = 1 `MazeTask` run) or of a
    `StreamedCTM`; from one with the same P the stream transforms and the aggregator are taken
    too, from one with another P only its CTM. ConfigError (naming `init_from`=`where`) when
    the CTMs differ: a missing, unexpected or mis-shaped variable.
    """
    src_params = source["params"]
    streamed = "ticks" in dict(src_params.get(BACKBONE, {}))
    if streamed:
        offered = {c: source[c][BACKBONE] for c in source if BACKBONE in source[c]}
    else:
        offered = dict(source)
    wanted = {c: variables[c][BACKBONE] for c in variables if BACKBONE in variables[c]}
    problems = []
    for collection in sorted(set(wanted) | set(offered)):
        mine, theirs = _shapes(wanted.get(collection, {})), _shapes(offered.get(collection, {}))
        for path in sorted(set(mine) | set(theirs)):
            name = path_str((collection, *path))
            if path not in theirs:
                problems.append(f"missing {name} {mine[path]}")
            elif path not in mine:
                problems.append(f"unexpected {name} {theirs[path]}")
            elif mine[path] != theirs[path]:
                problems.append(f"{name} is {theirs[path]} there, {mine[path]} here")
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ConfigError(
            f"init_from={where!r} is invalid: its CTM does not fit the model the config builds "
            f"({len(problems)} differ: {listed}{more})"
        )
    merged = {c: dict(v) for c, v in variables.items()}
    for collection, tree in offered.items():
        target = variables[collection][BACKBONE]
        merged[collection][BACKBONE] = jax.tree.map(
            lambda t, s: jnp.asarray(s, dtype=jnp.asarray(t).dtype), target, dict(tree)
        )
    if streamed:  # same P: also the stream transforms and the aggregator
        extra = {k: v for k, v in src_params.items() if k != BACKBONE}
        mine = {k: v for k, v in variables["params"].items() if k != BACKBONE}
        if extra and _shapes(extra) == _shapes(mine):
            merged["params"].update(extra)
    return merged


def is_stream_param(path: str) -> bool:
    """True for the stream transforms and the aggregator, False for the CTM ('backbone/...')."""
    return path.split("/")[0] != BACKBONE


class MazeStreamsTask(MazeTask):
    """The maze task with the P-stream CTM. Config: everything `MazeTask` reads, plus
    `streams.{n_streams, transform, transform_stddev, smoothing, aggregator_hidden_dim, mode}`
    (aggregator_hidden_dim 0: the feature width, route * 5) and the top-level `init_from` (the
    workdir of a P = 1 maze run, or a P-stream one) and `freeze_backbone` (train only the stream
    transforms and the aggregator; the CTM, its buffers and BatchNorm statistics stay
    bit-identical)."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__(config)
        streams = config.get("streams")
        if streams is None:
            raise ConfigError(
                "streams is missing: MazeStreamsTask needs a 'streams' section "
                "(n_streams, transform, transform_stddev, smoothing, aggregator_hidden_dim, mode)"
            )
        self.n_streams = streams.get("n_streams", 1)
        if isinstance(self.n_streams, bool) or not isinstance(self.n_streams, int):
            raise ConfigError(f"streams.n_streams={self.n_streams!r} is invalid: must be >= 1")
        if self.n_streams < 1:
            raise ConfigError(f"streams.n_streams={self.n_streams!r} is invalid: must be >= 1")
        self.transform = str(streams.get("transform", "additive"))
        if self.transform not in STREAM_TRANSFORMS:
            raise ConfigError(
                f"streams.transform={self.transform!r} is invalid: allowed: "
                f"{', '.join(STREAM_TRANSFORMS)}"
            )
        self.mode = str(streams.get("mode", "fold"))
        if self.mode not in parallel.STREAM_MODES:
            raise ConfigError(
                f"streams.mode={self.mode!r} is invalid: allowed: "
                f"{', '.join(parallel.STREAM_MODES)}"
            )
        self.smoothing = float(streams.get("smoothing", 0.1))
        if not 0.0 <= self.smoothing <= 1.0:
            raise ConfigError(
                f"streams.smoothing={self.smoothing!r} is invalid: must lie in [0, 1]"
            )
        self.transform_stddev = float(streams.get("transform_stddev", parallel.TRANSFORM_INIT_STD))
        if self.transform_stddev < 0:
            raise ConfigError(
                f"streams.transform_stddev={self.transform_stddev!r} is invalid: must be >= 0"
            )
        hidden = int(streams.get("aggregator_hidden_dim", 0))
        if hidden < 0:
            raise ConfigError(f"streams.aggregator_hidden_dim={hidden} is invalid: must be >= 0")
        self.aggregator_hidden_dim = hidden or None
        self.init_from = config.get("init_from") or None
        self.freeze_backbone = bool(config.get("freeze_backbone", False))
        if self.freeze_backbone:
            if self.n_streams == 1:
                raise ConfigError(
                    "freeze_backbone=True is invalid: streams.n_streams=1 has no stream "
                    "transforms or aggregator to train; set streams.n_streams > 1"
                )
            if not self.init_from:
                raise ConfigError(
                    "freeze_backbone=True is invalid: needs init_from (a frozen random CTM)"
                )
            self.mutable_collections = ()  # the frozen CTM runs in inference mode
        elif self.mutable_collections and self.mode == "vmap" and self.n_streams > 1:
            raise ConfigError(
                f"streams.mode='vmap' is invalid: the {self.model_config.backbone_type} "
                "backbone's BatchNorm statistics cannot be updated per stream; use mode='fold' "
                "or freeze_backbone=True"
            )

    def build_model(self) -> nn.Module:
        return StreamedCTM(
            self.model_config,
            self.n_streams,
            transform=self.transform,
            transform_stddev=self.transform_stddev,
            smoothing=self.smoothing,
            aggregator_hidden_dim=self.aggregator_hidden_dim,
            mode=self.mode,
            frozen_backbone=self.freeze_backbone,
        )

    def project_params(self, params: Any) -> Any:
        return {**params, BACKBONE: project_params(self.model_config, params[BACKBONE])}

    def forward_flops_per_example(self) -> float:
        """P forwards of the shared CTM plus the aggregator at every tick (features: the route's
        log-probabilities, out_dims wide); `ctm_jax.flops.streamed_flops`. With
        `freeze_backbone` the CTM's weight gradients are not computed, so 3 x this (the
        convention) overstates a frozen run's work by up to a third."""
        side, _ = PRESETS[self.size]
        cfg = self.model_config
        single = ctm_flops(cfg, (side, side, 3))
        return float(
            streamed_flops(
                single,
                cfg.iterations,
                self.n_streams,
                feature_dim=cfg.out_dims,
                hidden_dim=self.aggregator_hidden_dim,
            )
        )

    def trainable(self) -> Callable[[str], bool] | None:
        return is_stream_param if self.freeze_backbone else None

    def warm_start(
        self, variables: dict[str, Any], source: Mapping[str, Any] | None
    ) -> dict[str, Any] | None:
        if source is None:
            return None
        return merge_backbone(variables, source, str(self.init_from))
