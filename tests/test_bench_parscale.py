"""bench/parscale_decode.py on a toy config: it runs, and its analytic formulas are right.

Nothing here asserts on speed; the timed numbers only have to exist and be positive.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from bench import parscale_decode as bench
from parscale_jax.config import ParScaleConfig
from parscale_jax.generate import generate
from parscale_jax.model import ParScaleLM, init_cache

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, N_TOKENS = 2, 2, 16, 64, 4


def toy(p: int) -> ParScaleConfig:
    return ParScaleConfig(
        vocab_size=512,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=True,
        parscale_n=p,
        parscale_n_tokens=N_TOKENS,
    )


@functools.cache
def toy_params(p: int):
    return bench.init_params(toy(p))


def test_bench_config_is_about_100m_parameters():
    init = lambda: ParScaleLM(bench.bench_config(1)).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )
    counts = bench.count_params(jax.eval_shape(init)["params"])
    assert counts["embedding"] == 32000 * 768
    assert counts["non_embedding"] == 75_532_032
    assert counts["parscale"] == 0


def test_kv_bytes_match_the_closed_form():
    tokens, batch = 7, 3
    for p in (1, 2):
        n_prefix = N_TOKENS if p > 1 else 0  # this port's P = 1 has no prefix slots
        closed_form = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4 * p * batch * (n_prefix + tokens)
        make = jax.jit(init_cache, static_argnums=(0, 2, 3))
        cache = make(toy(p), toy_params(p), batch, tokens)
        assert bench.analytic_kv_bytes(toy(p), batch, tokens) == closed_form
        assert bench.kv_bytes(cache) == closed_form


def test_parameter_groups():
    p = 2
    counts = bench.count_params(toy_params(p))
    prefixes = LAYERS * 2 * p * KV_HEADS * N_TOKENS * HEAD_DIM
    aggregator = (p * HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * p + p)
    assert counts["parscale"] == prefixes + aggregator
    assert counts["backbone"] == bench.count_params(toy_params(1))["backbone"]
    assert counts["embedding"] == 512 * HIDDEN


def test_decode_step_reproduces_generate():
    config, params = toy(2), toy_params(2)
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, config.vocab_size)
    prefill, step = bench.build_functions(config, 5 + 4)
    token, _, cache = prefill(params, prompt)
    tokens = [token]
    for _ in range(3):
        token, cache = step(params, token, cache)
        tokens.append(token)
    expected = generate(config, params, prompt, max_new_tokens=4)
    np.testing.assert_array_equal(np.stack(tokens, axis=1), np.asarray(expected))


def test_measure_setting_runs_and_its_accounting_holds():
    results = [bench.measure_setting(toy(p), toy_params(p), 2, 5, 3, reps=1) for p in (1, 2)]
    bench.add_ratios(results)
    for r in results:
        assert r["kv_bytes_measured"] == r["kv_bytes_analytic"]
        assert r["prefill_tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0
        for phase in ("prefill_memory", "decode_memory"):
            assert r[phase]["peak_bytes"] >= r["param_bytes"] + r["kv_bytes_measured"]
        assert r["decode_memory"]["alias_bytes"] >= r["kv_bytes_measured"]  # donated cache
        # XLA's count adds the elementwise work (norms, RoPE, softmax) to the matmuls.
        assert 0.9 < r["decode_flops"]["total"] / r["decode_flops_xla"] <= 1.0
        assert 0.9 < r["prefill_flops"] / r["prefill_flops_xla"] <= 1.0
    assert results[0]["latency_ratio"] == 1.0 and results[0]["memory_ratio"] == 1.0
    assert results[1]["memory_ratio"] > 1.0
    bench.print_table(results, peak=1e9)


def test_streams_and_batches_flags_take_positive_integers():
    assert bench.parse_ints(["1", "2", "8"]) == [1, 2, 8]
    for bad in ([], ["0", "1"], ["two"]):
        with pytest.raises(ValueError):
            bench.parse_ints(bad)
    with flagsaver.as_parsed(streams="1,4", batches="2"):
        assert bench.parse_ints(bench._STREAMS.value) == [1, 4]
        assert bench.parse_ints(bench._BATCHES.value) == [2]
    for name in ("streams", "batches"):
        refused = pytest.raises(flags.IllegalFlagValueError, match="positive integers")
        with refused, flagsaver.as_parsed(**{name: "1,0"}):
            pass
