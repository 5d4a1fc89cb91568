"""The loop built for the GPU, checked on the CPU: the compiled update against the eager one, the games stepped
while learning (--overlap) against the strict order, and a compiled run that saves and resumes."""
from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from trainer_support.checkpoint import load_checkpoint  # noqa: E402
from trainer_support.device import check_memory_fits  # noqa: E402
import train_breakout as tb  # noqa: E402


def test_the_compiled_update_gives_the_eager_updates_loss_gradients_and_weights():
    torch.manual_seed(0)
    nets = [tb.DuelingNetwork(6, 4).to(memory_format=torch.channels_last) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    stacks = lambda: torch.randint(0, 256, (8, 6, 84, 84), dtype=torch.uint8, generator=g)
    batch = tb.Batch(stacks(), torch.randint(0, 4, (8,), generator=g), torch.randn(8, generator=g), stacks(),
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
        (folder, load_checkpoint(folder)) for folder in (sorted((r / "resume").iterdir())[-1]
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


def test_a_compiled_run_trains_saves_and_resumes_and_compiles_nothing_after_its_warm_up(tmp_path, in_process, capsys,
                                                                                      monkeypatch):
    run = tmp_path / "run"
    flags = ["--checkpoints", str(run), "--compile", "on", "--envs", "2", "--memory", "400", "--learn-start", "20",
             "--batch-size", "8", "--seed", "2", "--device", "cpu", "--threads", "2", "--eval-every", "0"]
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    warmed_up, compiled_functions = [], tb.compiled_functions
    monkeypatch.setattr(tb, "compiled_functions", lambda *a: (compiled_functions(*a), warmed_up.append(graphs()))[0])
    first = tb.train(*tb.parse_args(flags + ["--steps", "300"]))
    out = capsys.readouterr().out
    assert "compiled the learning update and acting" in out and "without compiling" not in out
    assert first["updates"] > 0
    # The loop's first update (strided states, its thread count) and its acting run the graphs the warm-up made:
    # on CUDA, another compile there would be outside the fallback.
    assert graphs() == warmed_up[0]
    second = tb.train(*tb.parse_args(flags + ["--resume", "--steps", "600"]))
    out = capsys.readouterr().out
    assert f"agent step {first['steps']}" in out and "without compiling" not in out
    assert second["steps"] == 600 and second["updates"] > first["updates"]
    losses = [float(r["loss"]) for r in metrics_rows(run) if r["loss"]]
    assert losses and np.isfinite(losses).all()


def flags_of_a_short_compiled_run(run: Path) -> list:
    return ["--checkpoints", str(run), "--compile", "on", "--envs", "2", "--memory", "400", "--learn-start", "20",
            "--batch-size", "8", "--seed", "2", "--device", "cpu", "--threads", "1", "--eval-every", "0",
            "--steps", "300"]


def test_a_compiled_update_that_gives_other_results_is_caught_before_the_first_update(tmp_path, in_process, capsys,
                                                                                      monkeypatch):
    def miscompiled(fn, **_):  # a "compiled" td_loss whose loss is off by half; acting is compiled right
        return (lambda *a: (lambda loss, q: (1.5 * loss, q))(*fn(*a))) if fn is tb.td_loss else fn
    monkeypatch.setattr(torch, "compile", miscompiled)
    run = tmp_path / "run"
    result = tb.train(*tb.parse_args(flags_of_a_short_compiled_run(run)))
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "without compiling" in line]
    assert len(notes) == 1 and "other results than the eager one: the loss (" in notes[0], out
    assert out.index("without compiling") < out.index("checkpoint:")
    assert result["updates"] > 0 and sorted((run / "resume").iterdir())[-1].name == f"{300:012d}"
    losses = [float(r["loss"]) for r in metrics_rows(run) if r["loss"]]
    assert losses and np.isfinite(losses).all()
    assert "compiling was given up" in out.strip().splitlines()[-1]


def test_a_compiled_update_off_by_tf32_rounding_keeps_compiling_and_the_last_line_says_so(tmp_path, in_process,
                                                                                          capsys, monkeypatch):
    """TF32 on a GPU moves the loss, Q-values and gradients by about 1e-4 of their size: no reason to give up
    compiling (the check once compared an AdamW step, which turns such rounding into a difference of 0.1)."""
    noise = torch.Generator().manual_seed(0)

    def rounded(fn, **_):  # a "compiled" td_loss whose loss and Q carry 1e-4 relative noise, as do its gradients
        def off(*a):
            loss, q = fn(*a)
            wobble = 1 + 1e-4 * (2 * torch.rand(2, generator=noise) - 1)
            return tb.Learned(loss * wobble[0], q * wobble[1])
        return off if fn is tb.td_loss else fn
    monkeypatch.setattr(torch, "compile", rounded)
    result = tb.train(*tb.parse_args(flags_of_a_short_compiled_run(tmp_path / "run")))
    out = capsys.readouterr().out
    assert "without compiling" not in out and result["updates"] > 0
    assert out.strip().splitlines()[-1].startswith("done: ") and "; compiling held; " in out.strip().splitlines()[-1]


def test_a_compiled_call_that_fails_in_the_loop_is_one_line_and_the_update_is_made_eagerly(tmp_path, in_process,
                                                                                           capsys, monkeypatch):
    eager = tb.train(*tb.parse_args(flags_of_a_short_compiled_run(tmp_path / "eager") + ["--compile", "off"]))
    calls = []

    def failing_later(fn, **_):  # works for the warm-up (3 calls) and the check, then fails as Triton might
        def compiled(*a):
            calls.append(fn.__name__)
            if fn is tb.td_loss and calls.count("td_loss") == 6:
                raise RuntimeError("Triton Error [CUDA]: an illegal instruction was encountered")
            return fn(*a)
        return compiled
    monkeypatch.setattr(torch, "compile", failing_later)
    run = tmp_path / "run"
    result = tb.train(*tb.parse_args(flags_of_a_short_compiled_run(run)))
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "without compiling" in line]
    assert notes == ["note: a compiled call failed (RuntimeError: Triton Error [CUDA]: an illegal instruction was "
                     "encountered); training goes on without compiling"], out
    assert calls.count("td_loss") == 6  # no compiled call after the failure
    assert result["updates"] == eager["updates"] > 6  # no update lost, none made twice
    assert sorted((run / "resume").iterdir())[-1].name == f"{300:012d}"


def test_a_damaged_compile_cache_is_one_line_that_says_how_to_clear_it(tmp_path):
    """A compile killed midway leaves a library cut short in PyTorch's compile cache, and later compiles fail."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    command = [sys.executable, str(ROOT / "train_breakout.py"), *flags_of_a_short_compiled_run(tmp_path / "run"),
               "--learn-start", "100000", "--steps", "20"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and "compiled the learning update" in first.stdout, first.stdout + first.stderr
    libraries = list((tmp_path / "cache").rglob("*.so"))
    assert libraries
    for library in libraries:
        os.truncate(library, 64)
    command[command.index(str(tmp_path / "run"))] = str(tmp_path / "again")
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    notes = [line for line in second.stdout.splitlines() if "without compiling" in line]
    assert second.returncode == 0 and len(notes) == 1, second.stdout + second.stderr
    assert f"the compile cache may be damaged: delete {tmp_path / 'cache'} and the next run compiles afresh" in notes[0]
    assert "Traceback" not in second.stdout + second.stderr


def test_the_device_check_runs_its_checks_on_cpu_most_important_first_and_keeps_its_record(tmp_path):
    """benchmarks/gpu_check.py is the one command the first GPU lent runs: its --dry mode keeps every check and
    measurement working on CPU between loans (the timings it prints there mean nothing), in the order a short loan
    needs: the first check, the default run beside the tutorial's loop, the checks, then the figures."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split(":")[0] for line in lines if line.startswith(("PASS", "FAIL", "SKIP", "INFO"))] == [
        "PASS pinned staging under queued work", "INFO the default run beside the tutorial's loop",
        "PASS warm-up, then the first real update",
        "PASS compiled against eager", "PASS overlapped loop, checkpoints in the loop, evaluation beside, resume",
        "SKIP a CPU checkpoint resumed on the device", "PASS a replay memory too big is refused",
        "PASS play.py on the device"]
    mechanisms = [line.split("|")[0].strip() for line in lines if line.count("|") == 2][1:]
    assert mechanisms == ["default", "--overlap off", "--compile off", "games not pinned", "pinned staging off",
                          "3 evaluations beside"]
    assert any(line.startswith("learning off, 2 games:") for line in lines)
    assert any(line.startswith("seconds per eager update: channels-last ") for line in lines)
    assert any(line.startswith("frame upload per agent step, 16 games:") for line in lines)
    assert lines[-1].startswith("gpu_check: 6 passed, 0 failed, 1 skipped on ")
    assert (tmp_path / "gpu_check.log").read_text().splitlines() == lines
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["outcomes"] == {"PASS": 6, "FAIL": 0, "SKIP": 1} and "mechanism/pinned staging off" in record["figures"]


def test_the_gpu_memory_check_counts_pytorchs_cache_as_free_and_keeps_room_beside_the_replay_memory(monkeypatch):
    """A checkpoint that failed to restore leaves its replay memory in PyTorch's cache: the fallback to the one
    before it must see that memory as free. And a run needs about a GiB beside its replay memory."""
    GiB, cached = 2**30, [3 * 2**30]
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: cached.__setitem__(0, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GiB - cached[0], 80 * GiB))
    cuda = torch.device("cuda")
    check_memory_fits(int(7.5 * GiB), cuda)  # 7 GiB were free before the cache was emptied
    cached[0] = 3 * GiB
    with pytest.raises(tb.UserError, match=r"needs 8\.5 GiB and 1 GiB beside it, but only 10\.0 GiB of free GPU "
                                           r"memory is left; lower --memory"):
        check_memory_fits(int(8.5 * GiB), cuda)  # under 90% of what is free, but not with the room beside it
