"""Reference outputs of stock `transformers.Qwen2ForCausalLM` for the JAX port's tests.

Runs only in the second environment (`.venv-torch`, Python 3.11, CPU torch; `make torch-reference`).
For each tiny config below it builds a randomly initialised model, overwrites every parameter with
seeded random values (so q/k/v biases and RMSNorm weights are far from their trivial inits), and
writes into `<out>/<name>/`:

* a Hugging Face checkpoint made by `save_pretrained` (sharded for one config, single file for
  the other) plus a byte-level BPE `Qwen2Tokenizer` (tokenizer.json) of the model's vocab size;
* `outputs.npz` with inputs and outputs of a plain forward, a left-padded forward and greedy
  generation (token ids and from a text prompt), plus `config_json` and `meta_json`.

The whole output directory is built in a temporary sibling and renamed into place at the end, so
readers never see a half-written reference.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

EOS_TOKEN = "<|endoftext|>"
BATCH, SEQ_LEN = 2, 10
NUM_PAD = 3  # left pads on row 0 of the padded batch
GEN_PROMPT_LEN, GEN_NEW_TOKENS = 6, 8
PROMPT_TEXT = "Beautiful is better than"
# A greedy token is only a meaningful reference if float32 rounding cannot flip it; the JAX port
# differs from torch by ~1e-6, so require a top-1/top-2 logit gap well above that. The case seeds
# below were picked (by trying a few) so that this holds and greedy decoding never emits EOS.
MIN_GREEDY_MARGIN = 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    seed: int
    config: dict[str, Any]
    # None: single `model.safetensors`; else the `max_shard_size` that forces several shards.
    max_shard_size: str | None
    # Released Qwen2/ParScale checkpoints were written by transformers 4.x, whose config.json has a
    # top-level `rope_theta` (and `torch_dtype`); transformers 5 writes `rope_parameters`. One case
    # keeps the v5 file, the other is rewritten to the 4.x layout (and reloaded below to prove that
    # transformers reads it as the same config), so the converter is tested on both.
    legacy_config_json: bool


CASES = (
    # (a) tied embeddings, GQA (4 query heads share 2 KV heads), rope_theta 1e4 like the ParScale
    # from-scratch releases; single-file checkpoint.
    Case(
        name="tied_gqa",
        seed=1,
        config=dict(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
        max_shard_size=None,
        legacy_config_json=False,
    ),
    # (b) untied LM head, MHA (KV heads == heads), rope_theta 1e6 like Qwen2.5, head_dim 16;
    # sharded checkpoint with a transformers-4.x style config.json, like the released checkpoints.
    Case(
        name="untied_mha",
        seed=8,
        config=dict(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            tie_word_embeddings=False,
        ),
        max_shard_size="50KB",
        legacy_config_json=True,
    ),
)


def build_tokenizer(vocab_size: int) -> Qwen2Tokenizer:
    """A `Qwen2Tokenizer` (byte-level BPE) with exactly `vocab_size` ids, EOS last as in Qwen2.

    The BPE merges are trained with the pre-tokenizer/normalizer of HF's own `Qwen2Tokenizer`:
    `AutoTokenizer` rebuilds that pipeline for any `model_type: qwen2` checkpoint, so a tokenizer
    trained with anything else would encode differently once reloaded.
    """
    pipeline = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = pipeline.normalizer
    tok.pre_tokenizer = pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is left for EOS, which Qwen2Tokenizer appends
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator([training_text()], trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe["vocab"], merges=merges)
    if len(tokenizer) != vocab_size or tokenizer.convert_tokens_to_ids(EOS_TOKEN) != vocab_size - 1:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, want {vocab_size} with EOS last")
    return tokenizer


def training_text() -> str:
    """The Zen of Python from the stdlib's `this` module.

    Local, and unchanged across CPython releases for two decades, so the merges (hence the prompt's
    ids and the greedy reference) don't drift with the installed Python or with edits to this file.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
        import this
    return codecs.decode(this.s, "rot13")


def make_config(case: Case, eos_id: int) -> Qwen2Config:
    cfg = dict(case.config)
    rope_theta = cfg.pop("rope_theta")
    return Qwen2Config(
        **cfg,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        # Qwen2.5 and ParScale use the same id for BOS and EOS (<|endoftext|>).
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        attn_implementation="eager",
        dtype="float32",
    )


def randomize_(model: Qwen2ForCausalLM, seed: int) -> None:
    """Overwrites every parameter so that nothing a port could get wrong is zero or one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Sorted names make the draw order independent of module registration order.
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                p.copy_(0.3 * noise)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                # Larger q/k scale gives peaked attention, so a wrong mask/RoPE shows clearly.
                p.copy_(2.0 * noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def greedy_without_cache(model: Qwen2ForCausalLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Independent greedy decode (full recompute each step) to cross-check `generate`."""
    for _ in range(n):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def min_margin(scores: torch.Tensor) -> float:
    top2 = scores.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def legacy_config_dict(v5_config: dict[str, Any]) -> dict[str, Any]:
    """Rewrites a transformers-5 config.json in the layout 4.x wrote for Qwen2 (the released one).

    Only the keys whose layout changed are touched; `transformers_version` stays truthful.
    """
    d = dict(v5_config)
    rope = d.pop("rope_parameters")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"legacy layout only for default RoPE, got {rope}")
    d["rope_theta"] = rope["rope_theta"]
    d["rope_scaling"] = None
    d["torch_dtype"] = d.pop("dtype")
    d.pop("layer_types", None)  # 4.x had no per-layer attention types for Qwen2
    return dict(sorted(d.items()))


def generate(model: Qwen2ForCausalLM, ids: torch.Tensor, eos_id: int) -> tuple[np.ndarray, Any]:
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=GEN_NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        pad_token_id=eos_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    seqs = out.sequences
    if seqs.shape[1] != ids.shape[1] + GEN_NEW_TOKENS or (seqs[:, ids.shape[1] :] == eos_id).any():
        # An early EOS would make HF pad the rest; keep references free of that corner case.
        raise RuntimeError("greedy generation hit EOS; pick another seed/prompt")
    return seqs.numpy(), out


def run_case(case: Case, out_dir: Path) -> dict[str, Any]:
    ckpt = out_dir / case.name
    tokenizer = build_tokenizer(case.config["vocab_size"])
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = make_config(case, eos_id)
    torch.manual_seed(1000 + case.seed)
    model = Qwen2ForCausalLM(config).eval()
    randomize_(model, 2000 + case.seed)

    gen = torch.Generator().manual_seed(3000 + case.seed)
    # Ordinary ids only (EOS excluded) so the batches look like real text.
    input_ids = torch.randint(0, eos_id, (BATCH, SEQ_LEN), generator=gen)
    pad_input_ids = torch.randint(0, eos_id, (BATCH, SEQ_LEN), generator=gen)
    pad_input_ids[0, :NUM_PAD] = eos_id
    pad_attention_mask = torch.ones_like(pad_input_ids)
    pad_attention_mask[0, :NUM_PAD] = 0
    # What `generate` derives for left-padded prompts.
    pad_position_ids = (pad_attention_mask.cumsum(-1) - 1).clamp(min=0)
    gen_prompt_ids = torch.randint(0, eos_id, (BATCH, GEN_PROMPT_LEN), generator=gen)
    prompt_ids = torch.tensor([tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)])

    checks: dict[str, Any] = {}
    with torch.no_grad():
        fwd = model(input_ids, use_cache=False, output_hidden_states=True)
        logits = fwd.logits
        pad_logits = model(
            pad_input_ids,
            attention_mask=pad_attention_mask,
            position_ids=pad_position_ids,
            use_cache=False,
        ).logits
        gen_sequences, gen_out = generate(model, gen_prompt_ids, eos_id)
        prompt_sequences, prompt_out = generate(model, prompt_ids, eos_id)

        # Self-checks: each one guards an assumption the JAX tests make about these numbers.
        unpadded = model(pad_input_ids[:1, NUM_PAD:], use_cache=False).logits
        checks["pad_row0_vs_unpadded_max_abs"] = float(
            (pad_logits[0, NUM_PAD:] - unpadded[0]).abs().max()
        )
        for seqs, prompt in ((gen_sequences, gen_prompt_ids), (prompt_sequences, prompt_ids)):
            recomputed = greedy_without_cache(model, prompt, GEN_NEW_TOKENS).numpy()
            if not np.array_equal(recomputed, seqs):
                raise RuntimeError("cached generate != greedy recomputation without cache")
        checks["cached_generate_equals_recompute"] = True
        gen_scores = torch.stack(gen_out.scores)
        prompt_scores = torch.stack(prompt_out.scores)
        checks["min_greedy_margin"] = min(min_margin(gen_scores), min_margin(prompt_scores))
        if checks["min_greedy_margin"] < MIN_GREEDY_MARGIN:
            raise RuntimeError(f"greedy margin {checks['min_greedy_margin']} too small")
        model.set_attn_implementation("sdpa")
        checks["eager_vs_sdpa_max_abs"] = float(
            (model(input_ids, use_cache=False).logits - logits).abs().max()
        )
        model.set_attn_implementation("eager")

    # `save_pretrained` writes safetensors only in transformers 5 (no `safe_serialization` flag).
    model.save_pretrained(ckpt, max_shard_size=case.max_shard_size or "50GB")
    tokenizer.save_pretrained(ckpt)
    if case.legacy_config_json:
        v5_config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        (ckpt / "config.json").write_text(
            json.dumps(legacy_config_dict(v5_config), indent=2) + "\n", encoding="utf-8"
        )
    files = sorted(p.name for p in ckpt.iterdir())
    sharded = "model.safetensors.index.json" in files
    if sharded != (case.max_shard_size is not None):
        raise RuntimeError(f"{case.name}: unexpected checkpoint layout {files}")

    # Reload what was written, as a user would, to prove the files alone reproduce the logits.
    reloaded = Qwen2ForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    if reloaded.config.rope_parameters["rope_theta"] != case.config["rope_theta"]:
        raise RuntimeError("config.json did not round-trip rope_theta")
    with torch.no_grad():
        checks["reload_max_abs"] = float(
            (reloaded(input_ids, use_cache=False).logits - logits).abs().max()
        )
    if checks["reload_max_abs"] != 0.0:
        raise RuntimeError(f"reloaded checkpoint differs: {checks['reload_max_abs']}")
    # Both ways a consumer may read the tokenizer: HF's AutoTokenizer and the bare tokenizer.json
    # (what the JAX CLI uses through the `tokenizers` library).
    raw_tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    for ids in (
        AutoTokenizer.from_pretrained(ckpt).encode(PROMPT_TEXT, add_special_tokens=False),
        raw_tok.encode(PROMPT_TEXT, add_special_tokens=False).ids,
    ):
        if ids != prompt_ids[0].tolist():
            raise RuntimeError(f"saved tokenizer encodes the prompt as {ids}")
    if raw_tok.decode(prompt_sequences[0].tolist()) != tokenizer.decode(prompt_sequences[0]):
        raise RuntimeError("tokenizer.json decodes differently from the HF tokenizer")
    if max(checks["pad_row0_vs_unpadded_max_abs"], checks["eager_vs_sdpa_max_abs"]) > 1e-4:
        raise RuntimeError(f"self-check failed: {checks}")

    prompt_len = prompt_ids.shape[1]
    prompt_gen_tokens = prompt_sequences[0, prompt_len:]
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "seeds": {
            "construction": 1000 + case.seed,
            "parameters": 2000 + case.seed,
            "inputs": 3000 + case.seed,
        },
        "checkpoint_files": files,
        "legacy_config_json": case.legacy_config_json,
        "eos_token_id": eos_id,
        "self_checks": checks,
        "state_dict_keys": sorted(model.state_dict()),
    }
    arrays: dict[str, np.ndarray] = {
        "config_json": np.array((ckpt / "config.json").read_text(encoding="utf-8")),
        "meta_json": np.array(json.dumps(meta, indent=2)),
        "input_ids": input_ids.numpy(),
        "logits": logits.numpy(),
        # (L+1, B, S, H): embeddings, outputs of layers 0..L-2, then the final-norm output.
        "hidden_states": torch.stack(fwd.hidden_states).numpy(),
        "pad_input_ids": pad_input_ids.numpy(),
        "pad_attention_mask": pad_attention_mask.numpy(),
        "pad_position_ids": pad_position_ids.numpy(),
        "pad_logits": pad_logits.numpy(),
        "gen_prompt_ids": gen_prompt_ids.numpy(),
        "gen_sequences": gen_sequences,
        "gen_tokens": gen_sequences[:, GEN_PROMPT_LEN:],
        "gen_scores": gen_scores.numpy(),
        "prompt_text": np.array(PROMPT_TEXT),
        "prompt_ids": prompt_ids[0].numpy(),
        "prompt_gen_tokens": prompt_gen_tokens,
        "prompt_gen_text": np.array(tokenizer.decode(prompt_gen_tokens.tolist())),
        "prompt_full_text": np.array(tokenizer.decode(prompt_sequences[0].tolist())),
    }
    for key in ("logits", "pad_logits", "hidden_states", "gen_scores"):
        if arrays[key].dtype != np.float32:
            raise RuntimeError(f"{key} is {arrays[key].dtype}, want float32")
    np.savez_compressed(ckpt / "outputs.npz", **arrays)
    return {"name": case.name, "files": files, **checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced)")
    args = parser.parse_args(argv)

    # Reproducible float32 CPU numbers; one thread keeps reduction order fixed and the machine free.
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    out: Path = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the final directory's mode
    try:
        for case in CASES:
            print(json.dumps(run_case(case, tmp)))
        # Swap in the finished tree; the old one (if any) is moved aside first because rename
        # cannot replace a non-empty directory.
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
