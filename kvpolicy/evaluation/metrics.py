"""Official-style metrics of the zero-shot benchmarks (RULER's string matching lives with its generator in
kvpolicy.data.ruler): lm-eval-harness's multiple-choice acc and acc_norm, LongBench's ROUGE-L for GovReport and
its retrieval score for passage retrieval, and lm-eval's standard error of a mean over samples."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

import numpy as np

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
    """ROUGE-L F1 over lower-cased words: the measure of LongBench's GovReport metric, which LongBench (and lm-eval)
    call rouge_score and compute with the `rouge` package (case kept, whitespace tokens, LCS unioned over sentences),
    so values are close to LongBench's, not identical."""
    p, r = words(prediction), words(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def best_rouge_l(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    return max((rouge_l(prediction, ref) for ref in references), default=0.0)


def retrieval_score(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """LongBench passage retrieval: the share of numbers in the prediction equal to the true paragraph number, the
    best over the references (as LongBench's get_retrieval_score)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    best = 0.0
    for reference in references:
        match = re.search(r"Paragraph (\d+)", reference)
        target = match.group(1) if match else reference.strip()
        best = max(best, sum(n == target for n in numbers) / len(numbers))
    return best


def choice_metrics(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """lm-eval-harness's multiple-choice metrics of one question, from each choice's summed log-likelihood as the
    continuation of the prompt: `acc`, whether the likeliest choice is the gold one, and `acc_norm`, the same with
    each log-likelihood divided by the length of its choice text (lm-eval divides by len(choice), the characters of
    the choice without the space put before it; its documentation calls this byte-length normalization, the same
    for ASCII text). Ties go to the first choice, as numpy's argmax."""
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    lengths = np.array([len(choice) for choice in choices], dtype=np.float64)
    return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / lengths) == gold)}


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean of per-sample values, as lm-eval's `stderr`: the sample standard deviation
    (ddof=1) over sqrt(n). None for fewer than two values."""
    if len(values) < 2:
        return None
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(len(values)))


def mean_stderr_reference(values: Sequence[float]) -> float:
    """lm-eval's mean_stderr written out: sqrt(Σ (x − mean)² / (n − 1)) / sqrt(n)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) / math.sqrt(len(values))
