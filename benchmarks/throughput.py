#!/usr/bin/env python
"""Agent steps per second of the real trainer beside the tutorial's own loop, on one machine in one go:
learning off and on (the tutorial's rule, batch 256), the fast recipe, seconds per update (eager and
compiled), replay bytes per stored transition. Prints a table; the last line is machine-readable.

    python benchmarks/throughput.py --device cuda    # a GPU box: the issue's figures
    python benchmarks/throughput.py --steps 20000    # CPU

The tutorial's loop (../shared/bench/tutorial_loop.py, or --tutorial PATH) runs first, with the same
--learn-start; its rate while learning is the difference of a run up to where learning starts (6 x
--learn-start agent steps) and a whole run. The trainer's learning-on rates are whole runs: they include
those first steps, 1% of the default run on CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer_support.device import pick_device, usable_cores  # noqa: E402
import train_breakout as tb  # noqa: E402
from trainer_support import atari  # noqa: E402
import loop_cost  # noqa: E402  (benchmarks/, beside this file)


def run_trainer(flags: list[str]) -> dict:
    """One real training run in a throw-away folder; its own output is swallowed."""
    with tempfile.TemporaryDirectory() as tmp:
        args, given = tb.parse_args(["--eval-every", "0", "--save-every", "1000000000", "--plot-every", "1000000000"]
                                    + flags + ["--checkpoints", str(Path(tmp) / "run")])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return tb.train(args, given)


PINNING = {"every core": (True, 0), "all but one core": (True, 1), "not pinned": (False, 0)}


@contextlib.contextmanager
def games_pinned(how: str):
    """The trainer's games pinned to every core (its default), to all but one (left to the loop), or not pinned."""
    before = atari.PIN_GAMES, atari.SPARE_CORES
    atari.PIN_GAMES, atari.SPARE_CORES = PINNING[how]
    try:
        yield
    finally:
        atari.PIN_GAMES, atari.SPARE_CORES = before


@contextlib.contextmanager
def network_layout(channels_last: bool, cudnn_benchmark: bool):
    """The trainer's choices, changed for a measurement: channels-last inputs (its default), cuDNN's autotuner (off)."""
    as_input, benchmark = tb.as_input, torch.backends.cudnn.benchmark
    if not channels_last:
        tb.as_input = lambda stacks: stacks.float().div_(255.0)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        tb.as_input, torch.backends.cudnn.benchmark = as_input, benchmark


def upload_seconds(device: torch.device, games: int, joined: bool, repeats: int = 500) -> float:
    """Mean wall time of one agent step's frame upload through Staging: frames and new-game flags joined in one
    copy (the trainer's way), or as two copies."""
    staging = tb.Staging(device)
    frames = np.random.default_rng(0).integers(0, 256, (games, tb.SIZE * tb.SIZE), dtype=np.uint8)
    flags = np.zeros((games, 1), np.uint8)
    start = time.perf_counter()
    for _ in range(repeats):
        if joined:
            up = staging(np.concatenate([frames, flags], 1))
            up[:, :-1].view(games, tb.SIZE, tb.SIZE), up[:, -1].bool()
        else:
            staging(frames).view(games, tb.SIZE, tb.SIZE), staging(flags[:, 0]).bool()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def seconds_per_update(device: torch.device, batch_size: int, frames: int, compiled: bool,
                       repeats: int = 50, channels_last: bool = True) -> float:
    """Mean wall time of sample + td_update on a replay memory of random frames, the optimiser as the trainer
    makes it; `compiled` as the trainer compiles it (CUDA graphs on CUDA); the networks channels-last or not."""
    replay = tb.ReplayMemory(4096, 1, frames, frames, device)
    for _ in range(2048):
        replay.add_frames(torch.randint(0, 256, (1, tb.SIZE, tb.SIZE), dtype=torch.uint8, device=device),
                          torch.zeros(1, dtype=torch.bool, device=device))
    k = 2000
    replay.add(np.zeros(k, np.int64), np.arange(k) + frames, np.zeros(k, np.int64), np.zeros(k, np.float32),
               np.ones(k, bool))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    policy = tb.DuelingNetwork(frames, 4).to(device, memory_format=layout)
    target = tb.DuelingNetwork(frames, 4).to(device, memory_format=layout)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, amsgrad=True,
                                  fused=device.type in ("cpu", "cuda") or None)
    generator = torch.Generator(device=device)
    loss_fn = tb.td_loss
    if compiled:
        loss_fn = torch.compile(tb.td_loss, mode="reduce-overhead" if device.type == "cuda" else None)
    step = lambda: tb.td_update(policy, target, optimizer, replay.sample(batch_size, generator), 0.99,
                                loss_fn=loss_fn)
    for _ in range(5):  # compiling, and CUDA graphs recorded at the third call
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        loss, _ = step()
    loss.item()  # waits for the device
    return (time.perf_counter() - start) / repeats


def tutorial_loop(path: Path, steps: int, memory: int, learn_start: int) -> dict:
    """The tutorial's loop as a separate process (it uses CUDA when it sees it): its closing line's figures."""
    out = subprocess.run([sys.executable, str(path), "--steps", str(steps), "--memory", str(memory),
                          "--learn-start", str(learn_start), "--threads", str(usable_cores())],
                         capture_output=True, text=True, check=True).stdout
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in out.strip().splitlines()[-1].split()[1:])}


def tutorial_learning_rate(path: Path, steps: int, memory: int, learn_start: int) -> tuple[float, float]:
    """The tutorial's loop's agent steps/s while it learns, and its updates: a run to the point where its
    learning begins (6 agent steps per stored transition) subtracted from a run of `steps`."""
    warm = 6 * learn_start
    before, whole = tutorial_loop(path, warm, memory, learn_start), tutorial_loop(path, steps, memory, learn_start)
    return (whole["steps"] - before["steps"]) / (whole["seconds"] - before["seconds"]), whole["updates"]


def tutorial_unmeasurable(steps: int, memory: int, learn_start: int) -> str | None:
    """Why the tutorial's loop cannot give its rate while learning in `steps` agent steps, or None: it learns only
    after 6 x learn_start of them, and its memory holds two float32 stacks of 6 frames (338 KB) per transition."""
    if 6 * learn_start >= steps:
        return (f"it learns only after 6 x --learn-start = {6 * learn_start:,} agent steps, and --tutorial-steps is "
                f"{steps:,}")
    held, free = min(memory, steps // 6 + 1) * 2 * 6 * tb.SIZE * tb.SIZE * 4, psutil.virtual_memory().available
    if held > 0.8 * free:
        return f"its replay memory would grow to {held / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB of RAM is free"
    return None


def emulator_steps_per_s(env_id: str, games: int, seconds: float = 5.0) -> float:
    """The ceiling: ale-py's vector environment alone, as the trainer builds it (threads, pinning), random actions."""
    return loop_cost.emulator_rate(atari, games, seconds, env_id=env_id)


def cpu_model() -> str:
    if os.path.exists("/proc/cpuinfo"):
        return next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="agent steps per measured run of the trainer "
                   "(default: 200,000 on CUDA, else 20,000), learning after the first 6 x --learn-start")
    p.add_argument("--tutorial-steps", type=int, default=10_000, help="agent steps of the tutorial's loop (0: "
                   "leave it out); it learns after its first 6 x --learn-start")
    p.add_argument("--tutorial", default=str(Path(__file__).resolve().parents[2] / "shared/bench/tutorial_loop.py"))
    p.add_argument("--learn-start", type=int, default=300, help="stored transitions before learning begins")
    p.add_argument("--memory", type=int, default=100_000, help="replay memory capacity")
    p.add_argument("--envs", type=int, default=tb.Args.envs, help="games stepped together")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pin", choices=sorted(PINNING), default="every core", help="the games' threads pinned to "
                   "every core (the trainer's default), to all but one, or not pinned")
    a = p.parse_args()
    device = pick_device(a.device)
    cuda = device.type == "cuda"
    steps = a.steps or (200_000 if cuda else 20_000)
    tutorial_on, tutorial_updates = float("nan"), "-"
    why_not = a.tutorial_steps and tutorial_unmeasurable(a.tutorial_steps, a.memory, a.learn_start)
    if why_not:
        print(f"note: the tutorial's loop is left out: {why_not}; raise --tutorial-steps or lower --learn-start",
              flush=True)
    elif a.tutorial_steps and Path(a.tutorial).exists():
        tutorial_on, tutorial_updates = tutorial_learning_rate(Path(a.tutorial), a.tutorial_steps, a.memory,
                                                               a.learn_start)
    common = ["--steps", str(steps), "--memory", str(a.memory), "--envs", str(a.envs), "--device", a.device,
              "--seed", "1"]
    rule = common + ["--batch-size", str(a.batch_size)]
    rate = lambda r: r["steps"] / r["session_seconds"]
    with games_pinned(a.pin):  # the emulator alone: the trainer's own games, threads and pinning
        ceiling = emulator_steps_per_s("ALE/Breakout-v5", a.envs) if a.envs > 1 else float("nan")
        off = run_trainer(rule + ["--learn-start", str(10**15)])
        on = run_trainer(rule + ["--learn-start", str(a.learn_start)])
        plain = run_trainer(rule + ["--learn-start", str(a.learn_start), "--compile", "off", "--overlap", "off"])
        fast = run_trainer(common + ["--recipe", "fast", "--learn-start", str(a.learn_start)])
    torch.set_num_threads(usable_cores())  # the trainer learns with every core it may use
    eager_update = seconds_per_update(device, a.batch_size, 6, compiled=False)
    compiled_update = seconds_per_update(device, a.batch_size, 6, compiled=True)
    bytes_per_transition = tb.ReplayMemory.bytes_needed(a.memory, a.envs, 6, 6) // a.memory
    gpu = torch.cuda.get_device_name(device) if cuda else "none"
    rows = [("device", f"{device}; GPU: {gpu}; CPU: {cpu_model()}, {usable_cores()} cores"),
            ("games stepped together", f"{a.envs}, their threads pinned to {a.pin}"),
            ("agent steps per run (tutorial's loop)", f"{steps} ({a.tutorial_steps})"),
            ("steps/s, the tutorial's loop, while learning", f"{tutorial_on:.1f} ({tutorial_updates:.0f} updates)"
             if tutorial_updates != "-" else "left out"),
            ("steps/s, emulator alone (ceiling)", f"{ceiling:.1f}"),
            ("steps/s, learning off", f"{rate(off):.1f} ({rate(off) / ceiling:.0%} of the emulator alone)"),
            ("steps/s, learning on", f"{rate(on):.1f} ({on['updates']} updates)"),
            ("  ... beside the tutorial's loop", f"{rate(on) / tutorial_on:.1f}x"),
            ("steps/s, learning on, not compiled, in turn", f"{rate(plain):.1f} ({plain['updates']} updates)"),
            ("steps/s, --recipe fast", f"{rate(fast):.1f} ({fast['updates']} updates)"),
            ("seconds per update, eager (sample + learn)", f"{eager_update:.5f}"),
            ("seconds per update, compiled", f"{compiled_update:.5f}"),
            ("replay bytes per stored transition", bytes_per_transition),
            ("replay memory for --memory", f"{on['replay_bytes'] / 2**30:.2f} GiB")]
    for k, v in rows:
        print(f"{k:>44} | {v}")
    print(f"steps_per_s={rate(on):.1f} tutorial_steps_per_s={tutorial_on:.1f} off_steps_per_s={rate(off):.1f} "
          f"emulator_steps_per_s={ceiling:.1f} "
          f"fast_steps_per_s={rate(fast):.1f} update_s={compiled_update:.5f} bytes_per_transition={bytes_per_transition}")


if __name__ == "__main__":
    main()
