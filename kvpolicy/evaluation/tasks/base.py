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
from kvpolicy.compression.engine import check_prefill_chunk
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.lineup import FULL_CACHE, Contender, IsMissing
from kvpolicy.evaluation.outcome import Outcome
from kvpolicy.models import ModelHandle


@dataclass(frozen=True)
class Intervals:
    """Tokens fed between two cuts, per setting a sweep runs: the re-rank intervals of bounded streams (`--every`),
    and the chunk sizes of chunked prefills (`--prefill-chunk`), run beside compress-once. Results store either in
    their `every` field (None: compress-once, or a setting that cuts nothing)."""

    stream: tuple[int, ...] = ()
    prefill: tuple[int, ...] = ()


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
    # the protocols under which the prompt can also be prefilled in chunks, cut after each (`--prefill-chunk`)
    chunked_protocols: ClassVar[tuple[str, ...]] = ()

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

    def check_lineup(self, contenders: list[Contender], budgets: list[Budget], intervals: Intervals) -> None:
        """Refuse, before any work, a line-up this task cannot run: by default a prefill chunk some scorer that cuts
        chunk by chunk here cannot rank with (`check_prefill_chunk`)."""
        if not self.chunked_protocols:
            return
        for contender in self.chunked_contenders(contenders):
            for budget in budgets:
                for chunk in intervals.prefill:
                    check_prefill_chunk(contender.scorer, budget, chunk)

    @staticmethod
    def chunked_contenders(contenders: list[Contender]) -> list[Contender]:
        """The contenders a chunked prefill runs: not the full cache, which cuts nothing, nor a scorer that ranks
        only the cache of one whole prefill (KVzip, KVzap)."""
        return [c for c in contenders if c is not FULL_CACHE and c.scorer is not None and not c.whole_prefill]

    def positions(self, handle: ModelHandle, samples: list[Any], max_new_tokens: int) -> tuple[int, str] | None:
        """(the most positions a sample needs, what they hold) for the model's limit; None when no model runs.
        max_new_tokens: the sweep's cap on generated tokens (0: the task's own)."""
        return None

    def prefill_groups(self, protocol: str, samples: list[Any]) -> list[list[Any]]:
        """Samples that share one prefill under `protocol` (one each by default)."""
        return [[s] for s in samples]

    def interval_groups(self, contenders: list[Contender], protocol: str,
                        intervals: Intervals) -> list[tuple[int | None, list[Contender]]]:
        """(tokens fed between two cuts, contenders) of the units of one prefill group: compress-once (None) with
        every contender, and under `chunked_protocols` one unit per prefill chunk size with the chunked ones."""
        groups: list[tuple[int | None, list[Contender]]] = [(None, contenders)]
        chunked = self.chunked_contenders(contenders) if protocol in self.chunked_protocols else []
        return groups + [(chunk, chunked) for chunk in intervals.prefill if chunked]

    def outcomes(self, handle: ModelHandle, samples: list[Any], protocol: str, contenders: list[Contender],
                 budgets: list[Budget], is_missing: IsMissing, every: int | None,
                 max_new_tokens: int) -> Iterator[Outcome]:
        """The runner: outcomes of the missing results of one unit of work (a prefill group, under one protocol
        and one `every`: a stream's re-rank interval, a chunked prefill's chunk size, or None), among them the
        full-cache reference's when is_missing says so. contenders: the scorers (not FULL_CACHE); max_new_tokens:
        the sweep's cap on generated tokens (0: the task's own)."""
        raise NotImplementedError(f"{type(self).__name__} has no runner")
