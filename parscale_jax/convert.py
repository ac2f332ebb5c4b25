"""HF Qwen2 / Qwen2-ParScale checkpoints (config.json + *.safetensors) <-> Flax params.

The weight mapping only; `parscale_jax.oracle` checks the port against reference outputs.

Names: `parscale_jax/param_table.py` lists every module once, with its HF tensor name
('model.layers.{i}.self_attn.q_proj.weight' <-> 'layers_{i}/self_attn/q_proj/kernel'); the
ParScale prefixes and aggregator exist only when P > 1, lm_head only when untied. Layouts: torch
Linear weights are (out, in), Flax kernels (in, out); everything else is copied as is.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from core.errors import CheckpointMismatchError
from parscale_jax.config import ParScaleConfig
from parscale_jax.model import ParScaleLM
from parscale_jax.param_table import PARAM_TABLE

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def hf_key(path: tuple[str, ...]) -> str:
    """HF tensor name of a Flax param path (from `parscale_jax.param_table.PARAM_TABLE`)."""
    return PARAM_TABLE.reference_key(path)[0]


def _is_kernel(path: tuple[str, ...]) -> bool:
    return path[-1] == "kernel"


def abstract_params(config: ParScaleConfig) -> dict[str, Any]:
    model = ParScaleLM(config)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def expected_shapes(config: ParScaleConfig) -> dict[str, tuple[int, ...]]:
    return {
        hf_key(path): tuple(reversed(leaf.shape)) if _is_kernel(path) else tuple(leaf.shape)
        for path, leaf in flatten_dict(abstract_params(config)).items()
    }


def params_from_state_dict(
    config: ParScaleConfig, state_dict: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """HF tensors -> Flax params; every missing, unexpected or mis-shaped name is reported."""
    abstract = flatten_dict(abstract_params(config))
    expected = {hf_key(p): p for p in abstract}
    problems = []
    for key in sorted(set(expected) - set(state_dict)):
        shape = abstract[expected[key]].shape
        shape = tuple(reversed(shape)) if _is_kernel(expected[key]) else tuple(shape)
        problems.append(f"missing tensor {key!r} (expected shape {shape})")
    for key in sorted(set(state_dict) - set(expected)):
        if key == "lm_head.weight" and config.tie_word_embeddings:
            # Tied models may still carry a copy of the embedding (torch state_dict() does).
            if np.array_equal(state_dict[key], state_dict.get("model.embed_tokens.weight")):
                continue
            problems.append(
                "tensor 'lm_head.weight' differs from the embedding but the config "
                "says tie_word_embeddings=True"
            )
            continue
        problems.append(f"unexpected tensor {key!r} (shape {tuple(state_dict[key].shape)})")
    flat = {}
    for key, path in expected.items():
        if key not in state_dict:
            continue
        value = np.asarray(state_dict[key])
        if _is_kernel(path):
            value = value.T
        want = tuple(abstract[path].shape)
        if value.shape != want:
            got = tuple(state_dict[key].shape)
            problems.append(
                f"mis-shaped tensor {key!r}: expected "
                f"{tuple(reversed(want)) if _is_kernel(path) else want}, got {got}"
            )
            continue
        flat[path] = jnp.asarray(value, jnp.float32)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not fit its config ({len(problems)} problems):\n  "
            + "\n  ".join(problems)
        )
    return unflatten_dict(flat)


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> HF tensor names and layouts (no lm_head when the head is tied)."""
    return {
        hf_key(path): np.ascontiguousarray(np.asarray(v).T if _is_kernel(path) else np.asarray(v))
        for path, v in flatten_dict(params).items()
    }


# ------------------------------------------------------------------------------------------------
# Files


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: single file or sharded with an index."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.exists():
        index = json.loads(index_path.read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointMismatchError(f"{index_path} has no 'weight_map' dict")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.exists():
                raise CheckpointMismatchError(
                    f"{index_path} names shard {shard!r}, which is missing from {directory}"
                )
            loaded = load_file(str(shard_path))
            stray = sorted(k for k in loaded if weight_map.get(k) != shard)
            if stray:
                raise CheckpointMismatchError(
                    f"shard {shard!r} holds tensors the index places elsewhere: {stray[:5]}"
                )
            tensors.update(loaded)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointMismatchError(f"index lists tensors no shard holds: {missing[:5]}")
        return tensors
    single = directory / SINGLE_FILE
    if single.exists():
        return load_file(str(single))
    raise FileNotFoundError(f"{directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}")


def load_checkpoint(directory: str | os.PathLike) -> tuple[ParScaleConfig, dict[str, Any]]:
    """An HF checkpoint directory -> (config, Flax params)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist")
    config = ParScaleConfig.from_hf(json.loads(config_path.read_text()))
    return config, params_from_state_dict(config, read_safetensors(directory))


def _atomic_write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def save_checkpoint(
    directory: str | os.PathLike,
    config: ParScaleConfig,
    params: Mapping[str, Any],
    max_shard_bytes: int | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> None:
    """Writes config.json + safetensors (sharded with an index past max_shard_bytes).

    `hf_config` (e.g. the config.json the params came from) is written verbatim when given, so an
    import/export round trip reproduces the files' contents.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_from_params(params)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        tmp = directory / f".{SINGLE_FILE}.tmp"
        save_file(shards[0], str(tmp), metadata=metadata)
        os.replace(tmp, directory / SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / f".{name}.tmp"), metadata=metadata)
            os.replace(directory / f".{name}.tmp", directory / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True))
    hf = dict(hf_config) if hf_config is not None else config.to_hf()
    _atomic_write_text(directory / "config.json", json.dumps(hf, indent=2, sort_keys=True))
