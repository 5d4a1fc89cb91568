"""The loop built for the GPU, checked on the CPU: the compiled update against the eager one, the games stepped
while learning (--overlap) against the strict order, and a compiled run that saves and resumes."""
from __future__ import annotations

import copy
import csv
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402
import train_breakout as tb  # noqa: E402


def test_the_compiled_update_gives_the_eager_updates_loss_gradients_and_weights():
    torch.manual_seed(0)
    nets = [tb.DuelingNetwork(6, 4).to(memory_format=torch.channels_last) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    stacks = lambda: torch.randint(0, 256, (8, 6, 84, 84), dtype=torch.uint8, generator=g)
    batch = (stacks(), torch.randint(0, 4, (8,), generator=g), torch.randn(8, generator=g), stacks(),
             torch.tensor([True] * 6 + [False] * 2))
    results = []
    for loss_fn in (tb.td_loss, torch.compile(tb.td_loss)):
        policy, target = copy.deepcopy(nets)
        # The optimiser's step runs eagerly in both; SGD keeps the new weights a plain function of the gradients.
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        loss, mean_q = tb.td_update(policy, target, optimizer, batch, 0.99, n_step=3, double=True, loss_fn=loss_fn)
        results.append((loss, mean_q, [p.grad.clone() for p in policy.parameters()],
                        [p.detach().clone() for p in policy.parameters()]))
    (loss_e, q_e, grads_e, weights_e), (loss_c, q_c, grads_c, weights_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q_c, q_e, rtol=1e-5, atol=1e-6)
    for name, e, c in zip([n for n, _ in nets[0].named_parameters()], grads_e, grads_c):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    for e, c, before in zip(weights_e, weights_c, nets[0].parameters()):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(e, before) for e, before in zip(weights_e, nets[0].parameters()))


def metrics_rows(run: Path) -> list:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "steps_per_s")} for r in csv.DictReader(f)]


def test_with_learning_off_the_overlapped_loop_plays_and_stores_what_the_strict_order_does(tmp_path, in_process):
    runs = {}
    for overlap in ("off", "on"):
        runs[overlap] = run = tmp_path / overlap
        # A memory of 200 transitions wraps several times in 1,200 agent steps of 4 games.
        tb.train(*tb.parse_args(["--checkpoints", str(run), "--overlap", overlap, "--envs", "4", "--steps", "1200",
                                 "--memory", "200", "--batch-size", "32", "--learn-start", "1000000", "--seed", "5", "--device", "cpu",
                                 "--threads", "1", "--eval-every", "0", "--save-every", "20"]))
    (a, (values_a, arrays_a, _)), (b, (values_b, arrays_b, _)) = (
        (folder, plumbing.load_checkpoint(folder)) for folder in (sorted((r / "resume").iterdir())[-1]
                                                                  for r in runs.values()))
    assert a.name == b.name == f"{1200:012d}"
    assert sorted(arrays_a) == sorted(arrays_b)
    assert {"replay.frames", "replay.game", "replay.slot", "replay.action", "replay.reward",
            "replay.has_next", "tracking.game_score"} <= set(arrays_a)
    for name in arrays_a:
        x, y = np.asarray(arrays_a[name]), np.asarray(arrays_b[name])
        if name == "history.games":
            x, y = np.delete(x, 1, axis=1), np.delete(y, 1, axis=1)  # column 1 is wall-clock seconds
        assert np.array_equal(x, y), f"{name} differs"
    assert values_a["replay"] == values_b["replay"]  # as many frames and transitions stored
    assert len(metrics_rows(runs["on"])) >= 3 and metrics_rows(runs["on"]) == metrics_rows(runs["off"])


def test_a_compiled_run_trains_saves_and_resumes(tmp_path, in_process, capsys):
    run = tmp_path / "run"
    flags = ["--checkpoints", str(run), "--compile", "on", "--envs", "2", "--memory", "400", "--learn-start", "20",
             "--batch-size", "8", "--seed", "2", "--device", "cpu", "--threads", "2", "--eval-every", "0"]
    first = tb.train(*tb.parse_args(flags + ["--steps", "300"]))
    out = capsys.readouterr().out
    assert "compiled the learning update and acting" in out and "torch.compile failed" not in out
    assert first["updates"] > 0
    second = tb.train(*tb.parse_args(flags + ["--resume", "--steps", "600"]))
    out = capsys.readouterr().out
    assert f"agent step {first['steps']}" in out and "torch.compile failed" not in out
    assert second["steps"] == 600 and second["updates"] > first["updates"]
    losses = [float(r["loss"]) for r in metrics_rows(run) if r["loss"]]
    assert losses and np.isfinite(losses).all()
