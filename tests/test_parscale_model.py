"""ParScale LM: reference oracles, cached decoding, sampling, checkpoint files."""

import dataclasses
import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import CheckpointMismatchError, DataError
from parscale_jax import convert
from parscale_jax.config import ConfigError, ParScaleConfig
from parscale_jax.generate import at_parscale_n, filter_logits, generate
from parscale_jax.model import ParScaleLM, init_cache, stack_layer_params, unstack_layer_params

REPO = pathlib.Path(__file__).parent.parent
ORACLES = sorted((REPO / "tests" / "fixtures" / "parscale").glob("oracle_*.npz"))

TINY = ParScaleConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
    parscale_n=3,
    parscale_n_tokens=5,
    parscale_attn_smooth=0.1,
)


def random_params(config, seed=0):
    """Init, then perturb every leaf so biases, norms and prefixes are all non-trivial."""
    params = ParScaleLM(config).init(jax.random.key(seed), jnp.zeros((1, 3), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def test_three_oracles_present():
    assert [p.name for p in ORACLES] == ["oracle_P1.npz", "oracle_P2.npz", "oracle_qwen2.npz"]


def test_check_oracle_command_passes_on_the_shared_files():
    result = subprocess.run(
        [sys.executable, "-m", "launch.check_oracle", *map(str, ORACLES)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3/3 oracle files match" in result.stdout
    assert result.stdout.count("ok   8 greedy tokens") == 3


def test_check_oracle_fails_when_the_aggregator_order_is_wrong(tmp_path):
    """Stream-major instead of hidden-major aggregator input must be caught."""
    data = dict(np.load(ORACLES[1]))
    weight = data["model.aggregate_layer.0.weight"]  # (H, P*H), columns h*P + p
    h = weight.shape[0]
    data["model.aggregate_layer.0.weight"] = (
        weight.reshape(h, h, 2).transpose(0, 2, 1).reshape(h, 2 * h)
    )
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    result = subprocess.run(
        [sys.executable, "-m", "launch.check_oracle", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "FAIL logits" in result.stdout


@pytest.mark.parametrize("p", [1, 3])
def test_cached_decoding_equals_recomputation_without_cache(p):
    config = dataclasses.replace(TINY, parscale_n=p)
    params = random_params(config)
    model = ParScaleLM(config)
    prompt = jnp.array([[0, 0, 5, 6, 7], [11, 12, 13, 14, 15]])
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    new = generate(config, params, prompt, mask, max_new_tokens=6)
    # Greedy by recomputing the whole (left-padded) sequence at every step. One jitted shape:
    # the sequence is written into an 11-wide buffer; the causal mask keeps position t - 1 from
    # seeing the unwritten slots (and RoPE positions count only earlier tokens).
    full_logits = jax.jit(lambda i, a: model.apply({"params": params}, i, attention_mask=a).logits)
    ids = jnp.zeros((2, 11), jnp.int32).at[:, :5].set(prompt)
    m = jnp.zeros((2, 11), jnp.int32).at[:, :5].set(mask)
    for t in range(5, 11):
        token = jnp.argmax(full_logits(ids, m)[:, t - 1], -1)
        ids, m = ids.at[:, t].set(token), m.at[:, t].set(1)
    np.testing.assert_array_equal(new, ids[:, 5:])
    # And the cached logits themselves agree with the uncached ones.
    from parscale_jax.model import init_cache

    cache = init_cache(config, params, 2, 11)
    out = model.apply({"params": params}, ids[:, :9], m[:, :9], cache=cache)
    out2 = model.apply({"params": params}, ids[:, 9:11], m[:, 9:11], cache=out.cache)
    full = full_logits(ids, m)
    real = np.asarray(m[:, :11], bool)
    got = np.concatenate([out.logits, out2.logits], 1)
    np.testing.assert_allclose(got[real], np.asarray(full)[real], atol=2e-5, rtol=1e-5)


def test_left_padding_does_not_change_a_sequence():
    params = random_params(TINY)
    model = ParScaleLM(TINY)
    seq = jnp.array([[3, 4, 5, 6]])
    alone = model.apply({"params": params}, seq).logits
    padded = model.apply(
        {"params": params},
        jnp.array([[0, 0, 3, 4, 5, 6]]),
        attention_mask=jnp.array([[0, 0, 1, 1, 1, 1]]),
    ).logits
    np.testing.assert_allclose(padded[:, 2:], alone, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [1, 3])
def test_packed_documents_compute_what_they_compute_alone(p):
    config = dataclasses.replace(TINY, parscale_n=p)
    params = random_params(config)
    model = ParScaleLM(config)
    first, second = jnp.array([[7, 8, 9]]), jnp.array([[10, 11, 12, 13]])
    packed = jnp.array([[7, 8, 9, 10, 11, 12, 13, 0]])
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
    out = model.apply(
        {"params": params},
        packed,
        attention_mask=segments > 0,
        position_ids=positions,
        segment_ids=segments,
    ).logits
    for doc, span in ((first, slice(0, 3)), (second, slice(3, 7))):
        alone = model.apply({"params": params}, doc).logits
        np.testing.assert_allclose(out[:, span], alone, atol=2e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))  # the padding row is not an empty softmax
    # Without segments the second document sees the first: the mask is what makes them equal.
    leaky = model.apply({"params": params}, packed, attention_mask=segments > 0).logits
    assert not np.allclose(leaky[:, 3:7], model.apply({"params": params}, second).logits, atol=1e-3)


def test_stop_tokens_pad_the_rest_and_sampling_is_seeded():
    params = random_params(TINY)
    prompt = jnp.array([[1, 2, 3]])
    greedy = np.asarray(generate(TINY, params, prompt, max_new_tokens=5))
    stop = int(greedy[0, 1])
    stopped = np.asarray(
        generate(TINY, params, prompt, max_new_tokens=5, stop_tokens=[stop], pad_id=96)
    )
    first = list(greedy[0]).index(stop)
    assert list(stopped[0, : first + 1]) == list(greedy[0, : first + 1])
    assert np.all(stopped[0, first + 1 :] == 96)
    a = generate(TINY, params, prompt, max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(TINY, params, prompt, max_new_tokens=8, temperature=1.0, seed=3)
    c = generate(TINY, params, prompt, max_new_tokens=8, temperature=1.0, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
    top2 = np.asarray(filter_logits(logits, top_k=2))
    assert np.isfinite(top2[0, [0, 2]]).all() and (top2[0, [1, 3]] < -1e30).all()
    # Nucleus 0.75: 0.5 then 0.3 reaches 0.8 >= 0.75, so exactly tokens 0 and 2 stay.
    nucleus = np.asarray(filter_logits(logits, top_p=0.75))
    assert (nucleus[0, [0, 2]] > -1e30).all() and (nucleus[0, [1, 3]] < -1e30).all()
    tiny_p = np.asarray(filter_logits(logits, top_p=0.01))
    assert (tiny_p[0] > -1e30).sum() == 1  # the most likely token always survives
    key = jax.random.key(0)
    from parscale_jax.generate import next_token

    draws = jax.vmap(lambda k: next_token(logits, k, 1.0, 2, 1.0))(jax.random.split(key, 400))
    assert set(np.unique(np.asarray(draws))) == {0, 2}


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_checkpoint_round_trip_is_exact(tmp_path, shard_bytes):
    params = random_params(TINY)
    convert.save_checkpoint(tmp_path, TINY, params, max_shard_bytes=shard_bytes)
    sharded = (tmp_path / convert.INDEX_FILE).exists()
    assert sharded == (shard_bytes is not None)
    if sharded:
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    config, loaded = convert.load_checkpoint(tmp_path)
    assert config == TINY
    jax.tree.map(np.testing.assert_array_equal, params, loaded)
    # Export again: the tensors are byte-identical.
    convert.save_checkpoint(tmp_path / "again", config, loaded, max_shard_bytes=shard_bytes)
    first = convert.read_safetensors(tmp_path)
    second = convert.read_safetensors(tmp_path / "again")
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].tobytes() == second[key].tobytes(), key


def test_hf_names_match_the_reference_layout():
    names = convert.expected_shapes(TINY)
    h, p, kvh, hd = 32, 3, 2, 8
    assert names["model.layers.1.self_attn.prefix_k"] == (p, kvh, 5, hd)
    assert names["model.aggregate_layer.0.weight"] == (h, p * h)
    assert names["model.aggregate_layer.2.bias"] == (p,)
    assert names["model.layers.0.self_attn.q_proj.bias"] == (4 * hd,)
    assert names["model.layers.0.self_attn.o_proj.weight"] == (h, 4 * hd)
    assert names["lm_head.weight"] == (97, h)
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    tied = convert.expected_shapes(dataclasses.replace(TINY, tie_word_embeddings=True))
    assert "lm_head.weight" not in tied


def test_mismatched_checkpoint_names_every_bad_tensor():
    sd = convert.state_dict_from_params(random_params(TINY))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.prefix_v"] = np.zeros((2, 2, 5, 8), np.float32)
    sd["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        convert.params_from_state_dict(TINY, sd)
    message = str(err.value)
    assert "3 problems" in message
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight' (expected shape (48, 32))" in message
    assert (
        "mis-shaped tensor 'model.layers.0.self_attn.prefix_v': expected (3, 2, 5, 8), "
        "got (2, 2, 5, 8)"
    ) in message
    assert "unexpected tensor 'model.layers.0.self_attn.o_proj.bias'" in message


def test_bad_files_are_refused_clearly(tmp_path):
    with pytest.raises(DataError, match="config.json"):
        convert.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        convert.load_checkpoint(tmp_path)
    params = random_params(TINY)
    convert.save_checkpoint(tmp_path, TINY, params, max_shard_bytes=20_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointMismatchError, match="missing from"):
        convert.load_checkpoint(tmp_path)


def test_dynamic_parallel_scaling_keeps_the_backbone():
    params = random_params(TINY)
    config1, backbone = at_parscale_n(TINY, params, 1)
    assert config1.parscale_n == 1 and "aggregate_layer" not in backbone
    plain = ParScaleLM(config1).apply({"params": backbone}, jnp.array([[1, 2, 3]])).logits
    assert plain.shape == (1, 3, 97)
    with pytest.raises(ValueError, match="trained for P=3"):
        at_parscale_n(TINY, params, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads=3 is invalid: must divide"),
        (dict(parscale_attn_smooth=1.0), "parscale_attn_smooth=1.0"),
        (dict(parscale_n=0), "parscale_n=0"),
        (dict(dtype="float16"), "dtype='float16'"),
        (
            dict(remat_policy="most"),
            r"^model\.remat_policy='most' is invalid: allowed: none, full, dots_saveable, "
            r"dots_with_no_batch_dims_saveable, nothing_saveable$",
        ),
        (dict(scan_layers="yes"), r"^model\.scan_layers='yes' is invalid: expected true or"),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **change).validate()


def test_folded_streams_equal_a_vmap_over_streams_with_the_shared_aggregator():
    """The LM folds P streams into the batch. Recompute it the other way: vmap over the stream
    index, each stream running the shared backbone with its own prefix, then the generic
    `parallel.Aggregator` on the stacked (P, B, S, H) states and the LM head."""
    from parscale_jax.parallel import Aggregator

    params = random_params(TINY)
    model = ParScaleLM(TINY)
    ids = jnp.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    folded = model.apply({"params": params}, ids, return_internals=True)

    def one_stream(p):
        # Every stream slot gets stream p's prefix; any row of stream slot 0 is then stream p.
        def pick(path, leaf):
            name = path[-1].key
            if name in ("prefix_k", "prefix_v"):
                return jnp.broadcast_to(leaf[p], leaf.shape)
            return leaf

        stream_params = jax.tree_util.tree_map_with_path(pick, params)
        out = model.apply({"params": stream_params}, ids, return_internals=True)
        return out.stream_hidden[: ids.shape[0]]

    streams = jax.vmap(one_stream)(jnp.arange(TINY.parscale_n))  # (P, B, S, H)
    np.testing.assert_allclose(
        streams.reshape(folded.stream_hidden.shape), folded.stream_hidden, atol=1e-5
    )
    hidden = Aggregator(TINY.parscale_n, TINY.parscale_attn_smooth).apply(
        {"params": params["aggregate_layer"]}, streams
    )
    logits = hidden @ params["lm_head"]["kernel"]
    np.testing.assert_allclose(logits, folded.logits, atol=1e-4)


def test_dot_product_attention_computes_what_the_einsums_compute():
    """model.attention='xla' (jax.nn.dot_product_attention; 'auto' picks it on CPU) against the
    grouped einsums: the same logits with prefixes, left padding and packed segments, and the
    same values and cache through a cached decoding step; and gradients too."""
    from parscale_jax.model import init_cache

    fused = dataclasses.replace(TINY, attention="xla")
    params = random_params(TINY)
    ids = jnp.array([[0, 0, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]])
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    segments = jnp.array([[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 2, 2, 2, 2]])
    outs = {}
    for name, config in (("einsum", TINY), ("fused", fused)):
        model = ParScaleLM(config)
        full = model.apply({"params": params}, ids, attention_mask=mask).logits
        packed = model.apply({"params": params}, ids, mask, segment_ids=segments).logits
        cache = init_cache(config, params, 2, 9)
        first = model.apply({"params": params}, ids[:, :6], mask[:, :6], cache=cache)
        step = model.apply({"params": params}, ids[:, 6:], mask[:, 6:], cache=first.cache)
        loss = lambda p, model=model: jnp.mean(
            model.apply({"params": p}, ids, attention_mask=mask).logits ** 2
        )
        outs[name] = (full, packed, step.logits, jax.grad(loss)(params))
    for want, got in zip(outs["einsum"][:3], outs["fused"][:3], strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    flat_want = jax.tree.leaves(outs["einsum"][3])
    for want, got in zip(flat_want, jax.tree.leaves(outs["fused"][3]), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"model\.attention='flash' is invalid: allowed: "):
        dataclasses.replace(TINY, attention="flash").validate()


def test_scanned_layers_compute_what_the_unrolled_layers_compute(tmp_path):
    """scan_layers=True (one nn.scan-ned layer, stacked params and cache; remat on as well) on
    the same weights: the same logits (left padding), gradients, greedy tokens through the
    stacked cache, and the same HF files, which load back into either layout."""
    scanned = dataclasses.replace(TINY, scan_layers=True, remat_policy="dots_saveable")
    params = random_params(TINY)
    stacked = stack_layer_params(params)
    assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 32, 48)
    shapes = jax.eval_shape(ParScaleLM(scanned).init, jax.random.key(0), jnp.zeros((1, 3), int))
    assert jax.tree.structure(shapes["params"]) == jax.tree.structure(stacked)
    ids = jnp.array([[0, 0, 5, 6, 7], [11, 12, 13, 14, 15]])
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

    @functools.partial(jax.jit, static_argnums=1)
    @functools.partial(jax.value_and_grad, has_aux=True)
    def loss(p, config):
        logits = ParScaleLM(config).apply({"params": p}, ids, mask).logits
        return jnp.mean(logits**2), logits

    (_, want), want_grads = loss(params, TINY)
    (_, got), grads = loss(stacked, scanned)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    grads = unstack_layer_params(grads)
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    for w, g in zip(jax.tree.leaves(want_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
    # The shapes of test_cached_decoding_equals_recomputation_without_cache (compiled once).
    np.testing.assert_array_equal(
        generate(scanned, stacked, ids, mask, max_new_tokens=6),
        generate(TINY, params, ids, mask, max_new_tokens=6),
    )
    cache = init_cache(scanned, stacked, 2, 9)
    assert cache.keys.shape == (2, 3 * 2, 2, 5 + 9, 8)  # (layers, P*B, kv heads, slots, hd)
    # HF files: the per-layer names and bytes, whichever layout is saved; loaded in either.
    convert.save_checkpoint(tmp_path / "unrolled", TINY, params)
    convert.save_checkpoint(tmp_path / "scanned", scanned, stacked)
    a = convert.read_safetensors(tmp_path / "unrolled")
    b = convert.read_safetensors(tmp_path / "scanned")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    loaded = convert.params_from_state_dict(scanned, b)
    jax.tree.map(np.testing.assert_array_equal, loaded, stacked)
