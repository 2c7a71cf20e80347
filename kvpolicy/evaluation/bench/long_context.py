"""Section g: a prompt longer than the full cache could hold, answered through a prefill that evicts as it goes.

A needle (a passphrase sentence) is placed at several depths of a long essay haystack, and the model is asked for it
after a prefill in chunks of C tokens, cut back to the budget after each (`generate(prefill_chunk=C)`, the KVP policy
by default). Each depth runs in a fresh process (section b's way), so its peak resident memory (or CUDA's peak
allocation) is its own; a full-cache run of a shorter prompt of the same haystack is the memory the chunked runs
are compared with, and the full cache of the long prompt is given in exact bytes. The same long prompts can also be
answered with the full cache and with one cut after the whole prefill (`config.LONG_RUNS`): when the chunked run
loses the needle, those tell whether the length (the model itself), the policy, or the chunking is what loses it (at
32K on this CPU the full-cache prefill alone takes far longer than all the chunked runs together).
"""

from __future__ import annotations

import json

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import generate
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.bench.config import CHUNKED, FULL
from kvpolicy.evaluation.bench.memory import child_setup, peak_measured_by, peak_rss_bytes, run_child
from kvpolicy.evaluation.bench.timing import CHARS_PER_TOKEN
from kvpolicy.data.essays import haystack_text
from kvpolicy.models import ModelHandle
from kvpolicy.progress import bar

CHILD = "from kvpolicy.evaluation.bench.long_context import child_main; child_main()"
NEEDLE = "The passphrase for the harbor archive is {}."
QUESTION = "What is the passphrase for the harbor archive? Answer with the passphrase only."
PASSPHRASES = ("amber-falcon-42", "cobalt-meadow-17", "ember-quartz-85", "indigo-raven-63", "onyx-sierra-29")


def needle_prompt(handle: ModelHandle, tokens: int, depth: float, passphrase: str) -> str:
    """About `tokens` tokens of the essay haystack with the needle sentence at fraction `depth` of it (at the sentence
    boundary nearest to it, or either end)."""
    if not 0 <= depth <= 1:
        raise KVPError(f"a needle depth is a fraction of the prompt in [0, 1], got {depth}")
    ids = handle.encode(haystack_text()[: tokens * CHARS_PER_TOKEN])[0, :tokens]
    if ids.shape[0] < tokens:
        raise KVPError(f"the essays hold fewer than {tokens} tokens; use a shorter --long-context")
    text = handle.decode(ids.tolist())
    target = round(depth * len(text))
    boundaries = [0, len(text)] + [i + 2 for i in range(len(text)) if text.startswith(". ", i)]
    cut = min(boundaries, key=lambda i: abs(i - target))  # the sentence boundary nearest to the depth
    return f"{text[:cut]}{NEEDLE.format(passphrase)} {text[cut:]}"


def child_main() -> None:
    """In a fresh process: answer one needle prompt as the JSON spec in argv[1] says (chunk null: the full cache),
    print the figures as one JSON line."""
    handle, spec = child_setup()
    print(json.dumps(answer_needle(handle, spec)))


def answer_needle(handle: ModelHandle, spec: dict) -> dict:
    """The answer to one needle prompt (spec: tokens, depth, passphrase, run (`config.LONG_RUNS`), scorer, budget,
    chunk: the chunk size of a chunked run, else None) and its figures: found, the cache held, the peak memory of
    this process, the times."""
    prompt = needle_prompt(handle, spec["tokens"], spec["depth"], spec["passphrase"])
    cut = spec["run"] != FULL
    scorer = make_scorer(spec["scorer"]) if cut else None
    budget = Budget(tokens=spec["budget"]) if cut else None
    result = generate(handle, prompt, QUESTION, scorer, budget, max_new_tokens=16, prefill_chunk=spec["chunk"])
    return {"answer": result.text.strip()[:80], "found": spec["passphrase"] in result.text,
            "prompt_tokens": result.prompt_tokens, "cache_tokens_peak": result.cache_tokens_peak,
            "cache_bytes_full": result.cache_bytes_full, "cache_bytes": result.cache_bytes_compressed,
            "prefill_s": round(result.timings["prefill_s"], 2), "peak_bytes": peak_rss_bytes()}


def _run(handle: ModelHandle, spec: dict) -> dict:
    """`answer_needle` in a fresh process on CPU; in this one on CUDA, with the allocator's peak."""
    if handle.model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(handle.model.device)
        return answer_needle(handle, spec) | {"peak_bytes": torch.cuda.max_memory_allocated(handle.model.device)}
    return run_child(CHILD, handle, spec, f"the long-context run {spec}")


def measure_long_context(handle: ModelHandle, scorer: str, tokens: int, depths: list[float], budget: int,
                         chunk: int, reference: int, long_runs: tuple[str, ...] = (CHUNKED,)) -> dict:
    """Section g's rows: the full cache at a `reference`-token needle prompt, then per depth of a `tokens`-token one
    each run of `long_runs` (`config.LONG_RUNS`), each with the needle found or not and its peak memory."""
    if tokens + 32 >= handle.info.max_positions:
        raise KVPError(f"a {tokens}-token prompt does not fit {handle.info.name}'s {handle.info.max_positions} "
                       "positions with its question and answer; use a shorter --long-context")
    runs = [{"tokens": reference, "depth": 0.5, "run": FULL, "chunk": None}] + [
        {"tokens": tokens, "depth": depth, "run": run, "chunk": chunk if run == CHUNKED else None}
        for depth in depths for run in long_runs]
    rows = []
    for i, run in enumerate(bar(runs, desc="g) long context", unit="process")):
        spec = run | {"passphrase": PASSPHRASES[i % len(PASSPHRASES)], "scorer": scorer, "budget": budget}
        rows.append(spec | _run(handle, spec))
    base = rows[0]["peak_bytes"]
    for row in rows:
        row["peak_vs_reference"] = row["peak_bytes"] / base
    return {"tokens": tokens, "budget": budget, "chunk": chunk, "scorer": scorer, "reference": reference,
            "peak_measured_by": peak_measured_by(handle.model.device.type == "cuda"), "rows": rows,
            "full_cache_bytes": rows[-1]["cache_bytes_full"]}


def print_long_context(fig: dict) -> None:
    """The table: per run its prompt, the needle's depth, whether it was found, the cache held at most, the peak."""
    mib = 2**20
    print(f"   needle prompts from the essays; cut runs: {fig['scorer']}, budget {fig['budget']} entries per KV "
          f"head, chunked: prefilled {fig['chunk']} tokens at a time and cut after each, compress-once: cut once "
          f"after the whole prefill; peak: {fig['peak_measured_by']}")
    print(f"   {'prompt':>7} {'run':>13} {'depth':>6} {'found':>6} {'held/head':>10} {'peak memory':>13} "
          f"{'/ ref':>6} {'prefill s':>10}  answer")
    for row in fig["rows"]:
        print(f"   {row['prompt_tokens']:>7} {row['run']:>13} {row['depth']:>6.2f} {str(row['found']):>6} "
              f"{row['cache_tokens_peak']:>10} {row['peak_bytes'] / mib:>9,.1f} MiB {row['peak_vs_reference']:>6.2f} "
              f"{row['prefill_s']:>10.1f}  {row['answer']!r}")
    print(f"   the full cache of the {fig['tokens']}-token prompt holds {fig['full_cache_bytes'] / mib:,.1f} MiB of "
          "keys and values alone")
