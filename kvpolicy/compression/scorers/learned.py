"""KVP: the learned per-(layer, KV head) eviction policy as a scorer (`make_scorer("kvp:CKPT")`, or
`make_scorer("kvp:MODEL")` for the policy bundled with kvpolicy for that model).

Moschella, Manduchi, Sener, "Learning to Evict from Key-Value Cache" (arXiv 2602.10238). Each head's agent
scores cached tokens from their key, value and position alone, so the scorer is attention-free: it can re-rank
the cache at any time, during decoding included. The policy folder comes from `kvp train` or `kvp fit`, the
Hugging Face Hub, or ships in the package (kvpolicy.policy.bundled). A policy trained with `--hidden-states` also
reads each cached token's input hidden state of its layer, which only the prefill that fed it records: like KVzap,
it ranks the cache of one whole prefill (not a cut cache fed more later, nor during decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvpolicy.compression.scorers.base import ALL_QUERIES, LayerView, Scorer
from kvpolicy.errors import KVPError
from kvpolicy.models.handle import ModelInfo
from kvpolicy.models.loader import identify
from kvpolicy.policy.bundled import resolve_policy
from kvpolicy.policy.calibration import Calibration
from kvpolicy.policy.checkpoint import Checkpoint, check_model, load_checkpoint
from kvpolicy.policy.network import HALF_DTYPES


@dataclass
class KVPScorer(Scorer):
    """checkpoint: a policy folder (`kvp train`, `kvp fit`, `save_pretrained`), a model name with a bundled policy,
    or a Hugging Face Hub id. model: optional ModelInfo the policy will be applied to; when given, a policy that
    cannot serve it (another cache shape or architecture) is refused at construction, and other weights of its
    model are warned about unless check_weights is False (checkpoint.check_model says what that risks)."""

    name = "kvp"
    query_window = 0
    checkpoint: str = ""
    model: Any = field(default=None, repr=False)
    check_weights: bool = field(default=True, repr=False)
    _loaded: Checkpoint = field(init=False, repr=False)
    _calibration: Calibration | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._loaded = load_checkpoint(resolve_policy(self.checkpoint), model=self.model,
                                       check_weights=self.check_weights)
        self._calibration = self._loaded.calibration
        if self.reads_states:  # every cached entry's hidden state, recorded by the prefill that fed it
            self.query_window, self.whole_prefill = ALL_QUERIES, True

    @property
    def reads_states(self) -> bool:
        """Whether its agents also read the layers' input hidden states (`kvp train --hidden-states`)."""
        return bool(self.policy.config.hidden_state_dim)

    @property
    def policy(self):
        return self._loaded.policy

    def check_model(self, info: Any) -> None:
        """Refuse to score a model the policy cannot serve, warn about other weights (info: ModelInfo)."""
        check_model(self._loaded.config, info, self.checkpoint, self.check_weights)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the policy as a Hugging Face-style folder (config.json, model.safetensors, README.md card) that
        `load_policy(path)` and `KVPolicyPress.from_pretrained(path)` read, and the Hub takes as it is."""
        return self._loaded.save_pretrained(path)

    def score(self, view: LayerView) -> torch.Tensor:
        self._place(view.keys)
        instead = "use a policy trained without --hidden-states"
        states = view.entry_states(self.name, instead) if self.reads_states else None
        with torch.no_grad():
            return self.policy.score_layer(view.layer_idx, view.keys, view.values, view.positions, states=states)

    def score_layers(self, views: list[LayerView]) -> list[torch.Tensor]:
        """On an accelerator, every layer in one forward of all agents (`PolicyNet.score_layers`: one launch of each
        kernel instead of one per layer) when the layers are the model's, in order and of one shape, and the policy
        reads the cache alone; else layer by layer. On CPU always layer by layer: there the small per-layer
        activations stay in cache, and one forward of all 90 of SmolLM2's agents took twice as long (2K tokens:
        178 ms against 93 ms, one thread)."""
        shapes = {view.keys.shape for view in views}
        in_order = [view.layer_idx for view in views] == list(range(self.policy.config.n_layers))
        on_cpu = views[0].keys.device.type == "cpu"
        if on_cpu or self.reads_states or len(shapes) != 1 or not in_order:
            return super().score_layers(views)
        self._place(views[0].keys)
        with torch.no_grad():
            return self.policy.score_layers([v.keys for v in views], [v.values for v in views],
                                            [v.positions for v in views])

    def comparable_scores(self, views: list[LayerView]) -> list[torch.Tensor]:
        scores = self.score_layers(views)
        return [self._calibration.apply(view.layer_idx, layer) for view, layer in zip(views, scores)]

    def incomparable(self) -> str | None:
        if self._calibration is None:
            return ("its agents rank the tokens of their own head only; give it a calibration onto one scale "
                    f"across heads with `kvp calibrate --policy {self.checkpoint} --traces TRAIN_TRACES`")
        return None

    def comparable_score(self, view: LayerView) -> torch.Tensor:
        """The calibrated scores: each token's predicted log future attention (policy/calibration.py)."""
        return self._calibration.apply(view.layer_idx, self.score(view))

    def comparable_identity(self) -> dict[str, Any]:
        return {"calibration_sha256": self._calibration.sha256}

    def _place(self, keys: torch.Tensor) -> None:
        """Move the policy to the cache's device and (half) dtype: once per model, not per layer."""
        dtype = keys.dtype if keys.dtype in HALF_DTYPES else torch.float32
        weight = self.policy.key_w
        if weight.device != keys.device or weight.dtype != dtype:
            self.policy.to(device=keys.device, dtype=dtype)

    def identity(self) -> dict[str, Any]:
        """What the scores depend on, plus the corpus the agents were trained on (so that results on other data
        can be labelled cross-corpus)."""
        model = self._loaded.config["model"]
        train = self._loaded.config.get("traces", {}).get("train", {})
        return {
            "name": self.name,
            "checkpoint": str(Path(self.checkpoint)),  # a path, or the model name of a bundled policy
            "bundled": "bundle" in self._loaded.config,
            "sha256": self._loaded.sha256,
            "seed": self._loaded.config.get("training", {}).get("seed"),  # one of several trainings of one recipe
            "model": model["name"],
            "fingerprint": model["fingerprint"],
            "trained_on": {"source": train.get("source"), "context_tokens": train.get("context_tokens"),
                           "prompts": train.get("prompts_used"),
                           "steps": self._loaded.config.get("training", {}).get("steps")},
        }


def load_policy(checkpoint: str | Path | None = None, model: Any = None, check_weights: bool = True) -> KVPScorer:
    """The learned KVP policy as a scorer for `generate`, `compress` and `KVPolicyPress`: a policy folder (`kvp
    train`, `kvp fit`, `save_pretrained`), a model name with a bundled policy, a Hugging Face Hub id, or
    (checkpoint None) the policy bundled for `model`. model: a ModelHandle, a ModelInfo or a transformers model;
    when given, a policy that cannot serve it (another cache shape or architecture) is refused here, before any
    work, and one trained on other weights of its architecture is warned about; check_weights=False trusts it
    without the warning (its measured costs do not carry over to weights it never saw)."""
    info = getattr(model, "info", model)
    if info is not None and not isinstance(info, ModelInfo):
        if not hasattr(info, "config"):
            raise KVPError(f"load_policy's model= takes a model from kvp.load_model, a ModelInfo or a transformers "
                           f"model; got {type(model).__name__}")
        info = identify(info)  # a plain transformers model, e.g. the one handed to kvpress's pipeline
    if checkpoint is None:
        if info is None:
            raise KVPError("load_policy needs a checkpoint, a model name, or model= (for that model's bundled policy)")
        from kvpolicy.compression.scorers import LEARNED_PREFIX, bundled_spec

        checkpoint = bundled_spec(info.name).removeprefix(LEARNED_PREFIX)  # as `kvp generate --scorer kvp` reads it
    return KVPScorer(str(checkpoint), model=info, check_weights=check_weights)
