"""Integrity of kvpolicy's converted model cache: are its files still the bytes written at conversion?

Right after conversion the cache marker records every file's size, full sha256 and the sha256 of sampled
blocks (`record_files`). Every load re-checks sizes and sampled blocks (`check_files`): SAMPLED_BLOCKS blocks
at fixed offsets spread evenly over each file (a small file is read whole), a few milliseconds for 270 MB. It
finds a truncation, a change to any small file, and any damage to a weight file wider than the spacing of its
samples (size / (SAMPLED_BLOCKS - 1): 2.1 MB for SmolLM2); `kvp models --verify` compares the full sha256.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from kvpolicy.io import sha256_file

SAMPLED_BLOCKS = 128
BLOCK_BYTES = 4096


def sampled_sha256(path: Path) -> str:
    """sha256 of a file's size and of SAMPLED_BLOCKS blocks of BLOCK_BYTES at evenly spread offsets (the first
    and the last block included); of the whole file when it is no longer than those blocks together."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    fd = os.open(path, os.O_RDONLY)
    try:
        if size <= SAMPLED_BLOCKS * BLOCK_BYTES:
            h.update(os.pread(fd, size, 0))
        else:
            last = size - BLOCK_BYTES
            for i in range(SAMPLED_BLOCKS):
                h.update(os.pread(fd, BLOCK_BYTES, i * last // (SAMPLED_BLOCKS - 1)))
    finally:
        os.close(fd)
    return h.hexdigest()


def record_files(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{file name: {"size", "sha256", "sampled_sha256"}} for every file of `directory` except those in `skip`."""
    return {
        path.name: {"size": path.stat().st_size, "sha256": sha256_file(path), "sampled_sha256": sampled_sha256(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name not in skip
    }


def check_files(directory: Path, files: dict[str, dict[str, Any]], full: bool = False) -> list[str]:
    """What differs between `directory` and the record `files` (empty when nothing does): a missing file, another
    size, other sampled blocks, or with full=True another sha256."""
    problems = []
    for name, want in files.items():
        path = directory / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif path.is_symlink() or not path.is_file():
            problems.append(f"{name} is not a regular file")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{name} has {size:,} bytes instead of {want['size']:,}")
        elif full and sha256_file(path) != want["sha256"]:
            problems.append(f"{name} has another sha256 than at conversion")
        elif not full and sampled_sha256(path) != want["sampled_sha256"]:
            problems.append(f"{name} has other bytes than at conversion")
    return problems
