#!/usr/bin/env python
"""Agent steps per second of the real trainer, with learning off and on; replay bytes per stored transition;
seconds per gradient update. Prints a table; the last line is machine-readable.

Side by side with the tutorial's own loop, same machine, same learning rule:
    python ../shared/bench/tutorial_loop.py --steps 20000 --learn-start 1000 && \
    python benchmarks/throughput.py --steps 20000 --learn-start 1000
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_breakout as tb  # noqa: E402


def run_trainer(flags: list[str]) -> dict:
    """One real training run in a throw-away folder; its own output is swallowed."""
    with tempfile.TemporaryDirectory() as tmp:
        args, given = tb.parse_args(flags + ["--checkpoints", str(Path(tmp) / "run"), "--eval-every", "0",
                                             "--save-every", "1000000000", "--plot-every", "1000000000"])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return tb.train(args, given)


def seconds_per_update(device: torch.device, batch_size: int, frames: int, repeats: int = 20) -> float:
    """Mean wall time of sample + td_update on a replay memory of random frames."""
    replay = tb.ReplayMemory(4096, 1, frames, frames, device)
    for _ in range(2048):
        replay.add_frames(torch.randint(0, 256, (1, tb.SIZE, tb.SIZE), dtype=torch.uint8, device=device),
                          torch.zeros(1, dtype=torch.bool, device=device))
    k = 2000
    replay.add(np.zeros(k, np.int64), np.arange(k) + frames, np.zeros(k, np.int64), np.zeros(k, np.float32),
               np.ones(k, bool))
    policy = tb.DuelingNetwork(frames, 4).to(device, memory_format=torch.channels_last)
    target = tb.DuelingNetwork(frames, 4).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, amsgrad=True)
    generator = torch.Generator(device=device)
    step = lambda: tb.td_update(policy, target, optimizer, replay.sample(batch_size, generator), 0.99)
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        loss, _ = step()
    loss.item()  # waits for the device
    return (time.perf_counter() - start) / repeats


def emulator_steps_per_s(env_id: str, games: int, seconds: float = 5.0) -> float:
    """The ceiling: ale-py's vector environment alone, as the trainer configures it, random actions."""
    env = tb.VectorGames(env_id, games, seed=1)
    env.reset()
    actions = [np.random.default_rng(i).integers(len(env.actions), size=games) for i in range(64)]
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.step(actions[steps % 64])
        steps += 1
    rate = steps * games / (time.perf_counter() - start)
    env.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20_000, help="agent steps per measured run")
    p.add_argument("--learn-start", type=int, default=1_000, help="stored transitions before learning begins")
    p.add_argument("--memory", type=int, default=100_000, help="replay memory capacity")
    p.add_argument("--envs", type=int, default=tb.Args.envs, help="games stepped together")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=256)
    a = p.parse_args()
    device = tb.pick_device(a.device)
    common = ["--steps", str(a.steps), "--memory", str(a.memory), "--envs", str(a.envs), "--device", a.device,
              "--batch-size", str(a.batch_size), "--seed", "1"]
    ceiling = emulator_steps_per_s("ALE/Breakout-v5", a.envs) if a.envs > 1 else float("nan")
    off = run_trainer(common + ["--learn-start", str(10**15)])
    on = run_trainer(common + ["--learn-start", str(a.learn_start)])
    torch.set_num_threads(os.cpu_count() or 1)  # the trainer learns with every core
    update = seconds_per_update(device, a.batch_size, 6)
    bytes_per_transition = tb.ReplayMemory.bytes_needed(a.memory, a.envs, 6, 6) // a.memory
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "cpu")
        if os.path.exists("/proc/cpuinfo") else "cpu")
    rows = [("device", f"{device} ({name}), {torch.get_num_threads()} torch threads"),
            ("games stepped together", a.envs),
            ("agent steps per run", a.steps),
            ("steps/s, emulator alone (ceiling)", f"{ceiling:.1f}"),
            ("steps/s, learning off", f"{off['steps'] / off['session_seconds']:.1f}"),
            ("steps/s, learning on", f"{on['steps'] / on['session_seconds']:.1f}"),
            ("gradient updates in the learning run", on["updates"]),
            ("seconds per update (sample + learn)", f"{update:.4f}"),
            ("replay bytes per stored transition", bytes_per_transition),
            ("replay memory for --memory", f"{on['replay_bytes'] / 2**30:.2f} GiB")]
    for k, v in rows:
        print(f"{k:>38} | {v}")
    print(f"steps_per_s={on['steps'] / on['session_seconds']:.1f} bytes_per_transition={bytes_per_transition} "
          f"updates={on['updates']}")


if __name__ == "__main__":
    main()
