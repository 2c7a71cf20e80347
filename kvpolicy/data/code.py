"""Python source code for plain-continuation traces: the standard library of the running interpreter.

Code is the main genre of the Qwen2.5-Coder checkpoint, and none of the other trace sources holds it. Its files are
read in sorted order of their path relative to the standard library (tests, `site-packages` and IDLE are left out),
each prefixed with its path as a comment, the way repository-level code corpora present files. Files go to a split by
path (kvpolicy.data.splits, 70/10/10/10 train/val/test/eval by a hash of the path): the plain-continuation prompts
and the `ruler:niah_code` haystack of a split read that split's files only. The `torch.nn` sources the
evaluation-only `needle:code` task hides its needle in are a different package: no trace reads them.
"""

from __future__ import annotations

import functools
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from kvpolicy.data.splits import split_of

SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "idlelib", "__pycache__"})
MAX_FILE_BYTES = 200_000  # a few generated tables (e.g. Unicode data) are larger; they are not code anyone reads
SOURCE = f"Python {platform.python_version()} standard library sources, plain continuation"


@dataclass(frozen=True)
class SourceFile:
    name: str  # path relative to the standard library, e.g. "json/decoder.py"
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def source_paths() -> tuple[str, ...]:
    """Relative paths of the standard library's Python files that form the corpus, sorted."""
    root = stdlib_root()
    return tuple(sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.py")
        if not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.stat().st_size <= MAX_FILE_BYTES
    ))


def source_split(name: str) -> str:
    """The split of the source file `name` (its path relative to the standard library), fixed by a hash of it."""
    return split_of("code", name)


def split_paths(split: str) -> tuple[str, ...]:
    """The corpus's files of `split`, in path order."""
    return tuple(name for name in source_paths() if source_split(name) == split)


@functools.cache
def code_lines(split: str) -> tuple[str, ...]:
    """Non-empty lines of the split's files, in path order (each file's path comment included): the code haystack
    of that split's RULER-style needles."""
    return tuple(line.rstrip() for name in split_paths(split)
                 for line in read_source(name).text.splitlines() if line.strip())


def read_source(name: str) -> SourceFile:
    """One file of the corpus, with its path as a leading comment."""
    text = (stdlib_root() / name).read_text(encoding="utf-8", errors="replace").strip()
    return SourceFile(name, f"# {name}\n{text}\n")
