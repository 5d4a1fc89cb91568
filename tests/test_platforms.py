"""Windows and macOS, played on Linux (CI runs on Linux only): the calls those systems lack are removed, or
fail as they fail there, and a run still trains, writes full checkpoints and resumes."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from trainer_support.background import StopRequest  # noqa: E402
from trainer_support.device import check_memory_fits  # noqa: E402
import train_breakout as tb  # noqa: E402

RECIPE = ["--envs", "1", "--seed", "3", "--memory", "300", "--batch-size", "32", "--learn-start", "100",
          "--eval-every", "0", "--save-every", "20", "--device", "cpu", "--threads", "1"]


def as_windows(monkeypatch) -> None:
    """No os.sysconf, no os.sched_getaffinity (psutil reads the affinity); a folder cannot be opened as a file
    (os.open raises PermissionError)."""
    monkeypatch.delattr(os, "sysconf")
    monkeypatch.delattr(os, "sched_getaffinity")
    real_open = os.open

    def windows_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", windows_open)


def as_macos(monkeypatch) -> None:
    """os.sysconf knows no SC_AVPHYS_PAGES (nor, here, any other name); no CPU affinity at all."""
    def sysconf(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "sysconf", sysconf)
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.delattr(psutil.Process, "cpu_affinity")


def checkpoints(run: Path) -> list:
    return sorted(p.name for p in (run / "resume").iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("system", ["windows", "macos"])
def test_a_run_trains_saves_and_resumes(tmp_path, monkeypatch, in_process, capsys, system):
    {"windows": as_windows, "macos": as_macos}[system](monkeypatch)
    run = tmp_path / "run"
    tb.train(*tb.parse_args(["--checkpoints", str(run), *RECIPE, "--steps", "200"]))
    assert "warning" not in capsys.readouterr().out
    assert checkpoints(run) == [f"{200:012d}"]

    summary = tb.train(*tb.parse_args(["--checkpoints", str(run), *RECIPE, "--steps", "400", "--resume"]))
    assert "resumed from" in capsys.readouterr().out
    assert summary["steps"] == 400 and checkpoints(run) == [f"{200:012d}", f"{400:012d}"]

    # The memory check still refuses what cannot fit.
    with pytest.raises(tb.UserError, match="lower --memory"):
        check_memory_fits(2**60, torch.device("cpu"))
    check_memory_fits(2**20, torch.device("cpu"))


def test_on_windows_a_resumed_run_keeps_none_of_its_checkpoint_files_mapped(tmp_path, monkeypatch, in_process):
    """Windows cannot delete a mapped file, so a run that kept its checkpoint's files mapped could never rotate
    that checkpoint out."""
    run = tmp_path / "run"
    tb.train(*tb.parse_args(["--checkpoints", str(run), *RECIPE, "--steps", "200"]))
    as_windows(monkeypatch)
    mapped, periodic_work = [], tb.periodic_work

    def look(*args):
        if not mapped:
            with open("/proc/self/maps") as f:
                mapped.append([line for line in f if str(run / "resume") in line])
        periodic_work(*args)

    monkeypatch.setattr(tb, "periodic_work", look)
    tb.train(*tb.parse_args(["--checkpoints", str(run), *RECIPE, "--steps", "300", "--resume"]))
    assert mapped == [[]]
    assert checkpoints(run) == [f"{200:012d}", f"{300:012d}"]


def test_ctrl_break_on_windows_asks_for_a_stop_as_ctrl_c_does(monkeypatch):
    # SIGUSR1 stands in for Windows's SIGBREAK, which Linux does not have.
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signal == "SIGUSR1"
    finally:
        stop.restore()
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.skipif(not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2, reason="needs taskset, 2 CPUs")
def test_a_trainer_given_one_cpu_runs_every_thread_on_it(tmp_path):
    """A scheduler gives a job some CPUs of a large node (Slurm's --cpus-per-task, taskset): the games' threads,
    torch's and their pinning follow that share, not the machine's core count."""
    cpu = min(os.sched_getaffinity(0))
    command = ["taskset", "-c", str(cpu), sys.executable, str(ROOT / "train_breakout.py"), "--checkpoints",
               str(tmp_path / "run"), "--envs", "4", "--memory", "500", "--learn-start", "50", "--batch-size", "16",
               "--eval-every", "0", "--steps", "100000", "--device", "cpu"]
    trainer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("cores:"):
            lines.append(trainer.stdout.readline())
            assert lines[-1], "".join(lines)
        time.sleep(3)  # learning has begun, with torch's threads
        threads = {int(t): os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{trainer.pid}/task")}
        trainer.send_signal(signal.SIGTERM)
        out = "".join(lines) + trainer.communicate(timeout=120)[0]
    finally:
        trainer.kill()
    machine = os.cpu_count()
    assert (f"cores: 1 of the machine's {machine} (this process's CPU affinity); games on 1 thread, pinned from "
            f"core {cpu}; torch on 1 thread") in out
    assert re.search(r"--threads 1\b", out)
    assert all(cpus == {cpu} for cpus in threads.values()), threads
    assert trainer.returncode == 0 and "stopped by SIGTERM" in out, out[-2000:]
