"""The ctm_image task: augmentations against Pillow, the data pipeline on scikit-learn digits and
on tfds mock data (CIFAR, ImageNet), bad inputs, and a short run through the shared trainer whose
checkpoint then feeds BatchNorm re-estimation and the per-tick table."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance, ImageOps

from configs.ctm_image import PRESETS, get_config
from core.errors import ConfigError, DataError
from ctm_jax import readouts
from ctm_jax.config import CTMConfig
from ctm_jax.model import CTM
from launch.runs import load_run
from tasks.ctm_image import augment, data
from tasks.ctm_image.task import ImageTask, evaluate_per_tick, final_probabilities
from train_lib import metrics, trainer
from train_lib.task import make_task

# ------------------------------------------------------------------------------------------------
# Augmentations: every AutoAugment operation equals Pillow's on the same image


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(30, 220, size=(13, 11, 3)).astype(np.uint8)
    image[2:6, 3:8] = rng.integers(0, 256, size=(4, 5, 3))  # a full-range patch
    return image


def test_colour_operations_match_pillow(rgb):
    pil = Image.fromarray(rgb)
    np.testing.assert_array_equal(augment.grayscale(rgb), np.asarray(pil.convert("L")))
    for factor in (0.1, 0.55, 1.0, 1.9):
        for ours, theirs in (
            (augment.brightness, ImageEnhance.Brightness),
            (augment.color, ImageEnhance.Color),
            (augment.contrast, ImageEnhance.Contrast),
            (augment.sharpness, ImageEnhance.Sharpness),
        ):
            want = np.asarray(theirs(pil).enhance(factor))
            np.testing.assert_array_equal(ours(rgb, factor), want, err_msg=f"{ours} {factor}")
    for bits in (4, 6, 8):
        np.testing.assert_array_equal(
            augment.posterize(rgb, bits), np.asarray(ImageOps.posterize(pil, bits))
        )
    for threshold in (0.0, 28.33, 128.0, 255.0):
        np.testing.assert_array_equal(
            augment.solarize(rgb, threshold), np.asarray(ImageOps.solarize(pil, threshold))
        )
    np.testing.assert_array_equal(augment.autocontrast(rgb), np.asarray(ImageOps.autocontrast(pil)))
    np.testing.assert_array_equal(augment.equalize(rgb), np.asarray(ImageOps.equalize(pil)))
    np.testing.assert_array_equal(augment.invert(rgb), np.asarray(ImageOps.invert(pil)))


def test_geometric_operations_match_pillow(rgb):
    pil = Image.fromarray(rgb)

    def affine(*coefficients: float) -> np.ndarray:
        return np.asarray(
            pil.transform(pil.size, Image.Transform.AFFINE, coefficients, Image.Resampling.NEAREST)
        )

    for m in (-0.3, 0.1, 0.27):
        np.testing.assert_array_equal(augment.shear_x(rgb, m), affine(1, m, 0, 0, 1, 0))
        np.testing.assert_array_equal(augment.shear_y(rgb, m), affine(1, 0, 0, m, 1, 0))
    for t in (-4.6, 3.0):
        np.testing.assert_array_equal(augment.translate_x(rgb, t), affine(1, 0, -int(t), 0, 1, 0))
        np.testing.assert_array_equal(augment.translate_y(rgb, t), affine(1, 0, 0, 0, 1, -int(t)))
    square = rgb[:11, :11]
    np.testing.assert_array_equal(augment.rotate(square, 90.0), np.rot90(square))
    np.testing.assert_array_equal(augment.rotate(square, 0.0), square)


def test_autoaugment_policy_and_random_crops():
    assert len(augment.CIFAR10_POLICY) == 25
    assert augment.magnitude("TranslateX", 9, 32, 32)[0] == pytest.approx(150 / 331 * 32)
    assert augment.magnitude("Posterize", 9, 32, 32) == (4.0, False)
    assert augment.magnitude("Solarize", 0, 32, 32) == (255.0, False)
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    outs = [augment.autoaugment_cifar10(image, np.random.default_rng(s)) for s in range(40)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, image) for o in outs) > 20  # most draws change the image
    rng = np.random.default_rng(2)
    for _ in range(50):  # torchvision's box: inside the image, area 8-100%, ratio 3/4-4/3
        top, left, h, w = augment.random_resized_crop_box(40, 70, rng)
        assert top >= 0 and top + h <= 40 and left >= 0 and left + w <= 70
        assert 0.08 * 2800 * 0.8 <= h * w <= 2800 and 0.6 < w / h < 1.5
    # No try fits a 1000:1 strip: the fallback is the centred crop with the ratio clamped.
    assert augment.random_resized_crop_box(2, 2000, rng) == (0, 998, 2, 3)
    assert augment.resize_shorter(np.zeros((30, 60, 3), np.uint8), 20).shape == (20, 40, 3)
    assert augment.center_crop(np.zeros((20, 40, 3), np.uint8), 16).shape == (16, 16, 3)


# ------------------------------------------------------------------------------------------------
# Data


def test_digits_split_and_deterministic_sharded_stream():
    task = make_task(get_config("test"))
    train, held_out = data.source("digits", "train"), data.source("digits", "eval")
    assert (len(train), len(held_out)) == (1413, 384)
    assert data.digits_statistics() == pytest.approx((0.3054, 0.3758), abs=1e-4)
    ds = task.dataset("train", batch_size=4)
    batch = ds[3]
    assert batch["inputs"].shape == (4, 8, 8, 1) and batch["inputs"].dtype == np.float32
    assert batch["targets"].dtype == np.int32 and set(batch["targets"]) <= set(range(10))
    np.testing.assert_array_equal(ds[3]["inputs"], batch["inputs"])  # random access, repeatable
    # Process 1 of 2 reads the odd examples of the same augmented stream.
    half = task.dataset("train", batch_size=2, shard_index=1, shard_count=2)[3]
    np.testing.assert_array_equal(half["inputs"], ds[3]["inputs"][1::2])
    # Evaluation is unaugmented: the first held-out digit, normalised.
    first = task.dataset("eval", batch_size=2)[0]["inputs"][0]
    want = (held_out[0]["image"] / 255.0 - 0.3054) / 0.3758
    np.testing.assert_allclose(first, want, atol=1e-6)


def _imagenet_manual_files(root):
    manual = root / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in data.IMAGENET_MANUAL_FILES:
        (manual / name).write_bytes(b"")


def test_tfds_datasets_through_mock_data(tmp_path):
    _imagenet_manual_files(tmp_path)
    with tfds.testing.mock_data(num_examples=16):  # 2 eval batches of 8, as :test asks
        config = get_config("test")
        config.task.update(dataset="cifar10", image_size=32, augment="autoaugment", download=True)
        config.task.data_dir = str(tmp_path)
        cifar = make_task(config)
        assert cifar.model_config.out_dims == 10
        train = cifar.dataset("train", batch_size=4)[1]
        assert train["inputs"].shape == (4, 32, 32, 3) and np.isfinite(train["inputs"]).all()
        records = data.source("cifar10", "eval", str(tmp_path), True)
        evaluated = cifar.dataset("eval", batch_size=4)[0]
        spec = data.spec("cifar10")
        want = augment.normalise(records[1]["image"], spec.mean, spec.std)
        np.testing.assert_allclose(evaluated["inputs"][1], want, atol=1e-6)
        assert evaluated["targets"][1] == records[1]["label"]

        config.task.update(
            dataset="imagenet2012",
            image_size=16,
            augment="random_resized_crop",
            eval_transform="center_crop",
            eval_resize=20,
        )
        imagenet = make_task(config)
        assert imagenet.model_config.out_dims == 1000
        assert imagenet.dataset("train", batch_size=3)[0]["inputs"].shape == (3, 16, 16, 3)
        assert imagenet.dataset("eval", batch_size=3)[0]["inputs"].shape == (3, 16, 16, 3)
        config.task.eval_transform = "resize"  # uncropped: shorter side 20, one image a batch
        one = make_task(config).dataset("eval", batch_size=1)[0]["inputs"]
        record = data.source("imagenet2012", "eval", str(tmp_path), True)[0]["image"]
        h, w = record.shape[:2]
        want = (20, int(20 * w / h)) if h <= w else (int(20 * h / w), 20)
        assert one.shape == (1, *want, 3)
        with pytest.raises(ConfigError, match="task.eval_transform='resize' is invalid"):
            make_task(config).dataset("eval", batch_size=4)


def test_missing_data_fails_before_tracing_naming_where(tmp_path):
    config = get_config("imagenet")
    config.task.data_dir = str(tmp_path)
    config.model.n_synch_out, config.model.n_synch_action = 64, 64  # the data check is what fails
    with pytest.raises(DataError, match=f"{tmp_path}/downloads/manual/"):
        make_task(config)
    config = get_config("test")
    config.task.update(dataset="cifar100", image_size=32, data_dir=str(tmp_path))
    with pytest.raises(DataError, match="no prepared cifar100.*task.download=True"):
        make_task(config)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("task.dataset", "mnist", "task.dataset='mnist' is invalid: allowed: imagenet2012"),
        ("task.image_size", 2, r"task.image_size=2 is invalid: .*needs >= 3"),
        ("task.augment", "mixup", "task.augment='mixup' is invalid"),
        ("task.bn_reestimate", "ema", "task.bn_reestimate='ema' is invalid"),
        ("task.eval_resize", 4, "task.eval_resize=4 is invalid"),
        ("model.out_dims", 100, "model.out_dims=100 is invalid"),
        ("model.backbone_type", "parity_backbone", "model.backbone_type='parity_backbone'"),
    ],
)
def test_bad_values_fail_with_the_field_named(field, value, message):
    config = get_config("test")
    section, name = field.split(".")
    config[section][name] = value
    if field == "task.eval_resize":
        config.task.eval_transform = "center_crop"
    with pytest.raises(ConfigError, match=message):
        make_task(config)


def test_too_many_eval_batches_fail_before_tracing():
    config = get_config("test")
    config.train.eval_batches = 49  # 384 held-out digits hold 48 batches of 8
    with pytest.raises(ConfigError, match=r"train.eval_batches=49 is invalid: .* 48 batches of 8"):
        make_task(config)


def test_cifar10_preset_is_the_reference_model():
    """The CIFAR-10 'versus humans' run: 1.03 M parameters as the reference instantiates it."""
    values = {**dict(get_config("cifar10").model), "out_dims": 10, "prediction_reshaper": (-1,)}
    model = CTM(CTMConfig(**values))
    shapes = jax.eval_shape(
        lambda k: model.init({"params": k}, jnp.zeros((1, 32, 32, 3))), jax.random.key(0)
    )
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
    assert round(count / 1e6, 2) == 1.03
    assert set(PRESETS) == {"imagenet", "reference", "cifar10", "cifar100", "cpu", "test"}


def test_final_probabilities_are_the_last_tick_of_the_per_tick_read_outs():
    rng = np.random.default_rng(3)
    predictions = rng.normal(size=(4, 6, 5)).astype(np.float32)
    sure = rng.uniform(size=(4, 5)).astype(np.float32)
    certainties = np.stack([1 - sure, sure], axis=1)
    per_tick = jax.jit(readouts.per_tick_probabilities)(predictions, certainties)
    final = jax.jit(final_probabilities)(predictions, certainties)
    for name in readouts.READOUTS:
        np.testing.assert_allclose(final[name], per_tick[name][:, -1], atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------------------------
# A short run, then everything that reads its checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("image_run")
    config = get_config("test")
    config.train.update(
        total_steps=60, log_every=15, eval_every=60, checkpoint_every=60, batch_size=16
    )
    summary = trainer.train_and_evaluate(config, workdir)
    exp, variables, step = load_run(workdir, ImageTask)
    return workdir, summary, exp, variables, step


def test_a_short_run_lowers_the_loss_and_reports_image_metrics(run):
    workdir, summary, _, _, step = run
    assert summary.step == step == 60
    train = metrics.read_metrics(workdir, "train")
    assert [r["step"] for r in train] == [15, 30, 45, 60]
    assert train[-1]["loss"] < 0.95 * train[0]["loss"]  # interval means: steps 46-60 vs 1-15
    final = summary.eval_metrics
    assert {"accuracy", "top5", "accuracy_last_tick", "accuracy_mean_prob"} <= set(final)
    assert 0.0 <= final["accuracy"] <= final["top5"] <= 1.0


def _first_bn_statistics(variables, inputs):
    """Batch mean and unbiased variance of the backbone's first BatchNorm input, from the
    params directly: the 1x1 conv to 3 channels, then the 3x3 stem conv."""
    params = variables["params"]
    rgb = params["initial_rgb"]
    x = jnp.einsum("bhwc,cd->bhwd", inputs, rgb["kernel"][0, 0]) + rgb["bias"]
    y = jax.lax.conv_general_dilated(
        x, params["backbone"]["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    flat = np.asarray(y).reshape(-1, y.shape[-1])
    return flat.mean(0), flat.var(0, ddof=1)


def test_batchnorm_statistics_are_reset_and_reestimated(run):
    _, _, exp, variables, _ = run
    task: ImageTask = exp.task
    stream = task.dataset("train", batch_size=16)
    batches = [stream[0], stream[1]]
    (m1, v1), (m2, v2) = (_first_bn_statistics(variables, b["inputs"]) for b in batches)
    buffers = {k: v for k, v in variables.items() if k != "params"}

    def bn1(mode):
        task.config.task.bn_reestimate = mode
        out = task.eval_buffers(exp.model, variables["params"], buffers, lambda i: batches[i])
        return out["batch_stats"]["backbone"]["bn1"]

    cumulative = bn1("cumulative")  # equal weights: the mean of the two batches' statistics
    np.testing.assert_allclose(cumulative["running_mean"], (m1 + m2) / 2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cumulative["running_var"], (v1 + v2) / 2, rtol=1e-4, atol=1e-5)
    reference = bn1("reference")  # torch: from mean 0 / var 1 with momentum 0.1, twice
    np.testing.assert_allclose(
        reference["running_mean"], 0.09 * m1 + 0.1 * m2, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        reference["running_var"], 0.81 + 0.09 * v1 + 0.1 * v2, rtol=1e-4, atol=1e-5
    )
    assert int(reference["num_batches_tracked"]) == int(cumulative["num_batches_tracked"]) == 2
    # The training run's own statistics are not those.
    trained = variables["batch_stats"]["backbone"]["bn1"]["running_mean"]
    assert not np.allclose(trained, cumulative["running_mean"], atol=1e-3)


def test_per_tick_table(run):
    _, summary, exp, variables, _ = run
    task: ImageTask = exp.task
    task.config.task.bn_reestimate = "cumulative"
    evaluated = task.eval_variables(exp.model, variables, 16)
    eval_ds = task.dataset("eval", batch_size=16)
    batches = [eval_ds[0], eval_ds[1]]
    table = evaluate_per_tick(task, exp.model, evaluated, batches)
    ticks = task.model_config.iterations
    assert table["n"] == 32 and len(table["ece"]) == ticks
    assert set(table["top1"]) == set(readouts.READOUTS) == set(table["top5"])
    for name in readouts.READOUTS:
        top1, top5 = np.asarray(table["top1"][name]), np.asarray(table["top5"][name])
        assert top1.shape == (ticks,) and (top1 <= top5).all() and (top5 <= 1).all()
        assert top1[0] == table["top1"]["instant"][0]  # one tick: every read-out agrees
    # The same statistics and eval batches as the trainer's last evaluation: the most-certain
    # read-out after all ticks is its `accuracy`, the last tick's instant one its
    # `accuracy_last_tick` (computed there by `image_metrics`, apart from the read-outs).
    assert table["top1"]["most_certain"][-1] == pytest.approx(summary.eval_metrics["accuracy"])
    assert table["top1"]["instant"][-1] == pytest.approx(summary.eval_metrics["accuracy_last_tick"])
    assert table["top5"]["most_certain"][-1] == pytest.approx(summary.eval_metrics["top5"])
    assert all(0.0 <= e <= 1.0 for e in table["ece"] + table["ece_mean_prob"])
    assert sum(table["reliability"]["count"][-1]) == sum(table["reliability_mean_prob"]["count"][0])
    assert sum(table["reliability"]["count"][-1]) == 32
    # At the first tick the running mean is the tick's own probability: the two ECEs agree.
    assert table["ece"][0] == pytest.approx(table["ece_mean_prob"][0], abs=1e-6)
    for threshold, exit_ in table["exits"].items():
        assert threshold in (0.5, 0.8, 0.9) and 1.0 <= exit_["tick_mean"] <= ticks
