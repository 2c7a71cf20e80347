"""Training batches from traces: every agent's (key, value, position, utility) rows for a few prompts.

A source is anything with the TraceReader interface (kvpolicy/traces/store.py): `n_layers`, `n_kv_heads`,
`head_dim`, `lengths`, `len()` and `read_layers(sample) -> TraceSample` with keys/values (L, H, T, d) and
utility (L, H, T); `SyntheticTraces` is another. Agents are flattened layer-major: agent = layer * H + head.

Only the evictable tokens are ranked: the first `sinks` and last `recent` positions are always kept at inference
(kvpolicy.compression.budget), so their scores never matter, and the attention sink's huge utility would
otherwise dominate every reward. To cut cost, each prompt contributes a random subset of `tokens` of its
evictable positions per step (ranking a random subset is still a ranking problem with the same optimum order);
validation ranks every evictable token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from kvpolicy.errors import KVPError


class TraceSource(Protocol):
    n_layers: int
    n_kv_heads: int
    head_dim: int

    @property
    def lengths(self) -> list[int]: ...

    def __len__(self) -> int: ...

    def read_layers(self, sample: int, layers: Sequence[int] | None = None): ...


@dataclass
class Batch:
    """keys, values: (A, B, n, d); utility: (A, B, n) float32; positions: (1, B, n) int64 true positions;
    lengths: (1, B, 1) int64 prompt lengths (the position of the next token)."""

    keys: torch.Tensor
    values: torch.Tensor
    utility: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor

    def finite(self) -> bool:
        return bool(torch.isfinite(self.keys).all() and torch.isfinite(self.values).all() and torch.isfinite(self.utility).all())

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device) for t in (self.keys, self.values, self.utility, self.positions, self.lengths)))


def evictable_range(length: int, sinks: int, recent: int) -> tuple[int, int]:
    """[start, stop) of the positions a budget can evict in a prompt of `length` tokens."""
    return min(sinks, length), max(min(sinks, length), length - recent)


class TraceBatches:
    """Draws training batches (random token subsets) and validation batches (whole prompts) from a source.

    tokens: tokens ranked per prompt and step (0 or more than a prompt's evictable tokens: all of the shortest
    prompt's, so a batch stays rectangular). dtype: of keys/values handed to the policy (bfloat16 halves memory
    traffic and runs the matmuls on the CPU's bf16 units).
    """

    def __init__(self, source: TraceSource, tokens: int = 256, sinks: int = 4, recent: int = 16, dtype: torch.dtype = torch.float32):
        if len(source) == 0:
            raise KVPError("the trace set is empty: record traces with `kvp traces ... --n N` first")
        self.source = source
        self.sinks, self.recent, self.dtype = sinks, recent, dtype
        spans = [stop - start for start, stop in (evictable_range(t, sinks, recent) for t in source.lengths)]
        shortest = min(spans)
        if shortest < 2:
            raise KVPError(
                f"a trace has only {shortest} evictable tokens (length {min(source.lengths)} minus {sinks} sinks and "
                f"{recent} recent); record traces with a longer --context"
            )
        self.tokens = shortest if tokens <= 0 else min(tokens, shortest)

    @property
    def n_agents(self) -> int:
        return self.source.n_layers * self.source.n_kv_heads

    def _rows(self, sample: int, index: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """keys, values (A, n, d), utility (A, n), positions (n,) of one prompt at token indices `index` (None: all
        evictable)."""
        trace = self.source.read_layers(sample)
        length = trace.keys.shape[-2]
        if index is None:
            start, stop = evictable_range(length, self.sinks, self.recent)
            index = torch.arange(start, stop)
        a, d = self.n_agents, trace.keys.shape[-1]
        keys = torch.as_tensor(trace.keys).index_select(-2, index).reshape(a, -1, d).to(self.dtype)
        values = torch.as_tensor(trace.values).index_select(-2, index).reshape(a, -1, d).to(self.dtype)
        utility = torch.as_tensor(trace.utility).index_select(-1, index).reshape(a, -1).float()
        positions = torch.as_tensor(trace.positions)
        return keys, values, utility, positions.index_select(0, index), positions.max() + 1

    def batch(self, samples: Sequence[int], generator: torch.Generator | None = None) -> Batch:
        """A training batch: for each prompt in `samples`, `tokens` random evictable tokens (sorted)."""
        rows = []
        for sample in samples:
            start, stop = evictable_range(self.source.lengths[sample], self.sinks, self.recent)
            pick = torch.randperm(stop - start, generator=generator)[: self.tokens].sort().values + start
            rows.append(self._rows(sample, pick))
        return self._stack(rows)

    def full(self, sample: int) -> Batch:
        """Every evictable token of one prompt (B = 1), for validation and benchmarks."""
        return self._stack([self._rows(sample, None)])

    @staticmethod
    def _stack(rows: list[tuple[torch.Tensor, ...]]) -> Batch:
        keys, values, utility, positions, lengths = zip(*rows)
        return Batch(
            keys=torch.stack(keys, 1),
            values=torch.stack(values, 1),
            utility=torch.stack(utility, 1),
            positions=torch.stack(positions).unsqueeze(0),
            lengths=torch.stack(lengths).reshape(1, -1, 1),
        )


def check_same_model(train: TraceSource, val: TraceSource) -> None:
    """Validation traces must come from the model the training traces came from."""
    fp_train, fp_val = getattr(train, "fingerprint", None), getattr(val, "fingerprint", None)
    shape_train = (train.n_layers, train.n_kv_heads, train.head_dim)
    shape_val = (val.n_layers, val.n_kv_heads, val.head_dim)
    if fp_train != fp_val or shape_train != shape_val:
        raise KVPError(
            f"validation traces come from another model ({getattr(val, 'model_name', '?')}, fingerprint {fp_val}) than "
            f"the training traces ({getattr(train, 'model_name', '?')}, fingerprint {fp_train}); record both with one model"
        )
