"""Continue text prompts with a ParScale (or plain Qwen2) Hugging Face checkpoint.

    python -m launch.generate --checkpoint=DIR --prompt="def add(a, b):" --max_new_tokens=32
    python -m launch.generate --checkpoint=DIR --prompt=a --prompt=b --parscale_n=1 --json

Flags use absl's spelling, underscores, not dashes: --max_new_tokens, --parscale_n, --top_k,
--top_p (the argparse CLI this replaces, `python -m parscale_jax.generate`, spelled them
--max-new-tokens, --parscale-n, --top-k, --top-p). `--prompt` may be repeated for a batch; the
prompts are left-padded to one length. The checkpoint directory needs config.json, the
safetensors weights and tokenizer.json; its eos_token_id ends a sequence (kept in the output) and
its pad_token_id pads. `--parscale_n=1` runs the shared backbone alone; another P than the
checkpoint's own needs that P's prefix/aggregator set in `streams/P{n}.safetensors` (dynamic
parallel scaling, written by `python -m launch.export_lm --streams_from=...`; see
`parscale_jax.convert.load_checkpoint`). Greedy unless `--temperature` > 0, then top-k / top-p
filtered sampling with `--seed`. Prints prompt + continuation per prompt, or with `--json` one
object {"prompt", "ids", "text"} per line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags
from tokenizers import Tokenizer

from core.errors import ConfigError, DataError
from launch import cli
from parscale_jax.convert import load_checkpoint, read_config, read_hf_config
from parscale_jax.generate import check_settings, generate, prompt_limit
from tasks.parscale_lm.data import read_tokenizer_json

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Hugging Face checkpoint directory (config.json, weights, tokenizer.json)."
)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat the flag for a batch).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
_PARSCALE_N = flags.DEFINE_integer(
    "parscale_n",
    None,
    "Run with this many streams (default: the checkpoint's; 1: the backbone alone; others "
    "from streams/P{n}.safetensors).",
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: smallest set with this mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_JSON = flags.DEFINE_bool("json", False, "Print ids and text as JSON, one object per prompt.")
flags.mark_flags_as_required(["checkpoint", "prompt"])


def check_flags(
    max_new_tokens: int,
    parscale_n: int | None,
    temperature: float,
    top_k: int,
    top_p: float,
) -> None:
    """ConfigError naming the first impossible flag value, before anything is read."""
    try:
        check_settings(max_new_tokens, temperature, top_k, top_p)
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None
    if parscale_n is not None and parscale_n < 1:
        raise ConfigError(
            f"--parscale_n={parscale_n} is invalid: must be >= 1 (1: the backbone alone)"
        )


def _token_id(hf: dict, field: str, path: Path, vocab_size: int) -> list[int]:
    """config.json's `field` (an id, a list of ids, or null) as a list; DataError otherwise."""
    value = hf.get(field)
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise DataError(
            f"{path} {field}={value!r} is invalid: expected a token id in [0, {vocab_size}), "
            "a list of them, or null"
        )
    return ids


def load_tokenizer(path: Path) -> Tokenizer:
    """tokenizer.json through the `tokenizers` library; DataError naming the file."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: the checkpoint needs a {path.name}")
    return read_tokenizer_json(path)


def run(
    directory: Path,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    parscale_n: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[dict]:
    """Generates for each prompt: [{"prompt", "ids" (new ids, up to the stop token), "text"}].

    Every bad input ends in one core.errors line before anything is traced: a flag value, a
    missing directory or file, a config.json that is not JSON or has a field of the wrong type,
    a truncated safetensors file, a P the checkpoint cannot serve, a prompt that is empty or
    longer than max_position_embeddings - max_new_tokens."""
    check_flags(max_new_tokens, parscale_n, temperature, top_k, top_p)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ConfigError(f"--checkpoint={directory} is invalid: the directory {what}")
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise DataError(f"{directory / name} does not exist: the checkpoint needs a {name}")
    hf = read_hf_config(directory)
    config = read_config(directory)  # config.json's fields checked (types too) before loading
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    config_path = directory / "config.json"
    stop_tokens = _token_id(hf, "eos_token_id", config_path, config.vocab_size)
    pad_ids = _token_id(hf, "pad_token_id", config_path, config.vocab_size)
    pad_id = pad_ids[0] if pad_ids else 0
    try:
        limit = prompt_limit(config, max_new_tokens)
    except ConfigError:
        raise ConfigError(
            f"--max_new_tokens={max_new_tokens} is invalid: must be < max_position_embeddings="
            f"{config.max_position_embeddings} of {config_path} (room for the prompt)"
        ) from None
    encoded = [tokenizer.encode(p).ids for p in prompts]
    for index, (prompt, seq) in enumerate(zip(prompts, encoded, strict=True)):
        if not seq:
            raise ConfigError(
                f"--prompt #{index} ({prompt!r}) is invalid: it encodes to 0 tokens; give at "
                "least one"
            )
        if len(seq) > limit:
            raise ConfigError(
                f"--prompt #{index} is invalid: it is {len(seq)} tokens long, the limit is "
                f"{limit} (max_position_embeddings={config.max_position_embeddings} of "
                f"{config_path} - --max_new_tokens={max_new_tokens})"
            )
    try:
        config, params = load_checkpoint(directory, parscale_n=parscale_n)
    except ConfigError as e:
        raise ConfigError(f"--{e}" if str(e).startswith("parscale_n=") else str(e)) from None

    width = max(len(ids) for ids in encoded)
    ids = np.full((len(encoded), width), pad_id, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for row, seq in enumerate(encoded):  # left padding
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    tokens = np.asarray(
        generate(
            config,
            params,
            ids,
            mask,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_tokens=stop_tokens,
            pad_id=pad_id,
            seed=seed,
        )
    )
    results = []
    for prompt, row in zip(prompts, tokens, strict=True):
        new = [int(t) for t in row]
        if stop_tokens:
            ends = [i for i, t in enumerate(new) if t in stop_tokens]
            new = new[: ends[0] + 1] if ends else new
        results.append({"prompt": prompt, "ids": new, "text": tokenizer.decode(new)})
    return results


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    with cli.one_line_errors():
        results = run(
            Path(_CHECKPOINT.value),
            _PROMPT.value,
            _MAX_NEW_TOKENS.value,
            parscale_n=_PARSCALE_N.value,
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            top_p=_TOP_P.value,
            seed=_SEED.value,
        )
    for result in results:
        print(json.dumps(result) if _JSON.value else result["prompt"] + result["text"])


if __name__ == "__main__":
    cli.run(main)
