"""The scorers and budgets of a sweep: what each is called in results and figures, and what identifies it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import evict, rank
from kvpolicy.compression.scorers import LEARNED_PREFIX, SCORERS, Scorer, make_scorer
from kvpolicy.compression.scorers.base import ALL_QUERIES
from kvpolicy.errors import KVPError
from kvpolicy.compression.state import KVState
from kvpolicy.io import sha256_json

FULL = "full"  # scorer spec and budget label of the uncompressed reference
ORACLE = "oracle"

LABELS = {
    "random": "Random",
    "streaming_llm": "StreamingLLM",
    "knorm": "KNorm",
    "keydiff": "KeyDiff",
    "lagkv": "LagKV",
    "tova": "TOVA",
    "snapkv": "SnapKV",
    "h2o": "H2O",
    "expected_attention": "ExpectedAttention",
    ORACLE: "Oracle",
    FULL: "full cache",
}


@dataclass
class ScorerEntry:
    """One scorer of a sweep. scorer is None for the oracle (it needs a trace's utility, supplied per sample).

    kind: "heuristic" (a baseline), "learned" (a KVP checkpoint), "oracle" or "reference" (the full cache)."""

    spec: str
    label: str
    kind: str
    identity: dict
    scorer: Scorer | None

    @property
    def id(self) -> str:
        return sha256_json(self.identity)[:16]

    @property
    def query_window(self) -> int:
        return self.scorer.query_window if self.scorer is not None else 0


FULL_ENTRY = ScorerEntry(FULL, LABELS[FULL], "reference", {"name": FULL}, None)
FULL_BUDGET = Budget(tokens=1 << 30)  # the reference's "budget": above any cache length, so nothing is cut


def planned_budgets(entries: list[ScorerEntry], budgets: list[Budget], wanted) -> dict[str, list[Budget]]:
    """Per entry id, the budgets whose results are still wanted (the full-cache reference has the one FULL)."""
    return {e.id: [b for b in ([FULL_BUDGET] if e is FULL_ENTRY else budgets)
                   if wanted(e.id, FULL if e is FULL_ENTRY else b.label)] for e in [FULL_ENTRY, *entries]}


def rank_for_cuts(handle, state: KVState, entry: ScorerEntry, budgets: list[Budget]) -> list[torch.Tensor] | None:
    """The entry's ranking of `state` (per layer (B, H, T)), once for all its budgets; None when no ranking is
    needed: the full-cache reference, or budgets that all keep the whole cache."""
    length = state.length
    if entry is FULL_ENTRY or all(b.kept(length) >= length for b in budgets):
        return None
    return rank(handle, state, entry.scorer)


def cut(state: KVState, ranking: list[torch.Tensor] | None, budget: Budget) -> KVState:
    """`state` cut to `budget` by `ranking` (from rank_for_cuts); an uncut branch of it when ranking is None."""
    return state.branch() if ranking is None else evict(state, ranking, budget)


def make_entries(specs: list[str]) -> list[ScorerEntry]:
    """Scorer entries from registry names and `kvp:PATH` specs; several checkpoints are told apart by path."""
    learned = [s for s in specs if s.startswith(LEARNED_PREFIX)]
    entries = []
    for spec in dict.fromkeys(specs):  # drop repeats, keep order
        if spec == ORACLE:
            entries.append(ScorerEntry(spec, LABELS[ORACLE], "oracle", {"name": ORACLE}, None))
            continue
        scorer = make_scorer(spec)
        if spec.startswith(LEARNED_PREFIX):
            path = Path(spec[len(LEARNED_PREFIX) :])
            label = "KVP" if len(learned) == 1 else f"KVP ({path.name or path})"
            entries.append(ScorerEntry(spec, label, "learned", scorer.identity(), scorer))
        else:
            entries.append(ScorerEntry(spec, LABELS.get(spec, spec), "heuristic", scorer.identity(), scorer))
    return entries


def known_scorers() -> str:
    return ", ".join([*SCORERS, f"{LEARNED_PREFIX}PATH"])


def recording_window(entries: list[ScorerEntry]) -> int:
    """Rows of attention inputs a prefill must record so that every entry can rank (0: none needed)."""
    windows = [e.query_window for e in entries]
    if ALL_QUERIES in windows:
        return ALL_QUERIES
    return max(windows, default=0)


def parse_budget(text: str) -> Budget:
    """'256' -> 256 tokens per head; '0.5' or 'r0.5' -> compression ratio 0.5 (fraction removed)."""
    raw = text.strip().lower().removeprefix("b")
    try:
        if raw.startswith("r"):
            return Budget(ratio=float(raw[1:]))
        if raw.lstrip("+-").isdigit():
            return Budget(tokens=int(raw))
        return Budget(ratio=float(raw))
    except ValueError:
        raise KVPError(f"cannot read budget '{text}': give tokens per head (e.g. 256) or a ratio removed "
                       "(e.g. 0.5 or r0.5)") from None
