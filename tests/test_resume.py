"""Stopping and resuming: exact continuation, signals, damaged checkpoints, refused recipe changes."""
from __future__ import annotations

import csv
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import play  # noqa: E402
import trainer_support.checkpoint  # noqa: E402
from trainer_support.checkpoint import checkpoint_folders, load_checkpoint, save_array  # noqa: E402
import train_breakout as tb  # noqa: E402
from trainer_support import atari  # noqa: E402

# Learning from the 100th stored transition, a small memory that wraps, an evaluation and a snapshot on the
# way: every part of the state takes part.
RECIPE = ["--envs", "1", "--seed", "3", "--memory", "300", "--batch-size", "32", "--learn-start", "100",
          "--eval-every", "1500", "--eval-games", "1", "--save-every", "20", "--plot-every", "15",
          "--device", "cpu", "--threads", "1"]


def train(run: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "train_breakout.py"), "--checkpoints", str(run), *RECIPE, *flags],
                       capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def start(run: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train_breakout.py"), "--checkpoints", str(run), *RECIPE,
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_games(run: Path, games: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the run has logged `games` finished games (so it is mid-run, learning)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        metrics = run / "metrics.csv"
        if metrics.exists() and metrics.read_text().count("\ngame,") >= games:
            return
        time.sleep(0.05)
    raise AssertionError("the run logged no games in time")


def final_checkpoint(run: Path) -> Path:
    return sorted((run / "resume").iterdir())[-1]


def score_rows(run: Path) -> list:
    with open(run / "metrics.csv") as f:
        return [(r["kind"], r["step"], r["episode"], r["score"], r["loss"], r["mean_q"]) for r in csv.DictReader(f)]


def counters(checkpoint: Path) -> dict:
    return load_checkpoint(checkpoint)[0]["counters"]


def assert_same_state(a, b, where: str = "state") -> None:
    """Two checkpoints' state.pt contents agree: every tensor bit for bit, every other value exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where} differs"


def assert_same_run(straight: Path, stopped: Path) -> None:
    """The two runs' last checkpoints, logs and snapshots agree bit for bit (wall-clock times aside)."""
    a, b = final_checkpoint(straight), final_checkpoint(stopped)
    assert a.name == b.name
    (sa, xa, _), (sb, xb, _) = load_checkpoint(a), load_checkpoint(b)
    sa["counters"].pop("seconds"), sb["counters"].pop("seconds")
    assert_same_state(sa, sb)
    assert sorted(xa) == sorted(xb)
    for name in sorted(xa):
        x, y = np.asarray(xa[name]), np.asarray(xb[name])
        if name in ("history.games", "history.evals"):
            x, y = np.delete(x, 1, axis=1), np.delete(y, 1, axis=1)  # column 1 is wall-clock seconds
        assert np.array_equal(x, y), f"{name} differs"
    assert score_rows(straight) == score_rows(stopped)
    assert (stopped / "20.pth").read_bytes() == (straight / "20.pth").read_bytes()


def test_stopped_and_resumed_runs_match_an_uninterrupted_run(tmp_path):
    straight, stopped, mid_game = tmp_path / "straight", tmp_path / "stopped", tmp_path / "mid_game"
    train(straight, "--steps", "2000")
    assert final_checkpoint(straight).name == f"{2000:012d}"
    # Every field of the run's state is in its checkpoint, saved without being named anywhere else.
    state, arrays, manifest = load_checkpoint(final_checkpoint(straight))
    assert set(state) | {key.split(".")[0] for key in arrays} == {f.name for f in dataclasses.fields(tb.Run)}
    assert manifest["format"] == 1 and manifest["summary"]["step"] == 2000
    assert play.load_network(str(straight / "best.pth"), torch.device("cpu")) is not None

    # A cluster's scheduler: the same command line, stopped by SIGTERM twice and run a third time. Each time
    # the run finishes its step, saves and says how to go on; the third ends where the uninterrupted run did.
    command, stops = ("--steps", "2000", "--auto-resume"), []
    for _ in range(2):
        logged = score_rows(stopped) if (stopped / "metrics.csv").exists() else []
        proc = start(stopped, *command)
        wait_for_games(stopped, sum(r[0] == "game" for r in logged) + 2, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert "--resume" in out  # it says how to continue
        stops.append(int(final_checkpoint(stopped).name))
    assert 0 < stops[0] < stops[1] < 2000
    resumed = train(stopped, *command)
    assert f"agent step {stops[1]}" in resumed.stdout
    assert_same_run(straight, stopped)

    # A signal tends to land just after a game ends (the test waits for one), where a fresh game holds no
    # state. Stop once more in the middle of a game, learning, with the paddle moving: the emulator, the
    # sticky action it holds and the frame stack must all come back.
    game_ends = [int(r[1]) for r in score_rows(straight) if r[0] == "game"]
    middle = next(end for end in game_ends if end > 1000) - 37
    train(mid_game, "--steps", str(middle))
    train(mid_game, "--resume", "--steps", "2000")
    assert_same_run(straight, mid_game)

    # A scheduler's SIGTERM may come while the trainer is still starting (Slurm sends its signal up to a minute
    # early): during the imports of a new run, and while a resume reads its checkpoint and builds its games. Each
    # ends the start there, with the two lines a requeue looks for, and leaves nothing behind.
    early = tmp_path / "early"
    proc = start(early, *command)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip().splitlines()[-2].startswith("stopped by SIGTERM while starting"), err
    assert not early.exists()
    files = lambda run: {f: (f.stat().st_size, f.stat().st_mtime_ns) for f in run.rglob("*")
                         if f.name != ".trainer.json"}
    before = files(stopped)
    proc = start(stopped, "--steps", "2500", "--auto-resume")
    while json.loads((stopped / ".trainer.json").read_text())["pid"] != proc.pid:  # it holds the lock: starting
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip().splitlines()[-2].startswith("stopped by SIGTERM while starting"), err
    assert out.strip().splitlines()[-1].strip().startswith("python train_breakout.py --checkpoints")
    assert "Traceback" not in err
    assert files(stopped) == before and "resumed from" not in out


def test_ctrl_c_saves_and_resume_extends_a_finished_run(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "--envs", "2", "--episodes", "100000")
    wait_for_games(run, 1, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGINT" in out and "python train_breakout.py --resume" in out
    stopped_at = counters(final_checkpoint(run))["episodes"]

    # A finished run goes on when given a larger budget; flags that only say how long are accepted.
    p = train(run, "--resume", "--envs", "2", "--episodes", str(stopped_at + 10))
    assert "start afresh" in p.stdout  # the vector environment cannot save its games, and says so
    episodes = counters(final_checkpoint(run))["episodes"]
    assert stopped_at + 10 <= episodes <= stopped_at + 12
    assert (run / f"{episodes}.pth").exists()
    assert not list(run.rglob(".*tmp*")), "temporary files were left behind"


def test_keep_checkpoints_keeps_the_newest(tmp_path, monkeypatch):
    run = tmp_path / "run"
    # A full checkpoint at every step: the oldest go as new ones are written.
    args, given = tb.parse_args(["--checkpoints", str(run), *RECIPE, "--steps", "30", "--checkpoint-minutes",
                                 "0.000001", "--keep-checkpoints", "3"])
    tb.train(args, given)
    kept = [int(p.name) for p in checkpoint_folders(run / "resume")]
    assert len(kept) == 3 and kept[-1] == 30 and kept == sorted(kept)


def test_resume_refuses_a_changed_recipe(tmp_path):
    run = tmp_path / "run"
    train(run, "--steps", "300")
    p = train(run, "--resume", "--lr", "0.001", "--steps", "600", check=False)
    assert p.returncode == 2
    assert p.stderr.startswith("error:") and "--lr" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage):
    run = tmp_path / "run"
    train(run, "--steps", "300")
    train(run, "--resume", "--steps", "600")
    newest = final_checkpoint(run)
    victim = newest / "replay.frames.npy.zst"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    p = train(run, "--resume", "--steps", "900")
    assert f"checkpoint {newest} is damaged" in p.stderr
    assert "agent step 300" in p.stdout  # went on from the previous, intact checkpoint
    assert final_checkpoint(run).name == f"{900:012d}"


def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    # A checkpoint every step or so: the kill lands during a save or just between two.
    proc = start(run, "--steps", "100000", "--checkpoint-minutes", "0.0001")
    deadline = time.time() + 120
    while len([p for p in (run / "resume").glob("0*")] if (run / "resume").exists() else []) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.communicate()
    state, arrays, _ = load_checkpoint(checkpoint_folders(run / "resume")[-1])
    assert "policy_net" in state and "replay.frames" in arrays
    p = train(run, "--resume", "--steps", str(state["counters"]["steps"] + 60))
    assert f"agent step {state['counters']['steps']}" in p.stdout
    assert not list((run / "resume").glob(".tmp-*")), "a killed save's temporary folder was left behind"


def test_a_failed_save_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    args, given = tb.parse_args(["--checkpoints", str(run), *RECIPE, "--steps", "200"])
    tb.train(args, given)
    real_save = save_array

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_support.checkpoint, "save_array", disk_full)
    args, given = tb.parse_args(["--checkpoints", str(run), *RECIPE, "--steps", "400", "--resume"])
    summary = tb.train(args, given)
    monkeypatch.setattr(trainer_support.checkpoint, "save_array", real_save)
    assert summary["steps"] == 400
    out = capsys.readouterr().out
    assert "could not write a checkpoint (no space left on device); the previous one is kept" in out
    assert final_checkpoint(run).name == f"{200:012d}"
    assert not list((run / "resume").glob(".tmp-*"))

    # With no checkpoint before it, the warning says the run cannot be resumed yet.
    monkeypatch.setattr(trainer_support.checkpoint, "save_array", disk_full)
    args, given = tb.parse_args(["--checkpoints", str(tmp_path / "new"), *RECIPE, "--steps", "50"])
    tb.train(args, given)
    monkeypatch.setattr(trainer_support.checkpoint, "save_array", real_save)
    out = capsys.readouterr().out
    assert "there is no earlier one, so this run cannot be resumed yet" in out and "previous one is kept" not in out

    # --auto-resume starts such a run over (it has config.json but no checkpoint), and then continues it.
    for steps, resumed in ((60, False), (80, True)):
        args, given = tb.parse_args(["--checkpoints", str(tmp_path / "new"), *RECIPE, "--steps", str(steps),
                                     "--auto-resume"])
        assert tb.train(args, given)["steps"] == steps
        assert ("resumed from" in capsys.readouterr().out) is resumed
    assert final_checkpoint(tmp_path / "new").name == f"{80:012d}"


def test_a_restored_game_plays_on_exactly_as_the_saved_one():
    """Every part of a game's state is in its checkpoint, the sticky action being held included (ALE's own
    saved state leaves that out)."""
    rng = np.random.default_rng(0)
    game, copy = atari.OneGame("ALE/Breakout-v5", 5), atari.OneGame("ALE/Breakout-v5", 6)
    game.reset(), copy.reset()
    for point in range(40):
        for action in rng.integers(0, len(game.actions), (10, 1)):
            game.step(action)
        state = game.state_dict()
        emulator = state.pop("emulator")
        copy.load_state_dict({**json.loads(json.dumps(state)), "emulator": emulator.copy()})  # as saved
        for action in rng.integers(0, len(game.actions), (10, 1)):
            a, b = game.step(action), copy.step(action)
            for x, y in zip(a, b):
                assert np.array_equal(x, y), f"the restored game differs after restore {point}"


def test_a_checkpoint_of_another_format_is_refused_in_one_line_that_says_what_reads_it(tmp_path):
    """Checkpoints carry a format version. One written during development, before format 1 (its manifest.json
    lists the files and nothing else), is refused with the commit that reads it; so is one of a newer format."""
    run = tmp_path / "run"
    train(run, "--steps", "200")
    manifest_path = final_checkpoint(run) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for written, expected in ((manifest["files"], "git checkout b8244e0"), ({**manifest, "format": 2}, "format 2")):
        manifest_path.write_text(json.dumps(written))
        p = subprocess.run([sys.executable, str(ROOT / "train_breakout.py"), "--checkpoints", str(run), "--resume",
                            "--steps", "400"], capture_output=True, text=True, timeout=600)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and expected in p.stderr, p.stderr[-2000:]
    manifest_path.write_text(json.dumps(manifest))  # format 1 again: it resumes
    assert "agent step 200" in train(run, "--resume", "--steps", "400").stdout


LOAD_ROWS = r"""
import resource, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from trainer_support.checkpoint import CompressedArray, load_rows
path, rows = sys.argv[2], int(sys.argv[3])
target = torch.zeros((rows, 84, 84), dtype=torch.uint8)
target.numpy()[...] = 1  # resident before the peak is measured from here
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
load_rows(CompressedArray(path), target, chunk_bytes=(16 << 20) + 12345)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
block = (np.arange(97 * 84 * 84) % 253).astype(np.uint8).reshape(97, 84, 84)
same = all(np.array_equal(target[i:i + 97].numpy(), block[:len(target[i:i + 97])]) for i in range(0, rows, 97))
print(peak - base, same)
"""


def test_a_replay_memory_goes_onto_a_device_a_chunk_at_a_time(tmp_path):
    """Resuming onto a GPU, the frames go from the file to the device through one chunk of host memory: 4.2 GB of
    them by default (42 GB at --memory 1000000) would not fit Colab's RAM twice. Shown on CPU with the function the
    device path uses, in a fresh process whose peak memory is measured."""
    rows = 76_000  # 536 MB of frames
    block = (np.arange(97 * 84 * 84) % 253).astype(np.uint8).reshape(97, 84, 84)
    save_array(tmp_path / "frames.npy.zst", np.tile(block, (rows // 97 + 1, 1, 1))[:rows])
    out = subprocess.run([sys.executable, "-c", LOAD_ROWS, str(ROOT), str(tmp_path / "frames.npy.zst"), str(rows)],
                         capture_output=True, text=True, check=True).stdout.split()
    grew, same = int(out[0]), out[1] == "True"
    assert same
    assert grew < 100 << 20, f"host memory grew by {grew / 2**20:.0f} MB while loading {rows * 84 * 84 / 2**20:.0f} MB"
