"""Building blocks of the CTM: PyTorch-initialised linear layers, neuron-level models (SuperLinear),
the synapse models (GLU layer and U-Net), multi-head cross-attention split into a once-per-forward
key/value projection and a per-tick query, and the positional embeddings.

Parameter layouts follow Flax (Dense kernels are (in, out)); SuperLinear's weight is stored in the
reference's (in, out, neurons) layout and used neuron-major (`nlm_weights`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

LAYERNORM_EPS = 1e-5  # torch.nn.LayerNorm default


def uniform(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound): PyTorch's Linear default for weights and biases (1/sqrt(fan_in))."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def glu(x: Array) -> Array:
    """torch.nn.GLU over the last axis: first half times sigmoid of the second half."""
    a, b = jnp.split(x, 2, axis=-1)
    return a * jax.nn.sigmoid(b)


def layer_norm(name: str | None = None, dtype: Any = None) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it; the one-pass form loses digits on offset inputs.
    return nn.LayerNorm(epsilon=LAYERNORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


def _mix32(x: Array) -> Array:
    """A bijective 32-bit integer hash (Wellons' "lowbias32": xor-shift / multiply rounds)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keep_mask(key: Array, shape: tuple[int, ...], keep_prob: float) -> Array:
    """Bernoulli(keep_prob) of `shape`, a counter-based hash of (key, element index).

    Each element's bit is two hash rounds of its flat index mixed with the key's words: plain
    integer arithmetic that XLA fuses into the op that uses the mask. jax.random's generators
    make the mask as separate passes (threefry as a rolled loop, rbg as XLA's RngBitGenerator);
    with the maze :small preset's dropout (0.1 on about a million activations per tick, drawn
    twice when ticks are rematerialised) threefry -> rbg cut the train step by about a third on
    a 2-core CPU, and rbg -> this hash by another third. The threshold compare is exact to
    2^-32.
    """
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    seed = _mix32(words[0] ^ _mix32(words[-1] + jnp.uint32(0x9E3779B9)))
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    bits = _mix32(_mix32(index ^ seed) + seed)
    threshold = min(int(keep_prob * 2.0**32), 2**32 - 1)
    return bits < jnp.uint32(threshold)


class Dropout(nn.Module):
    """Inverted dropout (as nn.Dropout: kept entries scaled by 1 / (1 - rate)) with the mask from
    `keep_mask`; the key is this module's 'dropout' rng."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        mask = keep_mask(self.make_rng("dropout"), x.shape, keep)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Linear(nn.Module):
    """nn.Dense with torch.nn.Linear's default init: weight and bias U(+-1/sqrt(fan_in))."""

    features: int
    use_bias: bool = True
    dtype: Any = None  # compute dtype; None: that of the input and params

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bound = 1.0 / math.sqrt(x.shape[-1])
        return nn.Dense(
            self.features,
            use_bias=self.use_bias,
            kernel_init=uniform(bound),
            bias_init=uniform(bound),
            dtype=self.dtype,
            name="dense",
        )(x)


class SuperLinear(nn.Module):
    """One private linear map per neuron (a grouped linear with group size 1).

    out[b, n, h] = (sum_m x[b, n, m] * w1[m, h, n] + b1[0, n, h]) / T, with optional input dropout
    and LayerNorm over the memory axis, in that order (reference `SuperLinear`).

    Input and output are neuron-major, x (N, B, in) -> (N, B, out): a batched matmul over
    neurons with no transposes of the activations (the (B, N, in) layout costs a transpose of the
    activations per call, forward and backward).

    The module's w1 is neuron-major too, (N, in, out) (`LOOP_LAYOUT`); checkpoints and the
    reference store it (in, out, N). `CTM` maps between the two once per forward, outside the
    tick loop (`nlm_weights`): transposed inside the loop, XLA:CPU copied the weight every tick,
    and its gradient back, forward and backward (about a fifth of the maze :small train step).
    """

    in_dims: int
    out_dims: int
    n_neurons: int
    do_norm: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if self.dropout > 0:
            x = Dropout(self.dropout)(x, deterministic=deterministic)
        if self.do_norm:
            x = layer_norm("layernorm")(x)
        bound = 1.0 / math.sqrt(self.in_dims + self.out_dims)
        w1 = self.param(
            "w1", loop_layout_init(uniform(bound)), (self.n_neurons, self.in_dims, self.out_dims)
        )
        b1 = self.param(
            "b1", nn.initializers.zeros, (1, self.n_neurons, self.out_dims), jnp.float32
        )
        temperature = self.param("T", nn.initializers.ones, (1,), jnp.float32)
        return (jnp.einsum("nbm,nmh->nbh", x, w1) + b1.swapaxes(0, 1)) / temperature


# SuperLinear's w1: stored (in, out, N) -> used (N, in, out), and back.
LOOP_LAYOUT = (2, 0, 1)
STORAGE_LAYOUT = (1, 2, 0)


def loop_layout_init(init: nn.initializers.Initializer) -> nn.initializers.Initializer:
    """`init` drawn in the stored layout, then transposed: the same values as a param created
    (in, out, N) directly, so a seed gives the same model whichever layout the module uses."""

    def draw(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        n, fan_in, fan_out = shape
        return init(key, (fan_in, fan_out, n), dtype).transpose(LOOP_LAYOUT)

    return draw


def nlm_weights(variables: Any, to_loop: bool) -> Any:
    """A tick's variables with every neuron-level model's w1 (`trace_processor/nlm_*/w1`) moved
    to the loop layout (`to_loop`) or back to the stored one; everything else as it is."""
    axes = LOOP_LAYOUT if to_loop else STORAGE_LAYOUT

    def move(path: tuple[Any, ...], leaf: Array) -> Array:
        names = [getattr(k, "key", str(k)) for k in path]
        is_w1 = len(names) >= 3 and names[-3] == "trace_processor" and names[-1] == "w1"
        return leaf.transpose(axes) if is_w1 else leaf

    return jax.tree_util.tree_map_with_path(move, variables)


class NeuronLevelModels(nn.Module):
    """Maps each neuron's pre-activation history, neuron-major (D, B, M), to its post-activation
    (B, D).

    deep: SL(M -> 2H) -> GLU -> SL(H -> 2) -> GLU; linear: SL(M -> 2) -> GLU.
    """

    d_model: int
    memory_length: int
    hidden_dims: int
    deep: bool
    do_norm: bool
    dropout: float

    @nn.compact
    def __call__(self, trace: Array, deterministic: bool = True) -> Array:
        first_out = 2 * self.hidden_dims if self.deep else 2
        common = dict(n_neurons=self.d_model, do_norm=self.do_norm, dropout=self.dropout)
        h = SuperLinear(self.memory_length, first_out, name="nlm_0", **common)(trace, deterministic)
        h = glu(h)
        if self.deep:
            h = SuperLinear(self.hidden_dims, 2, name="nlm_1", **common)(h, deterministic)
            h = glu(h)
        return h[..., 0].T


class SynapseLayer(nn.Module):
    """Depth-1 synapses: Dropout -> Linear(d_in -> 2D) -> GLU -> LayerNorm(D)."""

    d_model: int
    dropout: float

    @nn.compact
    def __call__(self, u: Array, deterministic: bool = True) -> Array:
        u = Dropout(self.dropout)(u, deterministic=deterministic)
        h = glu(Linear(2 * self.d_model, name="linear")(u))
        return layer_norm("norm")(h)


class SynapseUNet(nn.Module):
    """Deep synapses: a U-Net of Linear-LN-SiLU blocks with LayerNormed skip connections.

    widths w_i = int(linspace(D, 16, depth)); h_0 = SiLU(LN(Linear(u))); down path
    h_{i+1} = SiLU(LN(Linear(Dropout(h_i)))); up path from the bottleneck g = h_{k-1}:
    g = LN_skip_i(SiLU(LN(Linear(Dropout(g)))) + h_i) for i = k-2 .. 0.
    """

    widths: tuple[int, ...]
    dropout: float

    @nn.compact
    def __call__(self, u: Array, deterministic: bool = True) -> Array:
        w = self.widths
        h = nn.silu(layer_norm("first_norm")(Linear(w[0], name="first_projection")(u)))
        downs = [h]
        for i in range(len(w) - 1):
            h = Dropout(self.dropout)(downs[-1], deterministic=deterministic)
            h = nn.silu(layer_norm(f"down_norm_{i}")(Linear(w[i + 1], name=f"down_{i}")(h)))
            downs.append(h)
        g = downs[-1]
        for i in reversed(range(len(w) - 1)):
            g = Dropout(self.dropout)(g, deterministic=deterministic)
            g = nn.silu(layer_norm(f"up_norm_{i}")(Linear(w[i], name=f"up_{i}")(g)))
            g = layer_norm(f"skip_norm_{i}")(g + downs[i])
        return g


def in_proj_init(d: int) -> nn.initializers.Initializer:
    """torch's xavier-uniform over the packed (3d, d) in_proj_weight: q, k and v all get
    U(+-sqrt(6 / (d + 3d)))."""
    return uniform(math.sqrt(6.0 / (4 * d)))


class KeyValueProjection(nn.Module):
    """The key/value half of torch.nn.MultiheadAttention's in-projection: (B, L, d) -> keys and
    values, each (B, heads, L, head_dim).

    Keys and values do not change across ticks, so they are projected once per forward instead
    of once per tick as the reference does (87% of its parity forward FLOPs).
    """

    d_input: int
    heads: int
    dtype: Any = None  # compute dtype; None: that of the input and params

    @nn.compact
    def __call__(self, kv: Array) -> tuple[Array, Array]:
        b, length, d = kv.shape
        init = in_proj_init(d)
        dense = lambda name: nn.Dense(
            d, kernel_init=init, bias_init=nn.initializers.zeros, dtype=self.dtype, name=name
        )
        head_dim = d // self.heads
        # Head-major (B, heads, L, head_dim): the per-tick attention contracts them as plain
        # batched matmuls over (B, heads); any other layout is re-transposed every tick.
        split = lambda t: t.reshape(b, length, self.heads, head_dim).transpose(0, 2, 1, 3)
        return split(dense("key")(kv)), split(dense("value")(kv))


class QueryAttention(nn.Module):
    """The per-tick half of multi-head attention: one query token attending to fixed keys/values.

    Keys and values are (B, heads, L, head_dim) (`KeyValueProjection`). Returns the attention
    output (B, d) and the per-head weights (B, heads, 1, L). The query is cast to the keys' dtype
    (the compute dtype; the synchronisation that makes it is float32) and the softmax runs in
    float32.
    """

    d_input: int
    heads: int
    dropout: float

    @nn.compact
    def __call__(
        self, query: Array, keys: Array, values: Array, deterministic: bool = True
    ) -> tuple[Array, Array]:
        d = self.d_input
        head_dim = d // self.heads
        q = nn.Dense(
            d,
            kernel_init=in_proj_init(d),
            bias_init=nn.initializers.zeros,
            name="query",
        )(query)
        q = q.reshape(q.shape[0], self.heads, head_dim).astype(keys.dtype)
        logits = jnp.einsum("bhe,bhle->bhl", q, keys) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
        dropped = Dropout(self.dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("bhl,bhle->bhe", dropped.astype(values.dtype), values)
        out = out.reshape(q.shape[0], d)
        bound = 1.0 / math.sqrt(d)
        out = nn.Dense(d, kernel_init=uniform(bound), bias_init=nn.initializers.zeros, name="out")(
            out
        )
        return out, weights[:, :, None, :]


# ------------------------------------------------------------------------------------------------
# Positional embeddings. Inputs and outputs are channels-last: (B, H, W, C) or (B, L, C).


def rotated_unit_vectors(n: int, start: Array) -> Array:
    """`start` rotated by n angles evenly spaced over [0, 180] degrees -> (n, 2)."""
    theta = jnp.deg2rad(jnp.linspace(0.0, 180.0, n, dtype=jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    return jnp.stack([cos * start[0] - sin * start[1], sin * start[0] + cos * start[1]], axis=-1)


class CustomRotationalEmbedding1D(nn.Module):
    """[0, 1] rotated over the sequence, then Linear(2 -> d): returns (L, d)."""

    d_model: int

    @nn.compact
    def __call__(self, features: Array) -> Array:
        vectors = rotated_unit_vectors(features.shape[1], jnp.array([0.0, 1.0], jnp.float32))
        return Linear(self.d_model, name="projection")(vectors)


class CustomRotationalEmbedding(nn.Module):
    """A learnable 2-vector rotated along each axis of a square W x W map; Linear(4 -> d).

    Grid cell (i, j) gets concat(v_i, v_j): returns (W, W, d). Only square maps are valid.
    """

    d_model: int

    @nn.compact
    def __call__(self, features: Array) -> Array:
        width = features.shape[2]
        start = self.param("start_vector", lambda k: jnp.array([0.0, 1.0], jnp.float32))
        vectors = rotated_unit_vectors(width, start)
        grid = jnp.concatenate(
            [
                jnp.broadcast_to(vectors[:, None, :], (width, width, 2)),
                jnp.broadcast_to(vectors[None, :, :], (width, width, 2)),
            ],
            axis=-1,
        )
        return Linear(self.d_model, name="projection")(grid)


class LearnableFourierPositionalEncoding(nn.Module):
    """Li et al. 2021 (Algorithm 1) on [0, 1]-scaled (x, y) coordinates: returns (H, W, d).

    F = [cos(Wr c), sin(Wr c)] / sqrt(F_dim); then Linear(F_dim -> H_dim) -> GLU ->
    Linear(H_dim/2 -> d) -> LayerNorm.
    """

    d_model: int
    gamma: float = 1 / 2.5
    f_dim: int = 256
    h_dim: int = 128

    @nn.compact
    def __call__(self, features: Array) -> Array:
        height, width = features.shape[1], features.shape[2]
        xs = jnp.arange(width, dtype=jnp.float32) / (width - 1)
        ys = jnp.arange(height, dtype=jnp.float32) / (height - 1)
        coords = jnp.stack(
            [
                jnp.broadcast_to(xs[None, :], (height, width)),
                jnp.broadcast_to(ys[:, None], (height, width)),
            ],
            axis=-1,
        )
        projected = nn.Dense(
            self.f_dim // 2,
            use_bias=False,
            kernel_init=nn.initializers.normal(self.gamma**-2),
            name="Wr",
        )(coords)
        fourier = jnp.concatenate([jnp.cos(projected), jnp.sin(projected)], -1)
        fourier = fourier / math.sqrt(self.f_dim)
        h = glu(Linear(self.h_dim, name="mlp_0")(fourier))
        return layer_norm("mlp_norm")(Linear(self.d_model, name="mlp_1")(h))


class MultiLearnableFourierPositionalEncoding(nn.Module):
    """Ten Fourier encodings with gamma in linspace(1.0, 0.1), mixed by softmax weights."""

    d_model: int
    n: int = 10

    @nn.compact
    def __call__(self, features: Array) -> Array:
        gammas = np.linspace(1.0, 0.1, self.n)
        embeddings = jnp.stack(
            [
                LearnableFourierPositionalEncoding(self.d_model, float(g), name=f"embedder_{i}")(
                    features
                )
                for i, g in enumerate(gammas)
            ]
        )
        combination = self.param("combination", nn.initializers.ones, (self.n,), jnp.float32)
        weights = jax.nn.softmax(combination)
        return jnp.tensordot(weights, embeddings, axes=1)


POSITIONAL_EMBEDDINGS = {
    "learnable-fourier": LearnableFourierPositionalEncoding,
    "multi-learnable-fourier": MultiLearnableFourierPositionalEncoding,
    "custom-rotational": CustomRotationalEmbedding,
    "custom-rotational-1d": CustomRotationalEmbedding1D,
}
