"""The maze CTM as an inference-scaling sampler, its analytic FLOPs, and the P-stream maze CTM.

Sampler: dihedral test-time augmentation maps actions back (a stub model that emits the true
route of whatever maze it sees), keys make samples reproducible and temperature makes them
differ, the certainty-threshold exit's per-sample ticks and costs, F3 restart + splice.
FLOPs: `ctm_jax.flops` against XLA's cost analysis. P-stream CTM: P = 1 is the bare CTM, a P = 2
model trains, and a recycled frozen backbone stays bit-identical.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ctm_maze, ctm_parity
from core.errors import ConfigError
from ctm_jax.adaptive import adaptive_forward
from ctm_jax.config import CTMConfig
from ctm_jax.flops import ctm_flops
from ctm_jax.model import CTM, CTMOutput, CTMTick
from ctm_jax.modules import nlm_weights
from inference_scaling.engine import sample_key
from inference_scaling.samplers import ctm_maze as sampler_lib
from inference_scaling.samplers.ctm_maze import CTMMazeSampler
from inference_scaling.tasks.maze import MazeTask, grid
from tasks.ctm_maze import data as maze_data
from tasks.ctm_maze.task import (
    MazeStreamsTask,
    StreamedCTM,
    model_config,
    per_tick_certainty,
)
from train_lib import metrics, trainer
from train_lib.task import make_task

ROUTE = maze_data.PRESETS["tiny"][1]  # 32 steps on 11x11 mazes
ROOT = jax.random.key(7)


def tiny_config() -> CTMConfig:
    return model_config(ctm_maze.get_config("test").model, "tiny")


def sample_keys(root: jax.Array, pairs) -> jax.Array:
    """[B] keys of (instance, repeat) pairs, as the engine draws them."""
    return jnp.stack([sample_key(root, i, r) for i, r in pairs])


@pytest.fixture(scope="module")
def instances():
    return MazeTask().generate(0, "side11-len11-20", 3)


@pytest.fixture(scope="module")
def tiny_ctm():
    cfg = tiny_config()
    model = CTM(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 11, 11, 3)))
    return model, variables


# ------------------------------------------------------------------------------------------------
# A stub CTM that solves whatever maze it is shown (in that maze's own frame)


def solve_images(images: np.ndarray) -> np.ndarray:
    """Shortest routes (B, ROUTE) of [0, 1] maze images, in their own frame."""
    routes = []
    for image in np.asarray(images):
        passable, start, goal = grid(image)
        path = maze_data.shortest_path(passable, start, goal)
        routes.append(maze_data.pad_actions(maze_data.path_to_actions(path), ROUTE))
    return np.stack(routes).astype(np.int32)


class OracleCTM(nn.Module):
    """Emits the true route of its input as confident logits at every tick."""

    config: CTMConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> CTMOutput:
        del train
        b, t = x.shape[0], self.config.iterations
        spec = jax.ShapeDtypeStruct((b, ROUTE), jnp.int32)
        actions = jax.pure_callback(solve_images, spec, x)
        logits = 8.0 * jax.nn.one_hot(actions, 5).reshape(b, -1)
        predictions = jnp.broadcast_to(logits[..., None], (*logits.shape, t))
        return CTMOutput(
            predictions=predictions,
            certainties=per_tick_certainty(predictions, self.config.prediction_shape()),
            synch_out=jnp.zeros((b, 1)),
        )


def oracle_sampler(**options) -> CTMMazeSampler:
    return CTMMazeSampler(OracleCTM(tiny_config()), {}, ROUTE, False, **options)


def drawn_element(key: jax.Array) -> int:
    """The dihedral element the sampler draws for `key`."""
    return int(jax.random.randint(jax.random.fold_in(key, sampler_lib.DIHEDRAL_STREAM), (), 0, 8))


def test_dihedral_answers_are_mapped_back_to_the_original_frame(instances):
    instance = instances[0]
    truth = maze_data.pad_actions(np.asarray(instance.solution), ROUTE)
    # One repeat id per group element, so every one of the 8 transforms is exercised.
    first = {}
    for repeat in range(200):
        g = drawn_element(sample_keys(ROOT, [(0, repeat)])[0])
        first.setdefault(g, repeat)
        if len(first) == 8:
            break
    assert sorted(first) == list(range(8))
    pairs = [(0, first[g]) for g in range(8)]
    samples = oracle_sampler(diversity="dihedral").sample([instance] * 8, sample_keys(ROOT, pairs))
    image = maze_data.to_float(instance.problem)
    for g, sample in enumerate(samples):
        # The stub really saw the transformed maze: its own route differs except for symmetries.
        seen = solve_images(sampler_lib.dihedral_numpy(image, g)[None])[0]
        assert np.array_equal(sampler_lib.dihedral_permutations()[g][truth], seen)
        np.testing.assert_array_equal(sample.answer, truth, err_msg=f"element {g}")
        assert sample.score > 0.99
    assert MazeTask().verify(instance, samples[3].answer).correct


def test_dihedral_group_matches_numpy():
    x = np.arange(5 * 5 * 2).reshape(5, 5, 2)
    for g in range(8):
        np.testing.assert_array_equal(
            sampler_lib.dihedral_jax(jnp.asarray(x), g), sampler_lib.dihedral_numpy(x, g)
        )
    inverse, forward = sampler_lib.inverse_permutations(), sampler_lib.dihedral_permutations()
    for g in range(8):
        np.testing.assert_array_equal(inverse[g][forward[g]], np.arange(5))


def test_same_keys_same_samples_and_temperature_makes_repeats_differ(instances, tiny_ctm):
    model, variables = tiny_ctm
    sampler = CTMMazeSampler(
        model, variables, ROUTE, False, diversity="dihedral+temperature=1.0+tick=last"
    )
    assert sampler.label == "T=3,P=1" and sampler.diversity == "dihedral+temperature=1+tick=last"
    pairs = [(i, r) for i in range(3) for r in range(2)]
    batch = [instances[i] for i, _ in pairs]
    first = sampler.sample(batch, sample_keys(ROOT, pairs))
    # The same (instance, repeat) pairs in another order: identical samples.
    again = sampler.sample(batch[::-1], sample_keys(ROOT, pairs[::-1]))
    for a, b in zip(first[::-1], again, strict=True):
        np.testing.assert_array_equal(a.answer, b.answer)
        assert a.score == pytest.approx(b.score, abs=1e-6)
    for i in range(3):
        assert not np.array_equal(first[2 * i].answer, first[2 * i + 1].answer)
    # Without a source of diversity every repeat is the same greedy route.
    greedy = CTMMazeSampler(model, variables, ROUTE, False)
    assert greedy.diversity == "none"
    plain = greedy.sample([instances[0]] * 2, sample_keys(ROOT, [(0, 0), (0, 1)]))
    np.testing.assert_array_equal(plain[0].answer, plain[1].answer)
    cost = plain[0].cost
    assert (cost.native, cost.unit, cost.streams) == (3, "ticks", 1)
    assert cost.flops == ctm_flops(model.config, (11, 11, 3)).total(3)


def test_bad_options_fail_with_one_line(tiny_ctm):
    model, variables = tiny_ctm
    for spec in ("temperature=0", "tick=first", "beam", "dihedral+dihedral"):
        with pytest.raises(ConfigError, match="diversity="):
            CTMMazeSampler(model, variables, ROUTE, False, diversity=spec)
    with pytest.raises(ConfigError, match="route_length=10"):
        CTMMazeSampler(model, variables, 10, False)
    with pytest.raises(ConfigError, match="exit tick"):
        CTMMazeSampler(model, variables, ROUTE, False, exit_threshold=0.5, diversity="tick=last")


def test_exit_threshold_gives_per_sample_ticks_and_costs(instances, tiny_ctm):
    model, variables = tiny_ctm
    ticks = 8
    long = dataclasses.replace(model.config, iterations=ticks)
    images = jnp.asarray(np.stack([maze_data.to_float(x.problem) for x in instances]))
    certainty = CTM(long).apply(variables, images).certainties[:, 1]  # (B, T)
    # A threshold some samples reach before the last tick and some never do.
    threshold = float(np.sort(np.asarray(certainty).max(axis=1))[1])
    reached = np.asarray(certainty) >= threshold
    expected = np.where(reached.any(1), reached.argmax(1) + 1, ticks)
    assert expected.min() < ticks or not reached.all()
    sampler = CTMMazeSampler(model, variables, ROUTE, False, ticks=ticks, exit_threshold=threshold)
    assert sampler.label == f"T={ticks},P=1,exit={threshold:g}"
    samples = sampler.sample(instances, sample_keys(ROOT, [(i, 0) for i in range(3)]))
    per_example = ctm_flops(long, (11, 11, 3))
    direct = adaptive_forward(CTM(long), variables, images, threshold, ticks)
    for j, sample in enumerate(samples):
        assert sample.cost.native == expected[j] == int(direct.exit_tick[j])
        assert 1 <= sample.cost.native <= ticks
        assert sample.cost.flops == per_example.total(int(expected[j]))
        assert sample.score == pytest.approx(float(direct.certainties[j, 1]), abs=1e-6)


def test_f3_restarts_at_the_last_correct_cell_and_splices(instances):
    task = MazeTask(criterion="exact")
    sampler = oracle_sampler()
    contexts, previous = [], []
    for instance in instances:
        route = maze_data.pad_actions(np.asarray(instance.solution), ROUTE)
        wrong = route.copy()
        k = 3
        wrong[k] = (wrong[k] + 1) % 4  # a different move at step k
        verdict = task.verify(instance, wrong)
        assert verdict.feedback["first_error"] == k
        previous.append(wrong)
        contexts.append({"incorrect": True, "feedback": verdict.feedback, "previous_answer": wrong})
    keys = sample_keys(ROOT, [(i, 1) for i in range(3)])
    samples = sampler.sample(instances, keys, contexts)
    for instance, sample, wrong in zip(instances, samples, previous, strict=True):
        assert task.verify(instance, sample.answer).correct
        np.testing.assert_array_equal(sample.answer[:3], wrong[:3])  # the kept prefix
        assert sample.cost.native == 3
    # A prefix that already reaches the goal is the answer: no model call, no cost.
    instance = instances[0]
    route = maze_data.pad_actions(np.asarray(instance.solution), ROUTE)
    overshoot = route.copy()
    n = len(instance.solution)
    overshoot[n] = 0 if overshoot[n - 1] != 1 else 1  # a move after reaching the goal
    verdict = task.verify(instance, overshoot)
    assert verdict.feedback["prefix_solves"] and not verdict.correct
    context = {"incorrect": True, "feedback": verdict.feedback, "previous_answer": overshoot}
    (sample,) = sampler.sample([instance], keys[:1], [context])
    assert task.verify(instance, sample.answer).correct
    assert (sample.cost.native, sample.cost.flops) == (0.0, 0.0)
    # F0-F2 contexts re-sample the instance itself.
    (plain,) = sampler.sample([instance], keys[:1], [{"incorrect": True, "wrong_answers": []}])
    np.testing.assert_array_equal(plain.answer, route)


# ------------------------------------------------------------------------------------------------
# FLOPs


def xla_flops(f, *args) -> float:
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def maze_cpu_config() -> tuple[CTMConfig, tuple[int, ...]]:
    return model_config(ctm_maze.get_config("cpu").model, "tiny"), (11, 11, 3)


def parity_reference_config() -> tuple[CTMConfig, tuple[int, ...]]:
    config = ctm_parity.get_config(None)
    length = config.task.seq_len
    values = {**config.model.to_dict(), "out_dims": 2 * length, "prediction_reshaper": (length, 2)}
    return CTMConfig.from_mapping(values), (length,)


@pytest.mark.parametrize("make", [maze_cpu_config, parity_reference_config])
def test_analytic_flops_match_xla_cost_analysis(make):
    """XLA also counts the elementwise work (normalisations, activations, the synchronisation
    products, softmax): on these matmul/conv-dominated configs it is at most 5% of the per-forward
    part (ResNet convs, K/V) and 10% of a tick. A scan's body is counted once by XLA, so the
    per-forward setup and one tick are compared separately."""
    cfg, shape = make()
    model, batch = CTM(cfg), 2
    x = jnp.ones((batch, *shape))
    variables = model.init(jax.random.key(0), x)
    analytic = ctm_flops(cfg, shape)
    once = xla_flops(lambda v, x: model.apply(v, x, initial_state_only=True), variables, x)
    carry, ctx = model.apply(variables, x, initial_state_only=True)
    tick = CTMTick(cfg, deterministic=True, track=False)
    per_tick = xla_flops(
        lambda p, c, ctx: tick.apply(nlm_weights({"params": p}, to_loop=True), c, ctx),
        variables["params"]["ticks"],
        carry,
        ctx,
    )
    assert 1.0 <= once / batch / analytic.once <= 1.05
    assert 1.0 <= per_tick / batch / analytic.per_tick <= 1.10


# ------------------------------------------------------------------------------------------------
# The P-stream maze CTM


def test_one_stream_is_the_bare_ctm(instances):
    cfg = tiny_config()
    x = jnp.asarray(np.stack([maze_data.to_float(i.problem) for i in instances]))
    wrapped = StreamedCTM(cfg, 1)
    variables = jax.jit(wrapped.init)(jax.random.key(3), x)
    assert all(list(tree) == ["backbone"] for tree in variables.values())
    bare = {name: tree["backbone"] for name, tree in variables.items()}
    expected = jax.jit(CTM(cfg).apply)(bare, x)
    got = jax.jit(wrapped.apply)(variables, x)
    for field in ("predictions", "certainties", "synch_out"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))


def test_two_streams_train_and_their_loss_falls():
    config = ctm_maze.get_config("test-p2")
    task = make_task(config)
    assert isinstance(task, MazeStreamsTask)
    model = task.build_model()
    batch = task.example_batch(8)
    variables = task.init_variables(model, jax.random.key(0), batch)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    assert sorted(params) == ["aggregator", "backbone", "input_transform"]
    # The model's param table covers every parameter (train_lib.sharding would raise).
    from train_lib import sharding

    assert sharding.param_logical_axes(params, model.param_axes)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, state, opt_state):
        def loss_fn(p):
            outputs, updated = task.apply(
                model, {"params": p, **state}, batch, train=True, mutable=["batch_stats"]
            )
            return task.loss_and_metrics(outputs, batch)[0], updated

        (loss, updated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = task.project_params(optax.apply_updates(params, updates))
        return params, {**state, **updated}, opt_state, loss

    losses = []
    for _ in range(25):
        params, state, opt_state, loss = step(params, state, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    print("P=2 test-size CTM, one batch of 8 mazes, losses:", np.round(losses, 3))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_recycled_frozen_backbone_stays_bit_identical(tmp_path, instances):
    source_dir, streamed_dir = tmp_path / "p1", tmp_path / "p2"
    source_exp = trainer.build_experiment(ctm_maze.get_config("test"))
    trainer.write_workdir(source_exp, source_dir, _variables(source_exp.init(jax.random.key(5))))
    config = ctm_maze.get_config("test-p2")
    config.init_from = str(source_dir)
    config.freeze_backbone = True
    config.streams.mode = "vmap"  # the frozen CTM never updates BatchNorm statistics
    config.train.total_steps = config.train.checkpoint_every = 3
    config.train.eval_every = 0
    summary = trainer.train_and_evaluate(config, streamed_dir)
    assert summary.step == config.train.total_steps
    train = metrics.read_metrics(streamed_dir, "train")
    assert np.isfinite([r["loss"] for r in train]).all()

    _, source, _ = trainer.restore_run(source_dir)
    exp, streamed, _ = trainer.restore_run(streamed_dir)
    before = _variables(source)
    after = _variables(streamed)
    for collection, tree in before.items():
        got = jax.tree.leaves(after[collection]["backbone"])
        assert len(got) == len(jax.tree.leaves(tree))
        for a, b in zip(jax.tree.leaves(tree), got, strict=True):
            np.testing.assert_array_equal(a, b)
    # The recycled P = 2 run samples through the same sampler, at P = 2 cost.
    sampler = CTMMazeSampler.from_workdir(str(streamed_dir), exit_threshold=0.0)
    assert sampler.label == "T=3,P=2,exit=0"
    samples = sampler.sample(instances, sample_keys(ROOT, [(i, 0) for i in range(3)]))
    single = ctm_flops(exp.task.model_config, (11, 11, 3))
    for sample in samples:
        assert sample.cost.native == 1 and sample.cost.streams == 2
        assert sample.cost.flops > 2 * single.total(1)


def _variables(state) -> dict:
    return {"params": state.params, **state.buffers}
