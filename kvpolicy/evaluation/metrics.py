"""Official-style metrics of the zero-shot benchmarks (RULER's string matching lives with its generator in
kvpolicy.data.ruler): LongBench's ROUGE-L for GovReport and its retrieval score for passage retrieval."""

from __future__ import annotations

import itertools
import re

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore)."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a)·len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def lcs_length_reference(a: list[str], b: list[str]) -> int:
    """Brute force over the subsequences of the shorter sequence (tiny inputs only)."""
    short, long = (a, b) if len(a) <= len(b) else (b, a)

    def is_subsequence(sub: tuple[str, ...]) -> bool:
        it = iter(long)
        return all(tok in it for tok in sub)

    for size in range(len(short), 0, -1):
        if any(is_subsequence(sub) for sub in itertools.combinations(short, size)):
            return size
    return 0


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words (LongBench's GovReport metric)."""
    p, r = words(prediction), words(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def best_rouge_l(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    return max((rouge_l(prediction, ref) for ref in references), default=0.0)


def retrieval_score(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """LongBench passage retrieval: the share of numbers in the prediction equal to the true paragraph number."""
    match = re.search(r"Paragraph (\d+)", references[0])
    target = match.group(1) if match else references[0].strip()
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0
