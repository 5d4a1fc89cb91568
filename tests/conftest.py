"""Fixtures shared by the test files."""
import signal

import pytest
import torch


@pytest.fixture
def in_process():
    """tb.train installs SIGINT/SIGTERM handlers and sets torch's thread count: undo both afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    yield
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_num_threads(threads)
