"""Loaders for the paper's Hugging Face hub datasets (online users), normalized to our record types.

Each loader reads through `datasets.load_dataset`: from the hub by default, or from a local JSON/JSONL/Parquet
file in the same schema (`local=PATH`), which is how the tests exercise the exact same code offline. Every failure
to load (no network, a dataset or file not found, a script-based dataset, the hub refusing, rows in another schema)
is one KVPError line that says what to do.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvpolicy.data.records import Conversation, QASample, Turn
from kvpolicy.errors import KVPError
from kvpolicy.io import check_regular_file


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the hub and how its rows become our records. `files`: a data_files pattern read
    with the parquet builder instead of the dataset's own loader (the hub's parquet export of a script-based
    dataset)."""

    hub_id: str
    config: str | None
    split: str
    normalize: Callable[[Iterable[dict]], Iterator[QASample | Conversation]]
    description: str
    files: str | None = None

    @property
    def location(self) -> str:
        """Where the rows are read from, for messages."""
        return self.files or self.hub_id + (f", config {self.config}" if self.config else "")


def _ruler(rows: Iterable[dict]) -> Iterator[QASample]:
    for i, row in enumerate(rows):
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        yield QASample(id=f"ruler-{row.get('task', 'task')}-{i}", task=row["task"], context=row["context"],
                       question=row["question"], answers=tuple(map(str, answers)),
                       answer_prefix=row.get("answer_prefix", ""), source="RULER (simonjegou/ruler)")


def _boolq(rows: Iterable[dict]) -> Iterator[QASample]:
    """Choices in lm-eval's order, "no" then "yes"; the question without a final "?" (the prompt adds one)."""
    for i, row in enumerate(rows):
        yield QASample(id=f"boolq-{i}", task="boolq", context=row["passage"], question=row["question"].rstrip("?"),
                       answers=("yes" if row["answer"] else "no",), choices=("no", "yes"),
                       source="BoolQ (google/boolq)")


def _arc(rows: Iterable[dict]) -> Iterator[QASample]:
    """The choices are the answer texts (lm-eval scores the text, not the letter); the answer is the keyed text."""
    for row in rows:
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        yield QASample(id=f"arc-{row['id']}", task="arc_challenge", context="", question=row["question"],
                       answers=(texts[labels.index(row["answerKey"])],), choices=tuple(texts),
                       source="ARC-Challenge (allenai/ai2_arc)")


def _longbench(task: str) -> Callable[[Iterable[dict]], Iterator[QASample]]:
    def normalize(rows: Iterable[dict]) -> Iterator[QASample]:
        for row in rows:
            yield QASample(id=f"{task}-{row['_id']}", task=task, context=row["context"],
                           question=row.get("input") or "", answers=tuple(row["answers"]),
                           source=f"LongBench {task} (THUDM/LongBench)")

    return normalize


# THUDM/LongBench is script-based (LongBench.py), which datasets >= 4 refuses ("Dataset scripts are no longer
# supported, but found LongBench.py"). The hub's parquet-converter bot exports every config of it to the branch
# refs/convert/parquet as {config}/test/0000.parquet, in the script's features (input, context, answers, length,
# dataset, language, all_classes, _id): the hub's file listings huggingface.co/datasets/THUDM/LongBench/tree/<rev>/
# gov_report/test and .../passage_retrieval_en/test show "0000.parquet", committed by parquet-converter ("Update
# parquet files", Aug 2023). An earlier export (Jul 2023) named the file {config}/long_bench-test.parquet; the glob
# reads only the current layout. Community parquet mirrors in the same schema exist (GinkgoQ/LongBench,
# data/{config}/test-00000-of-00001.parquet; lm-eval reads Xnhyacinth/LongBench), but the export is the original.
def _longbench_export(config: str) -> str:
    return f"hf://datasets/THUDM/LongBench@refs/convert/parquet/{config}/test/*.parquet"


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
                            "LongBench GovReport summarization (ROUGE-L)", files=_longbench_export("gov_report")),
    "passage_retrieval_en": HubSource("THUDM/LongBench", "passage_retrieval_en", "test",
                                      _longbench("passage_retrieval_en"), "LongBench passage retrieval",
                                      files=_longbench_export("passage_retrieval_en")),
}

LOCAL_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _read_table(datasets, source: HubSource, local: Path | None):
    """The rows, through the one `datasets.load_dataset` call that fits: a local file, a parquet export, or the
    hub dataset's own loader."""
    if local is not None:
        return datasets.load_dataset(LOCAL_KINDS[local.suffix], data_files=str(local), split="train")
    if source.files is not None:
        return datasets.load_dataset("parquet", data_files={source.split: source.files}, split=source.split)
    return datasets.load_dataset(source.hub_id, source.config, split=source.split)


def _one_line(err: BaseException) -> str:
    """The error's type and message on one line (messages of the hub's libraries span lines)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}{'...' * (len(text) > 300)}"


def _advice(err: Exception, name: str) -> str:
    """What to do about a failed load from the hub, by kind of failure."""
    import httpx

    or_local = f"or pass a local copy in its schema (kvp sweep --hub-local {name}=FILE.parquet|.jsonl)"
    if isinstance(err, RuntimeError) and "Dataset scripts are no longer supported" in str(err):
        return (f"the installed datasets runs no loading scripts: read the dataset's parquet export "
                f"(revision refs/convert/parquet) instead, {or_local}")
    if isinstance(err, (ConnectionError, httpx.TransportError)):
        return f"connect to the internet (and unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), {or_local}"
    return (f"check that the dataset still exists under that name and that you may read it (`hf auth login` for a "
            f"gated one), {or_local}")


def load_hub(name: str, limit: int | None = None, local: str | Path | None = None) -> list[QASample | Conversation]:
    """Records of a hub dataset (first `limit`), from the hub or from a local file in the hub's schema."""
    if name not in HUB_SOURCES:
        raise KVPError(f"unknown hub dataset '{name}'; known: {', '.join(HUB_SOURCES)}")
    source = HUB_SOURCES[name]
    path = None if local is None else Path(local)
    if path is not None:
        what, fix = f"local file for '{name}'", "give an existing .json/.jsonl/.parquet file"
        if path.suffix not in LOCAL_KINDS:
            raise KVPError(f"{what} {path} is not a .json/.jsonl/.parquet file; {fix}")
        check_regular_file(path, what, fix)
    import datasets

    datasets.disable_progress_bars()
    try:
        table = _read_table(datasets, source, path)
    except Exception as err:  # only the loading call is inside: every failure here is one of loading
        if path is not None:
            raise KVPError(f"cannot read local file {path} for '{name}': {_one_line(err)}; it must be a "
                           f"{'/'.join(LOCAL_KINDS)} file in the schema of {source.hub_id}") from err
        raise KVPError(f"cannot load '{name}' from the Hugging Face hub ({source.location}): {_one_line(err)}; "
                       f"{_advice(err, name)}") from err
    records = []
    try:
        for record in source.normalize(table):
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    except KeyError as err:
        raise KVPError(f"rows of '{name}' ({path or source.location}) lack the field {err} of the schema of "
                       f"{source.hub_id}; pass a file in that schema") from err
    return records
