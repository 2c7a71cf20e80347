"""Baselines whose scoring rule kvpress implements: we call its `ScorerPress.score()` on one layer.

Each class only says which kvpress press (with which settings) it runs; `KVPressScorer.score` feeds it a
`LayerView`. Attention-based ones (TOVA, SnapKV, ExpectedAttention) recompute their queries from the recorded
hidden states of the last tokens, exactly as kvpress does inside its forward hook.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Iterator

import torch
from kvpress import (
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    LagKVPress,
    RandomPress,
    ScorerPress,
    SnapKVPress,
    TOVAPress,
)

from kvpolicy.compression.scorers.base import ALL_QUERIES, LayerView, Scorer
from kvpolicy.errors import KVPError
from kvpolicy.models.baseline_defaults import SNAPKV_FIT_WINDOW, SNAPKV_KERNEL, SNAPKV_WINDOW, TOVA_WINDOW


@dataclass
class KVPressScorer(Scorer):
    """Adapter: score a layer with a kvpress ScorerPress. Subclasses implement `make_press`."""

    def __post_init__(self):
        self._press = self.make_press()

    def make_press(self) -> ScorerPress:
        raise NotImplementedError

    def score(self, view: LayerView) -> torch.Tensor:
        kwargs = {"position_embeddings": view.position_embeddings}
        return self._press.score(view.module, view.hidden_states, view.keys, view.values, None, kwargs)


@dataclass
class RandomScorer(KVPressScorer):
    """Uniform random scores (kvpress RandomPress); the same seed draws the same scores for every layer."""

    name = "random"
    seed: int = 0

    def make_press(self) -> ScorerPress:
        return RandomPress(seed=self.seed)


@dataclass
class KnormScorer(KVPressScorer):
    """Keep keys of low L2 norm (Devoto et al. 2024, arXiv 2406.11430)."""

    name = "knorm"

    def make_press(self) -> ScorerPress:
        return KnormPress()


@dataclass
class KeyDiffScorer(KVPressScorer):
    """Keep keys least similar (cosine) to the mean normalised key (KeyDiff, arXiv 2504.15364)."""

    name = "keydiff"

    def make_press(self) -> ScorerPress:
        return KeyDiffPress()


@dataclass
class LagKVScorer(KVPressScorer):
    """Score each lag_size partition by its keys'/values' spread relative to the next partition (LagKV,
    arXiv 2504.04704)."""

    name = "lagkv"
    n_sink: int = 4
    lag_size: int = 128

    def make_press(self) -> ScorerPress:
        return LagKVPress(n_sink=self.n_sink, lag_size=self.lag_size)


@dataclass
class TOVAScorer(KVPressScorer):
    """Attention of the last token, averaged over all query heads (TOVA, arXiv 2401.06104)."""

    name = "tova"
    query_window = TOVA_WINDOW

    def make_press(self) -> ScorerPress:
        return TOVAPress()

    def score(self, view: LayerView) -> torch.Tensor:
        if view.keys.shape[2] == 1:  # only the last token, whose attention TOVA reads: nothing to rank it against
            return torch.ones(view.keys.shape[:3], device=view.keys.device)
        return super().score(view)


@dataclass
class SnapKVScorer(KVPressScorer):
    """Pooled attention of the last window_size queries, averaged per GQA group (SnapKV, arXiv 2404.14469)."""

    name = "snapkv"
    window_size: int = SNAPKV_WINDOW
    kernel_size: int = SNAPKV_KERNEL

    @property
    def query_window(self) -> int:
        return self.window_size + 1  # kvpress asserts it sees more rows than its window

    def make_press(self) -> ScorerPress:
        return SnapKVPress(window_size=self.window_size, kernel_size=self.kernel_size)


@dataclass
class SnapKVFitScorer(SnapKVScorer):
    """SnapKV with an observation window that fits small budgets (kvpress keeps the whole window: its default 64
    rows alone fill a budget of 64 entries per head)."""

    name = "snapkv_w16"
    window_size: int = SNAPKV_FIT_WINDOW


class _FuturePositionsPress(ExpectedAttentionPress):
    """kvpress ExpectedAttentionPress whose future positions start at the true next position (after eviction
    or a multi-turn chunk that is not the chunk length)."""

    future_start: int | None = None

    def apply_avg_rope(self, module, mu, cov, q_len):
        return super().apply_avg_rope(module, mu, cov, self.future_start if self.future_start is not None else q_len)


@contextlib.contextmanager
def rotary_attached(module: torch.nn.Module, rotary_emb: torch.nn.Module | None) -> Iterator[None]:
    """Give `module` the `rotary_emb` attribute kvpress expects (kvpress sets it inside its press context)."""
    if hasattr(module, "rotary_emb") or rotary_emb is None:
        yield
        return
    module.rotary_emb = rotary_emb
    try:
        yield
    finally:
        del module.rotary_emb


@dataclass
class ExpectedAttentionScorer(KVPressScorer):
    """Expected attention of future queries modelled as a Gaussian fitted to the chunk's queries, times the
    value norm (kvpress ExpectedAttentionPress, arXiv 2510.00636)."""

    name = "expected_attention"
    query_window = ALL_QUERIES
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def make_press(self) -> ScorerPress:
        return _FuturePositionsPress(
            n_future_positions=self.n_future_positions,
            n_sink=self.n_sink,
            use_covariance=self.use_covariance,
            use_vnorm=self.use_vnorm,
            epsilon=self.epsilon,
        )

    def score(self, view: LayerView) -> torch.Tensor:
        cached, fed = view.keys.shape[2], view.hidden_states.shape[1]
        if min(cached, fed) <= self.n_sink:  # kvpress leaves the first n_sink out of both; none would be left
            raise KVPError(
                f"scorer '{self.name}' leaves the first {self.n_sink} tokens out as attention sinks and fits the "
                f"queries of the others, but the chunk prefilled before compression has {fed} tokens (cache: "
                f"{cached}); give more than {self.n_sink}, or use another scorer (e.g. h2o, tova, knorm)"
            )
        self._press.future_start = int(view.positions.max()) + 1
        with rotary_attached(view.module, view.rotary_emb):
            return super().score(view)
