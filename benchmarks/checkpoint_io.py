#!/usr/bin/env python
"""Seconds and GB to save and load a full checkpoint holding a full replay memory (the tutorial's 100,000
transitions by default), beside the time to write and read the same bytes as one plain file (disk speed).

    python benchmarks/checkpoint_io.py --memory 100000 --envs 8
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_breakout as tb  # noqa: E402


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages, so reads come from the disk (Linux, best effort)."""
    for f in (path.rglob("*") if path.is_dir() else [path]):
        if f.is_file() and hasattr(os, "posix_fadvise"):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", type=int, default=100_000)
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    a = p.parse_args()
    args, _ = tb.parse_args(["--memory", str(a.memory), "--envs", str(a.envs), "--seed", "0", "--device", "cpu"])
    run = tb.new_run(args, torch.device("cpu"), tb.make_games(args.env, args.envs, args.seed))
    replay = run.replay
    # Fill the whole ring and the whole FIFO, as a memory of a long run is.
    replay.frames.copy_(torch.randint(0, 256, replay.frames.shape, dtype=torch.uint8))
    replay.frames_written, replay.stored = replay.slots + 1, a.memory + 1

    root = Path(tempfile.mkdtemp(dir=a.dir))
    try:
        start = time.perf_counter()
        folder = tb.save_checkpoint(root / "resume", "000000000001", *tb.checkpoint_files(run))
        save_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in folder.iterdir())
        drop_cache(folder)
        start = time.perf_counter()
        parts = tb.parts_of(*tb.load_checkpoint(folder))
        fresh = tb.ReplayMemory(a.memory, a.envs, 6, 6, torch.device("cpu"))
        fresh.load_state_dict(parts["replay"])
        load_s = time.perf_counter() - start
        assert torch.equal(fresh.frames, replay.frames)

        # Disk speed: the same bytes as one file, written with fsync and read back cold.
        plain = root / "plain.bin"
        frames = replay.frames.numpy()
        start = time.perf_counter()
        with open(plain, "wb") as f:
            f.write(memoryview(frames).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - start
        drop_cache(plain)
        start = time.perf_counter()
        plain.read_bytes()
        read_s = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gb = size / 1e9
    print(f"{'full checkpoint size':>32} | {gb:.2f} GB ({a.memory} transitions, {a.envs} games)")
    print(f"{'save (write, fsync, SHA-256)':>32} | {save_s:.1f} s ({gb / save_s:.2f} GB/s)")
    print(f"{'load (verify SHA-256, restore)':>32} | {load_s:.1f} s ({gb / load_s:.2f} GB/s)")
    print(f"{'plain file write + fsync':>32} | {write_s:.1f} s ({frames.nbytes / 1e9 / write_s:.2f} GB/s)")
    print(f"{'plain file read':>32} | {read_s:.1f} s ({frames.nbytes / 1e9 / read_s:.2f} GB/s)")
    print(f"checkpoint_gb={gb:.3f} save_s={save_s:.2f} load_s={load_s:.2f}")


if __name__ == "__main__":
    main()
