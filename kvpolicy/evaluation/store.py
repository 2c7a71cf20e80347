"""The results store: one JSON line per `Result` (kvpolicy.evaluation.result), keyed by its configuration.

Append-only JSONL with a flush + fsync after every record, so a killed sweep loses at most the record it was
writing. Every record is checked on every read (its schema version and each field); a file holding records of
another schema is refused, never silently mixed. Re-running a sweep skips every key already in the file.

Several sweeps may share one file. A sidecar lock file (`FILE.lock`) serialises them: byte 0 is held while a
process takes in what the others appended, cuts a torn tail (a record half-written by a killed process) and
appends, so a key is written once; one byte per work unit (at an offset hashed from its identity) is a sweep's
claim on that unit, so sweeps split the work instead of repeating it. The locks are POSIX record locks: they die
with their process, so a killed sweep never blocks another.

A results file may also be packed into its archive form, `FILE.jsonl.gz` (kvpolicy.evaluation.archive), which is what
a repository commits: `read_results` reads either, with the same checks; a sweep appends only to a plain file, so
`unpack_results` turns an archive back into one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpolicy.byte_locks import ByteLocks
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.archive import is_archive, read_archive, record_line, write_archive
from kvpolicy.evaluation.result import Result, check_record
from kvpolicy.io import atomic_path, check_regular_file, check_writable, read_lines, sha256_json, special_kind, \
    write_durably


def _tail_record(tail: bytes) -> dict[str, Any] | None:
    """The bytes after the last newline as a JSON object when they are a record written completely but without
    its newline (None for a record torn by a kill)."""
    try:
        record = json.loads(tail)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _objects(lines: bytes, path: Path, first: int) -> Iterator[tuple[str, Any]]:
    """(FILE:LINE, JSON value) of the complete `lines` of `path`, the first of which is line number `first`."""
    for number, raw in enumerate(lines.split(b"\n")[:-1], start=first):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise KVPError(f"{path}:{number} is not valid JSON ({err.msg}); the results file is damaged") from None
        yield f"{path}:{number}", record


def _parse(lines: bytes, path: Path, first: int) -> Iterator[Result]:
    """The checked results of complete `lines` of `path`, the first of which is line number `first`."""
    for where, record in _objects(lines, path, first):
        yield Result.from_json(record, where)


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(FILE:LINE, record as written) of a plain results file or an archive, unchecked. A torn final line of a plain
    file (a sweep killed mid-write, or one writing right now) is left out."""
    if is_archive(path):
        yield from read_archive(path)
        return
    with open(path, "rb") as f:
        lines, tail = read_lines(f, str(path))
    yield from _objects(lines, path, 1)
    if (record := _tail_record(tail)) is not None:
        last = lines.count(b"\n") + 1
        yield f"{path}:{last}", record


@dataclass
class Results:
    """The results of a results file, each key once (the first of repeated records), and how many repeated
    records were dropped (two sweeps that once wrote into one file without sharing the work leave them)."""

    path: Path
    records: list[Result]
    duplicates: int

    @property
    def note(self) -> str | None:
        """What the reader dropped, for the user; None when nothing was."""
        if not self.duplicates:
            return None
        return f"dropped {self.duplicates} repeated record{'s' * (self.duplicates > 1)} (same key) from {self.path}"


def read_results(path: str | Path) -> Results:
    """The checked results of a results file, plain or packed (`.jsonl.gz`), without repeated keys. A missing file
    is an error; an empty one has none. A torn final line (a sweep killed mid-write, or one writing right now) is
    left out."""
    fix = ("pack one with `kvp results pack RESULTS.jsonl`" if is_archive(path)
           else f"create it with `kvp sweep --out {path} ...`")
    path = check_regular_file(path, "results file", fix)
    parsed = [Result.from_json(record, where) for where, record in _records(path)]
    unique: dict[str, Result] = {}
    for result in parsed:
        unique.setdefault(result.key, result)
    return Results(path, list(unique.values()), len(parsed) - len(unique))


def _checked_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for where, record in _records(path):
        check_record(record, where)
        records.append(record)
    return records


def pack_results(path: str | Path, out: str | Path | None = None) -> Path:
    """Pack a plain results file into its archive (default: PATH.gz), every record checked and kept, repeated ones
    too; the same file gives the same bytes. Returns the archive's path."""
    path = check_regular_file(path, "results file", "name the JSONL file a sweep wrote")
    if is_archive(path):
        raise KVPError(f"results file {path} is packed already; `kvp results unpack` gives its plain form")
    out = Path(out) if out is not None else path.with_name(path.name + ".gz")
    if not is_archive(out):
        raise KVPError(f"a results archive's name ends in .gz, which tells readers its form; got --out {out}")
    check_writable(out, "results archive")
    return write_archive(_checked_records(path), out)


def unpack_results(path: str | Path, out: str | Path) -> Path:
    """Unpack a results archive into a new plain results file `out`, which a sweep can append to: the records of
    the file that was packed, each checked, in its order and bytes. An existing `out` is refused (it may be a
    sweep's store). Returns `out`."""
    path = check_regular_file(path, "results archive", "name a .jsonl.gz file that `kvp results pack` wrote")
    out = Path(out)
    if not is_archive(path):
        raise KVPError(f"results file {path} is not an archive (its name does not end in .gz); a sweep reads it as "
                       "it is")
    if is_archive(out):
        raise KVPError(f"--out {out} ends in .gz, but a plain results file is JSONL; name it FILE.jsonl")
    if out.exists() or out.is_symlink():
        raise KVPError(f"{out} exists; unpacking never overwrites a results file (a sweep's records may be in it): "
                       "remove it or choose another --out")
    check_writable(out, "results file")
    records = _checked_records(path)
    with atomic_path(out) as tmp:
        write_durably(tmp, b"".join(record_line(record) for record in records))
    return out


_APPEND_BYTE = 0  # claims live above it


def _claim_offset(unit: Any) -> int:
    """Byte of the lock file that claims work unit `unit` (48 bits of its hash: collisions only serialise)."""
    return 1 + int(sha256_json(unit)[:12], 16)


class ResultStore:
    """An append-only JSONL results file keyed by configuration, shared safely by concurrent sweeps;
    `key in store` tells what is done (as of the last `refresh()` or `append()`).

    The store keeps its lock file open (its locks would go with the descriptor); `close()` releases it, and a
    later call opens it again. Use one store per results file and process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = ByteLocks(self.path.with_name(self.path.name + ".lock"))
        self._records: dict[str, Result] = {}
        self._offset = 0  # bytes of the file taken in so far
        self._lines = 0  # lines of the file taken in so far
        if (kind := special_kind(self.path)) is not None:
            raise KVPError(f"results file {self.path} is {kind}, not a regular file; choose another file")
        if is_archive(self.path):
            raise KVPError(f"results file {self.path} is a packed archive (.gz), which a sweep cannot append to; "
                           f"unpack it first (`kvp results unpack {self.path} --out FILE.jsonl`) and sweep into that")
        if self.path.exists():
            self.refresh()

    def refresh(self) -> None:
        """Take in the records other processes appended since the last read."""
        with self._lock.hold(_APPEND_BYTE):
            self._read_new()

    def _read_new(self) -> None:
        """(Append lock held.) Take in the lines appended since the last read. An unfinished last line is a record
        torn by a killed process (no live writer can hold the lock): it is cut off so the next append starts a
        clean line, or, when it is a complete record that lacks only its newline, given one."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            f.seek(self._offset)
            lines, tail = read_lines(f, str(self.path))
            if tail:
                if _tail_record(tail) is not None:
                    f.write(b"\n")
                    lines += tail + b"\n"
                else:
                    f.truncate(self._offset + len(lines))
                f.flush()
                os.fsync(f.fileno())
        for result in _parse(lines, self.path, self._lines + 1):
            self._records.setdefault(result.key, result)
        self._offset += len(lines)
        self._lines += lines.count(b"\n")

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[Result]:
        return list(self._records.values())

    def append(self, result: Result) -> Result | None:
        """Write one result (checked like a read one) and make it durable before returning it; None (and nothing
        written) when its key is in the file already, e.g. written by a concurrent sweep."""
        record = result.to_json()
        check_record(record, f"{self.path} (the record being appended)",
                     "the sweep measured what no result can hold: a numerical failure of the model (float16 "
                     "overflows; run it in --dtype bfloat16 or float32) or a bug to report; nothing was written")
        line = record_line(record)
        with self._lock.hold(_APPEND_BYTE):
            self._read_new()
            if result.key in self._records:
                return None
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._offset += len(line)
            self._lines += 1
        self._records[result.key] = result
        return result

    def claim(self, unit: Any, wait: bool = False) -> contextlib.AbstractContextManager[bool]:
        """Claim work unit `unit` (any JSON value naming it) for the block, so that concurrent sweeps compute it
        once: yields False at once while another process holds the claim, unless `wait`, which blocks until that
        process finishes the unit (or dies) and yields True."""
        return self._lock.hold(_claim_offset(unit), wait)

    def close(self) -> None:
        """Close the lock file (dropping this process's claims)."""
        self._lock.close()
