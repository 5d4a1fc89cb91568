#!/usr/bin/env python
"""The training loop's own work with learning off, beside the emulator alone, on one machine in one go:

    python benchmarks/loop_cost.py --envs 16 64                  # this checkout
    python benchmarks/loop_cost.py --trainer /tmp/base --envs 16  # another checkout of the trainer
    python benchmarks/loop_cost.py --pause-us 1500                # what an idle gap between steps costs the games

For each --envs: the emulator alone (the trainer's own games, threads and pinning, random actions) and the trainer
with learning off take turns, --rounds times each; their median agent steps per second, and the trainer's as a
share of the emulator's. Then one run under cProfile: the loop thread's own time per loop step (the session,
less the time spent in the emulator's send and recv and in the run's end), and where it goes.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def load_trainer(path: Path):
    sys.path.insert(0, str(path))
    import train_breakout
    from trainer_support import atari
    return train_breakout, atari


def trainer_rate(tb, envs: int, steps: int) -> dict:
    """A real run with learning off in a throw-away folder, its own output swallowed."""
    with tempfile.TemporaryDirectory() as tmp:
        args, given = tb.parse_args(["--envs", str(envs), "--steps", str(steps), "--memory", "20000", "--seed", "1",
                                     "--learn-start", str(10**15), "--checkpoints", str(Path(tmp) / "run"),
                                     "--eval-every", "0", "--save-every", "1000000000", "--plot-every", "1000000000"])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return tb.train(args, given)


def emulator_rate(atari, envs: int, seconds: float, pause: float = 0.0, env_id: str = "ALE/Breakout-v5") -> float:
    """The games alone (`atari`: the trainer's trainer_support.atari), random actions; with `pause`, the thread spins
    that many seconds between steps, as the loop's own work would hold it (no memory traffic: what an idle gap of
    that length costs the games)."""
    games = atari.VectorGames(env_id, envs, seed=1)
    games.reset()
    actions = [np.random.default_rng(i).integers(len(games.actions), size=envs) for i in range(64)]
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        games.step(actions[steps % 64])
        steps += 1
        paused = time.perf_counter()
        while time.perf_counter() - paused < pause:
            pass
    rate = steps * envs / (time.perf_counter() - start)
    games.close()
    return rate


def loop_profile(tb, envs: int, steps: int, top: int) -> tuple[float, str]:
    """Microseconds of the loop thread's own work per loop step, and its costliest functions."""
    profile = cProfile.Profile()
    profile.runcall(trainer_rate, tb, envs, steps)
    stats = pstats.Stats(profile)
    cumulative = {f"{Path(file).name}:{name}": entry[3] for (file, _, name), entry in stats.stats.items()}
    emulator = cumulative.get("vector_env.py:send", 0) + cumulative.get("vector_env.py:recv", 0)
    own = cumulative["train_breakout.py:train_session"] - emulator - cumulative.get("train_breakout.py:finish", 0)
    text = io.StringIO()
    stats.stream = text
    stats.sort_stats("tottime").print_stats(top)
    return 1e6 * own / (steps // envs), text.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="the checkout whose train_breakout.py is measured")
    p.add_argument("--envs", type=int, nargs="+", default=[16, 64])
    p.add_argument("--steps", type=int, default=40_000, help="agent steps of each trainer run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="functions listed from the profile")
    p.add_argument("--pause-us", type=float, default=None, help="instead: the games alone, with and without a "
                   "pause of this many microseconds between steps")
    a = p.parse_args()
    tb, atari = load_trainer(a.trainer)
    if a.pause_us is not None:
        for envs in a.envs:
            for _ in range(a.rounds):
                alone, paused = (emulator_rate(atari, envs, 10, pause) for pause in (0, a.pause_us / 1e6))
                print(f"{envs} games: {1e6 * envs / alone:,.0f} us per step alone; with a pause of {a.pause_us:,.0f} "
                      f"us, {1e6 * envs / paused:,.0f} us per step ({1e6 * envs / paused - 1e6 * envs / alone:,.0f} "
                      "us more)")
        return
    rows = []
    for envs in a.envs:
        emulator, trainer = [], []
        for _ in range(a.rounds):
            run = trainer_rate(tb, envs, a.steps)
            trainer.append(run["steps"] / run["session_seconds"])
            emulator.append(emulator_rate(atari, envs, run["session_seconds"]))
        per_step, top = loop_profile(tb, envs, a.steps, a.top)
        print(f"--- {envs} games: the loop's costliest functions (cProfile, own time)\n{top}", flush=True)
        rows.append((envs, statistics.median(emulator), statistics.median(trainer), per_step))
    print(f"trainer: {a.trainer}")
    print("| games | emulator alone, steps/s | trainer, learning off, steps/s | share | loop's own work, us per loop step |")
    print("|---|---|---|---|---|")
    for envs, emulator, trainer, per_step in rows:
        print(f"| {envs} | {emulator:,.0f} | {trainer:,.0f} | {trainer / emulator:.0%} | {per_step:,.0f} |")


if __name__ == "__main__":
    main()
