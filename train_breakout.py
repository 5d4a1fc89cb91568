#!/usr/bin/env python
"""Train the Dueling DQN of the Breakout tutorial: the same agent, many times faster, a fraction of the
memory, and a run that survives being stopped.

    python train_breakout.py --episodes 600000 --memory 100000   # train (Ctrl-C saves; --resume goes on)
    python play.py checkpoints/600000.pth                         # watch the agent

The file reads top to bottom: arguments, environment, preprocessing, replay memory, transition rules,
network, exploration, learning step, evaluation and logging, checkpoint files, the run's state (declared
once in `Run`: full checkpoints save and restore its fields), work beside training (playing evaluations,
drawing the curve, writing checkpoints), and the training loop, a handful of named steps over that state.
README.md explains the recipe.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import queue
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import cv2
import numpy as np
import psutil
import torch
import torch.nn as nn
import torch.nn.functional as F
import zstandard
from tqdm import tqdm


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2, no traceback."""


class CannotRestore(Exception):
    """Games that a checkpoint cannot bring back: they start afresh, and the message says why."""


# ---- Arguments: every field is a flag; its help text and default appear in --help.
def opt(default, help: str, bounds: Optional[str] = None, new_on_resume: bool = False, **argparse_kw):
    """A flag: its default, its --help line, the interval its value must lie in (`bounds`, checked by
    check_args), and whether --resume accepts a new value for it (`new_on_resume`: the flags that only say
    where, how long or how visibly a run goes)."""
    return field(default=default, metadata=dict(help=help, bounds=bounds, new_on_resume=new_on_resume,
                                                argparse=argparse_kw))


POSITIVE, NOT_NEGATIVE, UNIT = "(0, inf)", "[0, inf)", "[0, 1]"
EVAL_BESIDE_CORES = 8  # --eval-beside auto: the cores from which an evaluation plays beside training


@dataclass
class Args:
    # How long, and where things go
    episodes: int = opt(5_000_000, "lives to train for (the tutorial's episode ends when a life is lost)",
                        POSITIVE, new_on_resume=True)
    steps: Optional[int] = opt(None, "also stop after this many agent steps", POSITIVE, new_on_resume=True)
    minutes: Optional[float] = opt(None, "also stop after this many minutes of training", POSITIVE, new_on_resume=True)
    checkpoints: str = opt("checkpoints", "the run's folder: snapshots, config.json, metrics, full checkpoints",
                           new_on_resume=True)
    resume: Optional[str] = opt(None, "continue the run in --checkpoints, or from the checkpoint folder given",
                                new_on_resume=True, nargs="?", const="latest", metavar="PATH")
    auto_resume: bool = opt(False, "continue the run in --checkpoints if it has a checkpoint, else start it: one "
                                   "command for every start of a Colab cell or a requeued cluster job",
                            new_on_resume=True)
    keep_checkpoints: int = opt(2, "full checkpoints kept on disk, the newest", POSITIVE, new_on_resume=True)
    checkpoint_minutes: float = opt(10.0, "minutes between full checkpoints (Ctrl-C and SIGTERM also save one)",
                                    POSITIVE, new_on_resume=True)
    save_every: int = opt(25_000, "save the target network as <episode>.pth every this many episodes",
                          POSITIVE, new_on_resume=True)
    plot_every: int = opt(2_500, "redraw curve.png every this many episodes", POSITIVE, new_on_resume=True)
    eval_every: int = opt(500_000, "agent steps between evaluations (0: never)", NOT_NEGATIVE, new_on_resume=True)
    eval_games: int = opt(10, "games per evaluation", POSITIVE, new_on_resume=True)
    eval_eps: float = opt(0.01, "epsilon during evaluation", UNIT, new_on_resume=True)
    eval_beside: str = opt("auto", "play evaluations in a process of their own while training goes on (auto: on "
                                   f"with {EVAL_BESIDE_CORES} or more cores; with fewer they would only take the "
                                   "emulator's cores)", new_on_resume=True, choices=["auto", "on", "off"])
    capture_video: bool = opt(False, "save each evaluation's best game to videos/ as MP4", new_on_resume=True)
    # The machine
    env: str = opt("ALE/Breakout-v5", "Gymnasium id of any ALE game")
    envs: int = opt(min(max(16, os.cpu_count() or 1), 64), "games stepped together; 1 steps one gym.make environment",
                    POSITIVE)
    device: str = opt("auto", "where to learn and keep the replay memory", new_on_resume=True,
                      choices=["auto", "cpu", "cuda", "mps"])
    threads: int = opt(0, "CPU threads for torch (0: the number of cores)", NOT_NEGATIVE, new_on_resume=True)
    compile: str = opt("auto", "compile the learning update and acting with torch.compile, replayed as CUDA graphs "
                               "on CUDA (auto: on for CUDA)", new_on_resume=True, choices=["auto", "on", "off"])
    overlap: str = opt("auto", "learn while the games step, acting on weights one step behind (auto: on for CUDA "
                               "with --envs > 1; off: act, step, store, learn in turn)", new_on_resume=True,
                       choices=["auto", "on", "off"])
    seed: Optional[int] = opt(None, "random seed (default: drawn at random and written to config.json)")
    # The recipe: the tutorial's values unless --recipe fast (see RECIPES); explicit flags override either
    recipe: str = opt("tutorial", "starting values of the flags below", choices=["tutorial", "fast"])
    memory: int = opt(100_000, "replay memory capacity in stored transitions", POSITIVE)
    batch_size: int = opt(256, "transitions per gradient update", POSITIVE)
    learn_start: Optional[int] = opt(None, "stored transitions before learning starts (default: --memory)",
                                     NOT_NEGATIVE)
    frames: int = opt(6, "frames per state", POSITIVE)
    block: Optional[int] = opt(None, "agent steps behind one stored transition (default: --frames, the "
                                     "tutorial's rule: its reward is the block's sum, its next state 1 step on)",
                               POSITIVE)
    n_step: int = opt(1, "n-step returns: next state n steps on, reward the discounted n-step sum (needs --block 1)",
                      POSITIVE)
    double: bool = opt(False, "Double DQN targets: the policy network picks the next action, the target rates it")
    lr: float = opt(1e-4, "AdamW learning rate (amsgrad)", POSITIVE)
    gamma: float = opt(0.99, "discount", "(0, 1]")
    tau: float = opt(0.005, "soft target update: target = tau * policy + (1 - tau) * target", "(0, 1]")
    eps_start: float = opt(1.0, "epsilon at step 0", UNIT)
    eps_end: float = opt(0.01, "epsilon the schedule decays to", UNIT)
    eps_decay: float = opt(25_000_000, "agent steps of the epsilon decay (the time constant when exponential)",
                           POSITIVE)
    eps_schedule: str = opt("exponential", "shape of the epsilon decay", choices=["exponential", "linear"])
    update_every: int = opt(4, "stored transitions per gradient update", POSITIVE)
    target_every: int = opt(400, "stored transitions per soft target update", POSITIVE)
    no_random_erasing: bool = opt(False, "do not erase random patches of the brick rows in training")
    no_reward_clipping: bool = opt(False, "learn from raw game rewards instead of rewards clipped to [-1, 1]")

    # The defaults that depend on other flags.
    @property
    def steps_per_transition(self) -> int:
        return self.frames if self.block is None else self.block

    @property
    def transitions_before_learning(self) -> int:
        return self.memory if self.learn_start is None else self.learn_start


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
        kw = dict(help=f.metadata["help"], **f.metadata["argparse"])
        kw["default"] = argparse.SUPPRESS if suppress_defaults else f.default
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", **kw)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type.replace("Optional[", "").rstrip("]")]
            parser.add_argument(flag, type=kind, **kw)
    return parser


def parse_args(argv=None) -> tuple[Args, set]:
    """The arguments (the recipe's values where no flag was given), and the names of the flags given."""
    parsed = vars(build_parser().parse_args(argv))
    given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    parsed.update({k: v for k, v in RECIPES[parsed["recipe"]].items() if k not in given})
    return Args(**parsed), given


def check_args(a: Args) -> None:
    """Refuse impossible values before anything is allocated: each flag against its bounds, then the pairs."""
    for f in dataclasses.fields(Args):
        value, bounds = getattr(a, f.name), f.metadata["bounds"]
        if value is None or bounds is None:
            continue
        low, high = (float(x) for x in bounds[1:-1].split(","))
        if not ((low <= value if bounds[0] == "[" else low < value)
                and (value <= high if bounds[-1] == "]" else value < high)):
            what = {POSITIVE: "must be positive", NOT_NEGATIVE: "must not be negative"}.get(bounds,
                                                                                          f"must lie in {bounds}")
            raise UserError(f"--{f.name.replace('_', '-')} {what}, got {value}")
    if a.n_step > 1 and a.block != 1:
        raise UserError("--n-step above 1 needs --block 1 (one stored transition per agent step)")
    if a.memory < a.batch_size:
        raise UserError(f"--memory ({a.memory}) must be at least --batch-size ({a.batch_size})")


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


# ---- Environment: N games of one ALE id, with the settings Gymnasium registers for that id (for
# ALE/Breakout-v5: frameskip 4, sticky actions 0.25, minimal action set). Frames come back as RGB
# (or, from the vector environment playing Breakout, as the emulator's greyscale);
# a game that ends is reset in the same step, so the frame returned for it is the new game's first.
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

    def __init__(self, env_id: str, n: int, seed: int, rgb: bool = False, threads: Optional[int] = None):
        import ale_py
        s = ale_settings(env_id)
        self.screen_lut = breakout_grey_lut() if s["game"] == "breakout" and not rgb else None
        self.env = ale_py.AtariVectorEnv(
            s["game"], n, frameskip=s["frameskip"], repeat_action_probability=s["repeat_action_probability"],
            max_num_frames_per_episode=s["max_num_frames_per_episode"], img_height=210, img_width=160,
            grayscale=self.screen_lut is not None, stack_num=1, maxpool=False, noop_max=0, reward_clipping=False,
            use_fire_reset=False, episodic_life=False, autoreset_mode="SameStep",
            num_threads=min(n, threads or os.cpu_count() or 1), thread_affinity_offset=0 if threads is None else -1)
        self.actions = list(self.env.ale.get_action_set())
        self.seed = seed

    def reset(self):
        obs, info = self.env.reset(seed=self.seed)
        return obs[:, 0], info["lives"].astype(np.int64)

    def send(self, actions: np.ndarray) -> None:
        """Start a step of every game; the emulator's threads play it while the caller goes on."""
        self.env.send(actions.astype(np.int32))

    def recv(self):
        """Wait for the step `send` started: screens, rewards, terminated, truncated, lives."""
        obs, reward, terminated, truncated, info = self.env.recv()
        return obs[:, 0], reward.astype(np.float32), terminated, truncated, info["lives"].astype(np.int64)

    def step(self, actions: np.ndarray):
        self.send(actions)
        return self.recv()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        raise CannotRestore("ale-py's vector environment cannot save its games")

    def close(self):
        self.env.close()


class OneGame:
    """One game through `gym.make`, as the tutorial ran it, with the sticky actions drawn here.

    Sticky actions: each emulator frame repeats the previous frame's action with probability 0.25 (the id's
    setting). ALE draws them itself and keeps the held action outside its saved state, so a game restored
    from a checkpoint would go on holding a different action. Drawing them here, exactly as ALE does (frame
    by frame, the held action NOOP at the start of a game), lets `state_dict` hold everything, and a run with
    --envs 1 resumes exactly. The sticky draws are then the only randomness in a game, so a new game needs
    no reseeding of the emulator (which reloads the ROM, 0.1 s)."""

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

    def send(self, actions: np.ndarray) -> None:
        self.sent = actions  # one game is stepped by this thread, in recv

    def recv(self):
        return self.step(self.sent)

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

    def state_dict(self) -> dict:
        """The emulator's bytes, the game seeds, the sticky-action draws and the held action."""
        # ALE's own random state is left out: with the sticky draws made here it decides nothing.
        emulator = np.frombuffer(self.ale.cloneState(include_rng=False).serialize(), np.uint8)
        return dict(emulator=emulator, seeds=self.seeds.bit_generator.state,
                    sticky=self.sticky_rng.bit_generator.state, held=self.held.value)

    def load_state_dict(self, state: dict) -> None:
        import ale_py
        if "held" not in state:
            raise CannotRestore("this checkpoint's game was saved by an older version, without its held sticky "
                                "action")
        self.env.reset()  # Gymnasium refuses step() before a reset; the restore below overrides it
        self.ale.restoreState(ale_py.ALEState(np.asarray(state["emulator"]).tobytes()))
        self.seeds.bit_generator.state = state["seeds"]
        self.sticky_rng.bit_generator.state = state["sticky"]
        self.held = ale_py.Action(state["held"])

    def close(self):
        self.env.close()


def make_games(env_id: str, n: int, seed: int, rgb: bool = False, threads: Optional[int] = None):
    """One gym.make game for n == 1, else ale-py's vector environment (RGB frames with `rgb`), stepped by
    `threads` threads (default: one per core, pinned)."""
    return OneGame(env_id, seed) if n == 1 else VectorGames(env_id, n, seed, rgb, threads)


def fire_action(actions: list) -> Optional[int]:
    """Index of FIRE in the game's action set (1 in Breakout), or None for games without it."""
    names = [a.name for a in actions]
    return names.index("FIRE") if "FIRE" in names else None


# ---- Preprocessing: the tutorial's crop, grey and resize, kept as uint8 (the tutorial's float is this / 255).
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


class Staging:
    """Host arrays to the device without waiting for it. On CUDA each copy leaves from pinned memory and is
    queued behind the GPU's work instead of waiting for it to drain; two buffers take turns, and one is
    written again only once its previous copy is done. Elsewhere the array is used (CPU) or copied as it is."""

    def __init__(self, device: torch.device):
        self.device, self.turn = device, 0
        self.buffers = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self.copied = [None, None]  # per buffer, the CUDA event its last copy recorded

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(array).to(self.device)
        array = np.ascontiguousarray(array)
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        if self.buffers[self.turn].numel() < array.nbytes:
            self.buffers[self.turn] = torch.empty(2 * array.nbytes, dtype=torch.uint8, pin_memory=True)
        staged = self.buffers[self.turn][:array.nbytes]
        staged.numpy()[...] = array.view(np.uint8).reshape(-1)
        on_device = staged.to(self.device, non_blocking=True)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()
        self.turn ^= 1
        return on_device.view(torch.from_numpy(array[:0]).dtype).view(array.shape)


class FrameStack:
    """What the agent sees of each game: its `depth` latest frames, newest first (channel 0). A new game
    starts from zeros; a lost life does not clear the stack. Kept as a ring, so a push writes one frame
    per game instead of moving the whole stack."""

    def __init__(self, n: int, depth: int, device: torch.device):
        self.ring = torch.zeros((n, depth, SIZE, SIZE), dtype=torch.uint8, device=device)
        self.newest = 0  # ring[:, newest] is the newest frame, ring[:, newest + 1] the one before, and so on

    def __len__(self) -> int:
        return self.ring.shape[0]

    def push(self, frames: torch.Tensor, new_game) -> None:
        """One frame per game; `new_game` (bool per game) marks the first frame of a game."""
        self.newest = (self.newest - 1) % self.ring.shape[1]
        new_game = torch.as_tensor(new_game, device=self.ring.device)
        self.ring.masked_fill_(new_game.view(-1, 1, 1, 1), 0)
        self.ring[:, self.newest] = frames

    @property
    def frames(self) -> torch.Tensor:
        """(n, depth, 84, 84) uint8, newest first."""
        return self.ring.roll(-self.newest, dims=1) if self.newest else self.ring

    def state_dict(self) -> dict:
        return dict(frames=self.frames)

    def load_state_dict(self, state: dict) -> None:
        self.ring, self.newest = state["frames"].to(self.ring.device), 0


# ---- Replay memory: every frame stored once as uint8 on the training device, transitions as indices.
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
        self.staging = Staging(device)
        self.snapshot: Optional[RingSnapshot] = None  # the frames as a checkpoint being written reads them

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
        if self.snapshot is not None and not self.snapshot.keep_before_overwrite(slot):
            self.snapshot = None  # read whole
        self.frames[slot] = frames
        self.game_start[slot] = game_start
        self.frames_written += 1
        return slot

    def add(self, game: np.ndarray, slot: np.ndarray, action: np.ndarray, reward: np.ndarray,
            has_next: np.ndarray) -> None:
        """Store transitions in the given order (oldest first). They travel to the device in one copy, as
        int64 rows (the rewards' float32 bits among them)."""
        rows = np.stack([game, slot, action, np.asarray(reward, np.float32).view(np.int32), has_next]).astype(np.int64)
        game, slot, action, reward_bits, has_next = self.staging(rows)
        at = (torch.arange(len(rows[0]), device=self.device) + self.stored) % self.capacity
        self.game[at], self.slot[at], self.action[at] = game, slot, action
        self.reward[at] = reward_bits.to(torch.int32).view(torch.float32)
        self.has_next[at] = has_next.bool()
        self.stored += len(rows[0])

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

    TABLES = ("frames", "game_start", "game", "slot", "action", "reward", "has_next")

    def state_dict(self) -> dict:
        """The tables as NumPy arrays (the frames as a RingSnapshot), and the two counters. Only the part
        written so far is kept, so an early checkpoint is small."""
        slots_used, transitions = min(self.frames_written, self.slots), len(self)
        state = {name: getattr(self, name)[:slots_used if name == "game_start" else transitions].cpu().numpy()
                 for name in self.TABLES if name != "frames"}
        self.snapshot = RingSnapshot(self.frames[:slots_used])
        return dict(state, frames=self.snapshot, frames_written=self.frames_written, stored=self.stored)

    def load_state_dict(self, state: dict) -> None:
        for name in self.TABLES:
            target, source = getattr(self, name), state[name]
            if source.shape[1:] != target.shape[1:] or len(source) > len(target):
                raise UserError(f"the checkpoint's replay memory has {name} of shape {source.shape}, which "
                                f"does not fit this run's {tuple(target.shape)}")
            if target.device.type == "cpu":  # straight from the file into the tensor, with no copy between
                if isinstance(source, CompressedArray):
                    source.read_into(target[:len(source)].numpy())
                else:
                    target[:len(source)].numpy()[...] = source
            else:
                target[:len(source)].copy_(torch.from_numpy(np.array(source)))
        self.frames_written, self.stored = int(state["frames_written"]), int(state["stored"])


class RingSnapshot:
    """The replay frames as they were when a checkpoint was taken, read a chunk at a time by the thread that
    writes it while training goes on overwriting the ring: before training overwrites a slot the writer has not
    read yet, the slot's frames are set aside for the writer (one slot per agent step, 113 KB for 16 games,
    where a copy of the whole memory would stop training for seconds). On a GPU the chunks come down one at a
    time, so the host never holds a second copy of the memory either."""

    def __init__(self, frames: torch.Tensor):
        self.frames, self.shape, self.dtype = frames, tuple(frames.shape), np.dtype(np.uint8)
        self.lock = threading.Lock()
        self.read_up_to = 0  # slots below this one have been read
        self.aside: dict = {}  # slot: its frames at the snapshot, for slots overwritten before they were read

    def __len__(self) -> int:
        return self.shape[0]

    def keep_before_overwrite(self, slot: int) -> bool:
        """Training is about to overwrite `slot`: set its frames aside if the writer still needs them. False once
        the writer has read everything (the snapshot can be dropped)."""
        with self.lock:
            if self.read_up_to >= len(self):
                return False
            if slot >= self.read_up_to and slot < len(self) and slot not in self.aside:
                self.aside[slot] = self.frames[slot].clone()
            return True

    def close(self) -> None:
        with self.lock:
            self.read_up_to, self.aside = len(self), {}

    def chunks(self, chunk_bytes: int = 16 << 20):
        """The frames in order, about `chunk_bytes` at a time, as NumPy arrays."""
        rows = max(1, chunk_bytes // max(1, self.frames[:1].numel()))
        for start in range(0, len(self), rows):
            with self.lock:
                end = min(start + rows, len(self))
                chunk = self.frames[start:end].to("cpu", copy=True)
                for slot in [s for s in self.aside if start <= s < end]:
                    chunk[slot - start] = self.aside.pop(slot)
                self.read_up_to = end
            yield chunk.numpy()


def check_memory_fits(needed: int, device: torch.device) -> None:
    """Refuse, before allocating, a replay memory the device cannot hold."""
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], "free GPU memory"
    else:  # the CPU, or Apple's MPS, which shares the machine's RAM; psutil asks each system its own way
        free, where = psutil.virtual_memory().available, "available RAM"
    if needed > 0.9 * free:
        raise UserError(f"the replay memory needs {needed / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of "
                        f"{where} is left; lower --memory")


# ---- Transition rules: how each game's agent steps become stored transitions. Both have one method, `store`,
# called once per agent step; their attributes (the transitions being built) go into full checkpoints.
class BlockRule:
    """The tutorial's rule: a block of up to `block` agent steps makes one transition with the first step's
    state and action, the state right after that step as next state (none if the life ended there), and the
    sum of the block's rewards. A block ends every `block` steps of its game, or when the life ends."""

    def __init__(self, games: int, block: int):
        self.block = block
        self.steps = 0                          # agent steps each game has taken
        self.open = np.zeros(games, bool)       # per game: a block is being built
        self.slot = np.zeros(games, np.int64)   # its first step's state (newest frame slot), action, ...
        self.action = np.zeros(games, np.int64)
        self.has_next = np.zeros(games, bool)
        self.reward = np.zeros(games, np.float32)

    def store(self, replay: ReplayMemory, state_slot: int, actions: np.ndarray, rewards: np.ndarray,
              done: np.ndarray) -> None:
        self.steps += 1
        opening = ~self.open
        self.slot[opening] = state_slot
        self.action[opening] = actions[opening]
        self.has_next[opening] = ~done[opening]
        self.reward[opening] = 0
        self.open[:] = True
        self.reward += rewards
        closing = np.flatnonzero((self.steps % self.block == 0) | done)
        if len(closing):
            replay.add(closing, self.slot[closing], self.action[closing], self.reward[closing],
                       self.has_next[closing])
            self.open[closing] = False

    def restart(self) -> None:
        """New games: the blocks being built are dropped."""
        self.open[:] = False


class NStepRule:
    """n-step returns (--recipe fast): each game keeps its last n (state slot, action, discounted return);
    the oldest becomes a transition once n rewards are in, its next state n steps on, and all of them (with
    no next state) when the life ends."""

    def __init__(self, games: int, n_step: int, gamma: float):
        self.n_step, self.gamma = n_step, gamma
        self.count = np.zeros(games, np.int64)             # steps pending per game
        self.slot = np.zeros((games, n_step), np.int64)    # per pending step: its state, action, return so far
        self.action = np.zeros((games, n_step), np.int64)
        self.returns = np.zeros((games, n_step))

    def store(self, replay: ReplayMemory, state_slot: int, actions: np.ndarray, rewards: np.ndarray,
              done: np.ndarray) -> None:
        games, pending = np.arange(len(self.count)), self.count
        self.slot[games, pending] = state_slot
        self.action[games, pending] = actions
        self.returns[games, pending] = 0
        age = pending[:, None] - np.arange(self.n_step)[None, :]
        self.returns += np.where(age >= 0, self.gamma ** np.maximum(age, 0), 0) * rewards[:, None]
        self.count = pending = pending + 1
        ready = np.flatnonzero((pending == self.n_step) & ~done)
        rows = [(i, 0) for i in ready] + [(i, j) for i in np.flatnonzero(done) for j in range(pending[i])]
        if rows:
            game, j = np.array(rows).T
            replay.add(game, self.slot[game, j], self.action[game, j], self.returns[game, j],
                       np.arange(len(game)) < len(ready))
        for table in (self.slot, self.action, self.returns):
            table[ready] = np.roll(table[ready], -1, axis=1)
        self.count[ready] -= 1
        self.count[done] = 0

    def restart(self) -> None:
        """New games: the steps pending are dropped."""
        self.count[:] = 0


# ---- Network: the tutorial's Dueling DQN. Parameter names match its state_dict, so .pth files load both ways.
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


# ---- Exploration: epsilon-greedy; the schedule is the tutorial's exponential decay, or linear (--recipe fast).
def epsilon(step: int, a: Args) -> float:
    if a.eps_schedule == "linear":
        return max(a.eps_end, a.eps_start - (a.eps_start - a.eps_end) * step / a.eps_decay)
    return a.eps_end + (a.eps_start - a.eps_end) * math.exp(-step / a.eps_decay)


@torch.no_grad()
def greedy_actions(policy: nn.Module, stacks: torch.Tensor) -> torch.Tensor:
    return policy(as_input(stacks)).argmax(1)


def choose_actions(policy: nn.Module, stack: FrameStack, eps: float, n_actions: int, rng: np.random.Generator,
                   greedy=None) -> np.ndarray:
    """Epsilon-greedy actions for every game of `stack`, with at most one forward pass. Given `greedy` (as
    `greedy_actions`, or it compiled), every game goes through it: one fixed shape, and the greedy choices
    come back with the actions' one download. Without, only the games that need it (the CPU's cheapest way)."""
    n = len(stack)
    explore = rng.random(n) < eps
    actions = rng.integers(n_actions, size=n)
    chosen = np.flatnonzero(~explore)
    if len(chosen) and greedy is not None:
        actions[chosen] = greedy(policy, stack.frames).cpu().numpy()[chosen]
    elif len(chosen):
        stacks = stack.frames  # put in order only when a forward pass needs them
        actions[chosen] = greedy_actions(policy, stacks[torch.from_numpy(chosen).to(stacks.device)]).cpu().numpy()
    return actions


# ---- Learning step: one gradient update of the policy network on a uniform batch.
def td_loss(policy: nn.Module, target: nn.Module, states, actions, rewards, next_states, has_next,
            discount: float, double: bool):
    """Huber loss to the Q-learning target r + discount * max_a Q_target(s', a), 0 past a lost life (Mnih et
    al., 2015), or with `double` Q_target(s', argmax_a Q_policy(s', a)) (van Hasselt et al., 2016); and the
    batch's mean Q."""
    q = policy(as_input(states)).gather(1, actions.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        next_input = as_input(next_states)
        next_all = target(next_input)
        if double:
            next_q = next_all.gather(1, policy(next_input).argmax(1, keepdim=True)).squeeze(1)
        else:
            next_q = next_all.max(1).values
        targets = rewards + discount * next_q * has_next
    return F.smooth_l1_loss(q, targets), q.detach().mean()


def td_update(policy: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer, batch, gamma: float,
              n_step: int = 1, double: bool = False, loss_fn=td_loss):
    """One gradient step on `td_loss` (gamma^n_step the discount of the n-step target); `loss_fn` is
    td_loss, or it compiled. Returns the loss and the mean Q as device tensors (no host round trip)."""
    loss, mean_q = loss_fn(policy, target, *batch, gamma ** n_step, double)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_value_(policy.parameters(), 1000)  # the tutorial's bound
    optimizer.step()
    return loss.detach(), mean_q


@torch.no_grad()
def soft_update(target: nn.Module, policy: nn.Module, tau: float) -> None:
    for t, p in zip(target.parameters(), policy.parameters()):
        t.lerp_(p, tau)


class LearningStats:
    """Sums of the loss and the mean Q over the updates since the last logged row. They stay on the device,
    so an update needs no host round trip; they are read back only when a row is logged."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, device=device)  # loss, mean Q, updates

    def add(self, loss: torch.Tensor, mean_q: torch.Tensor) -> None:
        self.sums += torch.stack([loss, mean_q, torch.ones((), device=self.sums.device)])

    def take(self) -> tuple[Optional[float], Optional[float]]:
        """Mean loss and mean Q since the last call (None without updates), and start new sums."""
        loss, mean_q, updates = self.sums.tolist()
        if updates == 0:
            return None, None
        self.sums.zero_()
        return loss / updates, mean_q / updates


# ---- Evaluation and logging: greedy-ish games on their own environment, metrics.csv, TensorBoard, curve.png.
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
             seed: int, video: Optional[str] = None, threads: Optional[int] = None) -> dict:
    """Play `games` whole games (forced FIRE each life, epsilon `eps`, no erasing); not part of training.
    With `video`, the best game is written there; `threads` steps the games (default: one per core)."""
    env = make_games(env_id, games, seed, rgb=True, threads=threads)
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

    def __init__(self, run_dir: Path, resume_step: Optional[int], replayed_eval: Optional[int] = None):
        self.path = run_dir / "metrics.csv"
        if resume_step is not None and self.path.exists():
            # Rows written after the checkpoint belong to work that is about to be done again, and so does the
            # row of the evaluation that was playing beside training when the checkpoint was taken.
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step
                        and not (r["kind"] == "eval" and int(r["step"]) == replayed_eval)]
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


class Rows:
    """A table that grows a row at a time, in one float64 array that doubles when full: a run of 10 million
    games keeps 240 MB here where Python lists of rows would take gigabytes, and `array` costs nothing."""

    def __init__(self, width: int, rows=()):
        rows = np.asarray(rows, float).reshape(-1, width)
        self.data, self.n = np.zeros((max(64, 2 * len(rows)), width)), len(rows)
        self.data[:self.n] = rows

    def append(self, row) -> None:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
        self.data[self.n] = row
        self.n += 1

    @property
    def array(self) -> np.ndarray:
        """The rows so far, (n, width); a view, so copy it before handing it to another thread."""
        return self.data[:self.n]


class History:
    """What curve.png draws, a row per point: per finished game (agent step, seconds, score); per redraw of
    the curve (agent step, episode, mean life score since the last redraw); per evaluation (agent step,
    seconds, mean, max, games that cleared the wall); per logged learning figure (agent step, loss, mean Q)."""

    COLUMNS = dict(games=3, lives=3, evals=5, learning=3)

    def __init__(self):
        for name, width in self.COLUMNS.items():
            setattr(self, name, Rows(width))

    def state_dict(self) -> dict:
        """Read-only views: the rows so far are never written again, so a checkpoint needs no copy of them."""
        views = {name: getattr(self, name).array for name in self.COLUMNS}
        for view in views.values():
            view.flags.writeable = False
        return views

    def load_state_dict(self, state: dict) -> None:
        for name, width in self.COLUMNS.items():
            setattr(self, name, Rows(width, state[name]))


CURVE_POINTS = 2_000  # the most points a line of curve.png gets: a redraw costs the same at any run length


def bins(n: int, points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` runs of consecutive rows out of `n`: the indices of each one's first and last row."""
    ends = np.unique(np.linspace(0, n - 1, min(n, points)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    return np.concatenate([[0], ends[:-1] + 1]).astype(np.int64), ends


def thinned(rows: np.ndarray, points: int = CURVE_POINTS) -> np.ndarray:
    """At most `points` rows: each the mean of a run of consecutive rows, at the agent step (column 0) of its
    last one."""
    if len(rows) <= points:
        return rows.copy()
    starts, ends = bins(len(rows), points)
    return np.column_stack([rows[ends, 0], np.add.reduceat(rows[:, 1:], starts) / (ends - starts + 1)[:, None]])


def curve_data(history: History, window: int = 100) -> dict:
    """What curve.png draws, thinned to at most CURVE_POINTS points a line, with the work kept close to the
    points drawn: up to CURVE_POINTS games are drawn one by one. Past that, each run of games between two
    points shows its lowest and highest score, the mean of the `window` games up to its end and the best game
    so far; the other lines are averaged over each run of rows (`thinned`). Cheap enough to run in the
    training loop."""
    games = history.games.array
    data = {name: thinned(getattr(history, name).array) for name in ("lives", "evals", "learning")}
    if len(games):
        scores, (starts, ends) = games[:, 2], bins(len(games))
        last = ends[:, None] - np.arange(window)[None, :]  # the `window` games up to each point
        inside = last >= 0
        mean = np.where(inside, scores[np.maximum(last, 0)], 0).sum(1) / inside.sum(1)
        low, high = np.minimum.reduceat(scores, starts), np.maximum.reduceat(scores, starts)
        best = np.maximum.accumulate(high)
        cleared = np.flatnonzero(high >= WALL_CLEARED)
        first_clear = None
        if len(cleared):
            i = starts[cleared[0]] + np.argmax(scores[starts[cleared[0]]:ends[cleared[0]] + 1] >= WALL_CLEARED)
            first_clear = games[i, 0]
        data.update(step=games[ends, 0], low=low, high=high, mean=mean, best=best, first_clear=first_clear,
                    each_game=len(ends) == len(games))
    return data


def draw_curve(path: Path, data: dict, env_id: str) -> None:
    """curve.png from `curve_data`: scores per game and per life (windowed means), evaluations, wall mark; loss
    and Q below. The file is replaced whole, so a reader never sees half a picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lives, evals, learn = data["lives"], data["evals"], data["learning"]
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                        gridspec_kw=dict(height_ratios=[3, 1, 1]))
    if "step" in data:
        x = data["step"] / 1e6
        if data["each_game"]:
            top.plot(x, data["high"], ".", color="0.8", ms=2, label="game score")
        else:
            top.fill_between(x, data["low"], data["high"], color="0.85", lw=0, label="game scores, lowest to highest")
        top.plot(x, data["mean"], color="C0", lw=2, label="game score, mean of 100 games")
        top.plot(x, data["best"], color="C2", lw=1, ls="--", label="best game so far")
    if len(lives):
        top.plot(lives[:, 0] / 1e6, lives[:, 2], color="C1", lw=1.5, label="life score, mean per plot window")
    if len(evals):
        top.plot(evals[:, 0] / 1e6, evals[:, 2], "o-" if len(evals) <= 200 else "-", color="C3", ms=4,
                 label="evaluation mean")
    if data.get("first_clear") is not None:
        top.axvline(data["first_clear"] / 1e6, color="k", ls=":", lw=1)
        top.annotate(" wall cleared", (data["first_clear"] / 1e6, WALL_CLEARED), fontsize=9)
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


# ---- Checkpoints. Snapshots (<episode>.pth) are the target network's state_dict, as the tutorial saved them.
# Full checkpoints (resume/<step>/) hold everything a run needs to go on: tensors via torch.save (read
# back with weights_only=True), arrays as zstd-compressed .npy, the rest as JSON, and manifest.json, written
# last, with each file's size and SHA-256. Every file goes to a temporary name first and is renamed when
# complete.
def fsync_dir(path: Path) -> None:
    """Make the renames inside `path` durable, where the system can: Windows cannot open a folder as a file
    (PermissionError), and its renames need no such call."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        return
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


def save_snapshot(net: nn.Module | dict, path: Path) -> None:
    """A network, or its state_dict, as a .pth the tutorial's code loads (plain tensors, on the CPU)."""
    state = {k: v.detach().cpu().contiguous() for k, v in (net if isinstance(net, dict) else net.state_dict()).items()}
    write_atomically(path, lambda f: torch.save(state, f))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class DamagedCheckpoint(Exception):
    pass


def save_array(path: Path, array: np.ndarray | RingSnapshot) -> None:
    """`array` as a .npy stream compressed with zstd (level 1, on every core), written a chunk at a time, so
    that saving the replay memory holds no second copy of it. Frames of play shrink about 100x."""
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=1, threads=-1).stream_writer(f, closefd=False) as out:
        if not isinstance(array, RingSnapshot):
            np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
            return
        header = dict(descr=np.lib.format.dtype_to_descr(array.dtype), fortran_order=False, shape=array.shape)
        np.lib.format.write_array_header_1_0(out, header)
        for chunk in array.chunks():
            out.write(chunk.data)


class CompressedArray:
    """An array written by save_array, read when asked: np.asarray() decompresses it whole, `read_into` straight
    into a buffer (the replay memory's tables) with no copy between."""

    def __init__(self, path: Path):
        self.path = path
        with self._open() as f:
            self.shape, self.dtype = self._header(f)

    def __len__(self) -> int:
        return self.shape[0]

    def _open(self):
        return zstandard.ZstdDecompressor().stream_reader(open(self.path, "rb"), closefd=True)

    @staticmethod
    def _header(f) -> tuple:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        return shape, dtype

    def read_into(self, out: np.ndarray) -> None:
        assert out.shape == self.shape and out.dtype == self.dtype and out.flags.c_contiguous
        with self._open() as f:
            self._header(f)
            buffer, done = memoryview(out.reshape(-1).view(np.uint8)), 0
            while done < len(buffer):
                read = f.readinto(buffer[done:])
                if not read:
                    raise DamagedCheckpoint(f"{self.path.name} ends early")
                done += read

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.empty(self.shape, self.dtype)
        self.read_into(array)
        return array if dtype is None else array.astype(dtype)


def save_checkpoint(root: Path, name: str, tensors: dict, arrays: dict, state: dict, keep: int = 2) -> Path:
    """Write resume/<name>/ completely or not at all; keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save(tensors, tmp / "model.pt")
        for key, value in arrays.items():
            save_array(tmp / f"{key}.npy.zst", value)
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
        for array in arrays.values():
            if isinstance(array, RingSnapshot):
                array.close()  # read or not, training need not keep its frames any longer
    for old in checkpoint_folders(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_folders(root: Path) -> list:
    """The full checkpoints in `root` (a run's resume/), oldest first; none while a first one is being written."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


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
    arrays = {f.name[:-len(".npy.zst")]: CompressedArray(f) for f in folder.glob("*.npy.zst")}
    # Checkpoints written before compression keep plain .npy files: read through memory maps.
    arrays.update({f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in folder.glob("*.npy")})
    return tensors, arrays, json.loads((folder / "state.json").read_text())


def latest_checkpoint(run_dir: Path):
    """The newest full checkpoint that passes its checks, reporting each damaged one in one line."""
    root = run_dir / "resume"
    for folder in reversed(checkpoint_folders(root)):
        try:
            return folder, load_checkpoint(folder)
        except DamagedCheckpoint as e:
            print(f"warning: checkpoint {folder} is damaged ({e}); trying the one before it", file=sys.stderr)
    raise UserError(f"no usable checkpoint in {root}; start a new run without --resume")


class StopRequest:
    """First Ctrl-C, SIGTERM or (on Windows) Ctrl-Break: finish the step, save, exit 0. A second one interrupts
    at once (the previous checkpoint stays intact because a checkpoint only replaces it when complete)."""

    def __init__(self):
        self.signal: Optional[str] = None
        stops = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])
        self.previous = {s: signal.signal(s, self._handle) for s in stops}

    def restore(self) -> None:
        """Give Ctrl-C back to whoever had it (a notebook calling train(), say)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


# ---- The run's state, declared once: every field of `Run` goes into a full checkpoint and comes back from
# it. Saving (`checkpoint_files`) and restoring (`restore`) walk the same fields: a field added to Run is
# saved and restored with no other edit.
@dataclass
class Counters:
    steps: int = 0                       # agent steps, all games together
    episodes: int = 0                    # lives lost: the tutorial's episodes
    games: int = 0                       # games finished
    updates: int = 0                     # gradient updates
    unlearned: int = 0                   # transitions stored whose due updates are not made yet (--overlap)
    seconds: float = 0.0                 # training time, as of the last full checkpoint
    evals: int = 0                       # evaluations run
    life_sum: float = 0.0                # sum and count of the life scores since the curve's last redraw
    life_count: int = 0
    best_eval: Optional[float] = None    # the best evaluation mean: the one best.pth holds
    first_clear: Optional[list] = None   # [agent step, seconds] of the first evaluation that cleared the wall


@dataclass
class GameTracking:
    """Per game in play: lives left, whether the next action must be FIRE, the game's and the life's score
    so far, and the lives lost in the game."""
    lives: np.ndarray
    need_fire: np.ndarray
    game_score: np.ndarray
    life_score: np.ndarray
    lives_lost: np.ndarray

    @classmethod
    def new_games(cls, lives: np.ndarray) -> GameTracking:
        n = len(lives)
        return cls(lives, np.ones(n, bool), np.zeros(n), np.zeros(n), np.zeros(n, np.int64))


@dataclass
class Every:
    """Periodic work, due at the multiples of `interval` of a count (episodes, agent steps, seconds); never
    when the interval is 0."""
    interval: float
    next: Optional[float]

    @classmethod
    def counting_from(cls, interval: float, count: float = 0) -> Every:
        """Next due at the first multiple after `count`: a new interval given on resume counts from there."""
        return cls(interval, (count // interval + 1) * interval if interval else None)

    def passed(self, count: float) -> list:
        """The due points `count` has reached, oldest first; the next one moves past `count`."""
        points = []
        while self.next is not None and count >= self.next:
            points.append(self.next)
            self.next += self.interval
        return points


@dataclass
class PendingEvaluation:
    """The evaluation playing beside training, if any: the agent step, episode and training seconds at which its
    weights were taken, its number (which seeds its games) and the weights. A full checkpoint keeps it, so
    that a resumed run plays it again instead of losing it."""
    step: Optional[int] = None
    episode: int = 0
    seconds: float = 0.0
    number: int = 0
    weights: Optional[dict] = None


# The periodic work a run keeps: its Run field, the flag that sets its interval, the counter it follows.
SCHEDULES = (("snapshots", "save_every", "episodes"), ("curve", "plot_every", "episodes"),
             ("evaluations", "eval_every", "steps"))


@dataclass
class Run:
    """A run at an agent step: everything a full checkpoint saves and restores."""
    games: OneGame | VectorGames         # the emulators (ale-py's vector environment cannot save its games)
    policy_net: DuelingNetwork
    target_net: DuelingNetwork
    optimizer: torch.optim.Optimizer
    sampler: torch.Generator             # replay sampling, on the device
    rng: np.random.Generator             # exploration and random erasing
    replay: ReplayMemory
    stack: FrameStack                    # what the agent sees of each game
    transitions: BlockRule | NStepRule   # the transitions being built
    tracking: GameTracking
    counters: Counters
    learning: LearningStats              # loss and Q since the last logged row
    history: History                     # what curve.png draws
    snapshots: Every                     # <episode>.pth, counting episodes
    curve: Every                         # curve.png, counting episodes
    evaluations: Every                   # counting agent steps
    evaluating: PendingEvaluation        # the evaluation playing beside training


def new_run(args: Args, device: torch.device, games) -> Run:
    """A run at step 0; its games are started by `start_games`, or come back from a checkpoint."""
    torch.manual_seed(args.seed)  # the networks' first weights
    sampler = torch.Generator(device=device)
    sampler.manual_seed(args.seed)
    n_actions, n, block = len(games.actions), args.envs, args.steps_per_transition
    policy_net = DuelingNetwork(args.frames, n_actions).to(device, memory_format=torch.channels_last)
    target_net = DuelingNetwork(args.frames, n_actions).to(device, memory_format=torch.channels_last)
    target_net.load_state_dict(policy_net.state_dict())
    # The fused kernel is the same AdamW, in one pass over the parameters (3.5x faster step on CPU).
    optimizer = torch.optim.AdamW(policy_net.parameters(), lr=args.lr, amsgrad=True,
                                  fused=device.type in ("cpu", "cuda") or None)
    return Run(games, policy_net, target_net, optimizer, sampler, np.random.default_rng(args.seed),
               ReplayMemory(args.memory, n, args.frames, block, device, args.n_step),
               FrameStack(n, args.frames, device),
               BlockRule(n, block) if args.n_step == 1 else NStepRule(n, args.n_step, args.gamma),
               GameTracking.new_games(np.zeros(n, np.int64)), Counters(), LearningStats(device), History(),
               *(Every.counting_from(getattr(args, flag)) for _, flag, _ in SCHEDULES), PendingEvaluation())


def start_games(run: Run, args: Args) -> None:
    """Start every game afresh: its first frame begins its frame stack and goes into the replay memory."""
    screens, lives = run.games.reset()
    device = run.replay.device
    frames = torch.from_numpy(preprocess_all(screens, erase_rng(run, args), run.games.screen_lut)).to(device)
    run.replay.add_frames(frames, torch.ones(len(lives), dtype=torch.bool, device=device))
    run.stack.push(frames, np.ones(len(lives), bool))
    run.tracking = GameTracking.new_games(lives)
    run.transitions.restart()


def erase_rng(run: Run, args: Args) -> Optional[np.random.Generator]:
    return None if args.no_random_erasing else run.rng


def part_state(part) -> dict:
    """One field of a Run as {name: value}: a generator's state, the field's `state_dict()` where it has one
    (networks, optimiser, replay memory, frame stacks, games, history), else its attributes."""
    if isinstance(part, torch.Generator):
        return dict(state=part.get_state())
    if isinstance(part, np.random.Generator):
        return dict(state=part.bit_generator.state)
    return part.state_dict() if hasattr(part, "state_dict") else dict(vars(part))


def load_part(part, state: dict) -> None:
    if isinstance(part, torch.Generator):
        try:
            part.set_state(state["state"])
        except RuntimeError:  # the run moved between CPU and GPU, whose generators differ
            print("note: replay sampling is reseeded on the new device", flush=True)
    elif isinstance(part, np.random.Generator):
        part.bit_generator.state = state["state"]
    elif hasattr(part, "load_state_dict"):
        part.load_state_dict(state)
    else:
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                value = value.to(getattr(part, name).device)
            writable_copy = isinstance(value, (np.ndarray, CompressedArray))
            setattr(part, name, np.array(value) if writable_copy else value)


def is_json(value) -> bool:
    """Whether JSON gives `value` back as it is (not so for tensors, tuples, or dicts with int keys)."""
    try:
        return json.loads(json.dumps(value)) == value
    except TypeError:
        return False


def checkpoint_files(run: Run) -> tuple[dict, dict, dict]:
    """The run as a full checkpoint's contents: tensors and the like for model.pt, arrays (each its own
    <field>.<name>.npy), and JSON values for state.json; model.pt's and state.json's keyed by field."""
    tensors, arrays, values = {}, {}, {}
    for f in dataclasses.fields(run):
        for name, value in part_state(getattr(run, f.name)).items():
            if isinstance(value, (np.ndarray, RingSnapshot)):
                arrays[f"{f.name}.{name}"] = value
            else:
                (values if is_json(value) else tensors).setdefault(f.name, {})[name] = value
    return tensors, arrays, values


def parts_of(tensors: dict, arrays: dict, values: dict) -> dict:
    """A full checkpoint's contents as {Run field: its state}: the inverse of checkpoint_files."""
    parts = {}
    for field_name, state in [*tensors.items(), *values.items()]:
        parts.setdefault(field_name, {}).update(state)
    for key, array in arrays.items():
        field_name, name = key.split(".", 1)
        parts.setdefault(field_name, {})[name] = array
    return parts


def parts_of_older_layout(run: Run, tensors: dict, arrays: dict, values: dict) -> dict:
    """A full checkpoint written up to commit 115c5ab, before the run's state was declared in one place: the
    same state under other names, as {Run field: its state}."""
    counters = dict(values["counters"])
    game = {k[len("game_"):]: v for k, v in arrays.items() if k.startswith("game_")}
    if isinstance(run.transitions, BlockRule):
        transitions = dict(steps=int(game["env_steps"][0]),
                           **{k: game[f"block_{k}"] for k in ("open", "slot", "action", "has_next", "reward")})
    else:
        transitions = dict(count=game["pend_count"], slot=game["pend_slot"], action=game["pend_action"],
                           returns=game["pend_return"])
    replay = {k[len("replay_"):]: v for k, v in arrays.items() if k.startswith("replay_")}
    replay["frames_written"], replay["stored"] = (int(x) for x in replay.pop("counters"))
    return dict(
        games=dict(values.get("games", {}), emulator=arrays["emulator"]) if "emulator" in arrays else {},
        policy_net=tensors["policy"], target_net=tensors["target"], optimizer=tensors["optimizer"],
        sampler=dict(state=tensors["sampler"]), rng=dict(state=values["numpy"]), replay=replay,
        stack=dict(frames=tensors["stack"]), transitions=transitions,
        tracking={k: game[k] for k in ("lives", "need_fire", "game_score", "life_score", "lives_lost")},
        learning=dict(sums=tensors["learning"]),
        history={k[len("history_"):]: v for k, v in arrays.items() if k.startswith("history_")},
        snapshots=dict(next=counters.pop("next_save")), curve=dict(next=counters.pop("next_plot")),
        evaluations=dict(next=counters.pop("next_eval")), counters=counters)


def restore(run: Run, checkpoint, args: Args, given: set) -> None:
    """Bring the run back to where the checkpoint left it; games that cannot come back start afresh."""
    folder, (tensors, arrays, values) = checkpoint
    older = "policy" in tensors
    parts = parts_of_older_layout(run, tensors, arrays, values) if older else parts_of(tensors, arrays, values)
    why_afresh = None
    for f in dataclasses.fields(run):
        try:
            load_part(getattr(run, f.name), parts.get(f.name, {}))
        except CannotRestore as e:
            why_afresh = str(e)
    for name, flag, counter in SCHEDULES:
        if flag in given:  # a new interval given on resume counts from here
            setattr(run, name, Every.counting_from(getattr(args, flag), getattr(run.counters, counter)))
    if why_afresh:
        print(f"note: {why_afresh}, so the games start afresh; the transitions being built when the checkpoint "
              "was taken are dropped", flush=True)
        start_games(run, args)
    print(f"resumed from {folder}: episode {run.counters.episodes}, agent step {run.counters.steps}", flush=True)


# ---- Starting: a new run, or the one a checkpoint continues; and this process's share of it.
def prepare_run(args: Args, given: set):
    """(args, run folder, checkpoint or None). On --resume the run's own recipe comes back from config.json;
    only the flags marked new_on_resume may change it. With --auto-resume, a folder with a checkpoint is
    resumed, and any other is started (a run stopped before its first checkpoint starts over)."""
    if args.auto_resume and not args.resume and checkpoint_folders(Path(args.checkpoints) / "resume"):
        args.resume = "latest"
    if not args.resume:
        run_dir = Path(args.checkpoints)
        if (run_dir / "config.json").exists() and not args.auto_resume:
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
    may_change = {f.name for f in dataclasses.fields(Args) if f.metadata["new_on_resume"]}
    changed = sorted(k for k in given - may_change if getattr(args, k) != saved.get(k))
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} (run: {saved.get(k)}, given: {getattr(args, k)})" for k in changed)
        raise UserError(f"--resume continues the run's own recipe, and these flags differ: {diffs}; "
                        f"start a new run in another --checkpoints folder to change them")
    merged = {**saved, **{k: getattr(args, k) for k in given & may_change}}
    merged.update(resume=args.resume, checkpoints=str(run_dir))
    return Args(**merged), run_dir, checkpoint


def open_run_folder(run_dir: Path, args: Args, n_actions: int, new: bool) -> None:
    """Create the run's folder, clear what a killed save left there, and write a new run's config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in (run_dir / "resume").glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if new:
        config = dict(env=args.env, frames=args.frames, n_actions=n_actions, args=dataclasses.asdict(args))
        write_atomically(run_dir / "config.json", lambda f: f.write(json.dumps(config, indent=1)), text=True)


def describe(args: Args, device: torch.device, replay_bytes: int) -> str:
    rows = [f"{k:>20} = {v}" for k, v in dataclasses.asdict(args).items()]
    return "\n".join(["recipe and run:"] + rows + [
        f"{'device':>20} = {device}",
        f"{'replay memory':>20} = {replay_bytes / 2**30:.2f} GiB on {device} "
        f"({replay_bytes / args.memory / 1024:.1f} KB per stored transition)"])


def compiled_functions(run: Run, args: Args, device: torch.device):
    """td_loss and greedy_actions through torch.compile: fused kernels, on CUDA replayed as CUDA graphs (one
    launch instead of dozens). Compiled now, by one update on copies of the networks (the run is left as it
    was); where compiling fails, one line says so and the eager functions go on."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    loss_fn, greedy = torch.compile(td_loss, mode=mode), torch.compile(greedy_actions, mode=mode)
    policy, target, optimizer = copy.deepcopy((run.policy_net, run.target_net, run.optimizer))
    stacks = lambda n: torch.zeros((n, args.frames, SIZE, SIZE), dtype=torch.uint8, device=device)
    b = args.batch_size
    batch = (stacks(b), torch.zeros(b, dtype=torch.int64, device=device), torch.zeros(b, device=device), stacks(b),
             torch.ones(b, dtype=torch.bool, device=device))
    started = time.time()
    try:
        for _ in range(3):  # CUDA graphs are recorded at the third call
            td_update(policy, target, optimizer, batch, args.gamma, args.n_step, args.double, loss_fn)
            greedy(policy, stacks(args.envs))
    except Exception as e:  # no C++ compiler, a GPU or PyTorch build without Triton, ...
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        print(f"note: torch.compile failed ({type(e).__name__}: {reason}); going on without compiling", flush=True)
        return td_loss, (greedy_actions if device.type != "cpu" else None)
    print(f"compiled the learning update and acting in {time.time() - started:.0f} s", flush=True)
    return loss_fn, greedy


def torch_threads(args: Args, device: torch.device, learning: bool) -> int:
    """All cores for learning. Acting and bookkeeping run small tensor ops between emulator steps; on CPU more
    threads there only fight ale-py's threads for the cores (3x slower on 2 cores)."""
    return (args.threads or os.cpu_count() or 1) if learning or device.type != "cpu" else 1


class Session:
    """This process's share of a run, none of it saved: the flags, the run's folder, the log, the clock,
    the progress bar and the stop request."""

    def __init__(self, args: Args, run_dir: Path, device: torch.device, run: Run, resumed: bool):
        self.args, self.run_dir, self.device = args, run_dir, device
        self.n_actions, self.fire = len(run.games.actions), fire_action(run.games.actions)
        self.log = RunLog(run_dir, run.counters.steps if resumed else None, run.evaluating.step)
        if self.log.tb is not None and not resumed:
            self.log.tb.add_text("hyperparameters", "|flag|value|\n|-|-|\n" +
                                 "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
        cuda = device.type == "cuda"
        self.overlap = args.overlap == "on" or (args.overlap == "auto" and cuda and args.envs > 1)
        # Acting on CPU forwards only the games that act greedily; elsewhere all of them, with no upload.
        self.loss_fn, self.greedy = td_loss, (greedy_actions if device.type != "cpu" else None)
        if args.compile == "on" or (args.compile == "auto" and cuda):
            self.loss_fn, self.greedy = compiled_functions(run, args, device)
        print(f"learning {'while the games step' if self.overlap else 'between steps of the games'}, "
              f"{'compiled' if self.loss_fn is not td_loss else 'not compiled'}", flush=True)
        self.started, self.seconds_before = time.time(), run.counters.seconds
        self.checkpoints = Every.counting_from(60 * args.checkpoint_minutes)  # counting this session's seconds
        self.rate_time, self.rate_steps, self.steps_per_s = time.time(), run.counters.steps, 0.0
        # The bar follows the budget that was given: minutes (in seconds), else agent steps, else episodes.
        self.total, unit = ((round(60 * args.minutes), "s") if args.minutes is not None else
                            (args.steps, "step") if args.steps is not None else (args.episodes, "ep"))
        self.bar = tqdm(total=self.total, initial=self.progress(run.counters), unit=unit, desc="training",
                        dynamic_ncols=True, mininterval=1.0)
        self.staging = Staging(device)  # the frames' upload
        cores = os.cpu_count() or 1
        self.eval_beside = args.eval_beside == "on" or (args.eval_beside == "auto" and cores >= EVAL_BESIDE_CORES)
        if args.eval_every:
            print(f"evaluations play {'beside training' if self.eval_beside else 'in the training loop'}"
                  + ("" if args.eval_beside != "auto" else f" ({cores} cores; --eval-beside on|off to choose)"),
                  flush=True)
        # Beside training: the curve's process, the evaluations' process, the thread writing a checkpoint.
        self.curves = Helper("curve", newest_only=True, results=False)
        self.evaluations = Helper("evaluations")
        self.saving: Optional[Beside] = None
        self.said_saves_inline = False
        self.stop = StopRequest()  # last: train() gives the signals back from here on

    def seconds(self) -> float:
        return time.time() - self.started

    def elapsed(self) -> float:
        """Training time of the whole run."""
        return self.seconds_before + self.seconds()

    def progress(self, counters: Counters) -> int:
        a = self.args
        done = self.elapsed() if a.minutes is not None else counters.steps if a.steps is not None else counters.episodes
        return min(int(done), self.total)

    def budget_left(self, counters: Counters) -> bool:
        a = self.args
        return (counters.episodes < a.episodes and (a.steps is None or counters.steps < a.steps)
                and (a.minutes is None or self.elapsed() < 60 * a.minutes))

    def measure_speed(self, steps: int) -> None:
        now = time.time()
        if now - self.rate_time >= 2.0:
            self.steps_per_s = (steps - self.rate_steps) / (now - self.rate_time)
            self.rate_time, self.rate_steps = now, steps


# ---- Work beside training: what periodic work needs is taken at the step it is due (the weights, the curve's
# points, the checkpoint's contents), and the slow part (playing, drawing, compressing, writing) goes on
# elsewhere while training continues.
class Beside(threading.Thread):
    """`work()` on a thread of its own (for work that spends its time outside the GIL: compressing, hashing and
    writing files); the loop waits for it with `finished` and reports the exception it raised."""

    def __init__(self, work, name: str):
        super().__init__(name=name, daemon=True)
        self.work, self.error = work, None
        # Waited for instead of join(): a join cut short by Ctrl-C marks the thread as ended (CPython 3.11).
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.work()
        except BaseException as e:  # reported by the loop, on its own thread
            self.error = e
        finally:
            self.finished.set()


def serve(jobs, results, newest_only: bool) -> None:
    """A helper process's loop: run each job `(function, arguments)` handed over and hand back `(True, result)`
    or `(False, error)` (errors are printed instead where there is no `results`); with `newest_only`, only the
    newest of the jobs waiting. It ends at None, or once the trainer is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the trainer decides
    parent = multiprocessing.parent_process()
    while True:
        try:
            waiting = [jobs.get(timeout=1.0)]
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        if newest_only:  # the newest job waiting, then the end if it was asked for
            while True:
                try:
                    waiting.append(jobs.get_nowait())
                except queue.Empty:
                    break
            waiting = [job for job in waiting if job is not None][-1:] + [None] * (None in waiting)
        for job in waiting:
            if job is None:
                return
            work, args = job
            try:
                outcome = (True, work(*args))
            except Exception as e:  # a full disk, a broken video encoder, ...: the trainer reports it and goes on
                outcome = (False, f"{type(e).__name__}: {e}")
                if results is None:
                    print(f"warning: {work.__name__} failed ({outcome[1]})", file=sys.stderr, flush=True)
            if results is not None:
                results.put(outcome)


class Helper:
    """A process of its own that runs the jobs handed over while the loop goes on: for work that holds the GIL
    (matplotlib) or needs cores and seconds of its own (evaluations). Spawned, not forked (a fork of a process
    holding CUDA or threads is unsafe), at its first job; where it cannot start, `submit` says so and the
    caller does the work itself."""

    def __init__(self, name: str, newest_only: bool = False, results: bool = True):
        self.name, self.newest_only, self.with_results = name, newest_only, results
        self.process = self.jobs = self.results = None
        self.failed = False

    def submit(self, work, *args) -> bool:
        if self.process is None and not self.failed:
            try:
                spawn = multiprocessing.get_context("spawn")
                self.jobs = spawn.Queue()
                self.results = spawn.Queue() if self.with_results else None
                self.process = spawn.Process(target=serve, args=(self.jobs, self.results, self.newest_only),
                                             name=self.name, daemon=True)
                self.process.start()
            except (OSError, RuntimeError) as e:
                tqdm.write(f"note: no process could start for the {self.name} ({e}); the training loop does it")
                self.process, self.failed = None, True
        if self.process is None:
            return False
        self.jobs.put((work, args))
        return True

    def poll(self, wait: bool = False):
        """`(True, result)` or `(False, error)` of the oldest job done, or None if none is done yet (with `wait`,
        wait for it; None if the process has died)."""
        while True:
            try:
                return self.results.get(timeout=1.0) if wait else self.results.get_nowait()
            except queue.Empty:
                if not wait or not self.process.is_alive():
                    return None

    def close(self, timeout: float) -> None:
        """Let the jobs handed over finish, for at most `timeout` seconds; then end the process."""
        if self.process is None:
            return
        if self.process.is_alive():
            self.jobs.put(None)
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process = None


def frozen(value):
    """`value` (tensors, and dicts and lists of them) copied to the CPU, so that training's next steps cannot
    change it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: frozen(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(frozen(v) for v in value)
    return value


# ---- The training loop, step by step: act, step the games, store transitions, learn, record, periodic work.
def act(run: Run, session: Session) -> np.ndarray:
    """Epsilon-greedy actions for every game, and FIRE wherever a life starts, so that the ball is served."""
    actions = choose_actions(run.policy_net, run.stack, epsilon(run.counters.steps, session.args),
                             session.n_actions, run.rng, session.greedy)
    if session.fire is not None:
        actions[run.tracking.need_fire] = session.fire
    return actions


class Outcome(NamedTuple):
    """One agent step of every game: the replay slot of the state acted on, the rewards to learn from, and
    per game whether its life ended (the tutorial's episode) and whether its game did."""
    state_slot: int
    rewards: np.ndarray
    done: np.ndarray
    game_over: np.ndarray


def step_games(run: Run, session: Session) -> Outcome:
    """Finish the step `send` started: score every game, and put its new frame into the replay memory and its
    frame stack."""
    args, tracking = session.args, run.tracking
    state_slot = (run.replay.frames_written - 1) % run.replay.slots
    screens, reward, terminated, truncated, lives = run.games.recv()
    run.counters.steps += args.envs
    game_over = terminated | truncated
    life_lost = terminated | ((lives < tracking.lives) & ~game_over)
    done = life_lost | game_over
    tracking.game_score += reward
    tracking.life_score += reward
    tracking.lives_lost += life_lost
    tracking.need_fire, tracking.lives = done, lives
    learn_reward = reward if args.no_reward_clipping else np.clip(reward, -1, 1)
    learn_reward = np.where(life_lost, -1.0, learn_reward).astype(np.float32)
    frames = preprocess_all(screens, erase_rng(run, args), run.games.screen_lut)
    n = len(frames)  # frames and new-game flags go up together, in one copy
    up = session.staging(np.concatenate([frames.reshape(n, -1), game_over.reshape(n, 1).astype(np.uint8)], 1))
    frames, new_game = up[:, :-1].view(n, SIZE, SIZE), up[:, -1].bool()
    run.replay.add_frames(frames, new_game)
    run.stack.push(frames, new_game)
    return Outcome(state_slot, learn_reward, done, game_over)


def store_transitions(run: Run, actions: np.ndarray, outcome: Outcome) -> None:
    """The transitions this step completes; the updates due at them are made by the next `learn`."""
    before = run.replay.stored
    run.transitions.store(run.replay, outcome.state_slot, actions, outcome.rewards, outcome.done)
    run.counters.unlearned += run.replay.stored - before


def learn(run: Run, session: Session) -> None:
    """The updates due at the transitions stored since the last call: a gradient update every --update-every
    of them once past --learn-start, a soft target update every --target-every."""
    args, learned, counters = session.args, False, run.counters
    due, counters.unlearned = range(run.replay.stored - counters.unlearned + 1, run.replay.stored + 1), 0
    for count in due:
        if count % args.update_every == 0 and count > args.transitions_before_learning:
            if not learned:
                torch.set_num_threads(torch_threads(args, session.device, learning=True))
                learned = True
            batch = run.replay.sample(args.batch_size, run.sampler)
            run.learning.add(*td_update(run.policy_net, run.target_net, run.optimizer, batch, args.gamma,
                                        args.n_step, args.double, session.loss_fn))
            counters.updates += 1
        if count % args.target_every == 0:
            soft_update(run.target_net, run.policy_net, args.tau)
    if learned:
        torch.set_num_threads(torch_threads(args, session.device, learning=False))


def record(run: Run, session: Session, outcome: Outcome) -> None:
    """Count the lives and games that ended, log each finished game, move the progress bar."""
    counters, tracking = run.counters, run.tracking
    session.measure_speed(counters.steps)
    for i in np.flatnonzero(outcome.done):
        counters.episodes += 1
        counters.life_sum += tracking.life_score[i]
        counters.life_count += 1
        tracking.life_score[i] = 0
    for i in np.flatnonzero(outcome.game_over):
        counters.games += 1
        loss, mean_q = run.learning.take()
        if loss is not None:
            run.history.learning.append([counters.steps, loss, mean_q])
        score, seconds = float(tracking.game_score[i]), session.elapsed()
        run.history.games.append([counters.steps, seconds, score])  # the real score, before clipping
        session.log.row(kind="game", step=counters.steps, seconds=seconds, episode=counters.episodes, score=score,
                        lives_lost=int(tracking.lives_lost[i]), epsilon=epsilon(counters.steps, session.args),
                        loss=loss, mean_q=mean_q, steps_per_s=session.steps_per_s,
                        replay_fill=len(run.replay) / session.args.memory)
        tracking.game_score[i], tracking.lives_lost[i] = 0, 0
    session.bar.update(session.progress(counters) - session.bar.n)
    if outcome.done.any():
        recent = run.history.games.array[-100:, 2]
        session.bar.set_postfix(score=f"{np.mean(recent):.1f}" if len(recent) else "-",
                                eps=f"{epsilon(counters.steps, session.args):.3f}",
                                sps=f"{session.steps_per_s:.0f}", refresh=False)


def periodic_work(run: Run, session: Session) -> None:
    """Snapshots, the curve, evaluations and full checkpoints, each when it is due; the last three hand their
    slow part to work beside training."""
    counters, run_dir = run.counters, session.run_dir
    for episode in run.snapshots.passed(counters.episodes):
        save_snapshot(run.target_net, run_dir / f"{episode}.pth")
    if run.curve.passed(counters.episodes):
        run.history.lives.append([counters.steps, counters.episodes, counters.life_sum / max(1, counters.life_count)])
        counters.life_sum, counters.life_count = 0.0, 0
        draw_curve_beside(run, session)
    if run.evaluating.step is not None:
        collect_evaluation(run, session)
    if run.evaluations.passed(counters.steps):
        start_evaluation(run, session)
    if session.checkpoints.passed(session.seconds()):
        save_full_checkpoint(run, session)


def draw_curve_beside(run: Run, session: Session, here: bool = False) -> None:
    """Hand curve.png's points to the curve's process (or, `here` or if it could not start, draw them now)."""
    path, data = session.run_dir / "curve.png", curve_data(run.history)
    if here or not session.curves.submit(draw_curve, path, data, session.args.env):
        draw_curve(path, data, session.args.env)


def start_evaluation(run: Run, session: Session) -> None:
    """The policy's weights as they are at this step, to be played by --eval-games games. When the previous
    evaluation is still playing beside training, this one is skipped: waiting for it would stop training, the
    thing evaluations beside training are for, and the next due point comes soon enough."""
    counters = run.counters
    if run.evaluating.step is not None:
        tqdm.write(f"note: the evaluation due at step {counters.steps} is skipped: the one of step "
                   f"{run.evaluating.step} is still playing")
        return
    counters.evals += 1
    run.evaluating = PendingEvaluation(counters.steps, counters.episodes, session.elapsed(), counters.evals,
                                       frozen(run.policy_net.state_dict()))
    play_evaluation(run, session)


def evaluation_settings(run: Run, session: Session) -> tuple:
    """evaluate()'s arguments after the network, for the evaluation `run.evaluating` holds."""
    args, number, step = session.args, run.evaluating.number, run.evaluating.step
    video = str(session.run_dir / "videos" / f"eval-{step:012d}.mp4") if args.capture_video else None
    return args.env, args.eval_games, args.eval_eps, args.frames, session.device, args.seed + 7919 * number, video


def evaluate_weights(weights: dict, env_id: str, games: int, eps: float, depth: int, device: torch.device,
                     seed: int, video: Optional[str], threads: Optional[int] = None) -> dict:
    """evaluate() of the network `weights` hold. In the evaluations' process (`threads` given): `threads`
    threads step the games, not pinned to the cores training's games are pinned to, and one thread runs torch,
    as in training's acting."""
    if threads is not None:
        torch.set_num_threads(1)
    with torch.device("meta"):  # no initial weights drawn: no draw from torch's generator, nothing to fill twice
        policy = DuelingNetwork(weights["conv1.weight"].shape[1], weights["act_fc2.weight"].shape[0])
    policy = policy.to_empty(device=device).to(memory_format=torch.channels_last)
    policy.load_state_dict(weights)
    return evaluate(policy, env_id, games, eps, depth, device, seed, video, threads)


def play_evaluation(run: Run, session: Session) -> None:
    """Hand the evaluation `run.evaluating` holds to the evaluations' process; with evaluations in the loop, or
    where that process cannot start, play it here and now."""
    settings, weights = evaluation_settings(run, session), run.evaluating.weights
    threads = max(2, (os.cpu_count() or 1) // EVAL_BESIDE_CORES)
    if not (session.eval_beside and session.evaluations.submit(evaluate_weights, weights, *settings, threads)):
        record_evaluation(run, session, evaluate_weights(weights, *settings))


def collect_evaluation(run: Run, session: Session, wait: bool = False) -> None:
    """The result of the evaluation playing beside training, if it is done (with `wait`, once it is done)."""
    outcome = session.evaluations.poll(wait)
    if outcome is None and not wait:
        return
    ok, result = outcome or (False, "its process ended")
    if ok:
        record_evaluation(run, session, result)
    else:
        tqdm.write(f"warning: the evaluation of step {run.evaluating.step} failed ({result}); training goes on")
        run.evaluating = PendingEvaluation()


def record_evaluation(run: Run, session: Session, result: dict) -> None:
    """Log an evaluation against the step its weights were taken at; keep the best weights as best.pth; announce
    the first cleared wall."""
    args, counters, log = session.args, run.counters, session.log
    step, seconds = run.evaluating.step, run.evaluating.seconds
    run.history.evals.append([step, seconds, result["mean"], result["max"], result["cleared"]])
    log.row(kind="eval", step=step, seconds=seconds, episode=run.evaluating.episode, score=result["mean"],
            epsilon=args.eval_eps)
    if log.tb is not None:
        log.tb.add_scalar("eval/max", result["max"], step)
        log.tb.add_scalar("eval/games_clearing_the_wall", result["cleared"], step)
    message = (f"evaluation at step {step}: mean {result['mean']:.1f}, max {result['max']:.0f}, "
               f"{result['cleared']}/{args.eval_games} cleared the wall")
    if counters.best_eval is None or result["mean"] > counters.best_eval:
        counters.best_eval = result["mean"]
        save_snapshot(run.evaluating.weights, session.run_dir / "best.pth")
        message += "; best so far, saved best.pth"
    tqdm.write(message)
    if result["cleared"] and counters.first_clear is None:
        counters.first_clear = [step, seconds]
        tqdm.write(f"WALL CLEARED for the first time: agent step {step}, {seconds / 60:.1f} minutes into the run")
        if log.tb is not None:
            log.tb.add_scalar("eval/first_wall_clear_minutes", seconds / 60, step)
    run.evaluating = PendingEvaluation()


def save_full_checkpoint(run: Run, session: Session, beside: bool = True) -> None:
    """resume/<step>/ from the run's state at this step, written beside training: what training changes in place
    is copied now (not the replay frames, which a RingSnapshot keeps), the rest goes on on a thread. One save
    at a time: a save still being written is waited for first. Where the copies would not fit in the available
    RAM, the checkpoint is written while training waits. A failed save keeps the previous checkpoint and
    training goes on."""
    wait_for_save(session)
    started = time.time()
    run.counters.seconds = session.elapsed()
    root, name = session.run_dir / "resume", f"{run.counters.steps:012d}"
    tensors, arrays, values = checkpoint_files(run)
    # Arrays training writes again; read-only ones (the history's rows so far) and the frames it does not.
    changing = {k: a for k, a in arrays.items() if isinstance(a, np.ndarray) and a.flags.writeable}
    needed = sum(a.nbytes for a in changing.values())
    if beside and needed >= 0.5 * psutil.virtual_memory().available:
        beside = False
        if not session.said_saves_inline:
            session.said_saves_inline = True
            tqdm.write(f"note: a copy of the run's state ({needed / 2**30:.1f} GiB) does not fit in the available "
                       "RAM, so checkpoints are written while training waits")
    if not beside:
        write_full_checkpoint(root, name, tensors, arrays, values, session.args.keep_checkpoints, started)
        return
    tensors, values = frozen(tensors), json.loads(json.dumps(values))
    arrays = {**arrays, **{k: a.copy() for k, a in changing.items()}}
    session.saving = Beside(lambda: write_full_checkpoint(root, name, tensors, arrays, values,
                                                          session.args.keep_checkpoints, started), "checkpoint")
    session.saving.start()


def write_full_checkpoint(root: Path, name: str, tensors: dict, arrays: dict, values: dict, keep: int,
                          started: float) -> None:
    try:
        folder = save_checkpoint(root, name, tensors, arrays, values, keep=keep)
    except OSError as e:
        earlier = bool(checkpoint_folders(root))
        tqdm.write(f"warning: could not write a checkpoint ({e.strerror or e}); " +
                   ("the previous one is kept and training goes on" if earlier else
                    "there is no earlier one, so this run cannot be resumed yet; training goes on"))
        return
    size = sum(f.stat().st_size for f in folder.iterdir())
    tqdm.write(f"checkpoint: {folder} ({size / 1e6:.1f} MB in {time.time() - started:.1f} s)")


def wait_for_save(session: Session) -> None:
    """Wait for the checkpoint being written beside training, if any (a wait cut short by a second Ctrl-C
    leaves it there, for train()'s last wait)."""
    saving = session.saving
    if saving is not None:
        saving.finished.wait()
        session.saving = None
        if saving.error is not None:
            tqdm.write(f"warning: could not write a checkpoint ({type(saving.error).__name__}: {saving.error})")


def finish(run: Run, session: Session) -> None:
    """The last evaluation's result, snapshot and curve when the budget is spent, a full checkpoint (holding an
    evaluation still playing when the run was stopped, to be played again on resume), and how to go on."""
    session.bar.close()
    counters, run_dir = run.counters, session.run_dir
    spent = not session.budget_left(counters)
    if run.evaluating.step is not None:  # the run's last result is waited for; a stopped run saves it to replay
        collect_evaluation(run, session, wait=spent)
    if run.evaluating.step is not None:
        print(f"the evaluation of step {run.evaluating.step} was still playing: the checkpoint keeps it, and the "
              "resumed run plays it again", flush=True)
    session.evaluations.close(timeout=5 if spent else 0)
    if spent:
        save_snapshot(run.target_net, run_dir / f"{counters.episodes}.pth")
        # Training is over: a process is started for this last curve only if one is running already.
        draw_curve_beside(run, session, here=session.curves.process is None)
    save_full_checkpoint(run, session, beside=False)
    session.curves.close(timeout=120)
    session.log.close()
    run.games.close()
    if session.stop.signal is not None:
        print(f"stopped by {session.stop.signal} at episode {counters.episodes}, agent step {counters.steps}; "
              f"continue with:\n  python train_breakout.py --resume --checkpoints {run_dir}")
    else:
        print(f"done: {counters.episodes} episodes, {counters.steps} agent steps, {counters.updates} updates in "
              f"{session.elapsed() / 60:.1f} minutes; snapshot {run_dir / (str(counters.episodes) + '.pth')}")


def train(args: Args, given: set) -> dict:
    """Train until the budget is spent or a stop is asked for; returns the counters and a few figures."""
    check_args(args)
    args, run_dir, checkpoint = prepare_run(args, given)
    device = pick_device(args.device)
    torch.set_num_threads(torch_threads(args, device, learning=False))
    if device.type == "cuda":  # TF32 for float32 matrix products (convolutions use it by default)
        torch.set_float32_matmul_precision("high")
    games = make_games(args.env, args.envs, args.seed)
    replay_bytes = ReplayMemory.bytes_needed(args.memory, args.envs, args.frames, args.steps_per_transition,
                                             args.n_step)
    check_memory_fits(replay_bytes, device)
    print(describe(args, device, replay_bytes), flush=True)
    resumed = checkpoint is not None
    open_run_folder(run_dir, args, len(games.actions), new=not resumed)
    run = new_run(args, device, games)
    if resumed:
        restore(run, checkpoint, args, given)
    else:
        start_games(run, args)
    del checkpoint  # an older one maps its .npy files: Windows could not delete its folder when it rotates out
    session = Session(args, run_dir, device, run, resumed)
    try:
        if run.evaluating.step is not None:  # it was playing beside training when the checkpoint was taken
            tqdm.write(f"playing again the evaluation of step {run.evaluating.step}, which was playing when the "
                       "checkpoint was taken")
            play_evaluation(run, session)
        while session.budget_left(run.counters) and session.stop.signal is None:
            actions = act(run, session)
            run.games.send(actions)
            if session.overlap:  # the last step's updates, while the emulator's threads play this one
                learn(run, session)
            outcome = step_games(run, session)
            store_transitions(run, actions, outcome)
            if not session.overlap:
                learn(run, session)
            record(run, session, outcome)
            periodic_work(run, session)
        summary = dict(dataclasses.asdict(run.counters), session_seconds=session.seconds(),
                       replay_bytes=replay_bytes, run_dir=str(run_dir))
        finish(run, session)
    finally:  # also after a second Ctrl-C: the checkpoint being written is finished, the curve process ended
        wait_for_save(session)
        session.curves.close(timeout=5)
        session.evaluations.close(timeout=0)
        session.stop.restore()
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
