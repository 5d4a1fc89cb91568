#!/usr/bin/env python
# Frozen: train_breakout.py as of commit 115c5ab, kept only so that tests/test_resume.py can write full
# checkpoints in the layout that version wrote, and prove that runs it started resume with today's trainer.
"""Train the Dueling DQN of the Breakout tutorial: the same agent, many times faster, a fraction of the
memory, and a run that survives being stopped.

    python train_breakout.py --episodes 600000 --memory 100000   # train (Ctrl-C saves; --resume goes on)
    python play.py checkpoints/600000.pth                         # watch the agent

The file reads top to bottom: arguments, environment, preprocessing, replay memory, network, exploration,
learning step, evaluation and logging, checkpoints, and the training loop. README.md explains the recipe.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2, no traceback."""


# ---------------------------------------------------------------------------------------------------
# Arguments: every field is a flag; its help text and default appear in --help.
# ---------------------------------------------------------------------------------------------------
def opt(default, help: str, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


# Flags that only say where, how long or how visibly a run goes: --resume accepts new values for these.
RUN_FLAGS = {"episodes", "steps", "minutes", "device", "checkpoints", "resume", "checkpoint_minutes", "plot_every",
             "save_every", "eval_every", "eval_games", "eval_eps", "capture_video", "threads"}


@dataclass
class Args:
    # How long, and where things go
    episodes: int = opt(5_000_000, "lives to train for (the tutorial's episode ends when a life is lost)")
    steps: Optional[int] = opt(None, "also stop after this many agent steps")
    minutes: Optional[float] = opt(None, "also stop after this many minutes of training")
    checkpoints: str = opt("checkpoints", "the run's folder: snapshots, config.json, metrics, full checkpoints")
    resume: Optional[str] = opt(None, "continue the run in --checkpoints, or from the checkpoint folder given",
                                nargs="?", const="latest", metavar="PATH")
    checkpoint_minutes: float = opt(10.0, "minutes between full checkpoints (Ctrl-C and SIGTERM also save one)")
    save_every: int = opt(25_000, "save the target network as <episode>.pth every this many episodes")
    plot_every: int = opt(2_500, "redraw curve.png every this many episodes")
    eval_every: int = opt(500_000, "agent steps between evaluations (0: never)")
    eval_games: int = opt(10, "games per evaluation")
    eval_eps: float = opt(0.01, "epsilon during evaluation")
    capture_video: bool = opt(False, "save each evaluation's best game to videos/ as MP4")
    # The machine
    env: str = opt("ALE/Breakout-v5", "Gymnasium id of any ALE game")
    envs: int = opt(min(max(16, os.cpu_count() or 1), 64), "games stepped together; 1 steps one gym.make environment")
    device: str = opt("auto", "where to learn and keep the replay memory", choices=["auto", "cpu", "cuda", "mps"])
    threads: int = opt(0, "CPU threads for torch (0: the number of cores)")
    seed: Optional[int] = opt(None, "random seed (default: drawn at random and written to config.json)")
    # The recipe: the tutorial's values unless --recipe fast (see RECIPES); explicit flags override either
    recipe: str = opt("tutorial", "starting values of the flags below", choices=["tutorial", "fast"])
    memory: int = opt(100_000, "replay memory capacity in stored transitions")
    batch_size: int = opt(256, "transitions per gradient update")
    learn_start: Optional[int] = opt(None, "stored transitions before learning starts (default: --memory)")
    frames: int = opt(6, "frames per state")
    block: Optional[int] = opt(None, "agent steps behind one stored transition (default: --frames, the "
                                      "tutorial's rule: its reward is the block's sum, its next state 1 step on)")
    n_step: int = opt(1, "n-step returns: next state n steps on, reward the discounted n-step sum (needs --block 1)")
    double: bool = opt(False, "Double DQN targets: the policy network picks the next action, the target rates it")
    lr: float = opt(1e-4, "AdamW learning rate (amsgrad)")
    gamma: float = opt(0.99, "discount")
    tau: float = opt(0.005, "soft target update: target = tau * policy + (1 - tau) * target")
    eps_start: float = opt(1.0, "epsilon at step 0")
    eps_end: float = opt(0.01, "epsilon the schedule decays to")
    eps_decay: float = opt(25_000_000, "agent steps of the epsilon decay (the time constant when exponential)")
    eps_schedule: str = opt("exponential", "shape of the epsilon decay", choices=["exponential", "linear"])
    update_every: int = opt(4, "stored transitions per gradient update")
    target_every: int = opt(400, "stored transitions per soft target update")
    no_random_erasing: bool = opt(False, "do not erase random patches of the brick rows in training")
    no_reward_clipping: bool = opt(False, "learn from raw game rewards instead of rewards clipped to [-1, 1]")


# --recipe fast: a modern recipe for the same network, tuned for wall-clock time (README: "Recipes").
RECIPES = {
    "tutorial": {},
    "fast": dict(block=1, n_step=3, memory=200_000, batch_size=64, learn_start=20_000, lr=2.5e-4,
                 update_every=32, target_every=16_000, tau=1.0, eps_schedule="linear", eps_decay=200_000,
                 eval_every=100_000),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already explains it."""

    def _get_help_string(self, action):
        return action.help if "(default" in action.help else super()._get_help_string(action)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    for f in dataclasses.fields(Args):
        kw = dict(f.metadata)
        kw["default"] = argparse.SUPPRESS if suppress_defaults else f.default
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", **kw)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type.replace("Optional[", "").rstrip("]")]
            parser.add_argument(flag, type=kind, **kw)
    return parser


def check_args(a: Args) -> None:
    """Refuse impossible values before anything is allocated."""
    positive = ["episodes", "memory", "batch_size", "frames", "n_step", "envs", "save_every", "plot_every",
                "eval_games", "update_every", "target_every", "lr", "eps_decay", "tau", "checkpoint_minutes"]
    for name in positive + [k for k in ("steps", "minutes", "block") if getattr(a, k) is not None]:
        if not getattr(a, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    for name in ["eval_every", "threads"] + (["learn_start"] if a.learn_start is not None else []):
        if getattr(a, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(a, name)}")
    if a.n_step > 1 and a.block != 1:
        raise UserError("--n-step above 1 needs --block 1 (one stored transition per agent step)")
    if a.memory < a.batch_size:
        raise UserError(f"--memory ({a.memory}) must be at least --batch-size ({a.batch_size})")
    if not 0 < a.gamma <= 1 or not 0 < a.tau <= 1:
        raise UserError("--gamma and --tau must lie in (0, 1]")
    for name in ("eps_start", "eps_end", "eval_eps"):
        if not 0 <= getattr(a, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(a, name)}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------
# Environment: N games of one ALE id, with the settings Gymnasium registers for that id (for
# ALE/Breakout-v5: frameskip 4, sticky actions 0.25, minimal action set). Frames come back as RGB
# (or, from the vector environment playing Breakout, as the emulator's greyscale);
# a game that ends is reset in the same step, so the frame returned for it is the new game's first.
# ---------------------------------------------------------------------------------------------------
def ale_settings(env_id: str) -> dict:
    """The emulator settings Gymnasium registers for `env_id`; a clear error for anything else."""
    import ale_py
    import gymnasium as gym
    gym.register_envs(ale_py)
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise UserError(f"unknown game {env_id!r} ({e}); try ALE/Breakout-v5 or ALE/Pong-v5") from None
    if "game" not in spec.kwargs or not str(spec.entry_point).startswith("ale_py"):
        raise UserError(f"{env_id!r} is not an Atari (ALE) game; try ALE/Breakout-v5")
    skip = spec.kwargs.get("frameskip", 4)
    if not isinstance(skip, int):
        raise UserError(f"{env_id!r} uses a random frameskip; use a -v5 id such as ALE/Breakout-v5")
    return dict(game=spec.kwargs["game"], frameskip=skip,
                repeat_action_probability=spec.kwargs.get("repeat_action_probability", 0.25),
                max_num_frames_per_episode=spec.kwargs.get("max_num_frames_per_episode", 108_000))


class VectorGames:
    """N games stepped by ale-py's C++ thread pool (`AtariVectorEnv`), raw frames, no wrappers.

    For Breakout the emulator returns its own greyscale frames, a third of the bytes of RGB and 10% faster
    to step; `screen_lut` turns them into exactly the grey the tutorial's RGB path gives (see
    BREAKOUT_GREY). Other games come back as RGB."""

    can_save_state = False

    def __init__(self, env_id: str, n: int, seed: int, rgb: bool = False):
        import ale_py
        s = ale_settings(env_id)
        self.screen_lut = breakout_grey_lut() if s["game"] == "breakout" and not rgb else None
        self.env = ale_py.AtariVectorEnv(
            s["game"], n, frameskip=s["frameskip"], repeat_action_probability=s["repeat_action_probability"],
            max_num_frames_per_episode=s["max_num_frames_per_episode"], img_height=210, img_width=160,
            grayscale=self.screen_lut is not None, stack_num=1, maxpool=False, noop_max=0, reward_clipping=False,
            use_fire_reset=False, episodic_life=False, autoreset_mode="SameStep",
            num_threads=min(n, os.cpu_count() or 1), thread_affinity_offset=0)
        self.actions = list(self.env.ale.get_action_set())
        self.seed = seed

    def reset(self):
        obs, info = self.env.reset(seed=self.seed)
        return obs[:, 0], info["lives"].astype(np.int64)

    def step(self, actions: np.ndarray):
        obs, reward, terminated, truncated, info = self.env.step(actions.astype(np.int32))
        return obs[:, 0], reward.astype(np.float32), terminated, truncated, info["lives"].astype(np.int64)

    def close(self):
        self.env.close()


class OneGame:
    """One game through `gym.make`, as the tutorial ran it, with the sticky actions drawn here.

    Sticky actions: each emulator frame repeats the previous frame's action with probability 0.25 (the id's
    setting). ALE draws them itself and keeps the held action outside its saved state, so a game restored
    from a checkpoint would go on holding a different action. Drawing them here, exactly as ALE does (frame
    by frame, the held action NOOP at the start of a game), lets `get_state` hold everything, and a run with
    --envs 1 resumes exactly. The sticky draws are then the only randomness in a game, so a new game needs
    no reseeding of the emulator (which reloads the ROM, 0.1 s)."""

    can_save_state = True

    screen_lut = None  # RGB frames

    def __init__(self, env_id: str, seed: int):
        import ale_py
        import gymnasium as gym
        s = ale_settings(env_id)  # also registers the ALE ids with Gymnasium
        self.noop = ale_py.Action.NOOP
        self.frameskip, self.sticky = s["frameskip"], s["repeat_action_probability"]
        self.env = gym.make(env_id, frameskip=1, repeat_action_probability=0.0)
        self.ale = self.env.unwrapped.ale
        self.actions = list(self.ale.getMinimalActionSet())
        self.seeds = np.random.default_rng(seed)  # seeds of successive games' sticky draws
        self.sticky_rng = np.random.default_rng(0)
        self.held = self.noop  # the action the emulator applied in the last frame

    def _new_game(self):
        seed = int(self.seeds.integers(2**24))
        frame, info = self.env.reset()
        self.sticky_rng, self.held = np.random.default_rng(seed), self.noop  # as after ALE's reset
        return frame, info["lives"]

    def reset(self):
        frame, lives = self._new_game()
        return frame[None], np.array([lives])

    def step(self, actions: np.ndarray):
        action, reward = self.actions[int(actions[0])], 0.0
        for draw in self.sticky_rng.random(self.frameskip):
            if draw >= self.sticky:
                self.held = action
            reward += self.ale.act(self.held)
        terminated, truncated = self.ale.game_over(with_truncation=False), self.ale.game_truncated()
        frame, lives = self.ale.getScreenRGB(), self.ale.lives()
        if terminated or truncated:
            frame, lives = self._new_game()
        return (frame[None], np.array([reward], np.float32), np.array([terminated]), np.array([truncated]),
                np.array([lives]))

    def get_state(self) -> tuple[np.ndarray, dict]:
        """The emulator's bytes, and (as JSON) the game seeds, the sticky-action draws and the held action."""
        # ALE's own random state is left out: with the sticky draws made here it decides nothing.
        emulator = np.frombuffer(self.ale.cloneState(include_rng=False).serialize(), np.uint8)
        return emulator, dict(seeds=self.seeds.bit_generator.state, sticky=self.sticky_rng.bit_generator.state,
                              held=self.held.value)

    def set_state(self, emulator: np.ndarray, state: dict) -> None:
        import ale_py
        self.env.reset()  # Gymnasium refuses step() before a reset; the restore below overrides it
        self.ale.restoreState(ale_py.ALEState(emulator.tobytes()))
        self.seeds.bit_generator.state = state["seeds"]
        self.sticky_rng.bit_generator.state = state["sticky"]
        self.held = ale_py.Action(state["held"])

    def close(self):
        self.env.close()


def make_games(env_id: str, n: int, seed: int, rgb: bool = False):
    """One gym.make game for n == 1, else ale-py's vector environment (RGB frames with `rgb`)."""
    return OneGame(env_id, seed) if n == 1 else VectorGames(env_id, n, seed, rgb)


def fire_action(actions: list) -> Optional[int]:
    """Index of FIRE in the game's action set (1 in Breakout), or None for games without it."""
    names = [a.name for a in actions]
    return names.index("FIRE") if "FIRE" in names else None


# ---------------------------------------------------------------------------------------------------
# Preprocessing: the tutorial's crop, grey and resize, kept as uint8 (the tutorial's float is this / 255).
# ---------------------------------------------------------------------------------------------------
SIZE = 84
# Random erasing: 10 tries, each taken with probability 0.1, zeroing a 4x10 patch whose top-left corner
# lies in rows 10..25 and columns 0..70 (inclusive): where the bricks are after cropping.
ERASE_TRIES, ERASE_P, ERASE_H, ERASE_W, ERASE_ROWS, ERASE_COLS = 10, 0.1, 4, 10, (10, 25), (0, 70)


# Breakout draws with nine colours of the emulator's palette. ALE's own greyscale of each (0.2989 R +
# 0.5870 G + 0.1140 B) is distinct, so it determines the grey the tutorial's COLOR_BGR2GRAY of the RGB
# frame gives (0.114 R + 0.587 G + 0.299 B): {ALE grey: tutorial grey}, read off the emulator's RGB and
# greyscale screens of 100,000 frames of play; tests/test_train.py checks the two paths agree on every pixel.
BREAKOUT_GREY = {0: 0, 142: 142, 148: 126, 131: 106, 129: 103, 110: 87, 85: 110, 127: 139, 124: 124}


def breakout_grey_lut() -> np.ndarray:
    lut = np.arange(256, dtype=np.uint8)
    lut[list(BREAKOUT_GREY)] = list(BREAKOUT_GREY.values())
    return lut


def preprocess_all(screens: np.ndarray, erase_rng: Optional[np.random.Generator],
                   screen_lut: Optional[np.ndarray] = None) -> np.ndarray:
    """A batch of screens to (N,84,84) uint8, erasing when a generator is given. Screens are RGB
    (N,210,160,3), or the emulator's greyscale (N,210,160) mapped through `screen_lut`."""
    n = len(screens)
    if screen_lut is None:
        # COLOR_BGR2GRAY on an RGB frame swaps the red and blue weights; the tutorial did this, and its
        # weights expect it. One call for the whole batch, stacked as one tall image.
        grey = cv2.cvtColor(screens.reshape(n * 210, 160, 3), cv2.COLOR_BGR2GRAY).reshape(n, 210, 160)
        cropped = grey[:, 32:, 8:152]
    else:
        cropped = cv2.LUT(screens.reshape(n * 210, 160), screen_lut).reshape(n, 210, 160)[:, 32:, 8:152]
    frames = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):  # one image at a time: a tall stack of them resizes with slightly different rounding
        cv2.resize(cropped[i], (SIZE, SIZE), dst=frames[i])  # bilinear, cv2's default
    if erase_rng is not None:
        taken = erase_rng.random((n, ERASE_TRIES)) < ERASE_P
        rows = erase_rng.integers(ERASE_ROWS[0], ERASE_ROWS[1] + 1, (n, ERASE_TRIES))
        cols = erase_rng.integers(ERASE_COLS[0], ERASE_COLS[1] + 1, (n, ERASE_TRIES))
        i, t = np.nonzero(taken)  # every patch taken, zeroed in one indexed assignment
        frames[i[:, None, None], rows[i, t][:, None, None] + np.arange(ERASE_H)[:, None],
               cols[i, t][:, None, None] + np.arange(ERASE_W)] = 0
    return frames


class FrameStack:
    """What the agent sees of each game: its `depth` latest frames, newest first (channel 0). A new game
    starts from zeros; a lost life does not clear the stack. Kept as a ring, so a push writes one frame
    per game instead of moving the whole stack."""

    def __init__(self, n: int, depth: int, device: torch.device):
        self.ring = torch.zeros((n, depth, SIZE, SIZE), dtype=torch.uint8, device=device)
        self.newest = 0  # ring[:, newest] is the newest frame, ring[:, newest + 1] the one before, and so on

    def __len__(self) -> int:
        return self.ring.shape[0]

    def push(self, frames: torch.Tensor, new_game: np.ndarray) -> None:
        """One frame per game; `new_game` (bool per game, host memory) marks the first frame of a game."""
        self.newest = (self.newest - 1) % self.ring.shape[1]
        new = np.flatnonzero(np.asarray(new_game))
        if len(new):
            self.ring[torch.from_numpy(new).to(self.ring.device)] = 0
        self.ring[:, self.newest] = frames

    @property
    def frames(self) -> torch.Tensor:
        """(n, depth, 84, 84) uint8, newest first."""
        return self.ring.roll(-self.newest, dims=1) if self.newest else self.ring

    @frames.setter
    def frames(self, value: torch.Tensor) -> None:
        self.ring, self.newest = value, 0


# ---------------------------------------------------------------------------------------------------
# Replay memory: every frame stored once as uint8 on the training device, transitions as indices.
# ---------------------------------------------------------------------------------------------------
class ReplayMemory:
    """FIFO of `capacity` transitions (state, action, block reward, next state or none).

    Frames live in a ring `frames[slot, game]`: each agent step writes one frame per game at the same
    slot (the frame after the step, or the first frame of the next game when a game ended). A transition
    is (game, slot of its state's newest frame, action, reward, has_next); its state is the `depth` frames
    up to that slot and its next state the same up to slot + 1, zeros before the first frame of a game.
    With n-step returns the next state is `n_step` slots on. A transition spans at most `block` agent steps,
    so a ring of block * capacity / games slots (plus a margin) keeps every frame a stored transition still
    needs: about `block` frames per transition.
    """

    def __init__(self, capacity: int, games: int, depth: int, block: int, device: torch.device, n_step: int = 1):
        self.capacity, self.games, self.depth, self.n_step, self.device = capacity, games, depth, n_step, device
        self.slots = self.ring_slots(capacity, games, depth, block, n_step)
        self.frames = torch.zeros((self.slots, games, SIZE, SIZE), dtype=torch.uint8, device=device)
        self.game_start = torch.zeros((self.slots, games), dtype=torch.bool, device=device)
        self.game = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.slot = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.action = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.reward = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.has_next = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.frames_written = 0  # frame slots written so far; the newest is (frames_written - 1) % slots
        self.stored = 0          # transitions stored so far; the FIFO holds the last min(stored, capacity)

    @staticmethod
    def ring_slots(capacity: int, games: int, depth: int, block: int, n_step: int = 1) -> int:
        return block * math.ceil(capacity / games) + 2 * (depth + block + n_step)

    @staticmethod
    def bytes_needed(capacity: int, games: int, depth: int, block: int, n_step: int = 1) -> int:
        slots = ReplayMemory.ring_slots(capacity, games, depth, block, n_step)
        return slots * games * (SIZE * SIZE + 1) + capacity * (8 + 8 + 8 + 4 + 1)

    def __len__(self) -> int:
        return min(self.stored, self.capacity)

    def add_frames(self, frames: torch.Tensor, game_start: torch.Tensor) -> int:
        """Write one frame per game; returns the slot."""
        slot = self.frames_written % self.slots
        self.frames[slot] = frames
        self.game_start[slot] = game_start
        self.frames_written += 1
        return slot

    def add(self, game: np.ndarray, slot: np.ndarray, action: np.ndarray, reward: np.ndarray,
            has_next: np.ndarray) -> None:
        """Store transitions in the given order (oldest first)."""
        at = torch.from_numpy((self.stored + np.arange(len(game))) % self.capacity).to(self.device)
        for table, values in ((self.game, game), (self.slot, slot), (self.action, action),
                              (self.reward, reward), (self.has_next, has_next)):
            table[at] = torch.as_tensor(values, device=self.device).to(table.dtype)
        self.stored += len(game)

    def _window(self, game: torch.Tensor, newest: torch.Tensor, length: int):
        """Frames and game-start flags of `length` consecutive slots per game, newest first: (B, length, ...)."""
        slots = (newest.unsqueeze(1) - torch.arange(length, device=self.device)) % self.slots
        flat = (slots * self.games + game.unsqueeze(1)).view(-1)
        frames = self.frames.view(-1, SIZE * SIZE).index_select(0, flat).view(-1, length, SIZE, SIZE)
        return frames, self.game_start.view(-1)[flat].view(-1, length)

    @staticmethod
    def _clear_before_game_start(frames: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Zero every frame older than the first frame of its state's game."""
        starts = starts.to(torch.int32)
        older_than_start = (torch.cumsum(starts, dim=1) - starts) > 0
        return frames.masked_fill_(older_than_start.view(*starts.shape, 1, 1), 0)

    def stacks(self, game: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) games and newest slots to the states and the next states `n_step` slots on: two (B, depth,
        84, 84) uint8 stacks, zeros before a game's start. They share frames, so depth + n slots are
        gathered once."""
        n, d = self.n_step, self.depth
        frames, starts = self._window(game, slot + n, d + n)
        next_states = self._clear_before_game_start(frames[:, :d].clone(), starts[:, :d])
        states = self._clear_before_game_start(frames[:, n:], starts[:, n:])
        return states, next_states

    def sample(self, batch_size: int, generator: torch.Generator):
        """Uniform batch: states, actions, rewards, next states, has_next; all on the device."""
        i = torch.randint(len(self), (batch_size,), device=self.device, generator=generator)
        states, next_states = self.stacks(self.game[i], self.slot[i])
        return states, self.action[i], self.reward[i], next_states, self.has_next[i]

    def arrays(self) -> dict:
        """Everything needed to rebuild the memory, as NumPy arrays (for checkpoints). Only the part
        written so far is kept, so an early checkpoint is small."""
        used_slots, used = min(self.frames_written, self.slots), len(self)
        tables = {name: getattr(self, name)[:used].cpu().numpy()
                  for name in ("game", "slot", "action", "reward", "has_next")}
        return dict(frames=self.frames[:used_slots].cpu().numpy(),
                    game_start=self.game_start[:used_slots].cpu().numpy(), **tables,
                    counters=np.array([self.frames_written, self.stored], dtype=np.int64))

    def load_arrays(self, arrays: dict) -> None:
        for name in ("frames", "game_start", "game", "slot", "action", "reward", "has_next"):
            target, source = getattr(self, name), arrays[name]
            if source.shape[1:] != target.shape[1:] or len(source) > len(target):
                raise UserError(f"the checkpoint's replay memory has {name} of shape {source.shape}, which "
                                f"does not fit this run's {tuple(target.shape)}")
            if target.device.type == "cpu":  # straight from the (memory-mapped) file into the tensor
                target[:len(source)].numpy()[...] = source
            else:
                target[:len(source)].copy_(torch.from_numpy(np.array(source)))
        self.frames_written, self.stored = (int(x) for x in arrays["counters"])


def check_memory_fits(needed: int, device: torch.device) -> None:
    """Refuse, before allocating, a replay memory the device cannot hold."""
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], "free GPU memory"
    else:
        free, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available RAM"
        try:  # Linux counts reclaimable page cache as available; the figure above does not
            with open("/proc/meminfo") as f:
                free = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            pass
    if needed > 0.9 * free:
        raise UserError(f"the replay memory needs {needed / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of "
                        f"{where} is left; lower --memory")


# ---------------------------------------------------------------------------------------------------
# Network: the tutorial's Dueling DQN. Parameter names match its state_dict, so .pth files load both ways.
# ---------------------------------------------------------------------------------------------------
class DuelingNetwork(nn.Module):
    """Dueling DQN (Wang et al., 2016): Q(s, a) = V(s) + A(s, a) - mean_a A(s, a)."""

    def __init__(self, frames: int, n_actions: int):
        super().__init__()
        self.conv1 = nn.Conv2d(frames, 32, 8, stride=4)
        self.conv2 = nn.Conv2d(32, 64, 4, stride=2)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=1)
        self.act_fc = nn.Linear(3136, 512)
        self.act_fc2 = nn.Linear(512, n_actions)
        self.value_fc = nn.Linear(3136, 512)
        self.value_fc2 = nn.Linear(512, 1)
        for m in (self.conv1, self.conv2, self.conv3, self.act_fc, self.act_fc2, self.value_fc, self.value_fc2):
            nn.init.kaiming_normal_(m.weight)  # biases keep PyTorch's default, as in the tutorial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, frames, 84, 84) floats in [0, 1]."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x)).flatten(1)
        advantage = self.act_fc2(F.relu(self.act_fc(x)))
        value = self.value_fc2(F.relu(self.value_fc(x)))
        return value + advantage - advantage.mean(dim=1, keepdim=True)


def as_input(stacks: torch.Tensor) -> torch.Tensor:
    """uint8 stacks to the network's input: floats in [0, 1], channels-last (faster convolutions on CPU)."""
    return stacks.contiguous(memory_format=torch.channels_last).float().div_(255.0)


def load_network(path: str, device: torch.device) -> DuelingNetwork:
    """A network from a .pth state_dict (ours or the tutorial's, saved on any device), with one-line errors."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path} is a folder; pass one of its .pth snapshots (best.pth, <episode>.pth)")
    if not p.is_file():
        raise UserError(f"no such checkpoint file: {path}")
    try:
        state = torch.load(p, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for files that are not checkpoints
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "conv1.weight" not in state or "act_fc2.weight" not in state:
        raise UserError(f"{path} does not hold a Dueling DQN state_dict (conv1 ... value_fc2)")
    frames, n_actions = state["conv1.weight"].shape[1], state["act_fc2.weight"].shape[0]
    net = DuelingNetwork(frames, n_actions).to(device)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{path} holds a network of another architecture: {' '.join(first[1:2] or first)}") from None
    return net.eval()


# ---------------------------------------------------------------------------------------------------
# Exploration: epsilon-greedy; the schedule is the tutorial's exponential decay, or linear (--recipe fast).
# ---------------------------------------------------------------------------------------------------
def epsilon(step: int, a: Args) -> float:
    if a.eps_schedule == "linear":
        return max(a.eps_end, a.eps_start - (a.eps_start - a.eps_end) * step / a.eps_decay)
    return a.eps_end + (a.eps_start - a.eps_end) * math.exp(-step / a.eps_decay)


def choose_actions(policy: nn.Module, stack: FrameStack, eps: float, n_actions: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Epsilon-greedy actions for every game of `stack`; one forward pass, only for the games that need it."""
    n = len(stack)
    explore = rng.random(n) < eps
    actions = rng.integers(n_actions, size=n)
    greedy = np.flatnonzero(~explore)
    if len(greedy):
        stacks = stack.frames  # put in order only when a forward pass needs them
        with torch.no_grad():
            q = policy(as_input(stacks[torch.from_numpy(greedy).to(stacks.device)]))
        actions[greedy] = q.argmax(1).cpu().numpy()
    return actions


# ---------------------------------------------------------------------------------------------------
# Learning step: one gradient update of the policy network on a uniform batch.
# ---------------------------------------------------------------------------------------------------
def td_update(policy: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer, batch, gamma: float,
              n_step: int = 1, double: bool = False):
    """Q-learning target r + gamma^n * max_a Q_target(s', a), 0 past a lost life (Mnih et al., 2015), or with
    `double` Q_target(s', argmax_a Q_policy(s', a)) (van Hasselt et al., 2016); Huber loss.
    Returns the loss and the mean Q of the batch, as device tensors (no host round trip)."""
    states, actions, rewards, next_states, has_next = batch
    q = policy(as_input(states)).gather(1, actions.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        next_input = as_input(next_states)
        next_all = target(next_input)
        if double:
            next_q = next_all.gather(1, policy(next_input).argmax(1, keepdim=True)).squeeze(1)
        else:
            next_q = next_all.max(1).values
        targets = rewards + gamma ** n_step * next_q * has_next
    loss = F.smooth_l1_loss(q, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_value_(policy.parameters(), 1000)  # the tutorial's bound
    optimizer.step()
    return loss.detach(), q.detach().mean()


@torch.no_grad()
def soft_update(target: nn.Module, policy: nn.Module, tau: float) -> None:
    for t, p in zip(target.parameters(), policy.parameters()):
        t.lerp_(p, tau)


# ---------------------------------------------------------------------------------------------------
# Evaluation and logging: greedy-ish games on their own environment, metrics.csv, TensorBoard, curve.png.
# ---------------------------------------------------------------------------------------------------
WALL_CLEARED = 432  # Breakout's first wall is 108 bricks; a game score of 432 means all of them are gone


def draw_frame(rgb: np.ndarray, score: Optional[float], scale: int = 3) -> np.ndarray:
    """An RGB game frame upscaled (nearest neighbour) with the score burned in: for videos and play's window."""
    h, w = rgb.shape[:2]
    big = cv2.resize(rgb, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    if score is not None:
        cv2.putText(big, f"{score:.0f}", (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2)
    return big


class VideoWriter:
    """H.264 MP4 (or GIF when the name ends in .gif) from RGB frames, upscaled, with the score burned in."""

    def __init__(self, path: str, fps: float = 60 / 4, scale: int = 3):
        import av
        self.path, self.scale = Path(path), scale
        self.path.parent.mkdir(parents=True, exist_ok=True)
        open(self.path, "ab").close()  # PyAV opens the file only at the first frame: fail here instead
        self.container = av.open(str(self.path), mode="w")
        gif = self.path.suffix.lower() == ".gif"
        self.stream = self.container.add_stream("gif" if gif else "libx264", rate=round(fps))
        self.stream.pix_fmt = "rgb8" if gif else "yuv420p"
        self.frames = 0

    def add(self, rgb: np.ndarray, score: Optional[float] = None) -> None:
        import av
        big = draw_frame(rgb, score, self.scale)
        if self.frames == 0:
            self.stream.width, self.stream.height = big.shape[1] // 2 * 2, big.shape[0] // 2 * 2
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(big[:self.stream.height, :self.stream.width]),
                                           format="rgb24")
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


@torch.no_grad()
def evaluate(policy: nn.Module, env_id: str, games: int, eps: float, depth: int, device: torch.device,
             seed: int, video: Optional[str] = None) -> dict:
    """Play `games` whole games (forced FIRE each life, epsilon `eps`, no erasing); not part of training.
    With `video`, the best game is written there."""
    env = make_games(env_id, games, seed, rgb=True)
    fire = fire_action(env.actions)
    rng = np.random.default_rng(seed)
    rgb, lives = env.reset()
    stack = FrameStack(games, depth, device)
    stack.push(torch.from_numpy(preprocess_all(rgb, None)).to(device), np.ones(games, bool))
    need_fire, finished = np.ones(games, bool), np.zeros(games, bool)
    scores, lengths = np.zeros(games), np.zeros(games, np.int64)
    tmp = Path(video).with_name(f".{Path(video).name}-games") if video else None
    writers = [VideoWriter(tmp / f"{i}.mp4") for i in range(games)] if tmp else []
    for w, f in zip(writers, rgb):
        w.add(f, 0)
    while not finished.all():
        actions = choose_actions(policy, stack, eps, len(env.actions), rng)
        if fire is not None:
            actions[need_fire] = fire
        rgb, reward, terminated, truncated, new_lives = env.step(actions)
        playing = ~finished
        scores += reward * playing
        lengths += playing
        ended = terminated | truncated
        for i in np.flatnonzero(playing & ~ended) if writers else ():
            writers[i].add(rgb[i], scores[i])
        need_fire = ended | (new_lives < lives)
        finished |= ended
        lives = new_lives
        stack.push(torch.from_numpy(preprocess_all(rgb, None)).to(device), ended)
    env.close()
    if writers:
        for w in writers:
            w.close()
        best = int(np.argmax(scores))
        os.replace(tmp / f"{best}.mp4", video)
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(scores=scores.tolist(), lengths=lengths.tolist(), mean=float(scores.mean()),
                max=float(scores.max()), cleared=int((scores >= WALL_CLEARED).sum()))


METRIC_COLUMNS = ["kind", "step", "seconds", "episode", "score", "lives_lost", "epsilon", "loss", "mean_q",
                  "steps_per_s", "replay_fill"]


class RunLog:
    """metrics.csv (one row per finished game and per evaluation) and the same scalars for TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: Optional[int]):
        self.path = run_dir / "metrics.csv"
        if resume_step is not None and self.path.exists():
            # Rows written after the checkpoint belong to work that is about to be done again.
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            write_atomically(self.path, lambda f: self._write_rows(f, rows), text=True)
        elif resume_step is None:
            write_atomically(self.path, lambda f: self._write_rows(f, []), text=True)
        self.file = open(self.path, "a", newline="")
        self.csv = csv.DictWriter(self.file, METRIC_COLUMNS)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step, flush_secs=10)
        except ImportError:
            print("note: the tensorboard package is not installed; metrics go to metrics.csv only")
            self.tb = None

    @staticmethod
    def _write_rows(f, rows):
        w = csv.DictWriter(f, METRIC_COLUMNS)
        w.writeheader()
        w.writerows(rows)

    def row(self, **values) -> None:
        self.csv.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()})
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if k not in ("kind", "step") and v is not None and v != "":
                    self.tb.add_scalar(f"{values['kind']}/{k}", v, values["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def windowed_mean(x: np.ndarray, window: int) -> np.ndarray:
    c = np.cumsum(np.insert(np.asarray(x, float), 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def plot_curve(path: Path, history: dict, env_id: str) -> None:
    """curve.png: scores per game and per life (windowed means), evaluations, wall mark; loss and Q below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    games, lives, evals, learn = (np.asarray(history[k], float).reshape(-1, w) for k, w in
                                  (("games", 3), ("lives", 3), ("evals", 5), ("learning", 3)))
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                        gridspec_kw=dict(height_ratios=[3, 1, 1]))
    if len(games):
        x = games[:, 0] / 1e6
        top.plot(x, games[:, 2], ".", color="0.8", ms=2, label="game score")
        top.plot(x, windowed_mean(games[:, 2], 100), color="C0", lw=2, label="game score, mean of 100 games")
        top.plot(x, np.maximum.accumulate(games[:, 2]), color="C2", lw=1, ls="--", label="best game so far")
    if len(lives):
        top.plot(lives[:, 0] / 1e6, lives[:, 2], color="C1", lw=1.5, label="life score, mean per plot window")
    if len(evals):
        top.plot(evals[:, 0] / 1e6, evals[:, 2], "o-", color="C3", ms=4, label="evaluation mean")
    if WALL_CLEARED <= (games[:, 2].max() if len(games) else 0):
        first = games[np.argmax(games[:, 2] >= WALL_CLEARED), 0] / 1e6
        top.axvline(first, color="k", ls=":", lw=1)
        top.annotate(" wall cleared", (first, WALL_CLEARED), fontsize=9)
    top.set_ylabel("score (points)")
    top.set_title(f"{env_id}: training progress")
    if top.get_legend_handles_labels()[0]:
        top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    if len(learn):
        mid.plot(learn[:, 0] / 1e6, learn[:, 1], color="C4")
        low.plot(learn[:, 0] / 1e6, learn[:, 2], color="C5")
    mid.set_ylabel("Huber loss")
    low.set_ylabel("mean Q")
    low.set_xlabel("agent steps (millions)")
    for ax in (mid, low):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Checkpoints. Snapshots (<episode>.pth) are the target network's state_dict, as the tutorial saved them.
# Full checkpoints (resume/<step>/) hold everything a run needs to go on: tensors via torch.save (read
# back with weights_only=True), arrays as .npy, the rest as JSON, and manifest.json, written last, with
# each file's size and SHA-256. Every file goes to a temporary name first and is renamed when complete.
# ---------------------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write, text: bool = False) -> None:
    """Write via `write(file)` to a temporary file beside `path`, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w" if text else "wb", **({"newline": ""} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_snapshot(net: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_atomically(path, lambda f: torch.save(state, f))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class DamagedCheckpoint(Exception):
    pass


def save_checkpoint(root: Path, name: str, tensors: dict, arrays: dict, state: dict, keep: int = 2) -> Path:
    """Write resume/<name>/ completely or not at all; keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save(tensors, tmp / "model.pt")
        for key, value in arrays.items():
            np.save(tmp / f"{key}.npy", value, allow_pickle=False)
        (tmp / "state.json").write_text(json.dumps(state))
        manifest = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            manifest[f.name] = dict(bytes=f.stat().st_size, sha256=sha256(f))
        write_atomically(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1)), text=True)
        fsync_dir(tmp)
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in root.iterdir() if not p.name.startswith("."))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path):
    """(tensors, arrays, state) of a full checkpoint, after checking every file against its manifest."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        raise DamagedCheckpoint("no readable manifest.json") from None
    for name, meta in manifest.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            raise DamagedCheckpoint(f"{name} is missing or truncated")
        if sha256(f) != meta["sha256"]:
            raise DamagedCheckpoint(f"{name} does not match its checksum")
    tensors = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    arrays = {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in folder.glob("*.npy")}
    return tensors, arrays, json.loads((folder / "state.json").read_text())


def latest_checkpoint(run_dir: Path):
    """The newest full checkpoint that passes its checks, reporting each damaged one in one line."""
    root = run_dir / "resume"
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True) \
        if root.is_dir() else []
    for folder in folders:
        try:
            return folder, load_checkpoint(folder)
        except DamagedCheckpoint as e:
            print(f"warning: checkpoint {folder} is damaged ({e}); trying the one before it", file=sys.stderr)
    raise UserError(f"no usable checkpoint in {root}; start a new run without --resume")


def rng_state() -> tuple[dict, dict]:
    """Random states of Python, NumPy's global generator, torch and CUDA: (tensors, JSON-able)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict, state: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


class StopRequest:
    """First Ctrl-C or SIGTERM: finish the step, save, exit 0. A second Ctrl-C interrupts at once (the
    previous checkpoint stays intact because a checkpoint only replaces it when complete)."""

    def __init__(self):
        self.signal: Optional[str] = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        """Give Ctrl-C back to whoever had it (a notebook calling train(), say)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


# ---------------------------------------------------------------------------------------------------
# The run: a new one, or the one a checkpoint continues.
# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[Args, set]:
    """The arguments (the recipe's values where no flag was given), and the names of the flags given."""
    parsed = vars(build_parser().parse_args(argv))
    given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    parsed.update({k: v for k, v in RECIPES[parsed["recipe"]].items() if k not in given})
    return Args(**parsed), given


def prepare_run(args: Args, given: set):
    """(args, run folder, checkpoint or None). On --resume the run's own recipe comes back from config.json;
    only flags in RUN_FLAGS may change it."""
    if not args.resume:
        run_dir = Path(args.checkpoints)
        if (run_dir / "config.json").exists():
            raise UserError(f"{run_dir}/ already holds a run: add --resume to continue it, or pass "
                            f"--checkpoints NEW_FOLDER to start another")
        if args.seed is None:
            args.seed = random.SystemRandom().randrange(2**31)
        return args, run_dir, None
    path = Path(args.checkpoints if args.resume == "latest" else args.resume)
    if (path / "manifest.json").exists():  # one checkpoint folder: run/resume/<step>
        run_dir = path.parent.parent
        try:
            checkpoint = (path, load_checkpoint(path))
        except DamagedCheckpoint as e:
            raise UserError(f"checkpoint {path} is damaged ({e})") from None
    else:
        run_dir = path
        if not (run_dir / "config.json").exists():
            raise UserError(f"{run_dir}/ holds no run to resume (no config.json)")
        checkpoint = latest_checkpoint(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())["args"]
    changed = sorted(k for k in given - RUN_FLAGS if getattr(args, k) != saved.get(k))
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} (run: {saved.get(k)}, given: {getattr(args, k)})" for k in changed)
        raise UserError(f"--resume continues the run's own recipe, and these flags differ: {diffs}; "
                        f"start a new run in another --checkpoints folder to change them")
    merged = {**saved, **{k: getattr(args, k) for k in given & RUN_FLAGS}}
    merged.update(resume=args.resume, checkpoints=str(run_dir))
    return Args(**merged), run_dir, checkpoint


def describe(args: Args, device: torch.device, replay_bytes: int) -> str:
    rows = [f"{k:>20} = {v}" for k, v in dataclasses.asdict(args).items()]
    return "\n".join(["recipe and run:"] + rows + [
        f"{'device':>20} = {device}",
        f"{'replay memory':>20} = {replay_bytes / 2**30:.2f} GiB on {device} "
        f"({replay_bytes / args.memory / 1024:.1f} KB per stored transition)"])


# ---------------------------------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------------------------------
def train(args: Args, given: set) -> dict:
    from tqdm import tqdm

    check_args(args)
    args, run_dir, checkpoint = prepare_run(args, given)
    device = pick_device(args.device)
    # Acting and bookkeeping run small tensor ops between emulator steps; on CPU more torch threads there
    # only fight ale-py's threads for the cores (3x slower on 2 cores), so only learning uses them all.
    learn_threads = args.threads or os.cpu_count() or 1
    act_threads = 1 if device.type == "cpu" else learn_threads
    torch.set_num_threads(act_threads)
    learn_start = args.memory if args.learn_start is None else args.learn_start
    block = args.frames if args.block is None else args.block
    n = args.envs

    games = make_games(args.env, n, args.seed)
    n_actions, fire = len(games.actions), fire_action(games.actions)
    replay_bytes = ReplayMemory.bytes_needed(args.memory, n, args.frames, block, args.n_step)
    check_memory_fits(replay_bytes, device)
    print(describe(args, device, replay_bytes), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in (run_dir / "resume").glob(".tmp-*"):  # a save that was killed part-way
        shutil.rmtree(leftover, ignore_errors=True)
    if checkpoint is None:
        config = dict(env=args.env, frames=args.frames, n_actions=n_actions, args=dataclasses.asdict(args))
        write_atomically(run_dir / "config.json", lambda f: f.write(json.dumps(config, indent=1)), text=True)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)            # exploration and random erasing
    erase_rng = None if args.no_random_erasing else rng
    sampler = torch.Generator(device=device)          # replay sampling, on the device
    sampler.manual_seed(args.seed)
    policy = DuelingNetwork(args.frames, n_actions).to(device, memory_format=torch.channels_last)
    target = DuelingNetwork(args.frames, n_actions).to(device, memory_format=torch.channels_last)
    target.load_state_dict(policy.state_dict())
    # The fused kernel is the same AdamW, in one pass over the parameters (3.5x faster step on CPU).
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, amsgrad=True,
                                  fused=device.type in ("cpu", "cuda") or None)
    replay = ReplayMemory(args.memory, n, args.frames, block, device, args.n_step)
    stack = FrameStack(n, args.frames, device)
    learning = torch.zeros(3, device=device)         # sums of loss, mean Q and updates since the last game row

    # Counters and per-game state; everything here goes into a full checkpoint.
    c = dict(steps=0, episodes=0, games=0, updates=0, seconds=0.0, evals=0, life_sum=0.0, life_count=0,
             next_save=args.save_every, next_plot=args.plot_every, next_eval=args.eval_every or None,
             best_eval=None, first_clear=None)
    history = dict(games=[], lives=[], evals=[], learning=[])
    widths = dict(games=3, lives=3, evals=5, learning=3)

    def fresh_game_state() -> dict:
        return dict(lives=np.zeros(n, np.int64), need_fire=np.ones(n, bool), env_steps=np.zeros(n, np.int64),
                    block_open=np.zeros(n, bool), block_slot=np.zeros(n, np.int64),
                    block_action=np.zeros(n, np.int64), block_has_next=np.zeros(n, bool),
                    block_reward=np.zeros(n, np.float32), game_score=np.zeros(n), life_score=np.zeros(n),
                    lives_lost=np.zeros(n, np.int64), pend_count=np.zeros(n, np.int64),
                    pend_slot=np.zeros((n, args.n_step), np.int64), pend_action=np.zeros((n, args.n_step), np.int64),
                    pend_return=np.zeros((n, args.n_step)))

    def start_games(env_steps: Optional[np.ndarray] = None) -> dict:
        screens, lives = games.reset()
        frames = torch.from_numpy(preprocess_all(screens, erase_rng, games.screen_lut)).to(device)
        replay.add_frames(frames, torch.ones(n, dtype=torch.bool, device=device))
        stack.push(frames, np.ones(n, bool))
        state = fresh_game_state()
        state["lives"] = lives
        if env_steps is not None:
            state["env_steps"] = env_steps
        return state

    if checkpoint is None:
        g = start_games()
    else:
        folder, (tensors, arrays, state) = checkpoint
        policy.load_state_dict(tensors["policy"])
        target.load_state_dict(tensors["target"])
        optimizer.load_state_dict(tensors["optimizer"])
        try:
            sampler.set_state(tensors["sampler"])
        except RuntimeError:  # the run moved between CPU and GPU, whose generators differ
            print("note: replay sampling is reseeded on the new device", flush=True)
        learning = tensors["learning"].to(device)
        replay.load_arrays({k[7:]: v for k, v in arrays.items() if k.startswith("replay_")})
        set_rng_state(tensors["rng"], state["rng"])
        rng.bit_generator.state = state["numpy"]
        c.update(state["counters"])
        for flag, key, unit in (("save_every", "next_save", "episodes"), ("plot_every", "next_plot", "episodes"),
                                ("eval_every", "next_eval", "steps")):
            if flag in given:  # a new interval given on resume counts from here
                every = getattr(args, flag)
                c[key] = (c[unit] // every + 1) * every if every else None
        history = {k: arrays[f"history_{k}"].reshape(-1, w).tolist() for k, w in widths.items()}
        if games.can_save_state and "emulator" in arrays and "held" in state.get("games", {}):
            games.set_state(arrays["emulator"], state["games"])
            g = {k: np.array(arrays[f"game_{k}"]) for k in fresh_game_state()}
            stack.frames = tensors["stack"].to(device)
        else:
            why = ("this checkpoint's game was saved by an older version, without its held sticky action"
                   if games.can_save_state else "ale-py's vector environment cannot save its games")
            print(f"note: {why}, so the games start afresh; the transitions being built when the checkpoint was "
                  "taken are dropped", flush=True)
            g = start_games(np.array(arrays["game_env_steps"]))
        print(f"resumed from {folder}: episode {c['episodes']}, agent step {c['steps']}", flush=True)

    log = RunLog(run_dir, c["steps"] if checkpoint else None)
    if log.tb is not None and checkpoint is None:
        log.tb.add_text("hyperparameters", "|flag|value|\n|-|-|\n" +
                        "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))

    session_start, seconds_before = time.time(), c["seconds"]
    elapsed = lambda: seconds_before + time.time() - session_start

    def save_full_checkpoint() -> None:
        started = time.time()
        rng_tensors, rng_json = rng_state()
        tensors = dict(policy=policy.state_dict(), target=target.state_dict(), optimizer=optimizer.state_dict(),
                       sampler=sampler.get_state(), learning=learning.cpu(), stack=stack.frames.cpu(),
                       rng=rng_tensors)
        arrays = {f"replay_{k}": v for k, v in replay.arrays().items()}
        arrays.update({f"game_{k}": v for k, v in g.items()})
        arrays.update({f"history_{k}": np.asarray(v, float).reshape(-1, widths[k]) for k, v in history.items()})
        state = dict(counters={**c, "seconds": elapsed()}, numpy=rng.bit_generator.state, rng=rng_json)
        if games.can_save_state:
            arrays["emulator"], state["games"] = games.get_state()
        try:
            folder = save_checkpoint(run_dir / "resume", f"{c['steps']:012d}", tensors, arrays, state)
        except OSError as e:
            tqdm.write(f"warning: could not write a checkpoint ({e.strerror or e}); the previous one is kept "
                       f"and training goes on")
            return
        size = sum(f.stat().st_size for f in folder.iterdir())
        tqdm.write(f"checkpoint: {folder} ({size / 2**30:.2f} GiB in {time.time() - started:.1f} s)")

    def record_game(i: int, sps: float) -> None:
        c["games"] += 1
        stats = learning.tolist()
        loss = q = None
        if stats[2] > 0:
            loss, q = stats[0] / stats[2], stats[1] / stats[2]
            history["learning"].append([c["steps"], loss, q])
            learning.zero_()
        history["games"].append([c["steps"], elapsed(), float(g["game_score"][i])])
        log.row(kind="game", step=c["steps"], seconds=elapsed(), episode=c["episodes"],
                score=float(g["game_score"][i]), lives_lost=int(g["lives_lost"][i]), epsilon=epsilon(c["steps"], args),
                loss=loss, mean_q=q, steps_per_s=sps, replay_fill=len(replay) / args.memory)
        g["game_score"][i], g["lives_lost"][i] = 0, 0

    def run_evaluation() -> None:
        c["evals"] += 1
        video = str(run_dir / "videos" / f"eval-{c['steps']:012d}.mp4") if args.capture_video else None
        result = evaluate(policy, args.env, args.eval_games, args.eval_eps, args.frames, device,
                          args.seed + 7919 * c["evals"], video)
        history["evals"].append([c["steps"], elapsed(), result["mean"], result["max"], result["cleared"]])
        log.row(kind="eval", step=c["steps"], seconds=elapsed(), episode=c["episodes"], score=result["mean"],
                epsilon=args.eval_eps)
        if log.tb is not None:
            log.tb.add_scalar("eval/max", result["max"], c["steps"])
            log.tb.add_scalar("eval/games_clearing_the_wall", result["cleared"], c["steps"])
        msg = (f"evaluation at step {c['steps']}: mean {result['mean']:.1f}, max {result['max']:.0f}, "
               f"{result['cleared']}/{args.eval_games} cleared the wall")
        if c["best_eval"] is None or result["mean"] > c["best_eval"]:
            c["best_eval"] = result["mean"]
            save_snapshot(policy, run_dir / "best.pth")
            msg += "; best so far, saved best.pth"
        tqdm.write(msg)
        if result["cleared"] and c["first_clear"] is None:
            c["first_clear"] = [c["steps"], elapsed()]
            tqdm.write(f"WALL CLEARED for the first time: agent step {c['steps']}, "
                       f"{elapsed() / 60:.1f} minutes into the run")
            if log.tb is not None:
                log.tb.add_scalar("eval/first_wall_clear_minutes", elapsed() / 60, c["steps"])

    def budget_left() -> bool:
        return (c["episodes"] < args.episodes and (args.steps is None or c["steps"] < args.steps)
                and (args.minutes is None or elapsed() < 60 * args.minutes))

    stop = StopRequest()
    try:
        # The bar follows the budget that was given: minutes (in seconds), else agent steps, else episodes.
        if args.minutes is not None:
            total, unit, progress = round(60 * args.minutes), "s", lambda: min(int(elapsed()), total)
        elif args.steps is not None:
            total, unit, progress = args.steps, "step", lambda: min(c["steps"], total)
        else:
            total, unit, progress = args.episodes, "ep", lambda: min(c["episodes"], total)
        bar = tqdm(total=total, initial=progress(), unit=unit, desc="training", dynamic_ncols=True, mininterval=1.0)
        last_checkpoint = time.time()
        rate_time, rate_steps, sps = time.time(), c["steps"], 0.0
        while budget_left() and stop.signal is None:
            # ALGO LOGIC: act in every game at once, one forward pass.
            actions = choose_actions(policy, stack, epsilon(c["steps"], args), n_actions, rng)
            if fire is not None:
                actions[g["need_fire"]] = fire  # serve the ball at the start of every life
            state_slot = (replay.frames_written - 1) % replay.slots
            screens, reward, terminated, truncated, lives = games.step(actions)
            c["steps"] += n
            g["env_steps"] += 1
            game_over = terminated | truncated
            life_lost = terminated | ((lives < g["lives"]) & ~game_over)
            done = life_lost | game_over  # the tutorial's episode: one life
            g["game_score"] += reward
            g["life_score"] += reward
            g["lives_lost"] += life_lost
            learn_reward = reward if args.no_reward_clipping else np.clip(reward, -1, 1)
            learn_reward = np.where(life_lost, -1.0, learn_reward).astype(np.float32)

            frames = torch.from_numpy(preprocess_all(screens, erase_rng, games.screen_lut)).to(device, non_blocking=True)
            new_game = torch.from_numpy(game_over).to(device, non_blocking=True)
            replay.add_frames(frames, new_game)
            stack.push(frames, game_over)

            stored_before = replay.stored
            if args.n_step == 1:
                # The tutorial's transition rule: a block of up to `block` agent steps makes one transition with
                # the first step's state and action, the state right after that step (none if the life ended
                # there), and the sum of the block's rewards. A block ends every `block` steps of its game, or
                # when the life ends.
                opening = ~g["block_open"]
                g["block_slot"][opening] = state_slot
                g["block_action"][opening] = actions[opening]
                g["block_has_next"][opening] = ~done[opening]
                g["block_reward"][opening] = 0
                g["block_open"][:] = True
                g["block_reward"] += learn_reward
                closing = np.flatnonzero((g["env_steps"] % block == 0) | done)
                if len(closing):
                    replay.add(closing, g["block_slot"][closing], g["block_action"][closing],
                               g["block_reward"][closing], g["block_has_next"][closing])
                    g["block_open"][closing] = False
            else:
                # n-step returns: each game keeps its last n (state slot, action, discounted return); the oldest
                # becomes a transition once n rewards are in, and all of them (with no next state) when the
                # life ends.
                k, depth = g["pend_count"], args.n_step
                g["pend_slot"][np.arange(n), k] = state_slot
                g["pend_action"][np.arange(n), k] = actions
                g["pend_return"][np.arange(n), k] = 0
                age = k[:, None] - np.arange(depth)[None, :]
                g["pend_return"] += np.where(age >= 0, args.gamma ** np.maximum(age, 0), 0) * learn_reward[:, None]
                g["pend_count"] = k = k + 1
                ready = np.flatnonzero((k == depth) & ~done)
                ended = [(i, j) for i in np.flatnonzero(done) for j in range(k[i])]
                rows = [(i, 0) for i in ready] + ended
                if rows:
                    gi, gj = np.array(rows).T
                    replay.add(gi, g["pend_slot"][gi, gj], g["pend_action"][gi, gj], g["pend_return"][gi, gj],
                               np.arange(len(gi)) < len(ready))
                for key in ("pend_slot", "pend_action", "pend_return"):
                    g[key][ready] = np.roll(g[key][ready], -1, axis=1)
                g["pend_count"][ready] -= 1
                g["pend_count"][done] = 0
            learned = False
            for count in range(stored_before + 1, replay.stored + 1):
                if count % args.update_every == 0 and count > learn_start:
                    if not learned:
                        torch.set_num_threads(learn_threads)
                        learned = True
                    loss, q = td_update(policy, target, optimizer, replay.sample(args.batch_size, sampler), args.gamma,
                                        args.n_step, args.double)
                    learning += torch.stack([loss, q, torch.ones((), device=device)])
                    c["updates"] += 1
                if count % args.target_every == 0:
                    soft_update(target, policy, args.tau)
            if learned:
                torch.set_num_threads(act_threads)
            g["need_fire"] = done
            g["lives"] = lives

            # TRY NOT TO MODIFY: bookkeeping, logging and saving.
            now = time.time()
            if now - rate_time >= 2.0:
                sps = (c["steps"] - rate_steps) / (now - rate_time)
                rate_time, rate_steps = now, c["steps"]
            for i in np.flatnonzero(done):
                c["episodes"] += 1
                c["life_sum"] += g["life_score"][i]
                c["life_count"] += 1
                g["life_score"][i] = 0
            for i in np.flatnonzero(game_over):
                record_game(i, sps)
            bar.update(progress() - bar.n)
            if done.any():
                recent = [row[2] for row in history["games"][-100:]]
                bar.set_postfix(score=f"{np.mean(recent):.1f}" if recent else "-",
                                eps=f"{epsilon(c['steps'], args):.3f}", sps=f"{sps:.0f}", refresh=False)
            while c["episodes"] >= c["next_save"]:
                save_snapshot(target, run_dir / f"{c['next_save']}.pth")
                c["next_save"] += args.save_every
            if c["episodes"] >= c["next_plot"]:
                history["lives"].append([c["steps"], c["episodes"], c["life_sum"] / max(1, c["life_count"])])
                c["life_sum"], c["life_count"] = 0.0, 0
                plot_curve(run_dir / "curve.png", history, args.env)
                while c["episodes"] >= c["next_plot"]:
                    c["next_plot"] += args.plot_every
            if c["next_eval"] is not None and c["steps"] >= c["next_eval"]:
                run_evaluation()
                while c["steps"] >= c["next_eval"]:
                    c["next_eval"] += args.eval_every
            if now - last_checkpoint >= 60 * args.checkpoint_minutes:
                save_full_checkpoint()
                last_checkpoint = time.time()
        bar.close()
        summary = dict(c, session_seconds=time.time() - session_start, replay_bytes=replay_bytes, run_dir=str(run_dir))

        if not budget_left():
            save_snapshot(target, run_dir / f"{c['episodes']}.pth")
            plot_curve(run_dir / "curve.png", history, args.env)
        save_full_checkpoint()
        log.close()
        games.close()
        if stop.signal is not None:
            print(f"stopped by {stop.signal} at episode {c['episodes']}, agent step {c['steps']}; continue with:\n"
                  f"  python train_breakout.py --resume --checkpoints {run_dir}")
        else:
            print(f"done: {c['episodes']} episodes, {c['steps']} agent steps, {c['updates']} updates in "
                  f"{elapsed() / 60:.1f} minutes; snapshot {run_dir / (str(c['episodes']) + '.pth')}")
    finally:
        stop.restore()
    return summary


def run_command(body, interrupted: str) -> int:
    """Exit status of a command (this file's and play.py's): 0 done, 2 bad input (one line on stderr, no
    traceback), 130 interrupted (the line `interrupted` on stderr)."""
    try:
        body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    return run_command(lambda: train(*parse_args(argv)), "interrupted; the last complete checkpoint is kept")


if __name__ == "__main__":
    sys.exit(main())
