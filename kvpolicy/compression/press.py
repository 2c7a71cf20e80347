"""`KVPolicyPress`: any kvpolicy scorer (the learned KVP policy included) as a kvpress press.

kvpress calls the press from its forward hook after a layer's prefill (and, wrapped in kvpress's `DecodingPress`
or `PrefillDecodingPress`, every few decoding steps), with the layer's hidden states and RoPE embeddings, so
attention-free scorers read the cache and query-based ones recompute their queries from those hidden states,
exactly as in our engine. Sinks and recent tokens are protected as in `Budget`, so the press keeps the same
entries as `compress(..., Budget(ratio=compression_ratio, sinks, recent))`.

kvpress's caches hold no positions, and after a first cut the cached entries are no longer positions 0..T-1.
The press therefore records on the cache (attribute `kvpolicy_positions`, per layer) the true position of every
entry it kept, and gives entries appended since then the positions that the model's own `position_ids` gave
them; so a scorer (and the sink/recent protection) always sees true positions, during decoding included, and a
prefill press and a decoding press of this class (e.g. in `PrefillDecodingPress`) share that record.

On a hybrid model (Gemma 3), where kvpress hooks every layer, the press cuts only the full-attention layers and leaves
each sliding-window layer as it is, numbering the layers it cuts as a policy for that model numbers its agents.

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question=question, press=KVPolicyPress(compression_ratio=0.5, scorer=make_scorer("knorm")))
    pipe(context, question=question, press=KVPolicyPress(compression_ratio=0.5, scorer="kvp"))  # its bundled policy
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvpress import ScorerPress  # importing kvpress registers its "kv-press-text-generation" pipeline too

from kvpolicy.compression.budget import Budget, keep_indices, protected_scores
from kvpolicy.compression.catalog import attention_free
from kvpolicy.compression.names import LEARNED, split_mode
from kvpolicy.compression.scorers.base import LayerView, Scorer
from kvpolicy.errors import KVPError
from kvpolicy.models.handle import ModelInfo
from kvpolicy.policy.protocol import RECENT, SINKS

RECORD = "kvpolicy_positions"  # cache attribute: {layer: (B, H, T) true positions of the entries kept at its last cut}


@dataclass
class KVPolicyPress(ScorerPress):
    """compression_ratio: fraction of entries removed (kvpress); scorer: any kvpolicy `Scorer` or scorer name (e.g.
    "knorm", "kvp:smollm2-135m" for a bundled policy, "kvp:CKPT", or "kvp" for the policy bundled for the model the
    press is applied to, as `kvp generate --scorer kvp` reads it); sinks/recent: entries always kept (first / last
    positions)."""

    scorer: Scorer | str | None = None
    sinks: int = SINKS
    recent: int = RECENT
    _bundled: str | None = field(default=None, init=False, repr=False)  # "kvp" (or "kvp@MODE"): loaded per model
    _bundled_for: ModelInfo | None = field(default=None, init=False, repr=False)  # the model it was loaded for
    # model layer -> its number for the scorer, for the layers it evicts (a hybrid model's sliding ones are left alone);
    # None until applied to a model: every layer, numbered as the model numbers it
    _numbers: dict[int, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.scorer, str) and split_mode(self.scorer)[0] == LEARNED:
            self._bundled = self.scorer  # loaded when kvpress applies the press to a model (post_init_from_model)
        else:
            if isinstance(self.scorer, str):  # a scorer name: "knorm", "kvp:MODEL" (a bundled policy), "kvp:CKPT"
                from kvpolicy.compression.scorers import make_scorer

                self.scorer = make_scorer(self.scorer)
            if not isinstance(self.scorer, Scorer):
                raise KVPError("KVPolicyPress needs scorer=<a kvpolicy Scorer>, e.g. make_scorer('knorm')")
            if self.scorer.reads_text:
                raise KVPError(f"scorer '{self.scorer.name}' re-reads the cached text with the model, which a press "
                               "scoring one layer at a time cannot; use kvpress's own KVzipPress")
        self._budget()  # refuse bad settings now

    @classmethod
    def from_pretrained(cls, source: str, compression_ratio: float = 0.0, model=None, check_weights: bool = True,
                        **press: int) -> KVPolicyPress:
        """The press of a KVP policy folder: a local folder (`kvp fit`, `kvp train`, `save_pretrained`), a Hugging
        Face Hub id, or a model name with a bundled policy, as `load_policy` reads it (model: checked now instead of
        when kvpress applies the press). press: sinks, recent."""
        from kvpolicy.compression.scorers.learned import load_policy

        return cls(compression_ratio=compression_ratio, scorer=load_policy(source, model, check_weights), **press)

    def post_init_from_model(self, model) -> None:
        """Called by kvpress (directly or through a wrapper press) when the press is applied to `model`: load the
        policy bundled for it (scorer "kvp"), or refuse a model the scorer cannot score (a policy trained for another
        model), before any forward pass."""
        from kvpolicy.compression.scorers import make_scorer
        from kvpolicy.models.loader import identify

        info = identify(model)
        self._numbers = {idx: number for number, idx in enumerate(info.evicted_layers)}
        if self._bundled is None:
            self.scorer.check_model(info)
        elif info != self._bundled_for:  # a press used on several models loads each one's policy
            self.scorer, self._bundled_for = make_scorer(self._bundled, model=info), info

    def _scorer(self) -> Scorer:
        """The scorer, once known: "kvp" names a policy only when the press is applied to a model."""
        if isinstance(self.scorer, str):
            raise KVPError(f"KVPolicyPress(scorer='{self.scorer}') scores with the policy bundled for the model it is "
                           "applied to, and it was not applied to one: use it through kvpress (`with press(model):` "
                           "or a kv-press-text-generation pipeline), or name the policy: scorer='kvp:MODEL'")
        return self.scorer

    def positions(self, module, keys: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """True positions (B, H, T) of the T cached entries of `module`'s layer: those kept at the cache's last cut
        by a KVPolicyPress, then the entries appended since, the newest at kwargs' position_ids."""
        B, H, T, _ = keys.shape
        latest = int(kwargs["position_ids"][0, -1]) if kwargs.get("position_ids") is not None else T - 1
        kept = getattr(kwargs.get("past_key_values"), RECORD, {}).get(module.layer_idx)
        start = kwargs.get("cache_position")
        if start is not None and int(start[0]) == 0:
            kept = None  # a new prefill: whatever was recorded belongs to an earlier use of this cache
        if kept is not None and (kept.shape[:2] != (B, H) or kept.shape[-1] > T):
            kept = None  # the cache was cut or reset by something else: fall back to contiguous positions
        n_old = 0 if kept is None else kept.shape[-1]
        appended = torch.arange(latest - (T - n_old) + 1, latest + 1, device=keys.device).expand(B, H, -1)
        return appended if kept is None else torch.cat([kept.to(keys.device), appended], dim=-1)

    def _remember(self, module, kwargs: dict, positions: torch.Tensor) -> None:
        cache = kwargs.get("past_key_values")
        if cache is not None:
            if not hasattr(cache, RECORD):
                setattr(cache, RECORD, {})
            getattr(cache, RECORD)[module.layer_idx] = positions

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """Selection keys (B, H, T): the scorer's scores at true positions, protected sinks and recent on top (for
        kvpress presses that wrap this one and select themselves, e.g. AdaKVPress)."""
        scorer = self._scorer()
        positions = self.positions(module, keys, kwargs)
        scores = scorer.score(self._view(module, hidden_states, keys, values, kwargs, positions))
        return protected_scores(scores, positions, self._budget(), int(positions.max()) + 1)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep budget.kept(T) entries per head in position order, and remember their true positions."""
        scorer = self._scorer()
        if self._numbers is not None and module.layer_idx not in self._numbers:
            return keys, values  # a sliding-window layer keeps its window as it is
        positions = self.positions(module, keys, kwargs)
        if self.compression_ratio == 0:
            self._remember(module, kwargs, positions)
            return keys, values
        scores = scorer.score(self._view(module, hidden_states, keys, values, kwargs, positions))
        keep = keep_indices(scores, positions, self._budget(), int(positions.max()) + 1)
        self._remember(module, kwargs, positions.gather(2, keep))
        index = keep.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, index).contiguous(), values.gather(2, index).contiguous()

    def _budget(self) -> Budget:
        """The budget at the current ratio (kvpress's decoding presses change compression_ratio between calls)."""
        return Budget(ratio=self.compression_ratio, sinks=self.sinks, recent=self.recent)

    def _view(self, module, hidden_states, keys, values, kwargs, positions) -> LayerView:
        rope = kwargs.get("position_embeddings")
        if self.scorer.query_window and (rope is None or rope[0].shape[-2] != hidden_states.shape[1]):
            raise KVPError(f"scorer '{self.scorer.name}' needs the RoPE embeddings of the hidden states it is given, "
                           "which kvpress's decoding presses do not pass; wrap an attention-free scorer "
                           f"({', '.join(attention_free())}, kvp:...) in DecodingPress")
        return LayerView(
            layer_idx=module.layer_idx if self._numbers is None else self._numbers[module.layer_idx],
            keys=keys,
            values=values,
            positions=positions,
            module=module,
            hidden_states=hidden_states,
            position_embeddings=rope,
            rotary_emb=getattr(module, "rotary_emb", None),
        )
