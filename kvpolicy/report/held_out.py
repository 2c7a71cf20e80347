"""A policy card's held-out costs (policy/card.py's HELD_OUT section) from a results file: per corpus of the held-out
trace sets, the policy's whole-ranking cost (its mean over the test prompts with the 95% bootstrap interval, as the
report's learning curves give it: aggregate.cost_point) beside the best attention-free heuristic's on the same
prompts. `kvp export` writes it into a policy folder, so that the card says what was measured."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from kvpolicy.errors import KVPError
from kvpolicy.evaluation.result import WHOLE_RANKING, Result
from kvpolicy.report.aggregate import FREE_KIND, cost_point, scorer_class

UNIT = ("Whole-ranking cost on held-out test prompts that no trace used (1 is the oracle's, lower is better; mean over "
        "heads per prompt, then over prompts, with the 95% bootstrap interval over prompts).")
CORPUS_NAMES = {"ruler": "RULER-style", "dialogue": "dialogue", "essays": "essays", "code": "code"}


def _by_sample(results: Iterable[Result], what: str) -> dict[tuple[str, str], Result]:
    """One result per (trace set, prompt); the same prompt measured twice (in two dtypes) is refused, not pooled."""
    found: dict[tuple[str, str], Result] = {}
    for r in results:
        if (r.task, r.sample) in found:
            raise KVPError(f"the results hold {what} on {r.task} prompt {r.sample} twice (model dtypes "
                           f"{found[(r.task, r.sample)].model_dtype} and {r.model_dtype}); give a results file of one "
                           "run")
        found[(r.task, r.sample)] = r
    return found


def held_out_section(results: Iterable[Result], policy_sha256: str, model_fingerprint: str, tasks: Sequence[str],
                     command: str) -> dict[str, Any]:
    """The HELD_OUT section for the policy whose weights have `policy_sha256`, from its whole-ranking costs on the
    trace tasks `tasks` ("traces:NAME") of the model `model_fingerprint`: one row per corpus of their prompts (in
    CORPUS_NAMES' order), with the attention-free heuristic of lowest mean cost on that corpus's prompts (those
    measured on every one of them); a corpus of one prompt has no interval ([]). `command`: what measured it, as
    the card names it."""
    costs = [r for r in results if r.metric == "cost" and r.budget == WHOLE_RANKING and r.task in tasks
             and r.model_fingerprint == model_fingerprint]
    mine = _by_sample((r for r in costs if r.scorer_kind == "learned"
                       and r.scorer_identity.get("sha256") == policy_sha256), "the policy's cost")
    if not mine:
        raise KVPError(f"the results hold no whole-ranking cost of this policy on {', '.join(tasks)}; measure it "
                       f"first: kvp sweep --task {' '.join(tasks)} --scorer kvp:POLICY knorm keydiff streaming_llm")
    heuristics: dict[str, list[Result]] = defaultdict(list)
    for r in costs:
        if scorer_class(r) == FREE_KIND:
            heuristics[r.scorer_label].append(r)
    by_heuristic = {label: _by_sample(rs, f"{label}'s cost") for label, rs in heuristics.items()}
    corpora: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, r in mine.items():
        corpora[r.corpus or "?"].append(key)
    rows = []
    for corpus in sorted(corpora, key=lambda c: (list(CORPUS_NAMES).index(c) if c in CORPUS_NAMES else 99, c)):
        keys = corpora[corpus]
        point = cost_point(0, [mine[k] for k in keys])
        measured = {label: cost_point(0, [found[k] for k in keys]).cost for label, found in by_heuristic.items()
                    if all(k in found for k in keys)}
        if not measured:
            raise KVPError(f"the results hold no attention-free heuristic's cost on every {corpus} prompt of "
                           f"{', '.join(tasks)}; measure one beside the policy (e.g. --scorer knorm keydiff)")
        best = min(measured, key=measured.get)
        rows.append({"corpus": CORPUS_NAMES.get(corpus, corpus), "prompts": len(keys), "kvp": round(point.cost, 3),
                     "interval": [round(bound, 3) for bound in point.ci or ()], "best_attention_free": best,
                     "best_attention_free_cost": round(measured[best], 3)})
    return {"command": command, "unit": UNIT, "corpora": rows}
