"""What a benchmark is to the sweep: a loader, a prompt builder and a metric, plus the facts a figure states.

Four kinds, each run by its own runner: `QATask` (a question over a context: generate and score the answer, or
score each of fixed choices by its log-likelihood, as lm-eval-harness does), `DialogueTask` (perplexity of the final
assistant turn), `TraceTask` (reward-level ranking cost on held-out traces) and, in tasks/longgen.py with its
samples, `StreamTask` (perplexity of a long text streamed through a cache bounded at the budget).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from kvpolicy.data.dialogue import DialogueSample
from kvpolicy.data.records import QASample
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.lineup import Contender
from kvpolicy.traces.store import TraceReader

from kvpolicy.evaluation.names import (  # noqa: F401 (re-exported)
    MULTI_TURN, PROMPT_ONCE, PROTOCOLS, QUERY_AWARE, QUESTION_AGNOSTIC, TRACES,
)


@dataclass(frozen=True)
class Prompt:
    """The text a QA task feeds: `context` (compressed in both protocols), then `question` and `answer_prefix`."""

    context: str
    question: str
    answer_prefix: str = ""


CHOICE_METRICS = ("acc", "acc_norm")  # lm-eval-harness's multiple-choice metrics


def plain_prompt(sample: QASample) -> Prompt:
    return Prompt(sample.context, sample.question, sample.answer_prefix)


@dataclass(frozen=True)
class Task:
    """name: unique id in results ("ruler:vt"); family: the figure it is drawn in; data: where the samples come
    from (substitutes named as such); metric: what a result's value is (a name of result.METRIC_FIELDS: a score
    such as accuracy, acc or rouge_l, or perplexity, or cost); protocols: allowed, default first;
    sized: whether `context_tokens` sets the sample length (False: the data's own lengths); corpus: the trace
    source ("ruler" | "dialogue") whose data the samples come from, None for hub data, so that a policy trained
    on another corpus is reported as a cross-corpus check."""

    name: str
    family: str
    data: str
    metric: str
    protocols: tuple[str, ...]
    sized: bool
    corpus: str | None = None

    def supports(self, contender: Contender) -> bool:
        """Whether a scorer can run on this task (the oracle needs a trace's true future)."""
        return contender.kind != "oracle"

    def sample_facts(self, sample: str) -> tuple[str, str | None]:
        """(data, corpus) of one sample: the task's own, unless its samples come from several corpora."""
        return self.data, self.corpus


@dataclass(frozen=True)
class QATask(Task):
    """load(handle, n, context_tokens, seed) -> samples; prompt(sample) -> Prompt; score(prediction, sample) ->
    float in [0, 1] of a generated answer. With `choices` nothing is generated: each choice is scored by its
    log-likelihood after the prompt and `metric` is one of CHOICE_METRICS (lm-eval's acc or acc_norm, see
    evaluation.metrics.choice_metrics). extra_metrics: further metrics each sample records beside `metric`.
    template: read the prompt through the model's chat template (False: the plain text, as lm-eval does)."""

    load: Callable[..., list[QASample]] = field(default=None, repr=False)
    prompt: Callable[[QASample], Prompt] = field(default=plain_prompt, repr=False)
    score: Callable[[str, QASample], float] = field(default=None, repr=False)
    max_new_tokens: int = 64
    choices: bool = False
    extra_metrics: tuple[str, ...] = ()
    template: bool = True

    def __post_init__(self):
        metrics = (self.metric, *self.extra_metrics)
        if self.choices and not set(metrics) <= set(CHOICE_METRICS):
            raise KVPError(f"task {self.name}: a multiple-choice task reports {', '.join(CHOICE_METRICS)}, not "
                           f"{', '.join(m for m in metrics if m not in CHOICE_METRICS)}")
        if not self.choices and self.extra_metrics:
            raise KVPError(f"task {self.name}: only a multiple-choice task records extra metrics")


@dataclass(frozen=True)
class DialogueTask(Task):
    """load(handle, n, context_tokens, seed) -> DialogueSamples (prompt turns + the reference assistant turn)."""

    load: Callable[..., list[DialogueSample]] = field(default=None, repr=False)
    max_answer_tokens: int = 256


@dataclass(frozen=True)
class TraceTask(Task):
    """Held-out traces in `directory` (kvp traces); every trace is a sample."""

    directory: str = ""

    @functools.cached_property
    def reader(self) -> TraceReader:
        return TraceReader(self.directory)

    def supports(self, contender: Contender) -> bool:
        from kvpolicy.evaluation.costs import trace_scorable

        return trace_scorable(contender, self.reader)

    def sample_facts(self, sample: str) -> tuple[str, str | None]:
        """A trace of a mix (`kvp traces --source mix`) is reported with the corpus its prompt came from, so that
        the report shows the ranking cost per corpus."""
        source = self._sources.get(sample)
        return (f"{self.data}: its {source} prompts", source) if source else (self.data, self.corpus)

    @functools.cached_property
    def _sources(self) -> dict[str, str]:
        """Sample id -> the corpus of its prompt, for traces that record one per sample (a mix)."""
        return {s["id"]: s["source"] for s in self.reader.manifest["samples"] if "source" in s and "id" in s}
