"""KVzap: a small model per layer predicts each cached entry's log KVzip+ score from the hidden state that entered
the layer's attention with it, instead of reconstructing the text as KVzip does (arXiv 2601.07891).

The scores are kvpress's own: its `KVzapPress.score` applies layer l's model (a linear map, or a GELU MLP) to the
hidden states (B, T, hidden) and returns (B, kv_heads, T). Only the weights come from kvpolicy rather than nvidia's
hub repositories: `kvp train-kvzap` fits them on kvpolicy's own training prompts, and those of the models shipped
with kvpolicy come in the package (kvpolicy.policy.kvzap). Each entry needs its own hidden state, so the scorer
ranks a cache right after the one prefill that fed it (every token's attention inputs recorded), never while
decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kvpress import KVzapPress

from kvpolicy.compression.allocation import KEEP, Threshold
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.scorers.base import ALL_QUERIES, LayerView
from kvpolicy.compression.scorers.kvpress_backed import KVPressScorer
from kvpolicy.models import ModelInfo
from kvpolicy.policy.kvzap import kvzap_directory, kvzap_thresholds, kvzap_weights, load_kvzap


@dataclass
class KVzapDirectoryPress(KVzapPress):
    """kvpress's KVzapPress with its KVzapModel read from a KVzap directory instead of the hub: `weights` (a `kvp
    train-kvzap` output, or its linear/ or mlp/), else the weights shipped for the model it is applied to."""

    weights: str = ""

    def post_init_from_model(self, model) -> None:
        from kvpolicy.models.loader import identify

        self.load_for(identify(model))

    def load_for(self, info: ModelInfo) -> Path:
        """Load the weights for the model `info` (once per model), refusing weights trained for another one; returns
        their directory."""
        directory = kvzap_directory(info.name, self.model_type, self.weights)
        loaded = f"{directory}@{info.fingerprint}"
        if loaded != self.kvzap_model_name:
            self.kvzap_model = load_kvzap(directory, info, self.model_type)
            self.kvzap_model_name = loaded
        return directory


@dataclass
class KVzapScorer(KVPressScorer):
    """KVzap's predicted log KVzip+ scores (B, H, T) of a cache whose every entry's attention input was recorded.
    weights: a `kvp train-kvzap` output directory; empty: the weights shipped for the model."""

    name = "kvzap"
    model_type = ""  # kvpress's KVzapPress model_type: linear or mlp
    query_window = ALL_QUERIES
    whole_prefill = True
    weights: str = ""

    def make_press(self) -> KVzapDirectoryPress:
        return KVzapDirectoryPress(model_type=self.model_type, weights=self.weights)

    def check_model(self, info: ModelInfo) -> None:
        self._press.load_for(info)

    def identity(self) -> dict[str, Any]:
        """Name and settings, and per model the weights' sha256 and fit seed, so that results of other weights
        (another seed, retrained shipped weights) are never taken for these ones'."""
        return {**super().identity(), "trained": kvzap_weights(self.model_type, self.weights)}

    def score(self, view: LayerView) -> torch.Tensor:
        view.entry_states(self.name, "use another scorer")  # refused unless every entry's is there
        return super().score(view)


@dataclass
class KVzapLinearScorer(KVzapScorer):
    """KVzap with a linear map per layer (ridge regression)."""

    name = "kvzap_linear"
    model_type = "linear"


@dataclass
class KVzapMLPScorer(KVzapScorer):
    """KVzap with a two-layer GELU MLP per layer."""

    name = "kvzap_mlp"
    model_type = "mlp"


@dataclass
class KVzapThresholdScorer(KVzapScorer):
    """KVzap's thresholded form, as its paper runs it (kvpress DMSPress around KVzapPress): the newest `window`
    entries are kept, and every other entry whose predicted score reaches one threshold, the same in every layer and
    head. A budget picks the threshold calibrated on the training prompts (`kvp train-kvzap` stores the quantiles):
    heads and layers keep what the text gives them, the budget on average."""

    # the calibration of the weights loaded (check_model); before that, the window alone
    _allocation: Threshold = field(default=Threshold(), init=False, repr=False, compare=False)

    def check_model(self, info: ModelInfo) -> None:
        window, quantiles = kvzap_thresholds(self._press.load_for(info))
        self._allocation = Threshold(quantiles=quantiles, window=window)

    @property
    def allocation(self) -> Threshold:
        return self._allocation

    def check_budgets(self, budgets: list[Budget]) -> None:
        small = [b.tokens for b in budgets if b.tokens is not None and b.tokens < self.allocation.window]
        if small:
            raise self.allocation.too_small(min(small))

    def score(self, view: LayerView) -> torch.Tensor:
        scores = super().score(view)
        newest = view.positions >= view.positions.amax(-1, keepdim=True) - self.allocation.window + 1
        return scores.masked_fill(newest, KEEP)


@dataclass
class KVzapLinearThresholdScorer(KVzapThresholdScorer):
    """KVzap's linear model, thresholded."""

    name = "kvzap_linear_threshold"
    model_type = "linear"


@dataclass
class KVzapMLPThresholdScorer(KVzapThresholdScorer):
    """KVzap's MLP, thresholded."""

    name = "kvzap_mlp_threshold"
    model_type = "mlp"
