"""Checks the port against reference oracle files: the reference code's outputs on small models.

An oracle file (.npz) holds the reference constructor kwargs (`config_json`), the state dict
(`sd/<key>`), a fixed input, the reference's outputs per tick (`out/*`) and, when recorded, a
loss value with its targets and the gradient of every parameter (`loss/*`, `grad/*`).
`check_oracle` rebuilds the model from the recorded kwargs, imports the weights, runs the forward
in eval mode (image backbones normalise with the imported BatchNorm running statistics), runs the
loss the recorded config names with its gradients, and compares every array at rtol 1e-4 /
atol 1e-5 (what a float32 port of float32 torch code reaches; the reference's own golden tests
use atol 1e-5).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core.errors import DataError
from ctm_jax import losses
from ctm_jax.config import CTMConfig
from ctm_jax.convert import export_state_dict, import_state_dict, reference_input_to_jax
from ctm_jax.model import CTM, CTMOutput, project_params

RTOL, ATOL = 1e-4, 1e-5
# The reference maze loss's default curriculum lookahead (its `cirriculum_lookahead`).
MAZE_LOOKAHEAD = 5


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One compared array: `ok` when every element is within ATOL + RTOL * |want|."""

    name: str
    ok: bool
    max_abs: float
    max_rel: float
    shape_error: str = ""

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        if self.shape_error:
            return f"  {status} {self.name}: {self.shape_error}"
        return f"  {status} {self.name:55s} max|err| {self.max_abs:.2e}  max rel {self.max_rel:.2e}"


@dataclasses.dataclass(frozen=True)
class OracleReport:
    """The result of one oracle file: a title line, every comparison, and problems (e.g. a
    recorded gradient the port did not produce)."""

    path: str
    title: str
    comparisons: tuple[Comparison, ...]
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.comparisons)

    def lines(self) -> list[str]:
        return [
            self.title,
            *(c.line() for c in self.comparisons),
            *(f"  FAIL {p}" for p in self.problems),
            f"  => {'PASS' if self.ok else 'FAIL'}",
        ]


def compare(name: str, got: Any, want: Any) -> Comparison:
    """np.allclose-style check with the oracle tolerances."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return Comparison(
            name, False, np.inf, np.inf, f"shape {got.shape} != expected {want.shape}"
        )
    err = np.abs(got - want)
    rel = err / np.maximum(np.abs(want), 1e-30)
    ok = bool(np.all(err <= ATOL + RTOL * np.abs(want)))
    return Comparison(
        name, ok, float(err.max()) if err.size else 0.0, float(rel.max()) if rel.size else 0.0
    )


# ------------------------------------------------------------------------------------------------
# The reference losses, named as in the reference code

LossFn = Callable[[CTMOutput, jax.Array, Mapping[str, Any]], tuple[jax.Array, jax.Array | None]]


def _image_classification(output: CTMOutput, targets: jax.Array, kwargs: Mapping[str, Any]):
    return losses.image_classification_loss(
        output.predictions, output.certainties, targets, bool(kwargs.get("use_most_certain", True))
    )


def _parity(output: CTMOutput, targets: jax.Array, kwargs: Mapping[str, Any]):
    return losses.parity_loss(
        output.predictions, output.certainties, targets, bool(kwargs.get("use_most_certain", True))
    )


def _maze(output: CTMOutput, targets: jax.Array, kwargs: Mapping[str, Any]):
    lookahead = kwargs.get("cirriculum_lookahead", kwargs.get("lookahead", MAZE_LOOKAHEAD))
    loss, where, _ = losses.maze_loss(
        output.predictions,
        output.certainties,
        targets,
        lookahead=int(lookahead),
        use_most_certain=bool(kwargs.get("use_most_certain", True)),
    )
    return loss, where


def _sort(output: CTMOutput, targets: jax.Array, kwargs: Mapping[str, Any]):
    return losses.sort_loss(output.predictions, targets), None


REFERENCE_LOSSES: dict[str, LossFn] = {
    "image_classification_loss": _image_classification,
    "parity_loss": _parity,
    "maze_loss": _maze,
    "sort_loss": _sort,
}
# Size of the answer alphabet (last axis of prediction_reshaper) -> the loss of that task.
_ANSWER_ALPHABETS = {5: "maze_loss", 2: "parity_loss"}


def reference_loss(meta: Mapping[str, Any], config: CTMConfig) -> tuple[str, dict[str, Any]]:
    """(reference loss name, its keyword arguments) from an oracle's recorded config.

    A file may name its loss (`"loss": "maze_loss"` or `{"name": ..., "kwargs": {...}}`);
    otherwise the model class and `prediction_reshaper` decide: the SORT class is trained with
    CTC, a flat read-out ([-1]) is classified, and [positions, alphabet] read-outs are a route of
    5 actions (maze, with the curriculum lookahead) or a sequence of bits (parity).
    """
    recorded = meta.get("loss")
    if isinstance(recorded, str):
        recorded = {"name": recorded}
    if isinstance(recorded, Mapping):
        name, kwargs = str(recorded.get("name")), dict(recorded.get("kwargs") or {})
        if name not in REFERENCE_LOSSES:
            raise DataError(
                f"loss={name!r} is invalid: allowed: {', '.join(sorted(REFERENCE_LOSSES))}"
            )
        return name, kwargs
    if config.variant == "sort":
        return "sort_loss", {}
    reshaper = tuple(config.prediction_reshaper)
    if reshaper == (-1,) or len(reshaper) == 1:
        return "image_classification_loss", {}
    name = _ANSWER_ALPHABETS.get(int(reshaper[-1]))
    if len(reshaper) != 2 or name is None:
        raise DataError(
            f"prediction_reshaper={list(reshaper)} is invalid: no reference loss reads it "
            f"(allowed: [-1], [positions, 2] parity, [route, 5] maze, or a recorded 'loss')"
        )
    return name, {}


# ------------------------------------------------------------------------------------------------
# Checking one file


def check_oracle(path: str) -> OracleReport:
    """Runs one oracle file: forward, tracked internals, clamped decays, loss and gradients."""
    data = np.load(path, allow_pickle=False)
    meta = json.loads(str(data["config_json"]))
    config = CTMConfig.from_reference_kwargs(meta["config"], meta["model_class"])
    state_dict = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    x = reference_input_to_jax(data["input"], config)
    variables = import_state_dict(config, state_dict, x)
    model = CTM(config)
    title = (
        f"{path}: {meta['model_class']} '{meta.get('name', '')}' "
        f"(variant {config.variant}, {config.neuron_select_type}, T={config.iterations})"
    )

    out = model.apply(variables, jnp.asarray(x), track=True)
    checks = [
        ("out/predictions", out.predictions),
        ("out/certainties", out.certainties),
        ("out/final_synch_out", out.synch_out),
    ]
    checks += [(f"out/{k}", v) for k, v in out.tracking.items()]
    projected = project_params(config, variables["params"])
    checks += [(f"post_forward/{k}", projected[k]) for k in projected if k.startswith("decay")]

    problems: list[str] = []
    if "loss/targets" in data.files:
        targets = jnp.asarray(data["loss/targets"])
        name, kwargs = reference_loss(meta, config)
        loss_fn = REFERENCE_LOSSES[name]
        title += f", {name}"

        def objective(params: Any) -> tuple[jax.Array, Any]:
            output = model.apply({**variables, "params": params}, jnp.asarray(x))
            return loss_fn(output, targets, kwargs)

        (loss, where), grads = jax.value_and_grad(objective, has_aux=True)(variables["params"])
        checks.append(("loss/value", loss))
        if where is not None:
            checks.append(("loss/where_most_certain", where))
        for key, value in export_state_dict(config, grads).items():
            checks.append((f"grad/{key}", value))
        missing = {k for k in data.files if k.startswith("grad/")} - {c[0] for c in checks}
        if missing:
            problems.append(f"gradients not produced for: {sorted(missing)}")

    comparisons = tuple(
        compare(name, np.asarray(value), data[name]) for name, value in checks if name in data.files
    )
    return OracleReport(str(path), title, comparisons, tuple(problems))
