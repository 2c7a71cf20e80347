"""Record a set of traces into a directory: prompts → model runs → shards → manifest, resumable, rank-aware.

Under several processes (torchrun) rank r records the samples i with i % world == r that no complete shard holds
yet and writes its own shards; `finish` (rank 0, after every rank is done) merges one manifest. `record_on_every_rank`
is that whole run, with the ranks agreeing on failures so that none waits forever on another (`kvp traces`).
"""

from __future__ import annotations

import functools
import hashlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kvpolicy
from kvpolicy.data.ruler import TASKS
from kvpolicy.distributed import AnotherRankFailed, init_distributed, shutdown_distributed
from kvpolicy.errors import KVPError
from kvpolicy.io import check_writable
from kvpolicy.models.handle import ModelHandle
from kvpolicy.progress import bar
from kvpolicy.signals import deferred_interrupts
from kvpolicy.models.baseline_defaults import SNAPKV_KERNEL
from kvpolicy.traces.baselines import BASELINES, WINDOWS
from kvpolicy.traces.future import FutureConfig
from kvpolicy.traces.record import record_trace
from kvpolicy.traces.sources import (DESCRIPTIONS, SOURCES, TRACE_SPLITS, longest_context, source_seeds,
                                     trace_prompts)
from kvpolicy.traces.store import (DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, DEFAULT_SHARD_SECONDS, FORMAT, STATES,
                                   TraceWriter, write_manifest)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """kvpolicy version + a hash of the code that shapes traces (this package and the prompt generators)."""
    root = Path(kvpolicy.__file__).parent
    files = sorted((root / "traces").glob("*.py")) + [root / "data" / name
                                                      for name in ("ruler.py", "dialogue.py", "documents.py")]
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + path.read_bytes())
    return f"{kvpolicy.__version__}+{h.hexdigest()[:12]}"


@dataclass
class TraceRunConfig:
    """One `kvp traces` run: n prompts of `source`/`split` at `context_tokens`, futures per `future`."""

    source: str
    split: str = "train"
    n: int = 16
    context_tokens: int = 2048
    future: FutureConfig = field(default_factory=FutureConfig)
    seed: int = 0
    tasks: tuple[str, ...] | None = None
    baselines: tuple[str, ...] | None = None  # None: TOVA + SnapKV on held-out splits (val, test), none on train
    hidden_states: bool = False  # also store each layer's input hidden states (for `kvp train --hidden-states`)
    shard_bytes: int = DEFAULT_SHARD_BYTES
    shard_samples: int = DEFAULT_SHARD_SAMPLES  # a shard is also written after this many samples...
    shard_seconds: float = DEFAULT_SHARD_SECONDS  # ...or this long after its first one (what a kill can lose)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise KVPError(f"unknown trace source '{self.source}'; use one of: {', '.join(SOURCES)}")
        if self.split not in TRACE_SPLITS:
            raise KVPError(f"traces use the splits {', '.join(TRACE_SPLITS)}; '{self.split}' is not one of them "
                           "('eval' prompts are reserved for evaluation)")
        if self.n < 1:
            raise KVPError(f"--n must be at least 1, got {self.n}")
        if self.context_tokens < 16:
            raise KVPError(f"--context must be at least 16 tokens, got {self.context_tokens}")
        if self.shard_samples < 1 or self.shard_seconds <= 0:
            raise KVPError(f"--shard-samples must be at least 1 and --shard-seconds positive, got "
                           f"{self.shard_samples} and {self.shard_seconds}")
        if self.baselines is None:  # the ranking benchmark runs on held-out traces; training never reads them
            self.baselines = () if self.split == "train" else BASELINES
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise KVPError(f"unknown baselines {unknown}; known: {', '.join(BASELINES)}")
        if self.tasks is not None and self.source != "ruler":
            raise KVPError("--tasks applies to --source ruler only")
        unknown = sorted(set(self.tasks or ()) - set(TASKS))
        if unknown:
            raise KVPError(f"unknown RULER tasks {unknown}; known: {', '.join(TASKS)}")

    def manifest_fields(self, handle: ModelHandle) -> dict:
        """The run description stored in every shard and in the manifest."""
        return {
            "format": FORMAT,
            "model": handle.info.to_dict(),
            "source": self.source,
            "source_description": DESCRIPTIONS[self.source],
            "split": self.split,
            "context_tokens": self.context_tokens,
            "future": self.future.describe(),
            "seeds": source_seeds(self.source, self.seed, self.tasks),
            "model_dtype": handle.dtype_name,
            "baselines": {"names": list(self.baselines), "dtype": "float32",
                          "windows": {name: WINDOWS[name] for name in self.baselines}, "snapkv_kernel": SNAPKV_KERNEL,
                          "definition": "kvpress TOVAPress/SnapKVPress.score, batched over layers"},
            "hidden_states": self.hidden_states,
            "dtypes": {"keys": "float16", "values": "float16", "utility": "float32"}
            | ({STATES: "float16"} if self.hidden_states else {}),
            "code_version": code_version(),
        }


@dataclass
class RunResult:
    recorded: int  # samples recorded by this process in this call
    skipped: int  # samples of this rank already in complete shards
    seconds: float
    model_seconds: float


def record_shards(handle: ModelHandle, cfg: TraceRunConfig, out: str | Path, rank: int = 0, world: int = 1,
                  show_progress: bool = True) -> RunResult:
    """Record this rank's missing samples into shards in `out` (no manifest: see `finish`)."""
    check_writable(out, "trace directory", directory=True)
    longest = longest_context(cfg.source, cfg.context_tokens)
    if longest >= handle.info.max_positions:
        raise KVPError(f"refused: --context {cfg.context_tokens} asks for prompts of {longest} tokens, which "
                       f"reach {handle.info.name}'s maximum of {handle.info.max_positions} positions; use a shorter "
                       "--context")
    if longest + cfg.future.max_tokens > handle.info.max_positions:
        warnings.warn(f"futures will be truncated: --context {cfg.context_tokens} + --future-tokens "
                      f"{cfg.future.max_tokens} exceed {handle.info.name}'s {handle.info.max_positions} positions",
                      stacklevel=2)
    start = time.perf_counter()
    config = cfg.manifest_fields(handle)
    writer = TraceWriter(out, config, rank=rank, shard_bytes=cfg.shard_bytes, shard_samples=cfg.shard_samples,
                         shard_seconds=cfg.shard_seconds)
    mine = [i for i in range(rank, cfg.n, world)]
    todo = [i for i in mine if i not in writer.done]
    threads = torch.get_num_threads()
    if todo and writer.threads - {threads}:
        warnings.warn(f"{out} holds samples recorded with {', '.join(map(str, sorted(writer.threads)))} CPU "
                      f"thread(s), this run uses {threads}: float sums differ with the thread count, so its samples "
                      "may differ from an uninterrupted run's in the last bits (about 1e-6); resume with the same "
                      "OMP_NUM_THREADS for bit-identical traces", stacklevel=2)
    progress = bar(total=len(todo), desc=f"traces rank {rank}" if world > 1 else "traces", unit="sample") \
        if show_progress else None
    model_seconds = 0.0
    sample_start = time.perf_counter()
    prompts = trace_prompts(handle, cfg.source, cfg.split, cfg.n, cfg.context_tokens, cfg.seed, cfg.tasks, todo)
    try:
        for prompt in prompts:
            prompt_ids = handle.encode(prompt.prompt)
            reference_ids = handle.encode(prompt.reference) if cfg.future.mode == "reference" else None
            kept = cfg.future.kept_tokens(prompt_ids.shape[1], cfg.seed, prompt.index)
            trace = record_trace(handle, prompt_ids, cfg.future, reference_ids, cfg.baselines, cfg.hidden_states,
                                 kept)
            seconds = time.perf_counter() - sample_start
            sample_start = time.perf_counter()  # writing this sample (and maybe a shard) counts toward the next one
            model_seconds += trace.model_seconds
            record = {"id": prompt.id, "length": trace.length, "future_length": len(trace.future_ids),
                      "prompt_length": prompt_ids.shape[1],
                      "seconds": round(seconds, 3), "model_seconds": round(trace.model_seconds, 3),
                      "code_version": code_version(), "warnings": trace.warnings, "threads": threads,
                      **prompt.meta}
            tensors = {"keys": trace.keys, "values": trace.values, "utility": trace.utility}
            tensors |= {f"baseline.{name}": scores for name, scores in trace.baselines.items()}
            tensors |= {STATES: trace.states} if trace.states is not None else {}
            with deferred_interrupts():  # a record is queued with its tensors, or not at all
                writer.add(prompt.index, record, tensors)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(tokens=trace.length, future=len(trace.future_ids))
    finally:  # on an error or Ctrl-C the finished samples still reach disk, so a rerun resumes after them
        writer.close()
        if progress is not None:
            progress.close()
    return RunResult(len(todo), len(mine) - len(todo), time.perf_counter() - start, model_seconds)


def finish(handle: ModelHandle, cfg: TraceRunConfig, out: str | Path, extra: dict | None = None) -> dict:
    """Merge every shard into manifest.json (all n samples must be present)."""
    return write_manifest(out, cfg.manifest_fields(handle), cfg.n, extra)


def record_traces(handle: ModelHandle, cfg: TraceRunConfig, out: str | Path, show_progress: bool = True) -> dict:
    """Single-process convenience: record every missing sample, then write the manifest; returns it."""
    result = record_shards(handle, cfg, out, show_progress=show_progress)
    return finish(handle, cfg, out, {"last_run": {"world_size": 1, "wall_seconds": round(result.seconds, 3),
                                                  "recorded": result.recorded, "skipped": result.skipped}})


@dataclass
class RanksResult:
    """What `record_on_every_rank` did, summed over the ranks."""

    manifest: dict | None  # the manifest rank 0 wrote; None on the other ranks
    model_name: str
    recorded: int  # samples recorded now
    skipped: int  # samples already in complete shards
    wall_seconds: float  # rank 0's wall time before the manifest


def record_on_every_rank(model: str, cfg: TraceRunConfig, out: str | Path, device: torch.device,
                         dtype: str | None = None) -> RanksResult:
    """Record `cfg`'s traces of `model` into `out` on this process's share (its rank under torchrun; all of them in a
    plain run), then, once every rank succeeded, write the manifest on rank 0. Every rank takes part in the same
    status all-reduces whatever happened to it, so a failure on one rank stops all of them: the failed rank raises
    its own error (KVPError, OSError or KeyboardInterrupt), the others AnotherRankFailed. Resumable like
    `record_shards`. `device` is resolved (CUDA: one GPU per rank, cuda:LOCAL_RANK)."""
    from kvpolicy.models.loader import load_model
    from kvpolicy.traces.store import check_trace_directory

    ctx = init_distributed(device.type)
    start = time.perf_counter()
    failure: BaseException | None = None
    recorded = skipped = 0
    try:
        check_writable(out, "trace directory", directory=True)  # before minutes of model loading
        check_trace_directory(out)
        handle = load_model(model, device=ctx.device, dtype=dtype)
        result = record_shards(handle, cfg, out, rank=ctx.rank, world=ctx.world, show_progress=ctx.main)
        recorded, skipped = result.recorded, result.skipped
    except (KVPError, OSError, KeyboardInterrupt) as err:
        failure = err
    try:
        # every rank reaches this point even after an error, so no rank waits forever on the others
        all_ok = ctx.all_reduce([int(failure is None)], "min")[0]
        recorded, skipped = ctx.all_reduce([recorded, skipped], "sum")
        manifest, wall = None, 0.0
        if all_ok and ctx.main:
            try:
                wall = time.perf_counter() - start
                manifest = finish(handle, cfg, out, {"last_run": {
                    "world_size": ctx.world, "wall_seconds": round(wall, 3), "recorded": recorded, "skipped": skipped}})
            except KVPError as err:
                failure = err
        manifest_ok = ctx.all_reduce([int(failure is None)], "min")[0]
    finally:
        shutdown_distributed(ctx)
    if failure is not None:
        raise failure
    if not (all_ok and manifest_ok):
        raise AnotherRankFailed(ctx.rank)
    return RanksResult(manifest, handle.info.name, recorded, skipped, wall)
