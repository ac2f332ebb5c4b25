"""Write small reference-style CTM `.pt` checkpoints with stock PyTorch (for the import tests).

    .venv-torch/bin/python tools/torch_reference/make_ctm_checkpoint.py [--out DIR]
    .venv/bin/python tools/torch_reference/make_ctm_checkpoint.py --export-maze-source

The first form (torch environment) writes into --out:
  parity.pt      the reference's training-checkpoint layout ({'model_state_dict',
                 'optimizer_state_dict', 'scheduler_state_dict', 'scaler_state_dict', 'iteration',
                 metrics lists of numpy floats/arrays, 'args' (argparse.Namespace), torch / numpy /
                 python RNG states}) around the state dict of tests/fixtures/oracle_parity.npz;
  maze.pt        the maze analysis layout ({'state_dict', 'args'}) around the state dict in
                 tests/fixtures/ctm_pt/maze_source.npz, with the args of an older run (no
                 neuron_select_type / n_random_pairing_self: the importer must patch them);
  linear.pt      a bare state dict of torch.nn.Linear(4, 3): a torch file that is not a CTM;
  tensor_zoo.pt  tensors of every supported dtype, views with offsets and strides, shared
                 storages, a Parameter, numpy values and a Namespace (tests rebuild the values).
The second form (main environment, with jax) regenerates maze_source.npz: the state dict of a
small randomly initialised maze CTM, exported with ctm_jax.convert.export_state_dict, plus the
reference training args as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PARITY_ORACLE = REPO / "tests" / "fixtures" / "oracle_parity.npz"
MAZE_SOURCE = REPO / "tests" / "fixtures" / "ctm_pt" / "maze_source.npz"

# Reference tasks/mazes/train.py arguments of a small CPU run (older run: the parser did not have
# neuron_select_type / n_random_pairing_self yet, so first-last is implied).
MAZE_ARGS = dict(
    model="ctm",
    d_model=32,
    dropout=0.0,
    backbone_type="none",
    d_input=8,
    heads=2,
    iterations=3,
    positional_embedding_type="none",
    synapse_depth=2,
    n_synch_out=8,
    n_synch_action=4,
    memory_length=3,
    deep_memory=True,
    memory_hidden_dims=2,
    dropout_nlm=None,
    do_normalisation=False,
    num_layers=2,
    maze_route_length=50,
    cirriculum_lookahead=5,
    expand_range=True,
    batch_size=16,
    batch_size_test=64,
    lr=1e-4,
    training_iterations=100001,
    warmup_steps=5000,
    use_scheduler=True,
    scheduler_type="cosine",
    milestones=[8000, 15000, 20000],
    gamma=0.1,
    weight_decay=0.0,
    weight_decay_exclusion_list=[],
    gradient_clipping=-1,
    dataset="mazes-small",
    data_root="data/mazes",
    seed=412,
    log_dir="logs/mazes_small",
    device=[-1],
    use_amp=False,
    out_dims=250,
)

# Reference tasks/parity/train.py arguments matching oracle_parity.npz's constructor kwargs.
PARITY_ARGS = dict(
    model_type="ctm",
    parity_sequence_length=16,
    d_model=48,
    d_input=16,
    synapse_depth=1,
    heads=4,
    n_synch_out=8,
    n_synch_action=6,
    neuron_select_type="random",
    n_random_pairing_self=0,
    iterations=8,
    memory_length=4,
    deep_memory=True,
    memory_hidden_dims=3,
    dropout=0.0,
    do_normalisation=False,
    positional_embedding_type="custom-rotational-1d",
    backbone_type="parity_backbone",
    batch_size=64,
    batch_size_test=256,
    lr=1e-4,
    training_iterations=50001,
    warmup_steps=500,
    use_scheduler=True,
    scheduler_type="cosine",
    milestones=[8000, 15000, 20000],
    gamma=0.1,
    weight_decay=0.0,
    gradient_clipping=0.9,
    use_most_certain_with_lstm=False,
    log_dir="logs/parity",
    dataset="parity",
    save_every=1000,
    seed=42,
    out_dims=32,
    use_most_certain=True,
)
PARITY_ITERATION = 1500


def export_maze_source() -> None:
    """Main environment: a random small maze CTM -> maze_source.npz (sd/<key> + args JSON)."""
    sys.path.insert(0, str(REPO))
    import jax  # noqa: PLC0415

    from ctm_jax.config import CTMConfig  # noqa: PLC0415
    from ctm_jax.convert import export_state_dict  # noqa: PLC0415
    from ctm_jax.model import CTM  # noqa: PLC0415

    a = MAZE_ARGS
    config = CTMConfig.from_reference_kwargs(
        dict(
            iterations=a["iterations"],
            d_model=a["d_model"],
            d_input=a["d_input"],
            heads=a["heads"],
            n_synch_out=a["n_synch_out"],
            n_synch_action=a["n_synch_action"],
            synapse_depth=a["synapse_depth"],
            memory_length=a["memory_length"],
            deep_nlms=a["deep_memory"],
            memory_hidden_dims=a["memory_hidden_dims"],
            do_layernorm_nlm=a["do_normalisation"],
            backbone_type=a["backbone_type"],
            positional_embedding_type=a["positional_embedding_type"],
            out_dims=a["out_dims"],
            prediction_reshaper=[a["maze_route_length"], 5],
            dropout=a["dropout"],
            dropout_nlm=a["dropout_nlm"],
            neuron_select_type="first-last",
            n_random_pairing_self=0,
        )
    )
    variables = CTM(config).init({"params": jax.random.key(3)}, np.zeros((1, 15, 15, 3)))
    state = export_state_dict(config, variables)
    # Decay params start at zero; make them distinct so a mix-up cannot pass.
    rng = np.random.default_rng(0)
    for key in ("decay_params_action", "decay_params_out"):
        state[key] = rng.uniform(0, 3, state[key].shape).astype(np.float32)
    MAZE_SOURCE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        MAZE_SOURCE,
        args_json=np.array(json.dumps(a)),
        **{f"sd/{k}": np.asarray(v) for k, v in state.items()},
    )
    print(f"wrote {MAZE_SOURCE} ({MAZE_SOURCE.stat().st_size} bytes)")


def _state_dict(npz: Path):
    import torch  # noqa: PLC0415

    with np.load(npz) as z:
        return {k[3:]: torch.from_numpy(np.array(z[k])) for k in z.files if k.startswith("sd/")}


def _optimizer_state(state_dict) -> tuple[dict, dict]:
    """A real AdamW (and LambdaLR) state after two steps on the float tensors."""
    import torch  # noqa: PLC0415

    params = [torch.nn.Parameter(v.clone()) for v in state_dict.values() if v.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda step: 1.0)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return opt.state_dict(), sched.state_dict()


def write_all(out: Path) -> None:
    import torch  # noqa: PLC0415

    tmp = Path(tempfile.mkdtemp(prefix=".ctm_pt_", dir=out.parent))
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)

    # parity.pt: the training-checkpoint layout.
    sd = _state_dict(PARITY_ORACLE)
    opt_state, sched_state = _optimizer_state(sd)
    torch.save(
        {
            "model_state_dict": sd,
            "optimizer_state_dict": opt_state,
            "scheduler_state_dict": sched_state,
            "scaler_state_dict": {},
            "iteration": PARITY_ITERATION,
            "train_losses": [np.float64(0.69), np.float64(0.51)],
            "test_losses": [np.float64(0.7)],
            "train_accuracies": [np.linspace(0, 1, 8).reshape(2, 4)],
            "test_accuracies": [],
            "train_accuracies_most_certain": [np.float64(0.5)],
            "test_accuracies_most_certain": [np.float64(0.5)],
            "iters": [0, 1000],
            "args": argparse.Namespace(**PARITY_ARGS),
            "torch_rng_state": torch.get_rng_state(),
            "numpy_rng_state": np.random.get_state(),
            "random_rng_state": random.getstate(),
        },
        tmp / "parity.pt",
    )

    # maze.pt: the analysis layout with an older run's args.
    with np.load(MAZE_SOURCE) as z:
        maze_args = json.loads(str(z["args_json"]))
    torch.save(
        {"state_dict": _state_dict(MAZE_SOURCE), "args": argparse.Namespace(**maze_args)},
        tmp / "maze.pt",
    )

    # linear.pt: a torch file that is not a CTM.
    torch.save(torch.nn.Linear(4, 3).state_dict(), tmp / "linear.pt")

    # tensor_zoo.pt: values the tests rebuild with numpy.
    base = torch.arange(10, dtype=torch.float32)
    torch.save(
        {
            "f64_view": torch.arange(24, dtype=torch.float64).reshape(4, 6)[1:, ::2],
            "f32_transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
            "f16": torch.tensor([-1.5, 0.0, 2.25], dtype=torch.float16),
            "bf16": torch.tensor([-2.0, 0.5, 3.0, 1 / 128], dtype=torch.bfloat16),
            "i64_scalar": torch.tensor(7),
            "i32_offset": torch.arange(5, dtype=torch.int32)[2:],
            "i16": torch.tensor([-300, 300], dtype=torch.int16),
            "i8": torch.tensor([-3, 4], dtype=torch.int8),
            "u8": torch.arange(4, dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 3),
            "shared_a": base[:4],
            "shared_b": base[4:].view(3, 2),
            "param": torch.nn.Parameter(torch.tensor([1.0, 2.0])),
            "namespace": argparse.Namespace(a=1, b=[1, 2], c="x", d=None),
            "np_scalar": np.float64(0.25),
            "np_array": np.arange(3, dtype=np.int16),
            "np_object": np.array(["a", 1], dtype=object),
            "tuple": (1, "a", None, 2.5),
            "bytes": b"\x00\xff",
            "set": {1, 2},
        },
        tmp / "tensor_zoo.pt",
    )

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    for path in sorted(out.iterdir()):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "torch_reference" / "ctm_pt")
    parser.add_argument("--export-maze-source", action="store_true")
    args = parser.parse_args()
    if args.export_maze_source:
        export_maze_source()
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_all(args.out.resolve())


if __name__ == "__main__":
    main()
