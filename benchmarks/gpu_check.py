#!/usr/bin/env python
"""Every path that only runs on CUDA, checked in one command on the first GPU lent: one PASS/FAIL/SKIP line per
path, then the throughput table, then a summary line; exit status 1 if a check failed. At most --minutes (8) on
one H100/H200 with 16 cores; a part that would not fit in the time left is skipped, with a line.

    python benchmarks/gpu_check.py                # a GPU box (installs nothing; BENCHMARKS.md names the wheels)
    python benchmarks/gpu_check.py --dry          # the same checks on CPU, small: the tests run this

Checks: pinned staging while GPU work is queued; the compile warm-up, then the loop's first real update with no
compile and no CUDA-graph recording; compiled against eager; the overlapped loop learning, with checkpoints
written in the loop and an evaluation in the spawned process, then --resume; a CPU checkpoint resumed on the
GPU; a replay memory too big for the GPU refused before anything is written; play.py on the GPU. Then agent
steps/s learning off and on, beside the tutorial's loop, for --envs 16/32/64, games pinned to every core, to
all but one, or not pinned; seconds per update eager and compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from trainer_support.device import Staging, threads_for  # noqa: E402
import throughput  # noqa: E402
import train_breakout as tb  # noqa: E402


class Check:
    """The checks' lines, their outcomes, and the time left."""

    def __init__(self, seconds: float):
        self.deadline, self.outcomes = time.time() + seconds, []

    def left(self) -> float:
        return self.deadline - time.time()

    def __call__(self, name: str, needs_s: float, work) -> None:
        """Run `work()` (returns a detail line; raises AssertionError for a FAIL) if `needs_s` seconds are left."""
        if self.left() < needs_s:
            return self.line("SKIP", name, f"needs about {needs_s:.0f} s, {max(0, self.left()):.0f} s left")
        started = time.time()
        try:
            detail, outcome = work(), "PASS"
        except Exception as e:  # noqa: BLE001 (a check that raises fails; the next one runs)
            last = traceback.extract_tb(e.__traceback__)[-1]
            detail = f"{type(e).__name__}: {str(e).strip()[:300]} ({Path(last.filename).name}:{last.lineno})"
            outcome = "FAIL"
        self.line(outcome, name, f"{detail} [{time.time() - started:.1f} s]")

    def line(self, outcome: str, name: str, detail: str) -> None:
        self.outcomes.append(outcome)
        print(f"{outcome} {name}: {detail}", flush=True)


def trainer(flags: list, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "train_breakout.py"), *flags], capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}: {(done.stdout + done.stderr).strip().splitlines()[-1:]}")
    return done


def problems(out: str) -> list:
    """Lines of a run's output that a healthy GPU run does not print."""
    return [line for line in out.splitlines() if line.startswith(("warning", "Traceback"))
            or "without compiling" in line or "failed" in line]


def check_staging(device: torch.device) -> str:
    """Uploads through the two pinned buffers while a long GPU job is queued: each returns before the job ends,
    and every upload arrives whole, though the buffers are rewritten while earlier copies may still be queued."""
    staging = Staging(device)
    queued = torch.randn((4096, 4096) if device.type == "cuda" else (256, 256), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(40 if device.type == "cuda" else 1):  # about 0.1 s of work on an H100, queued at once
        queued = queued @ queued / 64
    arrays = [np.random.default_rng(i).integers(0, 256, (16, 84 * 84 + 1), dtype=np.uint8) for i in range(6)]
    uploaded = [staging(a) for a in arrays]
    returned = time.perf_counter() - started
    same = all(np.array_equal(u.cpu().numpy(), a) for u, a in zip(uploaded, arrays))
    waited = time.perf_counter() - started
    assert same, "an upload arrived changed"
    if device.type == "cuda":
        assert returned < 0.5 * waited, f"the uploads waited for the queued work ({returned:.3f} of {waited:.3f} s)"
    return f"6 uploads returned in {returned * 1e3:.1f} ms, the queued work took {waited * 1e3:.1f} ms; all whole"


def small_run(args: tb.Args, device: torch.device) -> tb.Run:
    """A run whose replay memory holds real transitions of random play, past --learn-start."""
    run, _ = tb.build_run(args, device)
    tb.start_games(run, args)
    rng = np.random.default_rng(0)
    while len(run.replay) < 2 * args.batch_size:
        actions = rng.integers(len(run.games.actions), size=args.envs)
        run.games.send(actions)
        screens, reward, terminated, truncated, lives = run.games.recv()
        frames = torch.from_numpy(tb.preprocess_all(screens, None, run.games.screen_lut)).to(device)
        ended = torch.from_numpy(terminated | truncated).to(device)
        slot = (run.replay.frames_written - 1) % run.replay.slots
        run.replay.add_frames(frames, ended)
        run.stack.push(frames, ended)
        run.transitions.store(run.replay, slot, actions, np.clip(reward, -1, 1).astype(np.float32),
                              terminated | truncated)
    return run


def check_compile(device: torch.device, envs: int, found: dict) -> str:
    """The warm-up, then the loop's first real update and acting: no more compiles, no more CUDA-graph records;
    then the compiled functions against the eager ones."""
    args, _ = tb.parse_args(["--envs", str(envs), "--memory", "4000", "--batch-size", "256" if device.type == "cuda"
                             else "32", "--seed", "3", "--device", device.type])
    run = small_run(args, device)
    counters = torch._dynamo.utils.counters
    functions = tb.compiled_functions(run, args, device)
    assert functions, "compiling failed (its line is above)"
    graphs, records = counters["stats"]["unique_graphs"], dict(counters["inductor"])
    loss_fn, greedy = functions
    for _ in range(3):
        batch = run.replay.sample(args.batch_size, run.sampler)
        with threads_for(args, device, learning=True):
            tb.td_update(run.policy_net, run.target_net, run.optimizer, batch, args.gamma, args.n_step, args.double,
                         loss_fn)
        with threads_for(args, device, learning=False):
            greedy(run.policy_net, run.stack.frames)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert counters["stats"]["unique_graphs"] == graphs, \
        f"{counters['stats']['unique_graphs'] - graphs} more graph(s) compiled after the warm-up"
    more = {k: v - records.get(k, 0) for k, v in counters["inductor"].items() if "cudagraph" in k
            and v != records.get(k, 0)}
    assert not more, f"CUDA graphs after the warm-up: {more}"
    found.update(run=run, args=args, functions=functions)
    return f"{graphs} graphs, none after the warm-up (3 updates, 3 acting calls at batch {args.batch_size})"


def check_compiled_against_eager(found: dict) -> str:
    assert "run" in found, "nothing compiled: the warm-up's check failed"
    run, args, (loss_fn, greedy) = found["run"], found["args"], found["functions"]
    batch = run.replay.sample(args.batch_size, torch.Generator(run.replay.device).manual_seed(9))
    mismatch = tb.compiled_mismatch(run, args, batch, loss_fn, greedy)
    assert mismatch is None, mismatch
    return "loss, mean Q, gradients and greedy actions within tolerance"


def check_loop(tmp: Path, device: str, dry: bool, found: dict) -> str:
    """The default GPU loop (overlapped, compiled), checkpoints written in the loop, an evaluation in the spawned
    process; stopped by its budget, then resumed."""
    run = tmp / "loop"
    steps = 1200 if dry else 30000
    flags = ["--checkpoints", str(run), "--device", device, "--envs", "4" if dry else "16", "--memory", "1500"
             if dry else "20000", "--learn-start", "100" if dry else "2000", "--seed", "4", "--eval-every",
             str(steps // 2), "--eval-games", "1", "--eval-beside", "on", "--checkpoint-minutes", "0.05",
             "--save-every", "10", "--overlap", "on", "--compile", "off" if dry else "auto"]
    first = trainer(flags + ["--steps", str(steps)])
    assert not problems(first.stdout), problems(first.stdout)[:2]
    assert re.search(r"--overlap on\b", first.stdout) and re.search(r"--eval-beside on\b", first.stdout)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    evals = [r for r in rows if r["kind"] == "eval"]
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert evals and losses and np.isfinite(losses).all(), f"{len(evals)} evaluations, {len(losses)} losses"
    saved = sorted((run / "resume").iterdir())
    assert len(saved) >= 1 and saved[-1].name == f"{steps:012d}"
    second = trainer(flags + ["--resume", "--steps", str(steps + steps // 3)])
    assert f"agent step {steps}" in second.stdout and not problems(second.stdout), problems(second.stdout)[:2]
    found["snapshot"] = max(run.glob("[0-9]*.pth"), key=lambda p: int(p.stem))
    return (f"{len(losses)} logged losses, {len(evals)} evaluations beside training, checkpoints written in "
            f"the loop; resumed from step {steps} to {steps + steps // 3}")


def check_cpu_checkpoint_on_device(tmp: Path, device: str) -> str:
    run = tmp / "moved"
    flags = ["--checkpoints", str(run), "--envs", "4", "--memory", "1000", "--learn-start", "50", "--seed", "6",
             "--eval-every", "0"]
    trainer(flags + ["--device", "cpu", "--steps", "400", "--threads", "2"])
    resumed = trainer(flags + ["--resume", "--device", device, "--steps", "800"])
    assert "agent step 400" in resumed.stdout and not problems(resumed.stdout), problems(resumed.stdout)[:2]
    return f"a checkpoint written on CPU resumed on {device} and trained on to step 800"


def check_memory_refusal(tmp: Path, device: str) -> str:
    run = tmp / "too-big"
    done = trainer(["--checkpoints", str(run), "--device", device, "--memory", "100000000", "--steps", "10"],
                   check=False)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and lines and "the replay memory needs" in lines[-1], lines[-2:]
    assert not run.exists(), "the refused run left its folder"
    return lines[-1]


def check_play(device: str, found: dict) -> str:
    snapshot = found.get("snapshot")
    assert snapshot is not None, "no snapshot: the loop's check failed"
    done = subprocess.run([sys.executable, str(ROOT / "play.py"), str(snapshot), "--device", device, "--no-render",
                           "--json", "--max-steps", "2000", "--fps", "0"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr).strip().splitlines()[-1:]
    return f"{snapshot.name}: {done.stdout.strip().splitlines()[-1][:200]}"


def throughput_table(device: torch.device, dry: bool, check: Check, tutorial_path: Path) -> None:
    """Agent steps/s of whole runs (learning off; on, the tutorial's rule at batch 256), for each --envs and
    pinning, beside the tutorial's loop; seconds per update. Rows that would not fit the time left are skipped."""
    steps, learn_start = (6000, 300) if dry else (100_000, 2000)
    rate = lambda r: r["steps"] / r["session_seconds"]
    print(f"{'games':>5} | {'pinning':<16} | {'learning off':>12} | {'learning on':>11} | updates", flush=True)
    rows = {}
    for envs in ((16,) if dry else (16, 32, 64)):
        for how in throughput.PINNING:
            if check.left() < (20 if dry else 75):
                print(f"{envs:>5} | {how:<16} | skipped: {check.left():.0f} s left", flush=True)
                continue
            common = ["--steps", str(steps), "--memory", str(5 * steps // 6), "--envs", str(envs), "--device",
                      device.type, "--seed", "1", "--batch-size", "32" if dry else "256"]
            with throughput.games_pinned(how):
                off = throughput.run_trainer(common + ["--learn-start", str(10**12)])
                on = throughput.run_trainer(common + ["--learn-start", str(learn_start)])
            rows[envs, how] = rate(on)
            print(f"{envs:>5} | {how:<16} | {rate(off):>12.1f} | {rate(on):>11.1f} | {on['updates']}", flush=True)
    tutorial = float("nan")
    if tutorial_path.exists() and not dry and check.left() > 90:
        tutorial = throughput.tutorial_learning_rate(tutorial_path, 4000, 20000, 200)[0]
    best = max(rows.values(), default=float("nan"))
    print(f"the tutorial's loop while learning: {tutorial:.1f} steps/s; the best learning-on row: {best:.1f} "
          f"({best / tutorial:.1f}x)", flush=True)
    batch = 32 if dry else 256
    if check.left() > 30:
        eager = throughput.seconds_per_update(device, batch, 6, compiled=False)
        compiled = throughput.seconds_per_update(device, batch, 6, compiled=True)
        print(f"seconds per update (sample + learn), batch {batch}: eager {eager:.5f}, compiled {compiled:.5f}",
              flush=True)
    if check.left() > 20:  # the trainer's unmeasured choices: channels-last, cuDNN's autotuner off
        layouts = {}
        for channels_last, autotune in ((True, False), (False, False), (True, True), (False, True)):
            with throughput.network_layout(channels_last, autotune):
                layouts[channels_last, autotune] = throughput.seconds_per_update(device, batch, 6, compiled=False)
        print("seconds per eager update: " + ", ".join(
            f"{'channels-last' if c else 'contiguous'}{' + cudnn.benchmark' if t else ''} {v:.5f}"
            for (c, t), v in layouts.items()), flush=True)
        joined, apart = (throughput.upload_seconds(device, 16, joined) for joined in (True, False))
        print(f"frame upload per agent step, 16 games: joined with the new-game flags {joined * 1e6:.0f} us, as "
              f"two copies {apart * 1e6:.0f} us", flush=True)
    print("table: " + json.dumps({f"{e}/{h}": round(v, 1) for (e, h), v in rows.items()}
                                 | {"tutorial": round(tutorial, 1)}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="run the checks on CPU, small (what the tests run)")
    p.add_argument("--minutes", type=float, default=8.0, help="time for everything; parts that would not fit "
                   "are skipped")
    p.add_argument("--no-table", action="store_true", help="the checks only")
    p.add_argument("--tutorial", default=str(ROOT.parent / "shared/bench/tutorial_loop.py"),
                   help="the tutorial's loop, measured beside ours (left out where the file is missing)")
    a = p.parse_args()
    if not a.dry and not torch.cuda.is_available():
        print("error: no CUDA device here; --dry runs the checks on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if a.dry else "cuda")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the trainer sets it
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else throughput.cpu_model()
    print(f"gpu_check on {device} ({name}; PyTorch {torch.__version__}; {os.cpu_count()} cores)",
          flush=True)
    check, found = Check(60 * a.minutes), {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()) as noise:
        tmp = Path(tmp)
        check("pinned staging under queued work", 5, lambda: check_staging(device))
        check("warm-up, then the first real update", 20 if a.dry else 120,
              lambda: check_compile(device, 4 if a.dry else 16, found))
        check("compiled against eager", 5, lambda: check_compiled_against_eager(found))
        check("overlapped loop, checkpoints in the loop, evaluation beside, resume", 40 if a.dry else 150,
              lambda: check_loop(tmp, device.type, a.dry, found))
        if a.dry:
            check.line("SKIP", "a CPU checkpoint resumed on the device", "the device is the CPU")
        else:
            check("a CPU checkpoint resumed on the device", 20, lambda: check_cpu_checkpoint_on_device(tmp, "cuda"))
        check("a replay memory too big is refused", 10, lambda: check_memory_refusal(tmp, device.type))
        check("play.py on the device", 10, lambda: check_play(device.type, found))
        if not a.no_table:
            throughput_table(device, a.dry, check, Path(a.tutorial))
    if "FAIL" in check.outcomes and noise.getvalue().strip():
        print("stderr of the failed checks (last lines):\n" + "\n".join(noise.getvalue().strip().splitlines()[-8:]))
    counts = {o: check.outcomes.count(o) for o in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped on {name} in "
          f"{60 * a.minutes - check.left():.0f} s", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
