"""Maze data without downloads: generated perfect mazes in the CTM reference's image format.

Format (the reference's `MazeImageFolder` after loading): an RGB image of an odd pixel grid,
walls black, corridors white, start red (1, 0, 0), goal green (0, 1, 0). A maze of n cells per
side renders to 2n+1 pixels: cells sit at odd (row, col), the pixels between two odd coordinates
are passages (white when the two cells are joined) and everything else is wall. Targets are the
route from start to goal as pixel steps, 0 up (row-1), 1 down (row+1), 2 left (col-1),
3 right (col+1), padded with 4 (wait) to the route length and truncated to it.

Generation: a perfect maze (exactly one route between any two cells) by the randomized
depth-first backtracker over the cell grid, start and goal two distinct cells drawn uniformly
at random. Example `index` of stream `seed` is drawn from `np.random.default_rng([seed, index])`,
so any example is random-access and deterministic. Routes longer than the route length are
truncated, as the reference does.

Also here: the reference's train augmentations (each with p=0.5: a +-90 degree rotation, a
horizontal flip, a vertical flip) with the action relabelling derived from the geometry, a
loader for the reference's published layout (`root/{train,test}/<class>/*.png` with the
solution drawn blue), and `maze_dataset`, the grain pipeline a maze Task uses.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from core.errors import ConfigError, DataError

# Image side in pixels and route length per preset (the reference's HF size table).
PRESETS: dict[str, tuple[int, int]] = {
    # Ours, for the 2-core CPU demo: 5x5 cells; 95% of random start/goal routes fit in 32 steps.
    "tiny": (11, 32),
    "small": (15, 50),
    "medium": (19, 50),
    "large": (39, 100),
    "extralarge": (99, 100),
}

UP, DOWN, LEFT, RIGHT, WAIT = 0, 1, 2, 3, 4
NUM_ACTIONS = 5
# (d_row, d_col) of each move action.
MOVES: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))

WALL = (0, 0, 0)
CORRIDOR = (255, 255, 255)
START = (255, 0, 0)
GOAL = (0, 255, 0)
PATH = (0, 0, 255)

# Streams without a given size are effectively infinite; grain needs a length.
STREAM_LENGTH = 2**62

Position = tuple[int, int]


def preset(size: str) -> tuple[int, int]:
    """(image side in pixels, route length) of a preset name."""
    if size not in PRESETS:
        raise ConfigError(f"unknown maze size {size!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[size]


# ------------------------------------------------------------------------------------------------
# Generation


def generate_corridors(cells: int, rng: np.random.Generator) -> np.ndarray:
    """(2n+1, 2n+1) bool corridor mask of a perfect maze of n x n cells (randomized DFS)."""
    if cells < 1:
        raise ValueError(f"cells={cells} must be >= 1")
    side = 2 * cells + 1
    open_ = np.zeros((side, side), dtype=bool)
    visited = np.zeros((cells, cells), dtype=bool)
    first = (int(rng.integers(cells)), int(rng.integers(cells)))
    visited[first] = True
    open_[2 * first[0] + 1, 2 * first[1] + 1] = True
    stack = [first]
    while stack:
        r, c = stack[-1]
        options = [
            (r + dr, c + dc)
            for dr, dc in MOVES
            if 0 <= r + dr < cells and 0 <= c + dc < cells and not visited[r + dr, c + dc]
        ]
        if not options:
            stack.pop()
            continue
        nr, nc = options[int(rng.integers(len(options)))]
        visited[nr, nc] = True
        open_[2 * nr + 1, 2 * nc + 1] = True
        open_[r + nr + 1, c + nc + 1] = True  # the passage between the two cells
        stack.append((nr, nc))
    return open_


def shortest_path(passable: np.ndarray, start: Position, goal: Position) -> list[Position]:
    """Pixel path start..goal (both included) through `passable` by BFS; [] when unreachable."""
    h, w = passable.shape
    parent: dict[Position, Position | None] = {start: None}
    queue = collections.deque([start])
    while queue:
        pos = queue.popleft()
        if pos == goal:
            path = [pos]
            while (prev := parent[path[-1]]) is not None:
                path.append(prev)
            return path[::-1]
        for dr, dc in MOVES:
            nxt = (pos[0] + dr, pos[1] + dc)
            if 0 <= nxt[0] < h and 0 <= nxt[1] < w and passable[nxt] and nxt not in parent:
                parent[nxt] = pos
                queue.append(nxt)
    return []


def path_to_actions(path: Sequence[Position]) -> np.ndarray:
    """Actions (int32, unpadded) that walk a pixel path of unit steps."""
    actions = []
    for (r0, c0), (r1, c1) in zip(path[:-1], path[1:], strict=True):
        actions.append(MOVES.index((r1 - r0, c1 - c0)))
    return np.asarray(actions, dtype=np.int32)


def pad_actions(actions: np.ndarray, route_length: int) -> np.ndarray:
    """Truncate to `route_length` or pad with WAIT up to it (int32)."""
    out = np.full(route_length, WAIT, dtype=np.int32)
    n = min(len(actions), route_length)
    out[:n] = np.asarray(actions)[:n]
    return out


def render(corridors: np.ndarray, start: Position, goal: Position) -> np.ndarray:
    """uint8 (H, W, 3) image: walls black, corridors white, start red, goal green."""
    image = np.zeros((*corridors.shape, 3), dtype=np.uint8)
    image[corridors] = CORRIDOR
    image[start] = START
    image[goal] = GOAL
    return image


def maze_example(side: int, seed: int, index: int, route_length: int) -> dict[str, np.ndarray]:
    """Example `index` of stream `seed`: a `side` x `side` maze (side odd, >= 5).

    Returns image uint8 (side, side, 3), actions int32 (route_length,) and route_length int32,
    the length of the full (untruncated) route.
    """
    if side < 5 or side % 2 == 0:
        raise ValueError(f"side={side} must be odd and >= 5 (at least 2x2 cells)")
    rng = np.random.default_rng([seed, index])
    cells = (side - 1) // 2
    corridors = generate_corridors(cells, rng)
    a, b = rng.choice(cells * cells, size=2, replace=False)
    start = (2 * int(a // cells) + 1, 2 * int(a % cells) + 1)
    goal = (2 * int(b // cells) + 1, 2 * int(b % cells) + 1)
    actions = path_to_actions(shortest_path(corridors, start, goal))
    return {
        "image": render(corridors, start, goal),
        "actions": pad_actions(actions, route_length),
        "route_length": np.int32(len(actions)),
    }


def generate_maze(size: str, seed: int, index: int) -> dict[str, np.ndarray]:
    """`maze_example` for a preset name ('small', 'medium', 'large', 'extralarge')."""
    side, route_length = preset(size)
    return maze_example(side, seed, index, route_length)


@dataclasses.dataclass(frozen=True)
class MazeSource:
    """grain random-access source: element i is `maze_example(side, seed, i, route_length)`."""

    side: int
    route_length: int
    seed: int
    num_examples: int = STREAM_LENGTH

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= int(index) < self.num_examples:
            raise IndexError(index)
        return maze_example(self.side, self.seed, int(index), self.route_length)


# ------------------------------------------------------------------------------------------------
# Scaling and augmentation


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 image -> float32 in [0, 1] (the reference's /255)."""
    return np.asarray(image, dtype=np.float32) / 255.0


def expand_range(x: np.ndarray) -> np.ndarray:
    """The reference's default input scaling: [0, 1] -> [-1, 1]."""
    return x * 2 - 1


def action_permutation(transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(5,) int32 map old action -> new action for a spatial transform of (H, W, ...) arrays.

    Derived from geometry: the transform is applied to a 3x3 grid of labels and each move's
    neighbour of the centre is looked up in the result. WAIT maps to itself.
    """
    labels = np.arange(9).reshape(3, 3)
    moved = transform(labels)
    if moved[1, 1] != 4:
        raise ValueError("transform must keep the centre of a 3x3 grid fixed")
    perm = np.arange(NUM_ACTIONS, dtype=np.int32)
    for action, (dr, dc) in enumerate(MOVES):
        r, c = np.argwhere(moved == labels[1 + dr, 1 + dc])[0]
        perm[action] = MOVES.index((int(r) - 1, int(c) - 1))
    return perm


def _apply(
    transform: Callable[[np.ndarray], np.ndarray], image: np.ndarray, actions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(transform(image)), action_permutation(transform)[actions]


def rotate90(image: np.ndarray, actions: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by k x 90 degrees counter-clockwise (np.rot90 on axes 0, 1), actions relabelled."""
    return _apply(lambda x: np.rot90(x, k, axes=(0, 1)), image, actions)


def flip_horizontal(image: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right (columns reversed); left and right swap."""
    return _apply(lambda x: np.flip(x, axis=1), image, actions)


def flip_vertical(image: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror top-bottom (rows reversed); up and down swap."""
    return _apply(lambda x: np.flip(x, axis=0), image, actions)


def augment(
    image: np.ndarray, actions: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's train augmentation, each step with probability p: a rotation by +90 or
    -90 degrees (sign uniform), a horizontal flip, a vertical flip."""
    if rng.random() < p:
        image, actions = rotate90(image, actions, 1 if rng.random() < 0.5 else -1)
    if rng.random() < p:
        image, actions = flip_horizontal(image, actions)
    if rng.random() < p:
        image, actions = flip_vertical(image, actions)
    return image, actions


class MazeAugment(grain.transforms.RandomMap):
    """grain random map applying `augment` to an example's image and actions."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image, actions = augment(element["image"], element["actions"], rng, self.p)
        return {**element, "image": image, "actions": actions}


# ------------------------------------------------------------------------------------------------
# The reference's published layout: root/{train,test}/<class>/*.png, solution drawn in blue


def _colour_mask(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels whose channels are each on the same side of 128 as `colour`'s."""
    return np.all((image >= 128) == (np.asarray(colour) >= 128), axis=-1)


def _single(mask: np.ndarray, what: str) -> Position:
    found = np.argwhere(mask)
    if len(found) != 1:
        raise DataError(f"expected exactly one {what} pixel, found {len(found)}")
    return int(found[0][0]), int(found[0][1])


def read_solution(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clean uint8 image, unpadded actions) from an RGB uint8 maze with the solution in blue.

    The route is the shortest walk from the red start to the green goal over blue pixels; the
    blue pixels are then painted white, as the reference does.
    """
    image = np.asarray(image)[..., :3].astype(np.uint8)
    start = _single(_colour_mask(image, START), "start (red)")
    goal = _single(_colour_mask(image, GOAL), "goal (green)")
    blue = _colour_mask(image, PATH)
    passable = blue.copy()
    passable[start] = passable[goal] = True
    path = shortest_path(passable, start, goal)
    if not path:
        raise DataError("no blue path joins the start to the goal")
    clean = image.copy()
    clean[blue] = CORRIDOR
    return clean, path_to_actions(path)


def load_maze_png(
    path: str | os.PathLike, route_length: int, side: int | None = None, size: str = ""
) -> dict[str, np.ndarray]:
    """One PNG of the reference layout -> image uint8 (H, W, 3), actions (route_length,).

    DataError naming the file when it is not a readable image, is not `side` x `side` pixels
    (when `side` is given; `size`, the preset's name, only goes into the message), or has no
    single start / goal pixel or no blue route between them."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: not a readable image ({detail})") from None
    if side is not None and image.shape[:2] != (side, side):
        height, width = image.shape[:2]
        of = f" (maze size {size!r})" if size else ""
        raise DataError(f"{path}: image is {width}x{height} pixels, expected {side}x{side}{of}")
    try:
        clean, actions = read_solution(image)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return {
        "image": clean,
        "actions": pad_actions(actions, route_length),
        "route_length": np.int32(len(actions)),
    }


class MazeImageFolder:
    """Random-access source over `root/<split>/<class>/*.png` (files in sorted order), decoded
    lazily with `load_maze_png` (which checks each image: size `side` x `side` when given, one
    start, one goal, a route). The first image is decoded when the source is built, so a folder
    of the wrong maze size fails before any training starts; DataError names the file."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        route_length: int,
        side: int | None = None,
        size: str = "",
    ) -> None:
        base = os.path.join(root, split)
        if not os.path.isdir(root):
            raise DataError(
                f"maze image folder {root} does not exist (expected the layout "
                "<folder>/{train,test}/<class>/*.png)"
            )
        self.files = sorted(
            os.path.join(dirpath, name)
            for dirpath, _, names in os.walk(base)
            for name in names
            if name.lower().endswith(".png")
        )
        if not self.files:
            raise DataError(
                f"no PNG files under {base} (expected the layout {root}/{split}/<class>/*.png)"
            )
        self.route_length = route_length
        self.side = side
        self.size = size
        self[0]  # fail now, not after compiling, when the folder holds another kind of image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return load_maze_png(self.files[int(index)], self.route_length, self.side, self.size)


# ------------------------------------------------------------------------------------------------
# grain pipeline

SPLITS = {"train": 0, "test": 1, "eval": 1}


def split_seed(seed: int, split: str) -> int:
    """Stream seed of a split: 2*seed for train, 2*seed+1 for test/eval (never shared)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return 2 * seed + SPLITS[split]


def to_model_batch_element(element: dict[str, Any], expand: bool = False) -> dict[str, np.ndarray]:
    """Example -> dict(inputs float32 (H, W, 3), targets int32 (route_length,))."""
    x = to_float(element["image"])
    return {
        "inputs": expand_range(x) if expand else x,
        "targets": np.asarray(element["actions"], dtype=np.int32),
    }


def maze_dataset(
    split: str,
    size: str,
    *,
    batch_size: int,
    seed: int = 0,
    num_examples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    tfds_config: str | None = None,
    image_folder: str | os.PathLike | None = None,
    augment: bool | None = None,
    expand: bool = False,
    shuffle: bool = False,
    repeat: bool = False,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
) -> grain.MapDataset:
    """Batches dict(inputs (B, H, W, 3) float32, targets (B, route_length) int32).

    Source, by priority: `image_folder` (the reference layout, `size` gives the route length),
    `data_dir` (the tfds dataset `generated_mazes/<tfds_config or size>`, which
    `maze_tfds.prepare` must have written there), else mazes generated on the fly from stream
    `split_seed(seed, split)` (infinite unless `num_examples`). The pipeline: first
    `num_examples`, shuffle (a new permutation each epoch), repeat (epochs without end),
    augment (default: on for 'train'), shard, scale (`expand`: [-1, 1] instead of [0, 1]),
    batch. Shuffling and augmentation are seeded by `seed` per index, so batch j is the same
    whatever the run history.
    """
    split_seed(seed, split)  # validates the split name
    side, route_length = preset(size)
    stored_split = "train" if split == "train" else "test"
    if image_folder is not None:
        source: Any = MazeImageFolder(image_folder, stored_split, route_length, side, size)
    elif data_dir is not None:
        import tensorflow_datasets as tfds

        from tasks.ctm_maze import tfds_builder as maze_tfds  # registers the builder

        name = f"{maze_tfds.GeneratedMazes.name}/{tfds_config or size}"
        try:
            source = tfds.data_source(
                name, split=stored_split, data_dir=os.fspath(data_dir), download=False
            )
        except (NotImplementedError, OSError):  # not prepared there (as array_record)
            raise DataError(
                f"{data_dir} holds no prepared {name} dataset in array_record format; write it "
                f"with tasks.ctm_maze.tfds_builder.prepare({(tfds_config or size)!r}, data_dir)"
            ) from None
    else:
        stream = split_seed(seed, split)
        source = MazeSource(side, route_length, stream, num_examples or STREAM_LENGTH)
    ds = grain.MapDataset.source(source)
    if num_examples is not None and len(ds) > num_examples:
        ds = ds[:num_examples]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    if augment if augment is not None else split == "train":
        # Before sharding: the augmentation is seeded by the global index, so an example looks
        # the same whichever process reads it (and however many there are).
        ds = ds.random_map(MazeAugment(), seed=seed)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.map(functools.partial(to_model_batch_element, expand=expand))
    return ds.batch(batch_size, drop_remainder=drop_remainder)
