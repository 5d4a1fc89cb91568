"""The device and this machine's share of a run: which device, whether the replay memory fits it, uploads that do
not wait for it, the auto|on|off flags resolved, torch's threads."""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import numpy as np
import psutil
import torch

from .cli import UserError


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


# What a run holds on a GPU besides its replay memory: networks, optimiser, batches, CUDA-graph pools and cuDNN's
# workspace (a few hundred MB at the tutorial's sizes), with room to spare.
GPU_BESIDE_REPLAY = 2**30


def check_memory_fits(needed: int, device: torch.device) -> None:
    """Refuse, before allocating, a replay memory the device cannot hold with what a run needs beside it."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # PyTorch's cache (a replay memory given up for an older checkpoint) is free to us
        free, where, beside = torch.cuda.mem_get_info(device)[0], "free GPU memory", GPU_BESIDE_REPLAY
    else:  # the CPU, or Apple's MPS, which shares the machine's RAM; psutil asks each system its own way
        free, where, beside = psutil.virtual_memory().available, "available RAM", 0
    if needed + beside > 0.9 * free:
        also = f" and {beside / 2**30:.0f} GiB beside it" if beside else ""
        raise UserError(f"the replay memory needs {needed / 2**30:.1f} GiB{also}, but only {free / 2**30:.1f} GiB "
                        f"of {where} is left; lower --memory")


def pick_device(name: str) -> torch.device:
    """The device --device names; auto: CUDA, else MPS, else the CPU."""
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


# ---- This process's share of the machine, and what the flags' "auto" means on it (args: train_breakout.Args).
def usable_cpus() -> list[int]:
    """The CPUs this process may run on: its affinity mask (a scheduler's share of a node, taskset), not the
    machine's; every CPU where the system keeps no mask (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    try:
        return sorted(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):
        return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    return len(usable_cpus())


EVAL_BESIDE_CORES = 8  # --eval-beside auto: the cores from which an evaluation plays beside training


class Switches(NamedTuple):
    """The auto|on|off flags, resolved once for this machine."""
    overlap: bool       # --overlap: learn while the games step (auto: CUDA with more than one game)
    compile: bool       # --compile (auto: CUDA)
    eval_beside: bool   # --eval-beside (auto: EVAL_BESIDE_CORES cores or more)


def switches(args, device: torch.device) -> Switches:
    cuda, cores = device.type == "cuda", usable_cores()
    pick = lambda flag, auto: flag == "on" or (flag == "auto" and auto)
    return Switches(overlap=pick(args.overlap, cuda and args.envs > 1), compile=pick(args.compile, cuda),
                    eval_beside=pick(args.eval_beside, cores >= EVAL_BESIDE_CORES))


def torch_threads(args, device: torch.device, learning: bool) -> int:
    """All usable cores for learning; one for acting on CPU, where more only fight ale-py's threads for the cores."""
    return (args.threads or usable_cores()) if learning or device.type != "cpu" else 1


@contextlib.contextmanager
def threads_for(args, device: torch.device, learning: bool):
    """torch's threads as learning or acting has them, for a while."""
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads(args, device, learning))
    try:
        yield
    finally:
        torch.set_num_threads(before)
