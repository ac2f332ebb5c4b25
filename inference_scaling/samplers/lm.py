"""A ParScale / Qwen2 language model as an engine `Sampler`: prompt text in, answer text out.

`LMSampler(config, params, tokenizer, ...)` or `LMSampler.from_dir(DIR, parscale_n=P, ...)` (an HF
checkpoint directory as `launch.export_lm` writes it: config.json, safetensors, tokenizer.json,
optional streams/P{n}.safetensors for dynamic P).

One `sample` call is one jitted generation (`parscale_jax.generate.generate_rows`) for the whole
batch: prompts left-padded to the longest (the arithmetic prompts of one level have one length),
the batch padded up to a power of two (at least 8) with copies of its first row so that few
shapes compile. Row b samples with its own key (`fold_in(keys[b], step)` per step), so sample j of
instance i depends only on its prompt and its key `fold_in(fold_in(root, i), j)`, never on the
rest of the batch. Temperature 0 is greedy: every sample of an instance is then identical.

Per sample:
  answer   the decoded generated text before the first EOS (all of it when no EOS came within
           `max_new_tokens`);
  score    the mean log-probability of the generated tokens, EOS included, under the model's own
           distribution (temperature 1, no top-k / top-p, no exclusion): the imperfect LM verifier;
  cost     SampleCost(native = generated tokens including the EOS (the prompt not counted),
           unit "tokens", streams P, flops = `ledger.lm_decode_flops` of the prompt (prefill) and
           the generated tokens, with N = the non-embedding backbone parameters).

Exclusion decoding (sequential feedback F2): when `contexts[b]["wrong_answers"]` lists answers,
row b must not generate any of them. Each forbidden answer is the token sequence of its text
(`str(answer)`) followed by EOS, and the row samples from the model conditioned on avoiding them
(`parscale_jax.generate.generate_rows`): every token's probability is multiplied by the chance
that the answer does not end up forbidden after it (computed from a teacher-forced pass over the
forbidden answers), so a token that would complete one is never chosen, and greedy decoding
takes the conditional's most likely token -- it leaves a wrong answer where the model is least
sure of it ("153" forbidden -> "152") instead of merely refusing to end it ("1532"). An answer
cut off by `max_new_tokens` counts as ended there. Only the canonical text is excluded: a model
that writes "0579" or "579 " for a forbidden 579 is not stopped (models trained on this task's
canonical text do not).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from core.errors import ConfigError, DataError
from inference_scaling.engine import Sample, Sampler
from inference_scaling.ledger import SampleCost, lm_decode_flops
from inference_scaling.tasks.base import Instance
from parscale_jax.config import ParScaleConfig
from parscale_jax.convert import load_checkpoint, read_hf_config
from parscale_jax.generate import generate_rows
from tasks.parscale_lm.data import HFTokenizer, Tokenizer, read_tokenizer_json

MIN_BATCH = 8  # smallest padded batch (the padded batch sizes are powers of two from here)


def non_embedding_params(params: Mapping[str, Any]) -> int:
    """Backbone parameters without the embedding, the LM head, the prefixes and the aggregator
    (the N of `ledger.lm_decode_flops`)."""
    total = 0
    for path, leaf in flatten_dict(dict(params)).items():
        if path[0] in ("embed_tokens", "lm_head", "aggregate_layer"):
            continue
        if path[-1] in ("prefix_k", "prefix_v"):
            continue
        total += int(np.size(leaf))
    return total


def load_tokenizer(directory: str | Path) -> HFTokenizer:
    """tokenizer.json of a checkpoint directory, EOS / PAD from its config.json (eos_token_id,
    pad_token_id; PAD defaults to EOS)."""
    directory = Path(directory)
    path, config_path = directory / "tokenizer.json", directory / "config.json"
    hf = read_hf_config(directory)  # DataError naming a missing or unreadable config.json
    if not path.is_file():
        raise DataError(f"{path} does not exist: the checkpoint needs it")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eos, int):
        raise DataError(f"{config_path} has no integer eos_token_id (found {eos!r})")
    pad = hf.get("pad_token_id")
    tok = read_tokenizer_json(path)
    return HFTokenizer(tok, eos, pad if isinstance(pad, int) else eos, spec=str(path))


def _padded_batch(n: int) -> int:
    size = MIN_BATCH
    while size < n:
        size *= 2
    return size


class LMSampler(Sampler):
    """A language model at one P with one sampling setting (see the module docstring)."""

    def __init__(
        self,
        config: ParScaleConfig,
        params: Mapping[str, Any],
        tokenizer: Tokenizer,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_new_tokens: int = 12,
        prompt_fn: Callable[[Instance], str] | None = None,
    ) -> None:
        if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ConfigError(
                f"sampling settings invalid: temperature={temperature} (>= 0), "
                f"top_k={top_k} (>= 0), top_p={top_p} (in (0, 1])"
            )
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
        self.config = config
        self.params = jax.tree.map(jnp.asarray, dict(params))
        self.tokenizer = tokenizer
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.max_new_tokens = int(max_new_tokens)
        self.prompt_fn = prompt_fn or (lambda instance: str(instance.problem))
        self.label = f"P={config.parscale_n}"
        self.diversity = (
            "greedy"
            if self.temperature == 0.0
            else f"temperature={self.temperature:g},top_k={self.top_k},top_p={self.top_p:g}"
        )
        self.n_params = non_embedding_params(self.params)

    @classmethod
    def from_dir(
        cls, directory: str | Path, parscale_n: int | None = None, **kwargs: Any
    ) -> LMSampler:
        """From an HF checkpoint directory at P = `parscale_n` (default: its own; see
        `parscale_jax.convert.load_checkpoint` for the P values a directory can serve)."""
        config, params = load_checkpoint(directory, parscale_n=parscale_n)
        return cls(config, params, load_tokenizer(directory), **kwargs)

    def flops(self, prompt_tokens: int, new_tokens: int) -> float:
        cfg = self.config
        p = cfg.parscale_n
        return float(
            lm_decode_flops(
                self.n_params,
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.num_hidden_layers,
                prompt_tokens,
                new_tokens,
                p,
                prefix_tokens=cfg.parscale_n_tokens if p > 1 else 0,
                attn_dim=cfg.num_attention_heads * cfg.kv_head_dim,
            )
        )

    def forbidden_sequences(self, context: Mapping[str, Any] | None) -> list[list[int]]:
        """Token sequences (answer text + EOS) that a row with this context must not generate."""
        wrong = (context or {}).get("wrong_answers") or ()
        eos = self.tokenizer.eos_id
        return [list(self.tokenizer.encode(str(answer))) + [eos] for answer in wrong]

    def sample(
        self,
        instances: Sequence[Instance],
        keys: jax.Array,
        contexts: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Sample]:
        n = len(instances)
        if n == 0:
            return []
        if keys.shape != (n,):
            raise ConfigError(f"keys.shape={keys.shape} is invalid: need one key per instance")
        if contexts is not None and len(contexts) != n:
            raise ConfigError(f"contexts has {len(contexts)} entries for {n} instances")
        encoded = [list(self.tokenizer.encode(self.prompt_fn(inst))) for inst in instances]
        if any(not ids for ids in encoded):
            raise ConfigError("an instance has an empty prompt; the LM needs at least one token")
        forbidden = [self.forbidden_sequences(c) for c in (contexts or [None] * n)]
        rows = _padded_batch(n)
        encoded_rows = encoded + [encoded[0]] * (rows - n)
        forbidden_rows = forbidden + [forbidden[0]] * (rows - n)
        key_rows = jnp.concatenate([keys, jnp.repeat(keys[:1], rows - n)]) if rows > n else keys
        width = max(len(ids) for ids in encoded_rows)
        pad = self.tokenizer.pad_id
        ids = np.full((rows, width), pad, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for r, seq in enumerate(encoded_rows):  # left padding
            ids[r, width - len(seq) :] = seq
            mask[r, width - len(seq) :] = 1
        tokens, logp_sum, lengths = generate_rows(
            self.config,
            self.params,
            ids,
            mask,
            key_rows,
            self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop_tokens=(self.tokenizer.eos_id,),
            pad_id=pad,
            forbidden=forbidden_rows,
        )
        tokens, logp_sum, lengths = (np.asarray(x) for x in (tokens, logp_sum, lengths))
        samples = []
        for b in range(n):
            generated = [int(t) for t in tokens[b, : int(lengths[b])]]
            if generated and generated[-1] == self.tokenizer.eos_id:
                generated = generated[:-1]
            count = int(lengths[b])
            samples.append(
                Sample(
                    answer=self.tokenizer.decode(generated),
                    score=float(logp_sum[b]) / max(count, 1),
                    cost=SampleCost(
                        native=float(count),
                        unit="tokens",
                        streams=self.config.parscale_n,
                        flops=self.flops(len(encoded[b]), count),
                    ),
                )
            )
        return samples
