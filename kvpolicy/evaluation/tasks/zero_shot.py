"""Zero-shot benchmarks of the paper through their hub loaders (online), scored as the ecosystem scores them so
that numbers compare with published ones. BoolQ and ARC-Challenge follow lm-eval-harness (super_glue/boolq/
default.yaml, arc/arc_easy.yaml): its prompts, each choice scored as the continuation " {choice}" by its
log-likelihood, and its metrics, acc for BoolQ and acc with acc_norm for ARC. LongBench GovReport and passage
retrieval keep LongBench's prompts and metrics (ROUGE-L F1, retrieval_score). For BoolQ and GovReport the paper
compresses before the question is known, so their default protocol is question-agnostic.

BoolQ and ARC read lm-eval's plain text (no chat template, no BOS), as lm-eval does by default; the LongBench tasks
read their prompts through the model's chat template (compression.prompts.split_prompt), as LongBench does for chat
models.
"""

from __future__ import annotations

from kvpolicy.data.records import QASample
from kvpolicy.evaluation.metrics import best_rouge_l, retrieval_score
from kvpolicy.compression.protocols import QUERY_AWARE, QUESTION_AGNOSTIC
from kvpolicy.evaluation.qa import Prompt, QATask

FAMILY = "zero-shot (hub)"


def _loader(hub_name: str, local: str | None):
    def load(handle, n: int, context_tokens: int, seed: int) -> list[QASample]:
        from kvpolicy.data.hub import load_hub

        return load_hub(hub_name, limit=n, local=local)

    return load


def boolq_prompt(sample: QASample) -> Prompt:
    """lm-eval's "{passage}\\nQuestion: {question}?\\nAnswer:"; the passage is the context."""
    return Prompt(context=f"{sample.context}\n", question=f"Question: {sample.question}?", answer_prefix="Answer:")


def arc_prompt(sample: QASample) -> Prompt:
    """lm-eval's "Question: {question}\\nAnswer:"; there is no context."""
    return Prompt(context="", question=f"Question: {sample.question}", answer_prefix="Answer:")


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


def boolq_task(local: str | None = None) -> QATask:
    return QATask(name="boolq", family=FAMILY, data="BoolQ (google/boolq, validation)", metric="acc",
                  protocols=(QUESTION_AGNOSTIC, QUERY_AWARE), sized=False, load=_loader("boolq", local),
                  prompt=boolq_prompt, choices=True, template=False)


def arc_challenge_task(local: str | None = None) -> QATask:
    return QATask(name="arc_challenge", family=FAMILY, data="ARC-Challenge (allenai/ai2_arc, test)", metric="acc",
                  protocols=(QUERY_AWARE,), sized=False, load=_loader("arc_challenge", local), prompt=arc_prompt,
                  choices=True, extra_metrics=("acc_norm",), template=False)


def gov_report_task(local: str | None = None) -> QATask:
    return QATask(name="gov_report", family=FAMILY, data="LongBench GovReport (THUDM/LongBench, parquet export)",
                  metric="rouge_l", protocols=(QUESTION_AGNOSTIC, QUERY_AWARE), sized=False,
                  load=_loader("gov_report", local), prompt=gov_report_prompt,
                  score=lambda text, s: best_rouge_l(text, s.answers), max_new_tokens=256)


def passage_retrieval_task(local: str | None = None) -> QATask:
    return QATask(name="passage_retrieval_en", family=FAMILY,
                  data="LongBench passage retrieval (THUDM/LongBench, parquet export)", metric="retrieval_score",
                  protocols=(QUERY_AWARE, QUESTION_AGNOSTIC), sized=False, load=_loader("passage_retrieval_en", local),
                  prompt=passage_retrieval_prompt, score=lambda text, s: retrieval_score(text, s.answers),
                  max_new_tokens=32)
