"""Sections b and f: what the cache occupies at each budget, against the full cache: exact bytes and the peak memory.

The bytes are exact (`KVState.nbytes`: every cached key and value). The peak is the process's high-water mark:
on CPU each budget runs in a fresh process (its VmHWM on Linux, `resource.getrusage` ru_maxrss elsewhere), so no
run inherits another's; on CUDA the allocator's peak (`torch.cuda.max_memory_allocated`) after a reset. The cache
is cut after the prefill (query-aware compression), so during the prefill the full cache exists and the peak
holds it whatever the budget: what a budget saves is the memory the cache holds after the cut, which section b
prints beside it. Section f bounds the peak too: the prompt prefilled in chunks, cut after each (`prefill_chunked`),
against compress-once and the full cache, at long contexts.
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import compress, prefill, prefill_chunked
from kvpolicy.compression.names import HEAD, with_mode
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.compression.state import KVState
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.bench.timing import CUT_SCORER, essay_ids
from kvpolicy.models import ModelHandle
from kvpolicy.progress import bar

BASE = "1 token"  # the row whose peak is the model and runtime alone
CHILD = "from kvpolicy.evaluation.bench.memory import child_main; child_main()"


def cut_cache(handle: ModelHandle, ids: torch.Tensor, budget: Budget | None, mode: str = HEAD,
              chunk: int | None = None) -> tuple[int, KVState]:
    """Prefill ids (1, T) and cut the cache to `budget` (None: keep it whole) with allocation `mode`, after the whole
    prefill or, with `chunk`, after every chunk of that many tokens; the full state is dropped. Returns (bytes of the
    full cache, the state kept)."""
    scorer = make_scorer(with_mode(CUT_SCORER, mode))
    if chunk is None:
        state, _ = prefill(handle, ids)
    else:
        state, _ = prefill_chunked(handle, ids, scorer, budget, chunk)
    full = state.nbytes_at(ids.shape[1])
    if budget is not None:
        state = compress(handle, state, scorer, budget)
    return full, state


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes. On Linux its VmHWM: ru_maxrss of a process started from a large
    one also counts the parent's memory (exec folds the replaced image's high-water mark into it), so there it
    would report the bench's own memory; elsewhere ru_maxrss (bytes on macOS, KiB on the BSDs)."""
    status = Path("/proc/self/status")
    if status.exists():
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child_setup() -> tuple[ModelHandle, dict]:
    """In a process started by `run_child`: its JSON spec from argv[1], library output silenced, the parent's thread
    count set and its model loaded where it ran."""
    from kvpolicy.models import load_model
    from kvpolicy.progress import silence_libraries

    spec = json.loads(sys.argv[1])
    silence_libraries()
    torch.set_num_threads(spec["threads"])
    return load_model(spec["model"], device=spec["device"], dtype=spec["dtype"]), spec


def run_child(child: str, handle: ModelHandle, spec: dict, what: str) -> dict:
    """The figures `child` (a `python -c` program that starts with `child_setup` and prints one JSON line last)
    measures in a new interpreter, given `spec` with this process's model, placement and threads; a failure is a
    KVPError naming `what` with the child's error output."""
    spec = {"model": handle.info.name, "device": str(handle.model.device), "dtype": handle.dtype_name,
            "threads": torch.get_num_threads()} | spec
    run = subprocess.run([sys.executable, "-c", child, json.dumps(spec)], capture_output=True, text=True)
    if run.returncode != 0:
        raise KVPError(f"{what} failed in its own process:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def peak_measured_by(cuda: bool) -> str:
    """How a section's peak memory is measured, as its tables say."""
    return ("torch.cuda.max_memory_allocated after a reset (tensors on the GPU)" if cuda
            else "peak resident memory (VmHWM / ru_maxrss) of a fresh process per row (the whole process)")


def child_main() -> None:
    """In a fresh process: cut one cache as the JSON spec in argv[1] says (budget null: the full cache), print the
    figures as one JSON line."""
    handle, spec = child_setup()
    budget = Budget(tokens=spec["budget"]) if spec["budget"] is not None else None
    full, state = cut_cache(handle, essay_ids(handle, spec["context"]), budget, spec["allocation"], spec["chunk"])
    print(json.dumps({"full_bytes": full, "cache_bytes": state.nbytes(), "peak_bytes": peak_rss_bytes()}))


def in_fresh_process(handle: ModelHandle, context: int, budget: int | None, mode: str,
                     chunk: int | None = None) -> dict:
    """child_main's figures for one cut, run in a new interpreter with this process's model, placement and threads."""
    spec = {"context": context, "budget": budget, "allocation": mode, "chunk": chunk}
    return run_child(CHILD, handle, spec, f"the memory measurement of budget {budget}")


def in_this_process(handle: ModelHandle, context: int, budget: int | None, mode: str,
                    chunk: int | None = None) -> dict:
    """The same figures on CUDA from the allocator: the peak since a reset, and what the kept cache still holds."""
    device = handle.model.device
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    full, state = cut_cache(handle, essay_ids(handle, context), Budget(tokens=budget) if budget is not None else None,
                            mode, chunk)
    gc.collect()
    return {"full_bytes": full, "cache_bytes": state.nbytes(), "peak_bytes": torch.cuda.max_memory_allocated(device),
            "held_bytes": torch.cuda.memory_allocated(device) - before}


def measure_memory(handle: ModelHandle, context: int, budgets: list[int], modes: tuple[str, ...] = (HEAD,)) -> dict:
    """Rows for a 1-token prompt (the model's weights, all read once, and the runtime), the full cache and each
    budget at a `context`-token prompt in each allocation mode ("256", "256 model"...), each with its exact cache
    bytes and peak memory, and both as shares of the full cache's."""
    cuda = handle.model.device.type == "cuda"
    measure = in_this_process if cuda else in_fresh_process
    runs = {BASE: (1, None, HEAD), "full": (context, None, HEAD)} | {
        f"{b} {mode}".removesuffix(f" {HEAD}"): (context, b, mode) for b in budgets for mode in modes}
    rows = {}
    for label, (tokens, budget, mode) in bar(runs.items(), desc="b) memory", total=len(runs), unit="process"):
        rows[label] = measure(handle, tokens, budget, mode)
    full = rows["full"]
    for row in rows.values():
        row["cache_share"] = row["cache_bytes"] / full["cache_bytes"]
        row["peak_share"] = row["peak_bytes"] / full["peak_bytes"]
    return {"context": context, "scorer": CUT_SCORER, "peak_measured_by": peak_measured_by(cuda), "rows": rows}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_memory(fig: dict) -> None:
    """The table: per row exact cache bytes and peak memory, each also as a share of the full cache's."""
    rows = fig["rows"]
    cuda = "held_bytes" in rows["full"]
    print(f"   {fig['context']}-token prompt, cut by {fig['scorer']} (a budget alone: every head keeps it; 'layer', "
          f"'model': the same total moved between layers, heads); peak: {fig['peak_measured_by']}")
    print(f"   {'budget':>10} {'cache bytes':>14} {'/ full':>7} {'peak memory':>14} {'/ full':>7}"
          + (f" {'held after cut':>15}" if cuda else ""))
    for label, row in rows.items():
        held = f" {_mib(row['held_bytes']):>15}" if cuda else ""
        print(f"   {label:>10} {row['cache_bytes']:>14,} {row['cache_share']:>7.4f} {_mib(row['peak_bytes']):>14} "
              f"{row['peak_share']:>7.3f}{held}")
    model = rows[BASE]["peak_bytes"]
    print(f"   the peak includes the model weights and runtime ({_mib(model)} with a 1-token prompt), the prefill's "
          "activations and the FULL cache, which exists during the prefill before the cut; the memory the cache "
          "holds after the cut is the 'cache bytes' column" + (" (measured: 'held after cut')" if cuda else ""))


def measure_peak(handle: ModelHandle, contexts: list[int], budget: int, chunk: int, reference: int) -> dict:
    """Section f: per context, the peak memory of the full cache, of compress-once (prefill everything, then cut to
    `budget`) and of a chunked prefill (`chunk` tokens at a time, cut after each), each in its own process as in
    section b; plus the full cache at a `reference`-token prompt, the memory a chunked run aims to stay near.
    Contexts the model has no positions for are left out, and say so."""
    cuda = handle.model.device.type == "cuda"
    measure = in_this_process if cuda else in_fresh_process
    fits = [c for c in contexts if c < handle.info.max_positions]
    runs = {(reference, "full"): (None, None)} | {
        (c, kind): spec for c in fits for kind, spec in
        (("full", (None, None)), ("once", (budget, None)), ("chunked", (budget, chunk)))}
    rows = []
    for (context, kind), (kept, size) in bar(runs.items(), desc="f) peak memory", total=len(runs), unit="process"):
        row = measure(handle, context, kept, HEAD, size)
        rows.append({"context": context, "run": kind} | row)
    base = rows[0]["peak_bytes"]
    for row in rows:
        row["peak_vs_reference"] = row["peak_bytes"] / base
    left_out = [c for c in contexts if c not in fits]
    return {"budget": budget, "chunk": chunk, "reference": reference, "scorer": CUT_SCORER,
            "peak_measured_by": peak_measured_by(cuda),
            "rows": rows, "left_out": {str(c): f"{handle.info.name} has {handle.info.max_positions} positions"
                                       for c in left_out}}


def print_peak(fig: dict) -> None:
    """The table: per context and run, the cache bytes kept, the peak memory and its ratio to the reference run's."""
    print(f"   budget {fig['budget']} entries per KV head, cut by {fig['scorer']}; chunked: prefilled {fig['chunk']} "
          f"tokens at a time, cut after each; peak: {fig['peak_measured_by']}")
    ratio = f"/ {fig['reference']} full"
    print(f"   {'context':>8} {'run':>8} {'cache bytes':>14} {'peak memory':>14} {ratio:>12}")
    for row in fig["rows"]:
        print(f"   {row['context']:>8} {row['run']:>8} {row['cache_bytes']:>14,} {_mib(row['peak_bytes']):>14} "
              f"{row['peak_vs_reference']:>12.3f}")
    for context, why in fig["left_out"].items():
        print(f"   {context} tokens left out: {why}")
