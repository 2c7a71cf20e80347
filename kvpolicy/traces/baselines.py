"""Scores of the query-based baselines TOVA and SnapKV on a trace's prompt, stored beside the trace.

Traces keep no queries, but the ranking-quality benchmark compares the learned policy against TOVA and SnapKV,
which see the attention of the prompt's last rows (the question). Those rows' attention inputs are recorded during
the prefill, so every score comes from ONE causal window attention (the widest window's rows, 64; fp32) batched
over all layers; a narrower window reads its last rows. The definitions and settings follow kvpress exactly (the
windows and the pool width come from models/baseline_defaults.py, which compression's TOVA and SnapKV scorers use
too); `baseline_scores_reference` calls kvpress's own `TOVAPress.score` / `SnapKVPress.score` layer by layer and
the tests compare the two.

TOVA (https://arxiv.org/abs/2401.06104): attention of the last prompt row, averaged over all query heads.
SnapKV (https://arxiv.org/abs/2404.14469): attention of the last W rows averaged over rows, smoothed by a
width-5 average pool, averaged over the KV head's query group; `snapkv` with kvpress's W = 64, `snapkv_w16` with
W = 16. Both give the observation window (TOVA: the last token) the score max + 1, as kvpress does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kvpolicy.errors import KVPError
from kvpolicy.traces.config import BASELINES
from kvpolicy.models.attention import AttentionInputs, causal_window_attention, recorded_queries
from kvpolicy.models.baseline_defaults import SNAPKV_FIT_WINDOW, SNAPKV_KERNEL, SNAPKV_WINDOW, TOVA_WINDOW


WINDOWS = {"tova": TOVA_WINDOW, "snapkv": SNAPKV_WINDOW, "snapkv_w16": SNAPKV_FIT_WINDOW}  # rows each one reads


def baseline_window(name: str, prompt_length: int) -> int:
    """The observation window of a baseline on a prompt: its rows (WINDOWS), fewer for very short prompts."""
    return max(1, min(WINDOWS[name], prompt_length - 2))


def rows_needed(names: Sequence[str], prompt_length: int) -> int:
    """How many of the prompt's last rows the prefill must record for these baselines (kvpress asserts that it
    gets strictly more rows than the window)."""
    return max((baseline_window(name, prompt_length) + 1 for name in names), default=0)


def _check(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise KVPError(f"unknown baselines {unknown}; known baselines: {', '.join(BASELINES)}")


def _pad_window(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Append `width` columns holding each layer's max + 1 (the window is never evicted)."""
    top = scores.flatten(1).amax(dim=1)[:, None, None] + 1
    return torch.cat([scores, top.expand(*scores.shape[:2], width)], dim=-1)


def tova_from_attention(probs: torch.Tensor, n_kv: int) -> torch.Tensor:
    """probs (L, Hq, W, T) -> (L, H, T): the last row's attention, mean over all query heads."""
    last = probs[:, :, -1, :-1].mean(dim=1, keepdim=True).expand(-1, n_kv, -1)
    return _pad_window(last, 1)


def snapkv_from_attention(probs: torch.Tensor, n_kv: int, kernel: int = SNAPKV_KERNEL) -> torch.Tensor:
    """probs (L, Hq, W, T) -> (L, H, T): window rows' mean attention to the keys before the window, pooled,
    averaged over each KV head's query group."""
    n_layers, n_q, window, length = probs.shape
    scores = probs[..., : length - window].mean(dim=-2)
    scores = F.avg_pool1d(scores, kernel_size=kernel, padding=kernel // 2, stride=1)
    scores = scores.view(n_layers, n_kv, n_q // n_kv, length - window).mean(dim=2)
    return _pad_window(scores, window)


def baseline_scores(
    names: Sequence[str],
    attention_modules: Sequence[torch.nn.Module],
    recorded: Sequence[AttentionInputs],
    keys: Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """{name: (L, H, T) fp32} scores, higher = keep.

    recorded: per layer, the attention inputs of (at least) the prompt's last `rows_needed(names, T)` rows;
    keys: per layer, the cache keys (1, H, T, d) right after the prompt's prefill.
    """
    _check(names)
    if not names:
        return {}
    length, n_kv = keys[0].shape[-2], keys[0].shape[1]
    window = max(baseline_window(name, length) for name in names)
    queries = recorded_queries(attention_modules, recorded, rows=window)  # (L, Hq, W, d)
    probs = causal_window_attention(queries.float(), torch.cat(list(keys)).float(), attention_modules[0].scaling)
    scores = {}
    for name in names:
        rows = probs[:, :, probs.shape[2] - baseline_window(name, length):]  # the baseline's own last rows
        scores[name] = tova_from_attention(rows, n_kv) if name == "tova" else snapkv_from_attention(rows, n_kv)
    return scores


def baseline_scores_reference(
    names: Sequence[str],
    attention_modules: Sequence[torch.nn.Module],
    recorded: Sequence[AttentionInputs],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The same scores from kvpress's own presses, one layer at a time (slow; for tests)."""
    from kvpress import SnapKVPress, TOVAPress

    _check(names)
    length = keys[0].shape[-2]
    presses = {name: TOVAPress() if name == "tova" else
               SnapKVPress(window_size=baseline_window(name, length), kernel_size=SNAPKV_KERNEL) for name in names}
    scores = {}
    for name in names:
        per_layer = [
            presses[name].score(a, r.hidden_states, k, v, None, {"position_embeddings": r.position_embeddings})[0]
            for a, r, k, v in zip(attention_modules, recorded, keys, values)
        ]
        scores[name] = torch.stack(per_layer).float()
    return scores
