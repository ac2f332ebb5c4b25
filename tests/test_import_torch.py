"""`python -m launch.import_ctm_checkpoint`: reference `.pt` checkpoints -> restorable workdirs.

The `.pt` fixtures are written by stock PyTorch (tools/torch_reference/make_ctm_checkpoint.py);
`make torch-reference` regenerates them into build/torch_reference/ctm_pt, which is preferred over
the committed copies in tests/fixtures/ctm_pt. The main suite reads them without torch.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import ConfigError, DataError
from ctm_jax import convert
from ctm_jax.config import CTMConfig
from ctm_jax.model import CTM
from ctm_jax.torch_checkpoint import load_torch_checkpoint
from launch import import_ctm_checkpoint
from train_lib import trainer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SOURCE_DIR = FIXTURES / "ctm_pt"  # also holds maze_source.npz, the maze state dict's source
NAMES = ("parity.pt", "maze.pt", "linear.pt", "tensor_zoo.pt")
TORCH_PY = REPO / ".venv-torch" / "bin" / "python"


def pt_dir() -> Path:
    build = REPO / "build" / "torch_reference" / "ctm_pt"
    return build if all((build / n).is_file() for n in NAMES) else SOURCE_DIR


def pt(name: str) -> Path:
    return pt_dir() / name


def run_import_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.import_ctm_checkpoint", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def npz_state_dict(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k[3:]: np.array(z[k]) for k in z.files if k.startswith("sd/")}


def restored_state_dict(workdir: Path) -> tuple[Any, Any, int, dict[str, np.ndarray]]:
    exp, state, step = trainer.restore_run(workdir)
    tree = {"params": jax.device_get(state.params), **jax.device_get(state.buffers)}
    return exp, state, step, convert.export_state_dict(exp.task.model_config, tree)


def assert_same_state_dict(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
        if np.issubdtype(value.dtype, np.floating):
            assert np.asarray(got[key]).dtype == value.dtype, key


# ------------------------------------------------------------------------------------------------
# The torch-free reader


def test_reader_rebuilds_dtypes_views_and_python_values():
    z = load_torch_checkpoint(pt("tensor_zoo.pt"), backend="numpy")
    expect = {
        "f64_view": np.arange(24, dtype=np.float64).reshape(4, 6)[1:, ::2],
        "f32_transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
        "f16": np.array([-1.5, 0.0, 2.25], np.float16),
        "bf16": np.array([-2.0, 0.5, 3.0, 1 / 128], np.float32),  # bfloat16 -> float32
        "i64_scalar": np.array(7, np.int64),
        "i32_offset": np.array([2, 3, 4], np.int32),
        "i16": np.array([-300, 300], np.int16),
        "i8": np.array([-3, 4], np.int8),
        "u8": np.arange(4, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "shared_a": np.arange(4, dtype=np.float32),
        "shared_b": np.arange(4, 10, dtype=np.float32).reshape(3, 2),
        "param": np.array([1.0, 2.0], np.float32),
        "np_array": np.arange(3, dtype=np.int16),
    }
    for key, want in expect.items():
        assert isinstance(z[key], np.ndarray), key
        assert z[key].dtype == want.dtype and z[key].shape == want.shape, key
        np.testing.assert_array_equal(z[key], want, err_msg=key)
    assert z["namespace"] == {"a": 1, "b": [1, 2], "c": "x", "d": None}
    assert z["np_scalar"] == 0.25 and z["np_scalar"].dtype == np.float64
    assert list(z["np_object"]) == ["a", 1]
    assert z["tuple"] == (1, "a", None, 2.5)
    assert z["bytes"] == b"\x00\xff" and z["set"] == {1, 2}


def test_reader_reads_a_reference_training_checkpoint():
    ckpt = load_torch_checkpoint(pt("parity.pt"), backend="numpy")
    assert_same_state_dict(ckpt["model_state_dict"], npz_state_dict(FIXTURES / "oracle_parity.npz"))
    assert ckpt["args"]["parity_sequence_length"] == 16 and ckpt["iteration"] == 1500
    adam = ckpt["optimizer_state_dict"]["state"][0]
    assert adam["step"].shape == () and float(adam["step"]) == 2.0
    assert ckpt["numpy_rng_state"][0] == "MT19937" and ckpt["numpy_rng_state"][1].shape == (624,)
    assert ckpt["torch_rng_state"].dtype == np.uint8


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}/"))
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, np.ndarray)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}{i}/"))
        return out
    return {prefix.rstrip("/"): value}


@pytest.mark.skipif(not TORCH_PY.exists(), reason=".venv-torch not built (make torch-reference)")
def test_torch_load_weights_only_agrees_with_the_torch_free_reader(tmp_path):
    """Loads every fixture with torch.load(weights_only=True) (backend='torch', in .venv-torch)
    and compares leaf by leaf with the torch-free reader."""
    script = (
        "import pickle, sys; from ctm_jax.torch_checkpoint import load_torch_checkpoint as L\n"
        "out = {n: L(f'{sys.argv[1]}/{n}', backend='torch') for n in sys.argv[3:]}\n"
        "pickle.dump(out, open(sys.argv[2], 'wb'))\n"
    )
    dump = tmp_path / "torch.pkl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [str(TORCH_PY), "-c", script, str(pt_dir()), str(dump), *NAMES],
        check=True,
        env=env,
        timeout=300,
    )
    with open(dump, "rb") as f:
        via_torch = pickle.load(f)
    for name in NAMES:
        ours = _flat(load_torch_checkpoint(pt(name), backend="numpy"))
        theirs = _flat(via_torch[name])
        assert sorted(ours) == sorted(theirs), name
        for key, value in ours.items():
            if isinstance(value, np.ndarray):
                assert value.dtype == theirs[key].dtype, (name, key)
                np.testing.assert_array_equal(value, theirs[key], err_msg=f"{name}:{key}")
            else:
                assert value == theirs[key], (name, key)


# ------------------------------------------------------------------------------------------------
# Importing into a workdir


def test_import_parity_restores_with_oracle_params_and_predictions(tmp_path):
    out = tmp_path / "run"
    result = run_import_cli("--checkpoint", str(pt("parity.pt")), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"-> {out} at step 1500" in result.stdout
    exp, state, step, exported = restored_state_dict(out)
    oracle = np.load(FIXTURES / "oracle_parity.npz")
    assert_same_state_dict(exported, npz_state_dict(FIXTURES / "oracle_parity.npz"))
    # Step = the reference's iteration; the optimiser starts fresh.
    assert step == 1500 and int(state.step) == 1500
    fresh = jax.device_get(exp.tx.init(state.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), fresh)
    config = json.loads((out / trainer.CONFIG_FILE).read_text())
    assert (
        config["task"]["name"] == "tasks.ctm_parity.task:ParityTask"
        and config["task"]["seq_len"] == 16
    )
    assert config["model"]["neuron_select_type"] == "random" and config["model"]["d_model"] == 48
    assert config["optim"]["clip"] == "quantile" and config["optim"]["clip_quantile"] == 0.9
    assert config["train"]["total_steps"] == 50001 and config["optim"]["warmup_steps"] == 500
    # The restored model computes the reference's predictions.
    x = jnp.asarray(oracle["input"])
    got = exp.model.apply({"params": state.params, **state.buffers}, x)
    np.testing.assert_allclose(got.predictions, oracle["out/predictions"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.certainties, oracle["out/certainties"], rtol=1e-4, atol=1e-5)


def test_import_maze_analysis_layout_with_legacy_args(tmp_path):
    out = tmp_path / "maze"
    import_ctm_checkpoint.import_torch_checkpoint(pt("maze.pt"), out, backend="numpy")
    exp, state, step, exported = restored_state_dict(out)
    assert_same_state_dict(exported, npz_state_dict(SOURCE_DIR / "maze_source.npz"))
    assert step == 0  # no 'iteration' in the file
    config = exp.config
    assert (
        config.task.name == "tasks.ctm_maze.task:MazeTask" and config.task.size == "small"
    )  # mazes-small, route 50
    assert config.task.expand_range is True
    assert config.model.neuron_select_type == "first-last"  # patched: the args predate the field
    assert config.model.d_model == 32 and config.model.synapse_depth == 2
    assert exp.task.model_config.out_dims == 250
    assert config.optim.clip == "none" and config.train.total_steps == 100001


def _resnet_maze_checkpoint() -> dict[str, Any]:
    """A legacy-named resnet18-1 maze checkpoint (BatchNorm stats included) as loaded."""
    cfg = CTMConfig.from_reference_kwargs(
        dict(
            iterations=2,
            d_model=16,
            d_input=8,
            heads=2,
            n_synch_out=4,
            n_synch_action=4,
            synapse_depth=1,
            memory_length=2,
            deep_nlms=False,
            memory_hidden_dims=2,
            do_layernorm_nlm=True,
            backbone_type="resnet18-1",
            positional_embedding_type="none",
            out_dims=50 * 5,
            prediction_reshaper=[50, 5],
            neuron_select_type="first-last",
        )
    )
    abstract = jax.eval_shape(
        lambda: CTM(cfg).init({"params": jax.random.key(1)}, jnp.zeros((1, 15, 15, 3)))
    )
    rng = np.random.default_rng(1)
    state_dict = {}
    for key, shape in convert.expected_state_dict_shapes(cfg, abstract).items():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = np.array(123, np.int64)
        elif "indices" in key:
            state_dict[key] = rng.integers(0, cfg.d_model, shape).astype(np.int64)
        else:  # running_var must stay positive
            state_dict[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    args = dict(
        model="ctm",
        d_model=16,
        d_input=8,
        heads=2,
        iterations=2,
        n_synch_out=4,
        n_synch_action=4,
        synapse_depth=1,
        memory_length=2,
        deep_memory=False,
        memory_hidden_dims=2,
        do_normalisation=True,
        resnet_type="resnet18",  # legacy: backbone_type = resnet_type-<last feature scale>
        resnet_feature_scales=[1],
        positional_embedding_type="none",
        dropout=0.1,
        maze_route_length=50,
        expand_range=False,
        dataset="mazes-small",
        lr=3e-4,
        batch_size=4,
        training_iterations=10,
        warmup_steps=20,
        gradient_clipping=1.0,
    )
    return {"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "args": args}


def test_import_resnet_maze_keeps_batchnorm_statistics(tmp_path):
    checkpoint = _resnet_maze_checkpoint()
    want = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    import_ctm_checkpoint.import_checkpoint_dict(checkpoint, tmp_path / "r", "resnet.pt")
    exp, state, _, exported = restored_state_dict(tmp_path / "r")
    assert exp.config.model.backbone_type == "resnet18-1" and exp.config.task.size == "small"
    assert "batch_stats" in state.buffers
    assert_same_state_dict(exported, want)
    assert exp.config.optim.clip == "global_norm" and exp.config.optim.max_grad_norm == 1.0
    assert exp.config.optim.warmup_steps == 9  # clipped below total_steps
    assert exp.config.model.dropout_nlm is None


# ------------------------------------------------------------------------------------------------
# Refusals


def _unsafe_pt(path: Path, payload: Any) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"model_state_dict": payload}, protocol=2))
        zf.writestr("archive/version", "3\n")


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Popen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize(
    "payload,name", [(_System, "os.system"), (_Popen, "subprocess.Popen")], ids=["system", "popen"]
)
def test_unsafe_pickle_is_refused_without_running_it(tmp_path, payload, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _unsafe_pt(path, payload(marker))
    global_name = "posix.system" if name == "os.system" and os.name == "posix" else name
    with pytest.raises(DataError, match=rf"needs unsafe unpickling: global {global_name}"):
        load_torch_checkpoint(path, backend="numpy")
    result = run_import_cli("--checkpoint", str(path), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "needs unsafe unpickling" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    data = pt("parity.pt").read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"half\.pt: truncated or corrupt"):
        load_torch_checkpoint(half, backend="numpy")

    # A storage record missing from an otherwise valid archive.
    missing = tmp_path / "missing.pt"
    with zipfile.ZipFile(pt("parity.pt")) as src, zipfile.ZipFile(missing, "w") as dst:
        dropped = [n for n in src.namelist() if "/data/" in n][3]
        for info in src.infolist():
            if info.filename != dropped:
                dst.writestr(info, src.read(info.filename))
    with pytest.raises(DataError, match=r"truncated or corrupt.*is missing"):
        load_torch_checkpoint(missing, backend="numpy")

    # A storage record shorter than its tensors need.
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(pt("parity.pt")) as src, zipfile.ZipFile(short, "w") as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            dst.writestr(info, body[:4] if info.filename == dropped else body)
    with pytest.raises(DataError, match=r"has 4 bytes, needs"):
        load_torch_checkpoint(short, backend="numpy")

    not_zip = tmp_path / "notes.pt"
    not_zip.write_text("hello")
    with pytest.raises(DataError, match=r"not a torch checkpoint \(not a zip"):
        load_torch_checkpoint(not_zip, backend="numpy")
    other_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(DataError, match=r"no <name>/data.pkl"):
        load_torch_checkpoint(other_zip, backend="numpy")


def test_a_torch_file_that_is_not_a_ctm_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"linear\.pt: not a CTM checkpoint") as e:
        import_ctm_checkpoint.import_torch_checkpoint(
            pt("linear.pt"), tmp_path / "o", backend="numpy"
        )
    assert "start_activated_state" in str(e.value) and "synapses.*" in str(e.value)
    assert not (tmp_path / "o").exists()


def _maze_checkpoint() -> dict[str, Any]:
    return load_torch_checkpoint(pt("maze.pt"), backend="numpy")


def test_args_that_contradict_the_state_dict_are_refused(tmp_path):
    ckpt = _maze_checkpoint()
    ckpt["args"]["d_model"] = 64
    ckpt["args"]["maze_route_length"] = 100  # an existing size (large), but 250 outputs = 50 x 5
    with pytest.raises(DataError) as e:
        import_ctm_checkpoint.import_checkpoint_dict(ckpt, tmp_path / "o", "maze.pt")
    msg = str(e.value)
    assert "args.d_model: expected 32" in msg and "received 64" in msg
    assert "args.maze_route_length: expected 50" in msg and "received 100" in msg
    assert "\n" not in msg and not (tmp_path / "o").exists()


def test_missing_args_and_other_tasks_are_refused(tmp_path):
    ckpt = _maze_checkpoint()
    del ckpt["args"]
    with pytest.raises(DataError, match=r"no saved 'args'"):
        import_ctm_checkpoint.import_checkpoint_dict(ckpt, tmp_path / "o", "maze.pt")
    ckpt = _maze_checkpoint()
    del ckpt["args"]["memory_length"]
    with pytest.raises(DataError, match=r"args lack the model field\(s\) memory_length"):
        import_ctm_checkpoint.import_checkpoint_dict(ckpt, tmp_path / "o", "maze.pt")
    ckpt = _maze_checkpoint()
    for key in ("maze_route_length", "cirriculum_lookahead"):
        del ckpt["args"][key]
    ckpt["args"]["dataset"] = "cifar10"  # an image task, but 250 outputs are not 10 classes
    with pytest.raises(DataError, match=r"args.out_dims=250 does not fit args.dataset='cifar10'"):
        import_ctm_checkpoint.import_checkpoint_dict(ckpt, tmp_path / "o", "maze.pt")
    del ckpt["args"]["dataset"]
    ckpt["args"]["q_num_images"] = 3
    with pytest.raises(DataError, match=r"task 'qamnist' is not supported: only maze, parity"):
        import_ctm_checkpoint.import_checkpoint_dict(ckpt, tmp_path / "o", "maze.pt")


def test_an_existing_workdir_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    (out / trainer.CHECKPOINT_DIR).mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a workdir"):
        import_ctm_checkpoint.import_torch_checkpoint(pt("maze.pt"), out, backend="numpy")


def test_torch_backend_without_torch_says_so(tmp_path):
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs torch installed"):
            load_torch_checkpoint(pt("maze.pt"), backend="torch")
    else:
        assert "state_dict" in load_torch_checkpoint(pt("maze.pt"), backend="torch")
