"""Scores of the query-based baselines (TOVA, SnapKV) on a trace's prompt, stored beside the trace.

Traces keep no queries, but the ranking-quality benchmark compares the learned policy against TOVA and SnapKV,
which look at the attention of the prompt's last rows (the question). Those rows' attention inputs are recorded
during the prefill anyway, so the scores cost one small window-attention per layer. The scoring itself is
kvpress's own `TOVAPress.score` / `SnapKVPress.score`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvpolicy.errors import KVPError
from kvpolicy.traces.utility import AttentionInputs

SNAPKV_WINDOW = 64  # kvpress default observation window
SNAPKV_KERNEL = 5
BASELINES = ("tova", "snapkv")


def baseline_window(prompt_length: int) -> int:
    """SnapKV observation window for a prompt: kvpress's 64 rows, fewer for very short prompts."""
    return max(1, min(SNAPKV_WINDOW, prompt_length - 2))


def rows_needed(names: Sequence[str], prompt_length: int) -> int:
    """How many of the prompt's last rows the prefill must record for these baselines (kvpress asserts that it
    gets strictly more rows than the window)."""
    return baseline_window(prompt_length) + 1 if names else 0


def _press(name: str, prompt_length: int):
    from kvpress import SnapKVPress, TOVAPress

    if name == "tova":
        return TOVAPress()
    if name == "snapkv":
        return SnapKVPress(window_size=baseline_window(prompt_length), kernel_size=SNAPKV_KERNEL)
    raise KVPError(f"unknown baseline '{name}'; known baselines: {', '.join(BASELINES)}")


def baseline_scores(
    names: Sequence[str],
    attention_modules: Sequence[torch.nn.Module],
    recorded: Sequence[AttentionInputs],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """{name: (L, H, T) fp32} scores, higher = keep, from the prompt's last rows.

    recorded: per layer, the attention inputs of the prompt's last `rows_needed(names, T)` rows;
    keys, values: per layer, the cache (1, H, T, d) right after the prompt's prefill.
    """
    scores: dict[str, torch.Tensor] = {}
    prompt_length = keys[0].shape[-2]
    for name in names:
        press = _press(name, prompt_length)
        per_layer = [
            press.score(attn, inp.hidden_states, k, v, None, {"position_embeddings": (inp.cos, inp.sin)})[0]
            for attn, inp, k, v in zip(attention_modules, recorded, keys, values)
        ]
        scores[name] = torch.stack(per_layer).float()
    return scores
