"""Section h: transformers' own `model.generate` on an `EvictingCache`, against kvpolicy's engine, and batched.

1. One prompt of the first context, the same budget and scorer (the bundled KVP policy), greedy up to the same number
   of tokens: the engine's `generate` against `model.generate(past_key_values=EvictingCache(...))`, each timed end to
   end from token ids (best of the repeats, after one untimed warm-up each, taken in turns), with whether the two
   answers are the same tokens. Goal: the cache within 10% of the engine.
2. A batch of `rows` left-padded prompts (the first context, each a few tokens shorter than the one before, so that
   padding is real) through one `model.generate`, against the same prompts one at a time: decoding throughput
   (tokens per second from each run's first new token to its last, read off a clock generate calls at every step,
   so that the prefill, whose padded batch costs more and varies more, stays out of it; best of the repeats), with
   whether every row answered as it does alone. Goal: the batch at least 2x the single runs' throughput.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import generate
from kvpolicy.compression.evicting_cache import EvictingCache
from kvpolicy.compression.prompts import split_prompt
from kvpolicy.compression.scorers import Scorer
from kvpolicy.evaluation.bench.timing import best_in_turns, essay_ids, timed
from kvpolicy.models import ModelHandle
from kvpolicy.progress import bar

QUESTION = " What is the main point of this text?"
STAGGER = 16  # tokens each batch row is shorter than the one before


class StepClock:
    """A streamer for `model.generate` that only notes when each step's tokens arrive (the prompt's first)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def decoding_s(self) -> float:
        """Seconds from the first new token to the last: the decoding steps alone."""
        return self.times[-1] - self.times[1]


def _hf(handle: ModelHandle, ids: torch.Tensor, scorer: Scorer, budget: Budget, tokens: int,
        mask: torch.Tensor | None = None, clock: StepClock | None = None) -> list[list[int]]:
    """Greedy answers of every row of ids (B, T) through model.generate on an EvictingCache: up to `tokens` for one
    unpadded prompt (stopping as the engine does), exactly `tokens` each for a batch (mask: its padding)."""
    device = handle.model.device
    padded = mask is not None and bool((mask == 0).any())
    cache = EvictingCache(scorer, budget, padding_mask=mask if padded else None)
    mask = torch.ones_like(ids) if mask is None else mask
    out = handle.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                                do_sample=False, max_new_tokens=tokens, pad_token_id=handle.tokenizer.eos_token_id,
                                eos_token_id=list(handle.eos_token_ids),
                                min_new_tokens=tokens if len(ids) > 1 or padded else None, streamer=clock)
    return out[:, ids.shape[1]:].tolist()


def _left_padded(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, longest): the rows (T_i,) padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad, dtype=r.dtype), r]) for r in rows])
    mask = torch.stack([(torch.arange(width) >= width - len(r)).long() for r in rows])
    return ids, mask


def measure_generate_path(handle: ModelHandle, kvp: Scorer, context_tokens: int, budget: Budget, answer_tokens: int,
                          rows: int, repeats: int) -> dict:
    """The figures of both comparisons (module docstring)."""
    device = handle.model.device
    context = handle.decode(essay_ids(handle, context_tokens)[0])
    prompt = torch.cat(split_prompt(handle, context, QUESTION, ""), dim=1)  # as the engine renders it
    batch = [prompt[0, i * STAGGER:] for i in range(rows)]
    ids, mask = _left_padded(batch, handle.tokenizer.eos_token_id)
    with bar(desc="h) generate", total=2 * (repeats + 1) + 2 + (rows + 1) * repeats, unit="run") as progress:
        sides = {"engine": lambda: generate(handle, context, QUESTION, kvp, budget, max_new_tokens=answer_tokens)
                 .token_ids,
                 "evicting_cache": lambda: _hf(handle, prompt, kvp, budget, answer_tokens)[0]}
        answers, best = best_in_turns(sides, device, repeats, progress)
        ones = [torch.ones(1, len(r), dtype=torch.long) for r in batch]  # a mask: exactly the tokens asked for
        single_answers = [_hf(handle, r[None], kvp, budget, answer_tokens, one)[0] for r, one in zip(batch, ones)]
        batched_answers = _hf(handle, ids, kvp, budget, answer_tokens, mask)
        progress.update(2)
        totals, decoding = {}, {}
        for name, runs in {"single": [(r[None], one) for r, one in zip(batch, ones)], "batched": [(ids, mask)]}.items():
            totals[name] = decoding[name] = 0.0
            for run in runs:
                best_total = best_decoding = float("inf")
                for _ in range(repeats):
                    clock = StepClock()
                    answer = partial(_hf, handle, run[0], kvp, budget, answer_tokens, run[1], clock)
                    best_total = min(best_total, timed(answer, device)[1])
                    best_decoding = min(best_decoding, clock.decoding_s)
                    progress.update(1)
                totals[name] += best_total
                decoding[name] += best_decoding
    decoded = rows * (answer_tokens - 1)
    throughput = {name: decoded / decoding[name] for name in decoding}
    return {
        "context_tokens": context_tokens, "budget": budget.label, "answer_tokens": answer_tokens, "rows": rows,
        "question": QUESTION,
        "one_prompt": {"engine_s": best["engine"], "evicting_cache_s": best["evicting_cache"],
                       "ratio": best["evicting_cache"] / best["engine"],
                       "same_answer": answers["engine"] == answers["evicting_cache"]},
        "batch": {"prompt_tokens": [len(r) for r in batch],
                  "single_s": totals["single"], "batched_s": totals["batched"],
                  "single_decoding_s": decoding["single"], "batched_decoding_s": decoding["batched"],
                  "single_decode_tokens_per_s": throughput["single"],
                  "batched_decode_tokens_per_s": throughput["batched"],
                  "speedup": throughput["batched"] / throughput["single"],
                  "rows_as_alone": batched_answers == single_answers},
    }


def print_generate_path(fig: dict) -> None:
    one, batch = fig["one_prompt"], fig["batch"]
    print(f"   {fig['context_tokens']}-token essay prompt + question, bundled-policy scorer, budget {fig['budget']}, "
          f"greedy, {fig['answer_tokens']} tokens; best of the repeats")
    same = "yes" if one["same_answer"] else "NO"
    print(f"   one prompt: engine {one['engine_s']:.3f} s, model.generate + EvictingCache "
          f"{one['evicting_cache_s']:.3f} s, ratio {one['ratio']:.3f} (goal <= 1.10); same answer: {same}")
    alone = "yes" if batch["rows_as_alone"] else "NO"
    print(f"   {fig['rows']} left-padded prompts of {batch['prompt_tokens']} tokens: one batch "
          f"{batch['batched_s']:.3f} s vs one at a time {batch['single_s']:.3f} s")
    print(f"   decoding {batch['batched_decode_tokens_per_s']:.1f} vs {batch['single_decode_tokens_per_s']:.1f} "
          f"tokens/s = {batch['speedup']:.2f}x (goal >= 2); every row as alone: {alone}")
