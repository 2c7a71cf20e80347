"""Training batches from traces: every agent's (key, value, position, utility) rows for a few prompts.

A source is anything with the TraceReader interface (kvpolicy/traces/store.py): `n_layers`, `n_kv_heads`,
`head_dim`, `lengths`, `len()` and `read_layers(sample) -> TraceSample` with keys/values (L, H, T, d) and
utility (L, H, T); `SyntheticTraces` is another. Agents are flattened layer-major: agent = layer * H + head.

Only the evictable tokens are ranked: the first `sinks` and last `recent` positions are always kept at inference
(kvpolicy.compression.budget), so their scores never matter, and the attention sink's huge utility would
otherwise dominate every reward. To cut cost, each prompt contributes a random subset of `tokens` of its
evictable positions per step (ranking a random subset is still a ranking problem with the same optimum order);
validation ranks every evictable token. Prompts are kept in RAM after their first (checksum-verified) read, up to
`cache_bytes`; beyond that they are re-read from the memory-mapped shards.
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
    traffic and runs the matmuls on the CPU's bf16 units). cache_bytes: RAM for prompts kept after first read.
    """

    def __init__(
        self,
        source: TraceSource,
        tokens: int = 256,
        sinks: int = 4,
        recent: int = 16,
        dtype: torch.dtype = torch.float32,
        cache_bytes: int = 4 << 30,
    ):
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
        self.cache_bytes = cache_bytes
        self._cache: dict[int, tuple[torch.Tensor, ...]] = {}
        self._cached_bytes = 0

    @property
    def n_agents(self) -> int:
        return self.source.n_layers * self.source.n_kv_heads

    def preload(self, samples: Sequence[int]) -> None:
        """Read (and so checksum-verify) every sample once up front, keeping what fits in the cache: a damaged
        trace set fails before training starts, and the first steps do not wait on the disk."""
        for sample in samples:
            self._read(sample)

    def _read(self, sample: int) -> tuple[torch.Tensor, ...]:
        """keys, values (A, T, d) in the storage dtype, utility (A, T), positions (T,) of one prompt (from RAM
        when cached). Keys and values are converted to bfloat16 once here when training in bfloat16 (converting
        fp16 -> bf16 at every step cost more than the gather)."""
        if sample in self._cache:
            return self._cache[sample]
        trace = self.source.read_layers(sample)
        store = self.dtype if self.dtype.itemsize <= 2 else torch.float16
        a = self.n_agents
        keys, values = (torch.as_tensor(t).reshape(a, -1, t.shape[-1]).to(store) for t in (trace.keys, trace.values))
        tensors = (keys, values, torch.as_tensor(trace.utility).reshape(a, -1).float(), torch.as_tensor(trace.positions))
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[sample] = tensors
            self._cached_bytes += size
        return tensors

    def _rows(self, sample: int, index: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """keys, values (A, n, d), utility (A, n), positions (n,) of one prompt at token indices `index` (None: all
        evictable)."""
        keys, values, utility, positions = self._read(sample)
        if index is None:
            start, stop = evictable_range(keys.shape[1], self.sinks, self.recent)
            index = torch.arange(start, stop)
        return (
            _gather_tokens(keys, index).to(self.dtype),
            _gather_tokens(values, index).to(self.dtype),
            utility.index_select(1, index),
            positions.index_select(0, index),
            positions.max() + 1,
        )

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


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[:, index] for (A, T, d); 2-byte floats are gathered as int16 (CPU index_select is ~3x faster on them)."""
    if x.element_size() == 2:
        return x.view(torch.int16).index_select(1, index).view(x.dtype)
    return x.index_select(1, index)


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
