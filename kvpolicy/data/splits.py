"""Which split a unit of text belongs to: one rule for every corpus, so that no training prompt reads the text of an
evaluation prompt.

A unit is what a corpus is split by: an essay file, a source file, a ShareGPT conversation. It goes to a split by
a hash of its key: the first 8 bytes of SHA-256("NAMESPACE|KEY"), big-endian, modulo 100, against cumulative
percentages, one per split. A unit's split never depends on which other units there are or how many prompts are
asked for, and every prompt of a split is cut from units of that split only: train/val/test for traces, "eval" for
the evaluation harness.
"""

from __future__ import annotations

import hashlib

from kvpolicy.errors import KVPError

SPLITS = ("train", "val", "test", "eval")  # "eval" is reserved for the evaluation harness
DOCUMENT_BUCKETS = (70, 80, 90, 100)  # cumulative percent per split: essays and source files, a few dozen to hundreds
DIALOGUE_BUCKETS = (80, 85, 90, 100)  # ShareGPT's thousands of conversations fill val and test with 5% each


def split_of(namespace: str, key: str, buckets: tuple[int, ...] = DOCUMENT_BUCKETS) -> str:
    """The split of the unit `key` of `namespace` ("essay", "code", "dialogue"), for cumulative percentages
    `buckets` (one per split, in SPLITS order)."""
    bucket = int.from_bytes(hashlib.sha256(f"{namespace}|{key}".encode()).digest()[:8], "big") % 100
    return next(split for split, upper in zip(SPLITS, buckets) if bucket < upper)


def check_split(split: str) -> None:
    """KVPError unless `split` is one of SPLITS."""
    if split not in SPLITS:
        raise KVPError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
