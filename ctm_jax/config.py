"""CTM model configuration: the reference constructor's arguments, validated up front.

Every impossible value fails here, before anything is traced or compiled, with one line that names
the field, the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core.errors import ConfigError

RESNET_BACKBONES = tuple(
    f"resnet{depth}-{k}" for depth in (18, 34, 50, 101, 152) for k in range(1, 5)
)
IMAGE_BACKBONES = (*RESNET_BACKBONES, "shallow-wide")
BACKBONES = ("none", "parity_backbone", *IMAGE_BACKBONES)
POSITIONAL_EMBEDDINGS = (
    "none",
    "learnable-fourier",
    "multi-learnable-fourier",
    "custom-rotational",
    "custom-rotational-1d",
)
NEURON_SELECT_TYPES = ("first-last", "random", "random-pairing")
VARIANTS = ("ctm", "sort")
COMPUTE_DTYPES = ("float32", "bfloat16")

# Reference model classes (models/ctm.py, models/ctm_sort.py) -> our variant name.
REFERENCE_CLASSES = {
    "ContinuousThoughtMachine": "ctm",
    "ContinuousThoughtMachineSORT": "sort",
}


def _fail(prefix: str, field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{prefix}{field}={value!r} is invalid: {allowed}")


def synch_size(neuron_select_type: str, n_synch: int) -> int:
    """Length of a synchronisation vector: n(n+1)/2 pairs for dense selections, n for pairing."""
    if neuron_select_type == "random-pairing":
        return n_synch
    return n_synch * (n_synch + 1) // 2


def unet_widths(d_model: int, depth: int, minimum_width: int = 16) -> list[int]:
    """Synapse U-Net widths exactly as the reference: int() truncation of np.linspace."""
    return [int(w) for w in np.linspace(d_model, minimum_width, depth)]


@dataclasses.dataclass(frozen=True)
class CTMConfig:
    """Arguments of the reference `ContinuousThoughtMachine` constructor (same names), plus the
    variant, `remat_ticks` and `dtype`. Each field is explained where it is defined below."""

    iterations: int  # internal ticks T per forward pass
    d_model: int  # neurons D (width of the recurrent state z)
    d_input: int  # width of the attention keys/values/query (backbone features projected to it)
    heads: int  # attention heads; must divide d_input (0 for the sort variant)
    n_synch_out: int  # n neurons in the output synchronisation: n(n+1)/2 pairs (random-pairing: n)
    n_synch_action: int  # the same for the action synchronisation (the attention query's input)
    synapse_depth: int  # 1: Linear-GLU-LayerNorm synapses; > 1: a U-Net of that depth
    memory_length: int  # M, pre-activation history length each neuron-level model sees
    deep_nlms: bool  # True: 2-layer neuron-level models (M -> H -> 1); False: one linear (M -> 1)
    memory_hidden_dims: int  # H, hidden width of the deep neuron-level models
    do_layernorm_nlm: bool  # LayerNorm each neuron-level model's input history
    backbone_type: str  # input featuriser: none, parity_backbone, resnet{18..152}-{1..4}, ...
    positional_embedding_type: str  # added to the features: none, (multi-)learnable-fourier, ...
    out_dims: int  # prediction logits per tick
    prediction_reshaper: tuple[int, ...] = (-1,)  # logits -> (..., classes) for the certainty
    dropout: float = 0.0  # dropout rate in [0, 1) of the attention and the synapses
    dropout_nlm: float | None = None  # neuron-level models' dropout; None: same as dropout
    neuron_select_type: str = "random-pairing"  # first-last | random | random-pairing
    n_random_pairing_self: int = 0  # random-pairing: first k pairs are self pairs (i, i)
    # 'sort' is the reference's ContinuousThoughtMachineSORT: no attention and no action
    # synchronisation; each tick's synapse input is concat(raw input, z); the decay clamp sits
    # inside autograd (no straight-through gradient, no projection of stored params).
    variant: str = "ctm"  # ctm | sort
    # Same numbers either way; on CPU about 2x faster train steps (stacking per-tick residuals is
    # memory-bound) and far less memory for long tick counts.
    remat_ticks: bool = True  # not a reference argument: recompute ticks in the backward pass
    # Not a reference argument: the dtype of the matmuls, convolutions and activations, 'float32'
    # or 'bfloat16'. Params and optimiser state stay float32; softmaxes, certainties, the
    # synchronisation accumulators and their read-outs (the predictions) stay float32 too.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "prediction_reshaper", tuple(int(v) for v in self.prediction_reshaper)
        )

    # ----------------------------------------------------------------------------------------
    # Derived sizes
    @property
    def synch_size_out(self) -> int:
        return synch_size(self.neuron_select_type, self.n_synch_out)

    @property
    def synch_size_action(self) -> int:
        return synch_size(self.neuron_select_type, self.n_synch_action)

    @property
    def has_attention(self) -> bool:
        return self.variant == "ctm"

    @property
    def nlm_dropout(self) -> float:
        return self.dropout if self.dropout_nlm is None else self.dropout_nlm

    @property
    def synapse_widths(self) -> list[int]:
        return unet_widths(self.d_model, self.synapse_depth)

    def prediction_shape(self) -> tuple[int, ...]:
        """`prediction_reshaper` with any -1 resolved against out_dims."""
        shape = list(self.prediction_reshaper)
        if -1 in shape:
            known = math.prod(v for v in shape if v != -1)
            shape[shape.index(-1)] = self.out_dims // known
        return tuple(shape)

    # ----------------------------------------------------------------------------------------
    def validate(self, prefix: str = "model.") -> CTMConfig:
        """Raises ConfigError for the first impossible value; returns self otherwise."""
        p = prefix
        for name in (
            "iterations",
            "d_model",
            "memory_length",
            "synapse_depth",
            "out_dims",
            "n_synch_out",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(p, name, value, "must be a positive integer")
        if self.variant not in VARIANTS:
            _fail(p, "variant", self.variant, f"allowed: {', '.join(VARIANTS)}")
        if self.dtype not in COMPUTE_DTYPES:
            _fail(p, "dtype", self.dtype, f"allowed: {', '.join(COMPUTE_DTYPES)}")
        if self.backbone_type not in BACKBONES:
            _fail(
                p,
                "backbone_type",
                self.backbone_type,
                "allowed: none, parity_backbone, resnet{18,34,50,101,152}-{1..4}, shallow-wide",
            )
        if self.positional_embedding_type not in POSITIONAL_EMBEDDINGS:
            _fail(
                p,
                "positional_embedding_type",
                self.positional_embedding_type,
                f"allowed: {', '.join(POSITIONAL_EMBEDDINGS)}",
            )
        if self.backbone_type == "none" and self.positional_embedding_type != "none":
            _fail(
                p,
                "positional_embedding_type",
                self.positional_embedding_type,
                "backbone_type='none' requires positional_embedding_type='none'",
            )
        if self.neuron_select_type not in NEURON_SELECT_TYPES:
            _fail(
                p,
                "neuron_select_type",
                self.neuron_select_type,
                f"allowed: {', '.join(NEURON_SELECT_TYPES)}",
            )
        if not isinstance(self.d_input, int) or self.d_input < 1:
            _fail(p, "d_input", self.d_input, "must be a positive integer")
        if self.deep_nlms and self.memory_hidden_dims < 1:
            _fail(p, "memory_hidden_dims", self.memory_hidden_dims, "deep NLMs need >= 1")
        for name in ("dropout", "dropout_nlm"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                _fail(p, name, value, "must lie in [0, 1)")

        if self.variant == "sort":
            if self.heads != 0 or self.n_synch_action != 0:
                _fail(
                    p,
                    "heads",
                    self.heads,
                    "the sort variant has no attention: heads=0 and n_synch_action=0",
                )
            if self.backbone_type != "none":
                _fail(p, "backbone_type", self.backbone_type, "the sort variant uses 'none'")
        else:
            if not isinstance(self.heads, int) or self.heads < 1:
                _fail(p, "heads", self.heads, "the CTM attends every tick: must be >= 1")
            if self.d_input % self.heads:
                divisors = [h for h in range(1, self.d_input + 1) if self.d_input % h == 0]
                _fail(
                    p,
                    "heads",
                    self.heads,
                    f"must divide d_input={self.d_input} (one of {divisors})",
                )
            if self.n_synch_action < 1:
                _fail(p, "n_synch_action", self.n_synch_action, "the attention query needs >= 1")

        n_out, n_act, d = self.n_synch_out, self.n_synch_action, self.d_model
        if self.neuron_select_type == "first-last" and n_out + n_act > d:
            _fail(
                p,
                "n_synch_out",
                n_out,
                f"first-last needs n_synch_out + n_synch_action ({n_out}+{n_act}) <= d_model={d}",
            )
        # random / random-pairing draw with replacement: any n works, and the reference's own
        # runs use n > D (CIFAR-10: 512 action neurons of 256; ImageNet: 8196 out of 4096).
        if self.neuron_select_type == "random-pairing":
            k = self.n_random_pairing_self
            if k < 0:
                _fail(p, "n_random_pairing_self", k, "must be >= 0")
            for name, n in (("n_synch_out", n_out), ("n_synch_action", n_act)):
                if n and n <= k:
                    _fail(p, name, n, f"random-pairing needs more than n_random_pairing_self={k}")

        shape = list(self.prediction_reshaper)
        if shape.count(-1) > 1 or any(v == 0 or v < -1 for v in shape):
            _fail(p, "prediction_reshaper", shape, "positive sizes with at most one -1")
        known = math.prod(v for v in shape if v != -1)
        if (-1 in shape and self.out_dims % known) or (-1 not in shape and known != self.out_dims):
            _fail(p, "prediction_reshaper", shape, f"must reshape out_dims={self.out_dims}")
        return self

    def validate_input_shape(self, shape: Sequence[int], prefix: str = "model.") -> None:
        """Checks that depend on the input (channels-last) shape; called before tracing."""
        if self.backbone_type == "parity_backbone" and len(shape) != 2:
            _fail(
                prefix,
                "backbone_type",
                self.backbone_type,
                f"expects (batch, length) input, got shape {tuple(shape)}",
            )
        if self.variant == "sort" and tuple(shape[1:]) != (self.d_input,):
            _fail(
                prefix,
                "d_input",
                self.d_input,
                f"the sort variant takes (batch, d_input) input, got shape {tuple(shape)}",
            )
        if self.backbone_type in IMAGE_BACKBONES:
            if len(shape) != 4:
                _fail(
                    prefix,
                    "backbone_type",
                    self.backbone_type,
                    f"expects a (batch, H, W, C) image, got shape {tuple(shape)}",
                )
            if self.positional_embedding_type == "custom-rotational-1d":
                _fail(
                    prefix,
                    "positional_embedding_type",
                    "custom-rotational-1d",
                    f"needs a 1-D token sequence; {self.backbone_type} emits a 2-D feature map",
                )
            # The positional-embedding checks below apply to the backbone's output map.
            shape = (shape[0], *self.feature_map_size(shape[1], shape[2]), 0)
        if self.positional_embedding_type in (
            "custom-rotational",
            "learnable-fourier",
            "multi-learnable-fourier",
        ):
            if len(shape) != 4:
                _fail(
                    prefix,
                    "positional_embedding_type",
                    self.positional_embedding_type,
                    f"needs a 2-D feature map (B, H, W, C), got shape {tuple(shape)}",
                )
            height, width = shape[1], shape[2]
            if self.positional_embedding_type == "custom-rotational" and height != width:
                _fail(
                    prefix,
                    "positional_embedding_type",
                    "custom-rotational",
                    f"needs a square feature map, got {height}x{width}",
                )
            if self.positional_embedding_type != "custom-rotational" and min(height, width) < 2:
                _fail(
                    prefix,
                    "positional_embedding_type",
                    self.positional_embedding_type,
                    f"divides by (H-1) and (W-1): needs H, W >= 2, got {height}x{width}",
                )

    def feature_map_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the backbone's output for an H x W image input.

        Every spatial reduction in the image backbones (3x3/2 max-pool with padding 1, 3x3/2 conv
        with padding 1, 1x1/2 conv) maps n to (n - 1) // 2 + 1; a ResNet truncated after k
        hyper-blocks applies it k times (max-pool + layers 2..k), shallow-wide once.
        """
        if self.backbone_type == "shallow-wide":
            halvings = 1
        elif self.backbone_type in RESNET_BACKBONES:
            halvings = int(self.backbone_type.rsplit("-", 1)[1])
        else:
            return height, width
        for _ in range(halvings):
            height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        return height, width

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], prefix: str = "model.") -> CTMConfig:
        """Builds and validates a config from a dict or ml_collections ConfigDict."""
        values = dict(mapping.items()) if hasattr(mapping, "items") else dict(mapping)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{prefix}{unknown[0]} is not a CTM field; allowed: {', '.join(sorted(known))}"
            )
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        ]
        if required:
            raise ConfigError(f"{prefix}{required[0]} is missing (required CTM field)")
        if values.get("prediction_reshaper") is not None:
            values["prediction_reshaper"] = tuple(values["prediction_reshaper"])
        return cls(**values).validate(prefix)

    @classmethod
    def from_reference_kwargs(
        cls, kwargs: Mapping[str, Any], model_class: str = "ContinuousThoughtMachine"
    ) -> CTMConfig:
        """Config from the reference constructor's kwargs; the SORT class forces its overrides."""
        if model_class not in REFERENCE_CLASSES:
            raise ConfigError(
                f"model_class={model_class!r} is invalid: allowed: {', '.join(REFERENCE_CLASSES)}"
            )
        values = dict(kwargs)
        variant = REFERENCE_CLASSES[model_class]
        if variant == "sort":
            # ContinuousThoughtMachineSORT ignores these arguments and forces them.
            values.update(
                heads=0, n_synch_action=0, backbone_type="none", positional_embedding_type="none"
            )
        values["variant"] = variant
        return cls.from_mapping(values, prefix="")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["prediction_reshaper"] = list(self.prediction_reshaper)
        return values
