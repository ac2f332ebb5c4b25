"""Compares the port with reference oracle files (outputs of the reference PyTorch code).

    python -m launch.check_oracle tests/fixtures/oracle_*.npz tests/fixtures/parscale/*.npz

Each file is recognised by its content: CTM oracles hold the reference constructor kwargs and a
`sd/` state dict (checked by `ctm_jax.oracle`: forward, every tracked internal, clamped decays,
the loss the recorded config names and every gradient, rtol 1e-4 / atol 1e-5); ParScale oracles
hold an HF config and logits (checked by `parscale_jax.oracle`). Prints one line per compared
array and exits non-zero when anything is outside its tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import app

from core.errors import DataError
from ctm_jax import oracle as ctm_oracle
from launch import cli
from parscale_jax import oracle as parscale_oracle


def check_file(path: str) -> tuple[bool, list[str]]:
    """(matched, report lines) of one oracle file of either model family."""
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable oracle .npz file ({e})") from None
    if "config_json" in names and any(n.startswith("sd/") for n in names):
        report = ctm_oracle.check_oracle(path)
        return report.ok, report.lines()
    if "config_json" in names and "logits" in names:
        return parscale_oracle.check_oracle(path)
    raise DataError(
        f"{path}: not an oracle file (expected config_json with sd/* CTM weights or ParScale "
        "logits)"
    )


def main(argv: Sequence[str]) -> None:
    cli.start(argv, positional=True)
    files = list(argv[1:])
    if not files:
        raise app.UsageError("give one or more oracle .npz files")
    results = []
    with cli.one_line_errors():
        for path in files:
            ok, lines = check_file(path)
            print("\n".join(lines))
            results.append(ok)
    print(
        f"{sum(results)}/{len(results)} oracle files match "
        f"(CTM rtol {ctm_oracle.RTOL:g}, atol {ctm_oracle.ATOL:g})"
    )
    if not all(results):
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run(main)
