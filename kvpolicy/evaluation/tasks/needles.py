"""Evaluation-only needle tasks (kvpolicy.data.needles): a needle phrasing and a haystack no training trace uses, so
that a policy's accuracy on them tests what it learned about the future's attention, not the look of the
RULER-style generator's needles. Scored with RULER's string_match_all."""

from __future__ import annotations

from kvpolicy.data.needles import NEEDLE_TASKS, make_needle_sample
from kvpolicy.data.records import QASample
from kvpolicy.data.ruler import string_match_all
from kvpolicy.compression.protocols import QUERY_AWARE, QUESTION_AGNOSTIC
from kvpolicy.evaluation.qa import QATask

FAMILY = "evaluation-only needles"


def needle_score(prediction: str, sample: QASample) -> float:
    return string_match_all(prediction, sample.answers)


def needle_task(name: str) -> QATask:
    spec = NEEDLE_TASKS[name]

    def load(handle, n: int, context_tokens: int, seed: int) -> list[QASample]:
        return [make_needle_sample(name, handle, context_tokens, seed, i) for i in range(n)]

    # corpus None: no trace source holds these haystacks, so every policy is reported as cross-corpus here
    return QATask(name=f"needle:{name}", family=FAMILY, data=spec.data, metric="accuracy",
                  protocols=(QUERY_AWARE, QUESTION_AGNOSTIC), sized=True, corpus=None, load=load,
                  score=needle_score, max_new_tokens=spec.max_new_tokens, saturates=True)
