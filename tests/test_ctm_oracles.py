"""The port against the reference PyTorch CTM's recorded outputs (tests/fixtures/oracle_*.npz)."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import CheckpointMismatchError, DataError
from ctm_jax import convert
from ctm_jax import oracle as oracle_lib
from ctm_jax.config import CTMConfig
from ctm_jax.model import CTM

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ORACLES = sorted(FIXTURES.glob("oracle_*.npz"))
REPO = pathlib.Path(__file__).parent.parent


def load(path):
    data = np.load(path)
    meta = json.loads(str(data["config_json"]))
    config = CTMConfig.from_reference_kwargs(meta["config"], meta["model_class"])
    state_dict = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    return data, config, state_dict


def test_four_oracles_present():
    assert [p.name for p in ORACLES] == [
        "oracle_classification.npz",
        "oracle_linear_nlm_layernorm.npz",
        "oracle_parity.npz",
        "oracle_sort.npz",
    ]


def test_check_oracle_command_passes_on_all_files():
    result = subprocess.run(
        [sys.executable, "-m", "launch.check_oracle", *map(str, ORACLES)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4/4 oracle files match" in result.stdout
    # Gradients of every parameter were compared, not only the forward.
    assert result.stdout.count("grad/") > 100
    assert "FAIL" not in result.stdout


def test_check_oracle_fails_on_a_corrupted_file(tmp_path):
    data = dict(np.load(ORACLES[0]))
    data["sd/output_projector.0.bias"] = data["sd/output_projector.0.bias"] + 1e-3
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    result = subprocess.run(
        [sys.executable, "-m", "launch.check_oracle", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "FAIL out/predictions" in result.stdout


# The reference cannot run the parity model in float64 (its 1-D rotational embedding hard-codes
# float32), so that file has no f64/* arrays.
F64_ORACLES = [p for p in ORACLES if "f64/synch_out" in np.load(p).files]


def test_float64_arrays_exist_for_three_oracles():
    assert [p.stem for p in F64_ORACLES] == [
        "oracle_classification",
        "oracle_linear_nlm_layernorm",
        "oracle_sort",
    ]


@pytest.mark.parametrize("path", F64_ORACLES, ids=lambda p: p.stem)
def test_forward_matches_float64_reference_with_x64(path):
    """With x64 on, the port matches the reference's float64 re-run to ~1e-10."""
    data, config, state_dict = load(path)
    x = convert.reference_input_to_jax(data["input"].astype(np.float64), config)
    with jax.enable_x64(True):
        variables = convert.import_state_dict(config, state_dict, x)
        variables = jax.tree.map(
            lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, variables
        )
        out = CTM(config, dtype=jnp.float64).apply(variables, jnp.asarray(x), track=True)
        for name in ("synch_out", "pre_activations", "post_activations"):
            np.testing.assert_allclose(
                out.tracking[name], data[f"f64/{name}"], rtol=1e-9, atol=1e-10
            )


@pytest.mark.parametrize("path", ORACLES, ids=lambda p: p.stem)
def test_import_keeps_reference_index_buffers(path):
    data, config, state_dict = load(path)
    x = convert.reference_input_to_jax(data["input"], config)
    variables = convert.import_state_dict(config, state_dict, x)
    for name, value in variables["buffers"].items():
        np.testing.assert_array_equal(value, state_dict[name])
    # A fresh init draws other indices: import must not have re-drawn them.
    fresh = CTM(config).init({"params": jax.random.key(0)}, jnp.asarray(x))
    if config.neuron_select_type != "first-last":
        assert any(
            not np.array_equal(fresh["buffers"][k], variables["buffers"][k])
            for k in variables["buffers"]
        )


@pytest.mark.parametrize("path", ORACLES, ids=lambda p: p.stem)
def test_export_round_trips_the_state_dict(path):
    data, config, state_dict = load(path)
    x = convert.reference_input_to_jax(data["input"], config)
    exported = convert.export_state_dict(config, convert.import_state_dict(config, state_dict, x))
    assert set(exported) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_mismatched_state_dict_names_every_bad_key():
    data, config, state_dict = load(FIXTURES / "oracle_classification.npz")
    broken = dict(state_dict)
    del broken["q_proj.bias"]
    del broken["synapses.skip_lns.1.weight"]
    broken["synapses.extra.weight"] = np.zeros(3, np.float32)
    broken["output_projector.0.weight"] = np.zeros((11, 16), np.float32)
    x = convert.reference_input_to_jax(data["input"], config)
    with pytest.raises(CheckpointMismatchError) as err:
        convert.import_state_dict(config, broken, x)
    message = str(err.value)
    assert "4 problems" in message
    assert "missing key 'q_proj.bias'" in message
    assert "missing key 'synapses.skip_lns.1.weight'" in message
    assert "unexpected key 'synapses.extra.weight'" in message
    assert "mis-shaped key 'output_projector.0.weight': expected (10, 16), got (11, 16)" in message


def test_import_reference_builds_model_from_constructor_kwargs():
    data = np.load(FIXTURES / "oracle_parity.npz")
    meta = json.loads(str(data["config_json"]))
    state_dict = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    model, variables = convert.import_reference(meta["config"], state_dict)
    out = model.apply(variables, jnp.asarray(data["input"]))
    np.testing.assert_allclose(out.predictions, data["out/predictions"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The checker runs the loss the recorded config names: a maze-shaped oracle (route read-out)


def _np_maze_loss(predictions, certainties, targets, lookahead):
    """The reference maze loss in numpy (curriculum prefix + lookahead, then certainty loss)."""
    b, route = targets.shape
    logits = predictions.reshape(b, route, 5, -1).astype(np.float64)
    logits = logits - logits.max(axis=2, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    step_losses = -np.take_along_axis(log_probs, targets[:, :, None, None], axis=2)[:, :, 0]
    correct = logits.argmax(axis=2) == targets[..., None]  # (B, R, T)
    tick_losses = np.zeros((b, logits.shape[-1]))
    for i in range(b):
        best = 0
        for t in range(logits.shape[-1]):
            prefix = 0
            while prefix + 1 < route and correct[i, : prefix + 2, t].all():
                prefix += 1
            best = max(best, prefix)
        upto = min(best + lookahead, route)
        tick_losses[i] = step_losses[i, :upto].mean(axis=0)
    most_certain = certainties[:, 1].argmax(axis=-1)
    at_min = tick_losses.min(axis=1)
    at_certain = tick_losses[np.arange(b), most_certain]
    return (at_min.mean() + at_certain.mean()) / 2, most_certain


def _maze_oracle(tmp_path, route=6, lookahead=5, recorded_loss=None):
    data, config, _ = load(FIXTURES / "oracle_classification.npz")
    meta = json.loads(str(data["config_json"]))
    kwargs = {**meta["config"], "out_dims": 5 * route, "prediction_reshaper": [route, 5]}
    config = CTMConfig.from_reference_kwargs(kwargs)
    x = convert.reference_input_to_jax(data["input"], config)
    model = CTM(config)
    variables = model.init({"params": jax.random.key(3)}, jnp.asarray(x))
    out = model.apply(variables, jnp.asarray(x))
    targets = np.random.default_rng(0).integers(0, 5, (x.shape[0], route))
    predictions = np.asarray(out.predictions)
    loss, where = _np_maze_loss(predictions, np.asarray(out.certainties), targets, lookahead)
    grads = jax.grad(
        lambda p: oracle_lib.REFERENCE_LOSSES["maze_loss"](
            model.apply({**variables, "params": p}, jnp.asarray(x)),
            jnp.asarray(targets),
            {"cirriculum_lookahead": lookahead},
        )[0]
    )(variables["params"])
    meta = {"name": "maze", "model_class": "ContinuousThoughtMachine", "config": kwargs}
    if recorded_loss is not None:
        meta["loss"] = recorded_loss
    path = tmp_path / "oracle_maze.npz"
    np.savez(
        path,
        config_json=np.array(json.dumps(meta)),
        input=data["input"],
        **{f"sd/{k}": v for k, v in convert.export_state_dict(config, variables).items()},
        **{"out/predictions": predictions, "out/certainties": np.asarray(out.certainties)},
        **{"loss/value": np.float64(loss), "loss/targets": targets},
        **{"loss/where_most_certain": where},
        **{f"grad/{k}": v for k, v in convert.export_state_dict(config, grads).items()},
    )
    return path


def test_reference_loss_is_picked_from_the_recorded_config():
    _, parity, _ = load(FIXTURES / "oracle_parity.npz")
    _, sort, _ = load(FIXTURES / "oracle_sort.npz")
    _, classification, _ = load(FIXTURES / "oracle_classification.npz")
    kwargs = json.loads(str(np.load(FIXTURES / "oracle_classification.npz")["config_json"]))
    maze = CTMConfig.from_reference_kwargs(
        {**kwargs["config"], "out_dims": 30, "prediction_reshaper": [6, 5]}
    )
    assert oracle_lib.reference_loss({}, parity) == ("parity_loss", {})
    assert oracle_lib.reference_loss({}, sort) == ("sort_loss", {})
    assert oracle_lib.reference_loss({}, classification) == ("image_classification_loss", {})
    assert oracle_lib.reference_loss({}, maze) == ("maze_loss", {})
    recorded = {"loss": {"name": "maze_loss", "kwargs": {"cirriculum_lookahead": 2}}}
    assert oracle_lib.reference_loss(recorded, maze) == ("maze_loss", {"cirriculum_lookahead": 2})
    with pytest.raises(DataError, match="loss='ctc' is invalid"):
        oracle_lib.reference_loss({"loss": "ctc"}, maze)


def test_checker_runs_the_maze_loss_and_its_gradients(tmp_path):
    report = oracle_lib.check_oracle(str(_maze_oracle(tmp_path)))
    assert report.ok, "\n".join(report.lines())
    names = [c.name for c in report.comparisons]
    assert "loss/value" in names and "loss/where_most_certain" in names
    assert sum(n.startswith("grad/") for n in names) > 40
    assert "maze_loss" in report.title


def test_checker_fails_when_the_recorded_lookahead_differs(tmp_path):
    # The file's loss value was computed with lookahead 5; a file that records lookahead 1 makes
    # the checker compute another curriculum prefix, which must show as a loss mismatch.
    path = _maze_oracle(
        tmp_path,
        route=8,
        recorded_loss={"name": "maze_loss", "kwargs": {"cirriculum_lookahead": 1}},
    )
    report = oracle_lib.check_oracle(str(path))
    failed = [c.name for c in report.comparisons if not c.ok]
    assert "loss/value" in failed
