"""What a user watches while a run goes: metrics.csv, TensorBoard events, curve.png, evaluations, videos."""
from __future__ import annotations

import csv
import struct
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import play  # noqa: E402
import train_breakout as tb  # noqa: E402


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """A short run with evaluations every 600 agent steps and video capture; metrics are read while it runs."""
    run = tmp_path_factory.mktemp("visible") / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_breakout.py"), "--checkpoints", str(run),
                             "--envs", "2", "--seed", "5", "--steps", "1800", "--memory", "600", "--batch-size", "32",
                             "--learn-start", "100", "--eval-every", "600", "--eval-games", "2", "--capture-video",
                             "--plot-every", "5", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    during = None
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        metrics = run / "metrics.csv"
        if during is None and metrics.exists() and "\ngame," in metrics.read_text():
            during = metrics.read_text()
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    return run, out, during


def test_metrics_csv_has_the_columns_and_is_readable_while_training_runs(watched_run):
    run, _, during = watched_run
    assert during is not None, "metrics.csv had no finished game while the run was going"
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["kind", "step", "seconds", "episode", "score", "lives_lost", "epsilon", "loss",
                                 "mean_q", "steps_per_s", "replay_fill"]
    games = [r for r in rows if r["kind"] == "game"]
    assert games and all(int(r["lives_lost"]) == 5 for r in games)  # a Breakout game ends when 5 lives are lost
    assert all(0 < float(r["replay_fill"]) <= 1 and 0 < float(r["epsilon"]) <= 1 for r in games)
    learned = [r for r in games if r["loss"]]
    assert learned and all(float(r["loss"]) >= 0 for r in learned)


def test_an_evaluation_runs_at_each_interval_and_keeps_the_best_network(watched_run):
    run, out, _ = watched_run
    with open(run / "metrics.csv", newline="") as f:
        evals = [r for r in csv.DictReader(f) if r["kind"] == "eval"]
    assert [int(r["step"]) for r in evals] == [600, 1200, 1800]
    assert out.count("evaluation at step") == 3
    assert play.load_network(str(run / "best.pth"), torch.device("cpu")) is not None
    videos = sorted((run / "videos").glob("eval-*.mp4"))
    assert [v.name for v in videos] == [f"eval-{s:012d}.mp4" for s in (600, 1200, 1800)]
    assert all(decoded_frames(v) > 10 for v in videos)
    assert not list(run.rglob(".*-games")), "the other games' videos were left behind"


def test_tensorboard_events_hold_the_scalars(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _, _ = watched_run
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"game/score", "game/epsilon", "game/loss", "game/mean_q", "game/steps_per_s", "eval/score",
            "eval/max"} <= tags
    assert [e.step for e in events.Scalars("eval/score")] == [600, 1200, 1800]


def test_the_curve_is_a_png_a_person_can_read(watched_run):
    run, _, _ = watched_run
    assert png_size(run / "curve.png") == (1000, 900)


def test_an_evaluation_video_holds_the_best_game_frame_for_frame(tmp_path):
    net = tb.DuelingNetwork(6, 4)
    result = tb.evaluate(net, "ALE/Breakout-v5", 2, 1.0, 6, torch.device("cpu"), seed=3,
                         video=str(tmp_path / "best.mp4"))
    best = int(np.argmax(result["scores"]))
    assert decoded_frames(tmp_path / "best.mp4") == result["lengths"][best]
    assert result["mean"] == np.mean(result["scores"]) and result["cleared"] == 0
