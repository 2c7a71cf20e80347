"""`KVPolicyPress`: any kvpolicy scorer (the learned KVP policy included) as a kvpress press.

kvpress calls `score` from its forward hook after each layer's prefill, with the layer's hidden states and
RoPE embeddings, so attention-free scorers read the cache and query-based ones recompute their queries from
those hidden states, exactly as in our engine. Sinks and recent tokens are protected as in `Budget`, so the
press keeps the same entries as `compress(..., Budget(ratio=compression_ratio, sinks, recent))`.

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question=question, press=KVPolicyPress(compression_ratio=0.5, scorer=make_scorer("knorm")))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress import ScorerPress

from kvpolicy.compression.budget import Budget, protected_scores
from kvpolicy.compression.scorers.base import LayerView, Scorer
from kvpolicy.errors import KVPError
from kvpolicy.policy.protocol import RECENT, SINKS


@dataclass
class KVPolicyPress(ScorerPress):
    """compression_ratio: fraction of entries removed (kvpress); scorer: any kvpolicy `Scorer`;
    sinks/recent: entries always kept (first / last positions)."""

    scorer: Scorer | None = None
    sinks: int = SINKS
    recent: int = RECENT

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.scorer, Scorer):
            raise KVPError("KVPolicyPress needs scorer=<a kvpolicy Scorer>, e.g. make_scorer('knorm')")
        self._budget = Budget(ratio=self.compression_ratio, sinks=self.sinks, recent=self.recent)

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """Scores (B, H, T) of a freshly prefilled layer (positions 0..T-1), protected sinks/recent on top."""
        B, H, T, _ = keys.shape
        positions = torch.arange(T, device=keys.device).expand(B, H, T)
        view = LayerView(
            layer_idx=module.layer_idx,
            keys=keys,
            values=values,
            positions=positions,
            module=module,
            hidden_states=hidden_states,
            position_embeddings=kwargs.get("position_embeddings"),
            rotary_emb=getattr(module, "rotary_emb", None),
        )
        return protected_scores(self.scorer.score(view), positions, self._budget, T)
