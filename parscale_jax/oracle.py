"""Checks the port against the reference ParScale/Qwen2 oracle files.

An oracle file (.npz) holds an HF config (`config_json`), the state dict, and the reference's
outputs: logits of a plain forward (compared at atol 1e-4), logits of a left-padded batch (compared
where the mask is 1), the aggregation weights and per-stream final-norm outputs where recorded,
and 8 greedy tokens (compared exactly).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from parscale_jax.config import ParScaleConfig
from parscale_jax.convert import params_from_state_dict
from parscale_jax.generate import generate
from parscale_jax.model import ParScaleLM

LOGITS_ATOL = 1e-4


def check_oracle(path: str) -> tuple[bool, list[str]]:
    """Runs one oracle file: (all matched, one report line per check)."""
    lines: list[str] = []

    def _report(name: str, ok: bool, detail: str) -> bool:
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {name:28s} {detail}")
        return ok

    data = np.load(path)
    hf = json.loads(str(data["config_json"]))
    config = ParScaleConfig.from_hf(hf)
    state_dict = {k: data[k] for k in data.files if k.startswith("model.") or k == "lm_head.weight"}
    params = params_from_state_dict(config, state_dict)
    model = ParScaleLM(config)
    lines.append(
        f"{path}: model_type {hf['model_type']}, P={config.parscale_n}, "
        f"layers {config.num_hidden_layers}, eps {config.parscale_attn_smooth}"
    )
    ok = True
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, jnp.asarray(data["input_ids"]), return_internals=True)
        err = np.abs(np.asarray(out.logits) - data["logits"]).max()
        ok &= _report("logits", err <= LOGITS_ATOL, f"max|err| {err:.2e}")
        if "agg_weights" in data.files:
            err = np.abs(np.asarray(out.aggregate_weights) - data["agg_weights"]).max()
            ok &= _report("aggregation weights", err <= LOGITS_ATOL, f"max|err| {err:.2e}")
        if "final_norm_out" in data.files:
            err = np.abs(np.asarray(out.stream_hidden) - data["final_norm_out"]).max()
            ok &= _report("final norm (per stream)", err <= LOGITS_ATOL, f"max|err| {err:.2e}")

        mask = data["pad_attention_mask"]
        padded = model.apply(
            {"params": params},
            jnp.asarray(data["pad_input_ids"]),
            attention_mask=jnp.asarray(mask),
            position_ids=jnp.asarray(data["pad_position_ids"]),
        )
        err = np.abs(np.asarray(padded.logits) - data["pad_logits"])[mask.astype(bool)].max()
        ok &= _report("padded logits (mask == 1)", err <= LOGITS_ATOL, f"max|err| {err:.2e}")

        want = data["gen_tokens"]
        tokens = generate(
            config, params, jnp.asarray(data["gen_prompt_ids"]), max_new_tokens=want.shape[1]
        )
        same = np.array_equal(np.asarray(tokens), want)
        ok &= _report("8 greedy tokens", same, f"{np.asarray(tokens).tolist()} vs {want.tolist()}")
    lines.append(f"  => {'PASS' if ok else 'FAIL'}")
    return bool(ok), lines
