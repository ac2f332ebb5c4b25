"""Featurisers that turn the raw input into a channels-last feature map before kv projection.

The reference's modified ResNets and `shallow-wide` arrive with the maze issue; here are the
identity backbone and the parity embedding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class ParityBackbone(nn.Module):
    """Embedding(2, d) indexed by (x == 1): (B, L) of +-1 -> (B, L, d)."""

    d_embedding: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        embed = nn.Embed(
            2, self.d_embedding, embedding_init=nn.initializers.normal(1.0), name="embedding"
        )
        return embed((x == 1).astype(jnp.int32))


def make_backbone(backbone_type: str, d_input: int) -> nn.Module | None:
    """The backbone module for `backbone_type`, or None for the identity."""
    if backbone_type == "parity_backbone":
        return ParityBackbone(d_input, name="backbone")
    if backbone_type == "none":
        return None
    raise ValueError(f"unknown backbone_type {backbone_type!r}")
