"""The run's plumbing, which no reader of the DQN needs: the checkpoint file format, saving and restoring a
declared state, writes that survive a full disk, the run's folder and its lock, stop signals, work beside
training (a writer thread, helper processes that come back), metrics.csv and TensorBoard, curve.png, videos,
and one-line errors. It imports nothing from train_breakout.py.

A full checkpoint is a folder resume/<step>/ of two kinds of file: each array a part declares (its `ARRAYS`)
as a zstd-compressed .npy, and everything else in state.pt (read back with weights_only=True); manifest.json,
written last, holds the format version, a summary a person can read, and each file's size and SHA-256. Every
file goes to a temporary name first and is renamed when complete.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Optional

import filelock
import numpy as np
import psutil
import torch
import zstandard
from tqdm import tqdm

FORMAT = 1                  # the full checkpoint's format version: a change of format reads the one before it
LAST_READER_OF_0 = "b8244e0"  # the last commit that reads the layouts written before format 1


# ---- Errors and exit statuses.
class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2, no traceback."""


class CannotRestore(Exception):
    """A part that a checkpoint cannot bring back (games that start afresh); the message says why."""


class DamagedCheckpoint(Exception):
    pass


def run_command(body, interrupted: str) -> int:
    """Exit status of a command (train_breakout.py's and play.py's): 0 done, 2 bad input (one line on stderr,
    no traceback), 130 interrupted (the line `interrupted` on stderr)."""
    try:
        body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already explains it."""

    def _get_help_string(self, action):
        return action.help if "(default" in action.help else super()._get_help_string(action)


# ---- Flags: the fields of a dataclass, each made by `flag`, its help text and default shown in --help.
POSITIVE, NOT_NEGATIVE, UNIT = "(0, inf)", "[0, inf)", "[0, 1]"


def flag(default, help: str, bounds: Optional[str] = None, new_on_resume: bool = False, **argparse_kw):
    """A flag: its default, its --help line, the interval its value must lie in (`bounds`, checked by
    check_bounds), and whether --resume accepts a new value for it."""
    return dataclasses.field(default=default, metadata=dict(help=help, bounds=bounds, new_on_resume=new_on_resume,
                                                            argparse=argparse_kw))


def flag_parser(cls, doc: str, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line of the dataclass `cls`; with `suppress_defaults`, only the flags given are parsed."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)
    for f in dataclasses.fields(cls):
        kw = dict(help=f.metadata["help"], **f.metadata["argparse"])
        kw["default"] = argparse.SUPPRESS if suppress_defaults else f.default
        name = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(name, action="store_true", **kw)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type.replace("Optional[", "").rstrip("]")]
            parser.add_argument(name, type=kind, **kw)
    return parser


def check_bounds(args) -> None:
    """Refuse, in one line, a flag outside its bounds."""
    for f in dataclasses.fields(args):
        value, bounds = getattr(args, f.name), f.metadata["bounds"]
        if value is None or bounds is None:
            continue
        low, high = (float(x) for x in bounds[1:-1].split(","))
        if not ((low <= value if bounds[0] == "[" else low < value)
                and (value <= high if bounds[-1] == "]" else value < high)):
            what = {POSITIVE: "must be positive", NOT_NEGATIVE: "must not be negative"}.get(bounds,
                                                                                          f"must lie in {bounds}")
            raise UserError(f"--{f.name.replace('_', '-')} {what}, got {value}")


def describe(sections: dict, width: int = 100) -> str:
    """Flags as a table that fits on one screen: each section's `{name: value}` in columns, as `--name value`;
    a value too long for a column gets a line of its own."""
    lines = []
    for title, rows in sections.items():
        cells = [f"--{k.replace('_', '-')} {v}" for k, v in rows.items()]
        column = max(26, min(34, max(map(len, cells), default=0) + 2))
        per_line = max(1, (width - 2) // column)
        short = [c for c in cells if len(c) < column]
        lines.append(title)
        lines += [f"  {c}" for c in cells if len(c) >= column]
        lines += ["  " + "".join(c.ljust(column) for c in short[i:i + per_line]).rstrip()
                  for i in range(0, len(short), per_line)]
    return "\n".join(lines)


# ---- Files written whole or not at all.
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
    """Writes that must not end the run (a full disk, a full Google Drive): a failure is one warning naming the
    file and the reason, said again only when the reason changes; the next write of the file tries again, and
    one line says when it works again. Every write it guards replaces its file whole or leaves it as it was."""

    def __init__(self):
        self.failing: dict = {}  # path: why its last write failed
        self.lock = threading.Lock()  # the checkpoint writer's thread reports here too

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
        with self.lock:
            repeat, self.failing[str(path)] = self.failing.get(str(path)) == reason, reason
        if not repeat:
            tqdm.write(f"warning: could not write {path} ({reason}); {then}")

    def is_failing(self, path: Path) -> bool:
        with self.lock:
            return str(path) in self.failing

    def ended(self, path: Path, error: Optional[BaseException], what: str) -> None:
        """Report how a job of a helper process that writes `path` ended (`what` names the job)."""
        if isinstance(error, BrokenProcessPool):
            tqdm.write(f"warning: the process of the {what} died; the next one starts another")
        elif isinstance(error, (OSError, RuntimeError)):
            self.failed(path, error)
        elif error is not None:
            tqdm.write(f"warning: the {what} failed ({type(error).__name__}: {error})")
        else:
            self.succeeded(path)

    def succeeded(self, path: Path) -> None:
        with self.lock:
            was_failing = self.failing.pop(str(path), None) is not None
        if was_failing:
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
    """An open file as torch.save sees it, keeping the error of a write that failed."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def torch_save(value, f) -> None:
    """torch.save to the open file `f`; a failed write comes out as the OSError it was (PyTorch raises it again as
    a RuntimeError about positions in its zip file, which does not say "no space left")."""
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


# ---- Arrays compressed as they are written and read, a chunk at a time.
class RingSnapshot:
    """A ring of frames as it was when a checkpoint was taken, read a chunk at a time by the thread that writes
    it while training goes on overwriting the ring: before training overwrites a slot the writer has not read
    yet, the slot's frames are set aside for the writer (where a copy of the whole ring would stop training for
    seconds). On a GPU the chunks come down one at a time, so the host never holds a second copy either."""

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
            if self.read_up_to <= slot < len(self) and slot not in self.aside:
                self.aside[slot] = self.frames[slot].clone()
            return True

    def close(self) -> None:
        with self.lock:
            self.read_up_to, self.aside = len(self), {}

    def chunks(self, chunk_bytes: int = 16 << 20):
        """The frames in order, about `chunk_bytes` at a time, as NumPy arrays."""
        rows, cuda = max(1, chunk_bytes // max(1, self.frames[:1].numel())), self.frames.is_cuda
        for start in range(0, len(self), rows):
            with self.lock:
                end = min(start + rows, len(self))
                if cuda:  # queued behind the GPU's work, and waited for outside the lock: add_frames goes on
                    chunk = torch.empty((end - start, *self.shape[1:]), dtype=torch.uint8, pin_memory=True)
                    chunk.copy_(self.frames[start:end], non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record()
                else:
                    chunk = self.frames[start:end].to("cpu", copy=True)
                aside = {slot: self.aside.pop(slot) for slot in [s for s in self.aside if start <= s < end]}
                self.read_up_to = end
            if cuda:  # training's writes to these slots from now on are queued after the copy: it reads them as
                copied.synchronize()  # they were; the slots it overwrote before are in `aside`
            for slot, frames in aside.items():
                chunk[slot - start] = frames
            yield chunk.numpy()


def save_array(path: Path, array: np.ndarray | RingSnapshot) -> None:
    """`array` as a .npy stream compressed with zstd (level 1, on every core), written a chunk at a time, so
    that saving the replay memory holds no second copy of it."""
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
            self._fill(f, out)

    def _fill(self, f, out: np.ndarray) -> None:
        buffer, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < len(buffer):
            read = f.readinto(buffer[done:])
            if not read:
                raise DamagedCheckpoint(f"{self.path.name} ends early")
            done += read

    def read_chunks(self, chunk_bytes: int):
        """(first row, rows) of about `chunk_bytes`, in order, through one buffer that each step reuses."""
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        rows = max(1, chunk_bytes // max(1, row_bytes))
        buffer = np.empty((min(rows, len(self)), *self.shape[1:]), self.dtype)
        with self._open() as f:
            self._header(f)
            for start in range(0, len(self), rows):
                chunk = buffer[:min(rows, len(self) - start)]
                self._fill(f, chunk)
                yield start, chunk

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.empty(self.shape, self.dtype)
        self.read_into(array)
        return array if dtype is None else array.astype(dtype)


def load_rows(source, target: torch.Tensor, chunk_bytes: int = 64 << 20) -> None:
    """`source` (an array, or a CompressedArray) into `target` on any device, a chunk of about `chunk_bytes` at a
    time: the host holds one chunk, never the whole array (a replay memory of 42 GB resumed onto a GPU)."""
    if isinstance(source, CompressedArray):
        chunks = source.read_chunks(chunk_bytes)
    else:
        source = np.asarray(source)
        rows = max(1, chunk_bytes // max(1, source[:1].nbytes))
        chunks = ((start, source[start:start + rows]) for start in range(0, len(source), rows))
    for start, chunk in chunks:
        target[start:start + len(chunk)].copy_(torch.from_numpy(np.ascontiguousarray(chunk)))


# ---- A declared state: the fields of a dataclass, each a part with `state_dict`/`load_state_dict` (or a
# generator, or a plain object whose attributes are its state). A part's `ARRAYS` names the entries of its
# state that are arrays: they go to compressed files, everything else to state.pt.
def part_state(part) -> dict:
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
            setattr(part, name, np.array(value) if name in getattr(part, "ARRAYS", ()) else value)


def state_files(obj) -> tuple[dict, dict]:
    """A declared state as a checkpoint's contents: ({field: {name: value}} for state.pt, {"field.name": array}
    for the compressed arrays)."""
    state, arrays = {}, {}
    for f in dataclasses.fields(obj):
        part = getattr(obj, f.name)
        declared = getattr(part, "ARRAYS", ())
        for name, value in part_state(part).items():
            if name in declared:
                arrays[f"{f.name}.{name}"] = value
            else:  # a NumPy scalar (a sum of array entries, say) as the Python number weights_only reads back
                state.setdefault(f.name, {})[name] = value.item() if isinstance(value, np.generic) else value
    return state, arrays


def restore_state(obj, state: dict, arrays: dict) -> Optional[str]:
    """Bring each field of `obj` back from a checkpoint's contents; returns why a part could not come back."""
    parts = {name: dict(values) for name, values in state.items()}
    for key, array in arrays.items():
        field_name, name = key.split(".", 1)
        parts.setdefault(field_name, {})[name] = array
    why = None
    for f in dataclasses.fields(obj):
        try:
            load_part(getattr(obj, f.name), parts.get(f.name, {}))
        except CannotRestore as e:
            why = str(e)
    return why


def frozen(value):
    """`value` (tensors, arrays, and dicts and lists of them) copied, tensors to the CPU, so that training's next
    steps cannot change it: the one way state is handed to another thread or process. Read-only arrays (rows that
    are never written again) and ring snapshots (which keep what training overwrites) are handed over as they
    are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, np.ndarray):
        return value.copy() if value.flags.writeable else value
    if isinstance(value, dict):
        return {k: frozen(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(frozen(v) for v in value)
    return value


# ---- Full checkpoints: resume/<name>/, written completely or not at all.
def save_checkpoint(root: Path, name: str, state: dict, arrays: dict, summary: dict, keep: int = 2) -> Path:
    """Write resume/<name>/ and keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with open(tmp / "state.pt", "wb") as f:  # closed even when the write fails, so its space comes back
            torch_save(state, f)
        for key, value in arrays.items():
            save_array(tmp / f"{key}.npy.zst", value)
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[f.name] = dict(bytes=f.stat().st_size, sha256=sha256(f))
        write_json(tmp / "manifest.json", dict(format=FORMAT, summary=summary, files=files))
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


def load_checkpoint(folder: Path, arrays: bool = True) -> tuple[dict, dict, dict]:
    """(state, arrays, manifest) of a full checkpoint, after checking its format and every file against the
    manifest (without `arrays`, state.pt only, and no arrays). A checkpoint of another format is refused
    (UserError); a damaged one raises DamagedCheckpoint."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        raise DamagedCheckpoint("no readable manifest.json") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if version is None:
        raise UserError(f"checkpoint {folder} was written by a development version of train_breakout.py, before "
                        f"checkpoint format {FORMAT}; continue it with commit {LAST_READER_OF_0} "
                        f"(git checkout {LAST_READER_OF_0}), or start a new run in another --checkpoints folder")
    if version != FORMAT:
        raise UserError(f"checkpoint {folder} has format {version}, which this version of train_breakout.py "
                        f"(format {FORMAT}) does not read; update train_breakout.py")
    for name, meta in manifest["files"].items():
        if not arrays and name != "state.pt":
            continue
        f = folder / name
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            raise DamagedCheckpoint(f"{name} is missing or truncated")
        if sha256(f) != meta["sha256"]:
            raise DamagedCheckpoint(f"{name} does not match its checksum")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    found = {f.name[:-len(".npy.zst")]: CompressedArray(f) for f in folder.glob("*.npy.zst")} if arrays else {}
    return state, found, manifest


def resume_newest(run_dir: Path, folders: list, fit):
    """`fit(folder, state, arrays, manifest)` for the first of `folders` (newest first) that passes its checks, is
    of the run in config.json (where that names one) and fits (`fit` raises DamagedCheckpoint where it does not).
    Each one that fails is reported in one line and the one before it tried; a folder given alone is refused."""
    run_id = (config_of(run_dir) or {}).get("run_id")
    for folder in folders:
        try:
            state, arrays, manifest = load_checkpoint(folder)
            if not isinstance(manifest.get("summary"), dict):
                raise DamagedCheckpoint("its manifest holds no summary")
            if manifest["summary"].get("run_id", run_id) != run_id and run_id is not None:
                raise DamagedCheckpoint("it belongs to another run than config.json's")
            return fit(folder, state, arrays, manifest)
        except DamagedCheckpoint as e:
            if len(folders) == 1:
                raise UserError(f"checkpoint {folder} is damaged ({e})") from None
            print(f"warning: checkpoint {folder} is damaged ({e}); trying the one before it", file=sys.stderr,
                  flush=True)
    raise UserError(f"no usable checkpoint in {run_dir / 'resume'}: start a new run with --checkpoints NEW_FOLDER, "
                    f"or move {run_dir / 'resume'} away and add --auto-resume to start this run over")


def latest_checkpoint(run_dir: Path):
    """(folder, (state, arrays, manifest)) of the newest full checkpoint of the run in `run_dir` that passes its
    checks, reporting each one that does not."""
    return resume_newest(run_dir, checkpoint_folders(run_dir / "resume")[::-1],
                         lambda folder, *contents: (folder, contents))


class Checkpoints:
    """Full checkpoints of a declared state, written beside training: what training changes in place is copied
    at the step (`frozen`), and compressing, hashing, fsync and rename go on on a thread. One at a time: a save
    still being written is waited for first. Where the copies would not fit in half the available RAM, the
    checkpoint is written while training waits. A failed save keeps the previous checkpoint."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.saving: Optional[concurrent.futures.Future] = None
        self.said_inline = False

    def save(self, obj, name: str, summary: dict, beside: bool = True) -> None:
        self.wait()
        started = time.time()
        state, arrays = state_files(obj)
        needed = sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray) and a.flags.writeable)
        if beside and needed >= 0.5 * psutil.virtual_memory().available:
            beside = False
            if not self.said_inline:
                self.said_inline = True
                tqdm.write(f"note: a copy of the run's state ({needed / 2**30:.1f} GiB) does not fit in the "
                           "available RAM, so checkpoints are written while training waits")
        if beside:
            self.saving = self.writer.submit(self._write, name, frozen(state), frozen(arrays), summary, started)
        else:
            self._write(name, state, arrays, summary, started)

    def _write(self, name: str, state: dict, arrays: dict, summary: dict, started: float) -> None:
        self._make_room()
        try:
            folder = save_checkpoint(self.root, name, state, arrays, summary, keep=self.keep)
        except (OSError, RuntimeError) as e:  # PyTorch raises a full disk as a RuntimeError
            earlier = bool(checkpoint_folders(self.root))
            tqdm.write(f"warning: could not write a checkpoint ({why_failed(e, self.root)}); " +
                       ("the previous one is kept and training goes on" if earlier else
                        "there is no earlier one, so this run cannot be resumed yet; training goes on"))
            return
        size = sum(f.stat().st_size for f in folder.iterdir())
        tqdm.write(f"checkpoint: {folder} ({size / 1e6:.1f} MB in {time.time() - started:.1f} s)")

    def _make_room(self) -> None:
        """Where the disk cannot hold one more checkpoint beside those kept but could without the oldest, remove the
        oldest (never the newest)."""
        size = lambda folder: sum(f.stat().st_size for f in folder.iterdir())
        folders = checkpoint_folders(self.root)
        try:
            needed, free = 1.1 * size(folders[-1]), free_bytes(self.root)
            while free is not None and free < needed <= free + size(folders[0]) and len(folders) > 1:
                tqdm.write(f"note: {free / 1e6:.0f} MB free for a checkpoint of about {needed / 1e6:.0f} MB: the "
                           f"oldest checkpoint, {folders[0].name}, is removed to make room")
                shutil.rmtree(folders.pop(0), ignore_errors=True)
                free = free_bytes(self.root)
        except (OSError, IndexError):
            pass

    def say_if_not_saved(self, name: str) -> None:
        """At the end of a session: if the checkpoint `name` could not be written, which one a resume will use."""
        folders = checkpoint_folders(self.root)
        if not folders:
            print(f"note: no checkpoint of this run could be written: free space in {self.root.parent}, then start it "
                  "over with its flags and --auto-resume", flush=True)
        elif folders[-1].name != name:
            print(f"note: the checkpoint of this step could not be written; --resume goes on from {folders[-1]}",
                  flush=True)

    def wait(self) -> None:
        """Wait for the checkpoint being written beside training, if any (a wait cut short by a second Ctrl-C
        leaves it there, for the next wait)."""
        if self.saving is not None:
            error = self.saving.exception()
            self.saving = None
            if error is not None:
                tqdm.write(f"warning: could not write a checkpoint ({type(error).__name__}: {error})")


# ---- The run's folder: one trainer at a time, checked before anything is written.
def run_folder(args) -> Path:
    """The folder of the run the flags name: --checkpoints, or the run --resume PATH points into."""
    if args.resume and args.resume != "latest":
        path = Path(args.resume)
        is_checkpoint = (path / "manifest.json").exists() or path.parent.name == "resume"
        return path.parent.parent if is_checkpoint else path
    return Path(args.checkpoints)


class RunLock:
    """The run folder's lock, held by the trainer for the whole run: a second trainer on the folder is refused,
    in one line naming the holder. The system releases it when its process ends (kill -9 and a lost node too),
    so a lock left behind never blocks; where the file system cannot lock, one line says so and the run goes on."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.lock = run_dir, filelock.FileLock(run_dir / ".trainer.lock", timeout=0)
        self.holder = run_dir / ".trainer.json"

    def acquire(self) -> None:
        try:
            self.lock.acquire()
        except filelock.Timeout:
            raise UserError(f"{self.run_dir}/ is in use by another trainer ({self._held_by()}); wait for it to end, "
                            f"or pass --checkpoints NEW_FOLDER to start another run") from None
        except (OSError, NotImplementedError) as e:
            print(f"note: {self.run_dir}/ cannot be locked ({why_failed(e, self.run_dir)}); make sure no other "
                  "trainer uses it", flush=True)
            self.lock = None
            return
        try:
            write_json(self.holder, dict(pid=os.getpid(), host=socket.gethostname(),
                                         since=time.strftime("%Y-%m-%d %H:%M:%S %Z")))
        except OSError:
            pass  # a full disk: the lock holds all the same, only its holder goes unnamed

    def _held_by(self, wait: float = 2.0) -> str:
        """The holder, as it names itself once it holds the lock (a holder that is starting gets `wait` s)."""
        deadline = time.time() + wait
        while True:
            try:
                h = json.loads(self.holder.read_text())
                if h["host"] != socket.gethostname() or psutil.pid_exists(h["pid"]):
                    return f"process {h['pid']} on {h['host']}, since {h['since']}"
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if time.time() > deadline:
                return "a process that is starting"
            time.sleep(0.05)

    def release(self, remove_folder: bool = False) -> None:
        """Let the folder go; with `remove_folder`, a folder this start created and wrote nothing else to is
        removed too."""
        if remove_folder:
            self.holder.unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release()
        if remove_folder:
            try:
                (self.run_dir / ".trainer.lock").unlink(missing_ok=True)
                self.run_dir.rmdir()  # only if empty
            except OSError:
                pass


def check_run_folder(run_dir: Path) -> bool:
    """Refuse, before anything is built, a run folder that cannot be created or written to; True if it was
    created now."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--checkpoints {run_dir} is a file, not a folder")
    created = False
    try:
        if not run_dir.is_dir():
            run_dir.mkdir(parents=True, exist_ok=True)
            created = True
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        if e.errno != errno.ENOSPC:  # a full disk is no reason to refuse: the run starts, and says so
            raise UserError(f"cannot write to the run's folder {run_dir} ({e.strerror or e})") from None
    return created


def config_of(run_dir: Path) -> Optional[dict]:
    """config.json of the run in `run_dir`, or None where it is missing or damaged."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def checkpoints_to_try(args, run_dir: Path) -> Optional[list]:
    """None to start a new run; else the full checkpoints to resume from, newest first (the trainer holds the
    folder's lock by now). With --auto-resume, a folder with a checkpoint is resumed and any other started."""
    folders = checkpoint_folders(run_dir / "resume")
    if args.auto_resume and not args.resume and folders:
        args.resume = "latest"
    if not args.resume:
        if (folders or (run_dir / "config.json").exists()) and not args.auto_resume:
            raise UserError(f"{run_dir}/ already holds a run: add --resume to continue it, or pass "
                            f"--checkpoints NEW_FOLDER to start another")
        if args.seed is None:
            args.seed = random.SystemRandom().randrange(2**31)
        return None
    if args.resume != "latest" and Path(args.resume).resolve() != run_dir.resolve():
        return [Path(args.resume)]
    if not folders:
        if (run_dir / "config.json").exists():
            raise UserError(f"{run_dir}/ holds a run stopped before its first full checkpoint: start it over with "
                            f"--auto-resume (same flags), or pass --checkpoints NEW_FOLDER")
        raise UserError(f"{run_dir}/ holds no run to resume")
    return folders[::-1]


def resumed_args(args, given: set, summary: dict, run_dir: Path):
    """The flags a checkpoint was written with (its manifest's summary), with the new values of those marked
    new_on_resume; a recipe flag given with another value is refused."""
    saved = summary.get("args")
    if not isinstance(saved, dict):
        raise DamagedCheckpoint("its manifest holds no flags")
    fields = {f.name: f for f in dataclasses.fields(args)}
    may_change = {name for name, f in fields.items() if f.metadata["new_on_resume"]}
    changed = sorted(k for k in given - may_change if getattr(args, k) != saved.get(k, fields[k].default))
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} (run: {saved.get(k)}, given: {getattr(args, k)})" for k in changed)
        raise UserError(f"--resume continues the run's own recipe, and these flags differ: {diffs}; "
                        f"start a new run in another --checkpoints folder to change them")
    merged = {**{k: v for k, v in saved.items() if k in fields}, **{k: getattr(args, k) for k in given & may_change}}
    merged.update(resume=args.resume, checkpoints=str(run_dir))
    try:
        return type(args)(**merged)
    except TypeError as e:
        raise DamagedCheckpoint(f"its flags do not make a run ({e})") from None


def new_run_id() -> str:
    return uuid.uuid4().hex


def clear_leftovers(run_dir: Path) -> None:
    """What a killed save left in the run's folder (the trainer holds its lock, so no save is running)."""
    for leftover in (run_dir / "resume").glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


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


# ---- Helper processes: work that holds the GIL (matplotlib) or needs cores and seconds of its own.
def float32_precision() -> tuple:
    """How this process computes float32 products: its matmul precision (TF32 or not) and cuDNN's TF32."""
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


STOPS = (signal.SIGINT, signal.SIGTERM)
CAN_HOLD_SIGNALS = hasattr(signal, "pthread_sigmask")  # not on Windows, which has no SIGTERM to send


@contextlib.contextmanager
def stops_held():
    """Ctrl-C and SIGTERM held back from this thread while it starts a helper process, which inherits the mask
    and so cannot be stopped while it imports (_helper_started ignores them, then lets them in). Held, not lost:
    one sent to the trainer meanwhile reaches it on the way out."""
    if not CAN_HOLD_SIGNALS:
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _helper_started(precision: tuple) -> None:
    """In the helper process: the trainer's float32 precision (so that an evaluation beside training computes the
    Q-values one in the loop does); Ctrl-C and a scheduler's SIGTERM reach the whole process group (Slurm signals
    every process of a job), and the trainer decides, ending its helpers itself; the helper ends once the trainer
    is gone (kill -9 included)."""
    torch.set_float32_matmul_precision(precision[0])
    torch.backends.cudnn.allow_tf32 = precision[1]
    for s in STOPS:
        signal.signal(s, signal.SIG_IGN)
    if CAN_HOLD_SIGNALS:  # those sent while it started (stops_held) were pending; ignored, they are dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
    parent = multiprocessing.parent_process()
    threading.Thread(target=lambda: (parent.join(), os._exit(0)), daemon=True).start()


class Helper:
    """One spawned process (a fork of a process holding CUDA or threads is unsafe) that runs one job at a time
    while the loop goes on, started at its first job and started again after it died (the OOM killer, kill -9).
    With `newest_only`, a job handed over while one runs waits, replacing any older one waiting, and `on_end`
    hears how each job ended. Where no process can start, or it died DEATHS times in a row, `submit` says so
    once and returns False from then on: the caller does the work."""

    DEATHS = 3

    def __init__(self, name: str, newest_only: bool = False, on_end=None):
        self.name, self.newest_only, self.on_end = name, newest_only, on_end
        self.pool: Optional[concurrent.futures.ProcessPoolExecutor] = None
        self.failed = False
        self.deaths = 0  # jobs in a row whose process died
        self.broken = False  # the process died: the next job starts another
        self.current: Optional[concurrent.futures.Future] = None  # the job handed to the process last
        self.waiting = None  # with newest_only: (work, args) to hand over once the current job is done
        self.lock = threading.RLock()  # the current job's end hands over the waiting one, on the pool's thread

    @property
    def process(self) -> str:
        return f"{self.name}{chr(39) if self.name.endswith('s') else chr(39) + 's'} process"

    def submit(self, work, *args) -> bool:
        # The process gets copies of its own: the queue's thread moves the tensors it sends into shared memory
        # after submit returns, under a caller that may be reading them (a checkpoint of the evaluation's weights).
        args = frozen(args)
        with self.lock:
            if self.newest_only and self.current is not None and not self.current.done():
                self.waiting = (work, args)
                return True
            return self._start(work, args)

    def _start(self, work, args) -> bool:
        if self.failed:
            return False
        if self.broken or (self.current is not None and died(self.current)):
            if self.pool is not None:
                self.pool.shutdown(wait=False)
            self.pool, self.broken = None, False
            if self.deaths >= self.DEATHS:
                tqdm.write(f"note: the {self.process} died {self.deaths} times in a row (out of memory?); "
                           "the training loop does its work from now on")
                self.failed = True
                return False
        try:
            for attempt in range(2):
                if self.pool is None:
                    self.pool = concurrent.futures.ProcessPoolExecutor(
                        1, mp_context=multiprocessing.get_context("spawn"), initializer=_helper_started,
                        initargs=(float32_precision(),))
                try:
                    with stops_held():  # the pool starts its process here
                        self.current = self.pool.submit(work, *args)
                    break
                except BrokenProcessPool:  # its process died while it had no job: start another
                    if attempt:
                        raise
                    self.pool.shutdown(wait=False)
                    self.pool, self.deaths = None, self.deaths + 1
        except (OSError, RuntimeError) as e:
            tqdm.write(f"note: no process could start for the {self.name} ({e}); the training loop does it")
            self.failed, self.pool = True, None
            return False
        self.current.add_done_callback(self._done)
        return True

    def _done(self, job: concurrent.futures.Future) -> None:
        dead = died(job)
        with self.lock:
            self.deaths = self.deaths + 1 if dead else 0 if not job.cancelled() else self.deaths
            self.broken |= dead
        if self.on_end is not None and not job.cancelled():
            self.on_end(job.exception())
        with self.lock:
            if job is self.current and self.waiting is not None and not died(job):
                (work, args), self.waiting = self.waiting, None
                self._start(work, args)

    def poll(self, wait: bool = False):
        """`(True, result)` or `(False, error)` of the job handed over last, once it is done (with `wait`, once it
        is done); None while it runs, or when there is none."""
        job = self.current
        if job is None or not (wait or job.done()):
            return None
        try:
            outcome = (True, job.result())
        except BrokenProcessPool:
            outcome = (False, "its process died; the next one starts another")
        except Exception as e:  # anything the job raised: the caller reports it
            outcome = (False, f"{type(e).__name__}: {e}")
        with self.lock:
            self.broken |= died(job)
            if self.current is job:
                self.current = None
        return outcome

    def close(self, timeout: float) -> None:
        """Let the job running finish, for at most `timeout` seconds (with `newest_only`, the one waiting too);
        then end the process."""
        deadline = time.time() + timeout
        while True:
            with self.lock:
                job = self.current
            if job is None or time.time() >= deadline:
                break
            concurrent.futures.wait([job], deadline - time.time())
            with self.lock:
                if self.current is job:
                    break
        with self.lock:
            self.waiting, pool, self.pool, self.current = None, self.pool, None, None
        if pool is not None:
            processes = list(pool._processes.values())  # kill_workers() only comes with Python 3.14
            pool.shutdown(wait=False, cancel_futures=True)
            for p in processes:
                if p.is_alive():
                    p.kill()
                p.join()


def died(job: concurrent.futures.Future) -> bool:
    """Whether the process running `job` ended before it was done (the OOM killer, kill -9)."""
    return job.done() and not job.cancelled() and isinstance(job.exception(), BrokenProcessPool)


# ---- The device, and the progress shown.
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


def compile_failure(e: BaseException) -> str:
    """What a failed compile says, in one line; where the error names PyTorch's compile cache (a library cut short
    by a compile killed midway breaks every later compile), that deleting the cache lets the next run compile."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    inner = getattr(e, "inner_exception", None) or e  # torch.compile's BackendCompilerFailed wraps the error
    reason = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:160]}"
    text = " ".join(str(x) for x in (e, inner, e.__cause__, e.__context__) if x is not None)
    if cache_dir() in text or "file too short" in text:
        reason += f"; the compile cache may be damaged: delete {cache_dir()} and the next run compiles afresh"
    return reason


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Euclidean norms); 0 where they are equal."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if (a - b).any() else 0.0


def check_memory_fits(needed: int, device: torch.device) -> None:
    """Refuse, before allocating, a replay memory the device cannot hold."""
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], "free GPU memory"
    else:  # the CPU, or Apple's MPS, which shares the machine's RAM; psutil asks each system its own way
        free, where = psutil.virtual_memory().available, "available RAM"
    if needed > 0.9 * free:
        raise UserError(f"the replay memory needs {needed / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of "
                        f"{where} is left; lower --memory")


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


def log_friendly_output() -> None:
    """Where stdout is a file (a Slurm log, nohup, a saved notebook cell), every line reaches it when printed, in
    order with stderr's, not a buffer's worth at a time."""
    if not sys.stdout.isatty():
        sys.stdout.reconfigure(line_buffering=True)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress towards the budget: on a terminal tqdm's bar; elsewhere (a log file, Slurm, nohup, a saved notebook
    cell), where a bar's redraws make one endless line, one plain line every `every` seconds. Also the agent steps
    per second, measured over at least 2 s."""

    UNITS = {"s": "seconds", "step": "agent steps", "ep": "episodes"}

    def __init__(self, total: int, unit: str, done: float, steps: int, every: float, figures: dict,
                 terminal: Optional[bool] = None):
        self.total, self.unit, self.every = total, unit, every
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, initial=min(int(done), total), unit=unit, desc="training", dynamic_ncols=True,
                        mininterval=1.0) if terminal else None
        self.rate_time, self.rate_steps, self.steps_per_s = time.time(), steps, 0.0
        self.line_time, self.line_done, self.line_steps = time.time(), done, steps  # the last line's, or the start's
        self.figures = figures  # episodes, mean score of the last 100 games (None before the first), epsilon

    def measure(self, steps: int) -> None:
        now = time.time()
        if now - self.rate_time >= 2.0:
            self.steps_per_s = (steps - self.rate_steps) / (now - self.rate_time)
            self.rate_time, self.rate_steps = now, steps

    def show(self, done: float, steps: int, figures: Optional[dict] = None) -> None:
        """Move on to `done`; `figures` (episodes, mean score of the last 100 games, epsilon) when they changed."""
        if figures:
            self.figures = figures
        if self.bar is not None:
            self.bar.update(min(int(done), self.total) - self.bar.n)
            if figures:
                score = figures["score"]
                self.bar.set_postfix(score="-" if score is None else f"{score:.1f}", eps=f"{figures['eps']:.3f}",
                                     sps=f"{self.steps_per_s:.0f}", refresh=False)
        elif time.time() - self.line_time >= self.every:
            print(self.line(done, steps), flush=True)

    def line(self, done: float, steps: int) -> str:
        """One line of progress; the speed and the time left from the rate since the line before."""
        now, f = time.time(), self.figures
        seconds = max(now - self.line_time, 1e-9)
        rate, steps_per_s = (done - self.line_done) / seconds, (steps - self.line_steps) / seconds
        left = (self.total - done) / rate if rate > 0 else None
        self.line_time, self.line_done, self.line_steps = now, done, steps
        score = "-" if f["score"] is None else f"{f['score']:.1f}"
        return (f"step {steps:,} | episode {f['episodes']:,} | score {score} (mean of the last 100 games) | "
                f"epsilon {f['eps']:.3f} | {steps_per_s:,.0f} steps/s | "
                f"{min(done, self.total) / self.total:.1%} of {self.total:,} {self.UNITS[self.unit]}, "
                f"{'time left unknown' if left is None else duration(left) + ' left'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- Logs: metrics.csv and TensorBoard, each a file that grows by whole records; tables that grow a row at a time.
class AppendFile:
    """A file that grows by whole records (metrics.csv's rows, TensorBoard's events). A write the disk cannot take
    is undone, the file cut back to its last whole record, and its records wait to go with the next write."""

    LIMIT = 100_000  # records kept waiting, at most

    def __init__(self, path: Path, writes: Writes):
        self.path, self.writes, self.waiting, self.fd = path, writes, [], None

    def add(self, record: bytes) -> None:
        self.waiting.append(record)
        if len(self.waiting) > self.LIMIT:
            del self.waiting[0]
        data = b"".join(self.waiting)
        try:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
            size = os.fstat(self.fd).st_size
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self.fd, view)
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    view = view[written:]
            except OSError:
                os.ftruncate(self.fd, size)
                raise
        except OSError as e:
            self.writes.failed(self.path, e, then="training goes on, and its rows wait for the next write")
            return
        self.waiting.clear()
        self.writes.succeeded(self.path)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def csv_line(values: list) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().encode()


class EventFile:
    """A TensorBoard event file, written a record at a time in this thread (TensorBoard's own writer thread
    dies at its first full disk, with a traceback); `purge_step` hides the events a resumed run writes again."""

    def __init__(self, folder: Path, writes: Writes, purge_step: Optional[int]):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
        self.pb, self.summary_pb, self.RecordWriter = event_pb2, summary_pb2, RecordWriter
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            writes.failed(folder, e)
        self.file = AppendFile(folder / name, writes)
        self.add(self.pb.Event(wall_time=time.time(), step=purge_step or 0, file_version="brain.Event:2"))
        if purge_step is not None:
            self.add(self.pb.Event(wall_time=time.time(), step=purge_step,
                                   session_log=self.pb.SessionLog(status=self.pb.SessionLog.START)))

    def add(self, *events) -> None:
        out = io.BytesIO()
        writer = self.RecordWriter(out)
        for event in events:
            writer.write(event.SerializeToString())
        self.file.add(out.getvalue())

    def scalars(self, values: dict, step: int) -> None:
        now = time.time()
        self.add(*[self.pb.Event(wall_time=now, step=int(step), summary=self.summary_pb.Summary(
            value=[self.summary_pb.Summary.Value(tag=tag, simple_value=float(v))])) for tag, v in values.items()])

    def text(self, tag: str, text: str) -> None:
        from torch.utils.tensorboard.summary import text as text_summary
        self.add(self.pb.Event(wall_time=time.time(), step=0, summary=text_summary(tag, text)))

    def close(self) -> None:
        self.file.close()


class RunLog:
    """metrics.csv (one row per finished game and per evaluation) and the same scalars for TensorBoard. A resumed
    run drops the rows after its checkpoint; a metrics.csv missing or damaged never blocks it (a note says what
    was dropped or started again)."""

    def __init__(self, run_dir: Path, columns: list, resume_step: Optional[int], writes: Writes,
                 replayed_eval: Optional[int] = None):
        self.path, self.columns, self.writes = run_dir / "metrics.csv", columns, writes
        rows = [] if resume_step is None else self._rows_before(resume_step, replayed_eval)
        data = b"".join([csv_line(columns)] + [csv_line(r) for r in rows])
        try:
            write_atomically(self.path, lambda f: f.write(data))
        except OSError:
            self._rewrite_in_place(data)
        self.file = AppendFile(self.path, writes)
        try:
            self.tb = EventFile(run_dir / "tensorboard", writes, resume_step)
        except ImportError:
            print("note: the tensorboard package is not installed; metrics go to metrics.csv only")
            self.tb = None

    def _rows_before(self, resume_step: int, replayed_eval: Optional[int]) -> list:
        """The rows a resumed run keeps: those up to its checkpoint's step, but for the row of the evaluation that
        was playing beside training when the checkpoint was taken (it is played again)."""
        try:
            with open(self.path, newline="") as f:
                text = f.read()
            lines = list(csv.reader(io.StringIO(text)))
        except FileNotFoundError:
            print(f"note: {self.path} is missing; it starts again with its header (the rows before step "
                  f"{resume_step} are in the checkpoint's history, which curve.png draws)", flush=True)
            return []
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            print(f"note: {self.path} cannot be read ({e}); it is kept as {self.path.name}.damaged and starts again",
                  flush=True)
            self.path.replace(self.path.with_name(self.path.name + ".damaged"))
            return []
        if lines and lines[0] == self.columns:
            lines = lines[1:]
        kept, damaged, last_damaged = [], 0, False
        for n, r in enumerate(lines):
            whole = n < len(lines) - 1 or text.endswith("\n")  # a write cut short leaves its line unended
            ok = whole and len(r) == len(self.columns) and r[0] in ("game", "eval") and r[1].isdigit()
            damaged += not ok
            last_damaged = not ok and n == len(lines) - 1
            if ok and int(r[1]) <= resume_step and not (r[0] == "eval" and int(r[1]) == replayed_eval):
                kept.append(r)
        if damaged:
            what = "its last line was cut short" if damaged == 1 and last_damaged else f"{damaged} lines were damaged"
            print(f"note: {self.path}: {what}, and dropped", flush=True)
        return kept

    def _rewrite_in_place(self, data: bytes) -> None:
        """With no space for a second copy: write the rows kept over the file's start, then cut it there."""
        try:
            with open(self.path, "r+b") as f:
                f.write(data)
                f.truncate()
        except OSError as e:
            self.writes.failed(self.path, e, then="its rows after the checkpoint stay")

    def row(self, **values) -> None:
        self.file.add(csv_line([(f"{v:.6g}" if isinstance(v, float) else "" if v is None else v)
                                for v in (values.get(c) for c in self.columns)]))
        if self.tb is not None:
            self.tb.scalars({f"{values['kind']}/{k}": v for k, v in values.items()
                             if k not in ("kind", "step") and v is not None and v != ""}, values["step"])

    def table(self, name: str, values: dict) -> None:
        if self.tb is not None:
            self.tb.text(name, "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in values.items()))

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.scalars({name: value}, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Rows:
    """A table that grows a row at a time, in one float64 array that doubles when full: 10 million rows cost a
    fraction of what Python lists of them would, and `array` costs nothing."""

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


# ---- curve.png: at most CURVE_POINTS points a line, so that a redraw costs the same at any run length.
CURVE_POINTS = 2_000


def bins(n: int, points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` runs of consecutive rows out of `n`: the indices of each one's first and last row."""
    ends = np.unique(np.linspace(0, n - 1, min(n, points)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    return np.concatenate([[0], ends[:-1] + 1]).astype(np.int64), ends


def thinned(rows: np.ndarray, points: int = CURVE_POINTS) -> np.ndarray:
    """At most `points` rows: each the mean of a run of consecutive rows, at the x (column 0) of its last one."""
    if len(rows) <= points:
        return rows.copy()
    starts, ends = bins(len(rows), points)
    return np.column_stack([rows[ends, 0], np.add.reduceat(rows[:, 1:], starts) / (ends - starts + 1)[:, None]])


def curve_data(games: np.ndarray, lives: np.ndarray, evals: np.ndarray, learning: np.ndarray, wall: float,
               window: int = 100) -> dict:
    """What curve.png draws from rows of (step, seconds, score) per game, (step, episode, mean) per life window,
    (step, seconds, mean, max, cleared) per evaluation and (step, loss, mean Q): up to CURVE_POINTS games one by
    one; past that, each run of games between two points shows its lowest and highest score, the mean of the
    `window` games up to its end and the best game so far; the other lines are averaged over runs of rows.
    Cheap enough to run in the training loop."""
    data = dict(lives=thinned(lives), evals=thinned(evals), learning=thinned(learning), wall=wall)
    if len(games):
        scores, (starts, ends) = games[:, 2], bins(len(games))
        last = ends[:, None] - np.arange(window)[None, :]  # the `window` games up to each point
        inside = last >= 0
        mean = np.where(inside, scores[np.maximum(last, 0)], 0).sum(1) / inside.sum(1)
        low, high = np.minimum.reduceat(scores, starts), np.maximum.reduceat(scores, starts)
        cleared, first_clear = np.flatnonzero(high >= wall), None
        if len(cleared):
            i = starts[cleared[0]] + np.argmax(scores[starts[cleared[0]]:ends[cleared[0]] + 1] >= wall)
            first_clear = games[i, 0]
        data.update(step=games[ends, 0], low=low, high=high, mean=mean, best=np.maximum.accumulate(high),
                    first_clear=first_clear, each_game=len(ends) == len(games))
    return data


def draw_curve(path: Path, data: dict, title: str) -> None:
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
        top.annotate(" wall cleared", (data["first_clear"] / 1e6, data["wall"]), fontsize=9)
    top.set_ylabel("score (points)")
    top.set_title(f"{title}: training progress")
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
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


# ---- Videos: game frames upscaled, with the score burned in.
def draw_frame(rgb: np.ndarray, score: Optional[float], scale: int = 3) -> np.ndarray:
    """An RGB game frame upscaled (nearest neighbour) with the score burned in: for videos and play's window."""
    import cv2
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


class GameVideos:
    """One video per game played side by side, from their first frames `rgb`; `keep` keeps one as `path`."""

    def __init__(self, path: str, rgb: np.ndarray):
        self.path, self.tmp = path, Path(path).with_name(f".{Path(path).name}-games")
        self.writers = [VideoWriter(self.tmp / f"{i}.mp4") for i in range(len(rgb))]
        for w, frame in zip(self.writers, rgb):
            w.add(frame, 0)

    def add(self, rgb: np.ndarray, scores: np.ndarray, which: np.ndarray) -> None:
        for i in np.flatnonzero(which):
            self.writers[i].add(rgb[i], scores[i])

    def keep(self, i: int) -> None:
        for w in self.writers:
            w.close()
        os.replace(self.tmp / f"{i}.mp4", self.path)
        shutil.rmtree(self.tmp, ignore_errors=True)
