"""One trace from one real model run: prefill the prompt, obtain the future, feed it on top of the prompt cache
while recording the future rows' attention inputs, then keep the prompt's keys, values and future utility.

Futures: the model's own greedy continuation (the paper's choice; stops at end-of-turn, the stop token included)
or a reference continuation, teacher-forced. Either way the future tokens are fed as ONE chunk over the prompt
cache, so prompt + future is one causal pass with the full cache.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvpolicy.errors import KVPError
from kvpolicy.models.attention import ALL_QUERIES, record_attention_inputs
from kvpolicy.models.decoding import decode_tokens
from kvpolicy.models.handle import ModelHandle
from kvpolicy.models.placement import synchronize
from kvpolicy.traces.baselines import baseline_scores, rows_needed
from kvpolicy.traces.future import FutureConfig
from kvpolicy.traces.utility import future_utility


@dataclass
class Trace:
    """keys, values: (L, H, T, d) fp16 post-RoPE; utility: (L, H, T) fp32; baselines: {name: (L, H, T) fp32};
    states: (L, T, hidden) fp16, each layer's attention input (after its input norm) when recorded, else None."""

    keys: torch.Tensor
    values: torch.Tensor
    utility: torch.Tensor
    baselines: dict[str, torch.Tensor]
    future_ids: list[int]
    model_seconds: float  # time inside the model's own forward passes (prefill, decoding, future chunk)
    warnings: list[str] = field(default_factory=list)
    states: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class _Stopwatch:
    """Accumulates the time spent inside `with stopwatch:` blocks, the device's queued work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


def greedy_continuation(handle: ModelHandle, cache: DynamicCache, logits: torch.Tensor, max_tokens: int) -> list[int]:
    """Greedy tokens from `logits` (1, vocab) of the last prompt token, decoding on `cache`; stops after an
    end-of-turn token (kept) or `max_tokens` tokens. The cache grows by every token but a final end-of-turn one."""

    def feed(step: torch.Tensor) -> torch.Tensor:
        return handle.model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]

    return decode_tokens(feed, logits, max_tokens, handle.eos_token_ids)[0].tokens


def record_trace(
    handle: ModelHandle,
    prompt_ids: torch.Tensor,
    future: FutureConfig,
    reference_ids: torch.Tensor | None = None,
    baselines: Sequence[str] = (),
    hidden_states: bool = False,
    kept: int | None = None,
) -> Trace:
    """Run the model over prompt_ids (1, T) and its future; return the prompt's trace (with hidden_states, also
    every layer's attention input for each prompt token).

    kept: the prompt tokens the trace's cache holds (default all, `FutureConfig.kept_tokens`); with fewer, the
    future is the rest of the prompt, then the continuation of the whole prompt, and the query-based baselines and
    hidden states are those of a prefill of the kept tokens alone (what a chunked prefill's cut sees).
    A prompt that leaves no room for a single future token within the model's maximum positions is refused
    (KVPError); a future that does not fit is truncated with a warning saying so.
    """
    model, info = handle.model, handle.info
    n_prompt = prompt_ids.shape[1]
    room = info.max_positions - n_prompt
    if room < 1 or n_prompt < 3:
        raise KVPError(
            f"refused: prompt of {n_prompt} tokens; {info.name} takes 3 to {info.max_positions - 1} prompt tokens "
            "(plus at least one future token); use a shorter --context"
        )
    if future.mode == "reference" and (reference_ids is None or reference_ids.numel() == 0):
        raise KVPError("future mode 'reference' needs a reference continuation; this source has none, use greedy")
    notes: list[str] = []
    max_future = future.max_tokens
    if max_future > room:
        notes.append(f"future truncated from {max_future} to {room} tokens: the prompt has {n_prompt} of "
                     f"{info.max_positions} positions")
        max_future = room
    evicted = info.evicted_layers  # a hybrid model's sliding layers are never evicted: nothing to learn there
    attn = [handle.layers[i].self_attn for i in evicted]
    device = model.device
    kept = n_prompt if kept is None else kept
    if not 1 <= kept <= n_prompt:
        raise KVPError(f"a trace keeps 1 to {n_prompt} of this prompt's tokens, got {kept}")
    prompt_ids = prompt_ids.to(device)
    stopwatch = _Stopwatch(device)
    cache = DynamicCache()  # every layer whole (a sliding one too): the masks follow from true positions
    with torch.inference_mode():
        rows = ALL_QUERIES if hidden_states else max(1, rows_needed(baselines, kept))

        def prefill(part: torch.Tensor, last: bool) -> torch.Tensor | None:
            """Feed part (1, t) of the prompt; the next-token logits (1, vocab) after the last part of a greedy run."""
            if future.mode == "greedy" and last:
                return model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            model.model(input_ids=part, past_key_values=cache, use_cache=True)
            return None

        with stopwatch, record_attention_inputs(handle.layers, rows) as recorded:
            logits = prefill(prompt_ids[:, :kept], kept == n_prompt)
        recorded = [recorded[i] for i in evicted]
        layer_caches = [cache.layers[i] for i in evicted]
        scores = baseline_scores(baselines, attn, recorded, [c.keys for c in layer_caches])
        states = torch.stack([r.hidden_states[0] for r in recorded]).half().cpu() if hidden_states else None
        del recorded
        if kept < n_prompt:  # mid-prompt: the rest of the prompt, for the continuation of the whole of it
            with stopwatch:
                logits = prefill(prompt_ids[:, kept:], True)
        if future.mode == "greedy":
            with stopwatch:
                continuation = greedy_continuation(handle, cache, logits, max_future)
        else:
            continuation = reference_ids[0, :max_future].tolist()  # the first F tokens of the reference
        cache.crop(kept)
        future_ids = prompt_ids[0, kept:].tolist() + continuation
        keys = torch.stack([c.keys[0, :, :kept].half() for c in layer_caches]).cpu()
        values = torch.stack([c.values[0, :, :kept].half() for c in layer_caches]).cpu()
        with stopwatch, record_attention_inputs(handle.layers, len(future_ids)) as recorded:
            model.model(input_ids=torch.tensor([future_ids], device=device), past_key_values=cache, use_cache=True)
        utility = future_utility(attn, [recorded[i] for i in evicted], [c.keys for c in layer_caches], kept).cpu()
    for note in notes:
        warnings.warn(note, stacklevel=2)
    scores = {name: s.cpu() for name, s in scores.items()}
    return Trace(keys, values, utility, scores, future_ids, stopwatch.seconds, notes, states)
