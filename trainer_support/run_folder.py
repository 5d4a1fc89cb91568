"""The run's folder: one trainer at a time (its lock), checked before anything is written; which run a start
continues, with which flags, from which full checkpoint."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import shlex
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import filelock
import psutil

from .checkpoint import DamagedCheckpoint, checkpoint_folders, load_checkpoint
from .cli import UserError
from .files import why_failed, write_json


def run_folder(args, given: set = frozenset()) -> Path:
    """The folder of the run the flags name: --checkpoints, or the run --resume PATH points into (--checkpoints
    naming another folder beside it is refused)."""
    if args.resume and args.resume != "latest":
        path = Path(args.resume)
        is_checkpoint = (path / "manifest.json").exists() or path.parent.name == "resume"
        run_dir = path.parent.parent if is_checkpoint else path
        if "checkpoints" in given and Path(args.checkpoints).resolve() != run_dir.resolve():
            raise UserError(f"--resume {path} continues the run in {run_dir}, not in --checkpoints "
                            f"{args.checkpoints}: leave out --checkpoints (a run goes on in its own folder)")
        return run_dir
    return Path(args.checkpoints)


HOLDER = ".trainer.json"  # who holds the lock, as it names itself
# The errors of a file system that has no locks (some network mounts): the run goes on unguarded, and says so.
CANNOT_LOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class FolderLock:
    """The run folder's lock (.trainer.lock), held by the trainer for the whole run: a second trainer on the folder
    is refused, in one line naming the holder. The system releases it when its process ends (kill -9 and a lost node
    too), so a lock left behind never blocks. A lock file this trainer may not open is refused (it cannot tell
    whether another trainer holds it); only where the file system has no locks does the run go on unguarded, with
    a note. A folder deleted under the run is noticed (`lost`) and locked again where it is made again (`retake`)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = run_dir, run_dir / ".trainer.lock"
        self.lock: Optional[filelock.FileLock] = None
        self.held: Optional[tuple] = None  # (device, inode) of the file locked

    def acquire(self) -> None:
        lock = filelock.FileLock(self.path, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise UserError(f"{self.run_dir}/ is in use by another trainer ({held_by(self.run_dir)}); wait for it to "
                            f"end, or pass --checkpoints NEW_FOLDER to start another run") from None
        except (OSError, NotImplementedError) as e:
            if isinstance(e, OSError) and e.errno not in CANNOT_LOCK:
                fix = (f"give it back read and write permission ({shlex.join(['chmod', 'u+rw', str(self.path)])})"
                       if isinstance(e, PermissionError) else
                       f"it is not a file a lock can be taken on; where no trainer runs, remove it "
                       f"({shlex.join(['rm', '-r', str(self.path)])})")
                raise UserError(f"{self.path} cannot be opened ({e.strerror or e}), so this trainer cannot tell "
                                f"whether another one uses {self.run_dir}/: {fix}, or pass --checkpoints "
                                f"NEW_FOLDER") from None
            print(f"note: {self.run_dir}/ cannot be locked: its file system has no locks ({why_failed(e, self.path)})"
                  f"; make sure no other trainer uses it", flush=True)
            return
        self.lock = lock
        with contextlib.suppress(OSError):  # the file is open and locked; only a race with rm could fail this
            st = os.stat(self.path)
            self.held = (st.st_dev, st.st_ino)
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, only its holder goes unnamed
            write_json(self.run_dir / HOLDER, dict(pid=os.getpid(), host=socket.gethostname(),
                                                   since=time.strftime("%Y-%m-%d %H:%M:%S %Z")))

    def lost(self) -> bool:
        """Whether the file locked is no longer the folder's lock file: the folder was deleted (or the file)."""
        if self.held is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.held

    def retake(self) -> None:
        """Lock the folder again where it was made again; UserError if another trainer has taken it meanwhile."""
        self.release()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.acquire()

    def release(self, remove_folder: bool = False, remove_holder: bool = False) -> None:
        """Let the folder go; with `remove_folder`, a folder this start created and wrote nothing else to is
        removed; with `remove_holder`, the file naming this trainer (a start that ends before writing)."""
        if (remove_folder or remove_holder) and self.lock is not None:
            (self.run_dir / HOLDER).unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release()
        self.lock, self.held = None, None
        if remove_folder:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
                self.run_dir.rmdir()  # only if empty


def held_by(run_dir: Path, wait: float = 2.0) -> str:
    """The lock's holder, as it names itself once it holds the lock (a holder that is starting gets `wait` s)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            h = json.loads((run_dir / HOLDER).read_text())
            if h["host"] != socket.gethostname() or psutil.pid_exists(h["pid"]):
                return f"process {h['pid']} on {h['host']}, since {h['since']}"
        time.sleep(0.05)
    return "a process that is starting"


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


def resume_newest(run_dir: Path, folders: list, fit):
    """`fit(folder, state, arrays, manifest)` for the first of `folders` (newest first) that passes its checks, is
    of the run in config.json (where that names one) and fits (`fit` raises DamagedCheckpoint where it does not).
    Each one that fails is reported in one line and the one before it tried; a folder given alone is refused."""
    run_id = (config_of(run_dir) or {}).get("run_id")
    resume = run_dir / "resume"
    start_over = (f"start a new run with --checkpoints NEW_FOLDER, or move {resume} away "
                  f"({shlex.join(['mv', str(resume), str(resume) + '.damaged'])}) and add --auto-resume to start "
                  f"this run over")
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
                others = [f for f in checkpoint_folders(resume) if f.resolve() != folder.resolve()]
                way = (f"--resume {shlex.quote(str(others[-1]))} goes on from the one before it" if others else
                       f"it is the run's only full checkpoint: {start_over}")
                raise UserError(f"checkpoint {folder} is damaged ({e}); {way}") from None
            print(f"warning: checkpoint {folder} is damaged ({e}); trying the one before it", file=sys.stderr,
                  flush=True)
    raise UserError(f"no usable checkpoint in {resume}: {start_over}")
