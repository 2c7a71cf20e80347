"""What every section shares: a clock that waits for the device, and prompts cut from the Paul Graham essays."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.data.essays import haystack_text
from kvpolicy.errors import KVPError
from kvpolicy.models import ModelHandle
from kvpolicy.models.placement import synchronize
from kvpolicy.policy.protocol import RECENT, SINKS

T = TypeVar("T")
CHARS_PER_TOKEN = 6  # generous: English essays run at about 4.5 characters per token
CUT_SCORER = "knorm"  # cuts the cache where which entries are kept changes neither its bytes nor its speed


def timed(fn: Callable[[], T], device: torch.device, repeats: int = 1) -> tuple[T, float]:
    """(result of the last call, best wall time in seconds over `repeats` calls), the device's work included."""
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def best_in_turns(sides: dict[str, Callable[[], T]], device: torch.device, repeats: int,
                  progress) -> tuple[dict[str, T], dict[str, float]]:
    """(each side's result, its best wall time): one untimed warm-up of every side, then `repeats` timed calls of
    each, taken in turns so that a slower spell of the machine falls on all sides alike; `progress` (a bar) advances
    by one a call."""
    results = {side: run() for side, run in sides.items()}
    progress.update(len(sides))
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(repeats):
        for side, run in sides.items():
            best[side] = min(best[side], timed(run, device)[1])
            progress.update(1)
    return results, best


def essay_ids(handle: ModelHandle, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens (1, tokens) of the essays, the haystack every section's prompt is cut from."""
    ids = handle.encode(haystack_text()[: tokens * CHARS_PER_TOKEN])[:, :tokens]
    if ids.shape[1] < tokens:
        raise KVPError(f"the essays hold fewer than {tokens} tokens; use shorter --contexts")
    if tokens >= handle.info.max_positions:
        raise KVPError(f"a {tokens}-token prompt reaches {handle.info.name}'s {handle.info.max_positions} positions; "
                       "use shorter --contexts")
    return ids


def kept_budget(context: int, keep: float) -> Budget:
    """The budget keeping `keep` of a `context`-token cache (never fewer entries than the sinks and recent tokens)."""
    return Budget(tokens=max(SINKS + RECENT, round(keep * context)))
