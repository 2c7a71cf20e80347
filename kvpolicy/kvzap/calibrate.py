"""The threshold of KVzap's thresholded form, calibrated on the training prompts.

The KVzap paper runs its models as kvpress's DMSPress does: an entry outside the last `window` tokens (128) is
evicted when its predicted score falls below one threshold, the same for every layer and head, so the fraction kept
depends on the text. kvpolicy compares methods at budgets, so it stores the distribution of the predicted scores of
the training prompts' entries outside that window (every layer and KV head pooled): the threshold that keeps a
fraction q of those entries on average is its (1 - q)-quantile (`compression/allocation.py`, `Threshold`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from kvpolicy.compression.allocation import DMS_WINDOW
from kvpolicy.kvzap.collect import prompt_file
from kvpolicy.kvzap.fit import CHUNK

LEVELS = 1001  # quantiles at 0, 0.001, ..., 1


def outside_window(directory: Path, n: int, window: int = DMS_WINDOW) -> torch.Tensor:
    """(N,) bool over the sampled tokens of prompts 0..n-1 in `directory` (the rows of `load_split`): True where the
    token lies before its prompt's last `window` positions."""
    masks = []
    for index in range(n):
        with safe_open(str(prompt_file(directory, index)), framework="pt") as f:
            length = int(f.metadata()["tokens"])
            masks.append(f.get_tensor("positions") < length - window)
    return torch.cat(masks)


def score_quantiles(model: torch.nn.Module, X: torch.Tensor, rows: torch.Tensor) -> list[float]:
    """LEVELS quantiles of `model`'s predicted scores of X[rows] (X: (N, L, d)), every layer and head pooled."""
    with torch.no_grad():
        pred = torch.cat([model(xs.float()) for xs in X[rows].split(CHUNK)])
    levels = torch.linspace(0, 1, LEVELS, dtype=torch.float64)
    flat = pred.flatten().double()
    if flat.numel() > 2 ** 24:  # torch.quantile's input limit: an evenly spaced subsample
        flat = flat.sort().values[torch.linspace(0, flat.numel() - 1, 2 ** 24).long()]
    return [round(float(v), 6) for v in flat.quantile(levels)]
