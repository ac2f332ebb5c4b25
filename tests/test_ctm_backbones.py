"""The reference image backbones (modified ResNets, shallow-wide) and their BatchNorm statistics.

The reference ResNet forward is re-implemented here in float64 NumPy, channels-first with torch
layouts, straight from the reference architecture (torchvision-style blocks, not from the port),
and run on state dicts exported by the port; its keys/values are written to an oracle-format file
that `launch.check_oracle` must reproduce.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import CheckpointMismatchError
from ctm_jax import convert
from ctm_jax.backbones import BatchNorm, ResNetBackbone, backbone_channels
from ctm_jax.config import ConfigError, CTMConfig
from ctm_jax.model import CTM
from launch import check_oracle

# ------------------------------------------------------------------------------------------------
# Independent float64 NumPy reference (NCHW activations, OIHW kernels, torch state-dict keys)


def np_conv(x: np.ndarray, w: np.ndarray, b=None, stride=1, pad=0, groups=1) -> np.ndarray:
    """torch.nn.functional.conv2d in float64 by explicit patch extraction."""
    n, c, h, wd = x.shape
    out_ch, c_per_group, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    patches = np.empty((n, c, kh, kw, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patches[:, :, i, j] = xp[
                :, :, i : i + stride * oh : stride, j : j + stride * ow : stride
            ]
    out_per_group = out_ch // groups
    outs = []
    for g in range(groups):
        pg = patches[:, g * c_per_group : (g + 1) * c_per_group]
        wg = w[g * out_per_group : (g + 1) * out_per_group]
        outs.append(np.einsum("ncijhw,ocij->nohw", pg, wg))
    out = np.concatenate(outs, axis=1)
    if b is not None:
        out = out + b[None, :, None, None]
    return out


def np_bn(x: np.ndarray, sd: dict, prefix: str) -> np.ndarray:
    """Eval-mode BatchNorm2d with running statistics, eps 1e-5."""

    def per_channel(name):
        return sd[f"{prefix}.{name}"].astype(np.float64)[None, :, None, None]

    normalised = (x - per_channel("running_mean")) / np.sqrt(per_channel("running_var") + 1e-5)
    return normalised * per_channel("weight") + per_channel("bias")


def np_maxpool(x: np.ndarray) -> np.ndarray:
    """MaxPool2d(3, stride 2, padding 1) with -inf padding."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    windows = [xp[:, :, i : i + 2 * oh : 2, j : j + 2 * ow : 2] for i in range(3) for j in range(3)]
    return np.max(np.stack(windows), axis=0)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def np_glu(x: np.ndarray) -> np.ndarray:
    a, b = np.split(x, 2, axis=1)
    return a / (1.0 + np.exp(-b))


BLOCKS = {"18": ("basic", [2, 2, 2, 2]), "50": ("bottleneck", [3, 4, 6, 3])}


def np_backbone(sd: dict, backbone_type: str, x: np.ndarray) -> np.ndarray:
    """The reference featuriser up to the backbone output (B, C, H', W')."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    if backbone_type == "shallow-wide":
        p = "backbone.layers"
        h = np_conv(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], stride=2, pad=1)
        h = np_bn(np_glu(h), sd, f"{p}.2")
        h = np_conv(h, sd[f"{p}.3.weight"], sd[f"{p}.3.bias"], pad=1, groups=32)
        return np_bn(np_glu(h), sd, f"{p}.5")
    depth, k = backbone_type[len("resnet") :].split("-")
    kind, counts = BLOCKS[depth]
    h = np_conv(x, sd["initial_rgb.weight"], sd["initial_rgb.bias"])
    h = relu(np_bn(np_conv(h, sd["backbone.conv1.weight"], pad=1), sd, "backbone.bn1"))
    h = np_maxpool(h)
    for layer in range(1, int(k) + 1):
        for j in range(counts[layer - 1]):
            p = f"backbone.layer{layer}.{j}"
            stride = 2 if layer > 1 and j == 0 else 1
            if kind == "basic":
                out = relu(
                    np_bn(np_conv(h, sd[f"{p}.conv1.weight"], None, stride, 1), sd, f"{p}.bn1")
                )
                out = np_bn(np_conv(out, sd[f"{p}.conv2.weight"], None, 1, 1), sd, f"{p}.bn2")
            else:
                out = relu(np_bn(np_conv(h, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
                out = relu(
                    np_bn(np_conv(out, sd[f"{p}.conv2.weight"], None, stride, 1), sd, f"{p}.bn2")
                )
                out = np_bn(np_conv(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in sd:
                shortcut = np_conv(h, sd[f"{p}.downsample.0.weight"], None, stride)
                shortcut = np_bn(shortcut, sd, f"{p}.downsample.1")
            else:
                shortcut = h
            h = relu(out + shortcut)
    return h


def np_kv(sd: dict, backbone_type: str, x: np.ndarray) -> np.ndarray:
    """Backbone -> flatten (row-major over H, W) -> kv_proj Linear -> LayerNorm: (B, L, d)."""
    features = np_backbone(sd, backbone_type, x)
    tokens = features.reshape(features.shape[0], features.shape[1], -1).transpose(0, 2, 1)
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    h = tokens @ sd["kv_proj.0.weight"].T + sd["kv_proj.0.bias"]
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-5) * sd["kv_proj.1.weight"] + sd["kv_proj.1.bias"]


# ------------------------------------------------------------------------------------------------


def reference_kwargs(backbone_type: str, positional_embedding_type: str = "none") -> dict:
    return dict(
        iterations=2,
        d_model=16,
        d_input=8,
        heads=2,
        n_synch_out=4,
        n_synch_action=4,
        synapse_depth=1,
        memory_length=3,
        deep_nlms=True,
        memory_hidden_dims=2,
        do_layernorm_nlm=False,
        backbone_type=backbone_type,
        positional_embedding_type=positional_embedding_type,
        out_dims=5,
    )


def randomised_state_dict(config: CTMConfig, x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """A port-initialised state dict with every BatchNorm affine/statistic replaced by seeded
    random values (so a port ignoring them cannot match), in the reference layout."""
    variables = CTM(config).init(jax.random.key(seed), jnp.asarray(x))
    sd = convert.export_state_dict(config, variables)
    rng = np.random.default_rng(seed)
    for key, value in sd.items():
        if key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif key.endswith(("running_mean", ".bias")) and "backbone" in key:
            sd[key] = rng.normal(0, 0.2, value.shape).astype(np.float32)
        elif value.ndim == 1 and "backbone" in key and key.endswith("weight"):
            sd[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif key.endswith("num_batches_tracked"):
            sd[key] = np.int64(rng.integers(1, 100))
    return sd


@pytest.mark.parametrize(
    ("backbone_type", "channels", "size"),
    [("resnet18-2", 1, 16), ("resnet50-1", 2, 8), ("shallow-wide", 3, 8)],
)
def test_check_oracle_matches_numpy_reference_backbones(
    backbone_type, channels, size, tmp_path, capsys
):
    kwargs = reference_kwargs(backbone_type)
    config = CTMConfig.from_reference_kwargs(kwargs)
    x_nchw = np.random.default_rng(0).normal(size=(2, channels, size, size)).astype(np.float32)
    x = convert.reference_input_to_jax(x_nchw, config)
    assert x.shape == (2, size, size, channels)
    sd = randomised_state_dict(config, x, seed=1)
    kv = np_kv(sd, backbone_type, x_nchw.astype(np.float64))
    meta = {"name": backbone_type, "model_class": "ContinuousThoughtMachine", "config": kwargs}
    path = tmp_path / "oracle_resnet.npz"
    np.savez(
        path,
        config_json=np.array(json.dumps(meta)),
        input=x_nchw,
        **{f"sd/{k}": v for k, v in sd.items()},
        **{"out/kv": kv.astype(np.float32)},
    )
    check_oracle.main(["check_oracle", str(path)])  # returns; raises SystemExit(1) on a mismatch
    printed = capsys.readouterr().out
    assert "ok   out/kv" in printed and "1/1 oracle files match" in printed

    # The same file with a perturbed running mean must fail: eval mode uses the statistics.
    bad = dict(np.load(path))
    first_bn = next(k for k in bad if k.endswith("running_mean"))
    bad[first_bn] = bad[first_bn] + 0.5
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(SystemExit) as failed:
        check_oracle.main(["check_oracle", str(tmp_path / "bad.npz")])
    assert failed.value.code == 1
    assert "FAIL out/kv" in capsys.readouterr().out


def test_state_dict_round_trip_and_example_input():
    config = CTMConfig.from_reference_kwargs(reference_kwargs("resnet18-1"))
    sd = randomised_state_dict(config, np.zeros((1, 8, 8, 2), np.float32), seed=2)
    assert sd["initial_rgb.weight"].shape == (3, 2, 1, 1)
    assert sd["backbone.conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["backbone.layer1.1.conv2.weight"].shape == (64, 64, 3, 3)
    assert sd["backbone.bn1.num_batches_tracked"].dtype == np.int64
    sample = convert.example_input(config, sd)
    assert sample.shape[-1] == 2  # channels inferred from initial_rgb.weight
    variables = convert.import_state_dict(config, sd)
    assert set(variables) == {"params", "batch_stats", "buffers"}
    again = convert.export_state_dict(config, variables)
    assert sorted(again) == sorted(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
        assert again[key].dtype == value.dtype, key


def test_grouped_conv_layout_of_shallow_wide():
    config = CTMConfig.from_reference_kwargs(reference_kwargs("shallow-wide"))
    shapes = jax.eval_shape(
        lambda x: CTM(config).init(jax.random.key(0), x), jnp.zeros((1, 4, 4, 5))
    )
    expected = convert.expected_state_dict_shapes(config, shapes)
    assert expected["backbone.layers.0.weight"] == (4096, 5, 3, 3)
    assert expected["backbone.layers.3.weight"] == (4096, 64, 3, 3)
    assert expected["backbone.layers.5.running_var"] == (2048,)
    assert expected["backbone.layers.5.num_batches_tracked"] == ()


def test_mismatched_state_dict_names_the_bad_keys():
    config = CTMConfig.from_reference_kwargs(reference_kwargs("resnet18-1"))
    sd = randomised_state_dict(config, np.zeros((1, 8, 8, 1), np.float32), seed=3)
    sd.pop("backbone.layer1.0.bn2.running_var")
    sd["backbone.layer1.0.downsample.0.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    sd["backbone.conv1.weight"] = np.zeros((64, 3, 7, 7), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        convert.import_state_dict(config, sd)
    message = str(info.value)
    assert "missing key 'backbone.layer1.0.bn2.running_var'" in message
    assert "unexpected key 'backbone.layer1.0.downsample.0.weight'" in message
    assert "mis-shaped key 'backbone.conv1.weight'" in message


def test_batchnorm_train_updates_like_torch_and_eval_uses_running_stats():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(2, 3, 3, 4)), jnp.float32)
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=True)
    # init neither updates the statistics nor counts a batch
    np.testing.assert_array_equal(variables["batch_stats"]["running_mean"], np.zeros(4))
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0
    stats = {
        "running_mean": jnp.asarray(rng.normal(size=4), jnp.float32),
        "running_var": jnp.asarray(rng.uniform(0.5, 2, size=4), jnp.float32),
        "num_batches_tracked": jnp.asarray(7, jnp.int32),
    }
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, 4)),
        "bias": jnp.asarray(rng.normal(size=4)),
    }
    y, updated = bn.apply(
        {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    flat = np.asarray(x, np.float64).reshape(-1, 4)
    mean, biased, unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
    new = updated["batch_stats"]
    np.testing.assert_allclose(new["running_mean"], 0.9 * stats["running_mean"] + 0.1 * mean, 1e-6)
    np.testing.assert_allclose(
        new["running_var"], 0.9 * stats["running_var"] + 0.1 * unbiased, 1e-6
    )
    assert int(new["num_batches_tracked"]) == 8
    want = (flat - mean) / np.sqrt(biased + 1e-5) * params["scale"] + params["bias"]
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 4), want, rtol=1e-5, atol=1e-5)

    y_eval = bn.apply({"params": params, "batch_stats": new}, x, train=False)
    want = (flat - new["running_mean"]) / np.sqrt(new["running_var"] + 1e-5)
    want = want * params["scale"] + params["bias"]
    np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 4), want, rtol=1e-5, atol=1e-5)


def test_ctm_train_mode_updates_batch_stats_with_fourier_embedding():
    config = CTMConfig.from_reference_kwargs(reference_kwargs("resnet18-1", "learnable-fourier"))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 8, 8, 1)), jnp.float32)
    model = CTM(config)
    variables = model.init(jax.random.key(0), x)
    assert "positional_embedding" in variables["params"]
    out, updated = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
    )
    assert out.predictions.shape == (2, 5, 2)
    old, new = variables["batch_stats"]["backbone"], updated["batch_stats"]["backbone"]
    assert int(new["bn1"]["num_batches_tracked"]) == 1
    assert not np.allclose(old["bn1"]["running_mean"], new["bn1"]["running_mean"])
    # Eval mode is deterministic and uses the stored statistics (no mutation needed).
    eval_out = model.apply({**variables, **updated}, x)
    assert np.all(np.isfinite(eval_out.predictions))


def test_config_accepts_backbones_and_checks_image_inputs():
    for name in ("resnet18-1", "resnet152-4", "shallow-wide"):
        CTMConfig.from_reference_kwargs(reference_kwargs(name))
    with pytest.raises(ConfigError, match="backbone_type='resnet19-1'"):
        CTMConfig.from_reference_kwargs(reference_kwargs("resnet19-1"))
    config = CTMConfig.from_reference_kwargs(reference_kwargs("resnet34-3", "learnable-fourier"))
    assert config.feature_map_size(16, 16) == (2, 2)  # max-pool, layer2, layer3
    assert config.feature_map_size(15, 9) == (2, 2)  # 15->8->4->2, 9->5->3->2
    assert config.feature_map_size(17, 16) == (3, 2)
    with pytest.raises(ConfigError, match="expects a \\(batch, H, W, C\\) image"):
        config.validate_input_shape((2, 16, 3))
    with pytest.raises(ConfigError, match="H, W >= 2"):
        config.validate_input_shape((2, 8, 8, 3))  # 8x8 image -> 4 -> 2 -> 1x1 map
    config.validate_input_shape((2, 16, 16, 3))
    rotational_1d = CTMConfig.from_reference_kwargs(
        reference_kwargs("shallow-wide", "custom-rotational-1d")
    )
    with pytest.raises(ConfigError, match="custom-rotational-1d.*2-D feature map"):
        rotational_1d.validate_input_shape((2, 8, 8, 3))
    assert [backbone_channels(f"resnet18-{k}", 8) for k in range(1, 5)] == [64, 128, 256, 512]
    assert [backbone_channels(f"resnet101-{k}", 8) for k in range(1, 5)] == [
        256,
        512,
        1024,
        2048,
    ]
    assert backbone_channels("shallow-wide", 8) == 2048


# Parameter counts of torchvision's resnet{18,50,152} (11,689,512 / 25,557,032 / 60,192,808)
# without fc (512*1000+1000 / 2048*1000+1000) and with the 7x7 stem replaced by 3x3 (64*3*49 ->
# 64*3*9); the 1-hyper-block ResNet-18 count is stem (1728 + 128) + 2 blocks of 2x(3x3 64->64 +
# BN 128). The reference's ResNet-152 has 4 layer-2 blocks where torchvision's has 8: its count is
# torchvision's minus 4 bottlenecks of width 128 (convs 512*128 + 128*128*9 + 128*512, BN scales
# and biases 2*(128 + 128 + 512)) = 58,136,128 - 1,120,256 = 57.0 M, the reference's trunk.
@pytest.mark.parametrize(
    ("depth", "k", "count"),
    [
        (18, 1, 1856 + 2 * 2 * (64 * 64 * 9 + 128)),
        (18, 4, 11_168_832),
        (50, 4, 23_500_352),
        (152, 4, 58_136_128 - 4 * (512 * 128 + 128 * 128 * 9 + 128 * 512 + 1536)),
    ],
)
def test_parameter_counts_match_torchvision(depth, k, count):
    shapes = jax.eval_shape(
        lambda x: ResNetBackbone(depth, k).init(jax.random.key(0), x), jnp.zeros((1, 8, 8, 3))
    )
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"])) == count


def test_downsample_only_where_shape_changes():
    shapes = jax.eval_shape(
        lambda x: ResNetBackbone(18, 2).init(jax.random.key(0), x), jnp.zeros((1, 8, 8, 3))
    )
    params = shapes["params"]
    assert "downsample_0" not in params["layer1_0"]
    assert params["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 128)
    assert "downsample_0" not in params["layer2_1"]
