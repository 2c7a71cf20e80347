"""One `kvp train` at a time per checkpoint directory: two runs on one --out would each overwrite the other's
checkpoint, and one result would be lost without a word.

The run holds a POSIX record lock (kvpolicy.byte_locks, as the results store does) on byte 0 of a sidecar file
beside the directory, `.CKPT.lock`, from before it reads the checkpoint until it ends; a second run refuses at once.
The lock belongs to the process and dies with it, so a killed run never blocks the next (its file stays, to be
taken over); a run that ends removes the file. The file holds the holder's pid, for the refusal message. Two
Trainers of one process on one --out would both hold it (POSIX locks do not exclude within a process).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kvpolicy.byte_locks import ByteLocks
from kvpolicy.errors import KVPError
from kvpolicy.io import describe_os_error


class CheckpointLock:
    """The sidecar lock of checkpoint directory `out` (links followed: two names of one directory share it)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        real = Path(os.path.realpath(out))
        self.path = real.with_name(f".{real.name}.lock")
        self._held: ByteLocks | None = None

    def acquire(self) -> None:
        """Take the lock (a no-op when held), or raise a one-line KVPError when another process holds it."""
        while self._held is None:
            locks = ByteLocks(self.path)
            try:
                held = locks.acquire(0, wait=False)
            except OSError as err:
                locks.close()
                raise KVPError(f"cannot lock {self.out}: {describe_os_error(err, self.path)}; remove it or choose "
                               "another --out") from None
            if not held:
                holder = _pid(locks.fd)
                locks.close()
                by = f" (pid {holder})" if holder else ""
                raise KVPError(f"another kvp train is writing {self.out}{by}; wait for it or choose another --out")
            if locks.is_current():
                with contextlib.suppress(OSError):  # the pid only informs a refused run
                    os.ftruncate(locks.fd, 0)
                    os.pwrite(locks.fd, f"{os.getpid()}\n".encode(), 0)
                self._held = locks
            else:  # the holder removed the file as we opened it (its run ended): lock the current one
                locks.close()

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held). Removing it first makes a run that
        opened the old file meanwhile retry on a new one, so no two runs ever hold a lock each."""
        if self._held is None:
            return
        with contextlib.suppress(OSError):
            if self._held.is_current():
                os.unlink(self.path)
        self._held.close()
        self._held = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
