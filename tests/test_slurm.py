"""The Slurm script of docs/clusters.md, run on a real Slurm: every array task is signalled before its time limit,
saves, requeues itself, resumes and ends with `done:`; and the run it makes equals one uninterrupted run.

The one-node Slurm comes from .ci/slurm-up (munged, slurmctld and slurmd on this machine). Where it cannot start,
or a Slurm already running requeues too slowly to serve, the test skips and says why in one line; with
BREAKOUT_REQUIRE_SLURM=1 (set by .ci/run) it fails instead."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import RECIPE, ROOT, assert_same_run, train  # noqa: E402

# Slurm's shortest limit is a minute; the signal comes 30 s before it, or up to 60 s earlier still (Slurm looks at
# its jobs' limits twice a minute). A session trains 30 s or less, so this budget needs more than one.
LIMIT, SIGNAL = "00:01:00", "TERM@30"
BUDGET = ["--steps", "8000"]
TASKS = 2


def slurm_or_skip() -> None:
    up = subprocess.run([str(ROOT / ".ci" / "slurm-up")], capture_output=True, text=True)
    if up.returncode != 0:
        why = (up.stdout + up.stderr).strip().splitlines()[-1:] or ["no reason given"]
        if os.environ.get("BREAKOUT_REQUIRE_SLURM") == "1":
            pytest.fail(f"no Slurm for this test: {why[0]}")
        pytest.skip(f"no Slurm for this test: {why[0]}")


def readme_script() -> str:
    """The array script of docs/clusters.md: the bash block of its section "A cluster: Slurm"."""
    page = (ROOT / "docs" / "clusters.md").read_text()
    section = page[page.index("## A cluster: Slurm"):]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start:section.index("\n```", start)] + "\n"


def replaced(text: str, pattern: str, new: str) -> str:
    """`text` with the one line matching `pattern` replaced (new=None removes it); docs/clusters.md must have it."""
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert len(hits) == 1, f"the Slurm script of docs/clusters.md has {len(hits)} lines matching {pattern!r}"
    lines[hits[0]] = "" if new is None else re.sub(pattern, new, lines[hits[0]])
    return "".join(lines)


def adapted(script: str, flags: list) -> str:
    """The script with its resources for this one machine, a short limit, two tasks and a small run: the rest, the
    srun line's own flags and the requeue line included, is docs/clusters.md's."""
    script = replaced(script, r"^#SBATCH --gres=.*\n", None)
    script = replaced(script, r"^#SBATCH --cpus-per-task=.*\n", None)
    script = replaced(script, r"--array=\S+", f"--array=0-{TASKS - 1}")
    script = replaced(script, r"--time=\S+", f"--time={LIMIT}")
    script = replaced(script, r"--signal=TERM@\d+", f"--signal={SIGNAL}")
    return replaced(script, r"--episodes \d+ --recipe fast", " ".join(flags))


def job_restarts(job: str) -> dict:
    """Each array task's restart count, while Slurm still knows the job."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return {int(m.group(1)): int(m.group(2)) for m in
            re.finditer(r"ArrayTaskId=(\d+) .*?Restarts=(\d+)", shown)}


def in_queue(job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip())


def text_of(log: Path) -> str:
    return log.read_bytes().decode(errors="replace") if log.exists() else ""


def test_the_readmes_slurm_script_requeues_every_task_until_its_run_is_done(tmp_path):
    slurm_or_skip()
    for name in ("train_breakout.py", "trainer_support"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "logs").mkdir()
    flags = [f for f in RECIPE if f not in ("--seed", "3")] + BUDGET  # the script gives each task its seed
    script = tmp_path / "train.sbatch"
    script.write_text(adapted(readme_script(), flags))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], cwd=tmp_path, env=env,
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    logs = [tmp_path / "logs" / f"breakout-{i}.out" for i in range(TASKS)]
    try:
        # Meanwhile, the run of task 0 uninterrupted, here.
        straight = tmp_path / "straight"
        train(straight, "--seed", "0", *flags[flags.index("--steps"):])
        restarts, deadline = {}, time.time() + 480
        while in_queue(job):  # a finished task leaves the queue; a requeued one waits in it
            assert time.time() < deadline, "the array did not finish in 8 minutes:\n" + "\n".join(
                text_of(log)[-1500:] for log in logs)
            restarts.update(job_restarts(job))
            time.sleep(1)
    except BaseException:
        subprocess.run(["scancel", job], capture_output=True)
        raise
    for i, log in enumerate(logs):
        text = text_of(log)
        # The trainer's last line; Slurm's own (srun's, slurmstepd's) may follow it: a signal that comes as the
        # finished run exits ends the process after its `done:` (and keeps it from being requeued).
        ours = [line for line in text.splitlines() if not line.startswith(("srun:", "slurmstepd"))]
        assert ours and ours[-1].startswith("done: "), text[-3000:]
        stops = re.findall(r"^stopped by SIGTERM at episode \d+, agent step (\d+)", text, re.M)
        # Slurm's signal may come while a task starts: that start ends, writing nothing, and is requeued too.
        starts_stopped = len(re.findall(r"^stopped by SIGTERM while starting", text, re.M))
        resumes = re.findall(r"^resumed from .*agent step (\d+)$", text, re.M)
        resumes = [step for k, step in enumerate(resumes) if k == 0 or step != resumes[k - 1]]  # a start stopped
        assert stops and resumes == stops, f"task {i} resumed elsewhere than it stopped:\n{text[-3000:]}"
        assert restarts.get(i, 0) == len(stops) + starts_stopped, (restarts, text[-3000:])
        # Each task requeues itself alone: `scontrol requeue` of the whole array would answer for every task.
        assert not re.search(r"^\d+_\d+: ", text, re.M), text[-3000:]
        assert "\r" not in text  # a log, not a progress bar's redraws
        assert "warning:" not in text  # the signal reaches the helper processes too: they leave it to the trainer
    assert_same_run(straight, tmp_path / "runs" / "seed-0")
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
