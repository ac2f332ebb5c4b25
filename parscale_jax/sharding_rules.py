"""Logical axis names of every ParScale LM parameter: a table of (path regex, names per dim).

`train_lib.sharding` matches each parameter path ('layers_0/mlp/gate_proj/kernel') against these
regexes (full match; every leaf must match exactly one) and maps the names to mesh axes with the
config's `mesh.rules`. `None` for a dimension means "never sharded".

Names used here: embed (hidden size H, FSDP), heads / kv_heads (query / key-value heads, tensor
parallel; the projections' merged heads * head_dim dim), head_dim, mlp (intermediate size, tensor
parallel), vocab (tensor parallel), streams (P), prefix (the prefix tokens), norm (RMSNorm
weights).
"""

from __future__ import annotations

LogicalAxes = tuple[str | None, ...] | None

PARAM_AXES: tuple[tuple[str, LogicalAxes], ...] = (
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"layers_\d+/(input_layernorm|post_attention_layernorm)/weight", ("norm",)),
    (r"layers_\d+/self_attn/q_proj/kernel", ("embed", "heads")),
    (r"layers_\d+/self_attn/q_proj/bias", ("heads",)),
    (r"layers_\d+/self_attn/(k|v)_proj/kernel", ("embed", "kv_heads")),
    (r"layers_\d+/self_attn/(k|v)_proj/bias", ("kv_heads",)),
    (r"layers_\d+/self_attn/o_proj/kernel", ("heads", "embed")),
    # (P, kv_heads, n_tokens, head_dim)
    (r"layers_\d+/self_attn/prefix_(k|v)", ("streams", "kv_heads", "prefix", "head_dim")),
    (r"layers_\d+/mlp/(gate|up)_proj/kernel", ("embed", "mlp")),
    (r"layers_\d+/mlp/down_proj/kernel", ("mlp", "embed")),
    (r"norm/weight", ("norm",)),
    # The aggregator's MLP: (P*H, H) hidden-major input, then (H, P) stream logits.
    (r"aggregate_layer/dense_0/kernel", (None, "embed")),
    (r"aggregate_layer/dense_0/bias", ("embed",)),
    (r"aggregate_layer/dense_1/kernel", ("embed", "streams")),
    (r"aggregate_layer/dense_1/bias", ("streams",)),
    (r"lm_head/kernel", ("embed", "vocab")),
)
