"""Interrupts that wait for a consistent state.

Inside `deferred_interrupts()`, Ctrl-C (SIGINT) and `kill` (SIGTERM) only set a flag: the section runs to its end
(or the loop in it checks the flag and stops between two complete updates), and the interrupt is raised as
KeyboardInterrupt when the section is left. So what a run saves on an interrupt is never half of an update (an
optimizer step applied to some parameters only, a trace record without its tensors).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[Callable[[], bool]]:
    """Defer SIGINT/SIGTERM for the block; yields `requested()`, true once one arrived. A signal that was ignored
    stays ignored; outside the main thread (where no handler can be set) nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield lambda: bool(caught)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt
