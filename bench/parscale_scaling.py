"""A small parallel-scaling-law experiment on CPU: 3 model sizes x P in {1, 2, 4}.

    python -m bench.parscale_scaling --out=runs/parscale_scaling            # 18 min, quiet CPU
    python -m bench.parscale_scaling --out=runs/ps_2m --tokens=2000000      # about an hour
    python -m bench.parscale_scaling --out=/tmp/ps --tokens=20000           # a smoke run
    python -m launch.fit_scaling_law --runs=runs/parscale_scaling/runs.json

Every run trains the `configs/parscale_lm.py:tiny` architecture (4 layers, 4 heads, 2 KV heads,
48 prefix tokens, byte tokenizer) at one width on the embedded Python-stdlib corpus for the same
token budget, then evaluates on held-out documents. The fit uses the final validation loss and,
as in the paper, N = non-embedding parameters including the ParScale ones (prefixes and
aggregator). Printed: the loss table (size x P), whether the loss falls with P at every size,
and the fitted L = (A / (N (k ln P + 1)))^alpha + E. `runs.json` (in --out) holds one
{N, P, loss, ...} record per run, the input of `python -m launch.fit_scaling_law --runs`.

Runs live in --out/h<width>_p<P>; re-running skips finished runs (and resumes killed ones).
This is not a test: tiny models on a tiny budget give a noisy law; it checks the direction.
At these widths the ParScale parameters are a large share of N (h64, P = 4: +33%, against
~0.2% per stream in the paper), which pulls the fitted k down; `N_backbone` in runs.json is the
P = 1 count for a fit without them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags
from flax.traverse_util import flatten_dict

from configs import parscale_lm
from launch import cli
from parscale_jax import scaling_law
from parscale_jax.convert import abstract_params
from tasks.parscale_lm.task import model_config
from train_lib import trainer

# (hidden_size, intermediate_size): head_dim 16 / 24 / 32 with 4 heads.
SIZES = {"h64": (64, 192), "h96": (96, 288), "h128": (128, 384)}
# Per run. The 9 runs took 18 minutes in all on the quiet 2-core CPU at this budget (cost grows
# with width x P; each run adds ~10 s of compile and data setup); --tokens 2000000 is about an
# hour.
DEFAULT_TOKENS = 600_000

_OUT = flags.DEFINE_string("out", None, "Folder for the runs and runs.json.")
_TOKENS = flags.DEFINE_integer("tokens", DEFAULT_TOKENS, "Tokens per run.")
_SIZES = flags.DEFINE_list("sizes", list(SIZES), f"Subset of {list(SIZES)}, comma-separated.")
_PS = flags.DEFINE_list("ps", ["1", "2", "4"], "Stream counts P, comma-separated.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Sequences per training batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per training sequence.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir of the prepared corpus.")
flags.mark_flags_as_required(["out"])


def non_embedding_params(config) -> int:
    """Parameters except the (tied) embedding table, ParScale's prefixes/aggregator included."""
    flat = flatten_dict(abstract_params(model_config(config.model)))
    return sum(math.prod(v.shape) for k, v in flat.items() if k[0] != "embed_tokens")


def run_config(size: str, p: int, tokens: int, data_dir: str | None, batch: int, seq: int):
    config = parscale_lm.get_config("tiny")
    hidden, intermediate = SIZES[size]
    config.model.update(hidden_size=hidden, intermediate_size=intermediate, parscale_n=p)
    config.task.update(seq_len=seq, data_dir=data_dir)
    steps = max(2, round(tokens / (batch * seq)))
    config.optim.warmup_steps = min(100, steps // 10)
    config.train.update(
        total_steps=steps,
        batch_size=batch,
        log_every=max(1, steps // 10),
        eval_every=steps,  # one evaluation, at the end
        eval_batches=16,
        checkpoint_every=max(1, steps // 4),
        keep_checkpoints=1,
    )
    return config


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    sizes = [s for s in _SIZES.value if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise app.UsageError(f"--sizes: unknown {unknown}; allowed {list(SIZES)}")
    try:
        ps = sorted(int(p) for p in _PS.value)
    except ValueError:
        raise app.UsageError(f"--ps: need integers, got {','.join(_PS.value)!r}") from None
    if len(sizes) * len(ps) < 5 or len(set(ps)) < 2:
        raise app.UsageError("the fit needs at least 5 runs over at least two values of P")
    tokens, batch_size, seq_len = _TOKENS.value, _BATCH_SIZE.value, _SEQ_LEN.value

    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    t0 = time.perf_counter()
    for size in sizes:
        for p in ps:
            config = run_config(size, p, tokens, _DATA_DIR.value, batch_size, seq_len)
            steps = int(config.train.total_steps)
            workdir = out / f"{size}_p{p}"
            print(f"== {size} P={p}: {steps} steps -> {workdir}", flush=True)
            summary = trainer.train_and_evaluate(config, workdir)
            loss = float(summary.eval_metrics["loss"])
            runs.append(
                {
                    "N": non_embedding_params(config),
                    "N_backbone": non_embedding_params(run_config(size, 1, 1, None, 1, 1)),
                    "P": p,
                    "loss": loss,
                    "size": size,
                    "hidden_size": SIZES[size][0],
                    "steps": steps,
                    "tokens": steps * batch_size * seq_len,
                    "workdir": str(workdir),
                }
            )
            (out / "runs.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    minutes = (time.perf_counter() - t0) / 60

    print(f"\nvalidation loss after {runs[0]['tokens']:,} tokens per run ({minutes:.1f} min):")
    print(f"{'size':>6} {'N (P=1)':>10} " + " ".join(f"{'P=' + str(p):>8}" for p in ps))
    monotone = True
    for size in sizes:
        row = [r for r in runs if r["size"] == size]
        losses = [r["loss"] for r in sorted(row, key=lambda r: r["P"])]
        falls = all(b < a for a, b in zip(losses, losses[1:], strict=False))
        monotone &= falls
        cells = " ".join(f"{loss:8.4f}" for loss in losses)
        print(
            f"{size:>6} {row[0]['N']:>10,d} {cells}  {'falls with P' if falls else 'NOT monotone'}"
        )
    print(f"loss falls with P at every size: {monotone}")

    n = [r["N"] for r in runs]
    p_values = [r["P"] for r in runs]
    losses = [r["loss"] for r in runs]
    result = scaling_law.fit(n, p_values, losses)
    print(scaling_law.format_table(result, *scaling_law.load_runs(out / "runs.json")))
    print(f"k = {result.k:.4f} (paper: 0.3935 Stack-V2-Python, 0.3345 Pile)")
    # The same fit with N = the backbone alone: at these widths ParScale's own parameters are a
    # large share of N, which the paper's models (~0.2% per stream) never face.
    backbone = scaling_law.fit([r["N_backbone"] for r in runs], p_values, losses)
    print(f"k = {backbone.k:.4f} with N = backbone parameters only (R2 {backbone.r2:.4f})")
    print(
        json.dumps(
            {"k": result.k, "k_backbone_n": backbone.k, "monotone_in_P": monotone}
            | result.to_dict()
        )
    )


if __name__ == "__main__":
    app.run(main)
