"""The results store: one JSON line per evaluated (model, scorer, budget, task, protocol, seed, sample).

Append-only JSONL with a flush + fsync after every record, so a killed sweep loses at most the record it was
writing; a torn last line is cut off when the file is next opened for appending. Every record carries the
format version; a file holding records of another format is refused, never silently mixed. Re-running a
sweep skips every key already in the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from kvpolicy.errors import KVPError
from kvpolicy.io import sha256_json

FORMAT = 1

# the fields of a record that identify it; everything else is a measurement
KEY_FIELDS = ("model_fingerprint", "scorer_id", "budget", "task", "context_tokens", "protocol", "seed", "sample")


def record_key(fields: dict[str, Any]) -> str:
    """Stable key of a configuration: sha256 over the KEY_FIELDS (all required)."""
    missing = [f for f in KEY_FIELDS if f not in fields]
    if missing:
        raise KVPError(f"result record lacks key fields {missing}; a record needs all of {list(KEY_FIELDS)}")
    return sha256_json({f: fields[f] for f in KEY_FIELDS})[:24]


def _parse_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every complete line; a torn final line (no newline: killed mid-write) is skipped."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise KVPError(f"{path}:{number} is not valid JSON ({err.msg}); the results file is damaged") from None
        if not isinstance(record, dict):
            raise KVPError(f"{path}:{number} is not a result record (expected a JSON object)")
        yield number, record
    if tail.strip():
        try:  # a last record written completely but without its newline is still a record
            record = json.loads(tail)
        except json.JSONDecodeError:
            return
        if isinstance(record, dict):
            yield len(complete) + 1, record


def _check_format(path: Path, number: int, record: dict[str, Any]) -> None:
    found = record.get("format")
    if found != FORMAT:
        raise KVPError(
            f"{path}:{number} holds a results record of format {found!r}, this kvpolicy reads format {FORMAT}; "
            "re-run the sweep into a new results file (older results cannot be mixed in)"
        )


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """All records of a results file, format-checked. A missing file is an error; an empty one gives []."""
    path = Path(path)
    if not path.is_file():
        raise KVPError(f"results file {path} does not exist; create it with `kvp sweep --out {path} ...`")
    records = []
    for number, record in _parse_lines(path):
        _check_format(path, number, record)
        records.append(record)
    return records


class ResultStore:
    """An append-only JSONL results file keyed by configuration; `key in store` tells what is done."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for record in read_results(self.path):
                self._records[record.get("key") or record_key(record)] = record
            self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        """Drop bytes after the last newline (a record torn by a kill) so the next append starts a clean line."""
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(max(0, size - (1 << 20)))
            block = f.read()
            if block.endswith(b"\n"):
                return
            cut = block.rfind(b"\n")
            keep = size - len(block) + cut + 1 if cut >= 0 else 0
            tail = block[cut + 1 :]
            try:  # complete JSON without its newline: keep it and add the newline
                json.loads(tail)
                f.seek(size)
                f.write(b"\n")
            except json.JSONDecodeError:
                f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one record (its key and format added) and make it durable before returning it."""
        record = {"format": FORMAT, **record}
        record["key"] = record_key(record)
        line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._records[record["key"]] = record
        return record
