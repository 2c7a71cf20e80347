"""Training batches from traces: every agent's (key, value, position, utility) rows for a few prompts.

A source is anything with the TraceReader interface (kvpolicy/traces/store.py): `model` (a ModelIdentity:
name, fingerprint, layers, KV heads, head dim), `lengths`, `len()` and `read_layers(sample) -> TraceSample` with
keys/values (L, H, T, d) and utility (L, H, T); `SyntheticTraces` is another. Agents are flattened layer-major:
agent = layer * H + head.

Training ranks only evictable tokens (kvpolicy.policy.protocol): the first `sinks` and last `recent` positions
are always kept at inference, so their scores never matter. To cut cost, each prompt contributes a random subset
of `tokens` of its evictable positions per step (ranking a random subset is still a ranking problem with the same
optimum order). Validation reads whole prompts and leaves sinks and recent out in the protocol's cost. Prompts are
kept in RAM after their first (checksum-verified) read, up to `CACHE_BYTES`; beyond that they are re-read from the
memory-mapped shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Protocol

import torch

from kvpolicy.errors import KVPError
from kvpolicy.models.handle import ModelIdentity
from kvpolicy.policy.protocol import RECENT, SINKS, evictable_range

CACHE_BYTES = 4 << 30  # RAM for prompts kept after their first read


class TraceSource(Protocol):
    model: ModelIdentity

    @property
    def lengths(self) -> list[int]: ...

    def __len__(self) -> int: ...

    def read_layers(self, sample: int, layers: Sequence[int] | None = None): ...


def trace_sets(source: TraceSource) -> list:
    """The trace sets a source reads: the parts of a union, else the source itself."""
    return list(getattr(source, "parts", None) or [source])


def _identities(trace_set) -> set[tuple[str, str]]:
    """What makes two trace sets one: the same directory (links followed) or the same manifest (a copy)."""
    found = set()
    if directory := getattr(trace_set, "directory", None):
        found.add(("directory", os.path.realpath(directory)))
    if manifest_hash := getattr(trace_set, "manifest_hash", None):
        found.add(("manifest", manifest_hash))
    return found


def check_held_out(train: TraceSource, val: TraceSource) -> None:
    """Refuse validation traces that are training traces (a set given to both, through a link or as a copy, also as
    one of several): validating on them would measure memorisation, and pick the best checkpoint by it."""
    seen = {key: part for part in trace_sets(train) for key in _identities(part)}
    for part in trace_sets(val):
        if common := next((seen[key] for key in _identities(part) if key in seen), None):
            name = getattr(part, "directory", None) or part.manifest_hash
            same = getattr(common, "directory", None) or common.manifest_hash
            raise KVPError(f"validation traces {name} are also training traces ({same}); validate on held-out "
                           "traces (`kvp traces --split val`), or leave out --val to hold out 10% of --traces")


@dataclass
class Batch:
    """keys, values: (A, B, n, d); utility: (A, B, n) float32; positions: (1, B, n) int64 true positions;
    lengths: (1, B, 1) int64 prompt lengths (the position of the next token); states: (L, B, n, D) the layers'
    input hidden states, when the source has them."""

    keys: torch.Tensor
    values: torch.Tensor
    utility: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    states: torch.Tensor | None = None

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.keys, self.values, self.utility))

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in (self.keys, self.values, self.utility,
                                                                     self.positions, self.lengths, self.states)))


NO_STATES = ("this policy reads the layers' hidden states, which these traces do not hold: record them with "
             "`kvp traces ... --hidden-states`")


def source_has_states(source: TraceSource) -> bool:
    """Whether every trace set of `source` holds the layers' input hidden states."""
    return all(getattr(part, "has_states", False) for part in trace_sets(source))


def states_width(source: TraceSource) -> int:
    """The hidden size of the states a source holds (its first sample's); KVPError (NO_STATES) when it holds none."""
    if not source_has_states(source):
        raise KVPError(NO_STATES)
    return int(source.read_layers(0, [0]).states.shape[-1])


class TraceBatches:
    """Draws training batches (random evictable token subsets) and validation batches (whole prompts) from a source.

    tokens: tokens ranked per prompt and step (0 or more than a prompt's evictable tokens: all of the shortest
    prompt's, so a batch stays rectangular). dtype: of keys/values handed to the policy (bfloat16 halves memory
    traffic and runs the matmuls on the CPU's bf16 units). states: also hand over the layers' input hidden states,
    for a policy that reads them (the traces must hold them: `kvp traces --hidden-states`).
    """

    def __init__(
        self,
        source: TraceSource,
        tokens: int = 256,
        sinks: int = SINKS,
        recent: int = RECENT,
        dtype: torch.dtype = torch.float32,
        states: bool = False,
    ):
        if len(source) == 0:
            raise KVPError("the trace set is empty: record traces with `kvp traces ... --n N` first")
        if states and not source_has_states(source):
            raise KVPError(NO_STATES)
        self.source, self.states = source, states
        self.sinks, self.recent, self.dtype = sinks, recent, dtype
        spans = [stop - start for start, stop in (evictable_range(t, sinks, recent) for t in source.lengths)]
        shortest = min(spans)
        if shortest < 2:
            raise KVPError(
                f"a trace has only {shortest} evictable tokens (length {min(source.lengths)} minus {sinks} sinks and "
                f"{recent} recent); record traces with a longer --context"
            )
        self.tokens = shortest if tokens <= 0 else min(tokens, shortest)
        self._cache: dict[int, tuple[torch.Tensor, ...]] = {}
        self._cached_bytes = 0

    def preload(self, samples: Sequence[int]) -> None:
        """Read (and so checksum-verify) every sample once up front, keeping what fits in the cache: a damaged
        trace set fails before training starts, and the first steps do not wait on the disk."""
        for sample in samples:
            self._read(sample)

    def _read(self, sample: int) -> tuple[torch.Tensor, ...]:
        """keys, values (A, T, d) in the storage dtype, utility (A, T), positions (T,) of one prompt, and its states
        (L, T, D) when read (from RAM when cached). When training in bfloat16, keys and values are converted once
        here, not at every step."""
        if sample in self._cache:
            return self._cache[sample]
        trace = self.source.read_layers(sample)
        store = self.dtype if self.dtype.itemsize <= 2 else torch.float16
        a = self.source.model.n_agents
        keys, values = (torch.as_tensor(t).reshape(a, -1, t.shape[-1]).to(store) for t in (trace.keys, trace.values))
        utility = torch.as_tensor(trace.utility).reshape(a, -1).float()
        tensors = (keys, values, utility, torch.as_tensor(trace.positions))
        tensors += (torch.as_tensor(trace.states).to(store),) if self.states else ()
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self._cached_bytes + size <= CACHE_BYTES:
            self._cache[sample] = tensors
            self._cached_bytes += size
        return tensors

    def _rows(self, sample: int, index: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """keys, values (A, n, d), utility (A, n), positions (n,) of one prompt at token indices `index` (None:
        every token), the prompt's length, and its states (L, n, D) when read."""
        keys, values, utility, positions, *states = self._read(sample)
        if index is None:
            index = torch.arange(keys.shape[1])
        return (
            keys.index_select(1, index).to(self.dtype),
            values.index_select(1, index).to(self.dtype),
            utility.index_select(1, index),
            positions.index_select(0, index),
            positions.max() + 1,
        ) + tuple(s.index_select(1, index).to(self.dtype) for s in states)

    def batch(self, samples: Sequence[int], generator: torch.Generator | None = None) -> Batch:
        """A training batch: for each prompt in `samples`, `tokens` random evictable tokens (sorted)."""
        rows = []
        for sample in samples:
            start, stop = evictable_range(self.source.lengths[sample], self.sinks, self.recent)
            pick = torch.randperm(stop - start, generator=generator)[: self.tokens].sort().values + start
            rows.append(self._rows(sample, pick))
        return self._stack(rows)

    def full(self, sample: int) -> Batch:
        """Every token of one prompt (B = 1), for validation: the protocol's cost ranks its evictable ones."""
        return self._stack([self._rows(sample, None)])

    @staticmethod
    def _stack(rows: list[tuple[torch.Tensor, ...]]) -> Batch:
        keys, values, utility, positions, lengths, *states = zip(*rows)
        return Batch(
            keys=torch.stack(keys, 1),
            values=torch.stack(values, 1),
            utility=torch.stack(utility, 1),
            positions=torch.stack(positions).unsqueeze(0),
            lengths=torch.stack(lengths).reshape(1, -1, 1),
            states=torch.stack(states[0], 1) if states else None,
        )
