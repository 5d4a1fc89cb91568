"""The fast recipe's pieces on small constructed cases, and a short real run with --recipe fast."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import ale_py
import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from trainer_support.checkpoint import load_checkpoint  # noqa: E402
import play  # noqa: E402
import train_breakout as tb  # noqa: E402


class ScriptedGame:
    """One game whose rewards and lives follow a script; frames are plain grey levels. It records the
    actions it receives. Interface of train_breakout.OneGame."""

    screen_lut = None  # RGB frames

    def __init__(self, rewards, lives):
        self.rewards, self.lives, self.t, self.received = rewards, lives, 0, []
        self.actions = [ale_py.Action.NOOP, ale_py.Action.FIRE, ale_py.Action.RIGHT, ale_py.Action.LEFT]

    def _frame(self):
        return np.full((1, 210, 160, 3), (self.t * 7) % 256, np.uint8)

    def reset(self):
        return self._frame(), np.array([self.lives[0]])

    def send(self, actions):
        self.sent = actions

    def recv(self):
        return self.step(self.sent)

    def step(self, actions):
        self.received.append(int(actions[0]))
        t, self.t = self.t, self.t + 1
        game_over = self.lives[t] == 0
        lives = self.lives[0] if game_over else self.lives[t]
        return (self._frame(), np.array([self.rewards[t]], np.float32), np.array([game_over]),
                np.array([False]), np.array([lives]))

    def state_dict(self):
        return {}

    def close(self):
        pass


def run_scripted(tmp_path, monkeypatch, rewards, lives, *flags):
    game = ScriptedGame(rewards, lives)
    monkeypatch.setattr(tb, "make_games", lambda *a, **k: game)
    args, given = tb.parse_args(["--checkpoints", str(tmp_path / "run"), "--envs", "1", "--seed", "0",
                                 "--memory", "500", "--batch-size", "8", "--learn-start", "100000",
                                 "--eval-every", "0", "--steps", str(len(rewards)), "--device", "cpu", *flags])
    tb.train(args, given)
    ckpt = sorted((tmp_path / "run" / "resume").iterdir())[-1]
    arrays = load_checkpoint(ckpt)[1]
    stored = {k: np.asarray(arrays[f"replay.{k}"]) for k in ("slot", "action", "reward", "has_next")}
    return game, stored


def test_n_step_returns_match_hand_computed_values(tmp_path, monkeypatch):
    # Steps 0..6 are the first life; the life is lost on step 6; step 7 starts the next life.
    rewards = [0, 1, 0, 0, 1, 1, 0, 1, 0, 0]
    lives = [5, 5, 5, 5, 5, 5, 4, 4, 4, 4]
    game, s = run_scripted(tmp_path, monkeypatch, rewards, lives, "--block", "1", "--n-step", "3",
                           "--gamma", "0.5")
    # With gamma 0.5: R_t = r_t + 0.5 r_{t+1} + 0.25 r_{t+2}, clipped rewards, -1 on the life-loss step.
    expected = [  # (state slot = step, return, has next state)
        (0, 0 + 0.5 * 1 + 0.25 * 0, True),
        (1, 1 + 0.5 * 0 + 0.25 * 0, True),
        (2, 0 + 0.5 * 0 + 0.25 * 1, True),
        (3, 0 + 0.5 * 1 + 0.25 * 1, True),
        # the life ends on step 6: the last three become transitions with truncated returns, no next state
        (4, 1 + 0.5 * 1 + 0.25 * -1, False),
        (5, 1 + 0.5 * -1, False),
        (6, -1, False),
        (7, 1 + 0.5 * 0 + 0.25 * 0, True),  # the next life, complete once steps 7..9 are in
    ]
    assert len(s["slot"]) == len(expected)
    for i, (slot, ret, has_next) in enumerate(expected):
        assert s["slot"][i] == slot
        assert s["reward"][i] == pytest.approx(ret)
        assert bool(s["has_next"][i]) is has_next
    assert list(s["action"]) == game.received[:8]
    assert game.received[0] == 1 and game.received[7] == 1  # FIRE at the start of each life


@pytest.fixture
def captured(monkeypatch):
    """The targets td_update hands to its loss, recorded at each call."""
    seen = {}

    def capture(q, targets):
        seen["targets"] = targets.clone()
        return ((q - targets) ** 2).mean()

    monkeypatch.setattr(tb.F, "smooth_l1_loss", capture)
    return seen


def test_n_step_target_bootstraps_gamma_to_the_n(captured):
    policy, target = TableNet([[0.0, 0.0], [0.0, 0.0]]), TableNet([[1.0, 4.0], [2.0, 3.0]])
    batch = batch_of(states=[0, 1], actions=[0, 1], rewards=[0.5, 1.0], next_states=[0, 1], has_next=[True, False])
    tb.td_update(policy, target, torch.optim.SGD(policy.parameters(), lr=0.1), batch, gamma=0.9, n_step=3)
    assert captured["targets"].tolist() == pytest.approx([0.5 + 0.9 ** 3 * 4.0, 1.0])


def test_double_dqn_lets_the_policy_pick_and_the_target_rate(captured):
    # In next state 0 the policy prefers action 0, the target rates action 1 highest.
    policy, target = TableNet([[5.0, 1.0], [0.0, 0.0]]), TableNet([[2.0, 7.0], [0.0, 0.0]])
    batch = batch_of(states=[1], actions=[0], rewards=[0.0], next_states=[0], has_next=[True])
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    tb.td_update(policy, target, optimizer, batch, gamma=0.5, double=True)
    assert captured["targets"].tolist() == pytest.approx([0.5 * 2.0])  # the target's value of the policy's pick
    tb.td_update(policy, target, optimizer, batch, gamma=0.5, double=False)
    assert captured["targets"].tolist() == pytest.approx([0.5 * 7.0])  # plain DQN: the target's max


class TableNet(nn.Module):
    """Q-values looked up by the state's id (its first pixel), plus a trainable bias."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)
        self.bias = nn.Parameter(torch.zeros(self.table.shape[1]))

    def forward(self, x):
        ids = torch.round(x[:, 0, 0, 0] * 255).long()
        return self.table[ids] + self.bias


def batch_of(states, actions, rewards, next_states, has_next):
    stack = lambda ids: torch.tensor(ids, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 6, 84, 84).clone()
    return tb.Batch(states=stack(states), actions=torch.tensor(actions), rewards=torch.tensor(rewards),
                    next_states=stack(next_states), has_next=torch.tensor(has_next))


def test_linear_epsilon_schedule():
    args, _ = tb.parse_args(["--recipe", "fast", "--eps-decay", "1000"])
    assert args.eps_schedule == "linear"
    assert tb.epsilon(0, args) == 1.0
    assert tb.epsilon(500, args) == pytest.approx(1.0 - 0.99 * 0.5)
    assert tb.epsilon(1000, args) == pytest.approx(0.01)
    assert tb.epsilon(10**9, args) == pytest.approx(0.01)
    tutorial, _ = tb.parse_args([])
    assert tb.epsilon(25_000_000, tutorial) == pytest.approx(0.01 + 0.99 * math.exp(-1))


def test_recipe_values_and_explicit_flags_that_override_them():
    fast, _ = tb.parse_args(["--recipe", "fast", "--n-step", "2"])
    assert fast.n_step == 2 and fast.block == 1 and fast.eps_schedule == "linear"
    for key, value in tb.RECIPES["fast"].items():
        if key != "n_step":
            assert getattr(fast, key) == value
    tutorial, _ = tb.parse_args([])
    assert (tutorial.block, tutorial.n_step, tutorial.frames, tutorial.batch_size) == (None, 1, 6, 256)


def test_a_short_fast_run_trains_and_saves(tmp_path):
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "train_breakout.py"), "--recipe", "fast", "--checkpoints", str(run),
                        "--steps", "2400", "--memory", "1500", "--learn-start", "300", "--envs", "2",
                        "--update-every", "8", "--eval-every", "2000", "--eval-games", "1", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())["args"]
    assert (config["recipe"], config["block"], config["n_step"], config["update_every"]) == ("fast", 1, 3, 8)
    updates = int(p.stdout.split(" updates in")[0].split()[-1])
    assert updates >= (2400 - 300) // 8 - 10
    snapshot = next(run.glob("[0-9]*.pth"))
    assert play.load_network(str(snapshot), torch.device("cpu")) is not None
    assert (run / "best.pth").exists()
