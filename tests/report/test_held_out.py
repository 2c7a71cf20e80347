"""A policy card's held-out costs from a results file (report/held_out.py): per corpus, the policy's mean cost with
its bootstrap interval against the best attention-free heuristic on the same prompts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kvpolicy.errors import KVPError
from kvpolicy.evaluation.result import Result
from kvpolicy.intervals import bootstrap_ci
from kvpolicy.policy.card import HELD_OUT_SCHEMA
from kvpolicy.report.held_out import UNIT, held_out_section
from kvpolicy.schema import validate

POLICY = "ab" * 32
COSTS = {  # scorer -> (label, kind, identity name, cost of each prompt)
    "kvp:ckpt": ("KVP (ckpt)", "learned", "kvp", [1.2, 1.4, 1.3, 1.9, 2.1]),
    "knorm": ("KNorm", "heuristic", "knorm", [3.0, 3.2, 3.1, 2.0, 2.2]),
    "keydiff": ("KeyDiff", "heuristic", "keydiff", [2.5, 2.7, 2.6, 4.0, 4.2]),
    "tova": ("TOVA", "heuristic", "tova", [1.0, 1.0, 1.0, 1.0, 1.0]),  # reads attention: never the heuristic shown
    "oracle": ("Oracle", "oracle", "oracle", [1.0] * 5),
}
CORPORA = ["ruler", "ruler", "ruler", "dialogue", "dialogue"]


def _results(task: str = "traces:test", model: str = "fp") -> list[Result]:
    out = []
    for scorer, (label, kind, name, costs) in COSTS.items():
        identity = {"name": name} | ({"sha256": POLICY} if kind == "learned" else {})
        for i, (cost, corpus) in enumerate(zip(costs, CORPORA)):
            out.append(Result(
                model_fingerprint=model, scorer_id=f"id-{scorer}", budget="all", task=task, context_tokens=None,
                protocol="traces", seed=0, sample=str(i), model="smollm2-135m", scorer=scorer, scorer_label=label,
                family="ranking cost on held-out traces", data="held-out traces", metric="cost", kept=100,
                value=cost, seconds=0.1, scorer_kind=kind, scorer_identity=identity, corpus=corpus,
                per_head=[[cost]]))
    return out


def test_one_row_per_corpus_with_the_best_attention_free_heuristic():
    results = _results() + _results(task="traces:other")  # another trace set: left out
    section = held_out_section(results, POLICY, "fp", ["traces:test"], "kvp fit --model smollm2-135m")
    validate(section, HELD_OUT_SCHEMA, "held_out", "")
    assert section["command"] == "kvp fit --model smollm2-135m" and section["unit"] == UNIT
    ruler, dialogue = section["corpora"]
    assert (ruler["corpus"], ruler["prompts"], ruler["kvp"]) == ("RULER-style", 3, 1.3)
    assert ruler["interval"] == [round(b, 3) for b in bootstrap_ci([1.2, 1.4, 1.3])]
    assert (ruler["best_attention_free"], ruler["best_attention_free_cost"]) == ("KeyDiff", 2.6)
    assert (dialogue["corpus"], dialogue["kvp"], dialogue["best_attention_free"]) == ("dialogue", 2.0, "KNorm")
    assert dialogue["best_attention_free_cost"] == pytest.approx(float(np.mean([2.0, 2.2])))


def test_what_cannot_be_measured_is_refused():
    with pytest.raises(KVPError, match="no whole-ranking cost of this policy on traces:test"):
        held_out_section(_results(), "cd" * 32, "fp", ["traces:test"], "cmd")
    with pytest.raises(KVPError, match="no whole-ranking cost"):
        held_out_section(_results(model="other"), POLICY, "fp", ["traces:test"], "cmd")
    only_policy = [r for r in _results() if r.scorer_kind != "heuristic" or r.scorer == "tova"]
    with pytest.raises(KVPError, match="no attention-free heuristic's cost on every ruler prompt"):
        held_out_section(only_policy, POLICY, "fp", ["traces:test"], "cmd")
    twice = _results() + [replace(r, model_dtype="bfloat16") for r in _results()[:1]]
    with pytest.raises(KVPError, match="twice"):
        held_out_section(twice, POLICY, "fp", ["traces:test"], "cmd")


def test_a_corpus_of_one_prompt_has_no_interval():
    results = [r for r in _results() if r.sample in ("0", "3")]
    section = held_out_section(results, POLICY, "fp", ["traces:test"], "cmd")
    assert [row["interval"] for row in section["corpora"]] == [[], []]
