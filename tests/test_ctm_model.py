"""CTM behaviour the oracles do not cover: the other positional embeddings, dropout across ticks,
config validation, initialisation and the losses' tick selection."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax import convert, losses
from ctm_jax.config import ConfigError, CTMConfig, unet_widths
from ctm_jax.model import CTM, project_params
from ctm_jax.modules import POSITIONAL_EMBEDDINGS, Dropout, keep_mask
from tests.train_helpers import SMALL_CTM

BASE = SMALL_CTM


def numpy_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def numpy_glu(x):
    a, b = np.split(x, 2, axis=-1)
    return a / (1 + np.exp(-b))


def reference_fourier(sd, prefix, height, width):
    """Learnable Fourier features written from the reference's description, in NumPy."""
    xs = np.arange(width) / (width - 1)
    ys = np.arange(height) / (height - 1)
    coords = np.stack(np.meshgrid(xs, ys), -1)  # (H, W, 2) with (x, y) last
    projected = coords @ sd[f"{prefix}Wr.weight"].T
    f_dim = 2 * projected.shape[-1]
    features = np.concatenate([np.cos(projected), np.sin(projected)], -1) / math.sqrt(f_dim)
    h = numpy_glu(features @ sd[f"{prefix}mlp.0.weight"].T + sd[f"{prefix}mlp.0.bias"])
    y = h @ sd[f"{prefix}mlp.2.weight"].T + sd[f"{prefix}mlp.2.bias"]
    return numpy_layer_norm(y, sd[f"{prefix}mlp.3.weight"], sd[f"{prefix}mlp.3.bias"])


def reference_rotational(sd, width):
    theta = np.deg2rad(np.linspace(0, 180, width))
    start = sd["positional_embedding.start_vector"]
    rot = np.stack(
        [
            np.cos(theta) * start[0] - np.sin(theta) * start[1],
            np.sin(theta) * start[0] + np.cos(theta) * start[1],
        ],
        -1,
    )
    key = np.concatenate([np.repeat(rot[:, None], width, 1), np.repeat(rot[None], width, 0)], -1)
    w, b = (
        sd["positional_embedding.projection.0.weight"],
        sd["positional_embedding.projection.0.bias"],
    )
    return key @ w.T + b


def embed_and_export(pos, x, config):
    """Applies one positional-embedding module with perturbed params; returns (pe, reference sd)."""
    module = POSITIONAL_EMBEDDINGS[pos](x.shape[-1])
    params = module.init(jax.random.key(2), x)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    # Perturb every parameter so that a wrong port cannot match on constant inits.
    leaves = [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(tree, leaves)
    pe = module.apply({"params": params}, x)
    sd = convert.export_state_dict(config, {"params": {"positional_embedding": params}})
    return np.asarray(pe), {k: np.asarray(v, np.float64) for k, v in sd.items()}


@pytest.mark.parametrize(
    "pos", ["learnable-fourier", "multi-learnable-fourier", "custom-rotational"]
)
def test_2d_positional_embeddings_match_numpy_reference(pos):
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 7))
    config = dataclasses.replace(BASE, positional_embedding_type=pos)
    pe, sd = embed_and_export(pos, x, config)
    if pos == "learnable-fourier":
        want = reference_fourier(sd, "positional_embedding.", 5, 5)
    elif pos == "multi-learnable-fourier":
        pes = np.stack(
            [reference_fourier(sd, f"positional_embedding.embedders.{i}.", 5, 5) for i in range(10)]
        )
        weights = np.exp(sd["positional_embedding.combination"])
        want = np.tensordot(weights / weights.sum(), pes, axes=1)
    else:
        want = reference_rotational(sd, 5)
    assert pe.shape == (5, 5, 7)
    np.testing.assert_allclose(pe, want, rtol=1e-4, atol=1e-5)


def test_learnable_fourier_on_a_rectangular_map_and_its_init():
    x = jnp.zeros((1, 3, 6, 4))
    module = POSITIONAL_EMBEDDINGS["learnable-fourier"](4)
    params = module.init(jax.random.key(0), x)["params"]
    assert module.apply({"params": params}, x).shape == (3, 6, 4)
    # Fourier frequencies are drawn N(0, gamma^-2) with gamma = 1/2.5, i.e. std 6.25.
    assert 5.0 < float(jnp.std(params["Wr"]["kernel"])) < 7.5


def test_reference_key_names_for_positional_embeddings():
    x = jnp.zeros((1, 4, 4, 3))
    for pos, expected in {
        "custom-rotational": {
            "positional_embedding.start_vector",
            "positional_embedding.projection.0.weight",
            "positional_embedding.projection.0.bias",
        },
        "custom-rotational-1d": {
            "positional_embedding.projection.weight",
            "positional_embedding.projection.bias",
        },
        "learnable-fourier": {
            "positional_embedding.Wr.weight",
            "positional_embedding.mlp.0.weight",
            "positional_embedding.mlp.0.bias",
            "positional_embedding.mlp.2.weight",
            "positional_embedding.mlp.2.bias",
            "positional_embedding.mlp.3.weight",
            "positional_embedding.mlp.3.bias",
        },
    }.items():
        config = dataclasses.replace(BASE, positional_embedding_type=pos)
        _, sd = embed_and_export(pos, x, config)
        assert set(sd) == expected


def test_dropout_is_random_per_call_and_off_in_eval():
    config = dataclasses.replace(BASE, dropout=0.3)
    x = jax.random.normal(jax.random.key(0), (3, 6, 8))
    model = CTM(config)
    variables = model.init({"params": jax.random.key(1)}, x)
    eval_a = model.apply(variables, x).predictions
    eval_b = model.apply(variables, x).predictions
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(5)})
    train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(5)})
    train_c = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(6)})
    np.testing.assert_array_equal(train_a.predictions, train_b.predictions)
    assert not np.allclose(train_a.predictions, train_c.predictions)
    assert not np.allclose(train_a.predictions, eval_a)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_hash_dropout_masks_are_bernoulli_and_independent(rate):
    """`keep_mask`: the kept fraction is 1 - rate (binomial 6 sigma), masks of two keys agree as
    often as independent draws do, neighbours are uncorrelated, kept entries are scaled by
    1 / (1 - rate) as nn.Dropout does, and deterministic mode is the identity."""
    shape, keep = (64, 128, 25), 1.0 - rate
    n = np.prod(shape)
    a = np.asarray(keep_mask(jax.random.key(0), shape, keep)).ravel()
    b = np.asarray(keep_mask(jax.random.fold_in(jax.random.key(0), 1), shape, keep)).ravel()
    sigma = np.sqrt(keep * rate / n)
    assert abs(a.mean() - keep) < 6 * sigma
    agree = keep**2 + rate**2
    assert abs((a == b).mean() - agree) < 6 * np.sqrt(agree * (1 - agree) / n)
    for lag in (1, 25, 128 * 25):
        assert abs(np.corrcoef(a[:-lag], a[lag:])[0, 1]) < 6 / np.sqrt(n)
    x = jnp.ones(shape)
    dropped = Dropout(rate).apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(np.unique(np.asarray(dropped)), [0.0, 1 / keep], rtol=1e-6)
    assert Dropout(rate).apply({}, x, True) is x


def test_each_tick_draws_its_own_dropout_mask():
    """With a constant synapse input every tick, only per-tick masks make ticks differ."""
    config = dataclasses.replace(
        BASE,
        variant="sort",
        heads=0,
        n_synch_action=0,
        neuron_select_type="random-pairing",
        d_input=8,
        dropout=0.5,
        dropout_nlm=0.0,
        memory_length=1,
        deep_nlms=False,
    )
    x = jnp.ones((1, 8))
    model = CTM(config)
    variables = model.init({"params": jax.random.key(1)}, x)
    # Zero the recurrent input so the synapse input is the same at every tick.
    params = jax.tree.map(lambda a: a, variables["params"])
    kernel = params["ticks"]["synapses"]["linear"]["dense"]["kernel"]
    params["ticks"]["synapses"]["linear"]["dense"]["kernel"] = kernel.at[8:].set(0.0)
    out = model.apply(
        {**variables, "params": params},
        x,
        train=True,
        track=True,
        rngs={"dropout": jax.random.key(3)},
    )
    pre = np.asarray(out.tracking["pre_activations"][:, 0])
    assert not np.allclose(pre[0], pre[1])
    eval_pre = model.apply({**variables, "params": params}, x, track=True)
    eval_pre = np.asarray(eval_pre.tracking["pre_activations"][:, 0])
    np.testing.assert_allclose(eval_pre[0], eval_pre[1], rtol=1e-6)


def test_tracking_shapes_and_final_synch():
    x = jax.random.normal(jax.random.key(0), (3, 6, 8))
    model = CTM(BASE)
    variables = model.init({"params": jax.random.key(1)}, x)
    out = model.apply(variables, x, track=True)
    t, b = BASE.iterations, 3
    assert out.predictions.shape == (b, 5, t)
    assert out.certainties.shape == (b, 2, t)
    assert out.tracking["synch_out"].shape == (t, b, BASE.synch_size_out)
    assert out.tracking["synch_action"].shape == (t, b, BASE.synch_size_action)
    assert out.tracking["attention"].shape == (t, b, 2, 1, 6)
    assert out.tracking["pre_activations"].shape == (t, b, 32)
    np.testing.assert_allclose(out.synch_out, out.tracking["synch_out"][-1], rtol=1e-6)
    np.testing.assert_allclose(out.certainties.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out.tracking["attention"].sum(-1), 1.0, rtol=1e-5)
    assert model.apply(variables, x).tracking is None


def test_init_matches_reference_defaults():
    x = jnp.zeros((2, 6, 8))
    config = dataclasses.replace(BASE, neuron_select_type="random-pairing", n_random_pairing_self=2)
    variables = CTM(config).init({"params": jax.random.key(0)}, x)
    params, buffers = variables["params"], variables["buffers"]
    assert np.all(params["decay_params_out"] == 0)
    nlm = params["ticks"]["trace_processor"]["nlm_0"]
    assert float(nlm["T"][0]) == 1.0 and np.all(nlm["b1"] == 0)
    assert np.abs(nlm["w1"]).max() <= 1 / math.sqrt(3 + 4)
    assert np.abs(params["start_activated_state"]).max() <= math.sqrt(1 / 32)
    np.testing.assert_array_equal(
        buffers["out_neuron_indices_left"][:2], buffers["out_neuron_indices_right"][:2]
    )
    assert buffers["out_neuron_indices_left"].dtype == jnp.int32


def test_project_params_clamps_decays_only_for_the_main_variant():
    params = {"decay_params_out": jnp.array([-1.0, 3.0, 20.0]), "other": jnp.array([-1.0])}
    projected = project_params(BASE, params)
    np.testing.assert_array_equal(projected["decay_params_out"], [0.0, 3.0, 15.0])
    np.testing.assert_array_equal(projected["other"], [-1.0])
    sort = dataclasses.replace(BASE, variant="sort", heads=0, n_synch_action=0)
    assert project_params(sort, params) is params


def test_unet_widths_truncate_like_the_reference():
    assert unet_widths(2048, 8) == [2048, 1757, 1467, 1177, 886, 596, 306, 16]
    assert unet_widths(4096, 8) == [4096, 3513, 2930, 2347, 1764, 1181, 598, 16]
    assert unet_widths(64, 3) == [64, 40, 16]


@pytest.mark.parametrize(
    "change, field, hint",
    [
        (dict(heads=3), "model.heads=3", "must divide d_input=8"),
        (
            dict(neuron_select_type="first-last", n_synch_out=20, n_synch_action=20),
            "model.n_synch_out=20",
            "<= d_model=32",
        ),
        (dict(backbone_type="resnet999"), "model.backbone_type='resnet999'", "allowed: none"),
        (dict(neuron_select_type="dense"), "model.neuron_select_type='dense'", "allowed:"),
        (dict(positional_embedding_type="sinusoid"), "model.positional_embedding_type", "allowed"),
        (
            dict(positional_embedding_type="custom-rotational"),
            "model.positional_embedding_type",
            "backbone_type='none' requires",
        ),
        (
            dict(neuron_select_type="random-pairing", n_random_pairing_self=5),
            "model.n_synch_action=5",
            "n_random_pairing_self=5",
        ),
        (dict(prediction_reshaper=(3, 2)), "model.prediction_reshaper", "out_dims=5"),
        (dict(dropout=1.5), "model.dropout=1.5", "[0, 1)"),
        (dict(iterations=0), "model.iterations=0", "positive"),
    ],
)
def test_config_validation_names_field_value_and_allowed(change, field, hint):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(BASE, **change).validate()
    message = str(err.value)
    assert "\n" not in message
    assert field in message and hint in message


def test_input_shape_checks_name_the_embedding_and_the_map():
    # (No backbone that emits a 2-D map exists before the ResNets, so check the shape rules alone.)
    rotational = dataclasses.replace(BASE, positional_embedding_type="custom-rotational")
    with pytest.raises(ConfigError, match=r"custom-rotational.*square feature map, got 4x6"):
        rotational.validate_input_shape((2, 4, 6, 3))
    rotational.validate_input_shape((2, 5, 5, 3))
    fourier = dataclasses.replace(BASE, positional_embedding_type="learnable-fourier")
    with pytest.raises(ConfigError, match=r"needs H, W >= 2, got 1x6"):
        fourier.validate_input_shape((2, 1, 6, 3))
    parity = dataclasses.replace(
        BASE, backbone_type="parity_backbone", positional_embedding_type="custom-rotational-1d"
    )
    with pytest.raises(
        ConfigError, match=r"model.backbone_type='parity_backbone'.*\(batch, length"
    ):
        CTM(parity).init({"params": jax.random.key(0)}, jnp.zeros((2, 4, 6, 3)))


def test_from_mapping_rejects_unknown_and_missing_fields():
    values = BASE.to_dict()
    with pytest.raises(ConfigError, match="model.hedas is not a CTM field"):
        CTMConfig.from_mapping({**values, "hedas": 2})
    del values["d_model"]
    with pytest.raises(ConfigError, match="model.d_model is missing"):
        CTMConfig.from_mapping(values)


def test_certainty_loss_takes_min_loss_and_most_certain_ticks():
    tick_losses = jnp.array([[3.0, 1.0, 2.0], [0.5, 4.0, 6.0]])
    certainties = jnp.stack([jnp.zeros((2, 3)), jnp.array([[0.1, 0.2, 0.9], [0.1, 0.8, 0.8]])], 1)
    loss, where = losses.certainty_loss(tick_losses, certainties)
    np.testing.assert_array_equal(where, [2, 1])  # ties resolve to the first tick
    np.testing.assert_allclose(loss, ((1.0 + 0.5) / 2 + (2.0 + 4.0) / 2) / 2)
    last, where_last = losses.certainty_loss(tick_losses, certainties, use_most_certain=False)
    np.testing.assert_array_equal(where_last, [2, 2])
    np.testing.assert_allclose(last, ((1.0 + 0.5) / 2 + (2.0 + 6.0) / 2) / 2)


def test_sort_loss_is_ctc_normalised_by_target_length():
    # One tick per target and a single possible alignment: the loss is -sum log p / N.
    targets = jnp.array([[1, 0]])
    logits = jnp.log(jnp.array([[[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]]))  # (B, T, C)
    predictions = jnp.moveaxis(logits, 2, 1)
    expected = -(np.log(0.7) + np.log(0.6)) / 2
    np.testing.assert_allclose(losses.sort_loss(predictions, targets), expected, rtol=1e-5)


def test_rematerialised_ticks_give_the_same_gradients():
    config = dataclasses.replace(BASE, dropout=0.2)
    x = jax.random.normal(jax.random.key(0), (3, 6, 8))
    targets = jnp.array([0, 3, 4])
    variables = CTM(config).init({"params": jax.random.key(1)}, x)

    def grads(remat):
        model = CTM(dataclasses.replace(config, remat_ticks=remat))

        def loss(params):
            out = model.apply(
                {**variables, "params": params}, x, train=True, rngs={"dropout": jax.random.key(2)}
            )
            return losses.image_classification_loss(out.predictions, out.certainties, targets)[0]

        return jax.jit(jax.grad(loss))(variables["params"])

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        grads(True),
        grads(False),
    )
