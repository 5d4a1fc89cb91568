#!/usr/bin/env python
"""What building the games costs: seconds and resident memory per game for ale-py's vector environment, built
as the trainer builds it (the emulator's greyscale Breakout) and then reset. It sets train_breakout.py's bound
on --envs (trainer_support/atari.py: GAMES_PER_CORE, GAME_BYTES), and how long a stop during the build waits.

    python benchmarks/game_build.py --envs 16 128
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer_support.atari import VectorGames  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[16, 128])
    args = parser.parse_args()
    process = psutil.Process()
    print(f"{psutil.cpu_count()} CPUs; games, then per game: build seconds, reset seconds, MB resident after reset")
    for n in args.envs:
        rss, started = process.memory_info().rss, time.perf_counter()
        games = VectorGames("ALE/Breakout-v5", n, seed=1)
        built = time.perf_counter()
        games.reset()
        reset = time.perf_counter()
        grown = process.memory_info().rss - rss
        print(f"{n:6d} games: {(built - started) / n * 1e3:6.1f} ms to build, {(reset - built) / n * 1e3:6.1f} ms to "
              f"reset, {grown / n / 1e6:5.2f} MB; {reset - started:.1f} s in all", flush=True)
        games.env.close()
        del games


if __name__ == "__main__":
    main()
