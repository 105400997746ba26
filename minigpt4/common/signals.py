"""SIGTERM handling shared by the long-running commands: training checkpoints and stops at the next step boundary
(runners/runner.py), an export removes its staging folder and stops (export/cli.py).

    previous = install_sigterm_handler(handler)   # handler(signum, frame)
    ...
    restore_sigterm_handler(previous)

    with sigterm_handled(handler):                 # the same as a block
        ...

Python runs signal handlers in the main thread only and refuses to install one from another thread; there (a
command called from a worker thread, e.g. inside a notebook's executor) nothing is installed and SIGTERM keeps
its previous meaning.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

Handler = Callable[[int, Any], None]


def install_sigterm_handler(handler: Handler) -> Any:
    """Make `handler` SIGTERM's handler; returns what to give `restore_sigterm_handler` (None: nothing installed,
    because this is not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, handler)
    return previous if previous is not None else signal.SIG_DFL  # None: a handler installed outside Python


def restore_sigterm_handler(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_handled(handler: Handler) -> Iterator[None]:
    previous = install_sigterm_handler(handler)
    try:
        yield
    finally:
        restore_sigterm_handler(previous)
