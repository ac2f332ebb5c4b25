"""Pictures of a CTM at work on a maze: the predicted route, attention per tick, certainty per tick.

Pure plotting on numpy arrays (matplotlib with the Agg backend, PIL for the GIF); nothing here
touches models or checkpoints (`launch/visualise.py` does). Maze images are (H, W, 3) in [0, 1]
in the format of `tasks.ctm_maze.data`: walls black, corridors white, start red, goal green;
actions 0 up, 1 down, 2 left, 3 right, 4 wait.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

# (d_row, d_col) per action; 4 (wait) stays put.
_MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]], dtype=np.int64)
WAIT = 4
# Overlay colours: none of them occurs in a maze image (the reference draws solutions blue).
ROUTE_COLOUR = (1.0, 0.55, 0.0)  # orange: cells the route walks through
HIT_COLOUR = (1.0, 0.0, 1.0)  # magenta: the wall cell a move ran into


@dataclasses.dataclass(frozen=True)
class RouteWalk:
    """The result of walking actions through a maze, as `maze_metrics.follow_route` counts it.

    cells: (row, col) positions from the start, one per valid move (the start first); solved:
    the goal was reached before any invalid move; steps: valid moves made; hit: the wall or
    off-image cell of the first invalid move (None if none); stopped_at: the action index
    at which the walk ended (goal reached or invalid move), None if all actions were used.
    """

    cells: list[tuple[int, int]]
    solved: bool
    steps: int
    hit: tuple[int, int] | None
    stopped_at: int | None


def _colour_mask(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """(H, W) mask of the pixels whose channels are on (> 0.5) exactly where `colour` is 1."""
    on = image > 0.5
    return np.all(on == np.asarray(colour, dtype=bool), axis=-1)


def _first(mask: np.ndarray, name: str) -> tuple[int, int]:
    hits = np.argwhere(mask)
    if hits.size == 0:
        raise ValueError(f"the maze image has no {name} pixel")
    return int(hits[0, 0]), int(hits[0, 1])


def walk_route(image: np.ndarray, actions: np.ndarray) -> RouteWalk:
    """Walks `actions` (R,) from the red start of `image` (H, W, 3) in [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape[:2]
    open_ = image.max(axis=-1) > 0.5
    pos = _first(_colour_mask(image, (1, 0, 0)), "red (start)")
    goal = _first(_colour_mask(image, (0, 1, 0)), "green (goal)")
    cells, steps = [pos], 0
    for i, action in enumerate(np.asarray(actions, dtype=np.int64).reshape(-1)):
        if not 0 <= action < len(_MOVES):
            raise ValueError(f"action {action} at {i} is not one of 0..4")
        row, col = pos[0] + int(_MOVES[action, 0]), pos[1] + int(_MOVES[action, 1])
        if not (0 <= row < height and 0 <= col < width and open_[row, col]):
            return RouteWalk(cells, False, steps, (row, col), i)
        if action == WAIT:
            continue
        pos = (row, col)
        cells.append(pos)
        steps += 1
        if pos == goal:
            return RouteWalk(cells, True, steps, None, i)
    return RouteWalk(cells, False, steps, None, None)


def route_overlay(image: np.ndarray, walk: RouteWalk) -> np.ndarray:
    """A float (H, W, 3) copy of `image` with the walked cells in ROUTE_COLOUR (start and goal
    keep their colours) and the wall cell hit, if inside the image, in HIT_COLOUR."""
    out = np.array(image, dtype=np.float32, copy=True)
    start_goal = _colour_mask(out, (1, 0, 0)) | _colour_mask(out, (0, 1, 0))
    for row, col in walk.cells:
        if not start_goal[row, col]:
            out[row, col] = ROUTE_COLOUR
    if walk.hit is not None:
        row, col = walk.hit
        if 0 <= row < out.shape[0] and 0 <= col < out.shape[1]:
            out[row, col] = HIT_COLOUR
    return out


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path


def draw_route(
    image: np.ndarray, actions: np.ndarray, path: str | Path, *, title: str | None = None
) -> RouteWalk:
    """Saves a PNG of the maze with the route of `actions` drawn: visited cells orange, arrows
    along the moves, a magenta X on the wall a move ran into (or a ring where the route ends
    short of the goal), and a title with solved yes/no and the valid steps. Returns the walk."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    walk = walk_route(image, actions)
    height, width = image.shape[:2]
    side = float(np.clip(max(height, width) / 6.0, 4.0, 9.0))
    fig, ax = plt.subplots(figsize=(side, side + 0.6), dpi=100)
    ax.imshow(route_overlay(image, walk), interpolation="nearest")
    cells = np.asarray(walk.cells, dtype=np.float64)
    if len(cells) > 1:
        d = np.diff(cells, axis=0)
        ax.quiver(
            cells[:-1, 1],
            cells[:-1, 0],
            d[:, 1],
            d[:, 0],
            angles="xy",
            scale_units="xy",
            scale=1.0,
            color="saddlebrown",
            width=0.004,
            headwidth=4,
        )
    if walk.hit is not None:
        ax.plot(walk.hit[1], walk.hit[0], "x", color="purple", ms=10, mew=2.5, label="hit a wall")
    elif not walk.solved:
        end = walk.cells[-1]
        ax.plot(end[1], end[0], "o", mfc="none", mec="purple", ms=12, mew=2, label="route ends")
    if walk.hit is not None or not walk.solved:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    status = "yes" if walk.solved else "no"
    ax.set_title(f"{title + chr(10) if title else ''}solved: {status}, steps: {walk.steps}")
    fig.tight_layout()
    _save(fig, path)
    return walk


def certainty_plot(certainties: np.ndarray, path: str | Path, *, title: str | None = None) -> Path:
    """Saves a PNG of certainty (1 - normalised entropy, row 1 of `certainties`) per tick.

    certainties: (2, T) for one example or (B, 2, T) for several (thin lines plus their mean in
    bold). The most certain tick (of the one example, or of the mean) is marked with a star and
    a dashed line; with several examples each one's most certain tick is a dot.
    """
    c = np.asarray(certainties, dtype=np.float64)
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3 or c.shape[1] != 2:
        raise ValueError(f"certainties must be (2, T) or (B, 2, T), got {np.shape(certainties)}")
    curves = c[:, 1]  # (B, T)
    ticks = np.arange(1, curves.shape[1] + 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if len(curves) > 1:
        for curve in curves:
            ax.plot(ticks, curve, color="tab:blue", lw=0.8, alpha=0.35)
        best = curves.argmax(axis=1)
        ax.scatter(ticks[best], curves[np.arange(len(curves)), best], s=10, color="tab:blue")
        main = curves.mean(axis=0)
        label = f"mean of {len(curves)}"
    else:
        main, label = curves[0], "certainty"
    ax.plot(
        ticks, main, color="tab:blue", lw=2.2, label=label, marker="." if len(ticks) < 40 else ""
    )
    top = int(main.argmax())
    ax.axvline(ticks[top], color="tab:red", ls="--", lw=1)
    ax.plot(
        ticks[top], main[top], "*", color="tab:red", ms=14, label=f"most certain: tick {top + 1}"
    )
    ax.set_xlabel("internal tick")
    ax.set_ylabel("certainty (1 - normalised entropy)")
    ax.set_xlim(0.5, ticks[-1] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "certainty per tick")
    fig.tight_layout()
    return _save(fig, path)


def upsample_attention(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of (..., h, w) maps to (..., H, W): output pixel (i, j) takes
    the feature cell that covers its centre, floor((i + 0.5) * h / H)."""
    maps = np.asarray(maps)
    h, w = maps.shape[-2:]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return maps[..., rows, :][..., cols]


def _normalise(m: np.ndarray) -> np.ndarray:
    """Scales a map to [0, 1] by its own range (flat maps become 0)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _figure_rgb(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


_HEADS_PER_ROW = 8


def _overlay(ax: plt.Axes, background: np.ndarray, weights: np.ndarray) -> None:
    """The maze with an attention map on top, opaque where the map is high."""
    norm = _normalise(weights)
    ax.imshow(background, interpolation="nearest")
    ax.imshow(
        norm, cmap="inferno", vmin=0, vmax=1, alpha=0.1 + 0.75 * norm, interpolation="nearest"
    )
    ax.set_axis_off()


def attention_frames(
    image: np.ndarray, attention: np.ndarray, feature_hw: tuple[int, int]
) -> list[np.ndarray]:
    """uint8 RGB frames, one per tick: the maze with the head-averaged attention map (each frame
    scaled to its own range) overlaid, and the heads' maps as small panels below.

    attention: (T, heads, L) or (T, heads, 1, L) with L = h * w, the backbone feature map
    flattened row-major.
    """
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    att = np.asarray(attention, dtype=np.float32)
    if att.ndim == 4 and att.shape[2] == 1:
        att = att[:, :, 0]
    h, w = feature_hw
    if att.ndim != 3 or att.shape[-1] != h * w:
        raise ValueError(
            f"attention must be (T, heads, L) with L = {h}*{w}, got {np.shape(attention)}"
        )
    ticks, heads = att.shape[:2]
    maps = att.reshape(ticks, heads, h, w)
    size = image.shape[:2]
    big_heads = upsample_attention(maps, size)  # (T, heads, H, W)
    big_mean = upsample_attention(maps.mean(axis=1), size)  # (T, H, W)
    dimmed = 0.2 + 0.6 * image  # keeps walls, corridors, start and goal readable underneath
    cols = min(heads, _HEADS_PER_ROW)
    rows = -(-heads // cols)
    frames = []
    for t in range(ticks):
        fig = plt.figure(figsize=(max(4.5, 1.2 * cols), 4.5 + 1.25 * rows), dpi=80)
        grid = fig.add_gridspec(1 + rows, cols, height_ratios=[4.5] + [1.15] * rows)
        fig.subplots_adjust(left=0.03, right=0.97, top=0.94, bottom=0.02, hspace=0.25)
        ax = fig.add_subplot(grid[0, :])
        _overlay(ax, dimmed, big_mean[t])
        ax.set_title(f"attention, tick {t + 1}/{ticks} (mean of {heads} heads)", fontsize=10)
        for k in range(heads):
            sub = fig.add_subplot(grid[1 + k // cols, k % cols])
            _overlay(sub, dimmed, big_heads[t, k])
            sub.set_title(f"head {k}", fontsize=7, pad=2)
        frames.append(_figure_rgb(fig))
        plt.close(fig)
    return frames


def attention_gif(
    image: np.ndarray,
    attention: np.ndarray,
    feature_hw: tuple[int, int],
    path: str | Path,
    *,
    fps: float = 4.0,
) -> Path:
    """Saves `attention_frames(image, attention, feature_hw)` as a looping GIF, one frame per
    tick at `fps` frames per second."""
    frames = [Image.fromarray(f) for f in attention_frames(image, attention, feature_hw)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=int(round(1000.0 / fps)),
        loop=0,
        optimize=False,
        disposal=1,
    )
    return path
