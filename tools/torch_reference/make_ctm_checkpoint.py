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
                 storages, a Parameter, numpy values and a Namespace (tests rebuild the values);
  imagenet.pt    the layout of the released ImageNet checkpoint (ctm_imagenet_D=4096_T=50_M=25.pt:
                 the distributed image-classification training script's dict with AMP scaler
                 state and its full argparse Namespace, dataset 'imagenet', out_dims 1000) at
                 tiny sizes (resnet18-1, D 32): `imagenet_state_dict`, written from the reference
                 key layout below independently of ctm_jax's parameter table.
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

# The distributed image-classification training script's arguments, with the released ImageNet
# run's values where they do not set a size (dataset, selection, dropouts, optimiser, AMP) and
# tiny sizes otherwise (the release: D 4096, d_input 1024, 16 heads, T 50, M 25, H 64, synapse
# depth 8, 8196 / 2048 synchronised neurons, 32 self pairs, resnet152-4).
IMAGENET_ARGS = dict(
    model="ctm",
    d_model=32,
    dropout=0.2,
    backbone_type="resnet18-1",
    d_input=16,
    heads=2,
    iterations=3,
    positional_embedding_type="none",
    synapse_depth=3,
    n_synch_out=12,
    n_synch_action=8,
    neuron_select_type="random-pairing",
    n_random_pairing_self=2,
    memory_length=4,
    deep_memory=True,
    memory_hidden_dims=2,
    dropout_nlm=0.0,
    do_normalisation=False,
    num_layers=2,
    batch_size=64,
    batch_size_test=64,
    lr=5e-4,
    training_iterations=500001,
    warmup_steps=10000,
    use_scheduler=True,
    scheduler_type="cosine",
    milestones=[8000, 15000, 20000],
    gamma=0.1,
    weight_decay=0.0,
    weight_decay_exclusion_list=[],
    gradient_clipping=20.0,
    num_workers_train=8,
    use_custom_sampler=False,
    do_compile=False,
    log_dir="logs/imagenet",
    dataset="imagenet",
    data_root="data/",
    save_every=1000,
    seed=412,
    reload=True,
    reload_model_only=False,
    strict_reload=True,
    ignore_metrics_when_reloading=False,
    track_every=1000,
    n_test_batches=20,
    plot_indices=[0],
    use_amp=True,
    out_dims=1000,
)
IMAGENET_ITERATION = 2000
# ResNet depth -> (bottleneck?, blocks per hyper-block), torchvision's table.
_RESNETS = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 4, 36, 3)),  # the reference's layer-2 depth, not torchvision's 8
}


def _batchnorm(prefix: str, width: int) -> dict[str, tuple]:
    return {
        f"{prefix}.weight": (width,),
        f"{prefix}.bias": (width,),
        f"{prefix}.running_mean": (width,),
        f"{prefix}.running_var": (width,),
        f"{prefix}.num_batches_tracked": (),
    }


def _resnet_layout(backbone_type: str) -> tuple[dict[str, tuple], int]:
    """(key -> shape of the reference's truncated torchvision ResNet, output channels)."""
    name, k = backbone_type.split("-")
    bottleneck, blocks = _RESNETS[int(name.removeprefix("resnet"))]
    expansion = 4 if bottleneck else 1
    shapes = {"backbone.conv1.weight": (64, 3, 3, 3), **_batchnorm("backbone.bn1", 64)}
    channels = 64
    for layer in range(int(k)):
        width = 64 * 2**layer
        for block in range(blocks[layer]):
            p = f"backbone.layer{layer + 1}.{block}"
            if bottleneck:
                convs = [(width, channels, 1), (width, width, 3), (width * 4, width, 1)]
            else:
                convs = [(width, channels, 3), (width, width, 3)]
            for i, (out, inp, size) in enumerate(convs, start=1):
                shapes[f"{p}.conv{i}.weight"] = (out, inp, size, size)
                shapes.update(_batchnorm(f"{p}.bn{i}", out))
            if block == 0 and (layer > 0 or channels != width * expansion):
                shapes[f"{p}.downsample.0.weight"] = (width * expansion, channels, 1, 1)
                shapes.update(_batchnorm(f"{p}.downsample.1", width * expansion))
            channels = width * expansion
    return shapes, channels


def imagenet_layout(args: dict) -> dict[str, tuple]:
    """Key -> shape of the reference ImageNet CTM's state dict (ResNet trunk, U-Net synapses,
    deep NLMs, random-pairing synchronisation), written from the reference's module layout."""
    d, dm, m, h = (
        args["d_input"],
        args["d_model"],
        args["memory_length"],
        args["memory_hidden_dims"],
    )
    n_out, n_act = args["n_synch_out"], args["n_synch_action"]  # random-pairing: one per neuron
    widths = [int(w) for w in np.linspace(dm, 16, args["synapse_depth"])]
    shapes, channels = _resnet_layout(args["backbone_type"])
    shapes.update(
        {
            "initial_rgb.weight": (3, 3, 1, 1),
            "initial_rgb.bias": (3,),
            "kv_proj.0.weight": (d, channels),
            "kv_proj.0.bias": (d,),
            "kv_proj.1.weight": (d,),
            "kv_proj.1.bias": (d,),
            "q_proj.weight": (d, n_act),
            "q_proj.bias": (d,),
            "attention.in_proj_weight": (3 * d, d),
            "attention.in_proj_bias": (3 * d,),
            "attention.out_proj.weight": (d, d),
            "attention.out_proj.bias": (d,),
            "synapses.first_projection.0.weight": (widths[0], d + dm),
            "synapses.first_projection.0.bias": (widths[0],),
            "synapses.first_projection.1.weight": (widths[0],),
            "synapses.first_projection.1.bias": (widths[0],),
            "trace_processor.0.0.w1": (m, 2 * h, dm),
            "trace_processor.0.0.b1": (1, dm, 2 * h),
            "trace_processor.0.0.T": (1,),
            "trace_processor.0.2.w1": (h, 2, dm),
            "trace_processor.0.2.b1": (1, dm, 2),
            "trace_processor.0.2.T": (1,),
            "start_activated_state": (dm,),
            "start_trace": (dm, m),
            "decay_params_out": (n_out,),
            "decay_params_action": (n_act,),
            "out_neuron_indices_left": (n_out,),
            "out_neuron_indices_right": (n_out,),
            "action_neuron_indices_left": (n_act,),
            "action_neuron_indices_right": (n_act,),
            "output_projector.0.weight": (args["out_dims"], n_out),
            "output_projector.0.bias": (args["out_dims"],),
        }
    )
    for i in range(len(widths) - 1):
        wide, narrow = widths[i], widths[i + 1]
        shapes.update(
            {
                f"synapses.down_projections.{i}.1.weight": (narrow, wide),
                f"synapses.down_projections.{i}.1.bias": (narrow,),
                f"synapses.down_projections.{i}.2.weight": (narrow,),
                f"synapses.down_projections.{i}.2.bias": (narrow,),
                f"synapses.up_projections.{i}.1.weight": (wide, narrow),
                f"synapses.up_projections.{i}.1.bias": (wide,),
                f"synapses.up_projections.{i}.2.weight": (wide,),
                f"synapses.up_projections.{i}.2.bias": (wide,),
                f"synapses.skip_lns.{i}.weight": (wide,),
                f"synapses.skip_lns.{i}.bias": (wide,),
            }
        )
    return shapes


def imagenet_state_dict(args: dict = IMAGENET_ARGS, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values in the layout of `imagenet_layout(args)` that make a well-behaved model:
    weights U(+-1/sqrt(fan_in)), norms near 1, positive BatchNorm variances, NLM temperatures 1,
    decays in [0, 3], index buffers in [0, D) whose first n_random_pairing_self pairs are self
    pairs (as the reference draws them)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key, shape in imagenet_layout(args).items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = np.array(IMAGENET_ITERATION, np.int64)
        elif "indices" in key:
            out[key] = rng.integers(0, args["d_model"], shape).astype(np.int64)
        elif leaf == "T":
            out[key] = np.ones(shape, np.float32)
        elif key.startswith("decay_params"):
            out[key] = rng.uniform(0, 3, shape).astype(np.float32)
        elif leaf in ("running_var",) or (leaf == "weight" and len(shape) == 1):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            bound = 1 / np.sqrt(max(fan_in, 1))
            out[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    k = args["n_random_pairing_self"]
    for which in ("out", "action"):
        out[f"{which}_neuron_indices_right"][:k] = out[f"{which}_neuron_indices_left"][:k]
    return out


def imagenet_checkpoint(state_dict: dict, args: dict = IMAGENET_ARGS) -> dict:
    """The distributed training script's checkpoint dict around `state_dict` (values as given:
    numpy arrays for the torch-free writer, tensors for torch.save); `args` stays a dict here
    (the caller wraps it in argparse.Namespace)."""
    return {
        "model_state_dict": state_dict,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
        "scheduler_state_dict": {"last_epoch": IMAGENET_ITERATION, "base_lrs": [args["lr"]]},
        "scaler_state_dict": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 17},
        "iteration": IMAGENET_ITERATION,
        "train_losses": [np.float64(6.9), np.float64(5.1)],
        "test_losses": [np.float64(6.2)],
        "iters": [0, 1000],
        "args": args,
        "train_accuracies": [],
        "test_accuracies": [],
        "train_accuracies_most_certain": [np.float64(0.01)],
        "test_accuracies_most_certain": [np.float64(0.02)],
    }


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

    # imagenet.pt: the released ImageNet checkpoint's layout at tiny sizes.
    imagenet = imagenet_checkpoint(
        {k: torch.from_numpy(v) for k, v in imagenet_state_dict().items()}
    )
    imagenet["args"] = argparse.Namespace(**imagenet["args"])
    imagenet["torch_rng_state"] = torch.get_rng_state()
    imagenet["numpy_rng_state"] = np.random.get_state()
    imagenet["random_rng_state"] = random.getstate()
    torch.save(imagenet, tmp / "imagenet.pt")

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
