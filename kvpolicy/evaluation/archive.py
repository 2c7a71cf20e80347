"""The archive form of a results file (`results.jsonl.gz`): what a repository commits, rebuilt by `kvp report` and
unpacked to a plain JSONL store by `kvp results unpack` when a sweep is to resume.

One gzip stream (deterministic: no name, mtime 0) of JSON lines. The first line is a header that holds each scorer's
identity once, by its `scorer_id`; every further line is one record of the plain file without what can be put back
exactly: its `scorer_identity` (when the header holds it) and its `key` (when it is the key its fields derive;
`"key": null` stands for a record that had none). Reading an archive gives back every record field for field, so
packing a file that `ResultStore` wrote and unpacking it again gives the same bytes. The identities of a study's
learned scorers are 11% of its plain file, and the keys, being hashes, a quarter of what gzip leaves.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kvpolicy.errors import KVPError
from kvpolicy.evaluation.result import KEY_DEFAULTS, KEY_FIELDS, record_key
from kvpolicy.io import atomic_path, read_lines

SUFFIX = ".gz"  # results.jsonl.gz
HEADER = {"kvpolicy": "results archive", "version": 1}
_DAMAGED = "restore it (git checkout), or pack it again from its plain results file with `kvp results pack`"


def is_archive(path: str | Path) -> bool:
    return Path(path).name.endswith(SUFFIX)


def _derived_key(record: dict[str, Any]) -> str | None:
    """The key a record's key fields derive (None when it lacks one of them: then its check will say so)."""
    if any(name not in record for name in KEY_FIELDS if name not in KEY_DEFAULTS):
        return None
    return record_key({name: record[name] for name in KEY_FIELDS if name in record})


def _shared_identities(records: list[dict[str, Any]]) -> dict[str, Any]:
    """scorer_id -> identity, for each scorer whose every record carries one and the same identity."""
    seen: dict[str, Any] = {}
    mixed: set[str] = set()
    for record in records:
        scorer_id, identity = record["scorer_id"], record.get("scorer_identity")
        if identity is None or record_line(seen.setdefault(scorer_id, identity)) != record_line(identity):
            mixed.add(scorer_id)
    return {scorer_id: identity for scorer_id, identity in sorted(seen.items()) if scorer_id not in mixed}


def _packed(record: dict[str, Any], identities: dict[str, Any]) -> dict[str, Any]:
    packed = dict(record)
    if record["scorer_id"] in identities:
        del packed["scorer_identity"]
    if "key" not in record:
        packed["key"] = None
    elif record["key"] == _derived_key(record):
        del packed["key"]
    return packed


def _unpacked(packed: dict[str, Any], identities: dict[str, Any]) -> dict[str, Any]:
    record = dict(packed)
    if "scorer_identity" not in record and record.get("scorer_id") in identities:
        record["scorer_identity"] = identities[record["scorer_id"]]
    if "key" not in record:
        if (key := _derived_key(record)) is not None:
            record["key"] = key
    elif record["key"] is None:
        del record["key"]
    return record


def record_line(record: dict[str, Any]) -> bytes:
    """A record as one line of a plain results file, as `ResultStore` writes it."""
    return (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode()


def write_archive(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write checked `records` (JSON objects of a results file, in order) as an archive at `path`, atomically; the
    same records give the same bytes."""
    records = list(records)
    identities = _shared_identities(records)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(record_line({**HEADER, "scorer_identities": identities}))
            for record in records:
                f.write(record_line(_packed(record, identities)))
    return Path(path)


def _header(line: bytes, path: Path) -> dict[str, Any]:
    try:
        header = json.loads(line) if line else None
    except json.JSONDecodeError:
        header = None
    if not (isinstance(header, dict) and all(header.get(k) == v for k, v in HEADER.items())
            and isinstance(header.get("scorer_identities"), dict)):
        raise KVPError(f"{path} is not a kvpolicy results archive (its first line is not the archive header); "
                       f"{_DAMAGED}")
    return header["scorer_identities"]


def read_archive(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(FILE:LINE, the record as the plain file held it) of each record of an archive, unchecked (the caller checks
    it). Lines are read one at a time and bounded like a plain file's; a damaged or truncated gzip stream is one
    KVPError naming the file."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            lines, tail = read_lines(f, str(path))
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise KVPError(f"{path} is not a complete gzip file ({err}); the results archive is damaged: {_DAMAGED}") \
            from None
    if tail:
        raise KVPError(f"{path} ends in an unfinished line; the results archive is damaged: {_DAMAGED}")
    header, _, body = lines.partition(b"\n")
    identities = _header(header, path)
    for number, raw in enumerate(body.split(b"\n")[:-1], start=2):
        where = f"{path}:{number}"
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise KVPError(f"{where} is not valid JSON ({err.msg}); the results archive is damaged: {_DAMAGED}") \
                from None
        yield where, _unpacked(packed, identities) if isinstance(packed, dict) else packed
