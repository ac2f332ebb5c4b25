"""HF Qwen2 / Qwen2-ParScale checkpoints (config.json + *.safetensors) <-> Flax params.

Dynamic parallel scaling (one backbone, a prefix/aggregator set per P): a checkpoint directory
may hold `streams/P{n}.safetensors` beside its weights, each with the P = n prefixes and
aggregator only (HF names) and, in the file's metadata, `parscale_n`, `parscale_n_tokens`,
`parscale_attn_smooth` and `backbone_sha256` (`backbone_digest` of the backbone it was trained
with). `load_checkpoint(dir, parscale_n=n)` assembles that P: the directory's backbone (its
weights without their own prefixes and aggregator) plus the set; P = 1 is the bare backbone.

The weight mapping only; `parscale_jax.oracle` checks the port against reference outputs.

Names: `parscale_jax/param_table.py` lists every module once, with its HF tensor name
('model.layers.{i}.self_attn.q_proj.weight' <-> 'layers_{i}/self_attn/q_proj/kernel'); the
ParScale prefixes and aggregator exist only when P > 1, lm_head only when untied. Layouts: torch
Linear weights are (out, in), Flax kernels (in, out); everything else is copied as is. With
`model.scan_layers` (not an HF field) the Flax layers are stacked under 'layers' with a leading
layer axis: params go through the per-layer layout on the way in and out
(`model.stack_layer_params` / `unstack_layer_params`), so the files are the same either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from core.errors import CheckpointMismatchError, ConfigError, DataError
from parscale_jax.config import ParScaleConfig
from parscale_jax.model import ParScaleLM, params_for, unstack_layer_params
from parscale_jax.param_table import PARAM_TABLE

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
STREAMS_DIR = "streams"  # per-P prefix/aggregator sets: streams/P{n}.safetensors


def hf_key(path: tuple[str, ...]) -> str:
    """HF tensor name of a Flax param path (from `parscale_jax.param_table.PARAM_TABLE`)."""
    return PARAM_TABLE.reference_key(path)[0]


def _is_kernel(path: tuple[str, ...]) -> bool:
    return path[-1] == "kernel"


def abstract_params(config: ParScaleConfig) -> dict[str, Any]:
    """ShapeDtypeStructs of the model's params (in the layer layout config.scan_layers asks)."""
    model = ParScaleLM(config)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def _per_layer(config: ParScaleConfig) -> ParScaleConfig:
    """The config with unscanned layers: the layout HF names are defined on."""
    return dataclasses.replace(config, scan_layers=False)


def expected_shapes(config: ParScaleConfig) -> dict[str, tuple[int, ...]]:
    return {
        hf_key(path): tuple(reversed(leaf.shape)) if _is_kernel(path) else tuple(leaf.shape)
        for path, leaf in flatten_dict(abstract_params(_per_layer(config))).items()
    }


def params_from_state_dict(
    config: ParScaleConfig, state_dict: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """HF tensors -> Flax params (stacked when config.scan_layers); every missing, unexpected or
    mis-shaped name is reported."""
    abstract = flatten_dict(abstract_params(_per_layer(config)))
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
    return params_for(config, unflatten_dict(flat))


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params (either layer layout) -> HF tensor names and layouts (no lm_head when the
    head is tied)."""
    return {
        hf_key(path): np.ascontiguousarray(np.asarray(v).T if _is_kernel(path) else np.asarray(v))
        for path, v in flatten_dict(unstack_layer_params(params)).items()
    }


# ------------------------------------------------------------------------------------------------
# Files


def checkpoint_directory(directory: str | os.PathLike) -> Path:
    """`directory` as a Path; DataError naming it when it does not exist or is not a folder."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise DataError(f"checkpoint directory {directory} {what}")
    return directory


def _read_json(path: Path, what: str) -> Any:
    """The JSON value of `path`; DataError naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a checkpoint directory as a dict (DataError naming the directory or
    the file when either is missing, or when the file is not a JSON object)."""
    path = checkpoint_directory(directory) / "config.json"
    hf = _read_json(path, "a Hugging Face checkpoint directory needs a config.json")
    if not isinstance(hf, dict):
        raise DataError(
            f"{path} is invalid: expected a JSON object of model fields, got {type(hf).__name__}"
        )
    return hf


def read_config(directory: str | os.PathLike) -> ParScaleConfig:
    """The ParScaleConfig of a checkpoint directory's config.json, every field checked (its
    type too) before anything is traced: ConfigError names the file, the field and the value."""
    hf = read_hf_config(directory)
    return ParScaleConfig.from_hf(hf, source=str(Path(directory) / "config.json"))


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of one .safetensors file; DataError naming it when it cannot be read."""
    try:
        try:
            return load_file(str(path))
        except TypeError:  # numpy has no bfloat16 (most released checkpoints): read via jax
            with safe_open(str(path), framework="flax") as f:
                return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise DataError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {detail}"
        ) from None


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: single file or sharded with an index."""
    directory = checkpoint_directory(directory)
    index_path = directory / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path, "")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise DataError(
                f"{index_path} is invalid: expected a 'weight_map' object of tensor name -> "
                "shard file name"
            )
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise CheckpointMismatchError(
                    f"{index_path} names shard {shard!r}, which is missing from {directory}"
                )
            loaded = _load_safetensors(shard_path)
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
        return _load_safetensors(single)
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    found = f" (it has {', '.join(others[:3])} but no index)" if others else ""
    raise DataError(
        f"{directory} holds no safetensors weights: expected {SINGLE_FILE}, or {INDEX_FILE} "
        f"and its shards{found}"
    )


def is_stream_tensor(name: str) -> bool:
    """True for an HF tensor name of the P-specific weights (prefixes, aggregator)."""
    return name.startswith("model.aggregate_layer.") or name.endswith(
        (".self_attn.prefix_k", ".self_attn.prefix_v")
    )


def backbone_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) of the backbone tensors of an HF state dict (names, dtypes, shapes, bytes),
    the P-specific ones left out: equal digests mean a bit-identical backbone."""
    h = hashlib.sha256()
    for name in sorted(n for n in tensors if not is_stream_tensor(n)):
        value = np.ascontiguousarray(tensors[name])
        h.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def stream_file(directory: str | os.PathLike, parscale_n: int) -> Path:
    return Path(directory) / STREAMS_DIR / f"P{int(parscale_n)}.safetensors"


def available_streams(directory: str | os.PathLike) -> list[int]:
    """The P values a checkpoint directory can serve: 1 (the bare backbone), its own P and
    every streams/P{n}.safetensors."""
    config = read_config(directory)
    found = {1, config.parscale_n}
    folder = Path(directory) / STREAMS_DIR
    if folder.is_dir():
        for path in folder.glob("P*.safetensors"):
            if path.stem[1:].isdigit():
                found.add(int(path.stem[1:]))
    return sorted(found)


def load_checkpoint(
    directory: str | os.PathLike, parscale_n: int | None = None
) -> tuple[ParScaleConfig, dict[str, Any]]:
    """An HF checkpoint directory -> (config, Flax params).

    `parscale_n` (default: the checkpoint's own P) picks the number of streams: the checkpoint's
    own P loads everything; 1 loads the backbone alone (prefixes and aggregator dropped); any
    other P needs `streams/P{n}.safetensors` (see the module docstring), whose backbone digest
    must match this directory's backbone (CheckpointMismatchError otherwise). ConfigError names
    the P values available when the asked one is not.
    """
    directory = checkpoint_directory(directory)
    config = read_config(directory)
    tensors = read_safetensors(directory)
    if parscale_n is None or parscale_n == config.parscale_n:
        return config, params_from_state_dict(config, tensors)
    backbone = {k: v for k, v in tensors.items() if not is_stream_tensor(k)}
    if parscale_n == 1:
        config = dataclasses.replace(config, parscale_n=1)
        return config, params_from_state_dict(config, backbone)
    path = stream_file(directory, parscale_n)
    if not path.is_file():
        have = ", ".join(map(str, available_streams(directory)))
        raise ConfigError(
            f"parscale_n={parscale_n} is not available in {directory}: it has no "
            f"{STREAMS_DIR}/{path.name}; it serves P = {have}"
        )
    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            streams = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no iter)
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise DataError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): "
            f"{' '.join(str(e).split())}"
        ) from None
    try:
        config = dataclasses.replace(
            config,
            parscale_n=int(meta["parscale_n"]),
            parscale_n_tokens=int(meta["parscale_n_tokens"]),
            parscale_attn_smooth=float(meta["parscale_attn_smooth"]),
        ).validate(prefix=f"{path} ")
        digest = meta["backbone_sha256"]
    except (KeyError, ValueError) as e:
        raise CheckpointMismatchError(f"{path} metadata is incomplete or invalid: {e}") from None
    if config.parscale_n != parscale_n:
        raise CheckpointMismatchError(
            f"{path} holds the streams of parscale_n={config.parscale_n}, not {parscale_n}"
        )
    if digest != backbone_digest(backbone):
        raise CheckpointMismatchError(
            f"{path} was trained with another backbone than the one in {directory} (backbone "
            "sha256 differs); export the streams with this base model"
        )
    stray = sorted(k for k in streams if not is_stream_tensor(k))
    if stray:
        raise CheckpointMismatchError(f"{path} holds backbone tensors: {stray[:5]}")
    return config, params_from_state_dict(config, {**backbone, **streams})


def save_streams(
    directory: str | os.PathLike, config: ParScaleConfig, params: Mapping[str, Any]
) -> Path:
    """Writes the prefixes and aggregator of a P > 1 model (`params`) as
    streams/P{P}.safetensors under `directory` (the module docstring's format; the backbone
    digest is of `params`' own backbone); returns the file's path."""
    if config.parscale_n < 2:
        raise ConfigError(f"parscale_n={config.parscale_n} has no streams to save: need P > 1")
    tensors = state_dict_from_params(params)
    meta = {
        "format": "pt",
        "parscale_n": str(config.parscale_n),
        "parscale_n_tokens": str(config.parscale_n_tokens),
        "parscale_attn_smooth": repr(float(config.parscale_attn_smooth)),
        "backbone_sha256": backbone_digest(tensors),
    }
    path = stream_file(directory, config.parscale_n)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v for k, v in tensors.items() if is_stream_tensor(k)}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


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
