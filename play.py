#!/usr/bin/env python
"""Watch a trained agent play: load a .pth (ours or the tutorial's), play greedy games, show them in a window.

    python play.py checkpoints/600000.pth                 # a window, at the game's real speed
    python play.py best.pth --episodes 5 --no-render      # headless; prints each game's score
    python play.py tutorial.pth --video agent.mp4         # also write an MP4 (or .gif)
    python play.py best.pth --json                        # one JSON object: scores, lengths, cleared, mean
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import ale_py
import cv2
import numpy as np
import torch

from train_breakout import WALL_CLEARED, DuelingNetwork, FrameStack, choose_actions, lives_starting, preprocess_all
from trainer_support.atari import OneGame, fire_action
from trainer_support.checkpoint import DamagedCheckpoint, checkpoint_folders, load_checkpoint
from trainer_support.cli import HelpFormatter, UserError, command, run_command
from trainer_support.device import pick_device
from trainer_support.video import VideoWriter, draw_frame

DEFAULT_ENV = "ALE/Breakout-v5"
REAL_SPEED = 60 / 4  # agent steps per second: ALE runs 60 frames/s and each step is 4 frames
SCALE = 3            # window pixels per game pixel, nearest-neighbour so the pixels stay sharp


class WindowClosed(Exception):
    """The user closed the game window."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Bad flags in one line and exit status 2, like every other input error (no usage dump)."""
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line, checked: impossible values raise UserError."""
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a .pth state_dict: a snapshot of train_breakout.py or the tutorial's")
    p.add_argument("--episodes", type=int, default=1, help="games to play")
    p.add_argument("--env", help=f"Gymnasium id of the game (default: config.json beside the checkpoint, "
                                 f"else {DEFAULT_ENV})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where the network runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the games (and of random actions with --eps)")
    p.add_argument("--eps", type=float, default=0.0, help="probability of a random action at each step")
    p.add_argument("--fps", type=float, default=REAL_SPEED, help="agent steps shown per second, 0 for as fast as "
                                                                  "possible (default: 15, the game's real speed)")
    p.add_argument("--max-steps", type=int, default=27_000, help="end a game after this many agent steps "
                                                                 "(ALE's own cap is 108,000 frames)")
    p.add_argument("--no-render", action="store_true", help="no window")
    p.add_argument("--video", metavar="PATH", help="also write every game played to this MP4, or GIF if it "
                                                   "ends in .gif (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    args = p.parse_args(argv)
    for name in ("episodes", "max_steps"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.eps <= 1:
        raise UserError(f"--eps must lie in [0, 1], got {args.eps}")
    if args.fps < 0:
        raise UserError(f"--fps must not be negative, got {args.fps}")
    args.checkpoint, args.weights, args.run_env = network_to_play(Path(args.checkpoint))
    return args


def load_network(path: str, device: torch.device, state: Optional[dict] = None) -> DuelingNetwork:
    """A network from a .pth state_dict (ours or the tutorial's, saved on any device), or from `state` (the
    weights of a full checkpoint, called `path`), with one-line errors."""
    p = Path(path)
    if state is None and p.is_dir():
        raise UserError(f"{path} is a folder; pass one of its .pth snapshots (best.pth, <episode>.pth)")
    if state is None and not p.is_file():
        raise UserError(f"no such checkpoint file: {path}")
    try:
        state = torch.load(p, map_location=device, weights_only=True) if state is None else state
    except Exception as e:  # torch raises many types for files that are not checkpoints
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "conv1.weight" not in state or "act_fc2.weight" not in state:
        raise UserError(f"{path} does not hold a Dueling DQN state_dict (conv1 ... value_fc2)")
    odd = sorted(k for k, v in state.items() if not (isinstance(v, torch.Tensor) and v.is_floating_point()))
    if odd:
        raise UserError(f"{path} does not hold a Dueling DQN state_dict: {', '.join(odd[:3])} "
                        f"{'is not a tensor of floats' if len(odd) == 1 else 'are not tensors of floats'}")
    conv1, act_fc2 = state["conv1.weight"], state["act_fc2.weight"]
    if conv1.dim() != 4 or act_fc2.dim() != 2 or not (0 < conv1.shape[1] <= 64 and 0 < act_fc2.shape[0] <= 64):
        raise UserError(f"{path} holds a network of another architecture: conv1.weight {tuple(conv1.shape)}, "
                        f"act_fc2.weight {tuple(act_fc2.shape)}")
    net = DuelingNetwork(conv1.shape[1], act_fc2.shape[0]).to(device)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{path} holds a network of another architecture: {' '.join(first[1:2] or first)}") from None
    return net.eval()


def newest_network(run: Path) -> Optional[tuple[Path, dict, dict]]:
    """(folder, policy weights, summary) of the run's newest full checkpoint that passes its checks (its state.pt
    only: the replay memory is not read), or None. One being removed by the trainer meanwhile is passed over."""
    for folder in checkpoint_folders(run / "resume")[::-1]:
        try:
            state, _, manifest = load_checkpoint(folder, arrays=False)
            return folder, state["policy_net"], manifest["summary"]
        except (DamagedCheckpoint, UserError, OSError, RuntimeError, KeyError, TypeError):
            continue
    return None


def finished(summary: dict) -> Optional[str]:
    """The budget flag a checkpoint's run had spent (the run ended there, unless --resume gives it more), or None."""
    args = summary.get("args") if isinstance(summary.get("args"), dict) else {}
    for flag, key in (("episodes", "episode"), ("steps", "step"), ("minutes", "minutes")):
        budget, done = args.get(flag), summary.get(key)
        if isinstance(budget, (int, float)) and isinstance(done, (int, float)) and done >= budget:
            return f"--{flag} {budget:,}"
    return None


def network_to_play(path: Path) -> tuple[str, Optional[dict], Optional[str]]:
    """(what to play, its weights when they come from a full checkpoint, that run's game). A .pth is played as
    given. A run's folder plays its best.pth, else its newest snapshot, else the policy network of its newest full
    checkpoint (a young run: the first snapshot comes after --save-every episodes). A snapshot the run has not
    reached yet says how far off it is and plays that network meanwhile; a missing one it passed, or one a finished
    run will not write, is refused, with the ones its folder holds. Each choice is said on stderr."""
    note = lambda msg: print(msg, file=sys.stderr, flush=True)
    snapshots = lambda folder: sorted((f for f in folder.glob("*.pth") if f.stem.isdigit()), key=lambda f: int(f.stem))
    from_checkpoint = lambda found: (str(found[0]), found[1], found[2].get("env"))
    at = lambda summary: f"agent step {summary['step']:,}, episode {summary['episode']:,}"
    if path.is_dir():
        best, newest = path / "best.pth", (snapshots(path) or [None])[-1]
        chosen = best if best.is_file() else newest
        if chosen is not None:
            why = "the best evaluation so far" if chosen == best else "its newest snapshot; there is no best.pth yet"
            note(f"{path} is a run's folder: playing {chosen.name} ({why})")
            return str(chosen), None, None
        found = newest_network(path)
        if found is None:
            raise UserError(f"{path} holds nothing to play: no snapshot (best.pth or <episode>.pth) and no full "
                            f"checkpoint (resume/)")
        note(f"{path} holds no snapshot yet: playing the policy network of its newest full checkpoint "
             f"({at(found[2])})")
        return from_checkpoint(found)
    if path.exists() or not path.parent.is_dir():
        return str(path), None, None
    found = newest_network(path.parent) if path.stem.isdigit() and path.suffix == ".pth" else None
    held, best = snapshots(path.parent), " and best.pth" if (path.parent / "best.pth").is_file() else ""
    holds = f"{path.parent} holds " + (f"{len(held)} snapshot(s), {held[0].name} to {held[-1].name}" if len(held) > 1
                                       else f"one snapshot, {held[0].name}" if held else "no snapshot") + best
    if found is not None and int(path.stem) > found[2]["episode"] and finished(found[2]):
        raise UserError(f"no such checkpoint file: {path}; the run finished at episode {found[2]['episode']:,} "
                        f"({finished(found[2])}) and will not write it; {holds}")
    if found is not None and int(path.stem) > found[2]["episode"]:
        note(f"{path} is not written yet: the run is at episode {found[2]['episode']:,} (its newest full "
             f"checkpoint) and writes it at episode {int(path.stem):,}, {int(path.stem) - found[2]['episode']:,} "
             f"episodes from now; playing that checkpoint's policy network meanwhile (agent step "
             f"{found[2]['step']:,})")
        return from_checkpoint(found)
    if held:
        raise UserError(f"no such checkpoint file: {path}; {holds}")
    if found is not None:
        every = (found[2].get("args") or {}).get("save_every")
        raise UserError(f"no such checkpoint file: {path}; the run is past episode {int(path.stem):,} but holds no "
                        f"snapshot{f' (one every {every:,} episodes)' if isinstance(every, int) else ''}; "
                        f"{command('play.py', path.parent)} plays its newest network")
    return str(path), None, None


def game_id(args: argparse.Namespace) -> str:
    """--env, else the game of the run the checkpoint comes from (its config.json), else Breakout."""
    if args.env or args.run_env:
        return args.env or args.run_env
    config = Path(args.checkpoint).parent / "config.json"
    if not config.is_file():
        return DEFAULT_ENV
    try:
        return json.loads(config.read_text())["env"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{config} is not a readable train_breakout.py config; pass --env") from None


def display_reachable() -> bool:
    """Whether a window can be opened: OpenCV's Qt aborts the whole process when the X server is gone."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        x11 = ctypes.CDLL("libX11.so.6")
    except OSError:
        return bool(os.environ.get("DISPLAY"))  # cannot check further; let OpenCV try
    x11.XOpenDisplay.restype, x11.XCloseDisplay.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    for attempt in range(3 if os.environ.get("DISPLAY") else 1):  # a busy X server may miss one connection
        display = x11.XOpenDisplay(None)  # NULL without DISPLAY, or when its X server does not answer
        if display:
            x11.XCloseDisplay(display)
            return True
        time.sleep(0.2)
    return False


def window_fails() -> str:
    """Why OpenCV's window cannot open here ("" when it can). Its bundled Qt aborts the whole process when
    it cannot start (missing xcb libraries, say), so a throw-away process tries first."""
    probe = "import cv2; cv2.namedWindow('probe'); cv2.waitKey(1); cv2.destroyAllWindows()"
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "QT_LOGGING_RULES": "default.warning=false"})
    except subprocess.TimeoutExpired:
        return "opening a test window took over a minute"
    lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
    return "" if r.returncode == 0 else (lines[0][:200] if lines else f"exit status {r.returncode}")


class Window:
    """The game, upscaled, with the score drawn on it, paced at `fps` agent steps per second (0: no pacing)."""

    def __init__(self, title: str, fps: float):
        # opencv-python's bundled Qt warns about fonts it does not ship; the window draws no text with them.
        os.environ.setdefault("QT_LOGGING_RULES", "default.warning=false")
        self.title, self.delay, self.due = title, 1 / fps if fps else 0.0, time.perf_counter()
        cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)  # no Qt toolbar, just the game

    def show(self, rgb: np.ndarray, score: float) -> None:
        """Draw one frame and wait for its turn; raises WindowClosed once the user has closed the window."""
        cv2.imshow(self.title, cv2.cvtColor(draw_frame(rgb, score, SCALE), cv2.COLOR_RGB2BGR))
        self.due = max(self.due + self.delay, time.perf_counter())  # after a slow step, do not rush to catch up
        cv2.waitKey(max(1, round(1000 * (self.due - time.perf_counter()))))  # also runs the window's events
        try:
            visible = cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1
        except cv2.error:  # OpenCV's Qt backend raises once the user has closed its last window
            visible = False
        if not visible:
            raise WindowClosed

    def close(self) -> None:
        cv2.destroyAllWindows()
        cv2.waitKey(1)  # lets the window actually disappear


def open_video(path: str) -> VideoWriter:
    """A VideoWriter, or a one-line error for a path it cannot write."""
    try:
        return VideoWriter(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write the video {path}: {e}") from None


@torch.no_grad()
def play_game(policy: torch.nn.Module, game: OneGame, rgb: np.ndarray, lives: np.ndarray, args: argparse.Namespace,
              rng: np.random.Generator, window: Optional[Window],
              video: Optional[VideoWriter]) -> tuple[float, int, bool, np.ndarray, np.ndarray]:
    """One game from its first frame `rgb`: FIRE at the start of every life, then the policy's actions.
    Shows and records each frame the agent acts on. Returns (score, agent steps, whether it ended on its own,
    the next game's first frame and lives)."""
    device = next(policy.parameters()).device
    agent_view = lambda rgb: torch.from_numpy(preprocess_all(rgb, None)).to(device)  # no erasing at play time
    stack = FrameStack(1, policy.conv1.in_channels, device)
    stack.push(agent_view(rgb), np.ones(1, bool))
    fire, n_actions = fire_action(game.actions), len(game.actions)
    need_fire, score, steps = np.ones(1, bool), 0.0, 0
    while steps < args.max_steps:
        if window is not None:
            window.show(rgb[0], score)
        if video is not None:
            video.add(rgb[0], score)
        actions = choose_actions(policy, stack, args.eps, n_actions, rng, need_fire, fire)
        rgb, reward, terminated, truncated, new_lives = game.step(actions)
        score, steps = score + float(reward[0]), steps + 1
        if terminated[0] or truncated[0]:  # the game has already been reset: rgb is the next game's first frame
            return score, steps, True, rgb, new_lives
        need_fire, lives = lives_starting(game, fire, need_fire, np.zeros(1, bool), lives, new_lives), new_lives
        stack.push(agent_view(rgb), np.zeros(1, bool))
    return score, steps, False, *game.reset()


def play(args: argparse.Namespace) -> dict:
    """Play args.episodes games; returns per-game scores, lengths, cleared flags and their mean."""
    env_id = game_id(args)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one state per forward pass: more threads only wait on each other
    policy = load_network(args.checkpoint, device, args.weights)
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no emulator banner among our messages
    game = OneGame(env_id, args.seed)
    n_actions = policy.act_fc2.out_features
    if n_actions != len(game.actions):
        raise UserError(f"{args.checkpoint} chooses among {n_actions} actions but {env_id} has "
                        f"{len(game.actions)}; pass the --env it was trained on")
    video = open_video(args.video) if args.video else None
    note = lambda msg: print(msg, file=sys.stderr, flush=True)
    note(f"playing {env_id} with {args.checkpoint} ({policy.conv1.in_channels} frames, {n_actions} actions) "
         f"on {device}")
    window = None
    if not args.no_render and not display_reachable():
        note("no display available; playing headless")
    elif not args.no_render and (problem := window_fails()):
        note(f"the window cannot open here ({problem}); playing headless")
    elif not args.no_render:
        window = Window(f"{env_id}: {Path(args.checkpoint).name}", args.fps)
    result, rng = dict(scores=[], lengths=[], cleared=[]), np.random.default_rng(args.seed)
    try:
        rgb, lives = game.reset()
        for i in range(args.episodes):
            score, steps, ended, rgb, lives = play_game(policy, game, rgb, lives, args, rng, window, video)
            for key, value in (("scores", score), ("lengths", steps), ("cleared", score >= WALL_CLEARED)):
                result[key].append(value)
            if not args.json:
                cap = "" if ended else f" (stopped at --max-steps {args.max_steps})"
                wall = "cleared the wall" if score >= WALL_CLEARED else "did not clear the wall"
                print(f"game {i + 1}: score {score:.0f}, {steps} steps, {wall}{cap}", flush=True)
    except WindowClosed:
        note(f"window closed; stopping after {len(result['scores'])} finished game(s)")
    finally:
        if video is not None:
            video.close()
        if window is not None:
            window.close()
        game.close()
    result["mean"] = float(np.mean(result["scores"])) if result["scores"] else None
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted."""
    def body():
        args = parse_args(argv)
        result = play(args)
        if args.json:
            print(json.dumps(result))
        elif result["scores"]:
            n, scores = len(result["scores"]), result["scores"]
            print(f"{n} game(s): mean score {result['mean']:.1f}, best {max(scores):.0f}, "
                  f"{sum(result['cleared'])} of {n} cleared the wall")
    return run_command(body, "interrupted")


if __name__ == "__main__":
    # Python leaves SIGINT ignored when it starts ignored (a background job of a shell script, a test suite run
    # with `&`): Ctrl-C and `kill -INT` must stop a game all the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
