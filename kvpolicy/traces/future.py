"""What follows a training prompt: the model's own greedy continuation or the data's reference continuation."""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvpolicy.errors import KVPError

FUTURE_MODES = ("greedy", "reference")
END, MID_PROMPT = "end", "mid-prompt"
CUTS_AT = (END, MID_PROMPT)
MID_PROMPT_CUTS = (0.25, 0.75)  # the fractions of the prompt a mid-prompt cut falls between, uniformly


@dataclass(frozen=True)
class FutureConfig:
    """`mode` greedy (the paper's choice: stops after an end-of-turn token, which is kept) or reference
    (teacher-forced, the reference turn up to its end-of-turn token); at most `max_tokens` tokens.

    cut_at: where the trace's cache ends. "end": the whole prompt, the future is the continuation (the paper's,
    for a cache cut once after the prefill). "mid-prompt": the first part of the prompt only, cut at a fraction of
    it drawn per sample from MID_PROMPT_CUTS; the future is the rest of the prompt, fed as it is, then the
    continuation of the whole prompt: what a cache cut between the chunks of a chunked prefill must serve."""

    mode: str = "greedy"
    max_tokens: int = 300
    cut_at: str = END

    def __post_init__(self):
        if self.mode not in FUTURE_MODES:
            raise KVPError(f"unknown future mode '{self.mode}'; use one of: {', '.join(FUTURE_MODES)}")
        if self.max_tokens < 1:
            raise KVPError(f"future length must be at least 1 token, got {self.max_tokens}")
        if self.cut_at not in CUTS_AT:
            raise KVPError(f"a trace cuts the prompt at one of: {', '.join(CUTS_AT)}; got '{self.cut_at}'")

    def kept_tokens(self, prompt_tokens: int, seed: int, index: int) -> int:
        """The prompt tokens a trace of sample `index` keeps: all of them, or (mid-prompt) a cut drawn from the run
        seed and the sample index alone, so a resumed or split run draws the same one."""
        if self.cut_at == END:
            return prompt_tokens
        low, high = MID_PROMPT_CUTS
        fraction = low + (high - low) * random.Random(f"mid-prompt:{seed}:{index}").random()
        return max(1, min(prompt_tokens - 1, round(fraction * prompt_tokens)))

    def describe(self) -> dict:
        """The manifest's description of the futures."""
        description = {"mode": self.mode, "max_tokens": self.max_tokens, "stop": "end-of-turn token, included"}
        if self.cut_at == MID_PROMPT:
            low, high = MID_PROMPT_CUTS
            description |= {"cut_at": MID_PROMPT,
                            "cut": f"the cache keeps the first {low:g} to {high:g} of the prompt (uniform, per "
                                   "sample); the future is the rest of the prompt, then the continuation"}
        return description
