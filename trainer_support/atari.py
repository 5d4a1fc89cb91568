"""The emulator: N games of one ALE id with the settings Gymnasium registers for it (ALE/Breakout-v5: frameskip 4,
sticky actions 0.25, minimal action set), stepped by ale-py's thread pool; or one gym.make game, as the tutorial
ran it, that a checkpoint saves exactly. A game that ends is reset in the same step, so the frame returned for it
is the new game's first."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .checkpoint import CannotRestore
from .cli import UserError
from .device import usable_cores, usable_cpus


# Breakout draws with nine colours of the emulator's palette. ALE's own greyscale of each (0.2989 R +
# 0.5870 G + 0.1140 B) is distinct, so it determines the grey the tutorial's COLOR_BGR2GRAY of the RGB
# frame gives (0.114 R + 0.587 G + 0.299 B): {ALE grey: tutorial grey}, read off the emulator's RGB and
# greyscale screens of 100,000 frames of play; tests/test_train.py checks the two paths agree on every pixel.
BREAKOUT_GREY = {0: 0, 142: 142, 148: 126, 131: 106, 129: 103, 110: 87, 85: 110, 127: 139, 124: 124}


def breakout_grey_lut() -> np.ndarray:
    lut = np.arange(256, dtype=np.uint8)
    lut[list(BREAKOUT_GREY)] = list(BREAKOUT_GREY.values())
    return lut

def ale_settings(env_id: str) -> dict:
    """The emulator settings Gymnasium registers for `env_id`; a clear error for anything else."""
    import ale_py
    import gymnasium as gym
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no emulator banner among a run's lines, in any process
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


PIN_GAMES, SPARE_CORES = True, 0  # the trainer's games: one thread pinned per core, none left to the loop; the
# alternatives are measured by benchmarks/gpu_check.py


# The most games a run may step: 64 per core, and what half the available RAM holds at GAME_BYTES a game. ale-py
# builds its games one after another, about 90 ms each here (benchmarks/game_build.py, BENCHMARKS.md), holding
# the interpreter: 128 games on 2 cores start in 18 s, and 100,000 would take 2.5 hours and 150 GB.
GAMES_PER_CORE, GAME_BYTES = 64, 2 << 20  # measured: 1.5 to 2.4 MB a game once reset


def check_games_fit(envs: int) -> None:
    """Refuse, before anything is written, more games than this machine's cores and memory can serve."""
    import psutil
    cores, available = usable_cores(), psutil.virtual_memory().available
    by_cores, by_memory = GAMES_PER_CORE * cores, available // 2 // GAME_BYTES
    if envs > min(by_cores, by_memory):
        why = (f"{GAMES_PER_CORE} per core on the {cores} core{'s' * (cores != 1)} this process may use"
               if by_cores <= by_memory else
               f"what half of the {available / 2**30:.1f} GiB of available RAM holds, at about "
               f"{GAME_BYTES >> 20} MB a game")
        raise UserError(f"--envs {envs} is more games than this machine can serve: at most "
                        f"{min(by_cores, by_memory)} here ({why})")


def game_cores() -> int:
    """Threads for the games: one per core this process may use (usable_cpus), less those left to the loop."""
    return max(1, usable_cores() - SPARE_CORES)


def first_pinned_core() -> int:
    """The core the games' first thread is pinned to, the next ones following; -1: not pinned. ale-py pins thread
    i to core offset + i of the whole machine, so only cores that are one unbroken range can be followed; pinned
    outside this process's share (a scheduler's), the games would crowd other jobs' cores."""
    cpus = usable_cpus()
    if not PIN_GAMES or cpus != list(range(cpus[0], cpus[0] + len(cpus))):
        return -1
    return cpus[0] + len(cpus) - game_cores()


def cores_in_use(envs: int, torch_threads: int) -> str:
    """The start-up table's line on this process's share of the CPUs and the threads it runs on them."""
    cpus, machine = usable_cores(), os.cpu_count() or 1
    share = f"{cpus} of the machine's {machine} (this process's CPU affinity)" if cpus < machine else f"all {cpus}"
    first, threads = first_pinned_core(), lambda k: f"{k} thread" + "s" * (k != 1)
    games = ("one game, stepped by the loop" if envs == 1 else f"games on {threads(min(envs, game_cores()))}, "
             + (f"pinned from core {first}" if first >= 0 else "not pinned"))
    return f"cores: {share}; {games}; torch on {threads(torch_threads)}"


class VectorGames:
    """N games stepped by ale-py's C++ thread pool (`AtariVectorEnv`), raw frames, no wrappers. Breakout comes
    back as the emulator's own greyscale (a third of RGB's bytes), which `screen_lut` turns into exactly the
    tutorial's grey (see BREAKOUT_GREY); other games as RGB."""

    def __init__(self, env_id: str, n: int, seed: int, rgb: bool = False, threads: Optional[int] = None):
        import ale_py
        s = ale_settings(env_id)
        self.screen_lut = breakout_grey_lut() if s["game"] == "breakout" and not rgb else None
        self.env = ale_py.AtariVectorEnv(
            s["game"], n, frameskip=s["frameskip"], repeat_action_probability=s["repeat_action_probability"],
            max_num_frames_per_episode=s["max_num_frames_per_episode"], img_height=210, img_width=160,
            grayscale=self.screen_lut is not None, stack_num=1, maxpool=False, noop_max=0, reward_clipping=False,
            use_fire_reset=False, episodic_life=False, autoreset_mode="SameStep",
            num_threads=min(n, threads or game_cores()),
            thread_affinity_offset=first_pinned_core() if threads is None else -1)
        self.actions = list(self.env.ale.get_action_set())
        self.seed = seed % (2**31 - n + 1)  # game i gets seed + i, which the emulator takes as a 32-bit int

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

    def fire_swallowed(self, fire: int) -> np.ndarray:
        """ale-py's vector environment does not tell whether sticky actions swallowed a FIRE: never, here."""
        return np.zeros(self.env.num_envs, bool)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        raise CannotRestore("ale-py's vector environment cannot save its games")

    def close(self):
        self.env.close()


class OneGame:
    """One game through `gym.make`, as the tutorial ran it, with the sticky actions drawn here: each emulator frame
    repeats the previous frame's action with probability 0.25. ALE keeps the held action outside its saved state,
    so a restored game would hold another; drawn here as ALE draws them (frame by frame, NOOP held at the start of
    a game), `state_dict` holds everything and a run with --envs 1 resumes exactly. They are then a game's only
    randomness, so a new game needs no reseeding of the emulator (which reloads the ROM)."""

    screen_lut = None  # RGB frames
    ARRAYS = ("emulator",)  # a checkpoint's arrays

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

    def fire_swallowed(self, fire: int) -> np.ndarray:
        """Whether the last step's action `fire` was swallowed: the emulator never applied it."""
        return np.array([self.held != self.actions[fire]])

    def state_dict(self) -> dict:
        """The emulator's bytes, the game seeds, the sticky-action draws and the held action."""
        # ALE's own random state is left out: with the sticky draws made here it decides nothing.
        emulator = np.frombuffer(self.ale.cloneState(include_rng=False).serialize(), np.uint8)
        return dict(emulator=emulator, seeds=self.seeds.bit_generator.state,
                    sticky=self.sticky_rng.bit_generator.state, held=self.held.value)

    def load_state_dict(self, state: dict) -> None:
        import ale_py
        self.env.reset()  # Gymnasium refuses step() before a reset; the restore below overrides it
        self.ale.restoreState(ale_py.ALEState(np.asarray(state["emulator"]).tobytes()))
        self.seeds.bit_generator.state = state["seeds"]
        self.sticky_rng.bit_generator.state = state["sticky"]
        self.held = ale_py.Action(state["held"])

    def close(self):
        self.env.close()


def make_games(env_id: str, n: int, seed: int, rgb: bool = False, threads: Optional[int] = None):
    """One gym.make game for n == 1, else ale-py's vector environment (RGB with `rgb`), `threads` threads."""
    return OneGame(env_id, seed) if n == 1 else VectorGames(env_id, n, seed, rgb, threads)


def fire_action(actions: list) -> Optional[int]:
    """Index of FIRE in the game's action set (1 in Breakout), or None for games without it."""
    names = [a.name for a in actions]
    return names.index("FIRE") if "FIRE" in names else None
