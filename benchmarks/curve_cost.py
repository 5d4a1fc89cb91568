#!/usr/bin/env python
"""What a redraw of curve.png costs the training loop as a run grows: for histories of synthetic games (and as
many learning rows), the seconds spent thinning the points (curve_data) and drawing them (draw_curve).

    python benchmarks/curve_cost.py                       # 10,000 to 10,000,000 games
    python benchmarks/curve_cost.py --games 200000
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer_support.curve import History, Rows, draw_curve  # noqa: E402
import train_breakout as tb  # noqa: E402


def history_of(games: int) -> History:
    """A run's history with `games` finished games, a learning row per game, a life row per 2,500 lives."""
    rng, history = np.random.default_rng(0), History(tb.WALL_CLEARED)
    steps = np.cumsum(rng.integers(100, 3000, games))
    scores = rng.integers(0, 400, games).astype(float)
    history.games = Rows(3, np.column_stack([steps, steps / 5000, scores]))
    history.learning = Rows(3, np.column_stack([steps, rng.random(games), rng.random(games)]))
    history.lives = Rows(3, np.column_stack([steps[::500], np.arange(0, games, 500) * 5, scores[::500]]))
    history.evals = Rows(5, np.column_stack([steps[::2000], steps[::2000] / 5000, scores[::2000],
                                                scores[::2000], np.zeros(len(steps[::2000]))]))
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--games", type=int, nargs="+", default=[10_000, 200_000, 1_000_000, 10_000_000])
    a = p.parse_args()
    print(f"{'games':>12} | {'thinning, s':>15} | {'drawing, s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for games in a.games:
            history = history_of(games)
            started = time.perf_counter()
            data = history.curve_data()
            handing = time.perf_counter() - started
            started = time.perf_counter()
            draw_curve(Path(tmp) / "curve.png", data, "ALE/Breakout-v5")
            drawing = time.perf_counter() - started
            print(f"{games:>12,} | {handing:>15.3f} | {drawing:>10.3f}")


if __name__ == "__main__":
    main()
