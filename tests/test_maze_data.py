"""Generated maze data: perfect mazes, valid routes, augmentations, tfds/grain and PNG loading."""

from __future__ import annotations

import collections
import itertools
import sys

import grain
import numpy as np
import pytest

from tasks.ctm_maze import data as md

SMALL_SIDE, SMALL_ROUTE = md.PRESETS["small"]


def corridor_mask(image: np.ndarray) -> np.ndarray:
    """Non-black pixels (corridors, start and goal)."""
    return np.asarray(image).max(axis=-1) > 0


def find(image: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int]:
    hits = np.argwhere(np.all(np.asarray(image) == colour, axis=-1))
    assert len(hits) == 1, f"expected one {colour} pixel, found {len(hits)}"
    return int(hits[0][0]), int(hits[0][1])


def assert_perfect(image: np.ndarray) -> None:
    """Cells at odd coordinates all open, wall posts closed, and the cell graph a tree."""
    open_ = corridor_mask(image)
    side = open_.shape[0]
    assert open_.shape == (side, side) and side % 2 == 1
    n = (side - 1) // 2
    assert open_[1::2, 1::2].all(), "every cell is a corridor"
    assert not open_[::2, ::2].any(), "wall posts are walls"
    assert not open_[0].any() and not open_[-1].any()
    assert not open_[:, 0].any() and not open_[:, -1].any()
    edges = [
        ((r, c), (r, c + 1)) for r in range(n) for c in range(n - 1) if open_[2 * r + 1, 2 * c + 2]
    ]
    edges += [
        ((r, c), (r + 1, c)) for r in range(n - 1) for c in range(n) if open_[2 * r + 2, 2 * c + 1]
    ]
    assert len(edges) == n * n - 1, "a tree on n*n cells has n*n-1 edges"
    neighbours = collections.defaultdict(list)
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    seen, todo = {(0, 0)}, [(0, 0)]
    while todo:
        for nxt in neighbours[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert len(seen) == n * n, "connected"


def assert_route(image: np.ndarray, actions: np.ndarray, full_length: int | None = None) -> None:
    """Replaying the actions from red stays in corridors, never revisits a pixel and, when the
    route fits, ends on green followed only by waits (in a tree that is the shortest route)."""
    open_ = corridor_mask(image)
    pos, goal = find(image, md.START), find(image, md.GOAL)
    moves = [int(a) for a in actions if a != md.WAIT]
    n_moves = len(moves)
    assert list(actions[:n_moves]) == moves, "waits only pad the end"
    visited = {pos}
    for a in moves:
        dr, dc = md.MOVES[a]
        pos = (pos[0] + dr, pos[1] + dc)
        assert open_[pos], "route stays in corridors"
        assert pos not in visited, "route never revisits a pixel"
        visited.add(pos)
    if full_length is None:  # unknown: a route that stops early must have reached the goal
        assert pos == goal or n_moves == len(actions)
    elif full_length <= len(actions):
        assert pos == goal, "route ends at the goal"
        assert n_moves == full_length
    else:
        assert n_moves == len(actions), "a truncated route has no waits"


# ------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("size", list(md.PRESETS))
def test_presets_generate_perfect_mazes_with_valid_routes(size: str) -> None:
    side, route_length = md.PRESETS[size]
    example = md.generate_maze(size, seed=3, index=1)
    assert example["image"].shape == (side, side, 3) and example["image"].dtype == np.uint8
    assert example["actions"].shape == (route_length,) and example["actions"].dtype == np.int32
    assert_perfect(example["image"])
    assert_route(example["image"], example["actions"], int(example["route_length"]))


def test_many_small_and_medium_mazes_are_perfect_with_shortest_routes() -> None:
    fitted = 0
    for side, route_length in (md.PRESETS["small"], md.PRESETS["medium"]):
        for index in range(40):
            ex = md.maze_example(side, 7, index, route_length)
            assert_perfect(ex["image"])
            assert_route(ex["image"], ex["actions"], int(ex["route_length"]))
            open_ = corridor_mask(ex["image"])
            path = md.shortest_path(open_, find(ex["image"], md.START), find(ex["image"], md.GOAL))
            assert len(path) - 1 == int(ex["route_length"])
            fitted += int(ex["route_length"]) <= route_length
    assert fitted > 20, "most small/medium routes fit their route length"


def test_examples_are_deterministic_and_random_access() -> None:
    a = md.maze_example(SMALL_SIDE, 5, 11, SMALL_ROUTE)
    b = md.maze_example(SMALL_SIDE, 5, 11, SMALL_ROUTE)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], md.maze_example(SMALL_SIDE, 5, 12, SMALL_ROUTE)["image"])
    assert not np.array_equal(a["image"], md.maze_example(SMALL_SIDE, 6, 11, SMALL_ROUTE)["image"])
    source = md.MazeSource(SMALL_SIDE, SMALL_ROUTE, seed=5)
    np.testing.assert_array_equal(source[11]["image"], a["image"])
    assert md.split_seed(0, "train") != md.split_seed(0, "test") == md.split_seed(0, "eval")


def test_route_truncation_and_padding() -> None:
    np.testing.assert_array_equal(md.pad_actions(np.array([0, 3]), 4), [0, 3, 4, 4])
    np.testing.assert_array_equal(md.pad_actions(np.array([0, 3, 1, 2, 2]), 3), [0, 3, 1])
    long = next(
        ex for i in range(50) if (ex := md.maze_example(SMALL_SIDE, 0, i, 10))["route_length"] > 10
    )
    assert_route(long["image"], long["actions"], int(long["route_length"]))


def test_expand_range_and_float_scaling() -> None:
    image = md.generate_maze("small", 0, 0)["image"]
    x = md.to_float(image)
    assert x.dtype == np.float32 and set(np.unique(x)) <= {0.0, 1.0}
    np.testing.assert_allclose(md.expand_range(x), 2 * x - 1)
    assert md.expand_range(np.float32(0)) == -1 and md.expand_range(np.float32(1)) == 1


# ------------------------------------------------------------------------------------------------
# Augmentation


def test_action_permutations_match_geometry() -> None:
    up, down, left, right, wait = md.UP, md.DOWN, md.LEFT, md.RIGHT, md.WAIT
    acts = np.array([up, down, left, right, wait])
    image = np.zeros((5, 5, 3), np.uint8)
    # np.rot90 is counter-clockwise: what was above is now on the left.
    np.testing.assert_array_equal(md.rotate90(image, acts, 1)[1], [left, right, down, up, wait])
    np.testing.assert_array_equal(md.rotate90(image, acts, -1)[1], [right, left, up, down, wait])
    np.testing.assert_array_equal(md.flip_horizontal(image, acts)[1], [up, down, right, left, wait])
    np.testing.assert_array_equal(md.flip_vertical(image, acts)[1], [down, up, left, right, wait])


@pytest.mark.parametrize(
    ("k", "hflip", "vflip"), list(itertools.product(range(4), (False, True), (False, True)))
)
def test_augmentations_keep_routes_valid(k: int, hflip: bool, vflip: bool) -> None:
    for index in range(6):
        ex = md.maze_example(SMALL_SIDE, 1, index, SMALL_ROUTE)
        image, actions = md.rotate90(ex["image"], ex["actions"], k)
        if hflip:
            image, actions = md.flip_horizontal(image, actions)
        if vflip:
            image, actions = md.flip_vertical(image, actions)
        assert image.shape == ex["image"].shape
        assert_route(image, actions, int(ex["route_length"]))


def test_random_augmentation_is_seeded_and_covers_all_steps() -> None:
    ex = md.maze_example(SMALL_SIDE, 2, 0, SMALL_ROUTE)
    outs = []
    for s in range(32):
        image, actions = md.augment(ex["image"], ex["actions"], np.random.default_rng(s))
        again = md.augment(ex["image"], ex["actions"], np.random.default_rng(s))
        np.testing.assert_array_equal(image, again[0])
        np.testing.assert_array_equal(actions, again[1])
        assert_route(image, actions, int(ex["route_length"]))
        outs.append(image.tobytes())
    assert len(set(outs)) > 4, "augmentation produces several distinct views"
    identity = md.augment(ex["image"], ex["actions"], np.random.default_rng(0), p=0.0)
    np.testing.assert_array_equal(identity[0], ex["image"])


def test_maze_dataset_batches_and_determinism() -> None:
    ds = md.maze_dataset("train", "small", batch_size=4, seed=3, num_examples=16)
    assert isinstance(ds, grain.MapDataset) and len(ds) == 4
    batch = ds[1]
    assert batch["inputs"].shape == (4, SMALL_SIDE, SMALL_SIDE, 3)
    assert batch["inputs"].dtype == np.float32 and batch["targets"].dtype == np.int32
    assert batch["targets"].shape == (4, SMALL_ROUTE)
    np.testing.assert_array_equal(ds[1]["inputs"], batch["inputs"])  # per-index seeded
    for image, actions in zip(batch["inputs"], batch["targets"], strict=True):
        assert_route((image * 255).astype(np.uint8), actions)
    plain = md.maze_dataset("test", "small", batch_size=2, seed=3, expand=True)
    first = plain[0]
    assert set(np.unique(first["inputs"])) <= {-1.0, 1.0}
    ref = md.maze_example(SMALL_SIDE, md.split_seed(3, "test"), 1, SMALL_ROUTE)
    np.testing.assert_array_equal(first["targets"][1], ref["actions"])
    with pytest.raises(ValueError, match="split"):
        md.maze_dataset("validation", "small", batch_size=2)
    # Shuffled epochs of a finite set: each epoch a permutation, and epochs differ.
    shuffled = md.maze_dataset(
        "train", "small", batch_size=1, num_examples=8, shuffle=True, repeat=True, augment=False
    )
    epochs = [[shuffled[e * 8 + i]["targets"][0].tobytes() for i in range(8)] for e in range(2)]
    direct = [
        md.maze_example(SMALL_SIDE, md.split_seed(0, "train"), i, SMALL_ROUTE)["actions"].tobytes()
        for i in range(8)
    ]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(direct)
    assert epochs[0] != epochs[1]
    # Sharding splits the stream without overlap.
    s0 = md.maze_dataset("test", "small", batch_size=1, seed=3, shard_index=0, shard_count=2)
    s1 = md.maze_dataset("test", "small", batch_size=1, seed=3, shard_index=1, shard_count=2)
    np.testing.assert_array_equal(s1[0]["targets"][0], ref["actions"])
    assert not np.array_equal(s0[0]["inputs"], s1[0]["inputs"])


# ------------------------------------------------------------------------------------------------
# tfds builder (array_record, no TensorFlow) + grain


def test_tfds_builder_prepare_data_source_and_grain(tmp_path) -> None:
    import tensorflow_datasets as tfds

    from tasks.ctm_maze import tfds_builder as maze_tfds

    had_tensorflow = "tensorflow" in sys.modules
    cfg = maze_tfds.MazeConfig(name="small_test", size="small", num_train=32, num_test=8, seed=4)
    builder = maze_tfds.prepare(cfg, tmp_path)
    assert builder.info.splits["train"].num_examples == 32
    assert builder.info.splits["test"].num_examples == 8
    assert list(tmp_path.glob("generated_mazes/small_test/*/*.array_record*"))
    source = tfds.data_source(
        "generated_mazes/small_test", split="train", data_dir=tmp_path, download=False
    )
    assert len(source) == 32
    ds = grain.MapDataset.source(source)
    for index in (0, 5, 31):
        ref = md.maze_example(SMALL_SIDE, md.split_seed(4, "train"), index, SMALL_ROUTE)
        got = ds[index]
        np.testing.assert_array_equal(got["image"], ref["image"])
        np.testing.assert_array_equal(got["actions"], ref["actions"])
        assert int(got["route_length"]) == int(ref["route_length"])
    batches = md.maze_dataset(
        "test", "small", batch_size=4, data_dir=tmp_path, tfds_config="small_test", augment=True
    )
    assert len(batches) == 2
    batch = batches[1]
    assert batch["inputs"].shape == (4, SMALL_SIDE, SMALL_SIDE, 3)
    assert batch["targets"].shape == (4, SMALL_ROUTE)
    for image, actions in zip(batch["inputs"], batch["targets"], strict=True):
        assert_route((image * 255).astype(np.uint8), actions)
    assert had_tensorflow or "tensorflow" not in sys.modules, (
        "the array_record path must not import TensorFlow"
    )


def test_builder_has_a_config_per_preset() -> None:
    from tasks.ctm_maze import tfds_builder as maze_tfds

    names = {c.name for c in maze_tfds.GeneratedMazes.BUILDER_CONFIGS}
    assert names == set(md.PRESETS)


# ------------------------------------------------------------------------------------------------
# The reference's PNG layout


def draw_solution(example: dict[str, np.ndarray]) -> np.ndarray:
    """The reference's on-disk image: the full route's inner pixels painted blue."""
    image = example["image"].copy()
    start, goal = find(image, md.START), find(image, md.GOAL)
    path = md.shortest_path(corridor_mask(image), start, goal)
    for pos in path[1:-1]:
        image[pos] = md.PATH
    return image


def test_png_folder_round_trip(tmp_path) -> None:
    from PIL import Image

    examples = {}
    for split, seed in (("train", 0), ("test", 1)):
        for index in range(6):
            ex = md.maze_example(SMALL_SIDE, seed, index, SMALL_ROUTE)
            folder = tmp_path / split / "maze"
            folder.mkdir(parents=True, exist_ok=True)
            name = folder / f"{index:03d}.png"
            Image.fromarray(draw_solution(ex)).save(name)
            examples[split, index] = ex
    loaded = md.load_maze_png(tmp_path / "train" / "maze" / "002.png", SMALL_ROUTE)
    np.testing.assert_array_equal(loaded["image"], examples["train", 2]["image"])
    np.testing.assert_array_equal(loaded["actions"], examples["train", 2]["actions"])
    assert int(loaded["route_length"]) == int(examples["train", 2]["route_length"])
    folder = md.MazeImageFolder(tmp_path, "test", SMALL_ROUTE)
    assert len(folder) == 6
    for index in range(6):
        np.testing.assert_array_equal(folder[index]["image"], examples["test", index]["image"])
        np.testing.assert_array_equal(folder[index]["actions"], examples["test", index]["actions"])
    ds = md.maze_dataset("test", "small", batch_size=3, image_folder=tmp_path, augment=False)
    np.testing.assert_array_equal(ds[1]["targets"][0], examples["test", 3]["actions"])
    np.testing.assert_array_equal(ds[1]["inputs"][0], md.to_float(examples["test", 3]["image"]))


def test_png_loader_rejects_broken_images() -> None:
    ex = md.maze_example(SMALL_SIDE, 0, 0, SMALL_ROUTE)
    no_path = ex["image"].copy()
    with pytest.raises(ValueError, match="blue path"):
        md.read_solution(no_path)
    no_goal = draw_solution(ex)
    no_goal[no_goal.max(-1) == 0] = 0
    no_goal[np.all(no_goal == md.GOAL, axis=-1)] = md.CORRIDOR
    with pytest.raises(ValueError, match="goal"):
        md.read_solution(no_goal)
