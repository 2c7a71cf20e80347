"""Greedy decoding over any cache: the caller says how to feed tokens, this loop picks them and decides when to stop."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from kvpolicy.errors import KVPError


def greedy_tokens(
    feed: Callable[[torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    max_tokens: int,
    stop_ids: Collection[int],
) -> list[list[int]]:
    """Greedy tokens for every row of a batch, from the next-token logits (B, vocab) of its last fed token.

    feed(tokens (B, 1) int64, on the logits' device) appends one token per row to the caller's cache and returns
    the next-token logits (B, vocab). Each row stops after its own stop token (kept in its tokens) or max_tokens;
    decoding ends when every row has stopped. Every generated token except a final stop token is fed, so the
    cache then holds the prompt and the whole answer. A row that stopped early keeps being fed (one forward
    serves all rows), so its cache rows then hold tokens past its answer.
    """
    if logits.dim() != 2:
        raise KVPError(f"greedy decoding needs next-token logits (batch, vocab), got {tuple(logits.shape)}")
    rows = logits.shape[0]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(max_tokens):
        step = logits.argmax(-1)
        for row, token in enumerate(step.tolist()):
            if not done[row]:
                tokens[row].append(token)
                done[row] = token in stop_ids
        if all(done):
            break
        logits = feed(step.unsqueeze(1))
    return tokens
