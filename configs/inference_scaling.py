"""Inference-time scaling runs.

    python -m launch.scale_inference --config=configs/inference_scaling.py:PRESET
    python -m launch.frontier --task=maze|arith   (the frontier-maze / frontier-arith presets)

Presets:
  maze   the `make demo` maze CTM (runs/maze_demo) at T = 4, 8, 16 ticks, N = 8 samples with
         dihedral test-time augmentation, sequential rounds with the verifier-located first error
  arith  the arithmetic ParScale LMs (runs/arith_lm: one backbone, P = 1, 2, 4) sampled at
         temperature 0.8, N = 8, sequential rounds with exclusion of the wrong answers so far
  test   a tiny randomly initialised maze CTM, a few mazes, N = 4: seconds, for the test suite

Every field can be overridden, e.g. `--config.n=16 --config.out=runs/is_maze16`.
"""

from __future__ import annotations

import ml_collections

PRESETS = {
    "maze": {
        "top": dict(task="maze", out="runs/inference_scaling/maze", n=8, instances_per_level=64),
        "task_options": dict(criterion="solved"),
        "levels": "side11-len1-10,side11-len11-20,side11-len21-32",
        "model": dict(
            kind="ctm_maze",
            workdir="runs/maze_demo",
            ticks="4,8,16",
            exit_thresholds="",
            diversity="dihedral",
            temperature=1.0,
            tick="most_certain",
        ),
        "sequential": dict(rounds=4, feedback="F3"),
    },
    "arith": {
        "top": dict(
            task="arithmetic", out="runs/inference_scaling/arith", n=8, instances_per_level=100
        ),
        "task_options": dict(),
        "levels": "add:1,add:2,add:3",
        "model": dict(
            kind="lm",
            workdir="runs/arith_lm",
            streams="1,2,4",
            temperature=0.8,
            top_k=0,
            top_p=1.0,
            max_new_tokens=8,
        ),
        "sequential": dict(rounds=4, feedback="F2"),
    },
    # launch.frontier --task=maze: ticks (fixed and certainty exit), P-stream CTMs, samples, rounds
    "frontier-maze": {
        "top": dict(task="maze", out="runs/frontier/maze", n=8, instances_per_level=64),
        "task_options": dict(criterion="solved"),
        "levels": "side11-len1-10,side11-len11-20,side11-len21-32",
        "model": dict(
            kind="ctm_maze",
            workdir="runs/maze_demo",
            ticks="2,4,8,16",
            exit_thresholds="0.8,0.9,0.95",
            diversity="dihedral",
            temperature=1.0,
            tick="most_certain",
            stream_workdirs="2:runs/maze_p2,4:runs/maze_p4",
        ),
        "sequential": dict(rounds=4, feedback="F3"),
    },
    # launch.frontier --task=arith: P = 1, 2, 4 streams on one backbone, samples, rounds
    "frontier-arith": {
        "top": dict(task="arithmetic", out="runs/frontier/arith", n=8, instances_per_level=100),
        "task_options": dict(),
        "levels": "add:1,add:2,add:3",
        "model": dict(
            kind="lm",
            workdir="runs/arith_lm",
            streams="1,2,4",
            temperature=0.8,
            top_k=0,
            top_p=1.0,
            max_new_tokens=8,
            stream_workdirs="2:runs/arith_p2_export,4:runs/arith_p4_export",
        ),
        "sequential": dict(rounds=4, feedback="F2"),
    },
    "test": {
        "top": dict(
            task="maze",
            out="runs/inference_scaling/test",
            n=4,
            instances_per_level=3,
            batch_size=16,
        ),
        "task_options": dict(criterion="solved"),
        "levels": "side11-len1-10,side11-len11-20",
        "model": dict(
            kind="ctm_maze_random",
            workdir="",
            ticks="2",
            exit_thresholds="0.5",
            diversity="dihedral+temperature",
            temperature=1.0,
            tick="most_certain",
        ),
        "sequential": dict(rounds=3, feedback="F3"),
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "maze"
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} for configs/inference_scaling.py; use one of "
            f"{', '.join(PRESETS)}"
        )
    values = PRESETS[preset]
    config = ml_collections.ConfigDict()
    config.task = "maze"  # verifiable task: maze | arithmetic | parity | sat | tsp
    config.levels = ""  # comma-separated difficulty levels of the task (its `levels`)
    config.instances_per_level = 64  # instances generated per level (same for every config)
    config.n = 8  # N: samples per instance (every k <= N of the curves comes from these)
    config.seed = 0  # root of every key: instances, samples, tie-breaks, bootstrap
    config.batch_size = 64  # (instance, repeat) pairs per jitted model call
    config.out = "runs/inference_scaling"  # samples.jsonl, summary.json and figures go here
    config.ks = ""  # k values of the curves (comma-separated); "" = 1, 2, 4, ..., N
    config.task_options = ml_collections.ConfigDict()  # passed to the task, e.g. criterion
    config.model = ml_collections.ConfigDict(
        dict(
            kind="ctm_maze",  # ctm_maze (a trained maze workdir) | ctm_maze_random | lm
            workdir="",  # the trained run (ctm_maze) or exported LM directory (lm)
            ticks="",  # CTM: tick counts T to sweep (comma-separated); "" = as trained
            exit_thresholds="",  # CTM: certainty-exit thresholds to sweep ("" = fixed T only)
            diversity="dihedral",  # CTM: dihedral | temperature | dihedral+temperature | none
            temperature=1.0,  # sampling temperature (CTM action distributions; LM tokens)
            tick="most_certain",  # CTM read-out tick: most_certain | last
            # P-stream runs of their own ('P:dir,P:dir'): CTM maze workdirs at the trained T;
            # for the LM, exports of P-stream LMs trained from scratch
            stream_workdirs="",
            streams="1",  # LM: stream counts P to sweep (comma-separated)
            top_k=0,  # LM: top-k filter (0 = off)
            top_p=1.0,  # LM: nucleus filter (1 = off)
            max_new_tokens=8,  # LM: answer length budget
        )
    )
    config.sequential = ml_collections.ConfigDict(
        dict(
            rounds=4,  # R: retries per instance (0 = no sequential run)
            # F0 re-sample | F1 "incorrect" | F2 wrong answers so far | F3 verifier's first error
            feedback="F3",
        )
    )
    top = dict(values["top"])
    config.update(top)
    config.levels = values["levels"]
    config.task_options.update(values["task_options"])
    config.model.update(values["model"])
    config.sequential.update(values["sequential"])
    return config
