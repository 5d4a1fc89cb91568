"""curve.png: scores per game and per life, evaluations, loss and Q; the run's history of them, in tables that grow a
row at a time; at most CURVE_POINTS points a line, so that a redraw costs the same at any run length."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

CURVE_POINTS = 2_000


class Rows:
    """A table that grows a row at a time, in one float64 array that doubles when full: 10 million rows cost a
    fraction of what Python lists of them would, and `array` costs nothing."""

    def __init__(self, width: int, rows=()):
        rows = np.asarray(rows, float).reshape(-1, width)
        self.data, self.n = np.zeros((max(64, 2 * len(rows)), width)), len(rows)
        self.data[:self.n] = rows

    def append(self, row) -> None:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
        self.data[self.n] = row
        self.n += 1

    @property
    def array(self) -> np.ndarray:
        """The rows so far, (n, width); a view, so copy it before handing it to another thread."""
        return self.data[:self.n]


class History:
    """What curve.png draws, in rows of (agent step, seconds, score) per game, (step, episode, mean life score) per
    redraw, (step, seconds, mean, max, games clearing the wall) per evaluation, (step, loss, mean Q) per row."""

    COLUMNS = dict(games=3, lives=3, evals=5, learning=3)
    ARRAYS = tuple(COLUMNS)  # a checkpoint's arrays

    def __init__(self, wall: float):
        self.wall, self.drawn = wall, 0.0  # the score of a cleared wall; when curve.png was last drawn
        for name, width in self.COLUMNS.items():
            setattr(self, name, Rows(width))

    def state_dict(self) -> dict:
        return {name: getattr(self, name).array for name in self.COLUMNS}

    def load_state_dict(self, state: dict) -> None:
        for name, width in self.COLUMNS.items():
            setattr(self, name, Rows(width, state[name]))

    def curve_data(self) -> dict:
        """What curve.png draws, thinned (curve_data)."""
        return curve_data(self.games.array, self.lives.array, self.evals.array, self.learning.array, self.wall)

    def redraw(self, path: Path, title: str, writes, at_most_every: float = 0.0) -> None:
        """curve.png through `writes` (files.Writes: a full disk is one warning); not within `at_most_every` seconds
        of the last redraw (in the training loop a redraw holds it 0.25 to 0.35 s: BENCHMARKS.md)."""
        if time.time() - self.drawn >= at_most_every:
            writes(path, draw_curve, path, self.curve_data(), title)
            self.drawn = time.time()


def bins(n: int, points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` runs of consecutive rows out of `n`: the indices of each one's first and last row."""
    ends = np.unique(np.linspace(0, n - 1, min(n, points)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    return np.concatenate([[0], ends[:-1] + 1]).astype(np.int64), ends


def thinned(rows: np.ndarray, points: int = CURVE_POINTS) -> np.ndarray:
    """At most `points` rows: each the mean of a run of consecutive rows, at the x (column 0) of its last one."""
    if len(rows) <= points:
        return rows.copy()
    starts, ends = bins(len(rows), points)
    return np.column_stack([rows[ends, 0], np.add.reduceat(rows[:, 1:], starts) / (ends - starts + 1)[:, None]])


def curve_data(games: np.ndarray, lives: np.ndarray, evals: np.ndarray, learning: np.ndarray, wall: float,
               window: int = 100) -> dict:
    """What curve.png draws from rows of (step, seconds, score) per game, (step, episode, mean) per life window,
    (step, seconds, mean, max, cleared) per evaluation and (step, loss, mean Q): up to CURVE_POINTS games one by
    one; past that, each run of games between two points shows its lowest and highest score, the mean of the
    `window` games up to its end and the best game so far; the other lines are averaged over runs of rows.
    Cheap enough to run in the training loop."""
    data = dict(lives=thinned(lives), evals=thinned(evals), learning=thinned(learning), wall=wall)
    if len(games):
        scores, (starts, ends) = games[:, 2], bins(len(games))
        last = ends[:, None] - np.arange(window)[None, :]  # the `window` games up to each point
        inside = last >= 0
        mean = np.where(inside, scores[np.maximum(last, 0)], 0).sum(1) / inside.sum(1)
        low, high = np.minimum.reduceat(scores, starts), np.maximum.reduceat(scores, starts)
        cleared, first_clear = np.flatnonzero(high >= wall), None
        if len(cleared):
            i = starts[cleared[0]] + np.argmax(scores[starts[cleared[0]]:ends[cleared[0]] + 1] >= wall)
            first_clear = games[i, 0]
        data.update(step=games[ends, 0], low=low, high=high, mean=mean, best=np.maximum.accumulate(high),
                    first_clear=first_clear, each_game=len(ends) == len(games))
    return data


def draw_curve(path: Path, data: dict, title: str) -> None:
    """curve.png from `curve_data`: scores per game and per life (windowed means), evaluations, wall mark; loss
    and Q below. The file is replaced whole, so a reader never sees half a picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lives, evals, learn = data["lives"], data["evals"], data["learning"]
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                        gridspec_kw=dict(height_ratios=[3, 1, 1]))
    if "step" in data:
        x = data["step"] / 1e6
        if data["each_game"]:
            top.plot(x, data["high"], ".", color="0.8", ms=2, label="game score")
        else:
            top.fill_between(x, data["low"], data["high"], color="0.85", lw=0, label="game scores, lowest to highest")
        top.plot(x, data["mean"], color="C0", lw=2, label="game score, mean of 100 games")
        top.plot(x, data["best"], color="C2", lw=1, ls="--", label="best game so far")
    if len(lives):
        top.plot(lives[:, 0] / 1e6, lives[:, 2], color="C1", lw=1.5, label="life score, mean per plot window")
    if len(evals):
        top.plot(evals[:, 0] / 1e6, evals[:, 2], "o-" if len(evals) <= 200 else "-", color="C3", ms=4,
                 label="evaluation mean")
    if data.get("first_clear") is not None:
        top.axvline(data["first_clear"] / 1e6, color="k", ls=":", lw=1)
        top.annotate(" wall cleared", (data["first_clear"] / 1e6, data["wall"]), fontsize=9)
    top.set_ylabel("score (points)")
    top.set_title(f"{title}: training progress")
    if top.get_legend_handles_labels()[0]:
        top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    if len(learn):
        mid.plot(learn[:, 0] / 1e6, learn[:, 1], color="C4")
        low.plot(learn[:, 0] / 1e6, learn[:, 2], color="C5")
    mid.set_ylabel("Huber loss")
    low.set_ylabel("mean Q")
    low.set_xlabel("agent steps (millions)")
    for ax in (mid, low):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)

