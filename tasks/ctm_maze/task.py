"""CTM on 2-D mazes (the CTM paper's maze task): predict the route as a sequence of actions.

The model sees the maze image (walls black, corridors white, start red, goal green) and emits,
at every tick, route_length x 5 logits (0 up, 1 down, 2 left, 3 right, 4 wait). The loss is the
reference's auto-curriculum (`ctm_jax.losses.maze_loss`); metrics at the most certain tick are
per-step accuracy, the share of routes that reach the goal through corridors, and how far they
get.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections

from core.errors import ConfigError
from ctm_jax import config as ctm_config
from ctm_jax.losses import maze_loss
from ctm_jax.model import CTM, CTMOutput, project_params
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
        return maze_dataset(
            split,
            self.size,
            batch_size=batch_size,
            seed=int(task.seed),
            num_examples=num,
            data_dir=task.get("data_dir"),
            image_folder=task.get("image_folder"),
            expand=bool(task.expand_range),
            shuffle=split == "train" and num is not None,
            repeat=split == "train" and num is not None,
            shard_index=shard_index,
            shard_count=shard_count,
        )

    def build_model(self) -> nn.Module:
        return CTM(self.model_config)

    def project_params(self, params: Any) -> Any:
        return project_params(self.model_config, params)

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
