#!/usr/bin/env python
"""Every path that only runs on CUDA, checked in one command on the first GPU lent, most important first: the
first check (uploads that must not wait for the GPU), then the question a GPU is lent for (the default run's speed
while learning, beside the tutorial's loop), then one PASS/FAIL/SKIP line per path, then each GPU mechanism
changed on its own, the loop's own work beside the emulator, and seconds per update. A summary line ends it; exit
status 1 if a check failed. At most --minutes (8) on one H100/H200 with 16 cores; a part that would not fit in the
time left is skipped, with a line. --out DIR keeps the whole record there.

    python benchmarks/gpu_check.py --out "$OUT"   # a GPU box (installs nothing; BENCHMARKS.md names the wheels)
    python benchmarks/gpu_check.py --dry          # the same checks on CPU, small: the tests run this

Checks: pinned staging while GPU work is queued; the compile warm-up, then the loop's first real update with no
compile and no CUDA-graph recording; compiled against eager; the overlapped loop learning, with checkpoints
written in the loop and an evaluation in the spawned process, then --resume; a CPU checkpoint resumed on the
GPU; a replay memory too big for the GPU refused before anything is written; play.py on the GPU. Mechanisms,
each changed alone in the default run: --overlap off, --compile off, games not pinned, pinned staging off,
evaluations beside training.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from trainer_support.device import Staging, threads_for, usable_cores  # noqa: E402
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
    """Uploads through the two pinned buffers while a long GPU job is queued. The first two (one per buffer) must
    return before the job ends: that is what the buffers are for. A buffer is written again only once its last
    copy is done, so the third waits behind the queued job, by design; every upload must arrive whole."""
    staging = Staging(device)
    queued = torch.randn((4096, 4096) if device.type == "cuda" else (256, 256), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(40 if device.type == "cuda" else 1):  # about 0.1 s of work on an H100, queued at once
        queued = queued @ queued / 64
    arrays = [np.random.default_rng(i).integers(0, 256, (16, 84 * 84 + 1), dtype=np.uint8) for i in range(6)]
    uploaded = [staging(a) for a in arrays[:2]]
    returned = time.perf_counter() - started
    uploaded += [staging(a) for a in arrays[2:]]
    same = all(np.array_equal(u.cpu().numpy(), a) for u, a in zip(uploaded, arrays))
    waited = time.perf_counter() - started
    assert same, "an upload arrived changed"
    if device.type == "cuda":
        assert returned < 0.5 * waited, f"the uploads waited for the queued work ({returned:.3f} of {waited:.3f} s)"
    return (f"2 uploads returned in {returned * 1e3:.1f} ms, the queued work took {waited * 1e3:.1f} ms; all 6 "
            "arrived whole")


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
        ended = terminated | truncated
        slot = (run.replay.frames_written - 1) % run.replay.slots
        run.replay.add_frames(frames, torch.from_numpy(ended).to(device))
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


def learning_flags(device: torch.device, dry: bool, steps: int, envs: Optional[int] = None) -> list:
    """A whole run learning by the tutorial's rule (batch 256) from a small --learn-start: the default run, timed."""
    return ["--steps", str(steps), "--memory", str(5 * steps // 6), "--envs", str(envs or (2 if dry else 16)),
            "--device", device.type, "--seed", "1", "--batch-size", "32" if dry else "256",
            "--learn-start", "30" if dry else "2000"]


def rate(result: dict) -> float:
    return result["steps"] / result["session_seconds"]


def fifty_x(device: torch.device, dry: bool, check: Check, tutorial_path: Path, figures: dict) -> None:
    """The question a GPU is lent for, first: agent steps/s of the default run while learning, beside the tutorial's
    loop's (the 50x question)."""
    if check.left() < (20 if dry else 150):
        return check.line("SKIP", "the default run beside the tutorial's loop", f"{check.left():.0f} s left")
    started = time.time()
    tutorial = float("nan")
    if tutorial_path.exists() and not dry:
        tutorial = throughput.tutorial_learning_rate(tutorial_path, 4000, 20000, 200)[0]
    ours = throughput.run_trainer(learning_flags(device, dry, 400 if dry else 100_000))
    figures.update(tutorial=tutorial, default=rate(ours), default_updates=ours["updates"])
    beside = (f"the tutorial's loop {tutorial:.1f}: {rate(ours) / tutorial:.1f}x" if tutorial == tutorial else
              "the tutorial's loop left out (--dry, or its file is missing)")
    check.line("INFO", "the default run beside the tutorial's loop", f"{rate(ours):.1f} agent steps/s learning "
               f"({ours['updates']} updates), {beside} [{time.time() - started:.1f} s]")


@contextlib.contextmanager
def staging_off():
    """Uploads as plain copies from pageable memory, which wait for the GPU's queued work: the pinned staging off."""
    call = Staging.__call__
    Staging.__call__ = lambda self, array: torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
    try:
        yield
    finally:
        Staging.__call__ = call


def mechanism_runs(steps: int) -> dict:
    """Each GPU mechanism off (or, for evaluations beside training, on), one at a time: {name: (flags, context)}."""
    return {"default": ([], contextlib.nullcontext),
            "--overlap off": (["--overlap", "off"], contextlib.nullcontext),
            "--compile off": (["--compile", "off"], contextlib.nullcontext),
            "games not pinned": ([], lambda: throughput.games_pinned("not pinned")),
            "pinned staging off": ([], staging_off),
            "3 evaluations beside": (["--eval-every", str(steps // 3), "--eval-games", "2", "--eval-beside", "on"],
                                     contextlib.nullcontext)}


def mechanisms(device: torch.device, dry: bool, check: Check, figures: dict) -> None:
    """The default run with each mechanism changed on its own, beside the default run measured again."""
    steps = 400 if dry else 50_000
    needs = 10 if dry else 45
    print(f"{'run, learning (' + str(steps) + ' agent steps)':<40} | {'steps/s':>8} | share of the default", flush=True)
    base = None
    for name, (flags, context) in mechanism_runs(steps).items():
        if check.left() < needs:
            print(f"{name:<40} | skipped: {check.left():.0f} s left", flush=True)
            continue
        with context():
            result = throughput.run_trainer(learning_flags(device, dry, steps) + flags)
        base = base or rate(result)
        figures[f"mechanism/{name}"] = rate(result)
        print(f"{name:<40} | {rate(result):>8.1f} | {rate(result) / base:.2f}", flush=True)


def loop_share(device: torch.device, dry: bool, check: Check, figures: dict) -> None:
    """The emulator alone beside the trainer with learning off, at 16 and 64 games: what the loop's own work costs."""
    steps = 400 if dry else 60_000
    for envs in (2,) if dry else (16, 64):
        if check.left() < (10 if dry else 40):
            print(f"learning off, {envs} games: skipped, {check.left():.0f} s left", flush=True)
            continue
        off = throughput.run_trainer(learning_flags(device, dry, steps, envs)[:-2] + ["--learn-start", str(10**12)])
        alone = throughput.emulator_steps_per_s("ALE/Breakout-v5", envs, seconds=1 if dry else 8)
        figures[f"off/{envs}"], figures[f"emulator/{envs}"] = rate(off), alone
        print(f"learning off, {envs} games: {rate(off):.1f} agent steps/s, the emulator alone {alone:.1f}: "
              f"{rate(off) / alone:.0%}", flush=True)


def update_seconds(device: torch.device, dry: bool, check: Check, figures: dict) -> None:
    """Seconds per update, eager and compiled (not in --dry: compiling on a CPU takes most of a minute); then the
    trainer's unmeasured choices: channels-last networks, cuDNN's autotuner off, the frames' upload joined with
    the new-game flags."""
    batch, repeats = (32, 3) if dry else (256, 50)
    if not dry and check.left() > 30:
        eager = throughput.seconds_per_update(device, batch, 6, compiled=False)
        compiled = throughput.seconds_per_update(device, batch, 6, compiled=True)
        figures.update(update_eager=eager, update_compiled=compiled)
        print(f"seconds per update (sample + learn), batch {batch}: eager {eager:.5f}, compiled {compiled:.5f}",
              flush=True)
    if check.left() > 20:
        layouts = {}
        for channels_last, autotune in ((True, False), (False, False), (True, True), (False, True)):
            with throughput.network_layout(channels_last, autotune):
                layouts[channels_last, autotune] = throughput.seconds_per_update(device, batch, 6, compiled=False,
                                                                                 repeats=repeats)
        figures.update({f"layout/{c}/{t}": v for (c, t), v in layouts.items()})
        print("seconds per eager update: " + ", ".join(
            f"{'channels-last' if c else 'contiguous'}{' + cudnn.benchmark' if t else ''} {v:.5f}"
            for (c, t), v in layouts.items()), flush=True)
        joined, apart = (throughput.upload_seconds(device, 16, joined) for joined in (True, False))
        figures.update(upload_joined=joined, upload_apart=apart)
        print(f"frame upload per agent step, 16 games: joined with the new-game flags {joined * 1e6:.0f} us, as "
              f"two copies {apart * 1e6:.0f} us", flush=True)


class Tee(io.TextIOBase):
    """Everything printed, also written to a file (--out): the full record comes back from the device."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="run the checks on CPU, small (what the tests run)")
    p.add_argument("--minutes", type=float, default=8.0, help="time for everything; parts that would not fit "
                   "are skipped")
    p.add_argument("--no-table", action="store_true", help="the checks only, no figures")
    p.add_argument("--out", type=Path, help="a folder for the whole record: gpu_check.log and gpu_check.json")
    p.add_argument("--tutorial", default=str(ROOT.parent / "shared/bench/tutorial_loop.py"),
                   help="the tutorial's loop, measured beside ours (left out where the file is missing)")
    a = p.parse_args()
    if not a.dry and not torch.cuda.is_available():
        print("error: no CUDA device here; --dry runs the checks on CPU", file=sys.stderr)
        return 2
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        sys.stdout = Tee(sys.__stdout__, open(a.out / "gpu_check.log", "w"))
    device = torch.device("cpu" if a.dry else "cuda")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the trainer sets it
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else throughput.cpu_model()
    print(f"gpu_check on {device} ({name}; PyTorch {torch.__version__}; {usable_cores()} cores)", flush=True)
    check, found, figures = Check(60 * a.minutes), {}, {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()) as noise:
        tmp = Path(tmp)
        check("pinned staging under queued work", 5, lambda: check_staging(device))
        if not a.no_table:
            fifty_x(device, a.dry, check, Path(a.tutorial), figures)
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
            mechanisms(device, a.dry, check, figures)
            loop_share(device, a.dry, check, figures)
            update_seconds(device, a.dry, check, figures)
    if "FAIL" in check.outcomes and noise.getvalue().strip():
        print("stderr of the failed checks (last lines):\n" + "\n".join(noise.getvalue().strip().splitlines()[-8:]))
    counts = {o: check.outcomes.count(o) for o in ("PASS", "FAIL", "SKIP")}
    if a.out:
        (a.out / "gpu_check.json").write_text(json.dumps(dict(device=name, outcomes=counts, figures=figures,
                                                              stderr=noise.getvalue()[-20000:]), indent=1))
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped on {name} in "
          f"{60 * a.minutes - check.left():.0f} s", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
