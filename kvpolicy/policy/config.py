"""The light half of the policy stage: the always-kept positions, the network's shape and its choices. Plain
values only (no torch), so `kvp --help` can show the defaults without importing the network."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvpolicy.errors import KVPError

SINKS = 4  # first positions always kept
RECENT = 16  # last positions always kept
POSITION_ENCODINGS = ("absolute", "relative", "both")
KVZAP_KINDS = ("linear", "mlp")  # the KVzap models (kvpress's KVzapPress model_type), policy/kvzap.py


@dataclass
class PolicyConfig:
    """Shape of the agents' network.

    hidden: width of every hidden layer (paper: 256). Default 32, the knee of widths 16 / 32 / 64: validation
        cost 1.207 / 1.204 / 1.200, 0.30M / 0.74M / 2.0M parameters, scoring every layer in 1.2% / 1.8% / 3.4%
        of a 2K-token prefill (`kvp train ... --hidden N`, then the ranking benchmark: module docstring), before the
        folded norms of PolicyNet.forward took the default's score + evict to 1.76% (`kvp bench --sections a`).
    position_dim: width of the position embedding (paper: 32).
    max_position: rows of the learned absolute-position table ("absolute"/"both" encodings); larger positions
        are clamped to the last row.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden: int = 32
    position_dim: int = 16
    max_position: int = 2048
    position_encoding: str = "relative"
    hidden_state_dim: int = 0  # the model's hidden size when agents also read the layer's input hidden state
    hidden_state_features: int = 16  # width of each agent's learned projection of that hidden state

    def __post_init__(self) -> None:
        if self.hidden_state_dim < 0:
            raise KVPError(f"policy config: hidden_state_dim must be >= 0, got {self.hidden_state_dim}")
        for name in ("n_layers", "n_kv_heads", "head_dim", "hidden", "position_dim", "max_position",
                     "hidden_state_features"):
            if int(getattr(self, name)) < 1:
                raise KVPError(f"policy config: {name} must be a positive integer, got {getattr(self, name)}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise KVPError(f"policy config: position_encoding must be one of {POSITION_ENCODINGS}, "
                           f"got '{self.position_encoding}'")

    @property
    def n_agents(self) -> int:
        return self.n_layers * self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
