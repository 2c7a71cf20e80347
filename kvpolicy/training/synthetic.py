"""Synthetic traces whose future utility is a known function of the key: a learning problem with a known answer.

Each agent a has a hidden query direction w_a; a prompt's keys and values are Gaussian and the utility of token i
is the attention a query along w_a pays it, u_i = softmax_i(sharpness · k_i·w_a) (|w_a| = 1, k ~ N(0, I)), so a
few tokens matter and a network that reads the key can rank exactly like the oracle. Used to test that training
works (a broken gradient, sign or baseline leaves the reward far from the oracle) and to exercise `kvp train`
without a model.
Implements the TraceReader reading interface (kvpolicy/traces/store.py), with a made-up `model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from kvpolicy.models.handle import ModelIdentity
from kvpolicy.traces.store import TraceSample


class SyntheticTraces:
    """n_samples prompts of `length` tokens for n_layers × n_kv_heads agents; deterministic in `seed`.
    `query_seed` fixes the hidden directions, so train and validation sets share them (same "model")."""

    def __init__(
        self,
        n_samples: int,
        length: int = 256,
        n_layers: int = 2,
        n_kv_heads: int = 2,
        head_dim: int = 16,
        sharpness: float = 3.0,
        seed: int = 0,
        query_seed: int = 1234,
    ):
        self.model = ModelIdentity("synthetic", f"synthetic-{query_seed}-{n_layers}x{n_kv_heads}x{head_dim}",
                                   n_layers, n_kv_heads, head_dim)
        self.n_samples, self.length, self.sharpness, self.seed = n_samples, length, sharpness, seed
        g = torch.Generator().manual_seed(query_seed)
        w = torch.randn(n_layers, n_kv_heads, head_dim, generator=g)
        self.directions = w / w.norm(dim=-1, keepdim=True)
        self.manifest_hash = f"synthetic-{seed}-{n_samples}x{length}"

    @property
    def lengths(self) -> list[int]:
        return [self.length] * self.n_samples

    def __len__(self) -> int:
        return self.n_samples

    def utility_of(self, keys: torch.Tensor) -> torch.Tensor:
        """The known function: keys (L, H, T, d) -> utility (L, H, T)."""
        return torch.softmax(self.sharpness * torch.einsum("lhtd,lhd->lht", keys.float(), self.directions), dim=-1)

    def read_layers(self, sample: int, layers: Sequence[int] | None = None) -> TraceSample:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sample)
        m = self.model
        shape = (m.n_layers, m.n_kv_heads, self.length, m.head_dim)
        keys = torch.randn(shape, generator=g).half()
        values = torch.randn(shape, generator=g).half()
        utility = self.utility_of(keys)
        chosen = list(range(m.n_layers)) if layers is None else list(layers)
        return TraceSample(keys[chosen], values[chosen], utility[chosen], torch.arange(self.length))


def write_synthetic_traces(directory: str | Path, source: SyntheticTraces) -> Path:
    """Store `source` as a trace directory (the real shard + manifest format of kvpolicy.traces.store), so the
    `kvp train` command can be exercised without recording from a model."""
    from kvpolicy.traces.store import FORMAT, TraceWriter, write_manifest

    config = {
        "format": FORMAT,
        "model": source.model.to_dict(),
        "source": "synthetic",
        "split": f"seed{source.seed}",
        "future": {"mode": "synthetic"},
        "seeds": {"seed": source.seed},
        "baselines": {"names": []},
    }
    writer = TraceWriter(directory, config)
    for i in range(len(source)):
        t = source.read_layers(i)
        record = {"id": f"synthetic-{source.seed}-{i}", "length": source.length, "seconds": 0.0, "model_seconds": 0.0,
                  "code_version": "synthetic"}
        writer.add(i, record, {"keys": t.keys, "values": t.values, "utility": t.utility})
    writer.close()
    write_manifest(directory, config, len(source))
    return Path(directory)
