"""The P = 1 model against stock `transformers.Qwen2ForCausalLM`.

The torch side runs in its own Python 3.11 environment (`make torch-reference`, which `.ci/run`
runs first): it builds tiny random Qwen2 models, saves them as HF checkpoints (one single-file, one
sharded; one tied GQA, one untied MHA with rope_theta 1e6) and records logits, left-padded logits
and greedy generations. Here those checkpoint files go through our importer and must reproduce
every number.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import REFERENCE_NAMES, load_outputs, reference_dir

from parscale_jax import convert
from parscale_jax.generate import generate
from parscale_jax.model import ParScaleLM


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_logits_padding_and_greedy_tokens_match_transformers(name):
    directory = reference_dir(name)
    ref = load_outputs(name)
    config, params = convert.load_checkpoint(directory)
    assert config.parscale_n == 1
    hf = json.loads((directory / "config.json").read_text())
    assert config.tie_word_embeddings == hf["tie_word_embeddings"]
    model = ParScaleLM(config)
    with jax.default_matmul_precision("highest"):
        logits = model.apply({"params": params}, jnp.asarray(ref["input_ids"])).logits
        np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
        mask = ref["pad_attention_mask"]
        padded = model.apply(
            {"params": params},
            jnp.asarray(ref["pad_input_ids"]),
            attention_mask=jnp.asarray(mask),
            position_ids=jnp.asarray(ref["pad_position_ids"]),
        ).logits
        real = mask.astype(bool)
        np.testing.assert_allclose(
            np.asarray(padded)[real], ref["pad_logits"][real], atol=1e-4, rtol=0
        )
        tokens = generate(
            config,
            params,
            jnp.asarray(ref["gen_prompt_ids"]),
            max_new_tokens=ref["gen_tokens"].shape[1],
        )
    np.testing.assert_array_equal(tokens, ref["gen_tokens"])


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_generate_cli_continues_a_text_prompt_like_transformers(name):
    directory = reference_dir(name)
    ref = load_outputs(name)
    n = len(ref["prompt_gen_tokens"])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.generate",
            f"--checkpoint={directory}",
            f"--prompt={ref['prompt_text']}",
            f"--max_new_tokens={n}",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"},
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["ids"] == [int(t) for t in ref["prompt_gen_tokens"]]
    assert record["text"] == str(ref["prompt_gen_text"])


def test_generate_cli_reports_a_bad_request_in_one_line(tmp_path):
    """Expected failures (core.errors) end the CLI with `error: <message>` and status 1, no
    traceback: a checkpoint without a tokenizer, and an impossible --max_new_tokens."""
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    directory = reference_dir(REFERENCE_NAMES[0])
    for args, message in (
        ([f"--checkpoint={no_tokenizer}"], "tokenizer.json does not exist"),
        ([f"--checkpoint={directory}", "--max_new_tokens=0"], "max_new_tokens=0 is invalid"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "launch.generate", "--prompt=def", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_export_reproduces_the_transformers_tensors(tmp_path):
    for name in REFERENCE_NAMES:
        directory = reference_dir(name)
        config, params = convert.load_checkpoint(directory)
        convert.save_checkpoint(tmp_path / name, config, params)
        original = convert.read_safetensors(directory)
        exported = convert.read_safetensors(tmp_path / name)
        assert original.keys() == exported.keys()
        for key, value in original.items():
            assert value.tobytes() == exported[key].tobytes(), key
