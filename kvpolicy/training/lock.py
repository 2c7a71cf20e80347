"""One `kvp train` at a time per checkpoint directory: two runs on one --out would each overwrite the other's
checkpoint, and one result would be lost without a word.

The run holds a POSIX record lock (as the results store does) on byte 0 of a sidecar file beside the directory,
`.CKPT.lock`, from before it reads the checkpoint until it ends; a second run refuses at once. The lock belongs to
the process and dies with it, so a killed run never blocks the next (its file stays, to be taken over); a run that
ends removes the file. The file holds the holder's pid, for the refusal message.

POSIX locks do not exclude each other within one process (two Trainers of one process on one --out both hold it),
and closing any descriptor of the file drops them, so the file is opened once, here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from kvpolicy.errors import KVPError
from kvpolicy.io import describe_os_error


class CheckpointLock:
    """The sidecar lock of checkpoint directory `out` (links followed: two names of one directory share it)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        real = Path(os.path.realpath(out))
        self.path = real.with_name(f".{real.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (a no-op when held), or raise a one-line KVPError when another process holds it."""
        while self._fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                raise KVPError(f"cannot lock {self.out}: {describe_os_error(err, self.path)}; remove it or choose "
                               "another --out") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError as err:
                holder = _pid(fd)
                os.close(fd)
                if isinstance(err, (BlockingIOError, PermissionError)):  # EAGAIN / EACCES: another process holds it
                    by = f" (pid {holder})" if holder else ""
                    raise KVPError(f"another kvp train is writing {self.out}{by}; wait for it or choose another "
                                   "--out") from None
                raise KVPError(f"cannot lock {self.out}: {describe_os_error(err, self.path)}; choose another "
                               "--out") from None
            if _same_file(fd, self.path):
                with contextlib.suppress(OSError):  # the pid only informs a refused run
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
            else:  # the holder removed the file as we opened it (its run ended): lock the current one
                os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held). Removing it first makes a run that
        opened the old file meanwhile retry on a new one, so no two runs ever hold a lock each."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
