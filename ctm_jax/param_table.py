"""Every CTM module, listed once: Flax path, reference PyTorch state-dict name, logical axes.

Both the sharding rules (`sharding_rules.PARAM_AXES`, the model's `param_axes`) and the reference
state-dict key map (`convert.torch_key`) are derived from `PARAM_TABLE`; see `core.tree_paths`.
Paths are the Flax ones, including the tick scan's 'ticks' scope (the reference has no such
level, so its names leave it out). Kernels, LayerNorm / BatchNorm scales and embeddings are
called 'weight' in torch; BatchNorm running statistics (collection 'batch_stats') and the neuron
index buffers ('buffers') use the names of the module they sit in.

Logical axis names (the trainer's sharding maps them to mesh axes with the config's `mesh.rules`;
`None` for a dimension means "never sharded", `None` for a whole entry "replicated, whatever the
rank"):
  neurons      d_model: the state, per-neuron NLM weights, synapse outputs  (tensor parallel)
  embed        d_input: attention width, kv tokens                          (FSDP)
  heads        attention projections' output dim (heads * head_dim)         (tensor parallel)
  hidden       synapse input dims (concat(attention out, z), U-Net widths)  (FSDP)
  mlp          synapse output dims                                          (tensor parallel)
  memory       memory_length M; nlm_hidden: the NLMs' hidden width
  synch        synchronisation pairs (S_out / S_action); classes: out_dims
  features     backbone output channels; conv_in / conv_out: conv channels
  norm         LayerNorm / BatchNorm scales and biases

Kept outside the table (in `convert.torch_key`): the one config-dependent name. The reference's
'custom-rotational' embedding wraps its projection in a Sequential ('projection.0.weight') where
'custom-rotational-1d' has a bare Linear ('projection.weight'); the Flax path is the same.
"""

from __future__ import annotations

from core.tree_paths import LogicalAxes, Module, ParamTable

CONV_KERNEL = (None, None, "conv_in", "conv_out")  # HWIO
CONV: dict[str, LogicalAxes] = {"kernel": CONV_KERNEL, "bias": ("conv_out",)}
NORM: dict[str, LogicalAxes] = {"scale|bias": ("norm",)}
REPLICATED_DENSE: dict[str, LogicalAxes] = {"kernel|bias": None}
REPLICATED_NORM: dict[str, LogicalAxes] = {"scale|bias": None}
ATTENTION_IN: dict[str, LogicalAxes] = {"kernel": ("embed", "heads"), "bias": ("heads",)}
SYNAPSE: dict[str, LogicalAxes] = {"kernel": ("hidden", "mlp"), "bias": ("mlp",)}
NLM: dict[str, LogicalAxes] = {
    "w1": ("memory", "nlm_hidden", "neurons"),
    "b1": (None, "neurons", "nlm_hidden"),
    "T": (None,),
}


def _fourier(flax: str, torch: str) -> tuple[Module, ...]:
    """A learnable Fourier positional encoding under `flax` / `torch` (prefixes)."""
    return (
        Module(f"{flax}Wr", f"{torch}Wr.{{leaf}}", {"kernel": None}),
        Module(f"{flax}mlp_0/dense", f"{torch}mlp.0.{{leaf}}", REPLICATED_DENSE),
        Module(f"{flax}mlp_1/dense", f"{torch}mlp.2.{{leaf}}", REPLICATED_DENSE),
        Module(f"{flax}mlp_norm", f"{torch}mlp.3.{{leaf}}", REPLICATED_NORM),
    )


PARAM_TABLE = ParamTable(
    leaf_names={"kernel": "weight", "scale": "weight", "embedding": "weight"},
    modules=(
        # -- per-forward setup (root variables: start state and trace, decays, index buffers)
        Module(
            "",
            "{leaf}",
            {
                "start_activated_state": ("neurons",),
                "start_trace": ("neurons", "memory"),
                "decay_params_(out|action)": ("synch",),
            },
        ),
        Module("initial_rgb", "initial_rgb.{leaf}", CONV),
        # -- featuriser: backbone, positional embedding, kv projection
        # parity: Embedding(2, d_input)
        Module("backbone/embedding", "backbone.embedding.{leaf}", {"embedding": (None, "embed")}),
        # ResNets: torchvision names (stem conv1 / bn1, layer{i}.{j} blocks with a downsample
        # Sequential where the shape changes)
        Module(r"backbone/(conv\d)", "backbone.{1}.{leaf}", CONV),
        Module(r"backbone/(bn\d)", "backbone.{1}.{leaf}", NORM),
        Module(r"backbone/layer(\d+)_(\d+)/(conv\d)", "backbone.layer{1}.{2}.{3}.{leaf}", CONV),
        Module(r"backbone/layer(\d+)_(\d+)/(bn\d)", "backbone.layer{1}.{2}.{3}.{leaf}", NORM),
        Module(
            r"backbone/layer(\d+)_(\d+)/downsample_0",
            "backbone.layer{1}.{2}.downsample.0.{leaf}",
            CONV,
        ),
        Module(
            r"backbone/layer(\d+)_(\d+)/downsample_1",
            "backbone.layer{1}.{2}.downsample.1.{leaf}",
            NORM,
        ),
        # shallow-wide: the reference's Sequential (conv, GLU, BatchNorm, conv, GLU, BatchNorm)
        Module(r"backbone/layers_([03])", "backbone.layers.{1}.{leaf}", CONV),
        Module(r"backbone/layers_([25])", "backbone.layers.{1}.{leaf}", NORM),
        # positional embeddings: small, replicated
        Module("positional_embedding", "positional_embedding.{leaf}", {"[^/]+": None}),
        Module(
            "positional_embedding/projection/dense",
            "positional_embedding.projection.{leaf}",  # + '.0' for custom-rotational: see above
            REPLICATED_DENSE,
        ),
        *_fourier("positional_embedding/", "positional_embedding."),
        *_fourier(r"positional_embedding/embedder_(\d+)/", "positional_embedding.embedders.{1}."),
        Module(
            "kv_proj/dense",
            "kv_proj.0.{leaf}",
            {"kernel": ("features", "embed"), "bias": ("embed",)},
        ),
        Module("kv_norm", "kv_proj.1.{leaf}", NORM),
        # key / value rows of torch's packed MultiheadAttention in-projection
        Module("attention_kv/key", "attention.in_proj_{leaf}", ATTENTION_IN, part=1),
        Module("attention_kv/value", "attention.in_proj_{leaf}", ATTENTION_IN, part=2),
        # -- one tick (params broadcast over the tick scan)
        Module(
            "ticks/q_proj/dense",
            "q_proj.{leaf}",
            {"kernel": ("synch", "embed"), "bias": ("embed",)},
        ),
        Module("ticks/attention/query", "attention.in_proj_{leaf}", ATTENTION_IN, part=0),
        Module(
            "ticks/attention/out",
            "attention.out_proj.{leaf}",
            {"kernel": ("heads", "embed"), "bias": ("embed",)},
        ),
        # synapses, depth 1: Sequential(Dropout, Linear, GLU, LayerNorm)
        Module("ticks/synapses/linear/dense", "synapses.1.{leaf}", SYNAPSE),
        Module("ticks/synapses/norm", "synapses.3.{leaf}", NORM),
        # synapses, depth > 1: the reference's U-Net
        Module(
            "ticks/synapses/first_projection/dense",
            "synapses.first_projection.0.{leaf}",
            SYNAPSE,
        ),
        Module("ticks/synapses/first_norm", "synapses.first_projection.1.{leaf}", NORM),
        Module(
            r"ticks/synapses/down_(\d+)/dense",
            "synapses.down_projections.{1}.1.{leaf}",
            SYNAPSE,
        ),
        Module(r"ticks/synapses/down_norm_(\d+)", "synapses.down_projections.{1}.2.{leaf}", NORM),
        Module(r"ticks/synapses/up_(\d+)/dense", "synapses.up_projections.{1}.1.{leaf}", SYNAPSE),
        Module(r"ticks/synapses/up_norm_(\d+)", "synapses.up_projections.{1}.2.{leaf}", NORM),
        Module(r"ticks/synapses/skip_norm_(\d+)", "synapses.skip_lns.{1}.{leaf}", NORM),
        # neuron-level models: trace_processor.0 is Sequential(SuperLinear, GLU[, SuperLinear, GLU])
        Module("ticks/trace_processor/nlm_0", "trace_processor.0.0.{leaf}", NLM),
        Module("ticks/trace_processor/nlm_1", "trace_processor.0.2.{leaf}", NLM),
        Module(
            r"ticks/trace_processor/nlm_0/layernorm", "trace_processor.0.0.layernorm.{leaf}", NORM
        ),
        Module(
            r"ticks/trace_processor/nlm_1/layernorm", "trace_processor.0.2.layernorm.{leaf}", NORM
        ),
        Module(
            "ticks/output_projector/dense",
            "output_projector.0.{leaf}",
            {"kernel": ("synch", "classes"), "bias": ("classes",)},
        ),
    ),
)


# The P-stream CTM: `parscale_jax.parallel.ParallelStreams` around a CTM (the maze task's
# `StreamedCTM`). The CTM's variables sit under 'backbone' with the paths above; each stream's
# input transform ('offset' of AdditiveStreamEmbedding, 'prefix' of StreamPrefix) carries a
# leading P axis; the aggregator's MLP (P*H -> H -> P, H the per-stream feature width) is small.
# Both are replicated whatever their rank. Nothing here has a reference checkpoint name.
STREAM_PARAM_AXES: tuple[tuple[str, LogicalAxes], ...] = (
    ("input_transform/(?:offset|prefix)", None),
    ("aggregator/dense_[01]/(?:kernel|bias)", None),
)


def streamed_param_axes(prefix: str = "backbone") -> tuple[tuple[str, LogicalAxes], ...]:
    """The `param_axes` table of a P-stream CTM: every CTM entry under `prefix`, plus the
    stream transforms and the aggregator (`STREAM_PARAM_AXES`)."""
    return (
        *((f"{prefix}/{pattern}", axes) for pattern, axes in PARAM_TABLE.param_axes()),
        *STREAM_PARAM_AXES,
    )
