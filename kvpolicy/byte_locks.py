"""POSIX record locks on single bytes of a sidecar file: how kvpolicy keeps processes from writing one thing twice
(the results store's appends and work-unit claims, one `kvp train` per checkpoint directory).

A POSIX lock belongs to its process: it dies with it, so a killed run never blocks the next, but two holders in
one process do not exclude each other. Closing any descriptor of the file drops every lock the process holds on
it, so a `ByteLocks` opens its file once and keeps it open until `close()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class ByteLocks:
    """Exclusive locks on bytes of the file `path` (created on first use, never followed when a link)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        """The file's one descriptor (opened on first use; OSError when it cannot be)."""
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        return self._fd

    def acquire(self, offset: int, wait: bool = True) -> bool:
        """Lock byte `offset`: True once held; with wait=False, False at once when another process holds it. Any
        other failure is an OSError."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: another process holds it
            return False
        return True

    def release(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)

    @contextlib.contextmanager
    def hold(self, offset: int, wait: bool = True) -> Iterator[bool]:
        """Hold byte `offset` for the block; yields whether it is held (see `acquire`)."""
        held = self.acquire(offset, wait)
        try:
            yield held
        finally:
            if held:
                self.release(offset)

    def is_current(self) -> bool:
        """Whether the open descriptor is still the file at `path` (not one removed, or replaced, meanwhile)."""
        try:
            here, there = os.fstat(self.fd), os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def close(self) -> None:
        """Close the file, dropping every lock held on it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
