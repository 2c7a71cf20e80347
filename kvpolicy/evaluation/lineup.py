"""A sweep's line-up: the scorers it compares and the full-cache reference they are measured against (what each is
called in results and figures, and what identifies it), the budgets every ranking is cut to, and the
rank-once / cut-per-budget step the runners share."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.catalog import CATALOG, label
from kvpolicy.compression.names import mode_label, split_mode
from kvpolicy.compression.engine import compress, evict, prefill_chunked, rank
from kvpolicy.compression.scorers import LEARNED_PREFIX, Scorer, make_scorer
from kvpolicy.compression.scorers.base import ALL_QUERIES
from kvpolicy.compression.state import KVState
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.result import FULL
from kvpolicy.io import sha256_json

FULL_LABEL = "full cache"  # the reference's label; the scorers' are the catalog's


@dataclass
class Contender:
    """One scorer of a sweep's line-up. scorer is None for the oracle (it needs a trace's utility, supplied per
    sample) and for the full-cache reference.

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

    @property
    def whole_prefill(self) -> bool:
        """Its scorer ranks only the cache of one whole prefill (KVzip, KVzap), not a cut cache fed more later."""
        return self.scorer is not None and self.scorer.whole_prefill

    @property
    def attention_free(self) -> bool:
        """Its scorer ranks from the cache alone (see `Scorer.attention_free`)."""
        return self.scorer is not None and self.scorer.attention_free


# (contender id, budget label) -> whether that result is still missing for the sample(s) at hand
IsMissing = Callable[[str, str], bool]

FULL_CACHE = Contender(FULL, FULL_LABEL, "reference", {"name": FULL}, None)
FULL_BUDGET = Budget(tokens=1 << 30)  # the reference's "budget": above any cache length, so nothing is cut


LEARNED_LABEL = "KVP"  # a learned policy; "KVP (NAME)" when several are evaluated together
BUNDLED_LABEL = f"{LEARNED_LABEL} (bundled)"  # the policy shipped with kvpolicy, beside other learned ones


def make_contenders(specs: list[str]) -> list[Contender]:
    """Contenders from registry names and `kvp:PATH` / `kvp:MODEL` specs (each perhaps with an `@MODE` allocation),
    labelled as the catalog says: a bundled policy is BUNDLED_LABEL, one trained policy LEARNED_LABEL, several
    trained ones are told apart by path, and an allocation mode adds its words (`names.mode_label`). A scorer
    that needs a trace's utility (the oracle) gets it per sample, so it has no scorer here."""
    specs = list(dict.fromkeys(specs))  # drop repeats, keep order
    oracles = {spec for spec in specs if spec in CATALOG and CATALOG[spec].needs_utility}
    scorers = {spec: make_scorer(spec) for spec in specs if spec not in oracles}
    learned = {spec: split_mode(spec) for spec in specs if spec.startswith(LEARNED_PREFIX)}
    bundled = {base for spec, (base, _) in learned.items() if scorers[spec].identity().get("bundled")}
    trained = {base for base, _ in learned.values()} - bundled
    contenders = []
    for spec in specs:
        if spec in oracles:
            contenders.append(Contender(spec, label(spec), "oracle", {"name": spec}, None))
            continue
        scorer = scorers[spec]
        if spec in learned:
            base, mode = learned[spec]
            path = Path(base[len(LEARNED_PREFIX) :])
            name = (BUNDLED_LABEL if base in bundled else LEARNED_LABEL if len(trained) == 1
                    else f"{LEARNED_LABEL} ({path.name or path})")
            contenders.append(Contender(spec, mode_label(name, mode), "learned", scorer.identity(), scorer))
        else:
            contenders.append(Contender(spec, label(spec), "heuristic", scorer.identity(), scorer))
    return contenders


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


def missing_budgets(contenders: list[Contender], budgets: list[Budget],
                    is_missing: IsMissing) -> dict[str, list[Budget]]:
    """Per contender id, the budgets whose results are still missing (the full-cache reference has the one
    FULL_BUDGET); the reference is always among the contenders."""
    return {c.id: [b for b in ([FULL_BUDGET] if c is FULL_CACHE else budgets)
                   if is_missing(c.id, FULL if c is FULL_CACHE else b.label)] for c in [FULL_CACHE, *contenders]}


def recording_window(contenders: list[Contender]) -> int:
    """Rows of attention inputs a prefill must record so that every contender can rank (0: none needed)."""
    windows = [c.query_window for c in contenders]
    if ALL_QUERIES in windows:
        return ALL_QUERIES
    return max(windows, default=0)


def rank_for_cuts(handle, state: KVState, contender: Contender, budgets: list[Budget]) -> list[torch.Tensor] | None:
    """The contender's ranking of `state` (per layer (B, H, T)), once for all its budgets; None when no ranking is
    needed: the full-cache reference, or budgets that all keep the whole cache."""
    length = state.length
    if contender is FULL_CACHE or all(b.kept(length) >= length for b in budgets):
        return None
    return rank(handle, state, contender.scorer)


def chunked_cuts(handle, ids: torch.Tensor, contenders: list[Contender], missing: dict[str, list[Budget]],
                 chunk: int) -> Iterator[tuple[Contender, Budget, KVState, float, float]]:
    """Per missing (contender, budget): ids (1, T) prefilled `chunk` tokens at a time and cut back to the budget
    after each chunk by the contender's scorer (`prefill_chunked`: nothing is shared between cuts, each cut depends
    on the ones before it), then compressed to the budget as a whole prefill is; a ratio budget is of the whole
    prompt. Yields (contender, budget, the state kept, prefill seconds, compress seconds)."""
    for contender in contenders:
        for budget in missing[contender.id]:
            start = time.perf_counter()
            fixed = budget.of_length(ids.shape[1])
            state, _ = prefill_chunked(handle, ids, contender.scorer, fixed, chunk)
            prefilled = time.perf_counter()
            state = compress(handle, state, contender.scorer, fixed)
            yield contender, budget, state, prefilled - start, time.perf_counter() - prefilled


def cut(state: KVState, ranking: list[torch.Tensor] | None, budget: Budget, contender: Contender) -> KVState:
    """`state` cut to `budget` by `ranking` (from rank_for_cuts) with the contender's allocation; an uncut branch of
    it when ranking is None."""
    return state.branch() if ranking is None else evict(state, ranking, budget, contender.scorer.allocation)
