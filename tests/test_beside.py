"""Periodic work: evaluations beside training in a process of their own, never across a checkpoint; the curve of a
long run; the replay memory's frames written a chunk at a time; a second stop while the last checkpoint is written."""
from __future__ import annotations

import csv
import math
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import trainer_support.checkpoint  # noqa: E402
from trainer_support.background import Helper  # noqa: E402
from trainer_support.checkpoint import CompressedArray, load_checkpoint, save_array  # noqa: E402
from trainer_support.curve import CURVE_POINTS, History, draw_curve  # noqa: E402
import train_breakout as tb  # noqa: E402


def rows(run: Path, kind: str) -> list:
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["episode"], r["score"], r["loss"]) for r in csv.DictReader(f) if r["kind"] == kind]


def test_evaluations_beside_training_score_as_inline_ones_and_a_checkpoint_due_meanwhile_waits(
        tmp_path, in_process, capsys, monkeypatch):
    collect, save = tb.collect_evaluation, tb.save_checkpoint
    saved_while_playing, due_while_playing = [], []

    def collected(run, session, wait=False):  # was a checkpoint due while it played?
        due_while_playing.append(session.checkpoint_due.next <= session.seconds())
        collect(run, session, wait)

    monkeypatch.setattr(tb, "collect_evaluation", collected)
    monkeypatch.setattr(tb, "save_checkpoint", lambda run, session: (
        saved_while_playing.append(session.evaluating is not None), save(run, session)))
    runs = {}
    for beside in ("off", "on"):
        runs[beside] = run = tmp_path / beside
        tb.train(*tb.parse_args(["--checkpoints", str(run), "--eval-beside", beside, "--envs", "2", "--steps", "1500",
                                 "--memory", "400", "--batch-size", "16", "--learn-start", "100", "--eval-every",
                                 "750", "--eval-games", "2", "--plot-every", "10", "--seed", "4", "--device", "cpu",
                                 "--threads", "1", "--checkpoint-minutes", "0.01"]))
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
    # No checkpoint was taken while an evaluation played beside training, though some fell due meanwhile.
    assert saved_while_playing and not any(saved_while_playing) and any(due_while_playing)


def eval_events(run: Path) -> list:
    """The steps of the evaluations TensorBoard shows, as it reads a resumed run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars("eval/score")]


def test_a_stop_gives_up_the_evaluation_playing_and_the_resumed_run_logs_each_evaluation_once(
        tmp_path, in_process, monkeypatch, capsys):
    """No evaluation crosses a checkpoint: a stop does not wait for the one playing beside training (a good agent's
    games could outlast a scheduler's grace time); the resumed run plays it first, on the checkpoint's weights.
    Each evaluation is then logged once, in metrics.csv and in TensorBoard, as in a run never stopped."""
    flags = ["--envs", "1", "--memory", "300", "--batch-size", "16", "--learn-start", "100", "--eval-every", "1000",
             "--eval-games", "2", "--seed", "6", "--device", "cpu", "--threads", "1", "--steps", "2300"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    tb.train(*tb.parse_args(flags + ["--checkpoints", str(straight), "--eval-beside", "off"]))
    start = tb.start_evaluation

    def stop_right_after(run, session):  # SIGTERM as soon as the evaluation is handed over
        start(run, session)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tb, "start_evaluation", stop_right_after)
    tb.train(*tb.parse_args(flags + ["--checkpoints", str(stopped), "--eval-beside", "on"]))
    out = capsys.readouterr().out
    assert "the evaluation of step 1000 was still playing: the resumed run plays one first" in out, out
    assert "stopped by SIGTERM at episode" in out and rows(stopped, "eval") == []
    monkeypatch.setattr(tb, "start_evaluation", start)
    # In the loop from here, so that the next one cannot be skipped for the first still starting its process.
    tb.train(*tb.parse_args(["--resume", "--checkpoints", str(stopped), "--eval-beside", "off"]))
    assert [r[0] for r in rows(straight, "eval")] == ["1000", "2000"]
    assert rows(stopped, "eval") == rows(straight, "eval")
    assert rows(stopped, "game") == rows(straight, "game")
    assert eval_events(stopped) == eval_events(straight) == [1000, 2000]
    assert (stopped / "best.pth").read_bytes() == (straight / "best.pth").read_bytes()


def test_the_curve_of_a_long_run_is_thinned_to_a_fixed_number_of_points(tmp_path):
    history, rng = History(tb.WALL_CLEARED), np.random.default_rng(0)
    n = 50_000
    scores = rng.integers(0, 40, n).astype(float)
    scores[31_234] = tb.WALL_CLEARED + 3
    for i, score in enumerate(scores):
        history.games.append([10 * i, i, score])
        history.learning.append([10 * i, 1.0 + i % 2, 2.0])
    data = history.curve_data()
    assert len(data["step"]) == CURVE_POINTS and data["step"][-1] == 10 * (n - 1) and not data["each_game"]
    assert data["mean"][-1] == pytest.approx(scores[-100:].mean())
    assert data["best"][-1] == scores.max() and data["first_clear"] == 10 * 31_234
    assert data["low"].min() == scores.min() and data["high"].max() == scores.max()
    assert len(data["learning"]) == CURVE_POINTS and np.allclose(data["learning"][1:, 1], 1.5, atol=0.05)
    draw_curve(tmp_path / "curve.png", data, "ALE/Breakout-v5")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    few = History(tb.WALL_CLEARED)
    for i, score in enumerate(scores[:300]):
        few.games.append([i, i, score])
    data = few.curve_data()
    assert data["each_game"] and np.array_equal(data["high"], scores[:300])
    means = [scores[max(0, i - 99):i + 1].mean() for i in range(300)]
    assert np.allclose(data["mean"], means) and data["first_clear"] is None


def test_the_replay_frames_go_to_their_file_a_chunk_at_a_time_and_come_back_whole(tmp_path):
    replay = tb.ReplayMemory(40, 2, 4, 1, torch.device("cpu"))
    frame = lambda i: torch.full((2, tb.SIZE, tb.SIZE), i % 256, dtype=torch.uint8)
    for i in range(replay.slots + 7):  # the ring has wrapped
        replay.add_frames(frame(i), torch.zeros(2, dtype=torch.bool))
    saved = replay.state_dict()["frames"]
    save_array(tmp_path / "frames.npy.zst", saved, chunk_bytes=5 * saved[:1].numel() + 3)
    assert np.array_equal(np.asarray(CompressedArray(tmp_path / "frames.npy.zst")), replay.frames.numpy())


def test_a_second_stop_during_the_last_checkpoint_keeps_the_one_before_it_whole(tmp_path, in_process, monkeypatch):
    """A second Ctrl-C or SIGTERM stops at once, even while the last checkpoint is being written: that one is not
    left half-written, and the one before it stays whole for --resume."""
    save, save_array, calls, arrays = tb.save_checkpoint, trainer_support.checkpoint.save_array, [], []

    def stopping_save(run, session):
        calls.append(run.counters.steps)
        if len(calls) == 2:  # the first stop; this checkpoint is written, and then the last one
            os.kill(os.getpid(), signal.SIGTERM)
        save(run, session)

    def second_stop_in_the_middle(path, array, *a, **kw):
        arrays.append(path)
        if len(calls) == 3 and len(arrays) > 3:
            os.kill(os.getpid(), signal.SIGTERM)
        save_array(path, array, *a, **kw)

    monkeypatch.setattr(tb, "save_checkpoint", stopping_save)
    monkeypatch.setattr(trainer_support.checkpoint, "save_array", second_stop_in_the_middle)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        tb.train(*tb.parse_args(["--checkpoints", str(run), "--envs", "1", "--memory", "300",
                                 "--learn-start", "100", "--batch-size", "16", "--eval-every", "0", "--seed", "2",
                                 "--device", "cpu", "--threads", "1", "--steps", "100000",
                                 "--checkpoint-minutes", "0.002"]))
    assert len(calls) == 3
    assert sorted(f.name for f in (run / "resume").iterdir()) == [f"{s:012d}" for s in calls[:2]]  # no .tmp-*
    assert load_checkpoint(run / "resume" / f"{calls[1]:012d}")[2]["summary"]["step"] == calls[1]


def test_a_helper_process_computes_at_the_trainers_precision_on_arguments_of_its_own():
    """TF32 is switched on in the trainer on CUDA: an evaluation beside training must run at the same precision, or
    its Q-values and scores are not those of one in the loop. And the tensors handed over stay the caller's: the
    queue's thread moves what it sends into shared memory, changing the storage under a checkpoint reading it."""
    helper = Helper("evaluations")
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
    helper = Helper("test")
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


def test_a_helper_whose_jobs_keep_raising_hands_its_work_to_the_loop_with_one_note(capsys):
    """A job that raises in the helper (say, a GPU in exclusive-process mode refusing the process a context) fails
    the same way every time: after FAILURES in a row, the caller does the work, and says so once."""
    helper = Helper("evaluations")
    try:
        assert helper.submit(math.sqrt, 4.0) and helper.poll(wait=True) == (True, 2.0)
        for _ in range(Helper.FAILURES):
            assert helper.submit(math.sqrt, -1.0) is True
            assert helper.poll(wait=True) == (False, "ValueError: math domain error")
        assert helper.submit(math.sqrt, 4.0) is False and helper.submit(math.sqrt, 4.0) is False
        notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
        assert notes == ["note: the evaluations' process failed 3 times in a row (last: ValueError: math domain "
                         "error); the training loop does its work from now on"]
    finally:
        helper.close(timeout=0)
