"""The released ImageNet CTM checkpoint's layout -> an image workdir -> `launch.eval` per tick.

The `.pt` files here are written without torch, in torch's own zip format (pickled tensor
records with storages in `data/<key>`, an argparse.Namespace for the args), around a state dict
in the reference ImageNet model's key layout at tiny sizes (resnet18-1, D 32):
`tools/torch_reference/make_ctm_checkpoint.py` lists that layout from the reference's modules and
holds the training script's argument names (`IMAGENET_ARGS`); its torch side writes the same
file with `torch.save`. ImageNet itself comes from `tfds.testing.mock_data` with records this
module chooses, so the expected accuracies can be computed independently.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import io
import json
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
import safetensors.numpy
import tensorflow_datasets as tfds
from absl import flags
from absl.testing import flagsaver

from core.errors import DataError
from ctm_jax import convert, readouts
from ctm_jax.model import CTM
from ctm_jax.reference_checkpoint import (
    check_args_fit_state_dict,
    ctm_checkpoint_parts,
    load_reference_checkpoint,
    reference_model_kwargs,
)
from ctm_jax.torch_checkpoint import load_safetensors
from launch import eval as launch_eval
from launch import import_ctm_checkpoint
from launch.runs import load_run
from tasks.ctm_image.task import ImageTask
from train_lib import trainer

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "make_ctm_checkpoint", REPO / "tools" / "torch_reference" / "make_ctm_checkpoint.py"
)
make_ctm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_ctm)

IMAGE_SIZE, EVAL_RESIZE = 16, 18  # small stand-ins for 224 / 256
N_VALIDATION, BATCH = 8, 4

# ------------------------------------------------------------------------------------------------
# torch's zip format, written without torch

_STORAGE_TYPES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float64"): "DoubleStorage",
    np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage",
    np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


class _Global:
    """Pickled as a bare GLOBAL opcode naming a torch object (torch need not be importable)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> None:  # pickle requires reduce functions to be callable
        raise TypeError("a stand-in, never called")


class _Storage:
    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key, self.array = key, array


class _TorchPickler(pickle._Pickler):
    """numpy arrays -> torch._utils._rebuild_tensor_v2 over a storage record, as torch.save
    writes tensors; everything else pickles as usual (protocol 2, as torch.save)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[_Global] = _save_global

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=2)
        self.storages: list[_Storage] = []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            kind = _Global("torch", _STORAGE_TYPES[obj.array.dtype])
            return ("storage", kind, obj.key, "cpu", obj.array.size)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not np.ndarray:
            return NotImplemented
        array = np.array(obj, order="C")
        storage = _Storage(str(len(self.storages)), array)
        self.storages.append(storage)
        strides = tuple(s // array.itemsize for s in array.strides)
        rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
        return rebuild, (storage, 0, array.shape, strides, False, collections.OrderedDict())


def write_pt(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    pickler = _TorchPickler(buffer)
    pickler.dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for storage in pickler.storages:
            archive.writestr(f"archive/data/{storage.key}", storage.array.tobytes())
        archive.writestr("archive/version", "3\n")


def imagenet_checkpoint(**arg_changes: Any) -> dict[str, Any]:
    checkpoint = make_ctm.imagenet_checkpoint(make_ctm.imagenet_state_dict())
    checkpoint["args"] = argparse.Namespace(**{**make_ctm.IMAGENET_ARGS, **arg_changes})
    return checkpoint


# ------------------------------------------------------------------------------------------------
# Mock ImageNet: records chosen here, served through tfds.data_source


def _records(split: str) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 16 if split == "train" else N_VALIDATION
    # Landscape 20x30 images: one size after an uncropped resize, different content.
    return [
        {
            "image": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
            "label": np.int64(rng.integers(0, 1000)),
            "file_name": f"{split}_{i}.JPEG",
        }
        for i in range(n)
    ]


RECORDS = {split: _records(split) for split in ("train", "validation")}


def _as_data_source(builder: Any, split: Any, decoders: Any = None, **kwargs: Any) -> Any:
    del builder, decoders, kwargs
    return RECORDS[str(split)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(workdir, source .pt) of the synthetic ImageNet checkpoint imported under mock ImageNet;
    the mock serves `RECORDS` to every test of this module that uses the fixture."""
    root = tmp_path_factory.mktemp("imagenet")
    pt = root / "ctm_imagenet_tiny.pt"
    write_pt(pt, imagenet_checkpoint())
    # The task checks that the dataset is prepared in task.data_dir before reading it.
    data_dir = root / "tfds"
    (data_dir / "imagenet2012" / "5.1.0").mkdir(parents=True)
    (data_dir / "imagenet2012" / "5.1.0" / "dataset_info.json").write_text("{}")
    overrides = {
        "task.data_dir": str(data_dir),
        "task.image_size": IMAGE_SIZE,
        "task.eval_resize": EVAL_RESIZE,
        "train.batch_size": BATCH,
        "train.eval_batches": 1,
    }
    with tfds.testing.mock_data(as_data_source_fn=_as_data_source):
        workdir = root / "run"
        summary = import_ctm_checkpoint.import_torch_checkpoint(
            pt, workdir, backend="numpy", overrides=overrides
        )
        assert summary["task"] == "tasks.ctm_image.task:ImageTask" and summary["step"] == 2000
        yield workdir, pt


@pytest.fixture(scope="module")
def expected(run: Any) -> dict[str, Any]:
    """The model applied directly (float32, the checkpoint's BatchNorm statistics) to the
    centre-cropped validation images; the labels are then set from its own predictions (example
    i: the class it predicts at tick i mod T), so accuracies are far from zero and differ by
    tick. Returns the outputs and the labels."""
    exp, variables, _ = load_run(run[0], ImageTask)
    transform = exp.task.transform("eval")
    images = np.stack([transform(r, None)["inputs"] for r in RECORDS["validation"]])
    assert images.shape == (N_VALIDATION, IMAGE_SIZE, IMAGE_SIZE, 3)
    model = CTM(dataclasses.replace(exp.task.model_config, dtype="float32"))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    outs = [
        apply(variables, jnp.asarray(images[i : i + BATCH])) for i in range(0, N_VALIDATION, BATCH)
    ]
    predictions = np.concatenate([np.asarray(o.predictions) for o in outs])  # (N, 1000, T)
    certainties = np.concatenate([np.asarray(o.certainties) for o in outs])
    ticks = predictions.shape[-1]
    labels = np.array([np.argmax(predictions[i, :, i % ticks]) for i in range(N_VALIDATION)])
    for record, label in zip(RECORDS["validation"], labels, strict=True):
        record["label"] = np.int64(label)
    return {"predictions": predictions, "certainties": certainties, "labels": labels}


# ------------------------------------------------------------------------------------------------
# Import


def test_imagenet_layout_becomes_an_image_workdir(run):
    workdir, pt = run
    config = json.loads((workdir / trainer.CONFIG_FILE).read_text())
    task, model, optim = config["task"], config["model"], config["optim"]
    assert task["name"] == "tasks.ctm_image.task:ImageTask" and task["dataset"] == "imagenet2012"
    # The reference's validation transform during training; launch.eval can switch to resize.
    assert task["eval_transform"] == "center_crop" and task["eval_resize"] == EVAL_RESIZE
    args = make_ctm.IMAGENET_ARGS
    for name in ("d_model", "d_input", "heads", "iterations", "n_synch_out", "n_synch_action"):
        assert model[name] == args[name], name
    assert (
        model["backbone_type"] == "resnet18-1" and model["neuron_select_type"] == "random-pairing"
    )
    assert model["n_random_pairing_self"] == 2 and model["deep_nlms"] is True
    assert model["dropout"] == 0.2 and model["dropout_nlm"] == 0.0
    assert model["dtype"] == "bfloat16"  # use_amp
    assert optim["clip"] == "global_norm" and optim["max_grad_norm"] == 20.0
    assert optim["lr"] == 5e-4 and optim["warmup_steps"] == 10_000 and optim["eps"] == 1e-6
    assert config["train"]["total_steps"] == 500_001
    # Every tensor, BatchNorm statistics and index buffers included, comes back unchanged.
    exp, state, step = trainer.restore_run(workdir)
    assert step == 2000
    tree = {"params": jax.device_get(state.params), **jax.device_get(state.buffers)}
    got = convert.export_state_dict(exp.task.model_config, tree)
    want = make_ctm.imagenet_state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)


def test_hugging_face_export_reads_as_the_same_checkpoint(tmp_path):
    """model.safetensors + config.json (the constructor kwargs, no task named): the task is told
    from 1000 classes on an image backbone; the state dict is the same."""
    state_dict = make_ctm.imagenet_state_dict()
    args = make_ctm.IMAGENET_ARGS
    kwargs = reference_model_kwargs(args)
    config = {**kwargs, "out_dims": 1000, "prediction_reshaper": [-1]}
    safetensors.numpy.save_file(state_dict, tmp_path / "model.safetensors", {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    for given in (tmp_path, tmp_path / "model.safetensors"):
        loaded = load_reference_checkpoint(given)
        sd, hf_args, iteration = ctm_checkpoint_parts(loaded, given)
        assert hf_args["dataset"] == "imagenet" and iteration is None
        assert reference_model_kwargs(hf_args) == kwargs
        check_args_fit_state_dict(kwargs, {"out_dims": (1000, 1)}, sd)
        for key, value in state_dict.items():
            np.testing.assert_array_equal(sd[key], value, err_msg=key)
    (tmp_path / "config.json").write_text(json.dumps({**config, "out_dims": 7}))
    with pytest.raises(DataError, match=r"config.json: cannot tell the task .*out_dims=7"):
        load_reference_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(DataError, match=r"no config.json in .*needs model.safetensors and"):
        load_reference_checkpoint(tmp_path)


def _safetensors_bytes(entries: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    header, body = {}, b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(body), len(body) + len(raw)],
        }
        body += raw
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def test_safetensors_reader_widens_bfloat16_and_names_bad_records(tmp_path):
    """The torch-free safetensors reader: bfloat16 (which numpy lacks) becomes float32, and a
    record whose byte range does not fit its shape is refused in one line naming it."""
    values = np.array([1.5, -2.0, 0.0078125], np.float32)  # exact in bfloat16
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(
        _safetensors_bytes({"w": ("BF16", [3], bf16), "i": ("I64", [], b"\x07" + b"\0" * 7)})
    )
    loaded = load_safetensors(path)
    assert loaded["w"].dtype == np.float32 and loaded["w"].tolist() == values.tolist()
    assert loaded["i"].shape == () and int(loaded["i"]) == 7
    path.write_bytes(_safetensors_bytes({"w": ("F32", [2, 2], b"\0" * 12)}))
    with pytest.raises(
        DataError,
        match=r"tensor 'w' \(F32 \[2, 2\]\) needs 16 bytes but its byte range is \[0, 12\)",
    ):
        load_safetensors(path)
    path.write_bytes(b"\xff" * 4)
    with pytest.raises(DataError, match=r"not a safetensors file"):
        load_safetensors(path)


def test_convert_cli_imports_and_refuses_in_one_line(run, tmp_path):
    """`python -m ctm_jax.convert import-torch` is the import command: it writes a parity
    workdir (no dataset needed), and an ImageNet file whose args contradict its weights ends
    with one line naming every such field."""
    cli = [sys.executable, "-m", "ctm_jax.convert", "import-torch", "--backend=numpy"]
    parity = REPO / "tests" / "fixtures" / "ctm_pt" / "parity.pt"
    ok = subprocess.run(
        [*cli, f"--checkpoint={parity}", f"--out={tmp_path / 'parity'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"-> {tmp_path / 'parity'} at step 1500" in ok.stdout
    bad_pt = tmp_path / "contradicting.pt"
    write_pt(bad_pt, imagenet_checkpoint(backbone_type="resnet152-4", n_random_pairing_self=5))
    bad = subprocess.run(
        [*cli, f"--checkpoint={bad_pt}", f"--out={tmp_path / 'o'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    line = bad.stderr.strip().splitlines()[-1]
    assert line == (
        f"error: {bad_pt}: args do not fit the state dict: args.backbone_type: expected "
        "resnet18-1 (from backbone.layer* (basic blocks (2,))), received 'resnet152-4'; "
        "args.n_random_pairing_self: expected <= 2 (from out_neuron_indices_left/right), "
        "received 5"
    )
    assert not (tmp_path / "o").exists()


def test_missing_imagenet_files_are_named_before_anything_is_written(run, tmp_path):
    with pytest.raises(DataError) as e:
        import_ctm_checkpoint.import_torch_checkpoint(
            run[1], tmp_path / "o", backend="numpy", overrides={"task.data_dir": str(tmp_path)}
        )
    message = str(e.value)
    assert "\n" not in message and "imagenet2012 is not prepared there" in message
    assert f"{tmp_path}/downloads/manual/" in message and "ILSVRC2012_img_val.tar" in message
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# launch.eval


def _independent_accuracies(expected: dict[str, Any]) -> dict[str, Any]:
    """Per-tick instant top-1 / top-5 and the 0.5-certainty exit, with plain numpy loops."""
    predictions, certainties, labels = (
        expected[k] for k in ("predictions", "certainties", "labels")
    )
    n, _, ticks = predictions.shape
    top1 = [
        np.mean([np.argmax(predictions[i, :, t]) == labels[i] for i in range(n)])
        for t in range(ticks)
    ]
    top5 = [
        np.mean([labels[i] in np.argsort(-predictions[i, :, t])[:5] for i in range(n)])
        for t in range(ticks)
    ]
    exit_ticks, exit_correct = [], []
    for i in range(n):
        reached = [t for t in range(ticks) if certainties[i, 1, t] >= 0.5]
        t = reached[0] if reached else ticks - 1
        exit_ticks.append(t + 1)
        exit_correct.append(np.argmax(predictions[i, :, t]) == labels[i])
    return {
        "top1": top1,
        "top5": top5,
        "exit_tick": np.mean(exit_ticks),
        "exit_top1": np.mean(exit_correct),
    }


def test_per_tick_table_matches_the_model_applied_directly(run, expected):
    exp, variables, _ = load_run(run[0], ImageTask)
    table = launch_eval.evaluate_image_run(
        exp.task, exp.model, variables, split="validation", batch_size=BATCH, dtype="float32"
    )
    assert table["n"] == N_VALIDATION and table["ticks"] == 3 and table["bn"] == "checkpoint"
    assert table["eval_transform"] == "center_crop" and table["dtype"] == "float32"
    plain = _independent_accuracies(expected)
    np.testing.assert_allclose(table["top1"]["instant"], plain["top1"])
    np.testing.assert_allclose(table["top5"]["instant"], plain["top5"])
    assert min(plain["top1"]) > 0  # the rigged labels make every tick's top-1 informative
    exit_05 = table["exits"][0.5]
    assert exit_05["tick_mean"] == pytest.approx(plain["exit_tick"])
    assert exit_05["top1"] == pytest.approx(plain["exit_top1"])
    # The other read-outs: ctm_jax.readouts on the directly computed outputs of all 8 images.
    probs = readouts.per_tick_probabilities(expected["predictions"], expected["certainties"])
    for name in readouts.READOUTS:
        for k, key in ((1, "top1"), (5, "top5")):
            want = np.asarray(readouts.topk_correct(probs[name], expected["labels"], k)).mean(0)
            np.testing.assert_allclose(table[key][name], want, err_msg=f"{key} {name}")
    rows = launch_eval.tick_rows(table)
    assert [r["tick"] for r in rows] == [1, 2, 3]
    assert rows[2]["top1_most_certain"] == table["top1"]["most_certain"][2]


def test_uncropped_images_are_batched_by_size():
    """eval_transform='resize' keeps each image's aspect ratio: batches hold one size only,
    every image once, in batches of at most batch_size."""
    from tasks.ctm_image.data import ImageTransform

    sizes = [(20, 30), (30, 20), (20, 30), (24, 24), (20, 30), (30, 20), (20, 30)]
    records = [
        {"image": np.full((h, w, 3), i, np.uint8), "label": np.int64(i)}
        for i, (h, w) in enumerate(sizes)
    ]
    transform = ImageTransform(
        "imagenet2012", train=False, image_size=16, eval_transform="resize", eval_resize=18
    )
    batches = list(launch_eval.image_batches(records, transform, batch_size=2, threads=1))
    shapes = [b["inputs"].shape for b in batches]
    assert sorted(shapes) == sorted(
        [(2, 18, 27, 3), (2, 18, 27, 3), (2, 27, 18, 3), (1, 18, 18, 3)]
    )
    assert sorted(np.concatenate([b["targets"] for b in batches]).tolist()) == list(range(7))
    for batch in batches:  # each label's image went to the batch of its own size
        for label, image in zip(batch["targets"], batch["inputs"], strict=True):
            assert image.shape[:2] == {(20, 30): (18, 27), (30, 20): (27, 18)}.get(
                sizes[label], (18, 18)
            )


def test_eval_cli_on_the_imported_run(run, capsys, monkeypatch):
    """`launch.eval --workdir` dispatches on the task: the table, the exits and one JSON line;
    --eval_transform=resize feeds uncropped images, --reestimate_bn replaces the checkpoint's
    BatchNorm statistics; maze flags are refused in one line."""
    workdir = run[0]
    seen: dict[str, Any] = {}
    real = launch_eval.evaluate_per_tick

    def spy(task: Any, model: Any, variables: Any, batches: Any) -> dict[str, Any]:
        batches = list(batches)
        seen.update(shapes=[b["inputs"].shape for b in batches], variables=variables)
        return real(task, model, variables, batches)

    monkeypatch.setattr(launch_eval, "evaluate_per_tick", spy)
    if not flags.FLAGS.is_parsed():  # pytest parsed no command line: flags read as defaults
        flags.FLAGS.mark_as_parsed()
    with flagsaver.as_parsed(
        workdir=str(workdir),
        split="validation",
        batch_size=str(N_VALIDATION),
        eval_transform="resize",
        dtype="float32",
        reestimate_bn="true",
    ):
        launch_eval.main(["launch.eval"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "imagenet2012 validation, 8 images (resize: resize 18, uncropped), 3 ticks" in lines[0]
    assert "BatchNorm statistics: re-estimated" in lines[0]
    assert lines[1].split()[:3] == ["tick", "top1_instant", "top1_most_certain"]
    assert [line.split()[0] for line in lines[3:6]] == ["1", "2", "3"]
    assert lines[6].split()[:2] == ["certainty_threshold", "tick_mean"]
    summary = json.loads(lines[-1])
    assert summary["step"] == 2000 and summary["n"] == N_VALIDATION
    assert summary["eval_transform"] == "resize" and summary["bn"] == "re-estimated"
    assert sorted(summary["exits"]) == ["0.5", "0.8", "0.9"]
    assert seen["shapes"] == [(N_VALIDATION, 18, 27, 3)]  # 20x30 -> shorter side 18, uncropped
    _, checkpoint, _ = load_run(workdir, ImageTask)
    used = jax.tree.leaves(seen["variables"]["batch_stats"])
    stored = jax.tree.leaves(checkpoint["batch_stats"])
    assert not all(np.array_equal(a, b) for a, b in zip(used, stored, strict=True))

    refused = pytest.raises(SystemExit)
    with flagsaver.as_parsed(workdir=str(workdir), sizes="15"), refused as e:
        launch_eval.main(["launch.eval"])
    assert str(e.value) == (
        "error: --sizes is invalid here: image classification runs do not use it"
    )
