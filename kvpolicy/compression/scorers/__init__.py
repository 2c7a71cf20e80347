"""Scorer registry: every eviction method by name. `make_scorer("knorm")`, `make_scorer("kvp:ckpt/")`."""

from __future__ import annotations

from kvpolicy.compression.scorers.base import ALL_QUERIES, LayerView, Scorer
from kvpolicy.compression.scorers.h2o import H2OScorer
from kvpolicy.compression.scorers.kvpress_backed import (
    ExpectedAttentionScorer,
    KeyDiffScorer,
    KnormScorer,
    LagKVScorer,
    RandomScorer,
    SnapKVScorer,
    TOVAScorer,
)
from kvpolicy.compression.scorers.oracle import OracleScorer
from kvpolicy.compression.scorers.streaming_llm import StreamingLLMScorer
from kvpolicy.compression.names import LEARNED, LEARNED_PREFIX, SCORER_NAMES  # noqa: F401 (re-exported)
from kvpolicy.errors import KVPError

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (
        RandomScorer,
        StreamingLLMScorer,
        KnormScorer,
        KeyDiffScorer,
        LagKVScorer,
        TOVAScorer,
        SnapKVScorer,
        H2OScorer,
        ExpectedAttentionScorer,
        OracleScorer,
    )
}

def make_scorer(spec: str, **kw) -> Scorer:
    """A scorer from its registry name (settings as keyword arguments), `kvp:PATH` (a learned policy checkpoint) or
    `kvp:MODEL` (the policy bundled for a model).

    The oracle needs `utility=` (per-layer future utility); unknown names raise a KVPError listing the known ones.
    """
    if spec.startswith(LEARNED_PREFIX):
        from kvpolicy.compression.scorers.learned import KVPScorer

        return KVPScorer(spec[len(LEARNED_PREFIX) :], **kw)
    if spec == LEARNED:
        raise KVPError(f"'{spec}' names a learned policy: use {LEARNED_PREFIX}MODEL for the policy bundled for a "
                       f"model (e.g. {LEARNED_PREFIX}smollm2-135m) or {LEARNED_PREFIX}CHECKPOINT for a trained one")
    if spec not in SCORERS:
        known = ", ".join([*SCORERS, f"{LEARNED_PREFIX}MODEL", f"{LEARNED_PREFIX}CHECKPOINT"])
        raise KVPError(f"unknown scorer '{spec}'; known scorers: {known}")
    if spec == OracleScorer.name and "utility" not in kw:
        raise KVPError("the oracle needs the true future utility: make_scorer('oracle', utility=per_layer_utility)")
    try:
        return SCORERS[spec](**kw)
    except TypeError as err:
        raise KVPError(f"bad settings for scorer '{spec}': {err}") from None


__all__ = ["ALL_QUERIES", "SCORERS", "LayerView", "Scorer", "make_scorer", *[c.__name__ for c in SCORERS.values()]]
