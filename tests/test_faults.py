"""Faults users meet, made for real: a full disk (a small tmpfs, mounted as root), two trainers on one folder,
kill -9 of the trainer and of its helper processes, damaged files in the run's folder, folders that cannot be
written to, and bad seeds."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import trainer_support.checkpoint  # noqa: E402
from trainer_support.background import Helper  # noqa: E402
from trainer_support.cli import UserError  # noqa: E402
from trainer_support.run_folder import FolderLock  # noqa: E402
from trainer_support.checkpoint import checkpoint_folders, load_checkpoint, save_full_checkpoint  # noqa: E402
from test_resume import (RECIPE, assert_same_run, counters, final_checkpoint, start, train,  # noqa: E402
                         wait_for_games)

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    """A small file system of its own (tmpfs, 400 MiB), so that filling it fills nothing else."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


class Full:
    """Keeps a file system full to its last byte with one file, as other writers fill a shared Drive: space that
    comes free (a failed write giving its space back) is taken again at once. `free` deletes the file."""

    def __init__(self, mount: Path):
        self.path, self.stop = mount / "ballast", threading.Event()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT)
        self._top_up(MiB)
        assert shutil.disk_usage(mount).free < MiB
        self.thread = threading.Thread(target=self._keep_full, daemon=True)
        self.thread.start()

    def _top_up(self, size: int) -> None:
        for chunk in (size, 4096):
            try:
                while os.write(self.fd, b"\0" * chunk):
                    pass
            except OSError:
                pass

    def _keep_full(self) -> None:
        while not self.stop.wait(0.005):
            self._top_up(4096)

    def free(self) -> None:
        self.stop.set()
        self.thread.join()
        os.close(self.fd)
        self.path.unlink()


def held_space(mount: Path) -> int:
    """Bytes the file system has in use beyond its files' sizes: space held by deleted files still open."""
    files = sum(f.stat().st_size for f in mount.rglob("*") if f.is_file())
    used = shutil.disk_usage(mount).used
    return used - files


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the run ended before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_full_disk_loses_nothing_and_a_resume_after_freeing_space_ends_as_an_uninterrupted_run(tmp_path, disk):
    straight = tmp_path / "straight"
    train(straight, "--steps", "2000")
    run, log = disk / "run", tmp_path / "stdout.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_breakout.py"), "--checkpoints", str(run), *RECIPE,
                                 "--steps", "100000", "--checkpoint-minutes", "0.01", "--keep-checkpoints", "1"],
                                stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: checkpoint_folders(run / "resume"), proc, "a first checkpoint")
        full = Full(disk)
        # A snapshot (every 20 episodes), a metrics row, a full checkpoint and curve.png meet the full disk.
        for what in ("could not write a checkpoint (no space left on device)", ".pth (no space left on device)",
                     "metrics.csv (no space left on device)"):
            wait_for(lambda: what in log.read_text(), proc, f"the warning '{what}'")
        assert held_space(disk) < MiB, "a failed write still holds its space"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    full.stop.set()  # the disk stays full, no longer topped up
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()
    assert last[-2].startswith("stopped by SIGTERM"), last[-4:]
    newest = checkpoint_folders(run / "resume")[-1]
    assert f"the checkpoint of this step could not be written; --resume goes on from {newest}" in text
    step = counters(newest)["steps"]
    assert step < 2000
    # Nothing on disk was damaged: every row of metrics.csv is whole, the checkpoint loads.
    rows = (run / "metrics.csv").read_text().splitlines()
    assert all(r.count(",") == 10 for r in rows), "a row of metrics.csv was cut short"

    # --resume with no space free starts and says saving will fail. It trains to its budget, but its network is
    # saved nowhere: not `done:`, exit 1, and the line says what goes on from the checkpoint kept.
    p = train(run, "--resume", "--steps", str(step + 100), check=False)
    assert "snapshots, logs and checkpoints that do not fit fail" in p.stdout
    assert f"--resume goes on from {newest}" in p.stdout and "Traceback" not in p.stderr
    assert p.returncode == 1 and "done:" not in p.stdout, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].endswith(f"--resume --checkpoints {run} goes on from its checkpoint of "
                                                      f"step {step:,}")

    full.free()
    train(run, "--resume", "--steps", "2000")
    assert_same_run(straight, run)


class Part:
    """A part of a declared state: a tensor for state.pt and an array for its own compressed file."""

    def __init__(self, n):
        self.weights = torch.ones(n)
        self.ARRAYS, self.table = ("table",), np.ones(n, np.uint8)

    def state_dict(self):
        return dict(weights=self.weights, table=self.table)


@dataclasses.dataclass
class State:
    part: Part


def test_a_checkpoint_that_meets_a_full_disk_inside_pytorch_says_so_and_gives_the_space_back(disk, capsys):
    """PyTorch raises a full disk as a RuntimeError about its zip file; the warning says "no space left", no
    temporary folder stays, and no deleted file keeps holding space."""
    small = disk / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        save_full_checkpoint(small / "resume", State(Part(2 * MiB)), "a", {}, keep=2)
        out = capsys.readouterr().out
        assert "could not write a checkpoint (no space left on device); there is no earlier one" in out, out
        assert not list((small / "resume").iterdir())
        assert held_space(small) < 64 * 1024
        save_full_checkpoint(small / "resume", State(Part(400_000)), "b", {}, keep=2)  # it fits: written
        assert load_checkpoint(small / "resume" / "b")[0]["part"]["weights"].numel() == 400_000
        # Two checkpoints of 1.6 MB kept, no room for a third beside them but room without the oldest: the
        # oldest is removed first, and the new one is written.
        save_full_checkpoint(small / "resume", State(Part(400_000)), "c", {}, keep=2)
        save_full_checkpoint(small / "resume", State(Part(400_000)), "d", {}, keep=2)
        out = capsys.readouterr().out
        assert "the oldest checkpoint, b, is removed to make room" in out, out
        assert [f.name for f in checkpoint_folders(small / "resume")] == ["c", "d"]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_two_trainers_on_one_folder_one_is_refused_and_a_lock_left_by_kill_9_blocks_nothing(tmp_path):
    run = tmp_path / "run"
    # Started together, with different seeds: one trains, the other is refused, and nothing mixes.
    procs = [start(run, "--steps", "900", "--seed", str(seed)) for seed in (3, 4)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-500:] for r in results]
    loser = next(r for r in results if r[0] == 2)
    assert loser[2].count("\n") == 1 and ("is in use by another trainer (process " in loser[2]
                                          or "already holds a run" in loser[2]), loser[2]
    winner_seed = 3 if results[0][0] == 0 else 4
    assert json.loads((run / "config.json").read_text())["args"]["seed"] == winner_seed
    assert load_checkpoint(final_checkpoint(run))[2]["summary"]["args"]["seed"] == winner_seed

    # One after the other: a second start (--auto-resume, as a re-run cell) is refused while the first runs,
    # and deletes nothing of it.
    seed = ["--seed", str(winner_seed)]
    proc = start(run, "--resume", "--steps", "100000", "--checkpoint-minutes", "0.01", *seed)
    try:
        wait_for_games(run, 10, proc)
        p = train(run, "--auto-resume", *seed, check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert f"is in use by another trainer (process {proc.pid} on " in p.stderr
        assert proc.poll() is None
        # kill -9 leaves the lock file behind; the next start is not blocked by it.
        proc.kill()
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (run / ".trainer.lock").exists()
    step = counters(checkpoint_folders(run / "resume")[-1])["steps"]
    assert f"agent step {step}" in train(run, "--resume", "--steps", str(step + 60), *seed).stdout


def helper_processes(trainer: psutil.Process) -> list:
    return [c for c in trainer.children(recursive=True)
            if "multiprocessing.spawn" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]


def test_a_helper_killed_with_kill_9_comes_back_for_the_next_evaluation(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "--steps", "100000", "--eval-beside", "on", "--eval-every", "400")
    # (the trainer's children: the evaluations' process and multiprocessing's resource tracker)
    try:
        evals = lambda: (run / "metrics.csv").read_text().count("\neval,") if (run / "metrics.csv").exists() else 0
        wait_for(lambda: evals() >= 1, proc, "an evaluation")
        trainer = psutil.Process(proc.pid)
        wait_for(lambda: len(helper_processes(trainer)) == 1, proc, "the evaluations' process")
        for helper in helper_processes(trainer):
            helper.kill()
        seen = evals()
        wait_for(lambda: evals() >= seen + 2, proc, "two evaluations after the kill")
        assert len(helper_processes(trainer)) == 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    # A process killed during its job is reported (the Helper's own test makes sure of it); one killed between
    # jobs is simply started again. Either way the work went on in processes of their own, not in the loop.
    assert "the training loop does" not in out
    assert "A.L.E" not in out + err  # no emulator banner from the evaluations' processes in the run's log


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_helper_comes_back_after_kill_9_and_one_that_keeps_dying_hands_its_work_to_the_loop(capsys):
    """At the Helper's level, the real thing: jobs whose process ends by kill -9."""
    helper = Helper("evaluations")

    def run(work):
        assert helper.submit(work) is True
        return helper.poll(wait=True)

    try:
        first = run(os.getpid)
        assert run(kill_myself) == (False, "its process died; the next one starts another")
        again = run(os.getpid)
        assert again[0] and again[1] != first[1]  # a new process
        for _ in range(Helper.FAILURES):
            assert not run(kill_myself)[0]
        assert helper.submit(os.getpid) is False  # the caller does the work from now on
        assert "the evaluations' process died 3 times in a row" in capsys.readouterr().out
    finally:
        helper.close(timeout=0)


def test_damaged_loose_files_neither_block_nor_change_a_resume(tmp_path):
    run = tmp_path / "run"
    train(run, "--steps", "300", "--checkpoint-minutes", "0.01")
    metrics, config = run / "metrics.csv", run / "config.json"
    good_config = config.read_text()
    # metrics.csv with bytes that are not text among its rows and cut mid-line (a full disk), and config.json
    # without one field (it came back with that flag's default before): the two lines that cannot be read are
    # set aside, every other row is kept, and the checkpoint's flags resume.
    lines, junk = metrics.read_bytes().splitlines(keepends=True), b"\xff\xfe\x00 not text\n"
    assert len(lines) >= 2  # the header and a row to keep; then the junk, and a row cut short by a full disk
    cut = lines[-1][:-7]
    metrics.write_bytes(b"".join(lines) + junk + cut)
    edited = json.loads(good_config)
    del edited["args"]["memory"]
    config.write_text(json.dumps(edited))
    p = train(run, "--resume", "--steps", "400")
    assert "metrics.csv: 2 lines could not be read: dropped, and kept in metrics.csv.damaged" in p.stdout
    assert (run / "metrics.csv.damaged").read_bytes() == junk + cut
    assert metrics.read_bytes().splitlines(keepends=True)[:len(lines)] == lines
    assert re.search(r"--memory 300\b", p.stdout) and json.loads(config.read_text())["args"]["memory"] == 300
    assert metrics.read_text().endswith("\n") and all(r.count(",") == 10 for r in metrics.read_text().splitlines())
    # metrics.csv missing: started again with its header; config.json empty: written again from the checkpoint.
    metrics.unlink()
    config.write_text("")
    p = train(run, "--resume", "--steps", "500")
    assert "metrics.csv is missing; it starts again with its header" in p.stdout
    assert metrics.read_text().startswith("kind,step,")
    assert json.loads(config.read_text())["args"]["memory"] == 300
    # A newest checkpoint that does not fit the run its flags describe: one line, and the one before it.
    folders = checkpoint_folders(run / "resume")
    manifest = json.loads((folders[-1] / "manifest.json").read_text())
    manifest["summary"]["args"]["frames"] = 4  # a flag the command does not give
    (folders[-1] / "manifest.json").write_text(json.dumps(manifest))
    p = train(run, "--resume", "--steps", "600")
    assert f"checkpoint {folders[-1]} is damaged (it does not fit the run its flags describe" in p.stderr
    assert f"resumed from {folders[-2]}" in p.stdout
    # A checkpoint of another run put in resume/: refused, the run's own one used.
    other = tmp_path / "other"
    train(other, "--steps", "700", "--seed", "5")
    shutil.copytree(final_checkpoint(other), run / "resume" / f"{700:012d}")
    p = train(run, "--resume", "--steps", "650")
    assert "it belongs to another run than config.json's" in p.stderr and "resumed from" in p.stdout
    resumed = next(line for line in p.stdout.splitlines() if line.startswith("resumed from"))
    assert f"resume/{600:012d}:" in resumed and re.search(r"--seed 3\b", p.stdout)


def test_when_no_checkpoint_is_usable_the_way_out_given_works(tmp_path):
    run = tmp_path / "run"
    train(run, "--steps", "200", "--checkpoint-minutes", "0.001")
    for folder in checkpoint_folders(run / "resume"):
        (folder / "state.pt").write_bytes(b"damaged")
    p = train(run, "--resume", "--steps", "300", check=False)
    assert p.returncode == 2 and "start a new run with --checkpoints NEW_FOLDER, or move" in p.stderr
    # The only checkpoint, damaged: the line names the way out, a command to paste.
    shutil.rmtree(checkpoint_folders(run / "resume")[0])
    p = train(run, "--auto-resume", "--steps", "300", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "it is the run's only full checkpoint:" in p.stderr
    move = re.search(r"\((mv [^)]*)\)", p.stderr).group(1)
    subprocess.run(["bash", "-c", move], check=True)
    p = train(run, "--auto-resume", "--steps", "100")
    assert "resumed from" not in p.stdout and final_checkpoint(run).name == f"{100:012d}"


@pytest.mark.parametrize("case", ["a-file", "under-proc", "read-only", "seed-negative", "seed-too-big",
                                  "resume-elsewhere"])
def test_bad_folders_and_seeds_are_refused_before_anything_is_written(tmp_path, case):
    run, flags = tmp_path / "run", []
    if case == "a-file":
        run.write_text("")
    elif case == "under-proc":
        run = Path("/proc/no-such-run")
    elif case == "read-only":
        run.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(run)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs (needs root)")
    elif case == "resume-elsewhere":  # --checkpoints naming another folder than the run --resume continues
        flags = ["--resume", str(tmp_path / "other" / "resume" / f"{300:012d}")]
    else:
        flags = ["--seed", "-1" if case == "seed-negative" else str(2**31)]
    try:
        p = subprocess.run([sys.executable, str(ROOT / "train_breakout.py"), "--checkpoints", str(run), *RECIPE,
                            "--steps", "60", *flags], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr[-2000:]
        assert "replay memory:" not in p.stdout  # refused before the games were built
        if case == "resume-elsewhere":
            assert "continues the run in " in p.stderr and "leave out --checkpoints" in p.stderr
            assert not run.exists() and not (tmp_path / "other").exists()
        if case.startswith("seed"):
            assert "--seed must lie in [0, 2147483647]" in p.stderr
            assert not run.exists()  # nothing left behind: the corrected command starts the run
            train(run, "--steps", "60")
    finally:
        if case == "read-only":
            subprocess.run(["umount", "-l", str(run)], check=False)


def test_a_run_that_could_save_nothing_fails_and_is_not_taken_for_finished(disk):
    run = disk / "run"
    run.mkdir()
    full = Full(disk)
    try:
        p = train(run, "--steps", "300", check=False)
    finally:
        full.free()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = (p.stdout + p.stderr).strip().splitlines()
    assert p.stderr.strip().splitlines()[-1].startswith("failed: "), p.stderr[-2000:]
    assert "nor a full checkpoint of this step could be written (no space left on device)" in p.stderr
    assert "then start it over with its flags and --auto-resume" in p.stderr
    # The README's Slurm script requeues on `stopped by` in the last two lines, and a finished run says `done:`.
    assert not any(line.startswith(("done:", "stopped by")) for line in last[-2:]), last[-2:]
    assert "done:" not in p.stdout and not list(run.glob("*.pth"))


def test_impossible_games_are_refused_and_a_stop_while_the_games_are_built_leaves_nothing(tmp_path):
    run = tmp_path / "new run"
    p = train(run, "--envs", "100000", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-2000:]
    assert re.match(r"error: --envs 100000 is more games than this machine can serve: at most \d+ here", p.stderr)
    assert not run.exists()
    # Ctrl-C while its 16 games are built (about 90 ms each here): the start ends there, nothing is left.
    proc = start(run, "--envs", "16", "--steps", "100000")
    wait_for(lambda: (run / ".trainer.json").exists(), proc, "the start to lock its folder")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert out.strip().splitlines()[-2].startswith("stopped by SIGINT while starting, before anything was written")
    assert "replay memory:" not in out and not run.exists()


def test_a_lock_file_this_trainer_may_not_open_refuses_the_start(tmp_path):
    """.trainer.lock at mode 000 and a trainer without the right to override permissions (root less
    CAP_DAC_OVERRIDE): it cannot tell whether another trainer holds the folder, so it is refused."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop the right to override permissions")
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    run = tmp_path / "run"
    proc = start(run, "--steps", "100000")
    try:
        wait_for_games(run, 2, proc)
        (run / ".trainer.lock").chmod(0)
        p = subprocess.run([*drop, sys.executable, str(ROOT / "train_breakout.py"), "--checkpoints", str(run), *RECIPE,
                            "--auto-resume", "--steps", "100000"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-2000:]
        assert f"{run}/.trainer.lock cannot be opened (Permission denied)" in p.stderr
        assert f"(chmod u+rw {run}/.trainer.lock)" in p.stderr and "replay memory:" not in p.stdout
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "stopped by SIGTERM" in out, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_folder_deleted_under_a_run_is_locked_again_and_its_continue_line_pastes(tmp_path):
    run, log = tmp_path / "my run", tmp_path / "stdout.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_breakout.py"), "--checkpoints", str(run), *RECIPE,
                                 "--steps", "100000"], stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_games(run, 2, proc)
        shutil.rmtree(run)
        wait_for(lambda: "was deleted while this run trained" in log.read_text(), proc, "the trainer to notice")
        wait_for(lambda: checkpoint_folders(run / "resume"), proc, "the checkpoint in the folder made again")
        p = train(run, "--auto-resume", "--steps", "100000", check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-2000:]
        assert f"is in use by another trainer (process {proc.pid} on " in p.stderr
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]
    assert text.count("was deleted while this run trained") == 1
    step = counters(checkpoint_folders(run / "resume")[-1])["steps"]
    # The last line, pasted into a shell as it is (the folder's name has a space), goes on from that checkpoint.
    lines = text.strip().splitlines()
    assert lines[-2].startswith("stopped by SIGTERM") and lines[-1].startswith("  python train_breakout.py --resume")
    p = subprocess.run(["bash", "-c", f"{lines[-1].strip()} --steps {step + 50}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and f"agent step {step}" in p.stdout, p.stderr[-2000:]


def test_a_folder_lost_to_another_trainer_is_not_taken_back(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ours, theirs = FolderLock(run), FolderLock(run)
    ours.acquire()
    assert not ours.lost()
    shutil.rmtree(run)
    assert ours.lost()
    run.mkdir()
    theirs.acquire()  # the folder deleted, another trainer made it again and holds it now
    with pytest.raises(UserError, match="is in use by another trainer"):
        ours.retake()
    theirs.release()


def test_a_second_stop_during_a_save_says_the_save_was_interrupted(tmp_path, capsys, monkeypatch):
    """Ctrl-C twice (or a SIGTERM storm): the second comes while state.pt is written, inside torch.save, which would
    turn it into a RuntimeError about positions in its zip file. It ends the run, saying so; the previous
    checkpoint stays."""
    root = tmp_path / "resume"
    save_full_checkpoint(root, State(Part(1000)), "a", {}, keep=2)
    real_open = open

    class Interrupted:
        def __init__(self, *a, **kw):
            self.f, self.writes = real_open(*a, **kw), 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt at the next step
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(trainer_support.checkpoint, "open", Interrupted, raising=False)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        save_full_checkpoint(root, State(Part(400_000)), "b", {}, keep=2)
    out = capsys.readouterr().out
    assert "warning: the checkpoint being written was interrupted and is not kept; the previous one is" in out, out
    assert "inline_container" not in out and [f.name for f in root.iterdir()] == ["a"]
    load_checkpoint(root / "a")
