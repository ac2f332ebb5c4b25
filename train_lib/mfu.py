"""Model FLOPs utilisation (MFU): achieved *model* FLOP/s over the chip's dense peak.

Convention (PaLM, appendix B; Megatron-LM): the FLOPs are the model's own -- every matmul,
einsum and convolution as 2 x multiply-adds, a training example costing 3 x its forward
(forward + backward) -- with no rematerialisation, no optimiser and no elementwise work counted,
so MFU does not reward recomputation. Tasks report them (`Task.train_flops_per_example`).

The peaks are dense (no 2:4 structured sparsity) per-chip FLOP/s, keyed by what
`jax.devices()[0].device_kind` returns on each chip. TPUs publish bf16 peaks only (their f32
matmuls run as several bf16 passes); NVIDIA's datasheets give bf16 and fp32 (non-tensor core)
figures and print the tensor-core ones *with* sparsity, halved here. On CPU there is no table
entry: `measured_matmul_peak` times an f32 `jnp.dot` on the machine itself.
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp

TERA = 1e12

# chip -> {dtype: dense peak FLOP/s per device (one JAX device = one chip on these)}.
PEAKS: dict[str, dict[str, float]] = {
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
    # /v6e): "Peak compute per chip (bf16)". No f32 figure is published.
    "tpu_v4": {"bfloat16": 275 * TERA},
    "tpu_v5e": {"bfloat16": 197 * TERA},
    "tpu_v5p": {"bfloat16": 459 * TERA},
    "tpu_v6e": {"bfloat16": 918 * TERA},  # Trillium
    # NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 / 1,513 / 1,671 TFLOPS for
    # SXM / PCIe / NVL "with sparsity" (dense: half); FP32 67 / 51 / 60 TFLOPS.
    "h100_sxm": {"bfloat16": 989.5 * TERA, "float32": 67 * TERA},
    "h100_pcie": {"bfloat16": 756.5 * TERA, "float32": 51 * TERA},
    "h100_nvl": {"bfloat16": 835.5 * TERA, "float32": 60 * TERA},
    # NVIDIA H200 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 (SXM) / 1,671 (NVL) TFLOPS
    # with sparsity (dense: half); FP32 67 / 60 TFLOPS. The same GH100 compute as the H100.
    "h200_sxm": {"bfloat16": 989.5 * TERA, "float32": 67 * TERA},
    "h200_nvl": {"bfloat16": 835.5 * TERA, "float32": 60 * TERA},
}

# Normalised TPU device_kind (lower case, no spaces) -> chip. jax reports v5e as 'TPU v5 lite',
# v5p as 'TPU v5', v6e as 'TPU v6 lite'; the marketing names are accepted too. Matched whole:
# 'TPU v4 lite' (v4i) is not a v4.
TPU_KINDS: dict[str, str] = {
    "tpuv4": "tpu_v4",
    "tpuv5lite": "tpu_v5e",
    "tpuv5e": "tpu_v5e",
    "tpuv5": "tpu_v5p",
    "tpuv5p": "tpu_v5p",
    "tpuv6lite": "tpu_v6e",
    "tpuv6e": "tpu_v6e",
}
# NVIDIA device_kind ('NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H100 NVL',
# 'NVIDIA H200', 'NVIDIA H200 NVL', ...): the first pattern found in the normalised name wins,
# so the variants come before the SXM default.
GPU_PATTERNS: tuple[tuple[str, str], ...] = (
    ("h100pcie", "h100_pcie"),
    ("h100nvl", "h100_nvl"),
    ("h100", "h100_sxm"),
    ("h200nvl", "h200_nvl"),
    ("h200", "h200_sxm"),
)
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "f32": "float32"}


def normalise_kind(device_kind: str) -> str:
    """'TPU v5 lite' -> 'tpuv5lite': lower case, spaces, '-' and '_' dropped."""
    return re.sub(r"[\s_\-]+", "", str(device_kind).lower())


def chip_of(device_kind: str) -> str | None:
    """The `PEAKS` key of a `device_kind`, or None for a chip not in the table (CPU, ...)."""
    kind = normalise_kind(device_kind)
    if kind in TPU_KINDS:
        return TPU_KINDS[kind]
    if kind.startswith("tpu"):
        return None
    return next((chip for pattern, chip in GPU_PATTERNS if pattern in kind), None)


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Dense peak FLOP/s of one device of `device_kind` for matmuls in `dtype` ('bfloat16' or
    'float32'), or None when the chip or that dtype's figure is not in the table."""
    chip = chip_of(device_kind)
    if chip is None:
        return None
    return PEAKS[chip].get(_DTYPES.get(str(dtype).lower(), str(dtype)))


def measured_matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of an n x n x n float32 `jnp.dot` on the default backend (2 n^3 FLOPs), best of
    `reps` timed calls after a compile-and-warm-up call."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / max(best, 1e-12)


def mfu(flops_per_step: float, steps_per_s: float, n_devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation as a fraction: flops_per_step x steps_per_s over
    n_devices x peak_per_device (flops_per_step is the whole step, all devices together)."""
    return flops_per_step * steps_per_s / (n_devices * peak_per_device)
