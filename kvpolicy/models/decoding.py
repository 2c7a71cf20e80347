"""Decoding over any cache: the caller says how to feed tokens, this loop chooses them and decides when to stop.

A token is chosen greedily (temperature 0, the default) or drawn from softmax(logits / temperature) cut to its
nucleus, the smallest set of most likely tokens whose probability reaches top_p (Holtzman et al., 2020, "The
Curious Case of Neural Text Degeneration"). A row stops at a stop token, when its decoded text contains a stop
string, when the caller says it has answered (an evaluation whose score can no longer change), or after
max_new_tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvpolicy.errors import KVPError

def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy (argmax; top_p and seed are then unused), otherwise a
    draw from softmax(logits / temperature) restricted to the top_p nucleus (1 = every token).

    seed: every row of a batch draws from its own torch.Generator on the logits' device, seeded with `seed`, so a
    row's tokens do not depend on the rows batched with it (cuts of one prompt at several budgets see the same
    random numbers). None: each row's generator is seeded from the operating system, a different draw every run.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise KVPError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise KVPError(f"top_p must be in (0, 1] (1 = sample from every token), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise KVPError(f"seed must be a whole number >= 0 (or None for a fresh draw), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generators(self, rows: int, device: torch.device) -> list[torch.Generator]:
        """One generator per row on `device`, each seeded with `seed` (from the OS when None); none when greedy."""
        if self.greedy:
            return []
        generators = [torch.Generator(device=device) for _ in range(rows)]
        for generator in generators:
            if self.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.seed)
        return generators


GREEDY = Sampling()


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus of each row: True for the smallest set of most likely tokens whose total probability reaches
    top_p (ties go to the lower token id; the most likely token is always kept).

    probs: (..., vocab), rows summing to 1. Returns a bool mask (..., vocab).
    """
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    more_likely = ordered.cumsum(-1) - ordered  # total probability of the tokens ranked above each one
    return torch.zeros_like(ordered, dtype=torch.bool).scatter(-1, order, more_likely < top_p)


def top_p_mask_reference(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Slow reference for `top_p_mask`: per row, take tokens from most to least likely until their total
    reaches top_p."""
    flat = probs.reshape(-1, probs.shape[-1]).tolist()
    mask = torch.zeros(len(flat), probs.shape[-1], dtype=torch.bool)
    for row, row_probs in enumerate(flat):
        total = 0.0
        for token in sorted(range(len(row_probs)), key=lambda t: (-row_probs[t], t)):
            if total >= top_p:
                break
            mask[row, token] = True
            total += row_probs[token]
    return mask.reshape(probs.shape)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids (B,) drawn from unnormalized probabilities (B, vocab), one uniform in [0, 1) (B,) per row: the
    token whose slice of the cumulative distribution holds uniform · total (tokens of probability 0 never)."""
    cdf = probs.double().cumsum(-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def choose_tokens(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next tokens (B,) int64 from logits (B, vocab): the argmax when greedy, else a draw per row from the
    tempered nucleus, using row r's generator (`Sampling.generators`) for one uniform."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        probs = probs * top_p_mask(probs, sampling.top_p)
    uniforms = torch.cat([torch.rand(1, generator=g, device=logits.device, dtype=torch.float64) for g in generators])
    return inverse_cdf(probs, uniforms)


def check_stop_strings(stop_strings: Sequence[str]) -> tuple[str, ...]:
    """The stop strings as a tuple; an empty or non-string one is refused."""
    if isinstance(stop_strings, str):
        raise KVPError(f"give stop strings as a list of strings, not the single string {stop_strings!r}")
    for stop in stop_strings:
        if not isinstance(stop, str) or not stop:
            raise KVPError(f"a stop string must be non-empty text, got {stop!r}")
    return tuple(stop_strings)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string; all of it when none occurs."""
    found = [index for index in (text.find(stop) for stop in stop_strings) if index >= 0]
    return text[: min(found)] if found else text


def _contains_any(text: str, stop_strings: Sequence[str]) -> bool:
    return any(stop in text for stop in stop_strings)


@dataclass
class Decoded:
    """One row's answer: its tokens (a final stop token kept) and why it stopped: "stop_token", "stop_string",
    "answered" or "max_new_tokens"."""

    tokens: list[int]
    stop_reason: str


def decode_tokens(
    feed: Callable[[torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Collection[int],
    sampling: Sampling = GREEDY,
    stop_strings: Sequence[str] = (),
    text: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    answered: Callable[[int, list[int]], bool] | None = None,
    keep_rows: Callable[[list[int]], None] | None = None,
) -> list[Decoded]:
    """The answer of every row of a batch, from the next-token logits (B, vocab) of its last fed token.

    feed(tokens (B, 1) int64, on the logits' device) appends one token per row to the caller's cache and returns
    the next-token logits (B, vocab). Each row stops after its own stop token or the token whose addition makes
    its decoded text, text(tokens), contain a stop string (both kept in its tokens), once answered(row, tokens)
    says so (its tokens so far kept), or after max_new_tokens; decoding ends when every row has stopped. Every
    generated token except a final stop is fed, so the cache then holds the prompt and the whole answer. A row that
    stopped early keeps being fed (one forward serves all rows), so its cache rows then hold tokens past its answer.
    With keep_rows, rows that stopped are fed no more: before the next feed, keep_rows(kept) is called with the
    indices, among the rows of the previous feed, of those still decoding, the caller's cache drops the others, and
    feed then takes and returns those rows only (a batch whose rows stop at different lengths costs only what its
    decoding rows need). on_token(row, token) is called for every token kept.

    Sampled rows draw from their own generators (see `Sampling`): a row's tokens are those it gets decoded alone
    with the same `sampling`, up to the floating-point differences of batched forwards.
    """
    if logits.dim() != 2:
        raise KVPError(f"decoding needs next-token logits (batch, vocab), got {tuple(logits.shape)}")
    stop_strings = check_stop_strings(stop_strings)
    if stop_strings and text is None:
        raise KVPError("stop strings need a text(tokens) function to decode the answer with")
    rows = logits.shape[0]
    generators = sampling.generators(rows, logits.device)
    answers = [Decoded([], "max_new_tokens") for _ in range(rows)]
    done = [False] * rows
    fed = list(range(rows))  # the rows the logits are of: every row, or those still decoding with keep_rows
    for _ in range(max_new_tokens):
        step = choose_tokens(logits, sampling, [generators[row] for row in fed] if generators else generators)
        for row, token in zip(fed, step.tolist()):
            if done[row]:
                continue
            answer = answers[row]
            answer.tokens.append(token)
            if token in stop_ids:
                answer.stop_reason, done[row] = "stop_token", True
            elif stop_strings and _contains_any(text(answer.tokens), stop_strings):
                answer.stop_reason, done[row] = "stop_string", True
            elif answered is not None and answered(row, answer.tokens):
                answer.stop_reason, done[row] = "answered", True
            if on_token is not None:
                on_token(row, token)
        if all(done):
            break
        if keep_rows is not None and any(done[row] for row in fed):
            kept = [i for i, row in enumerate(fed) if not done[row]]
            keep_rows(kept)
            fed, step = [fed[i] for i in kept], step[kept]
        logits = feed(step.unsqueeze(1))
    return answers
