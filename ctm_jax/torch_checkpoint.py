"""Read PyTorch `.pt` checkpoints into numpy arrays and plain Python values, safely.

    load_torch_checkpoint("model.pt")  # -> {'model_state_dict': {name: np.ndarray}, 'args': {...}}

Two readers give the same result:

* with torch installed (the optional extra): `torch.load(path, map_location='cpu',
  weights_only=True)` with `argparse.Namespace` and numpy's array/scalar rebuilders allowed;
* without torch: a restricted reader of torch's zip format (torch >= 1.6). Its unpickler resolves
  only an explicit whitelist of globals (OrderedDict, torch's tensor/parameter rebuilders, the
  storage types, argparse.Namespace, numpy array/dtype/scalar rebuilders and `_codecs.encode` for
  protocol-2 bytes); anything else (`os.system`, `subprocess.Popen`, ...) is refused before it is
  called. Storages are read from the zip's `data/<key>` records as little-endian numpy arrays and
  viewed with each tensor's offset, size and stride; bfloat16 becomes float32.

Tensors come back as numpy arrays (copies), `argparse.Namespace` as a dict, OrderedDicts as dicts.
Every failure is a `DataError` whose one-line message names the file and the reason.

`load_safetensors(path)` reads a Hugging Face `model.safetensors` export (a JSON header of
name -> dtype, shape, byte range, then the raw little-endian bytes) the same way: numpy arrays,
bfloat16 as float32, one-line `DataError`s. It needs no torch and runs no code from the file.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import json
import math
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError, DataError

# torch storage class name -> numpy dtype of its elements ('bfloat16' is read as uint16 bits).
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "UntypedStorage": "u1",
}


class _StorageType:
    """Stand-in for a torch storage class named in a persistent id."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage's elements as a flat numpy array (uint16 bit patterns for bfloat16)."""

    def __init__(self, data: np.ndarray, bfloat16: bool) -> None:
        self.data = data
        self.bfloat16 = bfloat16


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 on numpy: a strided view of the storage, copied."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    try:
        offset = int(storage_offset)
        shape = tuple(int(s) for s in size)
        strides = tuple(int(s) for s in stride)
    except (TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"malformed tensor record: {e}") from None
    if len(shape) != len(strides) or offset < 0 or min((*shape, *strides, 0)) < 0:
        raise pickle.UnpicklingError(f"malformed tensor record: size {shape}, stride {strides}")
    data = storage.data
    if 0 in shape:
        out = np.zeros(shape, data.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= data.size:
            raise pickle.UnpicklingError(
                f"tensor of size {shape} (offset {offset}, stride {strides}) needs "
                f"{last + 1} elements but its storage has {data.size}"
            )
        out = np.lib.stride_tricks.as_strided(
            data[offset:],
            shape=shape,
            strides=tuple(s * data.itemsize for s in strides),
            writeable=False,
        ).copy()
    return _bfloat16_to_float32(out) if storage.bfloat16 else out


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> Any:
    return data


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); nothing else is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as (str, 'latin1')")
    return text.encode("latin1")


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ndarray pickle constructor, for plain ndarrays only (state comes from BUILD)."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct is only allowed as (ndarray, (0,), ...)")
    return np.ndarray.__new__(np.ndarray, shape, np.dtype(dtype))


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar is only allowed for plain dtypes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(obj, str):
        raise pickle.UnpicklingError("numpy dtype is only allowed from a type string")
    return np.dtype(obj, align=bool(align), copy=bool(copy))


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): tuple,
    ("argparse", "Namespace"): argparse.Namespace,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numpy_dtype,
    **{
        (m, "_reconstruct"): _numpy_reconstruct
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{(m, "scalar"): _numpy_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"needs unsafe unpickling: global {module}.{name}")


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only whitelisted globals; storages come from the zip's data records."""

    def __init__(self, file: io.BytesIO, read_record: Callable[[str], bytes]) -> None:
        super().__init__(file)
        self._read_record = read_record
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles use Python 2 names (__builtin__, commands, ...); map them back as
        # pickle's own find_class does, so the whitelist and the messages see Python 3 names.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("persistent id names no torch storage type")
        key = str(key)
        if key not in self._storages:
            bfloat16 = storage_type.dtype == "bfloat16"
            dtype = np.dtype("<u2" if bfloat16 else storage_type.dtype)
            raw = self._read_record(f"data/{key}")
            need = int(numel) * dtype.itemsize
            if len(raw) < need:
                raise pickle.UnpicklingError(
                    f"storage record data/{key} has {len(raw)} bytes, needs {need}"
                )
            data = np.frombuffer(raw, dtype=dtype, count=int(numel))
            self._storages[key] = _Storage(data, bfloat16)
        return self._storages[key]


def _plain(value: Any) -> Any:
    """Namespace -> dict, OrderedDict -> dict, recursively through containers."""
    if isinstance(value, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _load_zip(path: Path) -> Any:
    fail = lambda reason: DataError(f"{path}: {reason}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":
        if head[:1] == b"\x80":
            raise fail(
                "legacy (pre-1.6, non-zip) torch serialization is not supported; re-save the "
                "file with torch>=1.6"
            )
        raise fail("not a torch checkpoint (not a zip archive)")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise fail(f"truncated or corrupt zip archive ({e})") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            raise fail("not a torch checkpoint (the zip archive has no <name>/data.pkl record)")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            order = (
                archive.read(prefix + "byteorder").decode()
                if prefix + "byteorder" in names
                else "little"
            )
        except (zipfile.BadZipFile, OSError) as e:
            raise fail(f"truncated or corrupt zip archive ({e})") from None
        if order.strip() != "little":
            raise fail(f"byte order {order.strip()!r} is not supported (little-endian only)")

        def read_record(name: str) -> bytes:
            if prefix + name not in names:
                raise pickle.UnpicklingError(f"record {name} is missing")
            return archive.read(prefix + name)

        try:
            unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), read_record)
            return unpickler.load()
        except _RefusedGlobal as e:
            raise fail(str(e)) from None
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError) as e:
            raise fail(f"truncated or corrupt checkpoint ({e})") from None
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
            raise fail(f"corrupt pickle ({type(e).__name__}: {e})") from None


def _numpy_safe_globals(np_module: Any) -> list[Any]:
    """numpy's pickle rebuilders under their old and new module names, for torch.load."""
    core = np_module._core.multiarray if hasattr(np_module, "_core") else np_module.core.multiarray
    out: list[Any] = [np_module.ndarray, np_module.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(core._reconstruct, f"{module}._reconstruct"), (core.scalar, f"{module}.scalar")]
    dtypes = getattr(np_module, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 builds dtypes through their classes
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


def _load_with_torch(path: Path, torch: Any) -> Any:
    fail = lambda reason: DataError(f"{path}: {reason}")
    allowed = [argparse.Namespace, *_numpy_safe_globals(np)]
    try:
        with torch.serialization.safe_globals(allowed):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        match = re.search(r"GLOBAL ([\w.]+)", str(e))
        if match:
            raise fail(f"needs unsafe unpickling: global {match.group(1)}") from None
        if "Weights only load failed" in str(e):
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            at = next((i for i, ln in enumerate(lines) if "WeightsUnpickler" in ln), -2)
            detail = " ".join(lines[at : at + 2])
            raise fail(
                f"needs unsafe unpickling (torch weights_only refused it: {detail})"
            ) from None
        raise fail(f"truncated or corrupt checkpoint ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise fail(f"truncated or corrupt checkpoint ({str(e).splitlines()[0]})") from None

    def to_numpy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                value = value.float()
            return value.numpy().copy()
        if isinstance(value, dict):
            return {k: to_numpy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [to_numpy(v) for v in value]
        if isinstance(value, tuple):
            return tuple(to_numpy(v) for v in value)
        if isinstance(value, argparse.Namespace):
            return to_numpy(vars(value))
        return value

    return to_numpy(loaded)


def load_torch_checkpoint(path: str | Path, backend: str = "auto") -> dict[str, Any]:
    """A `.pt` file's top-level dict, with numpy arrays for tensors and dicts for Namespaces.

    `backend`: 'torch' (torch.load with weights_only=True), 'numpy' (the torch-free restricted
    reader) or 'auto' (torch when it can be imported). Raises DataError.
    """
    path = Path(path)
    if backend not in ("auto", "torch", "numpy"):
        raise ConfigError(f"backend={backend!r} is invalid: allowed: auto, torch, numpy")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    torch = None
    if backend in ("auto", "torch"):
        try:
            import torch  # noqa: PLC0415 (the optional extra)
        except ImportError:
            if backend == "torch":
                raise DataError(f"{path}: backend 'torch' needs torch installed") from None
    loaded = _load_with_torch(path, torch) if torch is not None else _plain(_load_zip(path))
    if not isinstance(loaded, dict):
        raise DataError(f"{path}: the file holds a {type(loaded).__name__}, not a checkpoint dict")
    return loaded


# safetensors dtype name -> numpy dtype ('BF16' is read as uint16 bits, then widened).
_SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """name -> numpy array (a copy) of a `.safetensors` file; `__metadata__` is skipped.

    Every entry's dtype, shape and byte range are checked against the file before it is read.
    Raises DataError.
    """
    path = Path(path)
    fail = lambda reason: DataError(f"{path}: {reason}")
    if not path.is_file():
        raise fail("no such file")
    data = path.read_bytes()
    if len(data) < 8:
        raise fail("not a safetensors file (shorter than its 8-byte header length)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise fail(f"not a safetensors file (header length {size} exceeds the file)")
    try:
        header = json.loads(data[8 : 8 + size])
        assert isinstance(header, dict), "the header is not a JSON object"
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError) as e:
        raise fail(f"not a safetensors file (unreadable header: {e})") from None
    body = memoryview(data)[8 + size :]
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            shape = tuple(int(n) for n in entry["shape"])
            start, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise fail(f"tensor {name!r} has a malformed header entry ({e!r})") from None
        need = math.prod(shape) * dtype.itemsize
        if min((*shape, start, 0)) < 0 or end - start != need or end > len(body):
            raise fail(
                f"tensor {name!r} ({entry['dtype']} {list(shape)}) needs {need} bytes but its "
                f"byte range is [{start}, {end}) of {len(body)}"
            )
        value = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).copy()
        out[name] = _bfloat16_to_float32(value) if entry["dtype"] == "BF16" else value
    return out
