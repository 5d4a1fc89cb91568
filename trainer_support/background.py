"""Stop signals, and the helper process that plays evaluations beside training."""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm


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


# ---- The helper process: evaluations that need cores and seconds of their own.
def float32_precision() -> tuple:
    """How this process computes float32 products: its matmul precision (TF32 or not) and cuDNN's TF32."""
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


STOPS = (signal.SIGINT, signal.SIGTERM)
CAN_HOLD_SIGNALS = hasattr(signal, "pthread_sigmask")  # not on Windows, which has no SIGTERM to send


class StoppedWhileStarting(BaseException):  # not an Exception: no `except Exception` on the way takes it for a fault
    """A stop (its signal's name) that came while the trainer started, before it wrote anything."""


@contextlib.contextmanager
def stops_end_the_start(pending: list):
    """While the trainer starts (checks its folder, reads a checkpoint, builds its games), nothing of the run is
    written yet: Ctrl-C or SIGTERM ends the start there (StoppedWhileStarting, at the end of the call it comes in:
    building the games is one call of the emulator), with nothing to save. `pending`: stops that came earlier,
    while the modules were imported."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can take signals
        yield
        return

    def stop(signum, frame):
        raise StoppedWhileStarting(signal.Signals(signum).name)
    previous = {s: signal.signal(s, stop) for s in STOPS}
    try:
        if pending:
            raise StoppedWhileStarting(signal.Signals(pending[0]).name)
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
    Where no process can start, or its jobs failed FAILURES times in a row (the process died, or the job raised:
    something the process lacks), `submit` says so once and returns False from then on: the caller does the work."""

    FAILURES = 3
    DIED = "its process died"

    def __init__(self, name: str):
        self.name = name
        self.pool: Optional[concurrent.futures.ProcessPoolExecutor] = None
        self.failed = False
        self.failures: list[str] = []  # how the last jobs failed, in a row
        self.current: Optional[concurrent.futures.Future] = None  # the job handed to the process last

    @property
    def process(self) -> str:
        return f"{self.name}{chr(39) if self.name.endswith('s') else chr(39) + 's'} process"

    def submit(self, work, *args) -> bool:
        """Start `work(*args)` in the process; False where the caller must do it itself."""
        if not self.failed and len(self.failures) >= self.FAILURES:
            how = ("died" if all(f == self.DIED for f in self.failures) else "failed") + f" {len(self.failures)} times"
            tqdm.write(f"note: the {self.process} {how} in a row (last: {self.failures[-1]}); the training loop "
                       "does its work from now on")
            self.failed = True
        if self.failed:
            return False
        # The process gets copies of its own: the queue's thread moves the tensors it sends into shared memory
        # after submit returns, under a caller that may go on changing them.
        args = frozen(args)
        try:
            for attempt in range(2):
                if self.pool is None:
                    self.pool = concurrent.futures.ProcessPoolExecutor(
                        1, mp_context=multiprocessing.get_context("spawn"), initializer=_helper_started,
                        initargs=(float32_precision(),))
                try:
                    with stops_held():  # the pool starts its process here
                        self.current = self.pool.submit(work, *args)
                    return True
                except BrokenProcessPool:  # its process died while it had no job: start another
                    self._end_process()
                    self.failures.append(self.DIED)
                    if attempt:
                        raise
        except (OSError, RuntimeError) as e:
            tqdm.write(f"note: no process could start for the {self.name} ({e}); the training loop does it")
            self.failed, self.pool = True, None
        return False

    def poll(self, wait: bool = False):
        """`(True, result)` or `(False, error)` of the job handed over last, once it is done (with `wait`, once it
        is done); None while it runs, or when there is none."""
        job = self.current
        if job is None or not (wait or job.done()):
            return None
        self.current = None
        try:
            outcome, self.failures = (True, job.result()), []
        except BrokenProcessPool:
            outcome = (False, f"{self.DIED}; the next one starts another")
            self.failures.append(self.DIED)
            self._end_process()
        except Exception as e:  # anything the job raised: the caller reports it
            outcome = (False, f"{type(e).__name__}: {e}")
            self.failures.append(outcome[1])
        return outcome

    def close(self, timeout: float) -> None:
        """Let the job running finish, for at most `timeout` seconds; then end the process."""
        if self.current is not None:
            concurrent.futures.wait([self.current], timeout)
        self.current = None
        self._end_process()

    def _end_process(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            processes = list(pool._processes.values())  # kill_workers() only comes with Python 3.14
            pool.shutdown(wait=False, cancel_futures=True)
            for p in processes:
                if p.is_alive():
                    p.kill()
                p.join()


def frozen(value):
    """`value` (tensors, arrays, and dicts and lists of them) copied, tensors to the CPU, so that training's next
    steps cannot change it: the one way state is handed to another process. Read-only arrays (rows that are never
    written again) are handed over as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, np.ndarray):
        return value.copy() if value.flags.writeable else value
    if isinstance(value, dict):
        return {k: frozen(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(frozen(v) for v in value)
    return value
