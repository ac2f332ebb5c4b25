"""ParScale LM training on the shared trainer: the LM task, two-stage training (init_from),
recycling an HF checkpoint with a frozen backbone, and the configs' presets and errors."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from configs import parscale_lm
from core.errors import ConfigError
from core.tree_paths import path_str
from parscale_jax.convert import abstract_params, load_checkpoint
from parscale_jax.model import LMOutput
from tasks.parscale_lm.task import ParScaleLMTask, is_parscale_param, model_config
from tests.train_helpers import load_state_arrays
from train_lib import metrics, optim, trainer

REPO = Path(__file__).resolve().parents[1]
HF_TINY = REPO / "tests" / "fixtures" / "hf_qwen2" / "tied_gqa"  # vocab 320, H 32, 3 layers


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("lm_data"))


def make_config(data_dir: str, **model: object) -> ml_collections.ConfigDict:
    config = parscale_lm.get_config("test")
    config.task.data_dir = data_dir
    config.model.update(model)
    return config


def train_records(workdir: Path) -> list[dict]:
    return metrics.read_metrics(workdir, split="train")


@pytest.fixture(scope="module")
def stage1(data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished P = 1 run of the test preset (30 steps, losses logged every 5)."""
    workdir = tmp_path_factory.mktemp("stage1")
    trainer.train_and_evaluate(make_config(data_dir), workdir)
    return workdir


@pytest.fixture(scope="module")
def stage2(stage1: Path, data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A P = 2 run started from `stage1` (20 steps, every loss logged)."""
    workdir = tmp_path_factory.mktemp("stage2")
    trainer.train_and_evaluate(stage2_config(stage1, data_dir), workdir)
    return workdir


def stage2_config(stage1: Path, data_dir: str) -> ml_collections.ConfigDict:
    config = make_config(data_dir, parscale_n=2)
    config.init_from = str(stage1)
    config.train.update(total_steps=20, log_every=1)
    return config


def params_of(workdir: Path, step: int) -> dict[str, np.ndarray]:
    arrays = load_state_arrays(workdir, step)
    return {k[len("params/") :]: v for k, v in arrays.items() if k.startswith("params/")}


# ------------------------------------------------------------------------------------------------
# The task


def test_loss_is_the_masked_token_mean() -> None:
    task = ParScaleLMTask(parscale_lm.get_config("test"))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 320)).astype(np.float32)
    targets = rng.integers(0, 320, size=(2, 3)).astype(np.int32)
    targets[0, 0] = int(np.argmax(logits[0, 0]))  # one right answer, inside the mask
    targets[1, 2] = int(np.argmax(logits[1, 2]))  # one right answer, outside the mask
    mask = np.array([[1, 1, 0], [0, 1, 0]], np.int32)
    batch = {"targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask)}
    loss, m = task.loss_and_metrics(LMOutput(logits=jnp.asarray(logits)), batch)

    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    want = -(picked * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["perplexity"]), math.exp(want), rtol=1e-5)
    assert float(m["accuracy"]) == pytest.approx(1 / 3)
    assert float(m["tokens"]) == 3


def test_lm_task_trains(stage1: Path) -> None:
    records = train_records(stage1)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["loss"] < records[0]["loss"] - 0.8, records
    assert records[0]["loss"] < math.log(320) + 0.5
    assert all(r["tokens"] > 0 for r in records)  # loss tokens per batch


def test_bfloat16_loss_curve_tracks_float32(stage1: Path, data_dir: str, tmp_path: Path) -> None:
    """model.dtype=bfloat16 (bf16 compute; float32 params and Adam state) on stage1's data, seed
    and schedule: every logged loss within 0.01 of the float32 run's. Measured on this CPU: the
    largest gap over steps 5..30 was 9.3e-4 (2.2e-4 relative), while the loss falls by 1.5; 0.01
    is ten times that gap and still catches a bf16 path that stops learning or diverges."""
    workdir = tmp_path / "bf16"
    trainer.train_and_evaluate(make_config(data_dir, dtype="bfloat16"), workdir)
    f32, bf16 = train_records(stage1), train_records(workdir)
    assert [r["step"] for r in bf16] == [r["step"] for r in f32]
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(f32, bf16, strict=True)]
    assert max(gaps) < 0.01, (gaps, f32, bf16)
    state = load_state_arrays(workdir, 30)
    stored = {v.dtype for k, v in state.items() if k.split("/")[0] in ("params", "opt_state")}
    assert {d for d in stored if d.kind not in "biu"} == {np.dtype(np.float32)}, stored


def test_progress_line_shows_tokens_per_second() -> None:
    progress = metrics.Progress(10, batch_size=4, start_step=0, tokens_per_example=128)
    line = progress.line(5, {"loss": 1.0}, ("loss",))
    rate = float(line.split(" steps/s")[0].split("|")[-1])
    tokens = float(line.split(" tok/s")[0].split("|")[-1])
    assert tokens == pytest.approx(rate * 4 * 128, rel=0.01, abs=1)
    assert "tok/s" not in metrics.Progress(10, 4, 0).line(5, {}, ())


# ------------------------------------------------------------------------------------------------
# Two-stage training


def test_two_stage_init_from_keeps_the_backbone_and_adds_fresh_streams(
    stage1: Path, data_dir: str
) -> None:
    config = make_config(data_dir, parscale_n=2)
    config.init_from = str(stage1)
    exp = trainer.build_experiment(config)
    with jax.set_mesh(exp.mesh):
        fresh = jax.jit(exp.init)(jax.random.key(0))
        state = trainer._warm_start(exp, fresh, trainer._init_from_source(exp))
    assert int(state.step) == 0
    source = params_of(stage1, 30)
    got = {"/".join(k): np.asarray(v) for k, v in flatten_dict(state.params).items()}
    initial = {"/".join(k): np.asarray(v) for k, v in flatten_dict(fresh.params).items()}
    backbone = [k for k in got if not is_parscale_param(k)]
    assert sorted(backbone) == sorted(source)  # the P = 1 tree, exactly
    for key in backbone:
        np.testing.assert_array_equal(got[key], source[key], err_msg=key)
    # Prefixes and aggregator: this run's own fresh initialisation (paper: random init).
    streams = [k for k in got if is_parscale_param(k)]
    assert len(streams) == 2 * 2 + 4  # prefix_k/v in 2 layers + aggregator dense_0/1 kernel/bias
    for key in streams:
        np.testing.assert_array_equal(got[key], initial[key], err_msg=key)
    prefix = got["layers_0/self_attn/prefix_k"]
    assert prefix.shape == (2, 2, 8, 8)  # (P, kv heads, prefix tokens, head dim)
    assert np.std(prefix) == pytest.approx(0.02, rel=0.25)
    assert np.std(got["aggregate_layer/dense_0/kernel"]) == pytest.approx(0.02, rel=0.1)
    assert not np.any(got["aggregate_layer/dense_0/bias"])
    # Fresh optimiser state: zero moments.
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))

    # The warm-started P = 2 model computes nearly the P = 1 function; a fresh one does not.
    batch = exp.task.dataset("eval", batch_size=8)[0]

    def loss(params, task=exp.task, model=exp.model) -> float:
        out = task.apply(model, {"params": params}, batch, train=False)
        return float(task.loss_and_metrics(out, batch)[0])

    p1 = trainer.build_experiment(make_config(data_dir))
    stage1_loss = loss(jax.tree.map(jnp.asarray, _nest(source)), p1.task, p1.model)
    assert loss(state.params) == pytest.approx(stage1_loss, abs=0.05)
    assert loss(fresh.params) > stage1_loss + 1.0


def _nest(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def test_two_stage_run_continues_from_stage_one_and_resumes_from_itself(
    stage1: Path, stage2: Path, data_dir: str
) -> None:
    stage1_final = train_records(stage1)[-1]["loss"]
    stage1_first = train_records(stage1)[0]["loss"]
    losses = [r["loss"] for r in train_records(stage2)]
    assert len(losses) == 20
    # Starts where stage 1 ended (not from a random model) and keeps learning.
    assert losses[0] == pytest.approx(stage1_final, abs=0.3), (losses[0], stage1_final)
    assert losses[0] < stage1_first - 0.8
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses

    # A resumed stage-2 run continues from its own checkpoint; init_from is not read again.
    config = stage2_config(stage1, data_dir)
    config.init_from = str(stage2 / "no_such_run")
    config.train.total_steps = 22
    summary = trainer.train_and_evaluate(config, stage2)
    assert summary.resumed_from == 20 and summary.step == 22


# ------------------------------------------------------------------------------------------------
# Recycling an HF checkpoint with a frozen backbone


def test_recycle_hf_checkpoint_with_frozen_backbone(data_dir: str, tmp_path: Path) -> None:
    config = make_config(data_dir, parscale_n=2, num_hidden_layers=3)
    config.init_from_hf = str(HF_TINY)
    config.freeze_backbone = True
    config.optim.lr = 1e-2
    config.train.update(total_steps=40, log_every=1)
    trainer.train_and_evaluate(config, tmp_path)

    _, hf_params = load_checkpoint(HF_TINY)
    hf = {"/".join(k): np.asarray(v) for k, v in flatten_dict(hf_params).items()}
    trained = params_of(tmp_path, 40)
    assert sorted(k for k in trained if not is_parscale_param(k)) == sorted(hf)
    for key, value in hf.items():  # the backbone is bit-identical after 40 updates
        np.testing.assert_array_equal(trained[key], value, err_msg=key)

    losses = [r["loss"] for r in train_records(tmp_path)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1, losses

    # Adam moments exist for the prefixes and the aggregator only.
    saved = load_state_arrays(tmp_path, 40)
    moments = [k for k in saved if k.startswith("opt_state/") and ("/mu/" in k or "/nu/" in k)]
    moment_params = {k.split("/mu/")[-1].split("/nu/")[-1] for k in moments}
    assert moment_params == {k for k in trained if is_parscale_param(k)}


def test_frozen_params_get_no_state_no_update_and_no_share_of_the_clip_norm() -> None:
    params = {"backbone": {"kernel": jnp.ones((3, 3))}, "prefix_k": jnp.ones((2,))}
    section = parscale_lm.get_config("test").optim
    section.update(clip="global_norm", max_grad_norm=1.0, weight_decay=0.0, warmup_steps=0)
    tx, _ = optim.make_optimizer(section, 10, trainable=lambda path: path.endswith("prefix_k"))
    state = tx.init(params)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    shapes = {path_str(k): v.shape for k, v in leaves}
    assert not any("backbone" in k for k in shapes), shapes
    # A huge frozen gradient must not shrink the trainable one through the global norm.
    grads = {"backbone": {"kernel": jnp.full((3, 3), 1e6)}, "prefix_k": jnp.full((2,), 0.1)}
    updates, _ = tx.update(grads, state, params)
    assert not np.any(np.asarray(updates["backbone"]["kernel"]))
    reference, _ = optim.make_optimizer(section, 10)
    alone = {"prefix_k": params["prefix_k"]}
    want, _ = reference.update({"prefix_k": grads["prefix_k"]}, reference.init(alone), alone)
    np.testing.assert_allclose(updates["prefix_k"], want["prefix_k"])


# ------------------------------------------------------------------------------------------------
# Presets and errors


def non_embedding(config: ml_collections.ConfigDict) -> int:
    flat = flatten_dict(abstract_params(model_config(config.model)))
    return sum(math.prod(v.shape) for k, v in flat.items() if k[0] != "embed_tokens")


@pytest.mark.parametrize(
    "preset, count",
    [
        ("s0", 535_813_376),
        ("s1", 693_753_856),
        ("s2", 1_088_376_320),
        ("s3", 1_571_472_384),
        ("s4", 2_774_773_760),
        ("s5", 4_353_203_200),
        ("1.8b", 1_571_472_384),
    ],
)
def test_paper_presets_have_the_paper_sizes(preset: str, count: int) -> None:
    assert non_embedding(parscale_lm.get_config(preset)) == count


def test_stage2_preset_adds_the_papers_parscale_parameters() -> None:
    p8 = parscale_lm.get_config("1.8b-stage2")
    assert p8.model.parscale_n == 8
    p2 = parscale_lm.get_config("1.8b")
    p2.model.parscale_n = 2
    # The authors' fitting script: P2 - P1 = 6,050,306 for the 1.8B model.
    assert non_embedding(p2) - non_embedding(parscale_lm.get_config("1.8b")) == 6_050_306


@pytest.mark.parametrize(
    "preset, total, non_embedding_params",
    # The Qwen2.5 model cards: 0.49B / 0.36B and 3.09B / 2.77B parameters (all / non-embedding).
    [("qwen2.5-0.5b-peft", 0.49, 0.36), ("qwen2.5-3b-peft", 3.09, 2.77)],
)
def test_recycling_presets_have_the_qwen25_sizes(
    preset: str, total: float, non_embedding_params: float
) -> None:
    config = parscale_lm.get_config(preset)
    assert config.freeze_backbone and config.model.parscale_n == 2
    config.model.parscale_n = 1  # the backbone alone, as published
    flat = flatten_dict(abstract_params(model_config(config.model)))
    count = sum(math.prod(v.shape) for v in flat.values())
    assert round(count / 1e9, 2) == total
    assert round(non_embedding(config) / 1e9, 2) == non_embedding_params


def test_paper_presets_need_a_tokenizer() -> None:
    with pytest.raises(ConfigError, match=r"^task\.tokenizer=None is invalid"):
        ParScaleLMTask(parscale_lm.get_config("s0"))


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda c: c.model.update(vocab_size=200), r"^model\.vocab_size=200 is invalid: .*258"),
        (lambda c: c.model.update(num_key_value_heads=3), r"^model\.num_key_value_heads=3"),
        (lambda c: c.model.update(parscale_n=0), r"^model\.parscale_n=0 is invalid"),
        (lambda c: c.task.update(seq_len=4096), r"^task\.seq_len=4096 is invalid"),
        (lambda c: c.update(freeze_backbone=True), r"^freeze_backbone=True is invalid: model"),
        (
            lambda c: (c.update(freeze_backbone=True), c.model.update(parscale_n=2)),
            r"^freeze_backbone=True is invalid: needs init_from",
        ),
    ],
)
def test_bad_task_config_is_a_one_line_config_error(edit, pattern: str) -> None:
    config = parscale_lm.get_config("test")
    edit(config)
    with pytest.raises(ConfigError, match=pattern) as info:
        ParScaleLMTask(config)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "where, pattern",
    [
        # The test preset has 2 layers, the checkpoint 3.
        (str(HF_TINY), r"^model\.num_hidden_layers=2 is invalid: .*num_hidden_layers=3"),
        ("/no/such/dir", r"^init_from_hf='/no/such/dir' is invalid: .*/no/such/dir does not exist"),
    ],
)
def test_bad_init_from_hf_is_a_config_error(where: str, pattern: str) -> None:
    config = parscale_lm.get_config("test")
    config.init_from_hf = where
    task = ParScaleLMTask(config)  # a resumed run does not need the checkpoint any more
    params = abstract_params(task.model_config)
    with pytest.raises(ConfigError, match=pattern) as info:
        task.warm_start({"params": params}, None)
    assert "\n" not in str(info.value)


def test_bad_init_from_is_a_config_error(
    stage1: Path, stage2: Path, data_dir: str, tmp_path: Path
) -> None:
    config = make_config(data_dir, parscale_n=2)
    config.init_from = str(tmp_path / "missing")
    with pytest.raises(ConfigError) as info:
        trainer.train_and_evaluate(config, tmp_path / "run")
    assert str(info.value).startswith(f"init_from='{tmp_path / 'missing'}' is invalid: ")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )

    def warm_start_error(config: ml_collections.ConfigDict) -> str:
        exp = trainer.build_experiment(config)
        source, _ = trainer.read_variables(config.init_from, exp.mesh)
        with pytest.raises(ConfigError) as info:
            exp.task.warm_start({"params": exp.abstract_state.params}, source)
        assert "\n" not in str(info.value)
        return str(info.value)

    # A P = 2 source cannot seed a P = 4 model (its prefixes are for 2 streams).
    config = make_config(data_dir, parscale_n=4)
    config.init_from = str(stage2)
    assert "parscale_n=2 but model.parscale_n=4" in warm_start_error(config)

    # A backbone of another shape: the mismatched parameters are named.
    config = make_config(data_dir, parscale_n=2, intermediate_size=48)
    config.init_from = str(stage1)
    message = warm_start_error(config)
    assert message.startswith(f"init_from='{stage1}' is invalid: its parameters do not fit")
    assert "layers_0/mlp/down_proj/kernel is (64, 32) there, (48, 32) here" in message
