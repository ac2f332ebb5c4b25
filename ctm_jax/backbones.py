"""Featurisers that turn the raw input into a channels-last feature map before kv projection.

* `none`: identity; `parity_backbone`: a 2-row embedding.
* `resnet{18,34,50,101,152}-{1..4}`: the reference's modified torchvision ResNet (3x3 stride-1
  stem without bias -> BatchNorm -> ReLU -> 3x3/2 max-pool), truncated after k hyper-blocks;
  preceded in the CTM by the `initial_rgb` 1x1 conv (C_in -> 3, with bias).
* `shallow-wide`: Conv(C_in -> 4096, 3, stride 2) -> GLU -> BN -> grouped Conv(2048 -> 4096, 3,
  groups 32) -> GLU -> BN.

Module names mirror the reference's torch names (`conv1`, `bn1`, `layer2_0`, `downsample_0`,
`layers_3`) so that convert.py maps them with a few regular expressions. BatchNorm keeps its
running statistics in the `batch_stats` collection with torch's leaf names.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctm_jax.modules import glu, uniform

Array = jax.Array

BN_EPS = 1e-5  # torch.nn.BatchNorm2d defaults
BN_MOMENTUM = 0.1  # torch convention: running = (1 - momentum) * running + momentum * batch

# ResNet depth -> (block kind, blocks per hyper-block) as in torchvision.
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    # sic: the reference's resnet152 has 4 layer-2 blocks (torchvision's has 8); the released
    # ImageNet checkpoint and its 57.0 M-parameter trunk follow the reference.
    152: ("bottleneck", (3, 4, 36, 3)),
}
RESNET_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
_RESNET_PATTERN = re.compile(r"^resnet(\d+)-([1-4])$")

# torchvision's ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu') for convs.
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def parse_resnet(backbone_type: str) -> tuple[int, int] | None:
    """'resnet50-3' -> (50, 3); None for any other backbone name."""
    match = _RESNET_PATTERN.match(backbone_type)
    if match is None or int(match.group(1)) not in RESNET_LAYOUTS:
        return None
    return int(match.group(1)), int(match.group(2))


def backbone_channels(backbone_type: str, d_input: int) -> int:
    """Channels of the backbone's output feature map (the reference's `d_backbone`).

    For `none` this is unknown until the input is seen; the CTM reads it from the features.
    """
    parsed = parse_resnet(backbone_type)
    if parsed is not None:
        depth, k = parsed
        expansion = BOTTLENECK_EXPANSION if RESNET_LAYOUTS[depth][0] == "bottleneck" else 1
        return RESNET_WIDTHS[k - 1] * expansion
    if backbone_type == "shallow-wide":
        return 2048
    if backbone_type == "parity_backbone":
        return d_input
    raise ValueError(f"backbone {backbone_type!r} has no fixed output width")


def torch_default_conv_init(fan_in: int) -> nn.initializers.Initializer:
    """torch.nn.Conv2d's default init for weight and bias: U(+-1/sqrt(fan_in))."""
    return uniform(1.0 / math.sqrt(fan_in))


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    *,
    use_bias: bool = False,
    groups: int = 1,
    kernel_init: nn.initializers.Initializer = _KAIMING_FAN_OUT,
    bias_init: nn.initializers.Initializer = nn.initializers.zeros,
    dtype: Any = None,
    name: str | None = None,
) -> nn.Conv:
    """A channels-last Conv2d with torch's explicit symmetric padding (kernel HWIO)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        feature_group_count=groups,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        name=name,
    )


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over the last (channel) axis, with torch's running-stat update.

    Params `scale` (torch `weight`) and `bias`; `batch_stats` holds `running_mean`,
    `running_var` and `num_batches_tracked` (int32 counter, +1 per train-mode call) under torch's
    names. Train mode normalises with the biased batch variance and updates
    running = (1 - 0.1) running + 0.1 batch statistic using the *unbiased* batch variance, as torch
    does (flax.linen.BatchNorm stores the biased one, hence this module). Eval mode normalises
    with the running statistics. Nothing is updated while initialising. Statistics are taken in
    float32 whatever the activations' dtype; the output has the input's dtype.
    """

    epsilon: float = BN_EPS
    momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable(
            "batch_stats", "running_mean", lambda: jnp.zeros((channels,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "running_var", lambda: jnp.ones((channels,), jnp.float32)
        )
        count = self.variable(
            "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
        )
        axes = tuple(range(x.ndim - 1))
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        if train:
            mean = jnp.mean(x, axis=axes, dtype=stat_dtype)
            var = jnp.mean(jnp.square(x.astype(stat_dtype) - mean), axis=axes)  # two-pass, biased
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean.astype(jnp.float32)
                running_var.value = (1 - m) * running_var.value + m * unbiased.astype(jnp.float32)
                count.value = count.value + 1
        else:
            mean = running_mean.value.astype(stat_dtype)
            var = running_var.value.astype(stat_dtype)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale.astype(stat_dtype)
        return ((x.astype(stat_dtype) - mean) * inv + bias.astype(stat_dtype)).astype(x.dtype)


def max_pool_3x3_s2(x: Array) -> Array:
    """torch MaxPool2d(3, stride 2, padding 1): padding never wins (it is -inf)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""

    width: int
    stride: int
    dtype: Any = None  # compute dtype of the convolutions; None: that of input and params

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out = conv(self.width, 3, self.stride, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(BatchNorm(name="bn1")(out, train))
        out = conv(self.width, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
        out = BatchNorm(name="bn2")(out, train)
        return nn.relu(out + _shortcut(x, self.width, self.stride, train, self.dtype))


class Bottleneck(nn.Module):
    """torchvision v1.5 Bottleneck: 1x1 -> 3x3 (stride here) -> 1x1 (x4), + shortcut, ReLU."""

    width: int
    stride: int
    dtype: Any = None  # compute dtype of the convolutions; None: that of input and params

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out = conv(self.width, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(BatchNorm(name="bn1")(out, train))
        out = conv(self.width, 3, self.stride, 1, dtype=self.dtype, name="conv2")(out)
        out = nn.relu(BatchNorm(name="bn2")(out, train))
        out = conv(self.width * BOTTLENECK_EXPANSION, 1, dtype=self.dtype, name="conv3")(out)
        out = BatchNorm(name="bn3")(out, train)
        shortcut = _shortcut(x, self.width * BOTTLENECK_EXPANSION, self.stride, train, self.dtype)
        return nn.relu(out + shortcut)


def _shortcut(x: Array, channels: int, stride: int, train: bool, dtype: Any = None) -> Array:
    """Identity, or (when the shape changes) 1x1 conv (no bias, stride) + BN = `downsample`.

    Called inside a block's compact __call__, so the submodules attach to that block.
    """
    if stride == 1 and x.shape[-1] == channels:
        return x
    projected = conv(channels, 1, stride, dtype=dtype, name="downsample_0")(x)
    return BatchNorm(name="downsample_1")(projected, train)


class ResNetBackbone(nn.Module):
    """The reference's modified ResNet-`depth` truncated after `hyper_blocks` layers: NHWC in,
    (B, H', W', d_backbone) out. No avg-pool, no fc."""

    depth: int
    hyper_blocks: int
    dtype: Any = None  # compute dtype of the convolutions; None: that of input and params

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        kind, counts = RESNET_LAYOUTS[self.depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        x = conv(64, 3, 1, 1, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        x = max_pool_3x3_s2(x)
        for layer in range(self.hyper_blocks):
            for j in range(counts[layer]):
                stride = 2 if layer > 0 and j == 0 else 1
                x = block(RESNET_WIDTHS[layer], stride, self.dtype, name=f"layer{layer + 1}_{j}")(
                    x, train
                )
        return x


class ShallowWide(nn.Module):
    """Conv(C->4096, 3, s2, p1) -> GLU -> BN(2048) -> Conv(2048->4096, 3, p1, groups 32) -> GLU
    -> BN(2048). Convs use torch's default init; names follow the reference's `layers.{i}`."""

    dtype: Any = None  # compute dtype of the convolutions; None: that of input and params

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        fan_in = 9 * x.shape[-1]
        x = conv(
            4096,
            3,
            2,
            1,
            use_bias=True,
            kernel_init=torch_default_conv_init(fan_in),
            bias_init=torch_default_conv_init(fan_in),
            dtype=self.dtype,
            name="layers_0",
        )(x)
        x = BatchNorm(name="layers_2")(glu(x), train)
        fan_in = 9 * 2048 // 32
        x = conv(
            4096,
            3,
            1,
            1,
            use_bias=True,
            groups=32,
            kernel_init=torch_default_conv_init(fan_in),
            bias_init=torch_default_conv_init(fan_in),
            dtype=self.dtype,
            name="layers_3",
        )(x)
        return BatchNorm(name="layers_5")(glu(x), train)


class ParityBackbone(nn.Module):
    """Embedding(2, d) indexed by (x == 1): (B, L) of +-1 -> (B, L, d)."""

    d_embedding: int
    dtype: Any = None  # output dtype; None: that of the embedding table

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        embed = nn.Embed(
            2,
            self.d_embedding,
            embedding_init=nn.initializers.normal(1.0),
            dtype=self.dtype,
            name="embedding",
        )
        return embed((x == 1).astype(jnp.int32))


def make_backbone(backbone_type: str, d_input: int, dtype: Any = None) -> nn.Module | None:
    """The backbone module for `backbone_type`, or None for the identity. Every module takes
    `(x, train)`; only the ResNets and shallow-wide use `train` (BatchNorm). `dtype`: the compute
    dtype (None: that of the input and params)."""
    if backbone_type == "parity_backbone":
        return ParityBackbone(d_input, dtype, name="backbone")
    if backbone_type == "none":
        return None
    if backbone_type == "shallow-wide":
        return ShallowWide(dtype, name="backbone")
    parsed = parse_resnet(backbone_type)
    if parsed is not None:
        return ResNetBackbone(*parsed, dtype, name="backbone")
    raise ValueError(f"unknown backbone_type {backbone_type!r}")
