#!/usr/bin/env python
"""How long periodic work stops the training loop: a real run of the trainer in which, at one step, a
snapshot, a curve redraw, an evaluation and a full checkpoint all fall due together; prints how long that
step's periodic work held the loop, the longest hold over the run, and the run's agent steps/s.

    python benchmarks/periodic_stall.py                                 # this checkout's trainer
    python benchmarks/periodic_stall.py -- --eval-beside on             # flags after -- go to the trainer
    git worktree add /tmp/before HEAD~1 && python benchmarks/periodic_stall.py --trainer /tmp/before

The curve's history is filled with --games synthetic games before that step, so that the redraw costs what
it costs late in a long run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def load_trainer(folder: Path):
    """train_breakout.py of `folder` (another checkout, to measure an earlier version) as a module."""
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("train_breakout", folder / "train_breakout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_breakout"] = module  # a helper process imports it by this name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", default=str(Path(__file__).resolve().parent.parent),
                   help="folder holding the train_breakout.py to measure")
    p.add_argument("--steps", type=int, default=30_000, help="agent steps of the run")
    p.add_argument("--due-at", type=int, default=20_000, help="agent step at which everything falls due (0: none; "
                   "only the run's own schedules, for its steps/s and longest hold)")
    p.add_argument("--games", type=int, default=200_000, help="synthetic games in the curve's history by then")
    p.add_argument("trainer_flags", nargs="*", help="more flags for the trainer (after --)")
    a = p.parse_args()
    tb = load_trainer(Path(a.trainer).resolve())
    holds, due = [], {}
    periodic_work = tb.periodic_work

    def timed(run, session):
        counters = run.counters
        if not due and a.due_at and counters.steps >= a.due_at:
            rng = np.random.default_rng(0)
            for i, score in enumerate(rng.integers(0, 30, a.games)):  # not timed: the history of a long run
                run.history.games.append([i, i, float(score)])
            run.snapshots.next = run.curve.next = counters.episodes
            run.evaluations.next, session.checkpoint_due.next = counters.steps, session.seconds()
            run.history.drawn = 0.0  # the curve is drawn at most once a minute: due now
            due["step"] = counters.steps
        started = time.perf_counter()
        periodic_work(run, session)
        holds.append((counters.steps, time.perf_counter() - started))

    tb.periodic_work = timed
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--recipe", "fast", "--steps", str(a.steps), "--memory", "200000", "--seed", "1",
                 "--eval-every", str(10**9), "--checkpoints", str(Path(tmp) / "run"), *a.trainer_flags]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            started = time.perf_counter()
            summary = tb.train(*tb.parse_args(flags))
            whole = time.perf_counter() - started
    at_due = next((h for s, h in holds if s == due.get("step")), float("nan"))
    others = sorted(h for s, h in holds if s != due.get("step"))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               "") if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"{'trainer':>46} | {a.trainer}")
    print(f"{'machine':>46} | {cpu}, {os.cpu_count()} cores")
    shown = [f for f in flags if f != "--checkpoints" and not f.startswith(tmp)]
    print(f"{'flags':>46} | {' '.join(shown)}")
    print(f"{'step with everything due':>46} | {due.get('step', 'none')}")
    print(f"{'loop held at that step, s':>46} | {at_due:.3f}")
    print(f"{'longest hold at any other step, s':>46} | {others[-1]:.3f}")
    print(f"{'periodic work over the run, s':>46} | {sum(h for _, h in holds):.2f} of {whole:.1f}")
    print(f"{'agent steps/s (the whole call)':>46} | {summary['steps'] / whole:.1f}")
    print(f"stall_s={at_due:.3f} longest_other_s={others[-1]:.3f} steps_per_s={summary['steps'] / whole:.1f}")


if __name__ == "__main__":
    main()
