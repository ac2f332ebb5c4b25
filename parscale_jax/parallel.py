"""ParScale's P parallel streams as an architecture-agnostic Flax transform.

Given a backbone f (any Linen module) and P per-stream input transformations x_p = g_p(x), the
streamed model computes (Chen et al., 2025, "Parallel Scaling Law for Language Models"):

    y_p = f(x_p)                                    p = 1..P, one set of backbone weights
    u   = [h_1; ...; h_P] flattened hidden-major    u[h*P + p] = h_p[h], h_p = features(y_p)
    w   = softmax(W_1 SiLU(W_0 u + b_0) + b_1)      in float32, one weight vector per example
    w   = w (1 - eps) + eps / P                     label smoothing of the weights
    y   = sum_p w_p * outputs(y_p)                  in float32, cast back to the outputs' dtype

P = 1 is the bare backbone: no transformation, no aggregator, no extra parameters.

Two equivalent ways to run the P backbone copies on shared weights:

* `mode='vmap'`: `nn.vmap` over a leading stream axis with every variable collection broadcast
  (`variable_axes={True: None}`), the 'params' RNG unsplit (one initialisation) and the 'dropout'
  RNG split (each stream draws its own masks);
* `mode='fold'`: stack the streams into the batch stream-major (row p*B + b is stream p of
  example b, the layout of the released ParScale LM) and call the backbone once.

Both produce the same variables tree, so parameters trained in one mode load in the other. Fold
is only equivalent for backbones whose examples do not interact (no BatchNorm-style batch
statistics); vmap keeps the streams apart by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from core.errors import ConfigError

Array = jax.Array
PyTree = Any

# The released Qwen2 code initialises every nn.Linear as N(0, initializer_range^2) with zero bias
# (initializer_range = 0.02 in all ParScale configs); the aggregator inherits that, which also
# starts it near the uniform average of the streams.
AGGREGATOR_INIT_STD = 0.02
# Random per-stream transformations are what makes the streams differ at init [paper, sec. 3];
# N(0, 0.02^2) is the scale a public ParScale replication uses for its prefixes.
TRANSFORM_INIT_STD = 0.02
STREAM_MODES = ("vmap", "fold")


# ------------------------------------------------------------------------------------------------
# Layout helpers


def fold_streams(xs: Array) -> Array:
    """(P, B, ...) -> (P*B, ...), stream-major: row p*B + b is stream p of example b."""
    return xs.reshape((xs.shape[0] * xs.shape[1], *xs.shape[2:]))


def unfold_streams(x: Array, n_streams: int) -> Array:
    """(P*B, ...) stream-major -> (P, B, ...); the inverse of `fold_streams`."""
    if x.shape[0] % n_streams:
        raise ConfigError(
            f"leading axis {x.shape[0]} is not a multiple of n_streams={n_streams}: "
            "a stream-major folded batch has P*B rows"
        )
    return x.reshape((n_streams, x.shape[0] // n_streams, *x.shape[1:]))


def replicate_streams(x: Array, n_streams: int) -> Array:
    """(B, ...) -> (P*B, ...): the same batch repeated P times, stream-major (ParScale's
    `repeat(x, 'b ... -> (n b) ...')`, i.e. `jnp.tile` along the batch axis)."""
    return jnp.tile(x, (n_streams,) + (1,) * (x.ndim - 1))


def hidden_major(features: Array) -> Array:
    """(P, ..., H) -> (..., H*P) with feature index h*P + p.

    ParScale flattens `stack(h_1..h_P, axis=-1)`; concatenating the streams instead (index
    p*H + h) is a different, wrong input order for a checkpoint's aggregator.
    """
    stacked = jnp.moveaxis(features, 0, -1)  # (..., H, P)
    return stacked.reshape((*stacked.shape[:-2], stacked.shape[-2] * stacked.shape[-1]))


def weighted_sum(values: PyTree, weights: Array) -> PyTree:
    """sum_p w[..., p] * v[p, ...] for every leaf v of shape (P, *batch, *rest).

    `weights` is (*batch, P); it broadcasts over the trailing `rest` axes of each leaf. The sum is
    taken in float32 (ParScale's weights are float32) and cast back to the leaf's dtype.
    """
    w = jnp.moveaxis(weights.astype(jnp.float32), -1, 0)  # (P, *batch)

    def combine(v: Array) -> Array:
        if v.shape[: w.ndim] != w.shape:
            raise ConfigError(
                f"cannot weight a value of shape {v.shape} by stream weights of shape "
                f"{weights.shape}: values need leading axes (P, *batch) = {w.shape}"
            )
        wv = w.reshape(w.shape + (1,) * (v.ndim - w.ndim))
        return jnp.sum(wv * v.astype(jnp.float32), axis=0).astype(v.dtype)

    return jax.tree.map(combine, values)


# ------------------------------------------------------------------------------------------------
# Aggregation


class Aggregator(nn.Module):
    """ParScale's dynamic weighted sum over P streams.

    w = softmax_P(dense_1(SiLU(dense_0(hidden_major(h))))) in float32, smoothed to
    w (1 - eps) + eps / P; output sum_p w_p v_p. Parameters: `dense_0` (kernel (P*H, hidden),
    bias), `dense_1` (kernel (hidden, P), bias), hidden = H by default; these are HF ParScale's
    `aggregate_layer.0` / `aggregate_layer.2` with kernel = weight.T. With P = 1 it is the
    identity and has no parameters.

    Attributes:
      n_streams: P.
      smoothing: eps (`parscale_attn_smooth`, 0.1 in every released checkpoint).
      hidden_dim: width of the MLP's hidden layer; None means H, as in ParScale.
      dtype: computation dtype of the two dense layers (None: from the inputs). The softmax, the
        smoothing and the weighted sum are float32 regardless.
      param_dtype: dtype of the parameters.
      kernel_init / bias_init: initialisers of both dense layers.
    """

    n_streams: int
    smoothing: float = 0.1
    hidden_dim: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(AGGREGATOR_INIT_STD)
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    def _stream_weights(self, features: Array) -> Array:
        """Smoothed float32 stream weights: features (P, *batch, H) -> (*batch, P)."""
        p = self.n_streams
        if features.shape[0] != p:
            raise ConfigError(
                f"features have {features.shape[0]} streams on axis 0, expected n_streams={p}"
            )
        if not 0.0 <= self.smoothing <= 1.0:
            raise ConfigError(f"smoothing={self.smoothing!r} is invalid: must lie in [0, 1]")
        if p == 1:
            return jnp.ones((*features.shape[1:-1], 1), jnp.float32)
        hidden = features.shape[-1] if self.hidden_dim is None else self.hidden_dim
        dense = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )
        u = nn.Dense(hidden, name="dense_0", **dense)(hidden_major(features))
        logits = nn.Dense(p, name="dense_1", **dense)(nn.silu(u))
        # Softmax in float32 whatever the compute dtype: bf16 weights would round the mix.
        w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        if self.smoothing:
            w = w * (1.0 - self.smoothing) + self.smoothing / p
        return w

    @nn.compact
    def __call__(
        self, features: Array, values: PyTree = None, *, return_weights: bool = False
    ) -> PyTree | tuple[PyTree, Array]:
        """features (P, *batch, H); values: a pytree of (P, *batch, ...) leaves (default: the
        features themselves) -> the combined values (and the (*batch, P) weights if asked)."""
        weights = self._stream_weights(features)
        combined = weighted_sum(features if values is None else values, weights)
        return (combined, weights) if return_weights else combined

    def aggregate_folded(self, h: Array) -> Array:
        """The LM's path: h (P*B, ..., H) stream-major folded -> (B, ..., H)."""
        return self(unfold_streams(h, self.n_streams))


# ------------------------------------------------------------------------------------------------
# Per-stream input transformations (written for one stream; ParallelStreams gives each stream its
# own copy of the parameters)


class AdditiveStreamEmbedding(nn.Module):
    """x + e: a learnable offset added to a continuous input (token features, embeddings).

    The offset e varies along `axes` (default: the feature axis) and broadcasts over the others,
    so e.g. `axes=(-2, -1)` learns one offset per position and feature.
    """

    axes: tuple[int, ...] = (-1,)
    stddev: float = TRANSFORM_INIT_STD
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        axes = sorted(a % x.ndim for a in self.axes)
        shape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
        shape = shape[min(axes) :]  # leading broadcast axes need no stored size
        offset = self.param("offset", nn.initializers.normal(self.stddev), shape, self.param_dtype)
        return x + offset.astype(x.dtype)


class StreamPrefix(nn.Module):
    """[prefix ; x]: `n_tokens` learnable entries prepended along the sequence `axis`.

    Prefix tuning on the input; ParScale's LM does the same inside every attention layer (per-layer
    key/value prefixes). The prefix has the shape of x's trailing axes and is shared by all
    examples; the output is longer by `n_tokens` along `axis`.
    """

    n_tokens: int
    axis: int = 1
    stddev: float = TRANSFORM_INIT_STD
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        axis = self.axis % x.ndim
        prefix = self.param(
            "prefix",
            nn.initializers.normal(self.stddev),
            (self.n_tokens, *x.shape[axis + 1 :]),
            self.param_dtype,
        )
        prefix = jnp.broadcast_to(
            prefix.astype(x.dtype), (*x.shape[:axis], self.n_tokens, *x.shape[axis + 1 :])
        )
        return jnp.concatenate([prefix, x], axis=axis)


# ------------------------------------------------------------------------------------------------
# The wrapper


@flax.struct.dataclass
class StreamsOutput:
    """What `ParallelStreams(return_streams=True)` returns.

    output: the aggregated outputs; streams: the backbone's raw per-stream outputs, every leaf
    with a leading P axis; weights: the (*batch, P) smoothed float32 stream weights.
    """

    output: PyTree
    streams: PyTree
    weights: Array


def _identity(tree: PyTree) -> PyTree:
    return tree


class ParallelStreams(nn.Module):
    """P streams of one backbone with shared weights, per-stream inputs and a learned mix.

    y = sum_p w_p(x) * outputs_fn(f(g_p(x))), w from `Aggregator` over features_fn(f(g_p(x))).

    Attributes:
      backbone: the module f, as an unbound instance (e.g. `CTM(config)`); its variables appear
        once, under 'backbone', exactly as in the bare module.
      n_streams: P. With P = 1 the wrapper calls the backbone directly: same variables, same
        outputs, nothing added.
      input_transform: the module g applied to each stream (e.g. `AdditiveStreamEmbedding()`,
        `StreamPrefix(4)`), stored as 'input_transform' with a leading P axis on every parameter
        and initialised independently per stream. None gives every stream the raw input (the
        in-backbone transforms of the ParScale LM need none here).
      features_fn: selects the aggregator's input from the stacked backbone outputs: an array
        (P, *batch, H). Default: the output itself.
      outputs_fn: selects what is combined: a pytree of (P, *batch, ...) arrays. Default: the
        output itself.
      smoothing: eps of the stream-weight smoothing.
      aggregator_hidden_dim / aggregator_dtype: passed to `Aggregator`.
      mode: 'vmap' (nn.vmap over streams) or 'fold' (streams folded into the batch).
      split_rngs: RNG streams that differ between streams in 'vmap' mode ('params' must stay
        unsplit: the backbone is initialised once).
      return_streams: return a `StreamsOutput` with the per-stream outputs and weights.
    """

    backbone: nn.Module
    n_streams: int
    input_transform: nn.Module | None = None
    features_fn: Callable[[PyTree], Array] = _identity
    outputs_fn: Callable[[PyTree], PyTree] = _identity
    smoothing: float = 0.1
    aggregator_hidden_dim: int | None = None
    aggregator_dtype: Any = None
    mode: str = "vmap"
    split_rngs: Mapping[str, bool] = FrozenDict({"params": False, "dropout": True})
    return_streams: bool = False

    def _check(self) -> None:
        if not isinstance(self.n_streams, int) or self.n_streams < 1:
            raise ConfigError(f"n_streams={self.n_streams!r} is invalid: must be an integer >= 1")
        if self.mode not in STREAM_MODES:
            raise ConfigError(f"mode={self.mode!r} is invalid: allowed: {', '.join(STREAM_MODES)}")
        if self.split_rngs.get("params", False):
            raise ConfigError("split_rngs['params'] must be False: the backbone weights are shared")

    def stream_inputs(self, x: Array) -> Array:
        """x (B, ...) -> (P, B, ...'): g_p(x) for every stream, each g_p with its own params."""
        if self.input_transform is None:
            return jnp.broadcast_to(x, (self.n_streams, *x.shape))
        per_stream = nn.vmap(
            lambda transform, inputs: transform(inputs),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.n_streams,
            # Logically partitioned transform params get an unsharded leading stream axis.
            metadata_params={nn.PARTITION_NAME: None},
        )
        return per_stream(self.input_transform, x)

    def run_streams(self, xs: Array, *args: Any, **kwargs: Any) -> PyTree:
        """f on every stream: xs (P, B, ...) -> outputs with leaves (P, B, ...).

        `args` are per-example arrays (batch axis 0, e.g. masks) that every stream shares;
        `kwargs` are passed unchanged (flags such as `train=`). In 'fold' mode every output leaf
        must carry the batch on axis 0, since it is unfolded back to (P, B, ...).
        """
        if self.mode == "fold":
            p = self.n_streams
            tiled = jax.tree.map(lambda a: replicate_streams(jnp.asarray(a), p), args)
            folded = self.backbone(fold_streams(xs), *tiled, **kwargs)
            return jax.tree.map(lambda leaf: unfold_streams(leaf, p), folded)
        shared = nn.vmap(
            lambda backbone, inputs, *rest: backbone(inputs, *rest, **kwargs),
            # Every collection is shared: 'params' and constants such as CTM's index 'buffers'.
            variable_axes={True: None},
            split_rngs=dict(self.split_rngs),
            in_axes=(0,) + (None,) * len(args),
            out_axes=0,
        )
        return shared(self.backbone, xs, *args)

    @nn.compact
    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> PyTree | StreamsOutput:
        """x (B, ...) plus the backbone's other arguments -> the aggregated output."""
        self._check()
        if self.n_streams == 1:
            y = self.backbone(x, *args, **kwargs)
            if not self.return_streams:
                return y
            streams = jax.tree.map(lambda leaf: leaf[None], y)
            weights = jnp.ones((*self.features_fn(y).shape[:-1], 1), jnp.float32)
            return StreamsOutput(output=y, streams=streams, weights=weights)

        ys = self.run_streams(self.stream_inputs(x), *args, **kwargs)
        aggregator = Aggregator(
            self.n_streams,
            smoothing=self.smoothing,
            hidden_dim=self.aggregator_hidden_dim,
            dtype=self.aggregator_dtype,
            name="aggregator",
        )
        output, weights = aggregator(self.features_fn(ys), self.outputs_fn(ys), return_weights=True)
        if self.return_streams:
            return StreamsOutput(output=output, streams=ys, weights=weights)
        return output
