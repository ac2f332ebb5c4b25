"""Fit the ParScale parallel scaling law L(N, P) = (A / (N (k ln P + 1)))^alpha + E.

    python -m launch.fit_scaling_law --paper=stack [--plot=fit.png]
    python -m launch.fit_scaling_law --runs=runs.json [--plot=fit.png] [--delta=1e-3]

Exactly one of `--paper` (the paper's final-loss table: stack or pile) and `--runs` (a JSON file:
a list of {N, P, loss} or {"runs": [...]}, as `bench.parscale_scaling` writes) is the data.
Prints a table of observed vs predicted losses and, as the last line, one JSON object with the
fitted constants (and, for a paper table, the published alpha and k and the relative errors).
`--plot` also writes a PNG of loss against N with the fitted curves. The fit itself is
`parscale_jax.scaling_law.fit` (Huber loss on log L, L-BFGS from a grid of starts).

A malformed runs file or a bad `--delta` prints `error: <message>` and exits with status 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from absl import flags

from launch import cli
from parscale_jax import scaling_law

_PAPER = flags.DEFINE_enum(
    "paper", None, sorted(scaling_law.PAPER_FITS), "Fit the paper's loss table."
)
_RUNS = flags.DEFINE_string("runs", None, "JSON file: list of {N, P, loss} or {'runs': [...]}.")
_PLOT = flags.DEFINE_string("plot", None, "Write a PNG of loss vs N with the fitted curves.")
_DELTA = flags.DEFINE_float("delta", scaling_law.DEFAULT_DELTA, "Huber delta.")
flags.mark_flags_as_mutual_exclusive(["paper", "runs"], required=True)


def report(paper: str | None, runs: str | None, plot: str | None, delta: float) -> list[str]:
    """Fits the paper table `paper` or the runs file `runs`; returns the lines to print."""
    if paper:
        N, P, L = scaling_law.paper_table(paper)
    else:
        N, P, L = scaling_law.load_runs(runs)
    result = scaling_law.fit(N, P, L, delta=delta)

    record: dict[str, Any] = result.to_dict()
    record["r2_on"] = "L"
    if paper:
        record["paper"] = paper
        ref = scaling_law.PAPER_FITS[paper]
        record["paper_alpha"], record["paper_k"] = ref["alpha"], ref["k"]
        record["rel_err_alpha"] = result.alpha / ref["alpha"] - 1
        record["rel_err_k"] = result.k / ref["k"] - 1
    else:
        record["runs"] = str(runs)
    if plot:
        title = f"paper table: {paper} (N: non-embedding incl. ParScale)" if paper else str(runs)
        record["plot"] = str(scaling_law.plot_fit(result, N, P, L, plot, title=title))
    return [scaling_law.format_table(result, N, P, L), json.dumps(record)]


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    with cli.one_line_errors():
        lines = report(_PAPER.value, _RUNS.value, _PLOT.value, _DELTA.value)
    print("\n".join(lines))


if __name__ == "__main__":
    cli.run(main)
