"""ParScale inference cost on this machine: prefill, decode latency and memory against P.

    python -m bench.parscale_decode [--reps=3] [--prompt_len=128] [--new_tokens=32]
        [--streams=1,2,4,8] [--batches=1,8] [--json_out=out.json] [--untied] [--check_generate]

For a ~100M-parameter Qwen2-style model (`bench_config`: vocab 32000, hidden 768, 12 layers,
12 heads, 4 KV heads, SwiGLU 2048, tied embeddings, float32, 48 prefix tokens per stream) with
random parameters from `ParScaleLM(config).init` (prefixes and aggregator present when P > 1),
for every P in --streams and batch B in --batches it measures:

* prefill: one jit-compiled call that allocates the KV cache for prompt + new tokens (writing the
  P prefixes in front, as `generate` does), runs the B x prompt_len prompt through the model and
  returns the last-position logits and the filled cache. Reported as prompt tokens per second,
  B * prompt_len / median seconds (the P streams are internal work, not extra tokens).
* decode: one jit-compiled step `(params, token, cache) -> (greedy next token, cache)`, the cache
  donated so XLA updates it in place as it does inside `generate`'s `lax.scan`. From a copy of
  the prefilled cache it runs new_tokens steps back to back; a rep's time / new_tokens is the
  latency of one step (one new token for each of the B sequences), the median over reps is
  reported as ms/token. Timing a single step keeps the prefill out of the number without a
  subtraction; the Python dispatch per step (~0.1 ms) is small next to a step. `--check_generate`
  also times `parscale_jax.generate` end to end and reports (generate - prefill) / (new - 1)
  as a cross-check.
* compile time of both functions (`jit(...).lower(...).compile()`), excluded from the timings;
  every timed function is called once first (warm-up) and blocked on with `block_until_ready`.
* memory: XLA's own accounting of the compiled executable (`compiled.memory_analysis()`),
  peak = arguments + outputs - aliased (donated) + temporaries, for the prefill and for the
  decode step; CPU devices have no `memory_stats()`, so that is checked and recorded when it
  exists. The serving peak is the larger of the two. Next to it, the KV cache actually allocated
  (sum of the key and value arrays' nbytes) and the paper's closed form
  2 * layers * kv_heads * head_dim * bytes * P * B * (n_prefix + tokens), with tokens = prompt +
  new tokens (the preallocated capacity) and n_prefix = 48 for P > 1 but 0 for P = 1 (this port's
  P = 1 is plain Qwen2, with no prefix slots).

Ratios are against P = 1 at the same batch size; the last lines give decode latency P=8 / P=1 at
batch 1 and at batch 8 (and the batch-1 peak-memory ratio next to the paper's cost model). The
FLOP counts are analytic: per decode step P * B * 2 * (non-embedding backbone parameters) +
attention as executed (the step attends the whole preallocated buffer, 4 * layers * heads *
head_dim * (n_prefix + capacity) per row) + B * (aggregator 2 * (P * H * H + H * P) + LM head
2 * H * V); the prefill runs the backbone on P * B * prompt rows and the aggregator and LM head
only at the last position. XLA's own count (`cost_analysis`, which adds the elementwise work) goes
into the JSON next to them. The achieved fraction is against a 2048^3 float32 `jnp.dot` timed in
the same run; on a chip in `train_lib.mfu`'s table (TPU v4/v5e/v5p/v6e, H100/H200) two MFU columns
set the same FLOP/s against the chip's dense bf16 peak. Everything runs on one device, so tokens/s
are per device (the JSON's `*_per_device` keys say so). "GB/s" is the bytes a decode step has to
read at least (its argument buffers as XLA keeps them: the parameters it uses, i.e. not the
prefixes, which live in the cache, + the whole KV buffer) over its latency, to set against the
float32 matrix-vector bandwidth also measured in the run.

Where a decode step's time goes on XLA:CPU (profiled with `jax.profiler`, per-thunk times):

* The tied LM head contracts h against the (V, H) embedding as stored (`ParScaleLM`'s einsum, a
  dot with rhs_contracting_dims={1}); no transposed copy of the 98 MB table is made (`Embed.attend`
  made XLA:CPU copy it every call). `--untied` runs the same model with a separate LM-head matrix
  (124.7M parameters) for comparison.
* The KV cache is head-major (rows, kv_heads, slots, head_dim), so the attention matmuls read it
  in place; with slots before heads XLA transposed every layer's whole key and value buffers at
  every step (11 ms of a 79 ms P = 8, batch-1 step).
* The P streams are folded into the rows of one matmul per weight (row p*B + b), so each weight is
  read once per step for all streams. On this CPU an f32 matmul with 8 rows still costs about
  2.4x a matrix-vector product per weight byte (24 768x2048 kernels: 29.5 ms at 8 rows, 12.2 ms at
  1 row), which is what P = 8 (and batch 8) pays over P = 1 at batch 1.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.timing import best_seconds, matmul_peak_flops, time_calls
from launch import cli
from parscale_jax.config import ParScaleConfig
from parscale_jax.generate import generate
from parscale_jax.model import KVCache, ParScaleLM, dtype_of, init_cache
from train_lib.mfu import peak_flops

# The paper's cost model (its inference-cost section, batch 1, input = output = 128 tokens, 1.6B
# non-embedding parameters, A100, bf16): P = 8 over P = 1.
PAPER_P8_OVER_P1 = {"latency": 0.284 / 0.256, "memory": 3.509 / 3.404}


def parse_ints(values: Sequence[str]) -> list[int]:
    """The comma-separated values of a list flag as positive integers (ValueError otherwise)."""
    ints = [int(x) for x in values if x.strip()]
    if not ints or min(ints) < 1:
        raise ValueError(f"{','.join(values)!r}: need positive integers, comma-separated")
    return ints


def _valid_ints(values: Sequence[str]) -> bool:
    try:
        parse_ints(values)
    except ValueError:
        return False
    return True


_REPS = flags.DEFINE_integer("reps", 3, "Timed reps per measurement (median).", lower_bound=1)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.", lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Decode steps per timed rep.", lower_bound=1)
_STREAMS = flags.DEFINE_list("streams", ["1", "2", "4", "8"], "Values of P, comma-separated.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes, comma-separated.")
# Not --json: launch.eval / adaptive / generate define a boolean --json, and the suite imports
# launchers and benches into one process, where absl flag names must be unique.
_JSON = flags.DEFINE_string("json_out", None, "Also write every number to this file.")
_UNTIED = flags.DEFINE_bool(
    "untied", False, "A separate LM-head matrix instead of tied embeddings (see the docstring)."
)
_CHECK_GENERATE = flags.DEFINE_bool(
    "check_generate",
    False,
    "Also time parscale_jax.generate end to end (one more compile per setting).",
)
for _name in ("streams", "batches"):
    flags.register_validator(_name, _valid_ints, "need positive integers, comma-separated")


def bench_config(parscale_n: int = 1, tied: bool = True) -> ParScaleConfig:
    """The ~100M-parameter Qwen2-style model of this benchmark at P = parscale_n (untied: a
    separate 768 x 32000 LM head, 124.7M parameters)."""
    return ParScaleConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=tied,
        parscale_n=parscale_n,
        parscale_n_tokens=48,
        parscale_attn_smooth=0.1,
        dtype="float32",
    ).validate()


def init_params(config: ParScaleConfig, seed: int = 0) -> dict[str, Any]:
    """Random parameters from the model's own initialisers."""
    ids = jnp.zeros((1, 4), jnp.int32)
    init = jax.jit(ParScaleLM(config).init)
    return init(jax.random.key(seed), ids)["params"]


def count_params(params: dict[str, Any]) -> dict[str, int]:
    """Parameter counts: embedding (the embedding / LM head matrices), backbone (every other
    shared weight), parscale (prefixes + aggregator, absent at P = 1) and total."""
    counts = {"embedding": 0, "backbone": 0, "parscale": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[0] in ("embed_tokens", "lm_head"):
            group = "embedding"
        elif names[0] == "aggregate_layer" or names[-1].startswith("prefix_"):
            group = "parscale"
        else:
            group = "backbone"
        counts[group] += int(np.prod(leaf.shape))
    counts["non_embedding"] = counts["backbone"] + counts["parscale"]
    counts["total"] = counts["embedding"] + counts["non_embedding"]
    return counts


def matvec_bandwidth(n: int = 8192, reps: int = 10) -> float:
    """Bytes/s of a float32 (n,) x (n, n) `jnp.dot`, best of reps: the memory-bound roofline that
    batch-1 decode (a vector against every weight matrix) can at best reach on this machine."""
    x = jnp.ones((n,), jnp.float32)
    w = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return w.nbytes / best_seconds(lambda: dot(x, w), reps)


def tree_bytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def kv_bytes(cache: KVCache) -> int:
    """Bytes of the key and value buffers actually allocated in a cache."""
    return tree_bytes((cache.keys, cache.values))


def analytic_kv_bytes(config: ParScaleConfig, batch: int, tokens: int) -> int:
    """The paper's KV bytes, 2 * L * kvh * hd * bytes * P * B * (n_prefix + tokens); n_prefix is
    48 for P > 1 and 0 for P = 1 (plain Qwen2 has no prefix slots)."""
    per_slot = (
        2
        * config.num_hidden_layers
        * config.num_key_value_heads
        * config.kv_head_dim
        * jnp.dtype(dtype_of(config)).itemsize
    )
    return per_slot * config.parscale_n * batch * (config.n_prefix + tokens)


def decode_flops(config: ParScaleConfig, backbone_params: int, batch: int, capacity: int) -> dict:
    """Analytic FLOPs of one decode step (one new token for each of `batch` sequences)."""
    p, h, v = config.parscale_n, config.hidden_size, config.vocab_size
    rows = p * batch
    attended = config.n_prefix + capacity
    attn_dim = config.num_attention_heads * config.kv_head_dim
    flops = {
        "backbone": rows * 2 * backbone_params,
        "attention": rows * 4 * config.num_hidden_layers * attn_dim * attended,
        "aggregator": batch * 2 * (p * h * h + h * p) if p > 1 else 0,
        "lm_head": batch * 2 * h * v,
    }
    flops["total"] = sum(flops.values())
    return flops


def prefill_flops(
    config: ParScaleConfig, backbone_params: int, batch: int, prompt_len: int, capacity: int
) -> int:
    """Analytic FLOPs of the prefill (aggregator and LM head at the last position only)."""
    per_position = decode_flops(config, backbone_params, batch, capacity)
    return (
        prompt_len * (per_position["backbone"] + per_position["attention"])
        + per_position["aggregator"]
        + per_position["lm_head"]
    )


def memory_of(compiled: Any) -> dict[str, int]:
    """XLA's buffer accounting of a compiled executable; peak = args + outputs - aliased + temp."""
    stats = compiled.memory_analysis()
    out = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def xla_flops(compiled: Any) -> float | None:
    """XLA's own FLOP count of a compiled executable (matmuls and elementwise work), if any."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per device program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def device_memory_stats() -> dict[str, Any] | None:
    """The runtime's allocator statistics where the backend has them (CPU: None)."""
    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None


def build_functions(config: ParScaleConfig, capacity: int) -> tuple[Callable, Callable]:
    """(prefill, decode step), both un-compiled `jax.jit` functions.

    prefill(params, prompt) -> (B,) greedy first tokens, last-position logits, filled cache;
    step(params, token, cache) -> (B,) next tokens, cache (donated)."""
    model = ParScaleLM(config)

    def prefill(params: Any, prompt: jax.Array):
        cache = init_cache(config, params, prompt.shape[0], capacity)
        out = model.apply({"params": params}, prompt, cache=cache, last_only=True)
        logits = out.logits[:, -1]
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, out.cache

    def step(params: Any, token: jax.Array, cache: KVCache):
        out = model.apply({"params": params}, token[:, None], cache=cache)
        return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache

    return jax.jit(prefill), jax.jit(step, donate_argnums=2)


def compile_timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], reps: int, warm_up: bool = True) -> float:
    """Median wall seconds of fn() over reps calls (each blocked on), after one warm-up call."""
    if warm_up:
        jax.block_until_ready(fn())
    return time_calls(fn, reps)


def measure_setting(
    config: ParScaleConfig,
    params: Any,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    reps: int,
    check_generate: bool = False,
) -> dict[str, Any]:
    """Every number of one (P, batch) setting; see the module docstring for what is measured."""
    capacity = prompt_len + new_tokens
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.vocab_size)
    prompt = prompt.astype(jnp.int32)
    prefill_fn, step_fn = build_functions(config, capacity)
    prefill, prefill_compile_s = compile_timed(prefill_fn, params, prompt)
    first, _, filled = jax.block_until_ready(prefill(params, prompt))  # also the warm-up
    step, step_compile_s = compile_timed(step_fn, params, first, filled)

    prefill_s = median_seconds(lambda: prefill(params, prompt), reps, warm_up=False)

    def decode_run(steps: int) -> float:
        cache = jax.tree.map(jnp.copy, filled)  # the step donates (consumes) its cache
        token = first
        jax.block_until_ready(cache)
        start = time.perf_counter()
        for _ in range(steps):
            token, cache = step(params, token, cache)
        jax.block_until_ready((token, cache))
        return (time.perf_counter() - start) / steps

    decode_run(min(2, new_tokens))  # warm-up
    step_s = float(np.median([decode_run(new_tokens) for _ in range(reps)]))

    counts = count_params(params)
    dflops = decode_flops(config, counts["backbone"], batch, capacity)
    pflops = prefill_flops(config, counts["backbone"], batch, prompt_len, capacity)
    prefill_mem, decode_mem = memory_of(prefill), memory_of(step)
    param_bytes = tree_bytes(params)
    kv_measured = kv_bytes(filled)
    result: dict[str, Any] = {
        "P": config.parscale_n,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "cache_capacity": capacity,
        "n_prefix": config.n_prefix,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_step_s": step_s,
        "decode_ms_per_token": 1e3 * step_s,
        "decode_tokens_per_s": batch / step_s,
        # one device: the rates are per device
        "prefill_tokens_per_s_per_device": batch * prompt_len / prefill_s,
        "decode_tokens_per_s_per_device": batch / step_s,
        "prefill_compile_s": prefill_compile_s,
        "decode_compile_s": step_compile_s,
        "prefill_flops": pflops,
        "decode_flops": dflops,
        "prefill_flops_xla": xla_flops(prefill),
        "decode_flops_xla": xla_flops(step),
        "prefill_flops_per_s": pflops / prefill_s,
        "decode_flops_per_s": dflops["total"] / step_s,
        "decode_min_bytes_read": decode_mem["argument_bytes"],
        "decode_gb_per_s": decode_mem["argument_bytes"] / step_s / 1e9,
        "param_counts": counts,
        "param_bytes": param_bytes,
        "prefill_memory": prefill_mem,
        "decode_memory": decode_mem,
        "peak_bytes": max(prefill_mem["peak_bytes"], decode_mem["peak_bytes"]),
        "kv_bytes_measured": kv_measured,
        "kv_bytes_analytic": analytic_kv_bytes(config, batch, capacity),
        "cache_other_bytes": tree_bytes((filled.token_valid, filled.length)),
        "analytic_memory_bytes": param_bytes + analytic_kv_bytes(config, batch, capacity),
    }
    if check_generate:
        run = lambda: generate(config, params, prompt, max_new_tokens=new_tokens)
        start = time.perf_counter()
        jax.block_until_ready(run())  # compiles
        result["generate_compile_and_first_s"] = time.perf_counter() - start
        generate_s = median_seconds(run, reps)
        result["generate_s"] = generate_s
        result["generate_decode_ms_per_token"] = (
            1e3 * (generate_s - prefill_s) / max(new_tokens - 1, 1)
        )
    return result


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Adds decode-latency and memory ratios against P = 1 at the same batch (None without)."""
    base = {r["batch"]: r for r in results if r["P"] == 1}
    for r in results:
        b = base.get(r["batch"])
        r["latency_ratio"] = r["decode_step_s"] / b["decode_step_s"] if b else None
        r["prefill_latency_ratio"] = r["prefill_s"] / b["prefill_s"] if b else None
        r["memory_ratio"] = r["peak_bytes"] / b["peak_bytes"] if b else None
        r["analytic_memory_ratio"] = (
            r["analytic_memory_bytes"] / b["analytic_memory_bytes"] if b else None
        )


def add_mfu(results: list[dict[str, Any]], chip_peak: float | None) -> None:
    """Adds prefill and decode MFU against the chip table's peak (None without one)."""
    for r in results:
        r["prefill_mfu"] = r["prefill_flops_per_s"] / chip_peak if chip_peak else None
        r["decode_mfu"] = r["decode_flops_per_s"] / chip_peak if chip_peak else None


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_table(results: list[dict[str, Any]], peak: float, chip_peak: float | None = None) -> None:
    """The results table; %peak against the measured f32 matmul `peak`, and with `chip_peak`
    (the chip table's dense bf16 FLOP/s) an MFU column after each."""
    mb = 1e-6
    mfu_head = f" {'MFU':>5}" if chip_peak else ""

    def mfu_cell(flops_per_s: float) -> str:
        return f" {100 * flops_per_s / chip_peak:5.1f}" if chip_peak else ""

    header = (
        f"{'P':>2} {'B':>2} | {'prefill tok/s':>13} {'%peak':>5}{mfu_head} | {'dec ms/tok':>10} "
        f"{'lat/P1':>6} {'%peak':>5}{mfu_head} {'GB/s':>5} | {'pre MB':>7} {'dec MB':>7} "
        f"{'mem/P1':>6} "
        f"{'(model)':>7} | {'KV MB meas':>10} {'analytic':>8} | {'compile s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        kv_ok = "" if r["kv_bytes_measured"] == r["kv_bytes_analytic"] else " MISMATCH"
        print(
            f"{r['P']:>2} {r['batch']:>2} | {r['prefill_tokens_per_s']:13.1f} "
            f"{100 * r['prefill_flops_per_s'] / peak:5.1f}{mfu_cell(r['prefill_flops_per_s'])} | "
            f"{r['decode_ms_per_token']:10.2f} {fmt_ratio(r['latency_ratio']):>6} "
            f"{100 * r['decode_flops_per_s'] / peak:5.1f}{mfu_cell(r['decode_flops_per_s'])} "
            f"{r['decode_gb_per_s']:5.1f} | {r['prefill_memory']['peak_bytes'] * mb:7.1f} "
            f"{r['decode_memory']['peak_bytes'] * mb:7.1f} {fmt_ratio(r['memory_ratio']):>6} "
            f"{fmt_ratio(r['analytic_memory_ratio']):>7} | {r['kv_bytes_measured'] * mb:10.2f} "
            f"{r['kv_bytes_analytic'] * mb:8.2f} | "
            f"{r['prefill_compile_s']:4.1f}/{r['decode_compile_s']:4.1f}{kv_ok}",
            flush=True,
        )


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    streams, batches = parse_ints(_STREAMS.value), parse_ints(_BATCHES.value)
    prompt_len, new_tokens, reps = _PROMPT_LEN.value, _NEW_TOKENS.value, _REPS.value
    check_generate = _CHECK_GENERATE.value
    wall_start = time.perf_counter()
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {device.device_kind} x{jax.device_count()} "
        f"({platform.processor() or platform.machine()})"
    )
    runtime_memory = device_memory_stats()
    print(f"device.memory_stats(): {'unavailable' if runtime_memory is None else runtime_memory}")
    peak = matmul_peak_flops()
    print(f"dense f32 matmul peak (2048^3 jnp.dot, best of 10): {peak / 1e9:.1f} GFLOP/s")
    bandwidth = matvec_bandwidth()
    print(f"f32 matrix-vector bandwidth (8192^2 jnp.dot, best of 10): {bandwidth / 1e9:.1f} GB/s")
    chip_peak = peak_flops(device.device_kind)
    if chip_peak:
        print(f"MFU against the chip table's dense bf16 peak: {chip_peak / 1e12:.1f} TFLOP/s")
    else:
        print(f"no chip table peak for {device.device_kind!r}: no MFU column")

    tied = not _UNTIED.value
    counts_1 = count_params(init_params(bench_config(1, tied)))
    kind = "tied" if tied else "untied"
    print(
        f"model: {counts_1['total'] / 1e6:.2f}M parameters at P=1 = {counts_1['embedding']:,} "
        f"embedding ({kind}) + {counts_1['non_embedding']:,} non-embedding; "
        f"prompt {prompt_len}, {new_tokens} new tokens, {reps} reps"
    )

    results = []
    for batch in batches:
        for p in sorted(streams):
            config = bench_config(p, tied)
            params = init_params(config)
            result = measure_setting(
                config,
                params,
                batch,
                prompt_len,
                new_tokens,
                reps,
                check_generate,
            )
            results.append(result)
            extra = result["param_counts"]["parscale"]
            msg = (
                f"  P={p} B={batch}: prefill {result['prefill_s']:.3f} s, decode "
                f"{result['decode_ms_per_token']:.2f} ms/token, +{extra:,} ParScale parameters"
            )
            if check_generate:
                msg += f", via generate {result['generate_decode_ms_per_token']:.2f} ms/token"
            print(msg, flush=True)
            del params

    add_ratios(results)
    add_mfu(results, chip_peak)
    print()
    print_table(results, peak, chip_peak)
    print(
        "(ms/tok: one decode step = one new token per sequence; lat/P1, mem/P1: against P=1 at "
        "the same batch; (model): (params + analytic KV) ratio; KV capacity = prompt + new "
        "tokens, + 48 prefix slots when P > 1 only; pre/dec MB: XLA peak buffers of the prefill "
        "and the decode step)"
    )
    summary: dict[str, Any] = {"paper_cost_model_P8_over_P1_batch1": PAPER_P8_OVER_P1}
    by_key = {(r["P"], r["batch"]): r for r in results}
    for batch in (1, 8):
        if (1, batch) not in by_key or (8, batch) not in by_key:
            continue
        p8 = by_key[(8, batch)]
        summary[f"decode_latency_P8_over_P1_batch{batch}"] = p8["latency_ratio"]
        summary[f"memory_P8_over_P1_batch{batch}"] = p8["memory_ratio"]
        paper = (
            f" (paper's cost model, 1.6B on A100, in=out=128: "
            f"x{PAPER_P8_OVER_P1['latency']:.2f} latency, x{PAPER_P8_OVER_P1['memory']:.3f} memory)"
            if batch == 1
            else ""
        )
        print(
            f"batch {batch}, P=8 vs P=1: decode latency x{p8['latency_ratio']:.2f}, peak memory "
            f"x{p8['memory_ratio']:.3f}{paper}"
        )
    wall_s = time.perf_counter() - wall_start
    print(f"wall time {wall_s:.0f} s")
    if _JSON.value:
        payload = {
            "argv": sys.argv[1:],
            "jax_version": jax.__version__,
            "device": device.device_kind,
            "device_memory_stats": runtime_memory,
            "matmul_peak_flops": peak,
            "chip_peak_flops": chip_peak,
            "matvec_bytes_per_s": bandwidth,
            "config": dataclasses.asdict(bench_config(1, tied)),
            "param_counts_P1": counts_1,
            "results": results,
            "summary": summary,
            "wall_s": wall_s,
            # Linux reports kilobytes: the whole process, every setting and the reference runs.
            "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        Path(_JSON.value).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
