"""Several trace sets of one model read as one training or validation source (e.g. the mix and the code traces).

Sample i of the union is sample i − start(k) of the k-th set holding it, sets in the order given, so `--prompts N`
takes the first N of the concatenation. Every set must come from the same model (fingerprint and cache shape).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from kvpolicy.errors import KVPError
from kvpolicy.io import sha256_json
from kvpolicy.traces.store import TraceReader, TraceSample


def check_same_model(a_source, b_source, what: str = "validation traces") -> None:
    """`b_source` must come from the model `a_source` came from (fingerprint and cache shape)."""
    a, b = a_source.model, b_source.model
    if (a.fingerprint, a.n_layers, a.n_kv_heads, a.head_dim) != (b.fingerprint, b.n_layers, b.n_kv_heads, b.head_dim):
        raise KVPError(f"{what} come from another model ({b.name}, fingerprint {b.fingerprint}) than the training "
                       f"traces ({a.name}, fingerprint {a.fingerprint}); record both with one model")


class TraceUnion:
    """The TraceReader reading interface (`model`, `lengths`, `len()`, `read_layers`) over several trace sets."""

    def __init__(self, parts: Sequence[TraceReader]):
        if not parts:
            raise KVPError("a trace union needs at least one trace set")
        for part in parts[1:]:
            check_same_model(parts[0], part, what=f"traces in {part.directory}")
        self.parts = list(parts)
        self.model = parts[0].model
        self._starts = [0, *itertools.accumulate(len(p) for p in parts)]

    @property
    def manifest_hash(self) -> str:
        """Fixes the union: the parts' manifest hashes, in order."""
        return sha256_json([p.manifest_hash for p in self.parts])

    @property
    def lengths(self) -> list[int]:
        return [n for part in self.parts for n in part.lengths]

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, sample: int) -> tuple[TraceReader, int]:
        """The set holding union sample `sample` and its index there."""
        if not 0 <= sample < len(self):
            raise KVPError(f"sample {sample} out of range: the trace sets hold {len(self)} samples")
        k = bisect.bisect_right(self._starts, sample) - 1
        return self.parts[k], sample - self._starts[k]

    def read_layers(self, sample: int, layers: Sequence[int] | None = None) -> TraceSample:
        part, index = self.locate(sample)
        return part.read_layers(index, layers)


def open_traces(directories: Sequence[str]) -> TraceReader | TraceUnion:
    """One trace set as its reader; several as their union."""
    readers = [TraceReader(d) for d in directories]
    return readers[0] if len(readers) == 1 else TraceUnion(readers)
