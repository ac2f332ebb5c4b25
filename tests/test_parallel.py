"""ParScale's P-stream transform: exact P=1 reduction, shared weights, ParScale's aggregator
(hidden-major input, float32 softmax, smoothing), vmap == fold, and a P=4 CTM learning parity."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctm_jax.config import CTMConfig
from ctm_jax.losses import parity_loss
from ctm_jax.model import CTM, certainty, project_params
from parscale_jax.parallel import (
    AdditiveStreamEmbedding,
    Aggregator,
    ParallelStreams,
    StreamPrefix,
    fold_streams,
    hidden_major,
    replicate_streams,
    unfold_streams,
)
from tasks.ctm_parity.task import parity_dataset


class AttentionBlock(nn.Module):
    """A small pre-norm transformer block with a padding mask and dropout."""

    width: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
        h = nn.LayerNorm()(x)
        attn_mask = nn.make_attention_mask(mask, mask)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, deterministic=not train)(
            h, mask=attn_mask
        )
        h = nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(x)))
        h = nn.Dropout(0.3, deterministic=not train)(h)
        return x + nn.Dense(self.width)(h)


def block_inputs(batch: int = 3, length: int = 5, width: int = 8):
    x = jax.random.normal(jax.random.key(0), (batch, length, width))
    mask = jnp.ones((batch, length)).at[0, -2:].set(0.0)  # one padded example
    return x, mask


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def n_params(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------
# Layout


def test_fold_is_stream_major_and_unfold_inverts_it():
    xs = jnp.arange(3 * 2 * 4).reshape(3, 2, 4)  # (P, B, H)
    folded = fold_streams(xs)
    for p in range(3):
        for b in range(2):
            np.testing.assert_array_equal(folded[p * 2 + b], xs[p, b])
    np.testing.assert_array_equal(unfold_streams(folded, 3), xs)
    x = jnp.arange(8).reshape(2, 4)
    np.testing.assert_array_equal(unfold_streams(replicate_streams(x, 3), 3), jnp.stack([x] * 3))
    with pytest.raises(ValueError, match="not a multiple of n_streams=4"):
        unfold_streams(folded, 4)


# ------------------------------------------------------------------------------------------------
# The wrapper


def test_one_stream_is_the_bare_backbone():
    x, mask = block_inputs()
    bare = AttentionBlock()
    wrapped = ParallelStreams(AttentionBlock(), 1, input_transform=AdditiveStreamEmbedding())
    variables = wrapped.init(jax.random.key(1), x, mask)
    # Nothing but the backbone, under 'backbone', with the bare module's tree.
    assert list(variables["params"]) == ["backbone"]
    assert shapes(variables["params"]["backbone"]) == shapes(
        jax.eval_shape(bare.init, jax.random.key(1), x, mask)["params"]
    )
    expected = bare.apply({"params": variables["params"]["backbone"]}, x, mask)
    np.testing.assert_array_equal(wrapped.apply(variables, x, mask), expected)
    out = wrapped.clone(return_streams=True).apply(variables, x, mask)
    np.testing.assert_array_equal(out.streams[0], expected)
    np.testing.assert_array_equal(out.weights, np.ones((3, 5, 1)))


def test_backbone_is_stored_once_and_the_transform_per_stream():
    x, mask = block_inputs()
    p, h = 4, x.shape[-1]
    model = ParallelStreams(AttentionBlock(), p, input_transform=AdditiveStreamEmbedding())
    params = model.init(jax.random.key(1), x, mask)["params"]
    bare = jax.eval_shape(AttentionBlock().init, jax.random.key(1), x, mask)["params"]
    assert sorted(params) == ["aggregator", "backbone", "input_transform"]
    assert shapes(params["backbone"]) == shapes(bare)
    offsets = params["input_transform"]["offset"]
    assert offsets.shape == (p, h)
    # Independent random init per stream, else every stream computes the same thing.
    assert np.linalg.matrix_rank(np.asarray(offsets)) == p
    assert shapes(params["aggregator"]) == {
        "dense_0": {"kernel": (p * h, h), "bias": (h,)},
        "dense_1": {"kernel": (h, p), "bias": (p,)},
    }
    # ParScale's count of extra parameters: aggregator P H^2 + H + P H + P, plus the transform.
    extra = n_params(params) - n_params(bare)
    assert extra == p * h * h + h + p * h + p + p * h


def test_stream_prefix_prepends_a_different_prefix_per_stream():
    x, _ = block_inputs()
    model = ParallelStreams(
        nn.Dense(8), 2, input_transform=StreamPrefix(n_tokens=3), return_streams=True
    )
    variables = model.init(jax.random.key(0), x)
    prefix = variables["params"]["input_transform"]["prefix"]
    assert prefix.shape == (2, 3, 8)
    assert not np.allclose(prefix[0], prefix[1])
    inputs = model.apply(variables, x, method=ParallelStreams.stream_inputs)
    assert inputs.shape == (2, 3, 3 + 5, 8)
    np.testing.assert_array_equal(inputs[1, 2, :3], prefix[1])
    np.testing.assert_array_equal(inputs[:, :, 3:], jnp.stack([x, x]))
    assert model.apply(variables, x).output.shape == (3, 8, 8)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_vmap_and_fold_agree_in_outputs_and_gradients(p):
    x, mask = block_inputs()
    vmapped = ParallelStreams(
        AttentionBlock(), p, input_transform=AdditiveStreamEmbedding(stddev=0.5)
    )
    folded = vmapped.clone(mode="fold")
    variables = vmapped.init(jax.random.key(2), x, mask)
    # One variables tree serves both modes.
    assert shapes(jax.eval_shape(folded.init, jax.random.key(2), x, mask)) == shapes(variables)

    def output_and_grads(model):
        def loss(params):
            y = model.apply({"params": params}, x, mask)
            return jnp.sum(jnp.sin(y) * mask[..., None]), y

        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

    g_vmap, y_vmap = output_and_grads(vmapped)
    g_fold, y_fold = output_and_grads(folded)
    np.testing.assert_allclose(y_vmap, y_fold, rtol=1e-5, atol=1e-5)
    if p > 1:
        # The streams really differ, so the agreement is not a trivial one.
        streams = vmapped.clone(return_streams=True).apply(variables, x, mask).streams
        assert float(jnp.abs(streams[0] - streams[1]).max()) > 1e-2
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_vmap, g_fold
    )


def test_each_stream_draws_its_own_dropout_mask():
    x, mask = block_inputs()
    model = ParallelStreams(AttentionBlock(), 2, return_streams=True)  # no input transform
    variables = model.init(jax.random.key(0), x, mask)
    out = model.apply(variables, x, mask, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(out.streams[0], out.streams[1])
    still = model.apply(variables, x, mask)  # deterministic: identical streams
    np.testing.assert_array_equal(still.streams[0], still.streams[1])


def test_invalid_settings_name_the_field():
    x, mask = block_inputs()
    with pytest.raises(ValueError, match="n_streams=0 is invalid"):
        ParallelStreams(AttentionBlock(), 0).init(jax.random.key(0), x, mask)
    with pytest.raises(ValueError, match="mode='pmap' is invalid"):
        ParallelStreams(AttentionBlock(), 2, mode="pmap").init(jax.random.key(0), x, mask)


# ------------------------------------------------------------------------------------------------
# The aggregator


def numpy_aggregate(features, params, eps, order):
    """ParScale's aggregation in float64; order 'hidden' (h*P + p) or 'stream' (p*H + h)."""
    f = np.asarray(features, np.float64)  # (P, B, H)
    if order == "hidden":
        u = np.stack(list(f), axis=-1).reshape(f.shape[1], -1)
    else:
        u = np.concatenate(list(f), axis=-1)
    d0, d1 = params["dense_0"], params["dense_1"]
    a = u @ np.asarray(d0["kernel"], np.float64) + np.asarray(d0["bias"], np.float64)
    a = a / (1 + np.exp(-a))
    logits = a @ np.asarray(d1["kernel"], np.float64) + np.asarray(d1["bias"], np.float64)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    w = w * (1 - eps) + eps / f.shape[0]
    return np.einsum("bp,pbh->bh", w, f), w


def test_aggregator_input_is_hidden_major():
    p, b, h = 3, 4, 5
    # Deliberately asymmetric: each stream on its own scale, so the two orders give different u.
    features = (
        jax.random.normal(jax.random.key(0), (p, b, h)) * jnp.array([0.5, 2.0, -1.0])[:, None, None]
    )
    agg = Aggregator(p, smoothing=0.1, kernel_init=nn.initializers.normal(1.0))
    params = agg.init(jax.random.key(1), features)["params"]
    out, weights = agg.apply({"params": params}, features, return_weights=True)
    expected, expected_w = numpy_aggregate(features, params, 0.1, "hidden")
    np.testing.assert_allclose(weights, expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    wrong, _ = numpy_aggregate(features, params, 0.1, "stream")
    assert np.abs(wrong - expected).max() > 0.1  # the test can tell the two orders apart
    np.testing.assert_array_equal(
        hidden_major(features)[0, : 2 * p], [features[q, 0, i] for i in range(2) for q in range(p)]
    )
    # The LM's path on a stream-major folded batch gives the same result.
    np.testing.assert_array_equal(
        agg.apply({"params": params}, fold_streams(features), method=Aggregator.aggregate_folded),
        out,
    )


def test_aggregator_smoothing_and_float32_softmax():
    p, b, h = 4, 6, 8
    features = jax.random.normal(jax.random.key(0), (p, b, h)).astype(jnp.bfloat16)
    values = jax.random.normal(jax.random.key(1), (p, b, 3)).astype(jnp.bfloat16)
    # Logits of order 1, so the weights are not saturated 0/1 (which bf16 would hold exactly).
    agg = Aggregator(p, smoothing=0.2, dtype=jnp.bfloat16, kernel_init=nn.initializers.normal(0.3))
    variables = agg.init(jax.random.key(2), features)
    (out, w), state = agg.apply(
        variables, features, values, return_weights=True, capture_intermediates=True
    )
    captured = state["intermediates"]["dense_1"]["__call__"][0]
    assert captured.dtype == jnp.bfloat16  # the MLP really ran in bf16
    logits = np.asarray(captured, np.float64)
    assert w.dtype == jnp.float32 and out.dtype == jnp.bfloat16
    # float32 softmax of the bf16 logits, then w (1 - eps) + eps / P: agreement to float32
    # precision (a bf16 softmax would be off by ~1e-3).
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft = soft / soft.sum(-1, keepdims=True)
    np.testing.assert_allclose(w, soft * 0.8 + 0.2 / p, rtol=0, atol=1e-6)
    assert float(w.min()) >= 0.2 / p - 1e-7
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    # The weighted sum is taken in float32 and rounded once to bf16.
    expected = jnp.einsum("bp,pbc->bc", w, values.astype(jnp.float32)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(out, expected)
    # eps = 1: the plain average; eps = 0: the raw softmax.
    uniform = agg.clone(smoothing=1.0).apply(variables, features, return_weights=True)[1]
    np.testing.assert_allclose(uniform, np.full((b, p), 1 / p), atol=1e-7)
    raw = agg.clone(smoothing=0.0).apply(variables, features, return_weights=True)[1]
    np.testing.assert_allclose(raw, soft, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Architecture-agnostic: a P=4 CTM on cumulative parity


PARITY_LEN = 8
PARITY_CTM = CTMConfig(
    iterations=4,
    d_model=32,
    d_input=16,
    heads=2,
    n_synch_out=16,
    n_synch_action=8,
    synapse_depth=1,
    memory_length=4,
    deep_nlms=True,
    memory_hidden_dims=4,
    do_layernorm_nlm=False,
    # 'parity_backbone' looks up (x == 1), which a per-stream offset on raw +-1 would break, so
    # the token features (sign one-hot, position one-hot) go straight to the kv projection.
    backbone_type="none",
    positional_embedding_type="none",
    out_dims=2 * PARITY_LEN,
    prediction_reshaper=(PARITY_LEN, 2),
).validate()


def parity_features(x: np.ndarray) -> jax.Array:
    """(B, L) of +-1 -> (B, L, 2 + L): one-hot sign and one-hot position per token."""
    sign = jax.nn.one_hot((jnp.asarray(x) > 0).astype(jnp.int32), 2)
    position = jnp.broadcast_to(jnp.eye(x.shape[1]), (x.shape[0], x.shape[1], x.shape[1]))
    return jnp.concatenate([sign, position], axis=-1)


def test_four_stream_ctm_learns_parity_through_the_wrapper():
    p, steps, batch_size = 4, 200, 32
    model = ParallelStreams(
        CTM(PARITY_CTM),
        p,
        input_transform=AdditiveStreamEmbedding(),
        # Weights from each stream's final output synchronisation; combined per-tick logits.
        features_fn=lambda out: out.synch_out,
        outputs_fn=lambda out: out.predictions,
    )
    data = parity_dataset(PARITY_LEN, seed=0, batch_size=batch_size)
    example = data[0]
    x = parity_features(example["inputs"])
    variables = jax.jit(model.init)(jax.random.key(0), x)
    params, buffers = variables["params"], {"buffers": variables["buffers"]}

    bare = jax.eval_shape(CTM(PARITY_CTM).init, jax.random.key(0), x)
    assert shapes(params["backbone"]) == shapes(bare["params"])  # one copy of the CTM
    assert shapes(buffers["buffers"]["backbone"]) == shapes(bare["buffers"])
    assert params["input_transform"]["offset"].shape == (p, 2 + PARITY_LEN)

    tx = optax.adamw(3e-3)
    opt_state = tx.init(params)

    def loss_fn(params, x, targets):
        logits = model.apply({"params": params, **buffers}, x)  # (B, 2L, T)
        per_tick = jax.vmap(
            lambda y: certainty(y, PARITY_CTM.prediction_shape()), in_axes=-1, out_axes=-1
        )
        return parity_loss(logits, per_tick(logits), targets)[0]

    @jax.jit
    def step(params, opt_state, x, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = {**params, "backbone": project_params(PARITY_CTM, params["backbone"])}
        return params, opt_state, loss

    losses = []
    for i in range(steps):
        batch = data[i]
        params, opt_state, loss = step(
            params, opt_state, parity_features(batch["inputs"]), batch["targets"]
        )
        losses.append(float(loss))
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"P=4 CTM parity loss: first-20 mean {first:.4f}, last-20 mean {last:.4f}")
    assert np.isfinite(losses).all()
    assert last < 0.9 * first
