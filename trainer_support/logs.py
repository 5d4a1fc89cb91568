"""What a run shows and keeps of its progress: the bar or progress lines, metrics.csv and TensorBoard (each a file
that grows by whole records and survives a full disk), and the learning figures a row reads."""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .files import Writes, write_atomically


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
    run keeps what was logged up to its checkpoint's step, and nothing after it: no evaluation crosses a
    checkpoint, so each row is logged once. A metrics.csv missing or damaged never blocks a resume (a note says what
    was dropped or started again)."""

    def __init__(self, run_dir: Path, columns: list, resume_step: Optional[int], writes: Writes):
        self.path, self.columns, self.writes = run_dir / "metrics.csv", columns, writes
        rows = [] if resume_step is None else self._rows_up_to(resume_step)
        data = b"".join([csv_line(columns)] + [csv_line(r) for r in rows])
        try:
            write_atomically(self.path, lambda f: f.write(data))
        except OSError:
            self._rewrite_in_place(data)
        self.file = AppendFile(self.path, writes)
        try:
            # TensorBoard hides the events from purge_step on: those logged after the checkpoint
            self.tb = EventFile(run_dir / "tensorboard", writes, None if resume_step is None else resume_step + 1)
        except ImportError:
            print("note: the tensorboard package is not installed; metrics go to metrics.csv only")
            self.tb = None

    def _rows_up_to(self, resume_step: int) -> list:
        """The rows a resumed run keeps: those up to its checkpoint's step. Lines that cannot be read (bytes that
        are not text, a row cut short) are dropped, and kept in metrics.csv.damaged."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            print(f"note: {self.path} is missing; it starts again with its header (the rows before step "
                  f"{resume_step} are in the checkpoint's history, which curve.png draws)", flush=True)
            return []
        except OSError as e:
            print(f"note: {self.path} cannot be read ({e.strerror or e}); it is kept as {self.path.name}.damaged "
                  f"and starts again", flush=True)
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_name(self.path.name + ".damaged"))
            return []
        kept, damaged = [], []
        for n, line in enumerate(data.splitlines(keepends=True)):
            try:
                r = next(csv.reader([line.decode()]))
            except (UnicodeDecodeError, csv.Error, StopIteration):
                r = None
            if n == 0 and r == self.columns:
                continue
            # a write cut short leaves its line unended
            if (r is not None and line.endswith(b"\n") and len(r) == len(self.columns) and r[0] in ("game", "eval")
                    and r[1].isdigit()):
                if int(r[1]) <= resume_step:
                    kept.append(r)
            else:
                damaged.append(line)
        if damaged:
            aside = self.path.with_name(self.path.name + ".damaged")
            what = ("its last line was cut short" if len(damaged) == 1 and data.endswith(damaged[0])
                    and not damaged[0].endswith(b"\n") else f"{len(damaged)} lines could not be read")
            try:
                with open(aside, "ab") as f:  # after what an earlier resume set aside
                    f.write(b"".join(damaged))
                print(f"note: {self.path}: {what}: dropped, and kept in {aside.name}", flush=True)
            except OSError:
                print(f"note: {self.path}: {what}: dropped", flush=True)
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


class LearningStats:
    """Sums of the loss and mean Q since the last logged row, kept on the device until a row reads them."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, device=device)  # loss, mean Q, updates

    def add(self, loss: torch.Tensor, mean_q: torch.Tensor) -> None:
        self.sums += torch.stack([loss, mean_q, torch.ones((), device=self.sums.device)])

    def take(self) -> tuple:
        """Mean loss and mean Q since the last call ((None, None) without updates), and start new sums."""
        loss, mean_q, updates = self.sums.tolist()
        if updates == 0:
            return None, None
        self.sums.zero_()
        return loss / updates, mean_q / updates
