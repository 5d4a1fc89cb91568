#!/usr/bin/env python
"""Time to a score: train for a budget of minutes, then print the evaluation curve as score against
wall-clock minutes and agent steps, and draw it.

    python benchmarks/time_to_score.py --minutes 60 --checkpoints runs/fast-cpu -- --recipe fast --seed 1
    python benchmarks/time_to_score.py --report runs/fast-cpu     # the curve of a run that already exists

Flags after `--` go to train_breakout.py unchanged.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def evaluations(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["kind"] == "eval"]


def first_reaching(rows: list[dict], score: float):
    return next((r for r in rows if float(r["score"]) >= score), None)


def report(run: Path, picture: Path) -> None:
    rows = evaluations(run)
    if not rows:
        sys.exit(f"error: {run}/metrics.csv has no evaluation rows yet")
    print(f"{'minutes':>8} {'agent steps':>12} {'eval mean':>10}")
    for r in rows:
        print(f"{float(r['seconds']) / 60:8.1f} {int(r['step']):12d} {float(r['score']):10.1f}")
    for target in (20, 31, 100, 300):
        hit = first_reaching(rows, target)
        where = f"{float(hit['seconds']) / 60:.1f} minutes, {int(hit['step'])} agent steps" if hit else "not reached"
        print(f"evaluation mean >= {target}: {where}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    minutes = [float(r["seconds"]) / 60 for r in rows]
    steps = [int(r["step"]) / 1e6 for r in rows]
    scores = [float(r["score"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    left.plot(minutes, scores, "o-")
    left.set_xlabel("wall-clock minutes of training")
    right.plot(steps, scores, "o-", color="C1")
    right.set_xlabel("agent steps (millions)")
    left.set_ylabel("evaluation mean score (points)")
    for ax in (left, right):
        ax.axhline(31, color="0.5", ls=":", lw=1)
        ax.grid(alpha=0.3)
    left.annotate("human (about 31)", (0, 31), fontsize=8, va="bottom")
    fig.suptitle(f"time to score: {run}")
    fig.tight_layout()
    fig.savefig(picture, dpi=100)
    print(f"curve: {picture}")


def main() -> None:
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="training budget in wall-clock minutes")
    p.add_argument("--checkpoints", default="runs/time-to-score", help="the run's folder")
    p.add_argument("--report", metavar="RUN", help="only print and draw the curve of an existing run")
    p.add_argument("--picture", help="where to draw the curve (default: <run>/time_to_score.png)")
    a = p.parse_args(own)
    run = Path(a.report or a.checkpoints)
    if not a.report:
        cmd = [sys.executable, str(ROOT / "train_breakout.py"), "--minutes", str(a.minutes),
               "--checkpoints", str(run), *passthrough]
        print(" ".join(cmd), flush=True)
        code = subprocess.call(cmd)
        if code != 0:
            sys.exit(code)
    report(run, Path(a.picture) if a.picture else run / "time_to_score.png")


if __name__ == "__main__":
    main()
