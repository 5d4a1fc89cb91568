"""train_breakout.py: the tutorial's pieces checked numerically, its transition rule on a scripted game, and
the command line run for real in a subprocess (tiny budgets, each run in its own folder)."""
from __future__ import annotations

import csv
import dataclasses
import fcntl
import json
import math
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import ale_py
import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_breakout.py"
sys.path.insert(0, str(ROOT))
import play  # noqa: E402
from trainer_support.checkpoint import load_checkpoint  # noqa: E402
from trainer_support.files import save_snapshot  # noqa: E402
import train_breakout as tb  # noqa: E402
from trainer_support import atari  # noqa: E402

CPU = torch.device("cpu")
BREAKOUT_ACTIONS = [ale_py.Action.NOOP, ale_py.Action.FIRE, ale_py.Action.RIGHT, ale_py.Action.LEFT]


def frame_of(rows: int = 210, cols: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, cols, 3), dtype=np.uint8)


def one_frame(rgb: np.ndarray) -> np.ndarray:
    """One RGB screen through the trainer's preprocessing, no erasing."""
    return tb.preprocess_all(rgb[None], None)[0]


def tutorial_preprocess(rgb: np.ndarray) -> np.ndarray:
    """The tutorial's cv2 calls for one RGB screen, written out by hand."""
    return cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY)[32:, 8:152], (84, 84))


# ---------------------------------------------------------------------------------------------------
# 1. Preprocessing
# ---------------------------------------------------------------------------------------------------
def test_preprocess_is_the_tutorials_grey_crop_and_resize():
    rgb = frame_of(seed=1)
    out = one_frame(rgb)
    assert out.shape == (84, 84) and out.dtype == np.uint8
    assert np.array_equal(out, tutorial_preprocess(rgb))


@pytest.mark.parametrize("rows, cols, kept", [
    (slice(0, 32), slice(None), False),     # the score line and the top wall are cropped away
    (slice(None), slice(0, 8), False),      # the left wall
    (slice(None), slice(152, 160), False),  # the right wall
    (slice(32, 33), slice(None), True),     # the first row kept
    (slice(None), slice(8, 9), True),       # the first column kept
    (slice(None), slice(151, 152), True),   # the last column kept
])
def test_preprocess_crops_rows_32_on_and_columns_8_to_151(rows, cols, kept):
    rgb = np.zeros((210, 160, 3), np.uint8)
    rgb[rows, cols] = 255
    assert bool(one_frame(rgb).max() > 0) is kept


def test_preprocess_keeps_the_tutorials_bgr2gray_on_rgb_quirk():
    red, blue = np.zeros((210, 160, 3), np.uint8), np.zeros((210, 160, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255  # Gymnasium's frames are RGB: channel 0 is red
    # BGR2GRAY reads channel 0 as blue (weight 0.114) and channel 2 as red (weight 0.299).
    assert np.all(one_frame(red) == round(0.114 * 255))  # 29, not the 76 a true luminance gives
    assert np.all(one_frame(blue) == round(0.299 * 255))  # 76, not 29


# ---------------------------------------------------------------------------------------------------
# 2. Random erasing
# ---------------------------------------------------------------------------------------------------
def erased_white_frames(count: int, seed: int) -> np.ndarray:
    rng, out = np.random.default_rng(seed), []
    white = np.full((200, 210, 160, 3), 255, np.uint8)
    for start in range(0, count, len(white)):
        out.append(tb.preprocess_all(white[:min(len(white), count - start)], rng))
    return np.concatenate(out)


def test_random_erasing_zeroes_4x10_patches_in_the_brick_rows_only():
    frames = erased_white_frames(2000, seed=0)
    assert frames.shape == (2000, 84, 84) and frames.dtype == np.uint8
    assert np.all(tb.preprocess_all(np.full((3, 210, 160, 3), 255, np.uint8), None) == 255)  # nothing erased

    zero = frames == 0
    assert not zero[:, :10].any() and not zero[:, 29:].any() and not zero[:, :, 80:].any()
    assert np.all(frames[~zero] == 255)  # a pixel is either untouched or set to 0

    # Every zero pixel lies in a fully zero 4x10 window whose top-left corner is at row 10..25, col 0..70.
    windows = np.lib.stride_tricks.sliding_window_view(zero, (4, 10), axis=(1, 2))  # (N, 81, 75, 4, 10)
    full = windows.all(axis=(3, 4))[:, 10:26, 0:71]
    covered = np.zeros_like(zero)
    for r, c in zip(*np.nonzero(full.any(axis=0))):
        hit = full[:, r, c]
        covered[hit, 10 + r:14 + r, c:c + 10] = True
    assert np.array_equal(covered, zero)

    # Frames with a single patch: exactly 40 pixels, corners spread over the whole allowed range.
    counts = zero.sum(axis=(1, 2))
    single = np.flatnonzero(counts == 40)
    corners = np.array([(np.nonzero(zero[i])[0].min(), np.nonzero(zero[i])[1].min()) for i in single])
    for (r, c), i in zip(corners, single):
        assert zero[i, r:r + 4, c:c + 10].all()
    assert (corners[:, 0].min(), corners[:, 0].max()) == (10, 25)
    assert (corners[:, 1].min(), corners[:, 1].max()) == (0, 70)
    assert not np.any((counts > 0) & (counts < 40))  # no smaller patch

    # 10 tries at probability 0.1: a frame has at least one patch with probability 1 - 0.9**10.
    assert (counts > 0).mean() == pytest.approx(1 - 0.9 ** 10, abs=0.04)


def test_preprocess_all_without_a_generator_erases_nothing():
    rgb = np.stack([frame_of(seed=s) for s in range(4)])
    assert np.array_equal(tb.preprocess_all(rgb, None), np.stack([tutorial_preprocess(f) for f in rgb]))


# ---------------------------------------------------------------------------------------------------
# 3. Frame stacking
# ---------------------------------------------------------------------------------------------------
def test_frame_stack_is_newest_first_cleared_by_a_new_game_and_kept_over_a_lost_life():
    stack = tb.FrameStack(2, 4, CPU)
    plain = lambda *v: torch.tensor(v, dtype=torch.uint8).view(-1, 1, 1).expand(-1, 84, 84)
    ids = lambda: stack.frames[:, :, 0, 0].tolist()
    stack.push(plain(1, 11), np.array([True, True]))
    assert ids() == [[1, 0, 0, 0], [11, 0, 0, 0]]
    stack.push(plain(2, 12), np.array([False, False]))
    stack.push(plain(3, 13), np.array([False, False]))
    assert ids() == [[3, 2, 1, 0], [13, 12, 11, 0]]
    # Game 0 lost a life (no new game): its frames stay. Game 1 started a new game: only the new frame.
    stack.push(plain(4, 21), np.array([False, True]))
    assert ids() == [[4, 3, 2, 1], [21, 0, 0, 0]]
    stack.push(plain(5, 22), np.array([False, False]))
    assert ids() == [[5, 4, 3, 2], [22, 21, 0, 0]]
    assert stack.frames.shape == (2, 4, 84, 84) and stack.frames.dtype == torch.uint8


# ---------------------------------------------------------------------------------------------------
# 4. Replay memory
# ---------------------------------------------------------------------------------------------------
class ReplayDriver:
    """Drives a ReplayMemory the way the trainer does (one frame per game per step, the block rule) and
    keeps the ground truth: every frame written with the game it belongs to, every transition stored."""

    def __init__(self, capacity, games, depth, block, seed):
        self.rng = np.random.default_rng(seed)
        self.games, self.depth, self.block = games, depth, block
        self.memory = tb.ReplayMemory(capacity, games, depth, block, CPU)
        self.written = []   # per frame index: (frames (G,84,84), game id per game (G,))
        self.expected = []  # per stored transition: (game, frame index of its state, action, reward, has_next)
        self.game_id = np.arange(games)
        self.next_id = games
        self.env_steps = np.zeros(games, np.int64)
        self.open = np.zeros(games, bool)
        self.first = np.zeros(games, np.int64)
        self.action = np.zeros(games, np.int64)
        self.reward = np.zeros(games, np.float32)
        self.has_next = np.zeros(games, bool)
        self._write(np.ones(games, bool))

    def _write(self, new_game):
        frames = self.rng.integers(0, 256, (self.games, 84, 84), dtype=np.uint8)
        self.written.append((frames, self.game_id.copy()))
        self.memory.add_frames(torch.from_numpy(frames), torch.from_numpy(new_game))

    def step(self, life_end_p=0.12, game_end_p=0.3):
        state_index = len(self.written) - 1
        actions = self.rng.integers(0, 4, self.games)
        rewards = self.rng.normal(size=self.games).astype(np.float32)  # unique: identifies a transition
        done = self.rng.random(self.games) < life_end_p
        over = done & (self.rng.random(self.games) < game_end_p)
        for g in np.flatnonzero(over):
            self.game_id[g], self.next_id = self.next_id, self.next_id + 1
        self._write(over)
        self.env_steps += 1
        opening = ~self.open
        self.first[opening] = state_index
        self.action[opening] = actions[opening]
        self.has_next[opening] = ~done[opening]
        self.reward[opening] = 0
        self.open[:] = True
        self.reward += rewards
        closing = np.flatnonzero((self.env_steps % self.block == 0) | done)
        if len(closing):
            self.memory.add(closing, self.first[closing] % self.memory.slots, self.action[closing],
                            self.reward[closing], self.has_next[closing])
            self.expected += [(int(g), int(self.first[g]), int(self.action[g]), float(self.reward[g]),
                               bool(self.has_next[g])) for g in closing]
            self.open[closing] = False

    def truth(self, game, index):
        """The stack by hand: frames `index`, `index - 1`, ... of the same game, zeros before its start."""
        out = np.zeros((self.depth, 84, 84), np.uint8)
        gid = self.written[index][1][game]
        for j in range(self.depth):
            if index - j < 0 or self.written[index - j][1][game] != gid:
                break
            out[j] = self.written[index - j][0][game]
        return out

    def check_every_stored_transition(self):
        m = self.memory
        assert len(m) == min(m.stored, m.capacity) == min(len(self.expected), m.capacity)
        kept = range(max(0, len(self.expected) - m.capacity), len(self.expected))
        at = torch.tensor([k % m.capacity for k in kept], dtype=torch.int64)
        games, slots = m.game[at], m.slot[at]
        states, next_states = (x.numpy() for x in m.stacks(games, slots))
        for row, k in enumerate(kept):
            g, index, action, reward, has_next = self.expected[k]
            assert (int(games[row]), int(slots[row])) == (g, index % m.slots)
            assert (int(m.action[at[row]]), bool(m.has_next[at[row]])) == (action, has_next)
            assert float(m.reward[at[row]]) == pytest.approx(reward)
            assert np.array_equal(states[row], self.truth(g, index)), f"state of transition {k}"
            if has_next:
                assert np.array_equal(next_states[row], self.truth(g, index + 1)), f"next state of transition {k}"

    def check_sample(self, batch_size, generator):
        m = self.memory
        kept = {self.expected[k][3]: self.expected[k]  # rewards are random floats: one per transition
                for k in range(max(0, len(self.expected) - m.capacity), len(self.expected))}
        states, actions, rewards, next_states, has_next = m.sample(batch_size, generator)
        assert states.shape == next_states.shape == (batch_size, self.depth, 84, 84)
        assert states.dtype == next_states.dtype == torch.uint8
        for b in range(batch_size):
            g, index, action, reward, nxt = kept[float(rewards[b])]  # KeyError: not stored content
            assert (int(actions[b]), bool(has_next[b])) == (action, nxt)
            assert np.array_equal(states[b].numpy(), self.truth(g, index))
            if nxt:
                assert np.array_equal(next_states[b].numpy(), self.truth(g, index + 1))


@pytest.mark.parametrize("capacity, games, depth, block", [(50, 3, 6, 6), (40, 2, 4, 3), (30, 4, 6, 1)])
def test_replay_stacks_match_a_hand_built_ground_truth_through_many_wraparounds(capacity, games, depth, block):
    driver = ReplayDriver(capacity, games, depth, block, seed=capacity + games)
    generator = torch.Generator().manual_seed(0)
    steps = 12 * driver.memory.slots  # the frame ring wraps about 12 times
    for t in range(steps):
        driver.step()
        if len(driver.memory) < capacity:
            assert len(driver.memory) == len(driver.expected)  # filling
        if t % 97 == 0 or t == steps - 1:
            driver.check_every_stored_transition()
            if len(driver.memory) >= 1:
                driver.check_sample(32, generator)
    assert len(driver.expected) > 10 * capacity  # the transition FIFO wrapped many times too
    assert len(driver.memory) == capacity
    assert len({gid for _, ids in driver.written for gid in ids}) > 5 * games  # many games started


def test_replay_len_caps_at_capacity():
    memory = tb.ReplayMemory(5, 1, 2, 1, CPU)
    memory.add_frames(torch.zeros((1, 84, 84), dtype=torch.uint8), torch.ones(1, dtype=torch.bool))
    lengths = []
    for i in range(8):
        memory.add_frames(torch.zeros((1, 84, 84), dtype=torch.uint8), torch.zeros(1, dtype=torch.bool))
        memory.add(np.array([0]), np.array([i]), np.array([0]), np.array([0.0], np.float32), np.array([True]))
        lengths.append(len(memory))
    assert lengths == [1, 2, 3, 4, 5, 5, 5, 5]


def test_replay_memory_needs_at_most_45_kb_per_transition_and_says_what_it_allocates():
    per_transition = tb.ReplayMemory.bytes_needed(100_000, 8, 6, 6) / 100_000
    assert per_transition <= 45_000  # the tutorial's loop: about 450 KB, so at least 10x less
    # The figure is what the memory really allocates (checked at a size that fits in a test).
    memory = tb.ReplayMemory(1000, 8, 6, 6, CPU)
    allocated = sum(t.numel() * t.element_size() for t in (memory.frames, memory.game_start, memory.game,
                                                           memory.slot, memory.action, memory.reward,
                                                           memory.has_next))
    assert allocated == tb.ReplayMemory.bytes_needed(1000, 8, 6, 6)


# ---------------------------------------------------------------------------------------------------
# 5. The tutorial's transition rule, lives as episodes and the forced FIRE, on a scripted game
# ---------------------------------------------------------------------------------------------------
# One entry per agent step: (game reward, what happens). "life": a life is lost; "over": the last life is
# lost and the game ends (the next frame is the new game's first). Blocks of 6 close when the step count
# (1-based) is a multiple of 6 or when the life ends.
SCRIPT_STEPS = [
    (0, None), (1, None), (0, None), (4, None), (0, None), (0, None),   # 0-5: block A
    (0, None), (7, None), (1, None), (1, "life"),                       # 6-9: block B, life lost on its 4th step
    (0, None), (1, None),                                               # 10-11: block C (2 steps), FIRE at 10
    (0, "life"),                                                        # 12: block D, life lost on its 1st step
    (0, None), (1, None), (0, None), (0, None), (0, None),              # 13-17: block E, FIRE at 13
    (0, None), (0, None), (1, "life"),                                  # 18-20: block F, reward 1 on the loss step
    (0, None), (0, None), (0, "life"),                                  # 21-23: block G, FIRE at 21
    (0, None), (0, "over"),                                             # 24-25: block H, FIRE at 24; game over
    (0, None), (1, None), (0, None), (0, None),                         # 26-29: block I in a new game, FIRE at 26
    (1, None),                                                          # 30: block J, still open at the end
]
EXPECTED_TRANSITIONS = [  # (state slot = step of the block's first step, forced FIRE?, reward, has next state)
    (0, True, 0 + 1 + 0 + 1 + 0 + 0, True),    # the 4 points are clipped to 1
    (6, False, 0 + 1 + 1 + -1, True),          # 7 clipped to 1; the lost life's step gives -1 (not 1 - 1)
    (10, True, 0 + 1, True),                   # closes at step count 12
    (12, False, -1, False),                    # the life ended on the block's first step: no next state
    (13, True, 0 + 1 + 0 + 0 + 0, True),
    (18, False, 0 + 0 + -1, True),             # reward 1 on the loss step is replaced by -1
    (21, True, 0 + 0 + -1, True),
    (24, True, 0 + -1, True),                  # game over counts as a lost life
    (26, True, 0 + 1 + 0 + 0, True),
]
FIRE_STEPS = [0, 10, 13, 21, 24, 26]  # the first step of every life


class ScriptedGames:
    """Interface of train_breakout.OneGame. Each frame is one grey level, distinct for every frame returned,
    so a stack can be read back as frame numbers. Records the actions it receives."""

    screen_lut = None  # RGB frames
    actions = BREAKOUT_ACTIONS

    def __init__(self, script):
        self.script, self.t, self.frames_returned, self.lives = script, 0, 0, 5
        self.received, self.game_of_frame = [], []
        self.game = 0

    def _frame(self):
        level = self.level(self.frames_returned)
        self.game_of_frame.append(self.game)
        self.frames_returned += 1
        return np.full((1, 210, 160, 3), level, np.uint8)

    @staticmethod
    def level(k):
        return 20 + 7 * k

    def reset(self):
        return self._frame(), np.array([self.lives])

    def send(self, actions):
        self.sent = actions

    def recv(self):
        return self.step(self.sent)

    def step(self, actions):
        self.received.append(int(actions[0]))
        reward, event = self.script[self.t]
        self.t += 1
        if event == "life":
            self.lives -= 1
        if event == "over":
            self.lives, self.game = 5, self.game + 1  # SameStep reset: the new game's first frame and lives
        return (self._frame(), np.array([reward], np.float32), np.array([event == "over"]), np.array([False]),
                np.array([self.lives]))

    def state_dict(self):
        return {}

    def close(self):
        pass


def train_scripted(tmp_path, monkeypatch, *flags):
    games, calls, seen = ScriptedGames(SCRIPT_STEPS), [], []
    monkeypatch.setattr(tb, "make_games", lambda *a: calls.append(a) or games)
    real_choose = tb.choose_actions

    def recording_choose(policy, stack, *rest):
        seen.append(stack.frames.clone())
        return real_choose(policy, stack, *rest)

    monkeypatch.setattr(tb, "choose_actions", recording_choose)
    run = tmp_path / "run"
    args, given = tb.parse_args(["--checkpoints", str(run), "--envs", "1", "--seed", "0", "--memory", "500",
                                 "--batch-size", "8", "--learn-start", "100000", "--eval-every", "0",
                                 "--save-every", "2", "--steps", str(len(SCRIPT_STEPS)), "--device", "cpu",
                                 "--threads", "1", *flags])
    summary = tb.train(args, given)
    return games, calls, torch.stack(seen)[:, 0], summary, run


def test_the_tutorials_transition_rule_on_a_scripted_game(tmp_path, monkeypatch, in_process):
    games, calls, seen, summary, run = train_scripted(tmp_path, monkeypatch)
    assert calls == [("ALE/Breakout-v5", 1, 0)]  # no evaluation games with --eval-every 0
    assert len(games.received) == len(SCRIPT_STEPS) == summary["steps"]

    # FIRE (action 1) on the first step of every life, including the first of a new game; random otherwise.
    assert [t for t in FIRE_STEPS if games.received[t] != 1] == []
    assert {games.received[t] for t in range(len(SCRIPT_STEPS)) if t not in FIRE_STEPS} - {1} != set()

    checkpoint = sorted((run / "resume").iterdir())[-1]
    arrays = {k[len("replay."):]: np.asarray(v) for k, v in load_checkpoint(checkpoint)[1].items()
              if k.startswith("replay.")}
    stored = list(zip(arrays["slot"].tolist(), arrays["action"].tolist(), arrays["reward"].tolist(),
                      arrays["has_next"].tolist()))
    expected = [(slot, games.received[slot], float(reward), has_next)
                for slot, _, reward, has_next in EXPECTED_TRANSITIONS]
    assert stored == expected
    assert all(games.received[slot] == 1 for slot, fire, _, _ in EXPECTED_TRANSITIONS if fire)

    # What the replay memory rebuilds is what the agent saw: the state at the block's first step, and the
    # state one step later as next state.
    memory = tb.ReplayMemory(500, 1, 6, 6, CPU)
    memory.load_state_dict({**arrays, **load_checkpoint(checkpoint)[0]["replay"]})
    slots = torch.tensor(arrays["slot"])
    zeros = torch.zeros_like(slots)
    states, next_states = memory.stacks(zeros, slots)
    for i, (slot, _, _, has_next) in enumerate(EXPECTED_TRANSITIONS):
        assert torch.equal(states[i], seen[slot])
        if has_next:
            assert torch.equal(next_states[i], seen[slot + 1])

    # The stacks the agent saw, read as frame numbers at a pixel erasing never touches: newest first, kept
    # over lost lives, zeros before a new game's first frame.
    levels = seen[:, :, 83, 83].tolist()
    for t, stack in enumerate(levels):
        want = [games.level(t - j) if t - j >= 0 and games.game_of_frame[t - j] == games.game_of_frame[t] else 0
                for j in range(6)]
        assert stack == want, f"stack before step {t}"

    # Episodes are lives: 5 lives lost; snapshots are named by episode (every 2, and the last one).
    assert summary["episodes"] == 5 and summary["games"] == 1
    assert sorted(p.name for p in run.glob("*.pth")) == ["2.pth", "4.pth", "5.pth"]
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "game"]
    # The game's score is the real game score (before clipping and life-loss rewards).
    assert [(float(r["score"]), int(r["lives_lost"]), int(r["episode"])) for r in rows] == [(17.0, 5, 5)]


def test_random_erasing_is_on_in_training_and_no_random_erasing_turns_it_off(tmp_path, monkeypatch, in_process):
    _, _, seen, _, _ = train_scripted(tmp_path / "on", monkeypatch)
    newest = seen[:, 0].numpy()  # every frame the agent received, erased as it was stored
    zero = newest == 0
    assert zero.any(axis=(1, 2)).mean() > 0.3
    assert not zero[:, :10].any() and not zero[:, 29:].any() and not zero[:, :, 80:].any()

    _, _, seen, _, _ = train_scripted(tmp_path / "off", monkeypatch, "--no-random-erasing")
    assert not (seen[:, 0] == 0).any()


# ---------------------------------------------------------------------------------------------------
# 6. The network
# ---------------------------------------------------------------------------------------------------
PARAMETER_SHAPES = {
    "conv1.weight": (32, 6, 8, 8), "conv1.bias": (32,), "conv2.weight": (64, 32, 4, 4), "conv2.bias": (64,),
    "conv3.weight": (64, 64, 3, 3), "conv3.bias": (64,), "act_fc.weight": (512, 3136), "act_fc.bias": (512,),
    "act_fc2.weight": (4, 512), "act_fc2.bias": (4,), "value_fc.weight": (512, 3136), "value_fc.bias": (512,),
    "value_fc2.weight": (1, 512), "value_fc2.bias": (1,),
}


class TutorialDQN(nn.Module):
    """The tutorial's network as its readers have it, written out independently of train_breakout.py."""

    def __init__(self, in_channels=6, n_actions=4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=8, stride=4)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=4, stride=2)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3, stride=1)
        self.act_fc = nn.Linear(7 * 7 * 64, 512)
        self.act_fc2 = nn.Linear(512, n_actions)
        self.value_fc = nn.Linear(7 * 7 * 64, 512)
        self.value_fc2 = nn.Linear(512, 1)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))).view(x.size(0), -1)
        act = self.act_fc2(F.relu(self.act_fc(x)))
        value = self.value_fc2(F.relu(self.value_fc(x)))
        return value + act - act.mean(dim=1, keepdim=True)


def test_network_parameter_names_and_shapes_are_the_tutorials():
    net = tb.DuelingNetwork(6, 4)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == PARAMETER_SHAPES
    assert net(torch.rand(3, 6, 84, 84)).shape == (3, 4)


def test_network_q_is_value_plus_advantage_minus_mean_advantage():
    torch.manual_seed(0)
    net = tb.DuelingNetwork(6, 4)
    x = torch.rand(5, 6, 84, 84)
    with torch.no_grad():
        h = F.relu(net.conv3(F.relu(net.conv2(F.relu(net.conv1(x)))))).flatten(1)
        assert h.shape == (5, 3136)
        advantage = net.act_fc2(F.relu(net.act_fc(h)))
        value = net.value_fc2(F.relu(net.value_fc(h)))
        q = net(x)
    assert torch.allclose(q, value + advantage - advantage.mean(1, keepdim=True), atol=1e-5)
    assert not torch.allclose(q, value + advantage, atol=1e-3)  # the mean is really subtracted
    assert torch.allclose(q.mean(1, keepdim=True), value, atol=1e-5)


def test_network_weights_are_kaiming_normal_and_biases_pytorchs_default():
    torch.manual_seed(0)
    net = tb.DuelingNetwork(6, 4)
    for name in ("conv1", "conv2", "conv3", "act_fc", "act_fc2", "value_fc", "value_fc2"):
        layer = getattr(net, name)
        fan_in = layer.weight[0].numel()
        rel = 0.03 if layer.weight.numel() >= 10_000 else 0.15  # PyTorch's default would be 2.45x smaller
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=rel)
        assert abs(layer.weight.mean().item()) < 0.1 * math.sqrt(2 / fan_in) or layer.weight.numel() < 1000
        bound = 1 / math.sqrt(fan_in)  # nn.Linear / nn.Conv2d default: uniform(-bound, bound)
        assert layer.bias.abs().max().item() <= bound and layer.bias.abs().max().item() > 0


def test_a_tutorial_state_dict_loads_and_ours_loads_into_the_tutorials_network(tmp_path):
    torch.manual_seed(1)
    theirs = TutorialDQN().eval()
    torch.save(theirs.state_dict(), tmp_path / "tutorial.pth")
    ours = play.load_network(str(tmp_path / "tutorial.pth"), CPU)
    assert not ours.training  # eval mode
    x = torch.rand(2, 6, 84, 84)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)

    save_snapshot(tb.DuelingNetwork(6, 4), tmp_path / "ours.pth")
    TutorialDQN().load_state_dict(torch.load(tmp_path / "ours.pth", weights_only=True))  # strict


def test_load_network_takes_frames_and_actions_from_the_weights(tmp_path):
    torch.save(TutorialDQN(in_channels=4, n_actions=18).state_dict(), tmp_path / "four.pth")
    net = play.load_network(str(tmp_path / "four.pth"), CPU)
    assert net.conv1.weight.shape[1] == 4 and net(torch.rand(1, 4, 84, 84)).shape == (1, 18)


@pytest.mark.parametrize("damage", ["missing key", "3136->256", "not a state_dict", "not a file"])
def test_load_network_refuses_another_architecture_with_a_user_error(tmp_path, damage):
    state = TutorialDQN().state_dict()
    path = tmp_path / "bad.pth"
    if damage == "missing key":
        del state["value_fc2.bias"]
    elif damage == "3136->256":
        state["act_fc.weight"], state["act_fc.bias"] = torch.zeros(256, 3136), torch.zeros(256)
        state["act_fc2.weight"] = torch.zeros(4, 256)
    if damage == "not a file":
        path.write_bytes(b"this is not a checkpoint")
    elif damage == "not a state_dict":
        torch.save([1, 2, 3], path)
    else:
        torch.save(state, path)
    with pytest.raises(tb.UserError) as e:
        play.load_network(str(path), CPU)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------------
# 7. Exploration
# ---------------------------------------------------------------------------------------------------
def test_epsilon_schedule_is_the_tutorials_exponential():
    args, _ = tb.parse_args([])
    assert tb.epsilon(0, args) == 1.0
    assert tb.epsilon(25_000_000, args) == pytest.approx(0.01 + 0.99 * math.exp(-1))
    values = [tb.epsilon(s, args) for s in range(0, 500_000_000, 1_000_000)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.01, abs=1e-6)


def test_epsilon_flags_change_the_schedule():
    args, _ = tb.parse_args(["--eps-start", "0.5", "--eps-end", "0.1", "--eps-decay", "1000"])
    assert tb.epsilon(0, args) == pytest.approx(0.5)
    assert tb.epsilon(1000, args) == pytest.approx(0.1 + 0.4 * math.exp(-1))
    assert tb.epsilon(10**6, args) == pytest.approx(0.1)


def test_choose_actions_is_greedy_at_epsilon_0_and_uniform_at_1():
    torch.manual_seed(0)
    net = tb.DuelingNetwork(6, 4)
    stacks = torch.randint(0, 256, (64, 6, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        greedy = net(stacks.float() / 255).argmax(1).numpy()
    stack, two = tb.FrameStack(64, 6, CPU), tb.FrameStack(2, 6, CPU)
    stack.load_state_dict({"frames": stacks}), two.load_state_dict({"frames": stacks[:2]})
    no_fire = np.zeros(64, bool)
    assert np.array_equal(tb.choose_actions(net, stack, 0.0, 4, np.random.default_rng(0), no_fire, 1), greedy)
    counts = np.bincount(np.concatenate([tb.choose_actions(net, two, 1.0, 4, np.random.default_rng(s), no_fire[:2], 1)
                                         for s in range(1000)]), minlength=4)
    assert counts.min() > 0.2 * 2000
    # FIRE where a life starts, whatever epsilon-greedy chose; and nowhere without a FIRE action.
    need_fire = np.arange(64) % 3 == 0
    fired = tb.choose_actions(net, stack, 0.0, 4, np.random.default_rng(0), need_fire, 1)
    assert np.array_equal(fired, np.where(need_fire, 1, greedy))
    assert np.array_equal(tb.choose_actions(net, stack, 0.0, 4, np.random.default_rng(0), need_fire, None), greedy)


# ---------------------------------------------------------------------------------------------------
# 8. Learning step and soft target update
# ---------------------------------------------------------------------------------------------------
def huber(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 1, 0.5 * x ** 2, x.abs() - 0.5).mean()


def test_td_update_matches_a_hand_computed_target_and_huber_loss():
    torch.manual_seed(0)
    policy, target = tb.DuelingNetwork(6, 4), tb.DuelingNetwork(6, 4)
    with torch.no_grad():
        target.value_fc2.bias += 3.0  # target Q-values of a clearly different size from the policy's
    states = torch.randint(0, 256, (4, 6, 84, 84), dtype=torch.uint8)
    next_states = torch.randint(0, 256, (4, 6, 84, 84), dtype=torch.uint8)
    actions, rewards = torch.tensor([0, 3, 1, 2]), torch.tensor([1.0, -1.0, 0.0, 2.0])
    has_next = torch.tensor([True, False, True, True])

    with torch.no_grad():
        q_sa = policy(states.float() / 255)[torch.arange(4), actions]
        next_max = target(next_states.float() / 255).max(1).values
    targets = [rewards[i] + 0.99 * next_max[i] if has_next[i] else rewards[i] for i in range(4)]
    targets = torch.stack(targets)
    expected_loss = huber(q_sa - targets)
    assert targets[1] == -1.0  # no bootstrap past a lost life

    # The gradient step it should take: plain SGD on the hand-computed loss.
    reference = tb.DuelingNetwork(6, 4)
    reference.load_state_dict(policy.state_dict())
    huber(reference(states.float() / 255)[torch.arange(4), actions] - targets).backward()
    target_before = {k: v.clone() for k, v in target.state_dict().items()}

    loss, mean_q = tb.td_update(policy, target, torch.optim.SGD(policy.parameters(), lr=0.5),
                                tb.Batch(states, actions, rewards, next_states, has_next), gamma=0.99)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)
    assert mean_q.item() == pytest.approx(q_sa.mean().item(), rel=1e-4, abs=1e-5)
    for (name, p), r in zip(policy.named_parameters(), reference.parameters()):
        assert torch.allclose(p, r.detach() - 0.5 * r.grad, atol=1e-5), name
    for k, v in target.state_dict().items():
        assert torch.equal(v, target_before[k]), f"td_update changed the target network's {k}"


class HugeGradient(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (self.w * 1e7).expand(x.shape[0], 2)


def test_td_update_clips_gradients_by_value_at_1000():
    policy, target = HugeGradient(), HugeGradient()
    batch = tb.Batch(torch.zeros((1, 6, 84, 84), dtype=torch.uint8), torch.tensor([0]), torch.tensor([5.0]),
                     torch.zeros((1, 6, 84, 84), dtype=torch.uint8), torch.tensor([False]))
    tb.td_update(policy, target, torch.optim.SGD(policy.parameters(), lr=1.0), batch, gamma=0.99)
    assert policy.w.item() == pytest.approx(1000.0)  # the raw gradient is -1e7


def test_soft_update_moves_the_target_by_tau_and_defaults_are_the_tutorials():
    torch.manual_seed(0)
    policy, target = tb.DuelingNetwork(6, 4), tb.DuelingNetwork(6, 4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    tb.soft_update(target, policy, 0.005)
    for k, p in policy.state_dict().items():
        assert torch.allclose(target.state_dict()[k], 0.005 * p + 0.995 * before[k], atol=1e-7), k
    args, _ = tb.parse_args([])
    assert (args.tau, args.gamma, args.lr, args.batch_size, args.memory, args.target_every, args.update_every) == \
        (0.005, 0.99, 1e-4, 256, 100_000, 400, 4)


# ---------------------------------------------------------------------------------------------------
# 9. The command line, run for real
# ---------------------------------------------------------------------------------------------------
TINY = ["--memory", "200", "--batch-size", "16", "--learn-start", "16", "--envs", "2", "--eval-every", "0",
        "--save-every", "4", "--device", "cpu", "--seed", "5"]


def command(*flags: str) -> list:
    return [sys.executable, str(SCRIPT), *flags]


def run_script(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(*flags), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def final_checkpoint(run: Path) -> Path:
    return sorted(p for p in (run / "resume").iterdir() if not p.name.startswith("."))[-1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    p = run_script("--checkpoints", str(run), "--episodes", "10", *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    return run, p


def test_every_bounded_flag_refuses_values_outside_its_bounds_and_accepts_its_closed_ends():
    """check_args reads each flag's bounds off its field: it refuses a value just outside them (below, and
    above where bounded) and accepts each closed end."""
    checked = 0
    for f in dataclasses.fields(tb.Args):
        bounds = f.metadata["bounds"]
        if bounds is None:
            continue
        kind = int if "int" in f.type else float
        low, high = (float(x) for x in bounds[1:-1].split(","))
        outside = [low if bounds[0] == "(" else low - 1] + ([high + 1] if high < math.inf else [])
        inside = ([low] if bounds[0] == "[" else []) + ([high] if bounds[-1] == "]" else [])
        for value, ok in [(v, False) for v in outside] + [(v, True) for v in inside]:
            args, _ = tb.parse_args(["--block", "1"] if f.name == "n_step" else [])
            setattr(args, f.name, kind(value))
            if ok:
                tb.check_args(args)
            else:
                with pytest.raises(tb.UserError, match=f"--{f.name.replace('_', '-')} "):
                    tb.check_args(args)
        checked += 1
    assert checked >= 20


def test_help_lists_every_flag_with_its_default():
    p = subprocess.run(command("--help"), capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "250"})
    assert p.returncode == 0
    entries = {}
    for line in p.stdout.split("options:")[1].splitlines():
        if re.match(r"\s{2}-", line):
            flag = line.split()[0].rstrip(",")
            if flag == "-h":
                flag = "--help"
            entries[flag] = line
        elif line.strip() and entries:
            entries[flag] += " " + line.strip()
    for f in dataclasses.fields(tb.Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, f"{flag} is missing from --help"
        text = " ".join(entries[flag].split())
        assert f"(default: {f.default})" in text or ("(default" in text and f.default is None), \
            f"{flag}: no default shown in {text!r}"


def test_a_short_run_learns_and_writes_snapshots_config_metrics_and_a_checkpoint(trained_run):
    run, p = trained_run
    last = p.stdout.strip().splitlines()[-1]
    m = re.match(r"done: (\d+) episodes, (\d+) agent steps, (\d+) updates", last)
    assert m, last
    episodes, steps, updates = map(int, m.groups())
    assert episodes in (10, 11) and updates > 0  # two games end lives together at most

    snapshots = sorted(int(x.stem) for x in run.glob("*.pth"))
    assert snapshots == sorted({4, 8, episodes})
    config = json.loads((run / "config.json").read_text())
    assert config["env"] == "ALE/Breakout-v5" and config["n_actions"] == 4 and config["frames"] == 6
    assert (config["args"]["memory"], config["args"]["envs"], config["args"]["seed"]) == (200, 2, 5)

    with open(run / "metrics.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == tb.METRIC_COLUMNS
        rows = list(reader)
    games = [r for r in rows if r["kind"] == "game"]
    assert games and all(int(r["lives_lost"]) == 5 for r in games)  # a game row per finished game
    assert any(r["loss"] for r in games)  # learning is logged

    checkpoint = final_checkpoint(run)
    assert checkpoint.name == f"{steps:012d}" and (checkpoint / "manifest.json").exists()
    tensors = load_checkpoint(checkpoint)[0]
    snapshot = torch.load(run / f"{episodes}.pth", weights_only=True)
    # The snapshot is the target network, as the tutorial saved it; it loads into the tutorial's network.
    assert all(torch.equal(snapshot[k], tensors["target_net"][k]) for k in snapshot)
    assert any(not torch.equal(tensors["policy_net"][k], tensors["target_net"][k]) for k in snapshot)  # it learned
    TutorialDQN().load_state_dict(snapshot)
    assert play.load_network(str(run / "4.pth"), CPU) is not None


ERRORS = {
    "unknown game": ["--env", "ALE/NoSuchGame-v5"],
    "memory below batch": ["--memory", "10", "--batch-size", "256"],
    "no episodes": ["--episodes", "0"],
    "no games": ["--envs", "0"],
    "negative lr": ["--lr", "-1"],
    "existing run": [],
    "resume with another lr": ["--resume", "--lr", "0.001"],
}


@pytest.fixture(scope="module")
def error_runs(trained_run, tmp_path_factory):
    """Every bad invocation at once (they are independent): {case: (CompletedProcess-like, folder)}."""
    base = tmp_path_factory.mktemp("errors")
    copy = base / "copy"
    shutil.copytree(trained_run[0], copy)
    procs = {}
    for case, flags in ERRORS.items():
        folder = {"existing run": trained_run[0], "resume with another lr": copy}.get(case, base / case.replace(" ", "-"))
        extra = TINY if case in ("existing run", "resume with another lr") else ["--device", "cpu"]
        procs[case] = (subprocess.Popen(command("--checkpoints", str(folder), *extra, *flags), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd=ROOT), folder)
    results = {}
    for case, (proc, folder) in procs.items():
        out, err = proc.communicate(timeout=120)
        results[case] = (proc.returncode, out, err, folder)
    return results


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_gives_one_error_line_and_exit_status_2(error_runs, case):
    code, out, err, folder = error_runs[case]
    assert code == 2, (out[-1000:], err[-1000:])
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "Traceback" not in err + out
    if case not in ("existing run", "resume with another lr"):
        assert not folder.exists()  # nothing left behind that would block the corrected command


def test_resume_with_more_episodes_goes_on_counting_episodes(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    before = load_checkpoint(final_checkpoint(run))[0]["counters"]
    p = run_script("--checkpoints", str(run), "--resume", "--episodes", str(before["episodes"] + 4), "--envs", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"episode {before['episodes']}, agent step {before['steps']}" in p.stdout
    after = load_checkpoint(final_checkpoint(run))[0]["counters"]
    assert before["episodes"] + 4 <= after["episodes"] <= before["episodes"] + 5
    assert after["steps"] > before["steps"] and after["updates"] > before["updates"]
    assert (run / "12.pth").exists() and (run / f"{after['episodes']}.pth").exists()
    with open(run / "metrics.csv") as f:
        episodes = [int(r["episode"]) for r in csv.DictReader(f) if r["kind"] == "game"]
    assert episodes == sorted(episodes)
    assert p.stdout.strip().splitlines()[-1].startswith(f"done: {after['episodes']} episodes")


def on_a_terminal(*flags: str) -> str:
    """What a person at a 120-column terminal sees of a run: stdout and stderr through one pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(command(*flags), stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the run ended and the terminal closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


PROGRESS_LINE = (r"step [\d,]+ \| episode [\d,]+ \| score ([\d.]+|-) \(mean of the last 100 games\) \| "
                 r"epsilon [\d.]+ \| [\d,]+ steps/s \| [\d.]+% of {total}, (\d+:\d\d:\d\d left|time left unknown)")


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log(trained_run, tmp_path):
    # In a log (here a pipe, as in Slurm's and nohup's files): no carriage return, a line every --progress-every.
    out = trained_run[1].stdout + trained_run[1].stderr
    assert "\r" not in out and "training:" not in out
    p = run_script("--checkpoints", str(tmp_path / "log"), "--steps", "1500", "--progress-every", "0.2", *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "\r" not in p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) >= 2 and all(re.fullmatch(PROGRESS_LINE.format(total="1,500 agent steps"), line)
                                      for line in progress), progress
    steps = [int(line.split()[1].replace(",", "")) for line in progress]
    assert steps == sorted(steps) and steps[-1] <= 1500
    assert lines[-1].startswith("done: ")
    # On a terminal: the bar, following the budget given, and every note on a line of its own, never in the bar.
    seen = on_a_terminal("--checkpoints", str(tmp_path / "terminal"), "--steps", "1500", *TINY,
                         "--eval-every", "500", "--eval-games", "1")
    assert re.search(r"100%\|[^|]*\| 1500/1500 \[.*step/s", seen), seen[-2000:]
    # What stays on the screen, line by line.
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1].strip() for line in seen.split("\n")]
    notes = [line for line in shown if line.startswith(("evaluation at step", "checkpoint:"))]
    assert len(notes) == 4, shown  # three evaluations, the checkpoint
    assert not [line for line in shown if "training:" in line and re.search(r"evaluation|checkpoint|note", line)]
    assert not re.search(r"^step \d", seen, re.M)


# ---------------------------------------------------------------------------------------------------
# 10. Vectorised games
# ---------------------------------------------------------------------------------------------------
def test_vector_games_equal_separately_seeded_single_games():
    # AtariVectorEnv.reset(seed=s) seeds sub-environment i with s + i.
    n, seed, steps = 3, 11, 250
    together = atari.VectorGames("ALE/Breakout-v5", n, seed)
    alone = [atari.VectorGames("ALE/Breakout-v5", 1, seed + i) for i in range(n)]
    assert [a.name for a in together.actions] == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    actions = np.random.default_rng(0).integers(0, 4, (steps, n))
    frames, lives = together.reset()
    assert frames.shape == (n, 210, 160) and frames.dtype == np.uint8 and lives.tolist() == [5] * n  # ALE's grey
    for i, game in enumerate(alone):
        f, l = game.reset()
        assert np.array_equal(frames[i], f[0]) and lives[i] == l[0]
    lost, ended, differ = 0, 0, False
    for t in range(steps):
        frames, rewards, terminated, truncated, new_lives = together.step(actions[t])
        for i, game in enumerate(alone):
            f, r, te, tr, l = game.step(actions[t, i:i + 1])
            assert np.array_equal(frames[i], f[0]), f"game {i}, step {t}: frames differ"
            assert (rewards[i], terminated[i], truncated[i], new_lives[i]) == (r[0], te[0], tr[0], l[0]), \
                f"game {i}, step {t}"
        lost += int(((new_lives < lives) & ~terminated).sum())
        ended += int(terminated.sum())
        differ |= not np.array_equal(frames[0], frames[1])
        lives = new_lives
    for game in [together, *alone]:
        game.close()
    assert lost > 0 and ended > 0 and differ  # lost lives and new games (autoreset) were compared too


def test_emulator_grey_gives_exactly_the_tutorials_frames():
    """The vector environment hands Breakout over as the emulator's greyscale; through BREAKOUT_GREY it must
    give the very frames the tutorial's BGR2GRAY of the RGB screen gives, pixel for pixel."""
    n, seed, steps = 4, 5, 400
    grey, rgb = atari.VectorGames("ALE/Breakout-v5", n, seed), atari.VectorGames("ALE/Breakout-v5", n, seed, rgb=True)
    assert grey.screen_lut is not None and rgb.screen_lut is None
    rng = np.random.default_rng(1)
    g, _ = grey.reset()
    c, _ = rgb.reset()
    levels = set()
    for t in range(steps):
        assert g.shape == (n, 210, 160) and c.shape == (n, 210, 160, 3)
        levels |= set(np.unique(g).tolist())
        assert np.array_equal(tb.preprocess_all(g, None, grey.screen_lut), tb.preprocess_all(c, None)), f"step {t}"
        actions = np.where(rng.random(n) < 0.2, 1, rng.integers(0, 4, n))  # FIRE often, so balls fly
        g, c = grey.step(actions)[0], rgb.step(actions)[0]
    assert levels <= set(atari.BREAKOUT_GREY) and len(levels) >= 7  # every colour seen has its own entry
    # The batch path against one frame through cv2 by hand, as the tutorial wrote it.
    by_hand = [tutorial_preprocess(f) for f in c]
    assert np.array_equal(tb.preprocess_all(c, None), np.stack(by_hand))
    assert np.array_equal(tb.preprocess_all(g, None, grey.screen_lut), np.stack(by_hand))
    grey.close()
    rgb.close()
