"""Zero-shot benchmarks of the paper through their hub loaders (online): BoolQ and ARC-Challenge (answer = the
likeliest choice), LongBench GovReport (ROUGE-L) and passage retrieval (LongBench's retrieval score), with
LongBench's own prompts. For BoolQ and GovReport the paper compresses before the question is known, so their
default protocol is question-agnostic."""

from __future__ import annotations

from dataclasses import replace

from kvpolicy.data.records import QASample
from kvpolicy.evaluation.metrics import best_rouge_l, retrieval_score
from kvpolicy.evaluation.tasks.base import QUERY_AWARE, QUESTION_AGNOSTIC, Prompt, QATask, plain_prompt

FAMILY = "zero-shot (hub)"


def _loader(hub_name: str, local: str | None):
    def load(handle, n: int, context_tokens: int, seed: int) -> list[QASample]:
        from kvpolicy.data.hub import load_hub

        return load_hub(hub_name, limit=n, local=local)

    return load


def choice_score(prediction: str, sample: QASample) -> float:
    """1 if the chosen option (the prediction) is the correct one."""
    return float(prediction.strip() == sample.answers[0])


def gov_report_prompt(sample: QASample) -> Prompt:
    return Prompt(
        context=f"You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                f"Report:\n{sample.context}\n\n",
        question="Now, write a one-page summary of the report.",
        answer_prefix="Summary:",
    )


def passage_retrieval_prompt(sample: QASample) -> Prompt:
    return Prompt(
        context="Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
                f"abstract is from.\n\n{sample.context}\n\n",
        question=f"The following is an abstract.\n\n{sample.question}\n\nPlease enter the number of the paragraph that "
                 'the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.',
        answer_prefix="The answer is:",
    )


def _boolq_prompt(sample: QASample) -> Prompt:
    return replace(plain_prompt(sample), context=f"{sample.context}\n\n")


def zero_shot_tasks(local: dict[str, str] | None = None) -> dict[str, QATask]:
    local = local or {}
    return {
        "boolq": QATask(name="boolq", family=FAMILY, data="BoolQ (google/boolq, validation)", metric="accuracy",
                        protocols=(QUESTION_AGNOSTIC, QUERY_AWARE), sized=False,
                        load=_loader("boolq", local.get("boolq")),
                        prompt=_boolq_prompt, score=choice_score, choices=True),
        "arc_challenge": QATask(name="arc_challenge", family=FAMILY, data="ARC-Challenge (allenai/ai2_arc, test)",
                                metric="accuracy", protocols=(QUERY_AWARE,), sized=False,
                                load=_loader("arc_challenge", local.get("arc_challenge")), score=choice_score,
                                choices=True),
        "gov_report": QATask(name="gov_report", family=FAMILY, data="LongBench GovReport (THUDM/LongBench), ROUGE-L",
                             metric="accuracy", protocols=(QUESTION_AGNOSTIC, QUERY_AWARE), sized=False,
                             load=_loader("gov_report", local.get("gov_report")), prompt=gov_report_prompt,
                             score=lambda text, s: best_rouge_l(text, s.answers), max_new_tokens=256),
        "passage_retrieval_en": QATask(name="passage_retrieval_en", family=FAMILY,
                                       data="LongBench passage retrieval (THUDM/LongBench)", metric="accuracy",
                                       protocols=(QUERY_AWARE, QUESTION_AGNOSTIC), sized=False,
                                       load=_loader("passage_retrieval_en", local.get("passage_retrieval_en")),
                                       prompt=passage_retrieval_prompt,
                                       score=lambda text, s: retrieval_score(text, s.answers), max_new_tokens=32),
    }
