"""Reward-level evaluation on held-out traces: how much future attention each scorer's ranking evicts.

Per (layer, KV head) of each trace, a scorer ranks the prompt's tokens from the stored keys, values and positions
(TOVA and SnapKV, which need the question's queries, use the scores the traces stored for them; the oracle ranks
by the true future utility). Costs follow the inference protocol (kvpolicy.policy.protocol): the first `sinks`
and last `recent` positions are kept by every method, the oracle included, so only the tokens between them are
ranked. At budget b (entries kept per head, sinks and recent included) the evicted tokens are the evictable ones
ranked below the room left, and −R_b = (utility evicted by the scorer at b) / (the least utility any ranking
evicts at b): 1 = oracle. The budget 'all' holds the paper's whole-ranking cost, cost(σ) / cost(sorted u), per
head. Training's validation and the ranking benchmark measure with the same functions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.compression.allocation import UNIFORM
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.scorers.base import LayerView
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.lineup import Contender, IsMissing
from kvpolicy.evaluation.outcome import Clock, Outcome
from kvpolicy.evaluation.result import WHOLE_RANKING
from kvpolicy.evaluation.tasks.base import Intervals, Task
from kvpolicy.models import ModelHandle
from kvpolicy.policy.protocol import RECENT, SINKS, evictable_cost, evicted_shares
from kvpolicy.policy.ranking import relative_loss
from kvpolicy.traces.store import TraceReader, TraceSample
from kvpolicy.training.calibrate import policy_scores


@dataclass(frozen=True)
class TraceTask(Task):
    """Held-out traces in `directory` (kvp traces); every trace is a sample (its index), ranked by every scorer
    with no model run, so there is no full-cache reference, and each scorer's results add the whole-ranking cost."""

    directory: str = ""

    full_cache_reference: ClassVar[bool] = False

    @functools.cached_property
    def reader(self) -> TraceReader:
        return TraceReader(self.directory)

    def supports(self, contender: Contender, protocol: str) -> bool:
        return trace_scorable(contender, self.reader)

    def check_lineup(self, contenders: list[Contender], budgets: list[Budget], intervals: Intervals) -> None:
        moved = [c.spec for c in contenders if c.scorer is not None and c.scorer.allocation is not UNIFORM
                 and trace_scorable(c, self.reader)]
        if moved:
            raise KVPError(f"trace costs judge each head's ranking on its own, so they cannot measure a budget moved "
                           f"between heads ({', '.join(moved)}); `kvp calibrate --held-out DIR` measures the "
                           "allocation modes on traces")

    def sample_facts(self, sample: str) -> tuple[str, str | None]:
        """A trace of a mix (`kvp traces --source mix`) is reported with the corpus its prompt came from, so that
        the report shows the ranking cost per corpus."""
        source = self._sources.get(sample)
        return (f"{self.data}: its {source} prompts", source) if source else (self.data, self.corpus)

    @functools.cached_property
    def _sources(self) -> dict[str, str]:
        """Sample id -> the corpus of its prompt, for traces that record one per sample (a mix)."""
        return {s["id"]: s["source"] for s in self.reader.manifest["samples"] if "source" in s and "id" in s}

    def samples(self, handle: ModelHandle, n: int, context_tokens: int | None, seed: int) -> list[int]:
        """The first n traces' indices; traces recorded with another model are refused."""
        self.reader.check_model(handle.info)
        return list(range(min(n, len(self.reader))))

    def sample_id(self, sample: int) -> str:
        return self.reader.manifest["samples"][sample].get("id", str(sample))

    def budget_labels(self, labels: list[str]) -> list[str]:
        return [*labels, WHOLE_RANKING]

    def outcomes(self, handle: ModelHandle, samples: list[int], protocol: str, contenders: list[Contender],
                 budgets: list[Budget], is_missing: IsMissing, every: int | None,
                 max_new_tokens: int) -> Iterator[Outcome]:
        (index,) = samples
        return trace_costs(self.reader, index, contenders, budgets, is_missing)


def trace_scorable(entry: Contender, reader: TraceReader) -> bool:
    """Attention-free scorers, the learned policy and the oracle rank any trace; query-based ones only where the
    traces stored their scores; those that re-read the prompt's text (KVzip) none, as traces keep no token ids. A
    policy that reads the layers' hidden states only traces that hold them (`kvp traces --hidden-states`)."""
    if entry.kind == "learned":
        return reader.has_states or not entry.scorer.reads_states
    return entry.kind == "oracle" or entry.attention_free or entry.spec in reader.baselines


def trace_scores(reader: TraceReader, index: int, entry: Contender, trace: TraceSample) -> torch.Tensor:
    """(L, H, T) scores of trace `index` (read as `trace`: keys, values (L, H, T, d), utility (L, H, T)), higher =
    keep. A learned policy scores the trace as `kvp calibrate` does (`policy_scores`: with the hidden states too,
    where it reads them); of the others only attention-free scorers run here (query-based ones read the scores stored
    with the traces), so they see the cache alone, as LayerView promises them."""
    if entry.kind == "oracle":
        return trace.utility.float()
    if not entry.attention_free and entry.kind != "learned":
        if entry.spec not in reader.baselines:
            raise KVPError(f"traces in {reader.directory} store no '{entry.spec}' scores; record them with "
                           f"`kvp traces --baselines {entry.spec}` or leave the scorer out")
        return torch.stack([reader.read_baseline(index, layer, entry.spec) for layer in range(reader.model.n_layers)])
    if entry.kind == "learned":  # the policy's own scores, with the traces' hidden states where it reads them
        return policy_scores(entry.scorer.policy, trace)
    n_layers, heads, length = trace.utility.shape
    positions = torch.as_tensor(trace.positions).view(1, 1, length).expand(1, heads, length)
    with torch.no_grad():
        return torch.stack([
            entry.scorer.score(LayerView(layer_idx=layer, keys=trace.keys[layer][None].float(),
                                         values=trace.values[layer][None].float(), positions=positions))[0].float()
            for layer in range(n_layers)
        ])


def cost_fields(scores: torch.Tensor, utility: torch.Tensor, kept: int | None, sinks: int = SINKS,
                recent: int = RECENT) -> dict:
    """Record fields for one budget (kept entries per head, sinks and recent included) or, with kept=None, the
    whole-ranking cost; scores, utility: (L, H, T) over the whole prompt.

    value: the sample's cost over all heads (ratio of mean evicted utility to the oracle's); lost / best: those
    means, so samples pool as Σ lost / Σ best; per_head: (L, H) per-head cost (floored ratio, as the training
    curves use)."""
    if kept is None:
        per_head = evictable_cost(scores, utility, sinks, recent)
        return {"value": float(per_head.mean()), "per_head": per_head.round(decimals=4).tolist()}
    lost, best = (share[..., 0] for share in evicted_shares(scores, utility, [kept], sinks, recent))
    per_head = relative_loss(lost, best)
    lost_mean, best_mean = float(lost.mean()), float(best.mean())
    return {"value": lost_mean / max(best_mean, 1e-12), "lost": lost_mean, "best": best_mean,
            "per_head": per_head.round(decimals=4).tolist()}


def trace_costs(reader: TraceReader, index: int, entries: list[Contender], budgets: list[Budget],
                wanted: IsMissing) -> Iterator[Outcome]:
    """Outcomes of the wanted (scorer, budget) pairs on trace `index`, plus the whole-ranking cost per scorer
    (under the default sinks and recent of the protocol; a budget keeps its own)."""
    labels = [(b.label, b) for b in budgets] + [(WHOLE_RANKING, None)]
    active = [e for e in entries if any(wanted(e.id, label) for label, _ in labels)]
    if not active:
        return
    clock = Clock()
    trace = reader.read_layers(index)
    utility = trace.utility.float()
    length = utility.shape[-1]
    bytes_full = trace.keys.numel() * 2 * 2  # the fp16 keys and values of the whole prompt
    read_s = clock.lap()
    sample = reader.manifest["samples"][index].get("id", str(index))
    for entry in active:
        scores = trace_scores(reader, index, entry, trace)
        todo = [(label, b) for label, b in labels if wanted(entry.id, label)]
        rank_s = clock.lap() / len(todo)
        for label, budget in todo:
            if budget is None:
                kept, fields = length, cost_fields(scores, utility, None)
            else:
                kept = budget.kept(length)
                fields = cost_fields(scores, utility, kept, budget.sinks, budget.recent)
            yield Outcome(sample, entry, label, length, kept, bytes_full, bytes_full * kept // length,
                          rank_s + clock.lap(), read_s, fields)
            clock.lap()
