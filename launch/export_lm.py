"""Export a trained ParScale LM workdir as a Hugging Face checkpoint directory.

    python -m launch.export_lm --workdir=runs/arith_p1 --out=runs/arith_lm \\
        --streams_from=runs/arith_p2_recycle,runs/arith_p4_recycle

Writes to --out (which must not exist or be empty): config.json (Qwen2 / Qwen2-ParScale fields
plus eos_token_id and pad_token_id), model.safetensors (HF names and layouts), tokenizer.json and
tokenizer_config.json -- what `parscale_jax.convert.load_checkpoint`, `python -m launch.generate`
and `inference_scaling.samplers.lm.LMSampler.from_dir` read.

Tokenizer: a run with `task.tokenizer='bytes'` gets a `tokenizers`-library JSON that maps text
to ids exactly as `tasks.parscale_lm.data.ByteTokenizer` does: each UTF-8 byte b is token b (a
byte-level BPE without merges, GPT-2's byte-to-character alphabet), "<|endoftext|>" = 256 (EOS),
"<|pad|>" = 257 (PAD), no BOS, nothing added when encoding. (One difference: the exported
tokenizer reads the literal text "<|endoftext|>" as the EOS id, where ByteTokenizer has no text
form for its special ids.) A run with a tokenizer.json path gets copies of that file and of the
tokenizer_config.json beside it.

Dynamic P (--streams_from=W1,W2,...): recycled runs of the same architecture whose backbone is
bit-identical to --workdir's (trained with `freeze_backbone=True` from it); each contributes its
prefixes and aggregator as streams/P{n}.safetensors (`parscale_jax.convert.save_streams`), and
`load_checkpoint(out, parscale_n=n)` / `launch.generate --parscale_n=n` assemble that P. A
backbone that differs anywhere is refused with CheckpointMismatchError naming the tensor; nothing
is written until every source has been checked.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from core.errors import CheckpointMismatchError, ConfigError
from launch import cli, runs
from parscale_jax.config import ParScaleConfig
from parscale_jax.convert import (
    is_stream_tensor,
    save_checkpoint,
    save_streams,
    state_dict_from_params,
)
from tasks.parscale_lm.data import ByteTokenizer, make_tokenizer
from tasks.parscale_lm.task import ParScaleLMTask

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Fields that may differ between a base model and a prefix/aggregator set recycled from it.
STREAM_FIELDS = ("parscale_n", "parscale_n_tokens", "parscale_attn_smooth", "dtype")


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the `tokenizers` ByteLevel alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json() -> str:
    """tokenizer.json text of `ByteTokenizer` (see the module docstring)."""
    vocab = {char: b for b, char in byte_to_char().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (EOS_TOKEN, PAD_TOKEN)]
    )
    byte = ByteTokenizer()
    for token, wanted in ((EOS_TOKEN, byte.eos_id), (PAD_TOKEN, byte.pad_id)):
        if tokenizer.token_to_id(token) != wanted:  # pragma: no cover - tokenizers changed
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, not {wanted}")
    return tokenizer.to_str(pretty=True)


def read_lm(workdir: str) -> tuple[ParScaleConfig, dict[str, Any], Any]:
    """(model config, params as numpy, the run's config) of a language-model workdir."""
    exp, variables, _ = runs.load_run(
        workdir, ParScaleLMTask, kind="language-model", tool="launch.export_lm"
    )
    params = jax.tree.map(np.asarray, jax.device_get(variables["params"]))
    return exp.task.model_config, params, exp.config


def check_same_backbone(
    base: dict[str, np.ndarray], other: dict[str, np.ndarray], where: str, base_where: str
) -> None:
    """CheckpointMismatchError naming the first backbone tensor (HF name) that is missing or not
    bit-identical."""
    names = sorted(set(base) | set(other))
    for name in names:
        if is_stream_tensor(name):
            continue
        a, b = base.get(name), other.get(name)
        if a is None or b is None:
            side = base_where if a is None else where
            raise CheckpointMismatchError(
                f"--streams_from={where!r} does not share the backbone of --workdir="
                f"{base_where!r}: tensor {name!r} is missing from {side!r}"
            )
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            detail = (
                f"shape {b.shape} vs {a.shape}"
                if a.shape != b.shape
                else f"max |difference| {float(np.max(np.abs(a.astype(np.float64) - b))):.3g}"
            )
            raise CheckpointMismatchError(
                f"--streams_from={where!r} does not share the backbone of --workdir="
                f"{base_where!r}: tensor {name!r} differs ({detail}); recycle it from that run "
                "with freeze_backbone=True"
            )


def tokenizer_files(run_config: Any) -> tuple[dict[str, str], int, int]:
    """({file name: text}, eos id, pad id) of the run's tokenizer."""
    spec = str(run_config.task.get("tokenizer", "bytes"))
    if spec == "bytes":
        byte = ByteTokenizer()
        config = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "add_bos_token": False}
        files = {
            "tokenizer.json": byte_tokenizer_json(),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        }
        return files, byte.eos_id, byte.pad_id
    tokenizer = make_tokenizer(spec, eos_token=run_config.task.get("eos_token"))
    files = {"tokenizer.json": Path(spec).read_text(encoding="utf-8")}
    beside = Path(spec).parent / "tokenizer_config.json"
    if beside.is_file():
        files["tokenizer_config.json"] = beside.read_text(encoding="utf-8")
    return files, tokenizer.eos_id, tokenizer.pad_id


def export(workdir: str, out: str, streams_from: Sequence[str] = ()) -> dict[str, Any]:
    """Writes the HF directory (module docstring); returns a summary for the log line."""
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out={out!r} is invalid: it exists and is not an empty directory")
    config, params, run_config = read_lm(workdir)
    base = state_dict_from_params(params)
    sets, seen = [], {config.parscale_n}
    for where in streams_from:
        other, other_params, _ = read_lm(where)
        for field in ParScaleConfig.__dataclass_fields__:
            if field not in STREAM_FIELDS and getattr(other, field) != getattr(config, field):
                raise ConfigError(
                    f"--streams_from={where!r} is invalid: its model.{field}="
                    f"{getattr(other, field)!r} differs from --workdir's {getattr(config, field)!r}"
                )
        if other.parscale_n < 2 or other.parscale_n in seen:
            raise ConfigError(
                f"--streams_from={where!r} is invalid: its parscale_n={other.parscale_n}; need "
                f"P > 1 and one run per P (have P = {sorted(seen)})"
            )
        check_same_backbone(base, state_dict_from_params(other_params), where, workdir)
        seen.add(other.parscale_n)
        sets.append((other, other_params))
    files, eos_id, pad_id = tokenizer_files(run_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        hf = {**config.to_hf(), "eos_token_id": eos_id, "pad_token_id": pad_id}
        save_checkpoint(out_dir, config, params, hf_config=hf)
        for name, text in files.items():
            (out_dir / name).write_text(text, encoding="utf-8")
        for other, other_params in sets:
            save_streams(out_dir, other, other_params)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # no half-written checkpoint
        raise
    return {"out": str(out_dir), "parscale_n": config.parscale_n, "streams": sorted(seen)}


def define_flags() -> None:
    """The command line's flags. Defined only when this module runs as the program (see the
    bottom), so that tests can import `export` next to other launchers that also define --out
    or --workdir in the same process."""
    flags.DEFINE_string("workdir", None, "Trained LM workdir (its latest checkpoint).")
    flags.DEFINE_string("out", None, "New HF checkpoint directory (must not hold files).")
    flags.DEFINE_list(
        "streams_from",
        [],
        "Recycled P > 1 workdirs sharing --workdir's backbone: saved as streams/P{n}.safetensors.",
    )
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    values = flags.FLAGS
    with cli.one_line_errors():
        summary = export(values.workdir, values.out, values.streams_from)
    print(
        f"wrote {summary['out']}: P = {summary['parscale_n']} model; serves P = "
        f"{', '.join(map(str, sorted({1, *summary['streams']})))}"
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
