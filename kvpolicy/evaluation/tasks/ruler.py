"""RULER benchmarks: the offline RULER-style generator over the essays (its "eval" split, which never shares a
prompt with the traces' train/val/test splits) and, online, the hub set simonjegou/ruler; RULER's string-match
metrics (string_match_all, string_match_part for the QA tasks) score every answer."""

from __future__ import annotations

from kvpolicy.data.records import QASample
from kvpolicy.data.ruler import RULER_TASKS, TASKS, make_sample, string_match_all, string_match_part
from kvpolicy.compression.protocols import QUERY_AWARE, QUESTION_AGNOSTIC
from kvpolicy.evaluation.qa import QATask

EVAL_SPLIT = "eval"
OFFLINE_DATA = "RULER-style tasks over Paul Graham essays (offline stand-in for RULER)"
HUB_DATA = "RULER 4K (simonjegou/ruler, Hugging Face hub)"
FAMILY = "RULER-style tasks"
HUB_FAMILY = "RULER (hub)"


def ruler_score(prediction: str, sample: QASample) -> float:
    """RULER's metric: string_match_part for the QA tasks, string_match_all for the rest."""
    metric = string_match_part if sample.task.startswith("qa") else string_match_all
    return metric(prediction, sample.answers)


def offline_task(name: str) -> QATask:
    spec = TASKS[name]

    def load(handle, n: int, context_tokens: int, seed: int) -> list[QASample]:
        return [make_sample(name, handle, context_tokens, seed, i, split=EVAL_SPLIT) for i in range(n)]

    return QATask(name=f"ruler:{name}", family=FAMILY, data=OFFLINE_DATA, metric="accuracy",
                  protocols=(QUERY_AWARE, QUESTION_AGNOSTIC), sized=True, corpus="ruler", load=load,
                  score=ruler_score, max_new_tokens=spec.max_new_tokens, saturates=True)


def hub_task(name: str, local: str | None = None) -> QATask:
    def load(handle, n: int, context_tokens: int, seed: int) -> list[QASample]:
        from kvpolicy.data.hub import load_hub

        return [s for s in load_hub("ruler-4k", local=local) if s.task == name][:n]

    return QATask(name=f"ruler-hub:{name}", family=HUB_FAMILY, data=HUB_DATA, metric="accuracy",
                  protocols=(QUERY_AWARE, QUESTION_AGNOSTIC), sized=False, load=load, score=ruler_score,
                  max_new_tokens=RULER_TASKS[name].max_new_tokens if name in RULER_TASKS else 64, saturates=True)
