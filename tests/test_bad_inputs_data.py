"""Bad data files and flag values through the real command lines: one `error:` line each.

The library rule: a bad input fails early with one line that names the field or file, the
expected and the received value; no traceback; a non-zero exit status. Each case runs a launcher
in a subprocess (`python -m launch.<tool> ...` from the repository root, on the CPU) and checks
exactly that: the status, the last non-empty line of stderr (`error: ...`), no "Traceback"
anywhere, and the names and values the line must carry.

Inputs are tiny and built here: copies of the committed HF Qwen2 checkpoint
(tests/fixtures/hf_qwen2/tied_gqa: 3 layers, H 32, max_position_embeddings 128, its tokenizer)
with one thing broken each; maze PNG folders in the reference layout; `.pt` files garbled from
tests/fixtures/ctm_pt/parity.pt; small text corpora. The training cases
(`--config.init_from_hf`, `--config.task.image_folder`, `--config.task.paths`) fail while the run
is being set up, before the first train step.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import REPO, launcher_env

from ctm_jax.torch_checkpoint import load_torch_checkpoint
from tasks.ctm_maze import data as md

HF_SOURCE = REPO / "tests" / "fixtures" / "hf_qwen2" / "tied_gqa"
PARITY_PT = REPO / "tests" / "fixtures" / "ctm_pt" / "parity.pt"
MAZE_SIDE = md.PRESETS["tiny"][0]  # 11: the side of configs/ctm_maze.py:test mazes


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=launcher_env(None),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed run (asserting status, no traceback)."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, output[-3000:]
    assert lines[-1].startswith("error: "), output[-3000:]
    return lines[-1]


# ------------------------------------------------------------------------------------------------
# Inputs


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    hf.update(changes)
    path.write_text(json.dumps(hf))


# name -> how a copy of the good checkpoint is broken
HF_BREAKS: dict[str, Callable[[Path], None]] = {
    "good": lambda d: None,
    "not_json": lambda d: (d / "config.json").write_text('{"model_type": "qwen2",'),
    "config_list": lambda d: (d / "config.json").write_text("[1, 2]"),
    "hidden_str": lambda d: _edit_config(d, hidden_size="32"),
    "hidden_list": lambda d: _edit_config(d, hidden_size=[32]),
    "tie_str": lambda d: _edit_config(d, tie_word_embeddings="yes"),
    "eos_str": lambda d: _edit_config(d, eos_token_id="<|endoftext|>"),
    "truncated": lambda d: (d / "model.safetensors").write_bytes(
        (HF_SOURCE / "model.safetensors").read_bytes()[:50_000]
    ),
    "no_weights": lambda d: (d / "model.safetensors").unlink(),
    "bad_index": lambda d: (
        (d / "model.safetensors").unlink(),
        (d / "model.safetensors.index.json").write_text('{"weight_map": '),
    ),
    "no_tokenizer": lambda d: (d / "tokenizer.json").unlink(),
    "bad_tokenizer": lambda d: (d / "tokenizer.json").write_text('{"model": '),
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint directory per HF_BREAKS entry, plus 'missing' (no directory)."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, breaks in HF_BREAKS.items():
        dirs[name] = Path(shutil.copytree(HF_SOURCE, root / name))
        breaks(dirs[name])
    dirs["missing"] = root / "missing"
    return dirs


def maze_image(side: int, index: int) -> np.ndarray:
    """A maze of the reference's on-disk layout: start red, goal green, the route blue."""
    image = md.maze_example(side, 0, index, 32)["image"].copy()
    start = tuple(int(v) for v in np.argwhere(np.all(image == md.START, -1))[0])
    goal = tuple(int(v) for v in np.argwhere(np.all(image == md.GOAL, -1))[0])
    for pos in md.shortest_path(image.max(-1) > 0, start, goal)[1:-1]:
        image[pos] = md.PATH
    return image


def _write_folder(root: Path, side: int, count: int = 6) -> Path:
    for split in ("train", "test"):
        folder = root / split / "maze"
        folder.mkdir(parents=True)
        for index in range(count):
            Image.fromarray(maze_image(side, index)).save(folder / f"{index:03d}.png")
    return root


def _repaint(path: Path, edit: Callable[[np.ndarray], None]) -> None:
    image = np.asarray(Image.open(path).convert("RGB")).copy()
    edit(image)
    Image.fromarray(image).save(path)


def _erase(colour: tuple[int, int, int]) -> Callable[[np.ndarray], None]:
    def edit(image: np.ndarray) -> None:
        image[np.all(image == colour, -1)] = md.CORRIDOR

    return edit


def _extra_goals(image: np.ndarray) -> None:
    image[0, 0] = image[0, 1] = md.GOAL  # two more goal pixels on the wall: 3 in all


@pytest.fixture(scope="module")
def mazes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Maze folders (root/{train,test}/maze/*.png) of the 11x11 size, each broken one way."""
    root = tmp_path_factory.mktemp("mazes")
    good = _write_folder(root / "good", MAZE_SIDE)
    folders = {
        "good": good,
        "all_15": _write_folder(root / "all_15", 15),
        "missing": root / "missing",
        "tfds_empty": root / "tfds_empty",
    }
    folders["tfds_empty"].mkdir()
    for name in ("one_13", "no_start", "three_goals", "not_png"):
        folders[name] = Path(shutil.copytree(good, root / name))
    Image.fromarray(np.zeros((13, 13, 3), np.uint8)).save(root / "one_13/train/maze/002.png")
    _repaint(root / "no_start/train/maze/000.png", _erase(md.START))
    _repaint(root / "three_goals/train/maze/000.png", _extra_goals)
    (root / "not_png/train/maze/000.png").write_bytes(b"GIF89a, not really")
    return folders


@pytest.fixture(scope="module")
def pt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Garbled reference `.pt` files."""
    root = tmp_path_factory.mktemp("pt")
    data = PARITY_PT.read_bytes()
    files = {name: root / f"{name}.pt" for name in ("truncated", "text", "legacy", "bad_crc")}
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["text"].write_text("model_state_dict = {}\n")
    files["legacy"].write_bytes(pickle.dumps({"model_state_dict": {}}, protocol=2))
    with zipfile.ZipFile(PARITY_PT) as archive:
        record = max(archive.infolist(), key=lambda info: info.compress_size)
    garbled = bytearray(data)
    at = record.header_offset + 200  # inside the largest storage record's bytes
    garbled[at : at + 64] = b"\xff" * 64
    files["bad_crc"].write_bytes(bytes(garbled))
    # A readable checkpoint whose saved args contradict its weights (d_model 48 in the weights).
    loaded = load_torch_checkpoint(PARITY_PT, backend="numpy")
    checkpoint = {
        "model_state_dict": loaded["model_state_dict"],
        "args": {**loaded["args"], "d_model": 64},
        "iteration": 3,
    }
    files["wrong_args"] = root / "wrong_args.pt"
    with zipfile.ZipFile(files["wrong_args"], "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(checkpoint, protocol=2))
    files["missing"] = root / "missing.pt"
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Text corpora for `--config.task.paths`, and a broken tokenizer.json."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "empty.txt").write_bytes(b"")
    (root / "one.txt").write_text("def f():\n    return 1\n")
    (root / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return {
        "empty": root / "empty.txt",
        "one": root / "one.txt",
        "missing": root / "missing.txt",
        "tokenizer": root / "tokenizer.json",
        "data_dir": root / "tfds",
    }


# ------------------------------------------------------------------------------------------------
# Cases: the command line (placeholders filled from `places`) and what its line must say


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    module: str
    args: tuple[str, ...]
    says: tuple[str, ...]  # fragments of the error line (placeholders filled likewise)


def generate(case_id: str, checkpoint: str, args: tuple[str, ...], *says: str) -> Case:
    return Case(
        case_id,
        "launch.generate",
        (f"--checkpoint={{hf[{checkpoint}]}}", *args),
        says,
    )


HI = ("--prompt=hi",)
CONFIG = "{hf[%s]}/config.json"

GENERATE_CASES = [
    # Flags
    generate(
        "max-new-tokens-0",
        "good",
        (*HI, "--max_new_tokens=0"),
        "--max_new_tokens=0 is invalid: must be >= 1",
    ),
    generate(
        "max-new-tokens-fills-the-context",
        "good",
        (*HI, "--max_new_tokens=128"),
        "--max_new_tokens=128 is invalid: must be < max_position_embeddings=128 of "
        + CONFIG % "good",
    ),
    generate(
        "temperature-negative",
        "good",
        (*HI, "--temperature=-0.5"),
        "--temperature=-0.5 is invalid: must be >= 0",
    ),
    generate(
        "top-p-zero", "good", (*HI, "--top_p=0"), "--top_p=0.0 is invalid: must lie in (0, 1]"
    ),
    generate(
        "top-p-above-one",
        "good",
        (*HI, "--top_p=1.5"),
        "--top_p=1.5 is invalid: must lie in (0, 1]",
    ),
    generate("top-k-negative", "good", (*HI, "--top_k=-1"), "--top_k=-1 is invalid: must be >= 0"),
    generate(
        "parscale-n-zero",
        "good",
        (*HI, "--parscale_n=0"),
        "--parscale_n=0 is invalid: must be >= 1",
    ),
    generate(
        "parscale-n-not-in-checkpoint",
        "good",
        (*HI, "--parscale_n=2"),
        "--parscale_n=2 is not available in {hf[good]}",
        "no streams/P2.safetensors",
        "it serves P = 1",
    ),
    generate(
        "prompt-too-long",
        "good",
        (*HI, "--prompt=" + "a" * 40, "--max_new_tokens=100"),
        "--prompt #1 is invalid: it is 40 tokens long, the limit is 28",
        "max_position_embeddings=128 of " + CONFIG % "good",
        "--max_new_tokens=100",
    ),
    generate(
        "prompt-empty",
        "good",
        ("--prompt=",),
        "--prompt #0 ('') is invalid: it encodes to 0 tokens",
    ),
    # The checkpoint directory
    generate(
        "checkpoint-missing",
        "missing",
        HI,
        "--checkpoint={hf[missing]} is invalid: the directory does not exist",
    ),
    generate("config-not-json", "not_json", HI, CONFIG % "not_json" + " is not valid JSON"),
    generate(
        "config-not-an-object",
        "config_list",
        HI,
        CONFIG % "config_list" + " is invalid: expected a JSON object of model fields, got list",
    ),
    generate(
        "config-field-a-string",
        "hidden_str",
        HI,
        CONFIG % "hidden_str"
        + " hidden_size='32' is invalid: expected a positive integer, got str",
    ),
    generate(
        "config-field-a-list",
        "hidden_list",
        HI,
        CONFIG % "hidden_list"
        + " hidden_size=[32] is invalid: expected a positive integer, got list",
    ),
    generate(
        "config-bool-a-string",
        "tie_str",
        HI,
        CONFIG % "tie_str"
        + " tie_word_embeddings='yes' is invalid: expected true or false, got str",
    ),
    generate(
        "config-eos-a-string",
        "eos_str",
        HI,
        CONFIG % "eos_str"
        + " eos_token_id='<|endoftext|>' is invalid: expected a token id in [0, 320)",
    ),
    generate(
        "safetensors-truncated",
        "truncated",
        HI,
        "{hf[truncated]}/model.safetensors is not a readable safetensors file "
        "(truncated or corrupt?)",
    ),
    generate(
        "safetensors-none",
        "no_weights",
        HI,
        "{hf[no_weights]} holds no safetensors weights: expected model.safetensors, or "
        "model.safetensors.index.json and its shards",
    ),
    generate(
        "safetensors-index-not-json",
        "bad_index",
        HI,
        "{hf[bad_index]}/model.safetensors.index.json is not valid JSON",
    ),
    generate(
        "tokenizer-missing",
        "no_tokenizer",
        HI,
        "{hf[no_tokenizer]}/tokenizer.json does not exist: the checkpoint needs a tokenizer.json",
    ),
    generate(
        "tokenizer-not-json",
        "bad_tokenizer",
        HI,
        "{hf[bad_tokenizer]}/tokenizer.json is not a readable tokenizer.json",
    ),
]


def train(case_id: str, config: str, args: tuple[str, ...], *says: str) -> Case:
    return Case(case_id, "launch.train", (f"--config={config}", "--workdir={work}", *args), says)


MAZE = "configs/ctm_maze.py:test"
# The arithmetic test model with the fixture checkpoint's 3 layers: the same architecture.
LM = "configs/parscale_lm.py:arith-test"
LM_3 = "--config.model.num_hidden_layers=3"
CORPUS = "configs/parscale_lm.py:test"
FILES = ("--config.task.corpus=files", "--config.task.data_dir={corpus[data_dir]}")

TRAIN_CASES = [
    train(
        "maze-every-image-the-wrong-size",
        MAZE,
        ("--config.task.image_folder={maze[all_15]}",),
        "{maze[all_15]}/",
        "000.png: image is 15x15 pixels, expected 11x11 (maze size 'tiny')",
    ),
    train(
        "maze-one-image-the-wrong-size",
        MAZE,
        ("--config.task.image_folder={maze[one_13]}",),
        "{maze[one_13]}/train/maze/002.png: image is 13x13 pixels, expected 11x11",
    ),
    train(
        "maze-no-start-pixel",
        MAZE,
        ("--config.task.image_folder={maze[no_start]}",),
        "{maze[no_start]}/train/maze/000.png: expected exactly one start (red) pixel, found 0",
    ),
    train(
        "maze-three-goal-pixels",
        MAZE,
        ("--config.task.image_folder={maze[three_goals]}",),
        "{maze[three_goals]}/train/maze/000.png: expected exactly one goal (green) pixel, found 3",
    ),
    train(
        "maze-not-an-image",
        MAZE,
        ("--config.task.image_folder={maze[not_png]}",),
        "{maze[not_png]}/train/maze/000.png: not a readable image",
    ),
    train(
        "maze-data-dir-not-prepared",
        MAZE,
        ("--config.task.data_dir={maze[tfds_empty]}",),
        "{maze[tfds_empty]} holds no prepared generated_mazes/tiny dataset in array_record format",
    ),
    train(
        "maze-folder-missing",
        MAZE,
        ("--config.task.image_folder={maze[missing]}",),
        "maze image folder {maze[missing]} does not exist",
    ),
    train(
        "init-from-hf-truncated-safetensors",
        LM,
        (LM_3, "--config.init_from_hf={hf[truncated]}"),
        "init_from_hf='{hf[truncated]}' is invalid: {hf[truncated]}/model.safetensors is not a "
        "readable safetensors file (truncated or corrupt?)",
    ),
    train(
        "init-from-hf-config-not-json",
        LM,
        (LM_3, "--config.init_from_hf={hf[not_json]}"),
        "init_from_hf='{hf[not_json]}' is invalid: " + CONFIG % "not_json" + " is not valid JSON",
    ),
    train(
        "corpus-file-missing",
        CORPUS,
        (*FILES, "--config.task.paths=('{corpus[missing]}',)"),
        "task.corpus='files' is invalid: no files match ['{corpus[missing]}']",
    ),
    train(
        "corpus-file-empty",
        CORPUS,
        (*FILES, "--config.task.paths=('{corpus[empty]}',)"),
        "{corpus[empty]}: empty file, the only document of the train split",
    ),
    train(
        "corpus-one-file",
        CORPUS,
        (*FILES, "--config.task.paths=('{corpus[one]}',)"),
        "paths=['{corpus[one]}'] give 1 file(s)",
        "the validation split gets none",
    ),
    train(
        "lm-tokenizer-not-json",
        CORPUS,
        ("--config.task.tokenizer={corpus[tokenizer]}",),
        "task.tokenizer='{corpus[tokenizer]}' is invalid: {corpus[tokenizer]} is not a readable "
        "tokenizer.json",
    ),
]


def import_pt(case_id: str, name: str, *says: str) -> Case:
    return Case(
        case_id,
        "launch.import_ctm_checkpoint",
        (f"--checkpoint={{pt[{name}]}}", "--out={work}", "--backend=numpy"),
        (f"{{pt[{name}]}}: ", *says),
    )


IMPORT_CASES = [
    import_pt("pt-truncated", "truncated", "truncated or corrupt zip archive"),
    import_pt("pt-text-file", "text", "not a torch checkpoint (not a zip archive)"),
    import_pt("pt-legacy-pickle", "legacy", "legacy (pre-1.6, non-zip) torch serialization"),
    import_pt("pt-garbled-record", "bad_crc", "truncated or corrupt checkpoint (Bad CRC-32"),
    import_pt(
        "pt-args-contradict-weights",
        "wrong_args",
        "args.d_model: expected 48 (from start_activated_state (48,)), received 64",
    ),
    import_pt("pt-missing", "missing", "no such file"),
]

CASES = GENERATE_CASES + TRAIN_CASES + IMPORT_CASES


# Subprocesses run this many at a time, started when the first case asks (the slow training
# cases first), so that the file takes about half the time of running them one by one.
WORKERS = 2


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest,
    hf: dict[str, Path],
    mazes: dict[str, Path],
    pt: dict[str, Path],
    corpus: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[dict, Future]]]:
    """case id -> (the placeholders of its command line, the future of its run), for the cases
    of this module that pytest selected."""
    params = [
        getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items
    ]
    selected = [
        p["case"]
        for item, p in zip(request.session.items, params, strict=True)
        if item.module is request.module and "case" in p
    ]
    selected.sort(key=lambda case: case.module != "launch.train")  # stable: slow ones first
    futures = {}
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        for case in selected:
            work = tmp_path_factory.mktemp("work") / "run"
            places = {"hf": hf, "maze": mazes, "pt": pt, "corpus": corpus, "work": work}
            args = [arg.format(**places) for arg in case.args]
            futures[case.id] = (places, pool.submit(run_cli, case.module, *args))
        yield futures
        for _, future in futures.values():
            future.cancel()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_ends_in_one_error_line(case: Case, outcomes: dict) -> None:
    places, future = outcomes[case.id]
    line = error_line(future.result())
    print(line)  # shown by `pytest -rA`: the table of every case's message
    for fragment in case.says:
        assert fragment.format(**places) in line, line
    checkpoints = places["work"] / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir()), (
        "a run that failed while being set up wrote a checkpoint"
    )


def test_the_good_inputs_work(hf: dict[str, Path], mazes: dict[str, Path]) -> None:
    """The unbroken originals pass the same checks: the good checkpoint generates, the good
    maze folder loads (so the cases above fail for their one broken thing)."""
    result = run_cli(
        "launch.generate", f"--checkpoint={hf['good']}", "--prompt=hi", "--max_new_tokens=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ds = md.maze_dataset("train", "tiny", batch_size=6, image_folder=mazes["good"], augment=False)
    batch = ds[0]
    assert batch["inputs"].shape == (6, MAZE_SIDE, MAZE_SIDE, 3)
    with pytest.raises(md.DataError, match=r"000\.png: image is 11x11 pixels, expected 15x15"):
        md.maze_dataset("train", "small", batch_size=2, image_folder=mazes["good"])


# ------------------------------------------------------------------------------------------------
# In-process checks, cheaper than a subprocess: every config.json field's type


FIELD_CASES = [
    ("vocab_size", 0, "vocab_size=0 is invalid: must be a positive integer"),
    ("num_key_value_heads", True, "num_key_value_heads=True is invalid: expected a positive"),
    ("head_dim", "8", "head_dim='8' is invalid: expected a positive integer or null, got str"),
    ("rope_theta", "1e4", "rope_theta='1e4' is invalid: expected a number, got str"),
    ("rms_norm_eps", [1e-6], "rms_norm_eps=[1e-06] is invalid: expected a number, got list"),
    ("max_position_embeddings", 1.5, "max_position_embeddings=1.5 is invalid: expected a"),
    ("parscale_n_tokens", "48", "parscale_n_tokens='48' is invalid: expected an integer"),
]


@pytest.mark.parametrize(
    "field, value, says",
    FIELD_CASES,
    ids=[f"{field}-{type(value).__name__}" for field, value, _ in FIELD_CASES],
)
def test_every_config_json_field_is_type_checked(field: str, value, says: str) -> None:
    from core.errors import ConfigError
    from parscale_jax.config import ParScaleConfig

    hf = json.loads((HF_SOURCE / "config.json").read_text())
    hf.update({field: value, "model_type": "qwen2_parscale", "parscale_n": 2})
    with pytest.raises(ConfigError) as info:
        ParScaleConfig.from_hf(hf, source="DIR/config.json")
    assert str(info.value).startswith(f"DIR/config.json {says}"), str(info.value)


def test_generation_refuses_a_batch_longer_than_the_positions() -> None:
    """`parscale_jax.generate` checks the length itself (for callers other than the CLI)."""
    from core.errors import ConfigError
    from parscale_jax.config import ParScaleConfig
    from parscale_jax.generate import check_length

    config = ParScaleConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    check_length(config, 12, 4)
    with pytest.raises(ConfigError, match=r"^prompt length 13 is invalid: must be <= 12 "):
        check_length(config, 13, 4)
    with pytest.raises(ConfigError, match=r"^max_new_tokens=16 is invalid: must be < "):
        check_length(config, 1, 16)
