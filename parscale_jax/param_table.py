"""Every ParScale LM module, listed once: Flax path, HF tensor name, logical axes.

Both the sharding rules (`sharding_rules.PARAM_AXES`, the model's `param_axes`) and the HF
safetensors key map (`convert.hf_key`) are derived from `PARAM_TABLE`; see `core.tree_paths`.
Kernels and the embedding are called 'weight' in HF (kernels transposed: torch Linear weights
are (out, in), Flax kernels (in, out)).

Logical axis names (the trainer's sharding maps them to mesh axes with the config's `mesh.rules`;
`None` for a dimension means "never sharded"): embed (hidden size H, FSDP), heads / kv_heads
(query / key-value heads, tensor parallel; the projections' merged heads * head_dim dim),
head_dim, mlp (intermediate size, tensor parallel), vocab (tensor parallel), streams (P), prefix
(the prefix tokens), norm (RMSNorm weights), layers (the leading axis of the stacked decoder
layers of `model.scan_layers`; never sharded: each device keeps every layer's slice of a weight).

With scan_layers the layers' parameters sit under 'layers/...' with that extra leading axis;
`scanned_param_axes` derives their rules from the per-layer ones. Their HF names are those of the
per-layer layout (`convert` unstacks before it names tensors).
"""

from __future__ import annotations

from core.tree_paths import LogicalAxes, Module, ParamTable

PER_LAYER = r"layers_(\d+)/"  # the path prefix of one decoder layer's modules (scan_layers=False)
STACKED = "layers/"  # the nn.scan-ned stack's prefix (scan_layers=True)
LAYERS_AXIS = "layers"  # logical name of the stacked layer axis

PARAM_TABLE = ParamTable(
    leaf_names={"kernel": "weight", "embedding": "weight"},
    modules=(
        Module("embed_tokens", "model.embed_tokens.{leaf}", {"embedding": ("vocab", "embed")}),
        Module(
            r"layers_(\d+)/(input_layernorm|post_attention_layernorm)",
            "model.layers.{1}.{2}.{leaf}",
            {"weight": ("norm",)},
        ),
        Module(
            r"layers_(\d+)/self_attn/q_proj",
            "model.layers.{1}.self_attn.q_proj.{leaf}",
            {"kernel": ("embed", "heads"), "bias": ("heads",)},
        ),
        Module(
            r"layers_(\d+)/self_attn/(k|v)_proj",
            "model.layers.{1}.self_attn.{2}_proj.{leaf}",
            {"kernel": ("embed", "kv_heads"), "bias": ("kv_heads",)},
        ),
        Module(
            r"layers_(\d+)/self_attn/o_proj",
            "model.layers.{1}.self_attn.o_proj.{leaf}",
            {"kernel": ("heads", "embed")},
        ),
        # ParScale's per-stream prefix keys / values (P > 1): (P, kv_heads, n_tokens, head_dim)
        Module(
            r"layers_(\d+)/self_attn",
            "model.layers.{1}.self_attn.{leaf}",
            {"prefix_(k|v)": ("streams", "kv_heads", "prefix", "head_dim")},
        ),
        Module(
            r"layers_(\d+)/mlp/(gate|up)_proj",
            "model.layers.{1}.mlp.{2}_proj.{leaf}",
            {"kernel": ("embed", "mlp")},
        ),
        Module(
            r"layers_(\d+)/mlp/down_proj",
            "model.layers.{1}.mlp.down_proj.{leaf}",
            {"kernel": ("mlp", "embed")},
        ),
        Module("norm", "model.norm.{leaf}", {"weight": ("norm",)}),
        # The aggregator's MLP (P > 1), torch Sequential(Linear, SiLU, Linear): (P*H, H)
        # hidden-major input, then (H, P) stream logits.
        Module(
            "aggregate_layer/dense_0",
            "model.aggregate_layer.0.{leaf}",
            {"kernel": (None, "embed"), "bias": ("embed",)},
        ),
        Module(
            "aggregate_layer/dense_1",
            "model.aggregate_layer.2.{leaf}",
            {"kernel": ("embed", "streams"), "bias": ("streams",)},
        ),
        # absent when the head is tied to the embedding
        Module("lm_head", "lm_head.{leaf}", {"kernel": ("embed", "vocab")}),
    ),
)


def scanned_param_axes(
    per_layer: tuple[tuple[str, LogicalAxes], ...],
) -> tuple[tuple[str, LogicalAxes], ...]:
    """The rules of the scanned layout: every per-layer rule ('layers_(\\d+)/mlp/...', axes) again
    as ('layers/mlp/...', ('layers', *axes))."""
    return tuple(
        (STACKED + pattern[len(PER_LAYER) :], None if axes is None else (LAYERS_AXIS, *axes))
        for pattern, axes in per_layer
        if pattern.startswith(PER_LAYER)
    )
