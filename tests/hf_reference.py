"""Where the transformers reference outputs for the Qwen2 tests live (not a test module itself).

`make torch-reference` regenerates them with stock PyTorch/transformers into
`build/torch_reference/<name>/`; copies committed under `tests/fixtures/hf_qwen2/<name>/` let the
suite run without that second environment. Each directory is a Hugging Face checkpoint
(config.json, safetensors, tokenizer.json) plus `outputs.npz`; see
tools/torch_reference/make_qwen2_reference.py for what the arrays mean.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO / "build" / "torch_reference"
FIXTURE_DIR = REPO / "tests" / "fixtures" / "hf_qwen2"
# (a) tied embeddings, GQA, rope_theta 1e4, single-file checkpoint, transformers-5 config.json;
# (b) untied LM head, MHA, rope_theta 1e6, sharded checkpoint, transformers-4.x style config.json.
REFERENCE_NAMES = ("tied_gqa", "untied_mha")


def reference_dir(name: str) -> Path:
    """Checkpoint + outputs directory for reference model `name`.

    Order: `$HF_REFERENCE_DIR/<name>` if that variable is set (no fallback, so a wrong path fails
    loudly), else a freshly generated `build/torch_reference/<name>`, else the committed fixture.
    """
    override = os.environ.get("HF_REFERENCE_DIR")
    candidates = [Path(override) / name] if override else [BUILD_DIR / name, FIXTURE_DIR / name]
    for path in candidates:
        # outputs.npz is written last, and the generator renames whole trees into place, so its
        # presence means the directory is complete.
        if (path / "outputs.npz").is_file():
            return path
    raise FileNotFoundError(
        f"no reference outputs for {name!r} in {[str(p) for p in candidates]}; "
        "run `make torch-reference`"
    )


def load_outputs(name: str) -> dict[str, np.ndarray]:
    """All arrays of `<reference_dir(name)>/outputs.npz`; strings come back as 0-d str arrays."""
    with np.load(reference_dir(name) / "outputs.npz") as z:
        return {key: z[key] for key in z.files}
