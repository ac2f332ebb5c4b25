"""Sharding: the logical-axis rule tables of both models, the config's logical -> mesh rules, and
sharded training on 8 fake CPU devices agreeing with one device.

The multi-device runs happen in subprocesses (tests/multidevice_check.py): the device count must
be fixed before JAX starts, and this pytest process stays single-device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from configs.ctm_maze import get_config as maze_config
from configs.ctm_parity import get_config as parity_config
from core.errors import ConfigError
from core.tree_paths import path_str
from ctm_jax.model import CTM
from parscale_jax.config import ParScaleConfig
from parscale_jax.model import ParScaleLM
from train_lib import sharding, trainer
from train_lib.task import make_task

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RULES = sharding.parse_rules(common.mesh_section().rules)
MESH_222 = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)


def specs_of(shardings) -> dict[str, P]:
    return {path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}


# ------------------------------------------------------------------------------------------------
# Rule tables: every parameter of every model variant matched, and mapped by the default rules


def ctm_params(**changes):
    """Abstract params of a CTM built from the maze test config with `changes`."""
    task = make_task(maze_config("test"))
    cfg = dataclasses.replace(task.model_config, **changes)
    if cfg.backbone_type == "parity_backbone":
        x = jax.ShapeDtypeStruct((2, 8), np.float32)
        cfg = dataclasses.replace(cfg, positional_embedding_type="custom-rotational-1d")
    else:
        x = jax.ShapeDtypeStruct((2, 16, 16, 3), np.float32)
    model = CTM(cfg)
    variables = jax.eval_shape(lambda k, x: model.init({"params": k}, x), jax.random.key(0), x)
    return model, variables["params"]


CTM_VARIANTS = {
    "maze_resnet18": {},
    "resnet50_bottleneck_downsample": dict(backbone_type="resnet50-2"),
    "shallow_wide": dict(backbone_type="shallow-wide"),
    "no_backbone": dict(backbone_type="none", positional_embedding_type="none"),
    "parity": dict(backbone_type="parity_backbone"),
    "unet_synapses_layernorm_nlms": dict(synapse_depth=4, do_layernorm_nlm=True),
    "linear_nlms": dict(deep_nlms=False),
    "fourier": dict(positional_embedding_type="learnable-fourier"),
    "multi_fourier": dict(positional_embedding_type="multi-learnable-fourier"),
    "rotational": dict(positional_embedding_type="custom-rotational"),
}


@pytest.mark.parametrize("variant", sorted(CTM_VARIANTS))
def test_every_ctm_param_has_logical_axes(variant):
    model, params = ctm_params(**CTM_VARIANTS[variant])
    axes = sharding.param_logical_axes(params, sharding.model_param_axes(model))
    assert len(axes) == len(jax.tree.leaves(params))
    # Every name is mapped by the default rules (no ConfigError), on a 2x2x2 mesh.
    shardings = sharding.param_shardings(MESH_222, params, DEFAULT_RULES, model.param_axes)
    assert len(jax.tree.leaves(shardings)) == len(axes)


def test_ctm_axes_of_the_main_params():
    model, params = ctm_params(synapse_depth=4)
    axes = sharding.param_logical_axes(params, model.param_axes)
    assert axes["ticks/synapses/first_projection/dense/kernel"] == ("hidden", "mlp")
    assert axes["ticks/synapses/up_0/dense/bias"] == ("mlp",)
    assert axes["ticks/synapses/skip_norm_0/scale"] == ("norm",)
    assert axes["ticks/trace_processor/nlm_0/w1"] == ("memory", "nlm_hidden", "neurons")
    assert axes["start_trace"] == ("neurons", "memory")
    assert axes["ticks/attention/query/kernel"] == ("embed", "heads")
    assert axes["attention_kv/value/kernel"] == ("embed", "heads")
    assert axes["backbone/layer1_0/conv1/kernel"] == (None, None, "conv_in", "conv_out")
    assert axes["backbone/layer1_0/bn1/scale"] == ("norm",)


PARSCALE_VARIANTS = {
    "qwen2_tied": dict(parscale_n=1, tie_word_embeddings=True),
    "qwen2_untied": dict(parscale_n=1),
    "parscale_p2": dict(parscale_n=2),
    "parscale_p4_tied": dict(parscale_n=4, tie_word_embeddings=True),
}


def parscale_params(**changes):
    cfg = ParScaleConfig(
        vocab_size=67,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        parscale_n_tokens=3,
        **changes,
    ).validate()
    model = ParScaleLM(cfg)
    x = jax.ShapeDtypeStruct((2, 5), np.int32)
    return model, jax.eval_shape(model.init, jax.random.key(0), x)["params"]


@pytest.mark.parametrize("variant", sorted(PARSCALE_VARIANTS))
def test_every_parscale_param_has_logical_axes(variant):
    model, params = parscale_params(**PARSCALE_VARIANTS[variant])
    axes = sharding.param_logical_axes(params, sharding.model_param_axes(model))
    assert len(axes) == len(jax.tree.leaves(params))
    shardings = sharding.param_shardings(MESH_222, params, DEFAULT_RULES, model.param_axes)
    specs = specs_of(shardings)
    assert specs["layers_11/mlp/gate_proj/kernel"] == P("fsdp", "tensor")
    assert specs["layers_11/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    assert specs["layers_0/self_attn/q_proj/kernel"] == P("fsdp", "tensor")
    assert specs["layers_0/self_attn/k_proj/bias"] == P("tensor")
    assert specs["layers_0/self_attn/o_proj/kernel"] == P("tensor", "fsdp")
    assert specs["layers_0/input_layernorm/weight"] == P(None)
    assert specs["embed_tokens/embedding"] == P(None, "fsdp")  # vocab 67: not divisible by 2
    if PARSCALE_VARIANTS[variant]["parscale_n"] > 1:
        assert specs["layers_3/self_attn/prefix_v"] == P(None, "tensor", None, None)
        assert specs["aggregate_layer/dense_0/kernel"] == P(None, "fsdp")


def test_scanned_parscale_layers_have_an_unsharded_layers_axis():
    model, params = parscale_params(parscale_n=2, scan_layers=True)
    axes = sharding.param_logical_axes(params, sharding.model_param_axes(model))
    assert len(axes) == len(jax.tree.leaves(params))
    assert axes["layers/mlp/gate_proj/kernel"] == ("layers", "embed", "mlp")
    specs = specs_of(sharding.param_shardings(MESH_222, params, DEFAULT_RULES, model.param_axes))
    assert specs["layers/mlp/gate_proj/kernel"] == P(None, "fsdp", "tensor")
    assert specs["layers/self_attn/prefix_v"] == P(None, None, "tensor", None, None)


# ------------------------------------------------------------------------------------------------
# Table and rule errors, fallbacks


def test_unmatched_ambiguous_and_wrong_rank_params_name_the_path():
    params = {"layer": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)}}
    table = [(r"layer/kernel", ("embed", "mlp"))]
    with pytest.raises(ConfigError, match=r"param layer/bias \(8,\) matches no"):
        sharding.param_logical_axes(params, table)
    table = [(r"layer/kernel", ("embed", "mlp")), (r"layer/.*", None)]
    with pytest.raises(ConfigError, match=r"layer/kernel \(4, 8\) matches 2 rules"):
        sharding.param_logical_axes(params, table)
    table = [(r"layer/kernel", ("embed",)), (r"layer/bias", ("mlp",))]
    with pytest.raises(ConfigError, match=r"layer/kernel has shape \(4, 8\)"):
        sharding.param_logical_axes(params, table)


def test_unknown_logical_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^mesh.rules.experts is missing: param moe/w names"):
        sharding.logical_to_spec(
            ("experts", "embed"), (4, 8), DEFAULT_RULES, MESH_222, where="param moe/w"
        )


def test_non_dividing_and_reused_mesh_axes_fall_back_to_replication():
    notes: list[str] = []
    spec = sharding.logical_to_spec(
        ("vocab", "embed"), (67, 32), DEFAULT_RULES, MESH_222, where="param emb", notes=notes
    )
    assert spec == P(None, "fsdp")
    assert notes == ["param emb: dim 0 (vocab, size 67) replicated: not divisible by tensor=2"]
    notes.clear()
    # 'embed' and 'hidden' both map to fsdp: the first dim keeps it.
    spec = sharding.logical_to_spec(
        ("embed", "hidden"), (8, 8), DEFAULT_RULES, MESH_222, where="w", notes=notes
    )
    assert spec == P("fsdp", None)
    assert notes == ["w: dim 1 (hidden) replicated: mesh axis fsdp already splits an earlier dim"]
    # Multi-axis entries need the product of the sizes to divide the dim.
    assert sharding.logical_to_spec(("batch",), (6,), DEFAULT_RULES, MESH_222) == P(None)
    assert sharding.logical_to_spec(("batch",), (8,), DEFAULT_RULES, MESH_222) == P(
        ("data", "fsdp")
    )


def test_rules_parsing():
    rules = sharding.parse_rules(
        {"embed": "fsdp", "batch": "data, fsdp", "norm": "", "mlp": ("tensor",)}
    )
    assert rules == (
        ("batch", ("data", "fsdp")),
        ("embed", ("fsdp",)),
        ("mlp", ("tensor",)),
        ("norm", ()),
    )
    assert sharding.flax_rules(rules)[:2] == (("batch", ("data", "fsdp")), ("embed", "fsdp"))
    with pytest.raises(ConfigError, match=r"^mesh.rules.embed='model' is invalid: 'model' is not"):
        sharding.parse_rules({"embed": "model"})
    with pytest.raises(ConfigError, match=r"^mesh.rules.embed='fsdp,fsdp' is invalid: repeats"):
        sharding.parse_rules({"embed": "fsdp,fsdp"})
    # A config saved before mesh.rules existed: no rules, everything replicated.
    assert sharding.logical_rules({"data": -1, "fsdp": 1, "tensor": 1}) == ()


def test_bad_rule_in_a_config_fails_validation():
    config = parity_config("test")
    config.mesh.rules.heads = "model"
    with pytest.raises(ConfigError, match=r"^mesh.rules.heads='model' is invalid"):
        trainer.validate_config(config)


def test_state_shardings_mirror_params_in_the_optimiser_state():
    config = parity_config("test")  # quantile clipping: per-param (1000,) histories
    exp = trainer.build_experiment(config)
    sh = exp.state_shardings
    params = specs_of(sh.params)
    assert params["ticks/synapses/linear/dense/kernel"] == P("fsdp", "tensor")
    assert params["ticks/trace_processor/nlm_0/w1"] == P(None, None, "tensor")
    opt = specs_of(sh.opt_state)
    adam = [k for k in opt if k.endswith("u/ticks/synapses/linear/dense/kernel")]
    assert sorted(k.split("/")[2] for k in adam) == ["mu", "nu"]
    assert all(opt[k] == P("fsdp", "tensor") for k in adam)
    history = [k for k in opt if k.startswith("0/history/")]
    assert history and all(opt[k] == P() for k in history)
    assert all(opt[k] == P() for k in opt if k.endswith("count"))
    assert sh.step.spec == P() and sh.rng.spec == P()
    assert exp.batch_sharding.spec == P(("data", "fsdp"))
    # And without rules (an old config) everything is replicated, as before.
    del config.mesh["rules"]
    old = trainer.build_experiment(config).state_shardings
    assert all(s.spec == P() for s in jax.tree.leaves(old))


# ------------------------------------------------------------------------------------------------
# 8 fake devices vs one device (subprocesses)

RTOL = 1e-5

# Expected partition specs after the step, as the default rules say (size-1 mesh axes are kept
# in the spec; dims they cannot divide would be replicated).
PARSCALE_SPECS = {
    "layers_0/mlp/gate_proj/kernel": ["fsdp", "tensor"],
    "layers_0/mlp/down_proj/kernel": ["tensor", "fsdp"],
    "layers_0/self_attn/q_proj/kernel": ["fsdp", "tensor"],
    "layers_0/self_attn/q_proj/bias": ["tensor"],
    "layers_0/self_attn/v_proj/kernel": ["fsdp", "tensor"],
    "layers_0/self_attn/o_proj/kernel": ["tensor", "fsdp"],
    "layers_0/self_attn/prefix_k": [None, "tensor", None, None],
    "layers_0/input_layernorm/weight": [None],
    "norm/weight": [None],
    "aggregate_layer/dense_0/kernel": [None, "fsdp"],
    "aggregate_layer/dense_1/kernel": ["fsdp", None],
}
CTM_SPECS = {
    "ticks/synapses/linear/dense/kernel": ["fsdp", "tensor"],
    "ticks/synapses/norm/scale": [None],
    "ticks/trace_processor/nlm_0/w1": [None, None, "tensor"],
    "ticks/trace_processor/nlm_0/b1": [None, "tensor", None],
    "start_trace": ["tensor", None],
    "start_activated_state": ["tensor"],
    "attention_kv/key/kernel": ["fsdp", "tensor"],
    "ticks/attention/out/kernel": ["tensor", "fsdp"],
    "ticks/q_proj/dense/kernel": [None, "fsdp"],
    "ticks/output_projector/dense/kernel": [None, None],
    "decay_params_out": [None],
}
EXPECTED_SPECS = {
    "parscale": PARSCALE_SPECS,
    "ctm_parity": {**CTM_SPECS, "backbone/embedding/embedding": [None, "fsdp"]},
    "ctm_maze": {
        **CTM_SPECS,
        "backbone/layer1_0/conv1/kernel": [None, None, None, None],
        "backbone/bn1/scale": [None],
        "kv_proj/dense/kernel": [None, "fsdp"],
    },
}
RUNS = [
    ("ctm_parity", "8x1x1"),
    ("ctm_parity", "2x4x1"),
    ("ctm_parity", "2x2x2"),
    ("ctm_maze", "2x2x2"),
    ("parscale", "8x1x1"),
    ("parscale", "2x4x1"),
    ("parscale", "2x2x2"),
]


@pytest.fixture(scope="module")
def multidevice():
    """Both groups of cases run at once (one process each), as the machine has two cores."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    script = str(REPO / "tests" / "multidevice_check.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, *cases],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cases in (["ctm_maze"], ["ctm_parity", "parscale"])  # about equal compile work
    ]
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.update(json.loads(line.removeprefix("RESULT ")))
    return results


@pytest.mark.parametrize(("case", "mesh"), RUNS)
def test_sharded_training_matches_one_device(multidevice, case, mesh):
    result = multidevice[case]
    got = result[mesh]
    np.testing.assert_allclose(got["losses"], result["single"]["losses"], rtol=RTOL)
    # Every parameter (and BatchNorm statistic) allclose(rtol=1e-5, atol=1e-6) to one device.
    assert got["params"]["ratio"] <= 1.0, got["params"]
    assert got["buffers"]["ratio"] <= 1.0, got["buffers"]


@pytest.mark.parametrize(("case", "mesh"), RUNS)
def test_param_and_adam_shardings_are_what_the_rules_say(multidevice, case, mesh):
    got = multidevice[case][mesh]
    for path, spec in EXPECTED_SPECS[case].items():
        assert got["specs"][path] == spec, (path, got["specs"][path])
    if case == "parscale":
        # vocab 67 cannot split over tensor=2: replicated there, split where tensor=1 divides.
        vocab = None if mesh == "2x2x2" else "tensor"
        assert got["specs"]["embed_tokens/embedding"] == [vocab, "fsdp"]
        assert got["specs"]["lm_head/kernel"] == ["fsdp", vocab]
    # Adam's first moment lives exactly where its parameter does.
    assert got["mu_specs"] == got["specs"]


def test_checkpoint_restores_onto_another_mesh(multidevice):
    """Saved from the (2,2,2) run, restored with the (2,4,1) mesh's shardings as the target."""
    got = multidevice["parscale"]["reshard"]
    assert got["values_equal"]
    # gate_proj (32, 48): fsdp=2 x tensor=2 shards before, fsdp=4 x tensor=1 after.
    assert got["shard_shapes"] == [[16, 24], [8, 48]]
    assert got["saved_specs"]["embed_tokens/embedding"] == [None, "fsdp"]
    assert got["specs"]["embed_tokens/embedding"] == ["tensor", "fsdp"]
    assert got["mu_specs"] == got["specs"]
