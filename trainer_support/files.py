"""Files written whole or not at all, and writes that must not end a run: a full disk (or a full Google Drive) is
one warning per file, said again only when the reason changes, and the next write tries again."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm


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


def why_failed(error: BaseException, where: Path) -> str:
    """Why a write failed, in words: "no space left on device" however the library raised it (PyTorch reports a
    full disk as a RuntimeError about positions in its zip file)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "no space left on device"
    try:
        folder = next(p for p in [where, *where.parents] if p.is_dir())
        if shutil.disk_usage(folder).free < 1 << 20:
            return "no space left on device"
    except (OSError, StopIteration):
        pass
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"


class Writes:
    """Writes that must not end the run: a failure is one warning naming the file and the reason, said again only
    when the reason changes; the next write of the file tries again, and one line says when it works again. Every
    write it guards replaces its file whole or leaves it as it was."""

    def __init__(self):
        self.failing: dict = {}  # path: why its last write failed

    def __call__(self, path: Path, write, *args, then: str = "training goes on; the next write tries again") -> bool:
        """`write(*args)`, which writes `path`; False if it failed (`then` says what follows)."""
        try:
            write(*args)
        except (OSError, RuntimeError) as e:
            self.failed(path, e, then)
            return False
        self.succeeded(path)
        return True

    def failed(self, path: Path, error: BaseException, then: str = "training goes on; the next write tries again"):
        reason = why_failed(error, Path(path))
        if self.failing.get(str(path)) != reason:
            tqdm.write(f"warning: could not write {path} ({reason}); {then}")
        self.failing[str(path)] = reason

    def is_failing(self, path: Path) -> bool:
        return str(path) in self.failing

    def succeeded(self, path: Path) -> None:
        if self.failing.pop(str(path), None) is not None:
            tqdm.write(f"note: {path} is written again")


def free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def say_if_short_of_space(run_dir: Path) -> None:
    free = free_bytes(run_dir)
    if free is not None and free < 64 << 20:
        print(f"note: only {free / 1e6:.0f} MB is free in {run_dir}: snapshots, logs and checkpoints that do not fit "
              "fail (one warning each) until space is freed; training goes on", flush=True)


def write_json(path: Path, value) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(value, indent=1)), text=True)


class _RecordedFile:
    """An open file as torch.save sees it, keeping what a write raised: a full disk's OSError, or the
    KeyboardInterrupt of a second Ctrl-C or SIGTERM."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def torch_save(value, f) -> None:
    """torch.save to the open file `f`; what a write raised comes out as itself (PyTorch raises it again as a
    RuntimeError about positions in its zip file, which says neither "no space left" nor "interrupted")."""
    file = _RecordedFile(f)
    try:
        torch.save(value, file)
        return
    except RuntimeError:
        if file.error is None:
            raise
        error, file.error = file.error, None
    try:
        raise error from None
    finally:
        del error  # no cycle through this frame keeps the caller's frames (and the run) alive


def save_snapshot(net: torch.nn.Module | dict, path: Path) -> None:
    """A network, or its state_dict, as a .pth the tutorial's code loads (plain tensors, on the CPU)."""
    state = {k: v.detach().cpu().contiguous() for k, v in (net if isinstance(net, dict) else net.state_dict()).items()}
    write_atomically(path, lambda f: torch_save(state, f))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()

