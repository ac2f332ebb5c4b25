"""The port against the reference PyTorch CTM's recorded outputs (tests/fixtures/oracle_*.npz)."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import CheckpointMismatchError
from ctm_jax import convert
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
