"""The results store: one JSON line per evaluated (model, scorer, budget, task, protocol, seed, sample).

Append-only JSONL with a flush + fsync after every record, so a killed sweep loses at most the record it was
writing. Every record carries the format version and is checked against RECORD on every read; a file holding
records of another format is refused, never silently mixed. Re-running a sweep skips every key already in the file.

Several sweeps may share one file. A sidecar lock file (`FILE.lock`) serialises them: byte 0 is held while a
process takes in what the others appended, cuts a torn tail (a record half-written by a killed process) and
appends, so a key is written once; one byte per work unit (at an offset hashed from its identity) is a sweep's
claim on that unit, so sweeps split the work instead of repeating it. The locks are POSIX record locks: they die
with their process, so a killed sweep never blocks another.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kvpolicy.errors import KVPError
from kvpolicy.io import sha256_json
from kvpolicy.schema import Optional, validate

FORMAT = 1

# the fields of a record that identify it (with their schema, see kvpolicy.schema); everything else is a measurement
KEY = {"model_fingerprint": str, "scorer_id": str, "budget": str, "task": str, "context_tokens": (int, None),
       "protocol": str, "seed": int, "sample": str}
KEY_FIELDS = tuple(KEY)

WHOLE_RANKING = "all"  # budget label of a trace's whole-ranking cost

# what every record holds: its key and every field the report reads (Optional: the report copes without it)
RECORD = {
    **KEY,
    "model": str, "scorer": str, "scorer_label": str, "family": str, "data": str, "metric": str, "kept": int,
    "value": float, "seconds": float,
    "scorer_kind": Optional(str), "corpus": Optional((str, None)), "prefill_seconds": Optional(float),
    "scorer_identity": Optional({"trained_on": Optional({"source": (str, None), "context_tokens": (int, None)})}),
}
# what a record of each metric holds beyond RECORD; a cost record holds `per_head` ((L, H) per-head cost) and, at a
# budget (not the whole ranking), the mean evicted utility `lost` and the oracle's `best`
METRIC_FIELDS = {
    "accuracy": {},
    "perplexity": {"nll_sum": float, "n_tokens": int},
    "cost": {"lost": float, "best": float, "per_head": [[float]]},
}
WHOLE_RANKING_FIELDS = {"per_head": [[float]]}

DAMAGED = "a results file holds only records written by `kvp sweep`; re-run the sweep into a new results file"


def record_key(fields: dict[str, Any]) -> str:
    """Stable key of a configuration: sha256 over the KEY_FIELDS (all required)."""
    missing = [f for f in KEY_FIELDS if f not in fields]
    if missing:
        raise KVPError(f"result record lacks key fields {missing}; a record needs all of {list(KEY_FIELDS)}")
    return sha256_json({f: fields[f] for f in KEY_FIELDS})[:24]


def check_record(record: dict[str, Any], where: str) -> None:
    """Refuse a record of another format, or one missing or mistyping a field: one KVPError naming `where`
    (FILE:LINE) and the field."""
    found = record.get("format")
    if found != FORMAT:
        raise KVPError(
            f"{where} holds a results record of format {found!r}, this kvpolicy reads format {FORMAT}; "
            "re-run the sweep into a new results file (older results cannot be mixed in)"
        )
    validate(record, RECORD, where, DAMAGED)
    metric = record["metric"]
    if metric not in METRIC_FIELDS:
        raise KVPError(f"{where}: field 'metric' must be one of {', '.join(METRIC_FIELDS)}, got {metric!r}; {DAMAGED}")
    whole = metric == "cost" and record["budget"] == WHOLE_RANKING
    validate(record, WHOLE_RANKING_FIELDS if whole else METRIC_FIELDS[metric], where, DAMAGED)


def _split_tail(data: bytes) -> tuple[bytes, bytes]:
    """(the complete lines, the bytes after the last newline)."""
    end = data.rfind(b"\n") + 1
    return data[:end], data[end:]


def _tail_record(tail: bytes) -> dict[str, Any] | None:
    """The bytes after the last newline as a record when they are one written completely but without its newline
    (None for a record torn by a kill)."""
    try:
        record = json.loads(tail)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _parse(lines: bytes, path: Path, first: int) -> Iterator[dict[str, Any]]:
    """The checked records of complete `lines` of `path`, the first of which is line number `first`."""
    for number, raw in enumerate(lines.split(b"\n")[:-1], start=first):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise KVPError(f"{path}:{number} is not valid JSON ({err.msg}); the results file is damaged") from None
        if not isinstance(record, dict):
            raise KVPError(f"{path}:{number} is not a result record (expected a JSON object)")
        check_record(record, f"{path}:{number}")
        yield record


@dataclass
class Results:
    """The records of a results file, each key once (the first of repeated records), and how many repeated
    records were dropped (two sweeps that once wrote into one file without sharing the work leave them)."""

    path: Path
    records: list[dict[str, Any]]
    duplicates: int

    @property
    def note(self) -> str | None:
        """What the reader dropped, for the user; None when nothing was."""
        if not self.duplicates:
            return None
        return f"dropped {self.duplicates} repeated record{'s' * (self.duplicates > 1)} (same key) from {self.path}"


def read_results(path: str | Path) -> Results:
    """The checked records of a results file, without repeated keys. A missing file is an error; an empty one
    has no records. A torn final line (a sweep killed mid-write, or one writing right now) is left out."""
    path = Path(path)
    if not path.is_file():
        raise KVPError(f"results file {path} does not exist; create it with `kvp sweep --out {path} ...`")
    lines, tail = _split_tail(path.read_bytes())
    parsed = list(_parse(lines, path, 1))
    if (record := _tail_record(tail)) is not None:
        last = lines.count(b"\n") + 1
        check_record(record, f"{path}:{last}")
        parsed.append(record)
    unique: dict[str, dict[str, Any]] = {}
    for record in parsed:
        unique.setdefault(record_key(record), record)
    return Results(path, list(unique.values()), len(parsed) - len(unique))


class _LockFile:
    """The sidecar lock file of a results file: POSIX record locks on single bytes of it.

    POSIX locks belong to the process, and closing any descriptor of the file drops all of them, so the file is
    opened once and kept open until `close()`."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        return self._fd

    @contextlib.contextmanager
    def hold(self, offset: int, wait: bool = True) -> Iterator[bool]:
        """Hold byte `offset` exclusively for the block. wait=False: yield False at once when another process
        holds it (and hold nothing); else block until it is free and yield True."""
        fd = self._descriptor()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held by another process
            held = False
        else:
            held = True
        try:
            yield held
        finally:
            if held:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
        self._lock = _LockFile(self.path.with_name(self.path.name + ".lock"))
        self._records: dict[str, dict[str, Any]] = {}
        self._offset = 0  # bytes of the file taken in so far
        self._lines = 0  # lines of the file taken in so far
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
            lines, tail = _split_tail(f.read())
            if tail:
                if _tail_record(tail) is not None:
                    f.write(b"\n")
                    lines += tail + b"\n"
                else:
                    f.truncate(self._offset + len(lines))
                f.flush()
                os.fsync(f.fileno())
        for record in _parse(lines, self.path, self._lines + 1):
            self._records.setdefault(record_key(record), record)
        self._offset += len(lines)
        self._lines += lines.count(b"\n")

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def append(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Write one record (its key and format added) and make it durable before returning it; None (and
        nothing written) when its key is in the file already, e.g. written by a concurrent sweep."""
        record = {"format": FORMAT, **record}
        record["key"] = record_key(record)
        check_record(record, f"{self.path} (the record being appended)")
        line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode()
        with self._lock.hold(_APPEND_BYTE):
            self._read_new()
            if record["key"] in self._records:
                return None
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._offset += len(line)
            self._lines += 1
        self._records[record["key"]] = record
        return record

    def claim(self, unit: Any, wait: bool = False) -> contextlib.AbstractContextManager[bool]:
        """Claim work unit `unit` (any JSON value naming it) for the block, so that concurrent sweeps compute it
        once: yields False at once while another process holds the claim, unless `wait`, which blocks until that
        process finishes the unit (or dies) and yields True."""
        return self._lock.hold(_claim_offset(unit), wait)

    def close(self) -> None:
        """Close the lock file (dropping this process's claims)."""
        self._lock.close()
