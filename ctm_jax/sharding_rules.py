"""Logical axis names of every CTM parameter: a table of (path regex, names per dimension).

`train_lib.sharding` matches each parameter path ('ticks/synapses/linear/dense/kernel') against
these regexes (full match; every leaf must match exactly one) and maps the names to mesh axes
with the config's `mesh.rules`. `None` for a dimension means "never sharded"; `None` for the
whole entry means "replicated, whatever the rank" (small parameters nobody needs to split).

Names used here:
  neurons      d_model: the state, per-neuron NLM weights, synapse outputs  (tensor parallel)
  embed        d_input: attention width, kv tokens                          (FSDP)
  heads        attention projections' output dim (heads * head_dim)         (tensor parallel)
  hidden       synapse input dims (concat(attention out, z), U-Net widths)  (FSDP)
  mlp          synapse output dims                                          (tensor parallel)
  memory       memory_length M; nlm_hidden: the NLMs' hidden width
  synch        synchronisation pairs (S_out / S_action); classes: out_dims
  features     backbone output channels; conv_in / conv_out: conv channels
  norm         LayerNorm / BatchNorm scales and biases
"""

from __future__ import annotations

LogicalAxes = tuple[str | None, ...] | None
CONV_KERNEL = (None, None, "conv_in", "conv_out")  # HWIO

PARAM_AXES: tuple[tuple[str, LogicalAxes], ...] = (
    # -- per-forward setup
    (r"start_activated_state", ("neurons",)),
    (r"start_trace", ("neurons", "memory")),
    (r"decay_params_(out|action)", ("synch",)),
    (r"initial_rgb/kernel", CONV_KERNEL),
    (r"initial_rgb/bias", ("conv_out",)),
    # -- featuriser: backbone, positional embedding, kv projection
    (r"backbone/embedding/embedding", (None, "embed")),  # parity: Embedding(2, d_input)
    (
        r"backbone/(.*/)?(conv\d|downsample_0|layers_[03])/kernel",
        (None, None, "conv_in", "conv_out"),
    ),
    (r"backbone/(.*/)?(conv\d|downsample_0|layers_[03])/bias", ("conv_out",)),
    (r"backbone/(.*/)?(bn\d|downsample_1|layers_[25])/(scale|bias)", ("norm",)),
    (r"positional_embedding/.*", None),
    (r"kv_proj/dense/kernel", ("features", "embed")),
    (r"kv_proj/dense/bias", ("embed",)),
    (r"kv_norm/(scale|bias)", ("norm",)),
    (r"attention_kv/(key|value)/kernel", ("embed", "heads")),
    (r"attention_kv/(key|value)/bias", ("heads",)),
    # -- one tick (params broadcast over the tick scan)
    (r"ticks/q_proj/dense/kernel", ("synch", "embed")),
    (r"ticks/q_proj/dense/bias", ("embed",)),
    (r"ticks/attention/query/kernel", ("embed", "heads")),
    (r"ticks/attention/query/bias", ("heads",)),
    (r"ticks/attention/out/kernel", ("heads", "embed")),
    (r"ticks/attention/out/bias", ("embed",)),
    (r"ticks/synapses/.*/dense/kernel", ("hidden", "mlp")),
    (r"ticks/synapses/.*/dense/bias", ("mlp",)),
    (r"ticks/synapses/[^/]*norm[^/]*/(scale|bias)", ("norm",)),
    (r"ticks/trace_processor/nlm_\d/w1", ("memory", "nlm_hidden", "neurons")),
    (r"ticks/trace_processor/nlm_\d/b1", (None, "neurons", "nlm_hidden")),
    (r"ticks/trace_processor/nlm_\d/T", (None,)),
    (r"ticks/trace_processor/nlm_\d/layernorm/(scale|bias)", ("norm",)),
    (r"ticks/output_projector/dense/kernel", ("synch", "classes")),
    (r"ticks/output_projector/dense/bias", ("classes",)),
)
