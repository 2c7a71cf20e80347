"""What follows a training prompt: the model's own greedy continuation or the data's reference continuation."""

from __future__ import annotations

from dataclasses import dataclass

from kvpolicy.errors import KVPError

FUTURE_MODES = ("greedy", "reference")


@dataclass(frozen=True)
class FutureConfig:
    """`mode` greedy (the paper's choice: stops after an end-of-turn token, which is kept) or reference
    (teacher-forced, the reference turn up to its end-of-turn token); at most `max_tokens` tokens."""

    mode: str = "greedy"
    max_tokens: int = 300

    def __post_init__(self):
        if self.mode not in FUTURE_MODES:
            raise KVPError(f"unknown future mode '{self.mode}'; use one of: {', '.join(FUTURE_MODES)}")
        if self.max_tokens < 1:
            raise KVPError(f"future length must be at least 1 token, got {self.max_tokens}")
