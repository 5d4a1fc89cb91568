"""Full checkpoints of a declared state. A checkpoint is a folder resume/<step>/ of two kinds of file: each array a
part declares (its `ARRAYS`) as a zstd-compressed .npy, and everything else in state.pt (read back with
weights_only=True); manifest.json, written last, holds the format version, a summary a person can read, and each
file's size and SHA-256. The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import zstandard
from tqdm import tqdm

from .cli import UserError
from .files import free_bytes, fsync_dir, sha256, torch_save, why_failed, write_json

FORMAT = 1                  # the full checkpoint's format version: a change of format reads the one before it
LAST_READER_OF_0 = "b8244e0"  # the last commit that reads the layouts written before format 1


class CannotRestore(Exception):
    """A part that a checkpoint cannot bring back (games that start afresh); the message says why."""


class DamagedCheckpoint(Exception):
    pass


# ---- Arrays compressed as they are written and read, a chunk at a time.
def save_array(path: Path, array: np.ndarray | torch.Tensor, chunk_bytes: int = 16 << 20) -> None:
    """`array` as a .npy stream compressed with zstd (level 1, on every core). A tensor goes a chunk of rows at a
    time, so that saving a replay memory on a GPU never holds a second copy of it in the host's RAM."""
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=1, threads=-1).stream_writer(f, closefd=False) as out:
        if not isinstance(array, torch.Tensor):
            np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
            return
        dtype = array[:0].cpu().numpy().dtype
        header = dict(descr=np.lib.format.dtype_to_descr(dtype), fortran_order=False, shape=tuple(array.shape))
        np.lib.format.write_array_header_1_0(out, header)
        rows = max(1, chunk_bytes // max(1, array[:1].numel() * array.element_size()))
        for start in range(0, len(array), rows):
            out.write(array[start:start + rows].contiguous().cpu().numpy().data)


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


def save_full_checkpoint(root: Path, obj, name: str, summary: dict, keep: int) -> None:
    """resume/<name>/ from the declared state `obj`, written while training waits (about 3 s per 10 minutes of a
    run: BENCHMARKS.md); the newest `keep` are kept. One that fails keeps the previous one and says so."""
    started = time.time()
    state, arrays = state_files(obj)
    make_room(root)
    try:
        folder = save_checkpoint(root, name, state, arrays, summary, keep=keep)
    except KeyboardInterrupt:  # a second stop while saving: the run ends at once (cli.run_command says so)
        tqdm.write("warning: the checkpoint being written was interrupted and is not kept; " +
                   ("the previous one is" if checkpoint_folders(root) else "this run has no other one"))
        raise
    except (OSError, RuntimeError) as e:  # PyTorch raises a full disk as a RuntimeError
        earlier = bool(checkpoint_folders(root))
        tqdm.write(f"warning: could not write a checkpoint ({why_failed(e, root)}); " +
                   ("the previous one is kept and training goes on" if earlier else
                    "there is no earlier one, so this run cannot be resumed yet; training goes on"))
        return
    size = sum(f.stat().st_size for f in folder.iterdir())
    tqdm.write(f"checkpoint: {folder} ({size / 1e6:.1f} MB in {time.time() - started:.1f} s)")


def make_room(root: Path) -> None:
    """Where the disk cannot hold one more checkpoint beside those kept but could without the oldest, remove the
    oldest (never the newest)."""
    size = lambda folder: sum(f.stat().st_size for f in folder.iterdir())
    folders = checkpoint_folders(root)
    try:
        needed, free = 1.1 * size(folders[-1]), free_bytes(root)
        while free is not None and free < needed <= free + size(folders[0]) and len(folders) > 1:
            tqdm.write(f"note: {free / 1e6:.0f} MB free for a checkpoint of about {needed / 1e6:.0f} MB: the "
                       f"oldest checkpoint, {folders[0].name}, is removed to make room")
            shutil.rmtree(folders.pop(0), ignore_errors=True)
            free = free_bytes(root)
    except (OSError, IndexError):
        pass


def say_if_not_saved(root: Path, name: str) -> Optional[Path]:
    """At the end of a session: if the checkpoint `name` could not be written, which one a resume will use. Returns
    the newest checkpoint (None: there is none)."""
    folders = checkpoint_folders(root)
    if not folders:
        print(f"note: no checkpoint of this run could be written: free space in {root.parent}, then start it "
              "over with its flags and --auto-resume", flush=True)
        return None
    if folders[-1].name != name:
        print(f"note: the checkpoint of this step could not be written; --resume goes on from {folders[-1]}",
              flush=True)
    return folders[-1]
