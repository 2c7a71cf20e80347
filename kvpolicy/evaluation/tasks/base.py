"""What a benchmark is to the sweep: a `Task` states its facts (name, data, metric, protocols) and how it is run.

A task kind is a `Task` subclass that carries its own behaviour, so that the sweep (evaluation/sweep.py) holds no
switch on kinds: how its samples are found and named, how many positions they need, which samples share one
prefill, which re-rank intervals it runs, and its runner, which turns one unit of work into outcomes. Each kind lives
beside its runner: `QATask` in evaluation/qa.py (answer a question over a context), `DialogueTask` in
evaluation/perplexity.py (perplexity of a dialogue's final assistant turn), `StreamTask` in
evaluation/bounded_stream.py (perplexity of a long text streamed through a bounded cache) and `TraceTask` in
evaluation/costs.py (reward-level ranking cost on held-out traces). The benchmarks themselves (which data, prompts
and metric) are in this package, one file per family, reached by name through tasks/catalog.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvpolicy.compression.budget import Budget
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.lineup import Contender, IsMissing
from kvpolicy.evaluation.outcome import Outcome
from kvpolicy.models import ModelHandle


@dataclass(frozen=True)
class Task:
    """name: unique id in results ("ruler:vt"); family: the figure it is drawn in; data: where the samples come
    from (substitutes named as such); metric: what a result's value is (a name of result.METRIC_FIELDS: a score
    such as accuracy, acc or rouge_l, or perplexity, or cost); protocols: allowed, default first;
    sized: whether `context_tokens` sets the sample length (False: the data's own lengths); corpus: the trace
    source ("ruler" | "dialogue") whose data the samples come from, None for hub data, so that a policy trained
    on another corpus is reported as a cross-corpus check; load(handle, n, context_tokens, seed) -> the samples
    (a kind that finds them otherwise overrides `samples`)."""

    name: str
    family: str
    data: str
    metric: str
    protocols: tuple[str, ...]
    sized: bool
    corpus: str | None = None
    load: Callable[..., list[Any]] | None = field(default=None, repr=False)

    # whether the sweep compares the scorers with the uncompressed cache (FULL_CACHE) on this task
    full_cache_reference: ClassVar[bool] = True

    def supports(self, contender: Contender, protocol: str) -> bool:
        """Whether a scorer can run on this task under `protocol` (the oracle needs a trace's true future); the sweep
        skips the others with a note."""
        return contender.kind != "oracle"

    def sample_facts(self, sample: str) -> tuple[str, str | None]:
        """(data, corpus) of one sample: the task's own, unless its samples come from several corpora."""
        return self.data, self.corpus

    def samples(self, handle: ModelHandle, n: int, context_tokens: int | None, seed: int) -> list[Any]:
        """The first n samples at `context_tokens` for `handle`; KVPError when there are none."""
        samples = self.load(handle, n, context_tokens, seed)
        if not samples:
            raise KVPError(f"task {self.name} produced no samples; check its data source")
        return samples

    def sample_id(self, sample: Any) -> str:
        """What results call a sample."""
        return sample.id

    def budget_labels(self, labels: list[str]) -> list[str]:
        """The budget labels of a scorer's results here, given the sweep's."""
        return labels

    def check_lineup(self, contenders: list[Contender], budgets: list[Budget], every: list[int]) -> None:
        """Refuse, before any work, a line-up this task cannot run (nothing by default)."""

    def positions(self, handle: ModelHandle, samples: list[Any], max_new_tokens: int) -> tuple[int, str] | None:
        """(the most positions a sample needs, what they hold) for the model's limit; None when no model runs.
        max_new_tokens: the sweep's cap on generated tokens (0: the task's own)."""
        return None

    def prefill_groups(self, protocol: str, samples: list[Any]) -> list[list[Any]]:
        """Samples that share one prefill under `protocol` (one each by default)."""
        return [[s] for s in samples]

    def interval_groups(self, contenders: list[Contender],
                        every: list[int]) -> list[tuple[int | None, list[Contender]]]:
        """(re-rank interval, contenders) of the units of one prefill group: no interval by default."""
        return [(None, contenders)]

    def outcomes(self, handle: ModelHandle, samples: list[Any], protocol: str, contenders: list[Contender],
                 budgets: list[Budget], is_missing: IsMissing, every: int | None,
                 max_new_tokens: int) -> Iterator[Outcome]:
        """The runner: outcomes of the missing results of one unit of work (a prefill group, under one protocol
        and re-rank interval), among them the full-cache reference's when is_missing says so. contenders: the
        scorers (not FULL_CACHE); max_new_tokens: the sweep's cap on generated tokens (0: the task's own)."""
        raise NotImplementedError(f"{type(self).__name__} has no runner")
