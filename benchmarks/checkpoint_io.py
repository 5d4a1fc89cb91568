#!/usr/bin/env python
"""Seconds and GB to save and load a full checkpoint holding a full replay memory (the tutorial's 100,000
transitions by default) of frames from real play, the peak extra RAM while saving, beside the time to write
and read the uncompressed frames as one plain file (disk speed).

    python benchmarks/checkpoint_io.py --memory 100000 --envs 8
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer_support.checkpoint import load_checkpoint, save_checkpoint, state_files  # noqa: E402
import train_breakout as tb  # noqa: E402
from trainer_support import atari  # noqa: E402


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages, so reads come from the disk (Linux, best effort)."""
    for f in (path.rglob("*") if path.is_dir() else [path]):
        if f.is_file() and hasattr(os, "posix_fadvise"):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def fill_from_play(run: "tb.Run", args: "tb.Args") -> None:
    """Every slot of the replay ring, as training writes it: the games played with random actions, their frames
    preprocessed and erased."""
    replay, games, rng = run.replay, run.games, np.random.default_rng(0)
    screens, _ = games.reset()
    for slot in range(replay.slots):
        if slot % 5000 == 0:
            print(f"playing: {slot}/{replay.slots} slots", file=sys.stderr, flush=True)
        frames = tb.preprocess_all(screens, rng, games.screen_lut)
        replay.add_frames(torch.from_numpy(frames), torch.zeros(args.envs, dtype=torch.bool))
        screens = games.step(rng.integers(len(games.actions), size=args.envs))[0]


class PeakRSS:
    """The process's largest resident memory while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.extra = max(self.peak, self.process.memory_info().rss) - self.start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", type=int, default=100_000)
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--random-frames", action="store_true", help="random bytes instead of frames of play")
    a = p.parse_args()
    args, _ = tb.parse_args(["--memory", str(a.memory), "--envs", str(a.envs), "--seed", "0", "--device", "cpu"])
    run = tb.new_run(args, torch.device("cpu"), atari.make_games(args.env, args.envs, args.seed))
    replay = run.replay
    # Fill the whole ring and the whole FIFO, as a memory of a long run is.
    if a.random_frames:
        replay.frames.copy_(torch.randint(0, 256, replay.frames.shape, dtype=torch.uint8))
    else:
        fill_from_play(run, args)
    replay.frames_written, replay.stored = replay.slots + 1, a.memory + 1
    # One update, so that the optimiser holds its state (AdamW with amsgrad: three tensors per weight).
    tb.td_update(run.policy_net, run.target_net, run.optimizer, replay.sample(32, run.sampler), args.gamma)

    root = Path(tempfile.mkdtemp(dir=a.dir))
    try:
        start = time.perf_counter()
        with PeakRSS() as saving:
            folder = save_checkpoint(root / "resume", "000000000001", *state_files(run), {})
        save_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in folder.iterdir())
        drop_cache(folder)
        start = time.perf_counter()
        state, arrays, _ = load_checkpoint(folder)
        fresh = tb.ReplayMemory(a.memory, a.envs, 6, 6, torch.device("cpu"))
        fresh.load_state_dict({**state["replay"], **{k[len("replay."):]: v for k, v in arrays.items()
                                                     if k.startswith("replay.")}})
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
    print(f"{'save (compress, fsync, SHA-256)':>32} | {save_s:.1f} s; peak extra RAM {saving.extra / 1e6:.0f} MB "
          f"(the frames are {frames.nbytes / 1e6:.0f} MB)")
    print(f"{'load (verify SHA-256, restore)':>32} | {load_s:.1f} s ({frames.nbytes / 1e9 / load_s:.2f} GB/s of frames)")
    print(f"{'plain file write + fsync':>32} | {write_s:.1f} s ({frames.nbytes / 1e9 / write_s:.2f} GB/s)")
    print(f"{'plain file read':>32} | {read_s:.1f} s ({frames.nbytes / 1e9 / read_s:.2f} GB/s)")
    print(f"checkpoint_gb={gb:.3f} save_s={save_s:.2f} load_s={load_s:.2f} save_extra_rss_mb={saving.extra / 1e6:.0f}")


if __name__ == "__main__":
    main()
