"""What checkpoint checksums cost: save and restore of a preset's train state with and without.

    python -m bench.checkpoint_checksums [--config=configs/ctm_maze.py:cpu] [--reps=5]

Builds the preset's train state (params, Adam moments, data iterator, config JSON), then times
(median of --reps, each save waited for until committed):
* a save without checksums, a save with them, and the SHA-256 pass over the files alone (the
  post-finalisation callback's work, in Orbax's background thread: training overlaps it unless
  the next save comes first);
* the verification before a restore (`Checkpointer.verify`: reads and hashes every file) and the
  restore itself.
Prints the checkpoint's size, the times and the ratios checksum/save and verify/restore.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from launch import cli
from train_lib import checkpoint_integrity, checkpointing, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/ctm_maze.py:cpu", "Preset whose train state is saved.", lock_config=True
)
_REPS = flags.DEFINE_integer("reps", 5, "Timed saves/restores per measurement.", lower_bound=1)


def _median_seconds(fn: Callable[[int], None], reps: int) -> float:
    times = []
    for rep in range(reps):
        start = time.perf_counter()
        fn(rep)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    exp = trainer.build_experiment(_CONFIG.value)
    with jax.set_mesh(exp.mesh):
        state = jax.jit(exp.init, out_shardings=exp.state_shardings)(jax.random.key(0))
    train_iter = iter(exp.dataset("train").to_iter_dataset())
    meta = trainer.checkpoint_meta(exp, 0, {})
    target = checkpointing.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    reps = _REPS.value
    try:
        times = {}
        for checksums in (False, True):
            directory = root / ("with" if checksums else "without")
            with checkpointing.Checkpointer(
                directory, save_every=1, keep=reps + 1, async_save=False, checksums=checksums
            ) as ckpt:
                save = lambda rep, ckpt=ckpt: ckpt.save(
                    rep + 1, state, train_iter, meta, force=True
                )
                times["save_with" if checksums else "save_without"] = _median_seconds(save, reps)
                if checksums:
                    verify = lambda rep, ckpt=ckpt: ckpt.verify(rep + 1)
                    restore = lambda rep, ckpt=ckpt: jax.block_until_ready(
                        ckpt.restore(rep + 1, target, None)[0]
                    )
                    times["verify"] = _median_seconds(verify, reps)
                    times["restore"] = _median_seconds(restore, reps)
        # The pass the post-finalisation callback makes, timed alone (save times are noisy).
        spare = root / "without" / "1"
        times["write_checksums"] = _median_seconds(
            lambda rep: checkpoint_integrity.write_checksums(epath.Path(spare)), reps
        )
        step_dir = root / "with" / "1"
        files = [p for p in step_dir.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    checksum = times["write_checksums"]
    print(f"checkpoint: {size / 2**20:.2f} MiB in {len(files)} files")
    print(f"save without checksums: {times['save_without'] * 1e3:8.1f} ms")
    print(f"save with checksums:    {times['save_with'] * 1e3:8.1f} ms")
    print(
        f"writing checksums.json: {checksum * 1e3:8.1f} ms "
        f"(= {checksum / times['save_without']:.1%} of a save without)"
    )
    print(f"verify before restore:  {times['verify'] * 1e3:8.1f} ms")
    print(
        f"restore:                {times['restore'] * 1e3:8.1f} ms "
        f"(verify = {times['verify'] / times['restore']:.1%} of it)"
    )
    print(f"hash throughput:        {size / times['verify'] / 2**20:8.1f} MiB/s")


if __name__ == "__main__":
    app.run(main)
