"""Section d: the time to answer one question end to end, kvpolicy's engine against kvpress's pipeline.

Both sides read the same prompt under kvpress's protocol (compress the context, then read the question: our
"question-agnostic"), remove the same share of the context's cache and decode greedily up to the same number of
tokens; each time covers tokenization, prefill, compression and decoding. Two pairs: kvpress's own KnormPress vs
our knorm scorer (KnormPress protects no sinks or recent tokens, so our budget keeps none either: both keep the
same entries), and our KVP policy inside kvpress (`KVPolicyPress`) vs the same policy in our engine.
"""

from __future__ import annotations

from kvpress import BasePress, KnormPress

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import generate
from kvpolicy.compression.press import KVPolicyPress
from kvpolicy.compression.scorers import Scorer, make_scorer
from kvpolicy.evaluation.bench.timing import best_in_turns, essay_ids
from kvpolicy.evaluation.names import QUESTION_AGNOSTIC
from kvpolicy.models import ModelHandle
from kvpolicy.progress import bar

QUESTION = " What is the main point of this text?"


def answer_pairs(kvp: Scorer, ratio: float) -> dict[str, tuple[BasePress, Scorer, Budget]]:
    """Name -> (a kvpress press, our scorer, our budget), each pair removing `ratio` of the context's cache alike."""
    return {
        "knorm": (KnormPress(compression_ratio=ratio), make_scorer("knorm"), Budget(ratio=ratio, sinks=0, recent=0)),
        "kvp": (KVPolicyPress(compression_ratio=ratio, scorer=kvp), kvp, Budget(ratio=ratio)),
    }


def measure_answers(handle: ModelHandle, kvp: Scorer, context_tokens: int, ratio: float, max_new_tokens: int,
                    repeats: int) -> dict:
    """Per pair: the best of `repeats` answer times of each side (after one untimed warm-up each, taken in turns),
    their ratio kvpolicy / kvpress, and whether the two answers are the same text."""
    from transformers import pipeline

    device = handle.model.device
    pipe = pipeline("kv-press-text-generation", model=handle.model, tokenizer=handle.tokenizer, device=device)
    context = handle.decode(essay_ids(handle, context_tokens)[0])
    pairs = answer_pairs(kvp, ratio)
    rows = {}
    with bar(desc="d) answers", total=len(pairs) * 2 * (repeats + 1), unit="answer") as progress:
        for name, (press, scorer, budget) in pairs.items():
            sides = {
                "kvpolicy": lambda scorer=scorer, budget=budget: generate(
                    handle, context, QUESTION, scorer, budget, QUESTION_AGNOSTIC, max_new_tokens).text,
                "kvpress": lambda press=press: pipe(context, question=QUESTION, press=press,
                                                    max_new_tokens=max_new_tokens)["answer"],
            }
            answers, best = best_in_turns(sides, device, repeats, progress)
            rows[name] = {"kvpolicy_s": best["kvpolicy"], "kvpress_s": best["kvpress"],
                          "ratio": best["kvpolicy"] / best["kvpress"],
                          "same_answer": answers["kvpolicy"] == answers["kvpress"],
                          "kvpolicy_answer": answers["kvpolicy"], "kvpress_answer": answers["kvpress"]}
    return {"context_tokens": context_tokens, "compression_ratio": ratio, "max_new_tokens": max_new_tokens,
            "protocol": QUESTION_AGNOSTIC, "question": QUESTION, "pairs": rows}


def print_answers(fig: dict) -> None:
    """The table: per pair both times, their ratio and whether the answers agree; then the answers."""
    print(f"   {fig['context_tokens']}-token essay prompt, question '{fig['question'].strip()}', "
          f"{fig['compression_ratio']:.0%} of the context's cache removed, up to {fig['max_new_tokens']} new tokens, "
          f"{fig['protocol']} (kvpress's protocol); best of the repeats, goal kvpolicy/kvpress <= 1.1")
    print("   knorm: kvpress's KnormPress keeps no sinks or recent tokens, so kvpolicy's budget keeps none either; "
          "kvp: the policy in KVPolicyPress vs in kvpolicy's engine")
    print(f"   {'pair':>6} {'kvpolicy s':>11} {'kvpress s':>10} {'kvpolicy/kvpress':>17}  same answer")
    for name, row in fig["pairs"].items():
        same = "yes" if row["same_answer"] else "NO"
        print(f"   {name:>6} {row['kvpolicy_s']:>11.3f} {row['kvpress_s']:>10.3f} {row['ratio']:>17.3f}  {same}")
    for name, row in fig["pairs"].items():
        print(f"   {name} answer (kvpolicy): {row['kvpolicy_answer']!r}")
        if not row["same_answer"]:
            print(f"   {name} answer (kvpress):  {row['kvpress_answer']!r}")
