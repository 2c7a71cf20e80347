"""Atomic file writing, fail-fast output checks and hashing: nothing half-written is ever visible under its
final name, and an output that cannot be written is refused before any work starts."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from kvpolicy.errors import KVPError

# what an OSError means to a user, by errno
_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "the name is too long",
}


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """'PATH: reason' for an OSError, naming the file it concerns (its own filename when it has one)."""
    where = err.filename if err.filename is not None else path
    reason = _REASONS.get(err.errno, err.strerror or str(err))
    return f"{where}: {reason}" if where is not None else reason


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_directory(directory: Path) -> None:
    """Create and delete a file in `directory` (the only test that root's bypassed permission bits, read-only
    mounts and full disks all answer truthfully)."""
    if not directory.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
    try:
        fd, probe = tempfile.mkstemp(prefix=".kvp-probe-", dir=directory)
    except OSError as err:  # name the directory, not the probe's random name
        raise OSError(err.errno, err.strerror, str(directory)) from None
    try:
        os.write(fd, b"\0")
    finally:
        os.close(fd)
        os.unlink(probe)


def check_writable(path: str | Path, what: str, directory: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: raise a one-line KVPError naming the path.

    `path` is a file (appended to, or replaced through a temporary beside it) or, with `directory=True`, a
    directory written into (and replaced through a temporary beside it). Missing parents are fine when they
    can be created; the check leaves nothing behind.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        kind = "is not a directory" if directory else "is a directory"
        raise KVPError(f"cannot write {what}: {path} {kind}; choose another location")
    try:
        _probe_directory(_nearest_existing(path.parent))  # temporaries and new entries go beside `path`
        if directory and path.is_dir():
            _probe_directory(path)
        elif path.is_file():
            with open(path, "ab"):
                pass
    except OSError as err:
        raise KVPError(f"cannot write {what}: {describe_os_error(err, path)}; choose another location or fix "
                       "its permissions") from None


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported here."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _previous(path: Path) -> Path:
    """Where the fallback directory swap parks the previous version of `path` for a moment."""
    return path.with_name(f".{path.name}.previous")


def recover_directory(path: str | Path) -> None:
    """Finish a directory swap that a kill interrupted (fallback swap only): when `path` is missing but its
    parked previous version exists, that version is the last complete one and goes back in place; when both
    exist, the parked one is stale and is removed."""
    path = Path(path)
    previous = _previous(path)
    if not previous.exists():
        return
    if path.exists():
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(previous, path)


def _replace_directory(new: Path, path: Path) -> None:
    """Put directory `new` at `path`, which holds a complete older version: there is no moment at which a
    reader (or a process killed half-way) finds no complete version under `path` or in recover_directory's reach."""
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the older version
        return
    previous = _previous(path)
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(path, previous)
    os.replace(new, path)
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    Works for files and directories (the caller creates whichever it needs at the yielded path). A directory
    that already exists is swapped for the new one atomically where the system allows it (renameat2), else
    through a parked copy that `recover_directory` restores after a kill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and target.is_dir():
            _replace_directory(target, path)
        else:
            os.replace(target, path)
        _fsync_directory(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically and durably."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serializable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
