"""Qwen2 / Qwen2-ParScale configuration, read from and written to HF `config.json` fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from core.errors import ConfigError

MODEL_TYPES = ("qwen2", "qwen2_parscale")
# Attention implementations (ParScaleConfig.attention).
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "auto")
# Rematerialisation policies of the decoder layers (ParScaleConfig.remat_policy): 'none' keeps
# every activation for the backward pass; 'full' is jax.checkpoint's default (recompute the layer,
# keep only its inputs); the others are the jax.checkpoint_policies of those names.
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
)
# This library's own fields: never read from or written to an HF config.json.
NOT_HF_FIELDS = frozenset({"dtype", "attention", "scan_layers", "remat_policy"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ParScaleConfig:
    """A Qwen2-family decoder with P parallel streams (P = `parscale_n`; P = 1 is plain Qwen2).

    Field names and defaults follow HF's Qwen2Config / Qwen2ParScaleConfig; each field is
    explained where it is defined below.
    """

    vocab_size: int  # token ids, i.e. rows of the embedding (and of the LM head)
    hidden_size: int  # model width H (residual stream)
    intermediate_size: int  # width of each layer's SwiGLU MLP
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads per layer
    num_key_value_heads: int  # key/value heads (grouped-query attention); divides the query heads
    head_dim: int | None = None  # per-head width (even, for RoPE); None: hidden_size // query heads
    rope_theta: float = 10000.0  # RoPE base frequency
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    max_position_embeddings: int = 32768  # longest sequence (tokens) the model accepts
    tie_word_embeddings: bool = False  # the LM head reuses the input embedding matrix
    parscale_n: int = 1  # P, parallel streams (1: plain Qwen2, no prefixes or aggregator)
    parscale_n_tokens: int = 48  # learned prefix tokens per stream, per layer's keys/values
    # The reference configuration class defaults to 0.01, but every released checkpoint says 0.1,
    # so always take it from the checkpoint's config.json.
    parscale_attn_smooth: float = 0.01  # eps in [0, 1): stream weights w (1 - eps) + eps / P
    dtype: str = "float32"  # not an HF field: activations' dtype, 'float32' or 'bfloat16'
    # Not an HF field: 'einsum' (model.attend, grouped einsums) or jax.nn.dot_product_attention
    # with implementation 'xla', 'cudnn' (fused GPU kernel) or 'auto' (JAX picks; cuDNN on GPUs
    # where it applies). All compute the same softmax attention.
    attention: str = "einsum"
    # Not an HF field: the decoder layers as one nn.scan-ned layer (params and KV cache get a
    # leading layer axis; one layer is compiled instead of num_hidden_layers copies).
    scan_layers: bool = False
    remat_policy: str = "none"  # not an HF field: one of REMAT_POLICIES, for the decoder layers

    @property
    def kv_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def n_prefix(self) -> int:
        """KV slots in front of the real tokens: the per-stream prefixes (none when P = 1)."""
        return self.parscale_n_tokens if self.parscale_n > 1 else 0

    def validate(self, prefix: str = "model.") -> ParScaleConfig:
        """Checks every field's type, then the values and how they fit together; ConfigError
        `<prefix><field>=<value> is invalid: ...` names the first field at fault (so that a
        config.json with "hidden_size": "64" fails here, before anything is traced)."""

        def fail(field: str, allowed: str) -> None:
            raise ConfigError(f"{prefix}{field}={getattr(self, field)!r} is invalid: {allowed}")

        def got(field: str) -> str:
            return f"got {type(getattr(self, field)).__name__}"

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "parscale_n",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not _is_int(value):
                fail(name, f"expected a positive integer, {got(name)}")
            if value < 1:
                fail(name, "must be a positive integer")
        if self.head_dim is not None and not (_is_int(self.head_dim) and self.head_dim > 0):
            fail("head_dim", f"expected a positive integer or null, {got('head_dim')}")
        if not _is_int(self.parscale_n_tokens):
            fail("parscale_n_tokens", f"expected an integer, {got('parscale_n_tokens')}")
        for name in ("rope_theta", "rms_norm_eps", "parscale_attn_smooth"):
            if not _is_number(getattr(self, name)):
                fail(name, f"expected a number, {got(name)}")
        if not self.rope_theta > 0:
            fail("rope_theta", "must be positive")
        if not self.rms_norm_eps >= 0:
            fail("rms_norm_eps", "must be >= 0")
        if not isinstance(self.tie_word_embeddings, bool):
            fail("tie_word_embeddings", f"expected true or false, {got('tie_word_embeddings')}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail(
                "hidden_size",
                f"must be divisible by num_attention_heads="
                f"{self.num_attention_heads} (or set head_dim)",
            )
        if self.kv_head_dim % 2:
            fail("head_dim", "rotary embeddings need an even head dimension")
        if self.parscale_n > 1 and self.parscale_n_tokens < 1:
            fail("parscale_n_tokens", "P > 1 needs at least one prefix token")
        if not 0.0 <= self.parscale_attn_smooth < 1.0:
            fail("parscale_attn_smooth", "must lie in [0, 1)")
        if self.dtype not in ("float32", "bfloat16"):
            fail("dtype", "allowed: float32, bfloat16")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            fail("attention", f"allowed: {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if not isinstance(self.scan_layers, bool):
            fail("scan_layers", f"expected true or false, {got('scan_layers')}")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"allowed: {', '.join(REMAT_POLICIES)}")
        return self

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], prefix: str = "model.") -> ParScaleConfig:
        values = dict(mapping.items())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{prefix}{unknown[0]} is not a ParScale model field; allowed: "
                f"{', '.join(sorted(known))}"
            )
        return cls(**values).validate(prefix)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> ParScaleConfig:
        """From an HF config.json dict of model_type 'qwen2' or 'qwen2_parscale'.

        `source` (the file's path) starts every ConfigError message, which names the field, what
        it must be and what the file holds."""

        def fail(field: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"{source} {field}={value!r} is invalid: {allowed}")

        if not isinstance(hf, Mapping):
            raise ConfigError(
                f"{source} is invalid: expected a JSON object of model fields, got "
                f"{type(hf).__name__}"
            )
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise fail("model_type", model_type, f"allowed: {', '.join(MODEL_TYPES)}")
        if hf.get("use_sliding_window"):
            raise fail(
                "use_sliding_window",
                hf["use_sliding_window"],
                "sliding-window attention is not supported (every Qwen2/ParScale release has "
                "it off)",
            )
        if hf.get("rope_scaling"):
            raise fail("rope_scaling", hf["rope_scaling"], "only plain RoPE is supported")
        known = {f.name for f in dataclasses.fields(cls)} - NOT_HF_FIELDS
        values = {k: hf[k] for k in known if k in hf and hf[k] is not None}
        rope = hf.get("rope_parameters")  # transformers >= 5 moved rope_theta in here
        if rope is not None and "rope_theta" not in values:
            if not isinstance(rope, Mapping):
                raise fail("rope_parameters", rope, "expected a JSON object")
            if rope.get("rope_type", "default") != "default":
                raise fail(
                    "rope_parameters.rope_type",
                    rope["rope_type"],
                    "only plain RoPE ('default') is supported",
                )
            if "rope_theta" in rope:
                values["rope_theta"] = rope["rope_theta"]
        if model_type == "qwen2":
            values["parscale_n"] = 1
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        )
        if missing:
            raise ConfigError(
                f"{source} is invalid: it lacks the model field(s) {', '.join(missing)}"
            )
        return cls(**values).validate(prefix=f"{source} ")

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict (Qwen2ParScale when P > 1, otherwise plain Qwen2)."""
        hf: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in NOT_HF_FIELDS
        }
        if hf["head_dim"] is None:
            del hf["head_dim"]
        hf.update(
            hidden_act="silu",
            use_sliding_window=False,
            rope_scaling=None,
            attention_dropout=0.0,
            torch_dtype="float32",
        )
        if self.parscale_n > 1:
            hf.update(model_type="qwen2_parscale", architectures=["Qwen2ParScaleForCausalLM"])
        else:
            for name in ("parscale_n", "parscale_n_tokens", "parscale_attn_smooth"):
                del hf[name]
            hf.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
        return hf
