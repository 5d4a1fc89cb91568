#!/usr/bin/env python
"""Train the Dueling DQN of the Breakout tutorial: the same agent, many times faster, a fraction of the
memory, and a run that survives being stopped.

    python train_breakout.py --episodes 600000 --memory 100000   # train (Ctrl-C saves; --resume goes on)
    python play.py checkpoints/600000.pth                         # watch the agent

The DQN, top to bottom: flags, preprocessing, frame stacking, the replay memory, the transition rules, the
network, exploration, the learning step, evaluation, the run's state (declared once in `Run`, which a full
checkpoint saves and restores field by field) and the loop, a handful of named steps over that state. The
support code is in trainer_support/, a module per concern (docs/code.md); docs/recipes.md explains the recipe.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

# A scheduler's SIGTERM while the modules are imported is kept: train() ends the start at once, with the line a
# requeue looks for; one that comes after the start has written its first file is honoured at the first step.
TERMINATED_AT_START: list = []
if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: TERMINATED_AT_START.append(signum))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from trainer_support.atari import (OneGame, VectorGames, ale_settings, check_games_fit, cores_in_use,  # noqa: E402
                                   fire_action, make_games)
from trainer_support.background import (Helper, StoppedWhileStarting, StopRequest, frozen,  # noqa: E402
                                        stops_end_the_start)
from trainer_support.checkpoint import (DamagedCheckpoint, load_rows, restore_state, save_full_checkpoint,  # noqa: E402
                                        say_if_not_saved)
from trainer_support.cli import (NOT_NEGATIVE, POSITIVE, UNIT, RunFailed, UserError, check_bounds,  # noqa: E402
                                 command, flag, flag_parser, run_command, start_up_table)
from trainer_support.compiling import InUse, compare, compiled  # noqa: E402
from trainer_support.device import (EVAL_BESIDE_CORES, Staging, check_memory_fits, pick_device, switches,  # noqa: E402
                                    threads_for, torch_threads, usable_cores)
from trainer_support.curve import History  # noqa: E402
from trainer_support.files import Writes, save_snapshot, say_if_short_of_space, write_json  # noqa: E402
from trainer_support.logs import LearningStats, Progress, RunLog, log_friendly_output  # noqa: E402
from trainer_support.schedule import Every  # noqa: E402
from trainer_support.run_folder import (FolderLock, check_run_folder, checkpoints_to_try, clear_leftovers,  # noqa: E402
                                        config_of, new_run_id, resume_newest, resumed_args, run_folder)
from trainer_support.video import GameVideos  # noqa: E402


# ---- Arguments: every field is a flag; new_on_resume marks those that only say where, how long or how visibly.
@dataclass
class Args:
    # How long, and where things go
    episodes: int = flag(5_000_000, "lives to train for (the tutorial's episode ends when a life is lost)",
                         POSITIVE, new_on_resume=True)
    steps: Optional[int] = flag(None, "also stop after this many agent steps", POSITIVE, new_on_resume=True)
    minutes: Optional[float] = flag(None, "also stop after this many minutes of training", POSITIVE, new_on_resume=True)
    checkpoints: str = flag("checkpoints", "the run's folder: snapshots, config.json, metrics, full checkpoints",
                            new_on_resume=True)
    resume: Optional[str] = flag(None, "continue the run in --checkpoints, or from the checkpoint folder given",
                                 new_on_resume=True, nargs="?", const="latest", metavar="PATH")
    auto_resume: bool = flag(False, "continue the run in --checkpoints if it has a checkpoint, else start it: one "
                                    "command for every start of a Colab cell or a requeued cluster job",
                             new_on_resume=True)
    keep_checkpoints: int = flag(2, "full checkpoints kept on disk, the newest", POSITIVE, new_on_resume=True)
    checkpoint_minutes: float = flag(10.0, "minutes between full checkpoints (Ctrl-C and SIGTERM also save one)",
                                     POSITIVE, new_on_resume=True)
    save_every: int = flag(25_000, "save the target network as <episode>.pth every this many episodes",
                           POSITIVE, new_on_resume=True)
    plot_every: int = flag(2_500, "redraw curve.png every this many episodes, at most once a minute", POSITIVE,
                           new_on_resume=True)
    eval_every: int = flag(500_000, "agent steps between evaluations (0: never)", NOT_NEGATIVE, new_on_resume=True)
    eval_games: int = flag(10, "games per evaluation", POSITIVE, new_on_resume=True)
    eval_eps: float = flag(0.01, "epsilon during evaluation", UNIT, new_on_resume=True)
    eval_beside: str = flag("auto", "play evaluations in a process of their own while training goes on (auto: on "
                                    f"with {EVAL_BESIDE_CORES} or more cores; with fewer they would only take the "
                                    "emulator's cores)", new_on_resume=True, choices=["auto", "on", "off"])
    capture_video: bool = flag(False, "save each evaluation's best game to videos/ as MP4", new_on_resume=True)
    progress_every: float = flag(60.0, "seconds between progress lines where the output is not a terminal (a log "
                                       "file, Slurm, nohup); on a terminal, a progress bar", POSITIVE,
                                 new_on_resume=True)
    # The machine
    env: str = flag("ALE/Breakout-v5", "Gymnasium id of any ALE game")
    envs: int = flag(min(max(16, usable_cores()), 64), "games stepped together; 1 steps one gym.make environment",
                     POSITIVE)
    device: str = flag("auto", "where to learn and keep the replay memory", new_on_resume=True,
                       choices=["auto", "cpu", "cuda", "mps"])
    threads: int = flag(0, "CPU threads for torch (0: the number of cores)", NOT_NEGATIVE, new_on_resume=True)
    compile: str = flag("auto", "compile the learning update and acting with torch.compile, replayed as CUDA graphs "
                                "on CUDA (auto: on for CUDA)", new_on_resume=True, choices=["auto", "on", "off"])
    overlap: str = flag("auto", "learn while the games step, acting on weights one step behind (auto: on for CUDA "
                                "with --envs > 1; off: act, step, store, learn in turn)", new_on_resume=True,
                        choices=["auto", "on", "off"])
    seed: Optional[int] = flag(None, "random seed (default: drawn at random and written to config.json)",
                               f"[0, {2**31 - 1}]")
    # The recipe: the tutorial's values unless --recipe fast (see RECIPES); explicit flags override either
    recipe: str = flag("tutorial", "starting values of the flags below", choices=["tutorial", "fast"])
    memory: int = flag(100_000, "replay memory capacity in stored transitions", POSITIVE)
    batch_size: int = flag(256, "transitions per gradient update", POSITIVE)
    learn_start: Optional[int] = flag(None, "stored transitions before learning starts (default: --memory)",
                                      NOT_NEGATIVE)
    frames: int = flag(6, "frames per state", POSITIVE)
    block: Optional[int] = flag(None, "agent steps behind one stored transition (default: --frames, the "
                                      "tutorial's rule: its reward is the block's sum, its next state 1 step on)",
                                POSITIVE)
    n_step: int = flag(1, "n-step returns: next state n steps on, reward the discounted n-step sum (needs --block 1)",
                       POSITIVE)
    double: bool = flag(False, "Double DQN targets: the policy network picks the next action, the target rates it")
    lr: float = flag(1e-4, "AdamW learning rate (amsgrad)", POSITIVE)
    gamma: float = flag(0.99, "discount", "(0, 1]")
    tau: float = flag(0.005, "soft target update: target = tau * policy + (1 - tau) * target", "(0, 1]")
    eps_start: float = flag(1.0, "epsilon at step 0", UNIT)
    eps_end: float = flag(0.01, "epsilon the schedule decays to", UNIT)
    eps_decay: float = flag(25_000_000, "agent steps of the epsilon decay (the time constant when exponential)",
                            POSITIVE)
    eps_schedule: str = flag("exponential", "shape of the epsilon decay", choices=["exponential", "linear"])
    update_every: int = flag(4, "stored transitions per gradient update", POSITIVE)
    target_every: int = flag(400, "stored transitions per soft target update", POSITIVE)
    no_random_erasing: bool = flag(False, "do not erase random patches of the brick rows in training")
    no_reward_clipping: bool = flag(False, "learn from raw game rewards instead of rewards clipped to [-1, 1]")

    # The defaults that depend on other flags.
    @property
    def steps_per_transition(self) -> int:
        return self.frames if self.block is None else self.block

    @property
    def transitions_before_learning(self) -> int:
        return self.memory if self.learn_start is None else self.learn_start


# --recipe fast: a modern recipe for the same network, tuned for wall-clock time (docs/recipes.md).
RECIPES = {
    "tutorial": {},
    "fast": dict(block=1, n_step=3, memory=200_000, batch_size=64, learn_start=20_000, lr=2.5e-4,
                 update_every=32, target_every=16_000, tau=1.0, eps_schedule="linear", eps_decay=200_000,
                 eval_every=100_000),
}


def parse_args(argv=None) -> tuple[Args, set]:
    """The arguments (the recipe's values where no flag was given), and the names of the flags given."""
    parsed = vars(flag_parser(Args, __doc__).parse_args(argv))
    given = set(vars(flag_parser(Args, __doc__, suppress_defaults=True).parse_args(argv)))
    parsed.update({k: v for k, v in RECIPES[parsed["recipe"]].items() if k not in given})
    return Args(**parsed), given


def check_args(a: Args) -> None:
    """Refuse impossible values before anything is allocated: each flag against its bounds, then the pairs."""
    check_bounds(a)
    ale_settings(a.env)
    if a.n_step > 1 and a.block != 1:
        raise UserError("--n-step above 1 needs --block 1 (one stored transition per agent step)")
    if a.memory < a.batch_size:
        raise UserError(f"--memory ({a.memory}) must be at least --batch-size ({a.batch_size})")


# ---- Preprocessing: the tutorial's crop, grey and resize, kept as uint8 (the tutorial's float is this / 255).
SIZE = 84
# Random erasing: 10 tries, each taken with probability 0.1, zeroing a 4x10 patch whose top-left corner
# lies in rows 10..25 and columns 0..70 (inclusive): where the bricks are after cropping.
ERASE_TRIES, ERASE_P, ERASE_H, ERASE_W, ERASE_ROWS, ERASE_COLS = 10, 0.1, 4, 10, (10, 25), (0, 70)


# OpenCV's own threads wait for work by spinning, on the cores the games' threads are pinned to; on one thread
# the frames take as long and the games step faster (BENCHMARKS.md, "The loop at the emulator's speed").
cv2.setNumThreads(1)


def preprocess_all(screens: np.ndarray, erase_rng: Optional[np.random.Generator],
                   screen_lut: Optional[np.ndarray] = None) -> np.ndarray:
    """Screens (RGB, or greyscale through `screen_lut`) to (N,84,84) uint8, erased when `erase_rng` is given."""
    n = len(screens)
    if screen_lut is None:
        # COLOR_BGR2GRAY on an RGB frame swaps the red and blue weights; the tutorial did this, and its
        # weights expect it. One call for the whole batch, stacked as one tall image.
        grey = cv2.cvtColor(screens.reshape(n * 210, 160, 3), cv2.COLOR_BGR2GRAY).reshape(n, 210, 160)
        cropped = grey[:, 32:, 8:152]
    else:  # the rows below the score only, each game's a row of one image
        cropped = cv2.LUT(screens.reshape(n, 210 * 160)[:, 32 * 160:], screen_lut).reshape(n, 178, 160)[:, :, 8:152]
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
    """What the agent sees of each game: its `depth` latest frames, newest first (channel 0); zeros at a new game,
    not cleared at a lost life. A ring, so a push writes one frame per game instead of moving the stack."""

    def __init__(self, n: int, depth: int, device: torch.device):
        self.ring = torch.zeros((n, depth, SIZE, SIZE), dtype=torch.uint8, device=device)
        self.newest = 0  # ring[:, newest] is the newest frame, ring[:, newest + 1] the one before, and so on

    def __len__(self) -> int:
        return self.ring.shape[0]

    def push(self, frames: torch.Tensor, new_game: np.ndarray) -> None:
        """One frame per game; `new_game` (bool per game, on the host) marks the first frame of a game, whose
        older frames are cleared: no work at all in the steps where no game starts, most of them."""
        self.newest = (self.newest - 1) % self.ring.shape[1]
        if new_game.any():
            starting = torch.from_numpy(np.flatnonzero(new_game)).to(self.ring.device, non_blocking=True)
            self.ring.index_fill_(0, starting, 0)
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
class Batch(NamedTuple):
    """Transitions sampled for one update: (B, depth, 84, 84) uint8 stacks, actions, rewards, has_next."""
    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_states: torch.Tensor
    has_next: torch.Tensor


class ReplayMemory:
    """FIFO of `capacity` transitions (state, action, block reward, next state or none). Frames live in a ring
    `frames[slot, game]`: each agent step writes one frame per game at the same slot (the frame after the step,
    or the next game's first). A transition is (game, slot of its state's newest frame, action, reward,
    has_next); its state is the `depth` frames up to that slot, its next state the same `n_step` slots on, zeros
    before a game's first frame. A transition spans at most `block` agent steps, so a ring of block * capacity /
    games slots (plus a margin) keeps every frame a stored transition needs: about `block` per transition."""

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
        """Store transitions, oldest first, in one copy to the device (int64 rows, the rewards' float32 bits among
        them)."""
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
        """(B,) games and newest slots to the states and next states `n_step` slots on, (B, depth, 84, 84) uint8,
        zeros before a game's start; their depth + n slots are gathered once."""
        n, d = self.n_step, self.depth
        frames, starts = self._window(game, slot + n, d + n)
        next_states = self._clear_before_game_start(frames[:, :d].clone(), starts[:, :d])
        states = self._clear_before_game_start(frames[:, n:], starts[:, n:])
        return states, next_states

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A uniform batch, on the device."""
        return self.batch(torch.randint(len(self), (batch_size,), device=self.device, generator=generator))

    def batch(self, i: torch.Tensor) -> Batch:
        """The transitions at the indices `i` (the first ones, whatever they hold, are what compiling warms up on)."""
        states, next_states = self.stacks(self.game[i], self.slot[i])
        return Batch(states=states, actions=self.action[i], rewards=self.reward[i], next_states=next_states,
                     has_next=self.has_next[i])

    ARRAYS = ("frames", "game_start", "game", "slot", "action", "reward", "has_next")  # a checkpoint's arrays

    def state_dict(self) -> dict:
        """The tables (the frames as a tensor, which a checkpoint writes a chunk at a time), and the two counters.
        Only the part written so far is kept, so an early checkpoint is small."""
        slots_used, transitions = min(self.frames_written, self.slots), len(self)
        state = {name: getattr(self, name)[:slots_used if name == "game_start" else transitions].cpu().numpy()
                 for name in self.ARRAYS if name != "frames"}
        return dict(state, frames=self.frames[:slots_used], frames_written=self.frames_written, stored=self.stored)

    def load_state_dict(self, state: dict) -> None:
        for name in self.ARRAYS:
            target, source = getattr(self, name), state[name]
            if source.shape[1:] != target.shape[1:] or len(source) > len(target):
                raise UserError(f"the checkpoint's replay memory has {name} of shape {source.shape}, which "
                                f"does not fit this run's {tuple(target.shape)}")
            if target.device.type != "cpu":  # a chunk at a time through host memory
                load_rows(source, target[:len(source)])
            elif hasattr(source, "read_into"):  # straight from the checkpoint's file into the tensor, no copy between
                source.read_into(target[:len(source)].numpy())
            else:
                target[:len(source)].numpy()[...] = source
        self.frames_written, self.stored = int(state["frames_written"]), int(state["stored"])


# ---- Transition rules: how each game's agent steps become stored transitions. Both have one method, `store`,
# called once per agent step; their attributes (the transitions being built) go into full checkpoints.
class BlockRule:
    """The tutorial's rule: a block of up to `block` agent steps makes one transition with the first step's
    state and action, the state right after that step as next state (none if the life ended there), and the
    sum of the block's rewards. A block ends every `block` steps of its game, or when the life ends."""
    ARRAYS = ("open", "slot", "action", "has_next", "reward")  # a checkpoint's arrays

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
        # The tutorial's quirk: the next state is the one right after the block's *first* step (its replay slot
        # is state_slot + 1), while the reward sums the whole block; a life lost on that first step has none.
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
    ARRAYS = ("count", "slot", "action", "returns")  # a checkpoint's arrays

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


# ---- Exploration: epsilon-greedy; the schedule is the tutorial's exponential decay, or linear (--recipe fast).
def epsilon(step: int, a: Args) -> float:
    if a.eps_schedule == "linear":
        return max(a.eps_end, a.eps_start - (a.eps_start - a.eps_end) * step / a.eps_decay)
    return a.eps_end + (a.eps_start - a.eps_end) * math.exp(-step / a.eps_decay)


@torch.no_grad()
def greedy_actions(policy: nn.Module, stacks: torch.Tensor) -> torch.Tensor:
    return policy(as_input(stacks)).argmax(1)


def choose_actions(policy: nn.Module, stack: FrameStack, eps: float, n_actions: int, rng: np.random.Generator,
                   need_fire: np.ndarray, fire: Optional[int], greedy=None) -> np.ndarray:
    """The one way training, evaluation and play.py act: epsilon-greedy actions for every game of `stack`, and FIRE
    for the games in `need_fire`, whose life starts, so that the ball is served. Given `greedy` (greedy_actions or
    it compiled), one forward pass of every game (one fixed shape); without, of the greedy ones only (CPU)."""
    n = len(stack)
    explore = rng.random(n) < eps
    actions = rng.integers(n_actions, size=n)
    chosen = np.flatnonzero(~explore)
    if len(chosen) and greedy is not None:
        actions[chosen] = greedy(policy, stack.frames).cpu().numpy()[chosen]
    elif len(chosen):
        stacks = stack.frames  # put in order only when a forward pass needs them
        actions[chosen] = greedy_actions(policy, stacks[torch.from_numpy(chosen).to(stacks.device)]).cpu().numpy()
    if fire is not None:
        actions[need_fire] = fire
    return actions


def lives_starting(games, fire: Optional[int], need_fire: np.ndarray, ended: np.ndarray, lives: np.ndarray,
                   new_lives: np.ndarray) -> np.ndarray:
    """Outside training, the games whose next action must be FIRE: a new game or a lost life, and a FIRE that
    sticky actions swallowed (all 4 of its frames repeated the previous action, 1 life in 256), which would leave
    a greedy agent waiting with the ball unserved. Training presses FIRE once per life, as the tutorial did."""
    swallowed = need_fire & games.fire_swallowed(fire) if fire is not None else False
    return ended | (new_lives < lives) | swallowed


# ---- Learning step: one gradient update of the policy network on a uniform batch.
class Learned(NamedTuple):
    """The Huber loss and mean Q of an update, as device tensors (no host round trip)."""
    loss: torch.Tensor
    mean_q: torch.Tensor


def td_loss(policy: nn.Module, target: nn.Module, batch: Batch, discount: float, double: bool) -> Learned:
    """Huber loss to the Q-learning target r + discount * max_a Q_target(s', a), 0 past a lost life (Mnih et
    al., 2015), or with `double` Q_target(s', argmax_a Q_policy(s', a)) (van Hasselt et al., 2016); and the
    batch's mean Q."""
    q = policy(as_input(batch.states)).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        next_input = as_input(batch.next_states)
        next_all = target(next_input)
        if double:
            next_q = next_all.gather(1, policy(next_input).argmax(1, keepdim=True)).squeeze(1)
        else:
            next_q = next_all.max(1).values
        targets = batch.rewards + discount * next_q * batch.has_next
    return Learned(loss=F.smooth_l1_loss(q, targets), mean_q=q.detach().mean())


def td_gradients(policy: nn.Module, target: nn.Module, batch: Batch, discount: float, double: bool,
                 loss_fn=td_loss) -> Learned:
    """The forward and backward pass of an update: `loss_fn` (td_loss or it compiled) of `batch`, its gradients
    in the policy's `.grad`."""
    loss, mean_q = loss_fn(policy, target, batch, discount, double)
    policy.zero_grad(set_to_none=True)
    loss.backward()
    return Learned(loss.detach(), mean_q)


def td_update(policy: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, gamma: float,
              n_step: int = 1, double: bool = False, loss_fn=td_loss, fallback=None) -> Learned:
    """One gradient step on `loss_fn` (td_loss or it compiled); the discount is gamma^n_step. No host round trip.
    Given `fallback`, a compiled pass that raises is handed to it, and the step is made with td_loss."""
    try:
        learned = td_gradients(policy, target, batch, gamma ** n_step, double, loss_fn)
    except Exception as e:
        if fallback is None or loss_fn is td_loss:
            raise
        fallback(e)
        learned = td_gradients(policy, target, batch, gamma ** n_step, double)
    torch.nn.utils.clip_grad_value_(policy.parameters(), 1000)  # the tutorial's bound
    optimizer.step()
    return learned


@torch.no_grad()
def soft_update(target: nn.Module, policy: nn.Module, tau: float) -> None:
    for t, p in zip(target.parameters(), policy.parameters()):
        t.lerp_(p, tau)


# ---- Evaluation: greedy-ish games on their own environment; the rows of metrics.csv and of curve.png.
WALL_CLEARED = 432  # Breakout's first wall is 108 bricks; a game score of 432 means all of them are gone


@torch.no_grad()
def evaluate(policy: nn.Module, env_id: str, games: int, eps: float, depth: int, device: torch.device,
             seed: int, video: Optional[str] = None, threads: Optional[int] = None) -> dict:
    """Play `games` whole games (epsilon `eps`, no erasing), the best of them to `video`; not part of training."""
    env = make_games(env_id, games, seed, rgb=True, threads=threads)
    fire = fire_action(env.actions)
    rng = np.random.default_rng(seed)
    rgb, lives = env.reset()
    stack = FrameStack(games, depth, device)
    stack.push(torch.from_numpy(preprocess_all(rgb, None)).to(device), np.ones(games, bool))
    need_fire, finished = np.ones(games, bool), np.zeros(games, bool)
    scores, lengths = np.zeros(games), np.zeros(games, np.int64)
    videos = GameVideos(video, rgb) if video else None
    while not finished.all():
        actions = choose_actions(policy, stack, eps, len(env.actions), rng, need_fire, fire)
        rgb, reward, terminated, truncated, new_lives = env.step(actions)
        playing = ~finished
        scores += reward * playing
        lengths += playing
        ended = terminated | truncated
        if videos:
            videos.add(rgb, scores, playing & ~ended)
        need_fire = lives_starting(env, fire, need_fire, ended, lives, new_lives)
        finished |= ended
        lives = new_lives
        stack.push(torch.from_numpy(preprocess_all(rgb, None)).to(device), ended)
    env.close()
    if videos:
        videos.keep(int(np.argmax(scores)))
    return dict(scores=scores.tolist(), lengths=lengths.tolist(), mean=float(scores.mean()),
                max=float(scores.max()), cleared=int((scores >= WALL_CLEARED).sum()))


METRIC_COLUMNS = ["kind", "step", "seconds", "episode", "score", "lives_lost", "epsilon", "loss", "mean_q",
                  "steps_per_s", "replay_fill"]


# ---- The run's state, declared once: a full checkpoint saves and restores every field of `Run` (trainer_support.
# checkpoint walks them; a part's ARRAYS go to compressed files), so a field added to Run needs no other edit.
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
    """Per game in play: lives left, whether FIRE is next, the game's and the life's score, lives lost."""
    ARRAYS = ("lives", "need_fire", "game_score", "life_score", "lives_lost")  # a checkpoint's arrays
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
    history: History                     # what curve.png draws (trainer_support.curve)
    snapshots: Every                     # <episode>.pth every --save-every episodes
    curve: Every                         # curve.png every --plot-every episodes
    evaluations: Every                   # an evaluation every --eval-every agent steps


def new_run(args: Args, device: torch.device, games) -> Run:
    """A run at step 0; its games are started by `start_games`, or come back from a checkpoint."""
    torch.manual_seed(args.seed)  # the networks' first weights
    sampler = torch.Generator(device=device)
    sampler.manual_seed(args.seed)
    n_actions, n, block = len(games.actions), args.envs, args.steps_per_transition
    policy_net = DuelingNetwork(args.frames, n_actions).to(device, memory_format=torch.channels_last)
    target_net = DuelingNetwork(args.frames, n_actions).to(device, memory_format=torch.channels_last)
    target_net.load_state_dict(policy_net.state_dict())
    # The fused kernel is the same AdamW, in one pass over the parameters.
    optimizer = torch.optim.AdamW(policy_net.parameters(), lr=args.lr, amsgrad=True,
                                  fused=device.type in ("cpu", "cuda") or None)
    return Run(games=games, policy_net=policy_net, target_net=target_net, optimizer=optimizer, sampler=sampler,
               rng=np.random.default_rng(args.seed),
               replay=ReplayMemory(args.memory, n, args.frames, block, device, args.n_step),
               stack=FrameStack(n, args.frames, device),
               transitions=BlockRule(n, block) if args.n_step == 1 else NStepRule(n, args.n_step, args.gamma),
               tracking=GameTracking.new_games(np.zeros(n, np.int64)), counters=Counters(),
               learning=LearningStats(device), history=History(WALL_CLEARED),
               snapshots=Every.counting_from(args.save_every), curve=Every.counting_from(args.plot_every),
               evaluations=Every.counting_from(args.eval_every))


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


def restore(run: Run, checkpoint, args: Args, given: set) -> None:
    """Bring the run back to its checkpoint (games that cannot come back start afresh); new intervals count on."""
    folder, (state, arrays, _) = checkpoint
    why_afresh = restore_state(run, state, arrays)
    if "save_every" in given:
        run.snapshots = Every.counting_from(args.save_every, run.counters.episodes)
    if "plot_every" in given:
        run.curve = Every.counting_from(args.plot_every, run.counters.episodes)
    if "eval_every" in given:
        run.evaluations = Every.counting_from(args.eval_every, run.counters.steps)
    if why_afresh:
        print(f"note: {why_afresh}, so the games start afresh; the transitions being built when the checkpoint "
              "was taken are dropped", flush=True)
        start_games(run, args)
    print(f"resumed from {folder}: episode {run.counters.episodes}, agent step {run.counters.steps}", flush=True)


# ---- Starting: a new run, or the one a checkpoint continues; and this process's share of it.
def compiled_functions(run: Run, args: Args, device: torch.device):
    """td_loss and greedy_actions compiled and warmed up on the run's own networks (their backward pass too, no
    optimiser step) and on inputs with the loop's shapes and strides, each at its own thread count; or None."""
    batch = run.replay.batch(torch.zeros(args.batch_size, dtype=torch.int64, device=device))

    def warm_up(loss_fn, greedy):
        try:
            with threads_for(args, device, learning=True):
                td_gradients(run.policy_net, run.target_net, batch, args.gamma ** args.n_step, args.double, loss_fn)
            with threads_for(args, device, learning=False):
                greedy(run.policy_net, run.stack.frames)
        finally:
            run.policy_net.zero_grad(set_to_none=True)
    return compiled((td_loss, greedy_actions), device.type == "cuda", warm_up)


def compiled_mismatch(run: Run, args: Args, batch: Batch, loss_fn, greedy) -> Optional[str]:
    """What differs between the compiled update and acting and the eager ones, on `batch` and the games' stacks,
    beyond float rounding (compiling.compare), or None. Changes nothing."""
    policy, passes = run.policy_net, []
    try:
        for fn in (loss_fn, td_loss):
            learned = td_gradients(policy, run.target_net, batch, args.gamma ** args.n_step, args.double, fn)
            passes.append((learned.loss.clone(), learned.mean_q.clone(), [p.grad.clone() for p in policy.parameters()]))
    finally:  # the next update starts from no gradients, whether the check ended or raised
        policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        q = policy(as_input(run.stack.frames))
    with threads_for(args, batch.states.device, learning=False):
        actions = greedy(policy, run.stack.frames)
    return compare(*passes, [name for name, _ in policy.named_parameters()], q, actions)


class Session:
    """This process's share of a run, none of it saved: flags, folder, log, clock, progress, helpers, stop request."""

    def __init__(self, args: Args, run_dir: Path, device: torch.device, run: Run, resumed: bool, writes: Writes,
                 config: dict, lock: FolderLock):
        self.args, self.run_dir, self.device, self.lock = args, run_dir, device, lock
        self.folder_checked = time.time()  # when the folder was last seen to be the one locked
        self.writes, self.config = writes, config  # the writes that may fail; config.json, written again if it did
        self.unsaved_best: Optional[dict] = None  # the weights of a best evaluation whose best.pth failed
        self.n_actions, self.fire = len(run.games.actions), fire_action(run.games.actions)
        self.log = RunLog(run_dir, METRIC_COLUMNS, run.counters.steps if resumed else None, writes)
        if not resumed:
            self.log.table("hyperparameters", dataclasses.asdict(args))
        self.switches = on = switches(args, device)
        # Acting on CPU forwards only the games that act greedily; elsewhere all of them, with no upload.
        self.functions = InUse(td_loss, greedy_actions, on.compile and compiled_functions(run, args, device) or None,
                               greedy_actions if device.type != "cpu" else None)
        self.started, self.seconds_before = time.time(), run.counters.seconds
        self.checkpoint_due = Every.counting_from(60 * args.checkpoint_minutes)  # counting this session's seconds
        # Progress follows the budget that was given: minutes (in seconds), else agent steps, else episodes.
        total, unit = ((round(60 * args.minutes), "s") if args.minutes is not None else
                       (args.steps, "step") if args.steps is not None else (args.episodes, "ep"))
        self.progress = Progress(total, unit, self.done(run.counters), run.counters.steps, args.progress_every,
                                 progress_figures(run, args))
        self.staging = Staging(device)  # the frames' upload
        self.evaluations = Helper("evaluations")  # the process evaluations play in beside training
        self.evaluating: Optional[Evaluation] = None  # the evaluation playing there now
        self.stop = StopRequest()  # last: train() gives the signals back from here on
        if TERMINATED_AT_START:
            self.stop.signal = "SIGTERM"

    def seconds(self) -> float:
        return time.time() - self.started

    def elapsed(self) -> float:
        """Training time of the whole run."""
        return self.seconds_before + self.seconds()

    def done(self, counters: Counters) -> float:
        """How much of the budget the bar follows is spent."""
        a = self.args
        return self.elapsed() if a.minutes is not None else counters.steps if a.steps is not None else counters.episodes

    def budget_left(self, counters: Counters) -> bool:
        a = self.args
        return (counters.episodes < a.episodes and (a.steps is None or counters.steps < a.steps)
                and (a.minutes is None or self.elapsed() < 60 * a.minutes))


# ---- The training loop, step by step: act, step the games, store transitions, learn, record, periodic work.
def act(run: Run, session: Session) -> np.ndarray:
    """Epsilon-greedy actions for every game, FIRE wherever a life starts."""
    return choose_actions(run.policy_net, run.stack, epsilon(run.counters.steps, session.args), session.n_actions,
                          run.rng, run.tracking.need_fire, session.fire,
                          session.functions.greedy_actions if session.functions.greedy else None)


class Outcome(NamedTuple):
    """One agent step of every game: the replay slot acted on, the rewards to learn from, lives and games that ended."""
    state_slot: int
    rewards: np.ndarray
    done: np.ndarray
    game_over: np.ndarray


def step_games(run: Run, session: Session) -> Outcome:
    """Finish the step `send` started: score every game, put its new frame into the replay and its stack."""
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
    # The tutorial's quirk: losing a life is learnt as reward -1 for that step (whatever the game scored), and
    # ends the episode: the bootstrap stops there, though the game goes on.
    learn_reward = np.where(life_lost, -1.0, learn_reward).astype(np.float32)
    frames = preprocess_all(screens, erase_rng(run, args), run.games.screen_lut)
    n = len(frames)  # frames and new-game flags go up together, in one copy
    up = session.staging(np.concatenate([frames.reshape(n, -1), game_over.reshape(n, 1).astype(np.uint8)], 1))
    frames = up[:, :-1].view(n, SIZE, SIZE)
    run.replay.add_frames(frames, up[:, -1].bool())
    run.stack.push(frames, game_over)
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
            functions = session.functions
            if functions.unchecked:
                functions.check(lambda loss_fn, greedy: compiled_mismatch(run, args, batch, loss_fn, greedy))
            run.learning.add(*td_update(run.policy_net, run.target_net, run.optimizer, batch, args.gamma,
                                        args.n_step, args.double, functions.loss_fn, functions.failed))
            counters.updates += 1
        if count % args.target_every == 0:
            soft_update(run.target_net, run.policy_net, args.tau)
    if learned:
        torch.set_num_threads(torch_threads(args, session.device, learning=False))


def record(run: Run, session: Session, outcome: Outcome) -> None:
    """Count the lives and games that ended, log each finished game, move the progress bar."""
    counters, tracking = run.counters, run.tracking
    session.progress.measure(counters.steps)
    for i in np.flatnonzero(outcome.done):
        counters.episodes += 1
        counters.life_sum += tracking.life_score[i]
        counters.life_count += 1
        tracking.life_score[i] = 0
    for i in np.flatnonzero(outcome.game_over):
        counters.games += 1
        loss, mean_q = run.learning.take()  # means since the last row; None without updates
        if loss is not None:
            run.history.learning.append([counters.steps, loss, mean_q])
        score, seconds = float(tracking.game_score[i]), session.elapsed()
        run.history.games.append([counters.steps, seconds, score])  # the real score, before clipping
        session.log.row(kind="game", step=counters.steps, seconds=seconds, episode=counters.episodes, score=score,
                        lives_lost=int(tracking.lives_lost[i]), epsilon=epsilon(counters.steps, session.args),
                        loss=loss, mean_q=mean_q, steps_per_s=session.progress.steps_per_s,
                        replay_fill=len(run.replay) / session.args.memory)
        tracking.game_score[i], tracking.lives_lost[i] = 0, 0
    session.progress.show(session.done(counters), counters.steps,
                          progress_figures(run, session.args) if outcome.done.any() else None)


def progress_figures(run: Run, args: Args) -> dict:
    recent = run.history.games.array[-100:, 2]
    return dict(episodes=run.counters.episodes, score=float(np.mean(recent)) if len(recent) else None,
                eps=epsilon(run.counters.steps, args))


def periodic_work(run: Run, session: Session) -> None:
    """Snapshots, curve, evaluations and full checkpoints when due. An evaluation plays beside training where it
    can; a checkpoint that falls due meanwhile is taken once its result is in, so no evaluation crosses one."""
    counters = run.counters
    if time.time() - session.folder_checked >= 1.0 and keep_the_folder(run, session):
        session.checkpoint_due.next = session.seconds()  # now, or once the evaluation playing beside is in
    for episode in run.snapshots.passed(counters.episodes):
        save_episode_snapshot(run, session, episode)
    if run.curve.passed(counters.episodes):
        run.history.lives.append([counters.steps, counters.episodes, counters.life_sum / max(1, counters.life_count)])
        counters.life_sum, counters.life_count = 0.0, 0
        run.history.redraw(session.run_dir / "curve.png", session.args.env, session.writes, at_most_every=60)
    if session.evaluating is not None:
        collect_evaluation(run, session)
    if run.evaluations.passed(counters.steps):
        start_evaluation(run, session)
    if session.evaluating is None and session.checkpoint_due.passed(session.seconds()):
        save_checkpoint(run, session)


class Evaluation(NamedTuple):
    """An evaluation under way: the agent step, episode and seconds of its weights, its number (which seeds its
    games) and the weights."""
    step: int
    episode: int
    seconds: float
    number: int
    weights: dict


CPU = torch.device("cpu")  # where evaluations beside training play


def start_evaluation(run: Run, session: Session) -> None:
    """--eval-games games of the policy's weights now: in the evaluations' process, or (in the loop, or where it
    cannot start) played now. Skipped while the last one still plays: waiting would stop training."""
    args, counters = session.args, run.counters
    if session.evaluating is not None:
        tqdm.write(f"note: the evaluation due at step {counters.steps} is skipped: the one of step "
                   f"{session.evaluating.step} is still playing")
        return
    counters.evals += 1
    evaluation = Evaluation(counters.steps, counters.episodes, session.elapsed(), counters.evals,
                            frozen(run.policy_net.state_dict()))
    video = str(session.run_dir / "videos" / f"eval-{evaluation.step:012d}.mp4") if args.capture_video else None
    settings = (evaluation.weights, args.env, args.eval_games, args.eval_eps, args.frames,
                args.seed + 7919 * evaluation.number, video)
    # Beside training the games play on the CPU: a second CUDA context would take GPU memory the memory check does
    # not count, and a GPU in exclusive-process mode (common on clusters) refuses it.
    threads = max(2, usable_cores() // EVAL_BESIDE_CORES)
    if session.switches.eval_beside and session.evaluations.submit(evaluate_weights, *settings, CPU, threads):
        session.evaluating = evaluation
    else:
        record_evaluation(run, session, evaluation, evaluate_weights(*settings, session.device))


def evaluate_weights(weights: dict, env_id: str, games: int, eps: float, depth: int, seed: int,
                     video: Optional[str], device: torch.device, threads: Optional[int] = None) -> dict:
    """evaluate() of `weights`; in the evaluations' process (`threads` given): unpinned games, one torch thread."""
    if threads is not None:
        torch.set_num_threads(1)
    with torch.device("meta"):  # no initial weights drawn: no draw from torch's generator, nothing to fill twice
        policy = DuelingNetwork(weights["conv1.weight"].shape[1], weights["act_fc2.weight"].shape[0])
    policy = policy.to_empty(device=device).to(memory_format=torch.channels_last)
    policy.load_state_dict(weights)
    return evaluate(policy, env_id, games, eps, depth, device, seed, video, threads)


def collect_evaluation(run: Run, session: Session, wait: bool = False) -> None:
    """The result of the evaluation playing beside training, if it is done (with `wait`, once it is done)."""
    outcome = session.evaluations.poll(wait)
    if outcome is None and not wait:
        return
    evaluation, session.evaluating = session.evaluating, None
    ok, result = outcome or (False, "its process ended")
    if ok:
        record_evaluation(run, session, evaluation, result)
    else:
        tqdm.write(f"warning: the evaluation of step {evaluation.step} failed ({result}); training goes on")


def record_evaluation(run: Run, session: Session, evaluation: Evaluation, result: dict) -> None:
    """Log an evaluation at its weights' step, keep the best as best.pth, announce the first cleared wall."""
    args, counters, log = session.args, run.counters, session.log
    step, seconds = evaluation.step, evaluation.seconds
    run.history.evals.append([step, seconds, result["mean"], result["max"], result["cleared"]])
    log.row(kind="eval", step=step, seconds=seconds, episode=evaluation.episode, score=result["mean"],
            epsilon=args.eval_eps)
    log.scalar("eval/max", result["max"], step)
    log.scalar("eval/games_clearing_the_wall", result["cleared"], step)
    message = (f"evaluation at step {step}: mean {result['mean']:.1f}, max {result['max']:.0f}, "
               f"{result['cleared']}/{args.eval_games} cleared the wall")
    best = counters.best_eval is None or result["mean"] > counters.best_eval
    if best:
        counters.best_eval, session.unsaved_best = result["mean"], evaluation.weights
    if session.unsaved_best is not None and save_best(session):
        message += "; best so far, saved best.pth" if best else "; best.pth written at last"
    elif best:
        message += "; best so far (best.pth is written at the next evaluation)"
    tqdm.write(message)
    if result["cleared"] and counters.first_clear is None:
        counters.first_clear = [step, seconds]
        tqdm.write(f"WALL CLEARED for the first time: agent step {step}, {seconds / 60:.1f} minutes into the run")
        log.scalar("eval/first_wall_clear_minutes", seconds / 60, step)


def save_episode_snapshot(run: Run, session: Session, episode: int) -> None:
    """<episode>.pth, the target network as the tutorial saved it; one that fails is skipped, with a warning."""
    path = session.run_dir / f"{episode}.pth"
    session.writes(path, save_snapshot, run.target_net, path, then="that snapshot is skipped")


def save_best(session: Session) -> bool:
    """best.pth from the best evaluation's weights; where that fails, the next evaluation tries again."""
    path = session.run_dir / "best.pth"
    if session.writes(path, save_snapshot, session.unsaved_best, path):
        session.unsaved_best = None
    return session.unsaved_best is None


def keep_the_folder(run: Run, session: Session) -> bool:
    """Whether the run's folder was deleted under the run (looked at once a second, and before each checkpoint) and
    is taken back: one line, then the folder is made again and locked again, and its log and config.json start
    again; the caller then has a full checkpoint written. Where another trainer has taken the folder meanwhile,
    this run ends without writing there (RunFailed)."""
    session.folder_checked = time.time()
    if not session.lock.lost():
        return False
    run_dir = session.run_dir
    what = f"{run_dir}/" if not run_dir.is_dir() else f"{session.lock.path}, the lock of {run_dir}/,"
    try:
        session.lock.retake()
    except (UserError, OSError) as e:
        reason = e if isinstance(e, UserError) else e.strerror or e
        raise RunFailed(f"{what} was deleted while this run trained, and it cannot be taken back ({reason}); this "
                        f"run ends without writing there, at agent step {run.counters.steps}") from None
    tqdm.write(f"warning: {what} was deleted while this run trained; the folder is locked again (made again if "
               f"need be) and given a full checkpoint (what was deleted is gone), and training goes on")
    session.log.close()
    session.log = RunLog(run_dir, METRIC_COLUMNS, None, session.writes)
    config = run_dir / "config.json"
    session.writes(config, write_json, config, session.config)
    return True


def save_checkpoint(run: Run, session: Session) -> None:
    """resume/<step>/ from the run's state at this step (trainer_support.checkpoint), in the folder still locked."""
    keep_the_folder(run, session)  # a folder deleted since the last look is taken back first
    counters, config = run.counters, session.run_dir / "config.json"
    counters.seconds = session.elapsed()
    summary = dict(step=counters.steps, episode=counters.episodes, games=counters.games, updates=counters.updates,
                   minutes=round(counters.seconds / 60, 2), env=session.args.env, run_id=session.config["run_id"],
                   args=dataclasses.asdict(session.args))
    if session.writes.is_failing(config):
        session.writes(config, write_json, config, session.config)
    save_full_checkpoint(session.run_dir / "resume", run, f"{counters.steps:012d}", summary,
                         session.args.keep_checkpoints)


def finish(run: Run, session: Session) -> None:
    """The last evaluation's result, snapshot and curve when the budget is spent, a full checkpoint, and how to go
    on. No evaluation crosses a checkpoint: a stop does not wait for the one playing beside training, which the
    resumed run plays first."""
    session.progress.close()
    counters, run_dir, spent = run.counters, session.run_dir, not session.budget_left(run.counters)
    if session.evaluating is not None:
        collect_evaluation(run, session, wait=spent)
    if session.evaluating is not None:
        print(f"the evaluation of step {session.evaluating.step} was still playing: the resumed run plays one "
              "first, on the checkpoint's weights", flush=True)
        run.evaluations.next, counters.evals, session.evaluating = session.evaluating.step, counters.evals - 1, None
    session.evaluations.close(timeout=0)
    if spent:
        save_episode_snapshot(run, session, counters.episodes)
        run.history.redraw(run_dir / "curve.png", session.args.env, session.writes)
    if session.unsaved_best is not None:
        save_best(session)
    save_checkpoint(run, session)
    session.log.close()
    run.games.close()
    newest = say_if_not_saved(run_dir / "resume", f"{counters.steps:012d}")  # what a resume goes on from
    go_on = command("train_breakout.py", "--resume", "--checkpoints", run_dir)
    if session.stop.signal is not None:  # the last two lines: a requeue (docs/clusters.md, Slurm) looks for them
        print(f"stopped by {session.stop.signal} at episode {counters.episodes}, agent step {counters.steps}"
              f"{session.functions.outcome()}; continue with:\n  {go_on}", flush=True)
        return
    snapshot = run_dir / f"{counters.episodes}.pth"
    saved = newest is not None and newest.name == f"{counters.steps:012d}"  # the checkpoint of this step
    trained = (f"{counters.episodes} episodes, {counters.steps} agent steps, {counters.updates} updates in "
               f"{session.elapsed() / 60:.1f} minutes{session.functions.outcome()}")
    if not snapshot.is_file() and not saved:  # the trained network is nowhere: not `done:`, which a requeue trusts
        then = (f"{go_on} goes on from its checkpoint of step {int(newest.name):,}" if newest is not None else
                "start it over with its flags and --auto-resume")
        raise RunFailed(f"{trained}, but neither the last snapshot ({snapshot.name}) nor a full checkpoint of this "
                        f"step could be written ({session.writes.failing.get(str(snapshot), 'see the warnings above')})"
                        f"; free space in {run_dir}, then {then}")
    print(f"done: {trained}; " + (f"snapshot {snapshot}" if snapshot.is_file() else
                                  f"the last snapshot could not be written: its network is in {newest}, which "
                                  f"{command('play.py', run_dir)} plays"), flush=True)


def build_run(args: Args, device: torch.device) -> tuple[Run, int]:
    """The games and a run at step 0 for `args`, once its replay memory is known to fit; and the memory's size."""
    games = make_games(args.env, args.envs, args.seed)
    replay_bytes = ReplayMemory.bytes_needed(args.memory, args.envs, args.frames, args.steps_per_transition,
                                             args.n_step)
    try:
        check_memory_fits(replay_bytes, device)
    except UserError:
        games.close()
        raise
    return new_run(args, device, games), replay_bytes


def resume_run(args: Args, given: set, device: torch.device, run_dir: Path, folders: list):
    """(flags, run, replay bytes, run id) from the newest usable checkpoint of `folders`, with the flags it was
    written with; one that does not fit the run its flags describe counts as damaged (run_folder.resume_newest)."""
    def fit(folder: Path, state: dict, arrays: dict, manifest: dict):
        run_args = resumed_args(args, given, manifest["summary"], run_dir)
        try:
            check_args(run_args)
        except UserError as e:
            raise DamagedCheckpoint(f"its flags do not make a run: {e}") from None
        run, replay_bytes = build_run(run_args, device)
        try:
            restore(run, (folder, (state, arrays, manifest)), run_args, given)
        except Exception as e:  # shapes, names or types that are not this run's
            run.games.close()
            del run  # before the next one is built: two replay memories may not fit
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise DamagedCheckpoint(f"it does not fit the run its flags describe: {type(e).__name__}: "
                                    f"{reason}") from None
        return run_args, run, replay_bytes, manifest["summary"].get("run_id")
    return resume_newest(run_dir, folders, fit)


def train(args: Args, given: set) -> dict:
    """Train until the budget is spent or a stop is asked for; returns the counters and a few figures. Every flag,
    the device and the run's folder are checked before anything is written, and the folder stays locked. A stop
    while the run starts ends it there, before anything is written (StoppedWhileStarting)."""
    check_args(args)
    check_games_fit(args.envs)
    device = pick_device(args.device)
    run_dir = run_folder(args, given)
    created, started = check_run_folder(run_dir), False
    lock = FolderLock(run_dir)
    try:
        with stops_end_the_start(TERMINATED_AT_START):
            lock.acquire()
            torch.set_num_threads(torch_threads(args, device, learning=False))
            if device.type == "cuda":  # TF32 for float32 matrix products (convolutions use it by default)
                torch.set_float32_matmul_precision("high")
            clear_leftovers(run_dir)
            folders = checkpoints_to_try(args, run_dir)
            resumed = folders is not None
            if resumed:
                args, run, replay_bytes, run_id = resume_run(args, given, device, run_dir, folders)
                run_id = run_id or (config_of(run_dir) or {}).get("run_id") or new_run_id()
            else:
                (run, replay_bytes), run_id = build_run(args, device), new_run_id()
                start_games(run, args)
        learning_threads = torch_threads(args, device, learning=True)
        print(start_up_table(args, device, switches(args, device), learning_threads, replay_bytes) + "\n"
              + cores_in_use(args.envs, learning_threads), flush=True)
        config = dict(env=args.env, frames=args.frames, n_actions=len(run.games.actions), run_id=run_id,
                      args=dataclasses.asdict(args))
        writes, started = Writes(), True
        writes(run_dir / "config.json", write_json, run_dir / "config.json", config)
        say_if_short_of_space(run_dir)
        session = Session(args, run_dir, device, run, resumed, writes, config, lock)
        return train_session(run, session, replay_bytes)
    finally:  # a start refused or stopped leaves nothing behind, so the same command works again
        lock.release(remove_folder=created and not started, remove_holder=not started)


def train_session(run: Run, session: Session, replay_bytes: int) -> dict:
    """The training loop of a started (or resumed) run, then its end."""
    run_dir = session.run_dir
    try:
        if run.evaluations.passed(run.counters.steps):  # one a stop gave up: played on the checkpoint's weights
            start_evaluation(run, session)
        while session.budget_left(run.counters) and session.stop.signal is None:
            actions = act(run, session)
            run.games.send(actions)
            if session.switches.overlap:  # the last step's updates, while the emulator's threads play this one
                learn(run, session)
            outcome = step_games(run, session)
            store_transitions(run, actions, outcome)
            if not session.switches.overlap:
                learn(run, session)
            record(run, session, outcome)
            periodic_work(run, session)
        summary = dict(dataclasses.asdict(run.counters), session_seconds=session.seconds(),
                       replay_bytes=replay_bytes, run_dir=str(run_dir))
        finish(run, session)
    finally:  # also after a second Ctrl-C: the evaluations' process ended
        session.evaluations.close(timeout=0)
        session.stop.restore()
    return summary


def main(argv=None) -> int:
    log_friendly_output()
    argv = sys.argv[1:] if argv is None else argv

    def body():
        try:
            train(*parse_args(argv))
        except StoppedWhileStarting as stop:  # the last two lines, as a stopped run's: a requeue looks for them
            print(f"stopped by {stop} while starting, before anything was written; start again with:\n  "
                  f"{command('train_breakout.py', *argv)}", flush=True)
    return run_command(body, "interrupted; the last complete checkpoint is kept")


if __name__ == "__main__":
    sys.exit(main())
