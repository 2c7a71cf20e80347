"""Loaders for the paper's Hugging Face hub datasets (online users), normalized to our record types.

Each loader reads through `datasets.load_dataset`: from the hub by default, or from a local JSON/JSONL/Parquet
file in the same schema (`local=PATH`), which is how the tests exercise the exact same code offline. Every failure
to load (no network, a dataset or file not found, a script-based dataset, the hub refusing, rows in another schema)
is one KVPError line that says what to do.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator

from kvpolicy.data.records import Conversation, QASample, Turn
from kvpolicy.errors import KVPError


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the hub and how its rows become our records."""

    hub_id: str
    config: str | None
    split: str
    normalize: Callable[[Iterable[dict]], Iterator[QASample | Conversation]]
    description: str


def _ruler(rows: Iterable[dict]) -> Iterator[QASample]:
    for i, row in enumerate(rows):
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        yield QASample(id=f"ruler-{row.get('task', 'task')}-{i}", task=row["task"], context=row["context"],
                       question=row["question"], answers=tuple(map(str, answers)),
                       answer_prefix=row.get("answer_prefix", ""), source="RULER (simonjegou/ruler)")


def _boolq(rows: Iterable[dict]) -> Iterator[QASample]:
    for i, row in enumerate(rows):
        yield QASample(id=f"boolq-{i}", task="boolq", context=row["passage"],
                       question=row["question"].rstrip("?") + "?",
                       answers=("yes" if row["answer"] else "no",), answer_prefix="Answer:", choices=("yes", "no"),
                       source="BoolQ (google/boolq)")


def _arc(rows: Iterable[dict]) -> Iterator[QASample]:
    for row in rows:
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        options = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))
        yield QASample(id=f"arc-{row['id']}", task="arc_challenge", context="",
                       question=f"{row['question']}\n{options}",
                       answers=(row["answerKey"],), answer_prefix="Answer:", choices=tuple(labels),
                       source="ARC-Challenge (allenai/ai2_arc)")


def _longbench(task: str) -> Callable[[Iterable[dict]], Iterator[QASample]]:
    def normalize(rows: Iterable[dict]) -> Iterator[QASample]:
        for row in rows:
            yield QASample(id=f"{task}-{row['_id']}", task=task, context=row["context"],
                           question=row.get("input") or "", answers=tuple(row["answers"]),
                           source=f"LongBench {task} (THUDM/LongBench)")

    return normalize


def _oasst2(rows: Iterable[dict]) -> Iterator[Conversation]:
    """OASST2 messages form trees; each tree becomes its best-ranked root-to-leaf thread (English only)."""
    children: dict[str | None, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("lang", "en") == "en" and not row.get("deleted", False):
            children[row.get("parent_id")].append(row)
    for root in children[None]:
        turns, node = [], root
        while node is not None:
            turns.append(Turn("user" if node["role"] == "prompter" else "assistant", node["text"].strip()))
            replies = children.get(node["message_id"], [])
            ranked = [r for r in replies if r.get("rank") is not None] or replies
            node = min(ranked, key=lambda r: r.get("rank") or 0) if ranked else None
        if len(turns) >= 2:
            yield Conversation(id=f"oasst2-{root['message_tree_id']}", turns=tuple(turns), source="OASST2")


HUB_SOURCES: dict[str, HubSource] = {
    "ruler-4k": HubSource("simonjegou/ruler", "4096", "test", _ruler, "RULER at 4K tokens (13 tasks)"),
    "oasst2": HubSource("OpenAssistant/oasst2", None, "validation", _oasst2, "OpenAssistant Conversations 2"),
    "boolq": HubSource("google/boolq", None, "validation", _boolq, "BoolQ yes/no reading comprehension"),
    "arc_challenge": HubSource("allenai/ai2_arc", "ARC-Challenge", "test", _arc, "ARC-Challenge multiple choice"),
    "gov_report": HubSource("THUDM/LongBench", "gov_report", "test", _longbench("gov_report"),
                            "LongBench GovReport summarization (ROUGE-L)"),
    "passage_retrieval_en": HubSource("THUDM/LongBench", "passage_retrieval_en", "test",
                                      _longbench("passage_retrieval_en"), "LongBench passage retrieval"),
}


def load_hub(name: str, limit: int | None = None, local: str | Path | None = None) -> list[QASample | Conversation]:
    """Records of a hub dataset (first `limit`), from the hub or from a local file in the hub's schema."""
    if name not in HUB_SOURCES:
        raise KVPError(f"unknown hub dataset '{name}'; known: {', '.join(HUB_SOURCES)}")
    import datasets

    datasets.disable_progress_bars()
    source = HUB_SOURCES[name]
    try:
        if local is not None:
            path = Path(local)
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None or not path.is_file():
                raise KVPError(f"local file for '{name}' must be an existing .json/.jsonl/.parquet file: {path}")
            table = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            table = datasets.load_dataset(source.hub_id, source.config, split=source.split)
    except (ConnectionError, OSError) as err:
        raise KVPError(f"cannot load '{name}' from the hub ({source.hub_id}): {err}; you need network access, or "
                       f"pass a local file in its schema") from err
    records = []
    for record in source.normalize(table):
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records
