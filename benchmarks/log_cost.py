#!/usr/bin/env python
"""What logging one finished game costs the training loop: RunLog.row (a metrics.csv row and its TensorBoard
scalars) in this version and in an earlier commit's plumbing.py, side by side in one process.

    python benchmarks/log_cost.py                  # against 55cbe89 (TensorBoard's own writer thread)
    python benchmarks/log_cost.py --base HEAD~3 --rows 20000
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402
import train_breakout as tb  # noqa: E402


def plumbing_of(commit: str, folder: Path):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:plumbing.py"], capture_output=True,
                            text=True, check=True).stdout
    path = folder / f"plumbing_{commit.replace('~', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds_per_row(module, folder: Path, rows: int) -> float:
    kw = dict(run_dir=folder, columns=tb.METRIC_COLUMNS, resume_step=None)
    if "writes" in inspect.signature(module.RunLog).parameters:
        kw["writes"] = module.Writes()
    log = module.RunLog(**kw)
    started = time.perf_counter()
    for i in range(rows):
        log.row(kind="game", step=1000 * i, seconds=0.1 * i, episode=5 * i, score=float(i % 400), lives_lost=5,
                epsilon=0.5, loss=0.01, mean_q=1.5, steps_per_s=4000.0, replay_fill=1.0)
    log.close()  # what a row left for a writer thread is paid here
    return (time.perf_counter() - started) / rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="55cbe89")
    p.add_argument("--rows", type=int, default=10_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        versions = {args.base: plumbing_of(args.base, tmp), "now": plumbing}
        for name, module in versions.items():
            (tmp / name).mkdir()
            cost = seconds_per_row(module, tmp / name, args.rows)
            print(f"{name:>10}: {cost * 1e6:7.1f} us per game logged ({args.rows} rows)")


if __name__ == "__main__":
    main()
