"""Atomic file writing, fail-fast checks of what is read and written, bounded line reading and hashing: nothing
half-written is ever visible under its final name, and an input or output that is not what it must be is refused
before any work starts.

The rule for special paths, applied by every command:
- a path the user names (an --out, a results file, a trace or checkpoint directory) is followed when it is a
  symbolic link: kvpolicy reads and writes its target, and an atomic replace lands on the target, so the link
  survives;
- an entry inside a directory kvpolicy manages (trace shards, checkpoint files, report figures) is never a link:
  one is refused by every command that reads or writes that directory;
- a file kvpolicy reads or writes is a regular file (or, for an output, a new path): a device, FIFO or socket,
  also behind a link, is refused, naming what it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO
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


_SPECIAL = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))
MAX_LINE_BYTES = 1 << 20  # no line of a kvpolicy JSONL file comes near this


def special_kind(path: str | Path) -> str | None:
    """What `path` is when it exists and is not a regular file ("a directory", "a character device", "a FIFO
    (named pipe)", "a socket", "a block device"), links followed; None for a regular file or a missing path."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return next((name for test, name in _SPECIAL if test(mode)), None)


def check_regular_file(path: str | Path, what: str, fix: str) -> Path:
    """Refuse an input file that is missing or is not a regular file (links followed), in one line naming it:
    "WHAT PATH does not exist; FIX" or "WHAT PATH is a FIFO (named pipe), not a regular file; FIX"."""
    path = Path(path)
    if (kind := special_kind(path)) is not None:
        raise KVPError(f"{what} {path} is {kind}, not a regular file; {fix}")
    if not path.exists():
        raise KVPError(f"{what} {path} does not exist; {fix}")
    return path


def refuse_link(path: str | Path, what: str) -> None:
    """Refuse an entry of a directory kvpolicy manages (a shard, a checkpoint file, a figure) that is a symbolic
    link: kvpolicy never reads, writes or deletes through one there."""
    path = Path(path)
    if path.is_symlink():
        raise KVPError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); kvpolicy does not follow links "
                       "inside the directories it manages: put the file itself there, or remove the link")


def read_lines(f: BinaryIO, where: str, limit: int = MAX_LINE_BYTES) -> tuple[bytes, bytes]:
    """(the complete lines, the bytes after the last newline) from `f`'s position to its end, reading one line at
    a time; a line longer than `limit` bytes is refused (where: the file, for the message), so a file that is not
    JSONL never fills the memory."""
    lines: list[bytes] = []
    while line := f.readline(limit + 1):
        if len(line) > limit:
            raise KVPError(f"{where} has a line longer than {limit:,} bytes: not a kvpolicy JSONL file; "
                           "choose the right file")
        if not line.endswith(b"\n"):
            return b"".join(lines), line
        lines.append(line)
    return b"".join(lines), b""


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
    kind = special_kind(path)
    if directory and path.exists() and kind != "a directory":
        raise KVPError(f"cannot write {what}: {path} is {kind or 'a regular file'}, not a directory; choose another "
                       "location")
    if not directory and kind is not None:
        raise KVPError(f"cannot write {what}: {path} is {kind}, not a regular file; choose another location")
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

    Works for files and directories (the caller creates whichever it needs at the yielded path). When `path` is a
    symbolic link, its target is replaced and the link kept. A directory
    that already exists is swapped for the new one atomically where the system allows it (renameat2), else
    through a parked copy that `recover_directory` restores after a kill.
    """
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)  # the link survives
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


def write_durably(path: str | Path, data: bytes) -> None:
    """Write `data` to the file `path` and flush it to the disk (a full disk may say so only then)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically and durably."""
    with atomic_path(path) as tmp:
        write_durably(tmp, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_json_file(path: str | Path, what: str, fix: str) -> Any:
    """The JSON value in the file `path`, refused in one line when the file is missing or not a regular file
    (check_regular_file) or does not hold UTF-8 JSON: "PATH is not valid JSON (why): the WHAT is damaged; FIX"."""
    path = check_regular_file(path, what, fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        why = f"{err.msg} at line {err.lineno}"
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    raise KVPError(f"{path} is not valid JSON ({why}): the {what} is damaged; {fix}")


def read_text_file(path: str | Path, what: str, fix: str) -> str:
    """The UTF-8 text of the file `path`, refused in one line when the file is missing or not a regular file
    (check_regular_file) or is not UTF-8: "WHAT PATH is not UTF-8 text; FIX"."""
    path = check_regular_file(path, what, fix)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KVPError(f"{what} {path} is not UTF-8 text; {fix}") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serializable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
