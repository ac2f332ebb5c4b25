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
from absl import app, flags
from tokenizers import Tokenizer

from core.errors import ConfigError, DataError
from launch import cli
from parscale_jax.convert import load_checkpoint
from parscale_jax.generate import generate

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
    """Generates for each prompt: [{"prompt", "ids" (new ids, up to the stop token), "text"}]."""
    if not directory.is_dir():
        raise ConfigError(f"checkpoint={directory} is invalid: not a directory")
    for name in ("config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise DataError(f"{directory / name} does not exist: the checkpoint needs a {name}")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config, params = load_checkpoint(directory, parscale_n=parscale_n)
    hf = json.loads((directory / "config.json").read_text())
    stop = hf.get("eos_token_id")
    stop_tokens = [stop] if isinstance(stop, int) else list(stop or [])

    encoded = [tokenizer.encode(p).ids for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad_id = int(hf.get("pad_token_id") or 0)
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
    app.run(main)
