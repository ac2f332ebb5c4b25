"""Analytic FLOPs of a CTM forward pass: per example, split into per-forward and per-tick parts.

Counted: every matmul, einsum and convolution as 2 x multiply-adds (an [m, k] @ [k, n] matmul is
2 m k n; a convolution 2 x the kernel taps that fall inside the input, summed over output pixels,
x input channels per group x output channels: taps on the zero padding are left out, as XLA
leaves them out -- on an 11x11 maze they are ~12% of a 3x3 conv's taps). Not counted: biases,
normalisations, activations, pooling, softmax, the synchronisation products and decays -- the
elementwise work, which is O(width) where the matmuls are O(width^2) -- and the positional
embeddings (computed on coordinates once per forward, independent of the batch; 'none' in the
maze and parity presets).

Per example, one forward of T ticks costs `once + T * per_tick`:

  once      the featuriser: `initial_rgb` 1x1 conv and the backbone's convolutions (image
            backbones), the kv projection (features -> d_input) and the attention's key/value
            projections, both applied once per forward (this port projects K/V once, not per
            tick); nothing for the sort variant
  per_tick  q_proj (S_action -> d_input), the query and output projections (d_input^2 each),
            attention logits and weighted values (2 L d_input), the synapses (depth 1:
            (d_input + D) -> 2D; U-Net: its Linear layers), the neuron-level models (D private
            M -> 2H -> 2 maps, or M -> 2) and the output projector (S_out -> out_dims)

XLA's cost analysis (`jax.jit(f).lower(...).compile().cost_analysis()['flops']`) counts the
elementwise work too, so it is a little higher: within 5% for the per-forward part and 10% per
tick on the maze `:cpu` and parity reference configs (tests/test_ctm_sampler.py checks both); on
tiny widths (the maze `:test` preset, D = 32) the elementwise work is a third of a tick. It counts
a scan's body once, not once per tick, hence the per-tick comparison of one `CTMTick`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ctm_jax.backbones import (
    BOTTLENECK_EXPANSION,
    RESNET_LAYOUTS,
    RESNET_WIDTHS,
    backbone_channels,
    parse_resnet,
)
from ctm_jax.config import CTMConfig

# Shallow-wide backbone widths (ctm_jax.backbones.ShallowWide).
SHALLOW_WIDE_CONV = 4096
SHALLOW_WIDE_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class CTMFlops:
    """FLOPs of one CTM forward for one example: `backbone` (initial_rgb + backbone convs) and
    `kv` (kv projection + K/V projections) once per forward, `per_tick` for every tick."""

    backbone: int
    kv: int
    per_tick: int
    tokens: int  # L, the attention's key/value length (0 for the sort variant)

    @property
    def once(self) -> int:
        return self.backbone + self.kv

    def total(self, ticks: int) -> int:
        """One example's forward of `ticks` ticks."""
        return self.once + int(ticks) * self.per_tick


def _out(n: int, stride: int) -> int:
    """Output size of a 3x3 conv with padding 1, a 1x1 conv or the 3x3/2 max-pool: n -> ceil."""
    return (n - 1) // stride + 1


def _taps(n: int, kernel: int, stride: int) -> int:
    """Kernel taps over one spatial axis of size n that land inside the input, summed over the
    output positions (padding (kernel - 1) // 2, as every conv here uses): taps on the zero
    padding are not counted, as XLA does not count them."""
    pad = (kernel - 1) // 2
    return sum(
        sum(0 <= o * stride - pad + i < n for i in range(kernel)) for o in range(_out(n, stride))
    )


def conv_flops(
    height: int,
    width: int,
    c_in: int,
    c_out: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
) -> int:
    """2 x MACs of a convolution of a height x width *input* map (padding (kernel - 1) // 2),
    counting only the taps inside the input."""
    taps = _taps(height, kernel, stride) * _taps(width, kernel, stride)
    return 2 * taps * (c_in // groups) * c_out


def resnet_flops(depth: int, hyper_blocks: int, height: int, width: int, c_in: int = 3) -> int:
    """Convolution FLOPs of `ResNetBackbone(depth, hyper_blocks)` on one H x W x c_in image."""
    kind, counts = RESNET_LAYOUTS[depth]
    total = conv_flops(height, width, c_in, 64, 3)  # stem, stride 1
    h, w, c = _out(height, 2), _out(width, 2), 64  # max-pool
    for layer in range(hyper_blocks):
        width_l = RESNET_WIDTHS[layer]
        for j in range(counts[layer]):
            stride = 2 if layer > 0 and j == 0 else 1
            ho, wo = _out(h, stride), _out(w, stride)
            if kind == "basic":
                c_out = width_l
                total += conv_flops(h, w, c, width_l, 3, stride)
                total += conv_flops(ho, wo, width_l, c_out, 3)
            else:
                c_out = width_l * BOTTLENECK_EXPANSION
                total += conv_flops(h, w, c, width_l, 1)
                total += conv_flops(h, w, width_l, width_l, 3, stride)
                total += conv_flops(ho, wo, width_l, c_out, 1)
            if stride != 1 or c != c_out:
                total += conv_flops(h, w, c, c_out, 1, stride)  # downsample shortcut
            h, w, c = ho, wo, c_out
    return total


def featuriser_flops(cfg: CTMConfig, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """(backbone FLOPs, tokens L, feature channels) for one example of `input_shape` (no batch
    axis: (H, W, C) images, (L, C) token sets, (L,) parity sequences)."""
    shape = tuple(int(s) for s in input_shape)
    parsed = parse_resnet(cfg.backbone_type)
    if parsed is not None:
        height, width, c_in = shape
        flops = conv_flops(height, width, c_in, 3, 1)  # initial_rgb
        flops += resnet_flops(*parsed, height, width, 3)
        h, w = cfg.feature_map_size(height, width)
        return flops, h * w, backbone_channels(cfg.backbone_type, cfg.d_input)
    if cfg.backbone_type == "shallow-wide":
        height, width, c_in = shape
        h, w = cfg.feature_map_size(height, width)
        half = SHALLOW_WIDE_CONV // 2
        flops = conv_flops(height, width, c_in, SHALLOW_WIDE_CONV, 3, 2)
        flops += conv_flops(h, w, half, SHALLOW_WIDE_CONV, 3, 1, SHALLOW_WIDE_GROUPS)
        return flops, h * w, half
    if cfg.backbone_type == "parity_backbone":  # an embedding lookup: no FLOPs
        return 0, shape[0], cfg.d_input
    # 'none': the input's trailing axis is the feature axis, the others are tokens.
    tokens = 1
    for s in shape[:-1]:
        tokens *= s
    return 0, tokens, shape[-1]


def tick_flops(cfg: CTMConfig, tokens: int) -> int:
    """FLOPs of one tick for one example attending over `tokens` keys."""
    d, dm = cfg.d_input, cfg.d_model
    if cfg.synapse_depth == 1:
        synapse = (d + dm) * 2 * dm
    else:
        w = cfg.synapse_widths
        synapse = (d + dm) * w[0] + 2 * sum(w[i] * w[i + 1] for i in range(len(w) - 1))
    if cfg.deep_nlms:
        hidden = cfg.memory_hidden_dims
        nlm = dm * (cfg.memory_length * 2 * hidden + hidden * 2)
    else:
        nlm = dm * cfg.memory_length * 2
    attention = 0
    if cfg.has_attention:
        attention = cfg.synch_size_action * d + 2 * d * d + 2 * tokens * d
    return 2 * (synapse + nlm + attention + cfg.synch_size_out * cfg.out_dims)


def ctm_flops(cfg: CTMConfig, input_shape: Sequence[int]) -> CTMFlops:
    """Per-example FLOPs of a CTM forward on inputs of `input_shape` (without the batch axis)."""
    if not cfg.has_attention:  # sort variant: the raw input enters the synapses every tick
        return CTMFlops(backbone=0, kv=0, per_tick=tick_flops(cfg, 0), tokens=0)
    backbone, tokens, channels = featuriser_flops(cfg, input_shape)
    d = cfg.d_input
    kv = 2 * tokens * (channels * d + 2 * d * d)  # kv_proj, then the K and V projections
    return CTMFlops(backbone=backbone, kv=kv, per_tick=tick_flops(cfg, tokens), tokens=tokens)


def forward_flops(cfg: CTMConfig, batch: int, n_tokens: int, in_channels: int) -> float:
    """FLOPs of one forward of `cfg.iterations` ticks for a batch of token inputs whose features
    reach the kv projection `in_channels` wide (parity: d_input after the embedding), with no
    convolutional backbone. K/V are projected once per forward, as this port does."""
    d = cfg.d_input
    once = 2 * n_tokens * (in_channels * d + 2 * d * d)
    return float(batch * (once + cfg.iterations * tick_flops(cfg, n_tokens)))


def aggregator_flops(n_streams: int, feature_dim: int, hidden_dim: int | None = None) -> int:
    """One application of ParScale's stream aggregator (parscale_jax.parallel.Aggregator) to one
    example: dense_0 (P*H -> hidden) and dense_1 (hidden -> P); nothing for P = 1. The weighted
    sum itself is elementwise and not counted."""
    if n_streams == 1:
        return 0
    hidden = feature_dim if hidden_dim is None else hidden_dim
    return 2 * (n_streams * feature_dim * hidden + hidden * n_streams)


def streamed_flops(
    single: CTMFlops,
    ticks: int,
    n_streams: int,
    feature_dim: int,
    hidden_dim: int | None = None,
    aggregations: int | None = None,
) -> int:
    """One example through P streams of one CTM: P forwards of `ticks` ticks plus the
    aggregator, applied `aggregations` times (default: once per tick, for per-tick stream
    weights). P = 1 is the bare CTM."""
    times = int(ticks) if aggregations is None else int(aggregations)
    return n_streams * single.total(ticks) + times * aggregator_flops(
        n_streams, feature_dim, hidden_dim
    )
