"""Periodic work beside training: evaluations on their own thread, curve.png drawn by another process,
full checkpoints written while training goes on."""
from __future__ import annotations

import csv
import os
import re
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402
import train_breakout as tb  # noqa: E402


def rows(run: Path, kind: str) -> list:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["episode"], r["score"], r["loss"]) for r in csv.DictReader(f) if r["kind"] == kind]


def test_evaluations_beside_training_score_as_inline_ones_and_the_curve_is_drawn_elsewhere(tmp_path, in_process,
                                                                                          capsys, monkeypatch):
    runs = {}
    for beside in ("off", "on"):
        if beside == "on":  # drawn in this process, the curve would raise here
            import matplotlib.figure
            monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                                lambda *a, **kw: (_ for _ in ()).throw(AssertionError("drawn in the training process")))
        runs[beside] = run = tmp_path / beside
        tb.train(*tb.parse_args(["--checkpoints", str(run), "--eval-beside", beside, "--envs", "2", "--steps", "1500",
                                 "--memory", "400", "--batch-size", "16", "--learn-start", "100", "--eval-every",
                                 "750", "--eval-games", "2", "--plot-every", "10", "--seed", "4", "--device", "cpu",
                                 "--threads", "1"]))
        out = capsys.readouterr().out
        assert re.search(rf"--eval-beside {beside}(  |$)", out, re.M), out  # the flags in force, at the start
    on, off = runs["on"], runs["off"]
    assert [r[0] for r in rows(off, "eval")] == ["750", "1500"]
    # The one at 1500 is skipped if the one at 750 (its process starting up, here) still plays by then.
    assert rows(on, "eval") in (rows(off, "eval"), rows(off, "eval")[:1])  # same weights, step, episode, score
    assert rows(on, "game") == rows(off, "game")  # and training did not notice
    if len(rows(on, "eval")) == 2:
        assert (on / "best.pth").read_bytes() == (off / "best.pth").read_bytes()
    assert (on / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_while_a_checkpoint_is_written_beside_training_keeps_it_whole_and_exact(tmp_path, in_process,
                                                                                         monkeypatch, capsys):
    """The first checkpoint written beside training gets SIGTERM in the middle of its writing: the run waits for
    it, saves once more and stops; resuming from that first checkpoint ends exactly where the stopped run did."""
    save = plumbing.save_checkpoint
    stopped_during = []

    def slow_save(*a, **kw):
        if threading.current_thread() is not threading.main_thread() and not stopped_during:
            stopped_during.append(a[1])
            threading.Event().wait(0.5)  # training goes on meanwhile
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(1.0)  # the loop sees the stop while this save is still being written
        return save(*a, **kw)

    monkeypatch.setattr(plumbing, "save_checkpoint", slow_save)
    run = tmp_path / "run"
    flags = ["--checkpoints", str(run), "--envs", "1", "--memory", "300", "--batch-size", "16", "--learn-start", "100",
             "--eval-every", "0", "--seed", "9", "--device", "cpu", "--threads", "1"]
    tb.train(*tb.parse_args(flags + ["--steps", "100000", "--checkpoint-minutes", "0.01"]))
    out = capsys.readouterr().out
    assert "stopped by SIGTERM" in out and len(stopped_during) == 1
    first, last = (run / "resume" / name for name in (stopped_during[0], sorted(os.listdir(run / "resume"))[-1]))
    assert int(first.name) < int(last.name)
    for folder in (first, last):
        plumbing.load_checkpoint(folder)  # whole: every file matches its manifest

    # Resumed from the checkpoint that was being written when the signal came, the run ends bit for bit where
    # the stopped run ended: the state copied at the step is the state written.
    ta, xa, _ = plumbing.load_checkpoint(last)
    xa = {name: np.asarray(x) for name, x in xa.items()}
    monkeypatch.setattr(plumbing, "save_checkpoint", save)
    tb.train(*tb.parse_args(["--resume", str(first), "--steps", last.name]))
    tb_, xb, _ = plumbing.load_checkpoint(last)
    for net in ("policy_net", "target_net"):
        assert all(torch.equal(ta[net][k], tb_[net][k]) for k in ta[net]), net
    assert sorted(xa) == sorted(xb)
    for name in xa:
        x, y = xa[name], np.asarray(xb[name])
        if name == "history.games":
            x, y = x[:, [0, 2]], y[:, [0, 2]]  # column 1 is wall-clock seconds
        assert np.array_equal(x, y), name
    ta["counters"].pop("seconds"), tb_["counters"].pop("seconds")
    assert ta["counters"] == tb_["counters"] and ta["transitions"] == tb_["transitions"]


def test_the_curve_of_a_long_run_is_thinned_to_a_fixed_number_of_points(tmp_path):
    history, rng = tb.History(), np.random.default_rng(0)
    n = 50_000
    scores = rng.integers(0, 40, n).astype(float)
    scores[31_234] = tb.WALL_CLEARED + 3
    for i, score in enumerate(scores):
        history.games.append([10 * i, i, score])
        history.learning.append([10 * i, 1.0 + i % 2, 2.0])
    data = history.curve_data()
    assert len(data["step"]) == plumbing.CURVE_POINTS and data["step"][-1] == 10 * (n - 1) and not data["each_game"]
    assert data["mean"][-1] == pytest.approx(scores[-100:].mean())
    assert data["best"][-1] == scores.max() and data["first_clear"] == 10 * 31_234
    assert data["low"].min() == scores.min() and data["high"].max() == scores.max()
    assert len(data["learning"]) == plumbing.CURVE_POINTS and np.allclose(data["learning"][1:, 1], 1.5, atol=0.05)
    plumbing.draw_curve(tmp_path / "curve.png", data, "ALE/Breakout-v5")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    few = tb.History()
    for i, score in enumerate(scores[:300]):
        few.games.append([i, i, score])
    data = few.curve_data()
    assert data["each_game"] and np.array_equal(data["high"], scores[:300])
    means = [scores[max(0, i - 99):i + 1].mean() for i in range(300)]
    assert np.allclose(data["mean"], means) and data["first_clear"] is None


def test_a_checkpoint_written_beside_training_holds_the_frames_as_they_were_at_its_step(tmp_path):
    """Training overwrites the replay ring while the checkpoint's writer reads it: slots overwritten before the
    writer reads them still come out as they were when the checkpoint was taken."""
    replay = tb.ReplayMemory(40, 2, 4, 1, torch.device("cpu"))
    frame = lambda i: torch.full((2, tb.SIZE, tb.SIZE), i % 256, dtype=torch.uint8)
    for i in range(replay.slots + 7):  # the ring has wrapped: slot 7 is the next to be overwritten
        replay.add_frames(frame(i), torch.zeros(2, dtype=torch.bool))
    at_step = replay.frames.clone()
    snapshot = replay.state_dict()["frames"]
    chunks = snapshot.chunks(5)
    read = [next(chunks)]  # slots 0-4 read
    for i in range(replay.slots + 7, replay.slots + 7 + 12):  # slots 7-18 overwritten, 7-9 in the next chunk
        replay.add_frames(frame(i), torch.zeros(2, dtype=torch.bool))
    read += list(chunks)
    assert np.array_equal(np.concatenate(read), at_step.numpy())
    assert not np.array_equal(replay.frames.numpy(), at_step.numpy())
    replay.add_frames(frame(0), torch.zeros(2, dtype=torch.bool))
    assert replay.snapshot is None  # read whole: training keeps nothing aside any more

    saved = replay.state_dict()["frames"]  # and through the checkpoint file
    at_step = replay.frames.clone()
    plumbing.save_array(tmp_path / "frames.npy.zst", saved)
    assert np.array_equal(np.asarray(plumbing.CompressedArray(tmp_path / "frames.npy.zst")), at_step.numpy())


def test_an_evaluation_playing_when_the_run_stops_is_kept_by_the_checkpoint_and_played_on_resume(tmp_path, in_process,
                                                                                                  monkeypatch, capsys):
    flags = ["--envs", "1", "--memory", "300", "--batch-size", "16", "--learn-start", "100", "--eval-every", "500",
             "--eval-games", "2", "--seed", "6", "--device", "cpu", "--threads", "1", "--steps", "700"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    tb.train(*tb.parse_args(flags + ["--checkpoints", str(straight), "--eval-beside", "off"]))

    handed_over = tb.play_evaluation

    def stop_right_after(run, session):  # SIGTERM as soon as the evaluation has been handed over
        handed_over(run, session)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tb, "play_evaluation", stop_right_after)
    tb.train(*tb.parse_args(flags + ["--checkpoints", str(stopped), "--eval-beside", "on"]))
    out = capsys.readouterr().out
    assert "the evaluation of step 500 was still playing" in out and "stopped by SIGTERM" in out
    assert rows(stopped, "eval") == []
    monkeypatch.setattr(tb, "play_evaluation", handed_over)
    tb.train(*tb.parse_args(["--resume", "--checkpoints", str(stopped)]))
    assert "playing again the evaluation of step 500" in capsys.readouterr().out
    assert rows(stopped, "eval") == rows(straight, "eval") and len(rows(straight, "eval")) == 1
    assert rows(stopped, "game") == rows(straight, "game")
    assert (stopped / "best.pth").read_bytes() == (straight / "best.pth").read_bytes()


def test_a_second_stop_still_lets_the_checkpoint_being_written_finish(tmp_path, in_process, monkeypatch):
    save, written = plumbing.save_checkpoint, []

    def slow_save(*a, **kw):
        if threading.current_thread() is not threading.main_thread() and not written:
            for _ in range(2):  # a stop, then a second one while this save is still being written
                os.kill(os.getpid(), signal.SIGTERM)
                threading.Event().wait(0.5)
            written.append(save(*a, **kw))
            return written[-1]
        return save(*a, **kw)

    monkeypatch.setattr(plumbing, "save_checkpoint", slow_save)
    with pytest.raises(KeyboardInterrupt):
        tb.train(*tb.parse_args(["--checkpoints", str(tmp_path / "run"), "--envs", "1", "--memory", "300",
                                 "--learn-start", "100", "--batch-size", "16", "--eval-every", "0", "--seed", "2",
                                 "--device", "cpu", "--threads", "1", "--steps", "100000",
                                 "--checkpoint-minutes", "0.01"]))
    assert written and plumbing.load_checkpoint(written[0])  # written whole before train() gave up


def test_a_helper_process_computes_at_the_trainers_precision_on_arguments_of_its_own():
    """TF32 is switched on in the trainer on CUDA: an evaluation beside training must run at the same precision, or
    its Q-values and scores are not those of one in the loop. And the tensors handed over stay the caller's: the
    queue's thread moves what it sends into shared memory, changing the storage under a checkpoint reading it."""
    helper = plumbing.Helper("evaluations")
    weights = {"conv1.weight": torch.randn(32, 6, 8, 8), "act_fc2.bias": torch.randn(4)}
    pointers = {k: v.data_ptr() for k, v in weights.items()}
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert helper.submit(torch.get_float32_matmul_precision) is True
        assert helper.poll(wait=True) == (True, "high")
        assert helper.submit(len, weights) is True
        assert helper.poll(wait=True) == (True, 2)
        assert {k: v.data_ptr() for k, v in weights.items()} == pointers
        assert not any(v.is_shared() for v in weights.values())
    finally:
        torch.set_float32_matmul_precision(before)
        helper.close(timeout=0)


def test_a_helper_leaves_ctrl_c_and_sigterm_to_the_trainer_even_while_it_starts():
    # Slurm's SIGTERM, and Ctrl-C, reach every process of the job; a helper still importing (it takes seconds)
    # died of them, and the run said so in a warning. Each signal here lands in its first instants.
    helper = plumbing.Helper("test")
    held = []
    previous = signal.signal(signal.SIGTERM, lambda *_: held.append("trainer"))
    try:
        assert helper.submit(os.getpid)
        child = next(iter(helper.pool._processes.values()))
        for s in (signal.SIGTERM, signal.SIGINT):
            os.kill(child.pid, s)
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer gets its own, as ever
        assert helper.poll(wait=True) == (True, child.pid)
        assert helper.submit(os.getpid) and helper.poll(wait=True) == (True, child.pid)  # the same process
    finally:
        helper.close(timeout=5)
        signal.signal(signal.SIGTERM, previous)
    assert held == ["trainer"]
