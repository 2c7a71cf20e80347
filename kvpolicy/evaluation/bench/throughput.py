"""Section e: how fast traces are recorded and a policy is trained on them, and what the traces take on disk.

Trace recording runs the real pipeline (prompt generation, model runs, utility, shards, manifest); its speed is
prompt tokens per second of wall time. Training is `Trainer` as `kvp train` runs it; its first step, where torch.compile
builds its kernels, is timed apart from the rest (validation and checkpoint writing included); its tokens are the
evictable tokens it ranks. `--train-shape` also times training for another model's KV-cache shape, on synthetic
traces of that shape.
The policy this section trains is the one sections a and d time when no --policy is given: their timing does
not depend on how well it ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

from kvpolicy.distributed import DistContext
from kvpolicy.models import ModelHandle
from kvpolicy.models.placement import resolve_device
from kvpolicy.traces.future import FutureConfig
from kvpolicy.traces.pipeline import TraceRunConfig, record_traces
from kvpolicy.traces.store import shard_paths
from kvpolicy.training.config import TrainConfig
from kvpolicy.training.data import TraceSource
from kvpolicy.training.synthetic import SyntheticTraces
from kvpolicy.training.trainer import Trainer

SOURCE = "ruler"


def measure_traces(handle: ModelHandle, n: int, context: int, future: int, out: Path) -> dict:
    """Record n greedy-future training traces of `context` tokens into `out`: prompt tokens per second, the share
    of the wall time inside the model, and bytes on disk per prompt token per KV head (the goal: fp16 key and value,
    2·head_dim·2 bytes, plus 8 for utility and position)."""
    cfg = TraceRunConfig(SOURCE, n=n, context_tokens=context, future=FutureConfig("greedy", future))
    start = time.perf_counter()
    manifest = record_traces(handle, cfg, out)
    wall = time.perf_counter() - start
    info = handle.info
    cells = manifest["prompt_tokens"] * info.n_layers * info.n_kv_heads  # (token, layer, KV head) entries
    return {"source": SOURCE, "samples": n, "context": context, "future_tokens": future,
            "prompt_tokens": manifest["prompt_tokens"], "seconds": wall,
            "tokens_per_s": manifest["prompt_tokens"] / wall, "model_share": manifest["model_seconds"] / wall,
            "bytes_per_token_head": sum(p.stat().st_size for p in shard_paths(out)) / cells,
            "goal_bytes_per_token_head": 2 * info.head_dim * 2 + 8}


def measure_training(source: TraceSource, steps: int, out: Path, device: str, compile: bool = True,
                     progress: bool = True) -> dict:
    """Train a policy on `source` with the default settings into `out` (on `device`): one first step, which builds
    torch.compile's kernels (with `compile`), then `steps` more, timed apart: steps and ranked tokens per second."""
    config = TrainConfig(steps=1, val_every=1 + steps, checkpoint_every=1 + steps, compile=compile)
    ctx = DistContext(device=resolve_device(device))  # one process, also under torchrun (kvp fit's rank 0 measures)
    trainer = Trainer(source, out, config=config, ctx=ctx, resume=False, progress=progress)
    start = time.perf_counter()
    trainer.run()
    first = time.perf_counter() - start
    config.steps = 1 + steps  # the same run goes on: its compiled forward is reused
    result = trainer.run()
    m = source.model
    return {"steps": steps, "batch": config.batch, "tokens": config.tokens, "first_step_s": first,
            "seconds": steps / result.steps_per_s, "steps_per_s": result.steps_per_s,
            "tokens_per_s": result.tokens_per_s, "parameters": result.n_parameters,
            "shape": [m.n_layers, m.n_kv_heads, m.head_dim]}


def synthetic_at_shape(shape: tuple[int, int, int], length: int = 512, n: int = 20) -> SyntheticTraces:
    """Traces for a model with this KV-cache shape (layers, KV heads, head dim), made up rather than recorded: a
    training step's cost depends on the shape, the batch and the tokens ranked per prompt, not on where the keys
    came from, so this times the training of a bigger model's policy without that model (prompts are kept short:
    only validation reads whole prompts, and all of them stay in RAM)."""
    n_layers, n_kv_heads, head_dim = shape
    return SyntheticTraces(n, length=length, n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim)


def print_throughput(fig: dict) -> None:
    """Trace recording speed, bytes on disk, then training speed on those traces and at each --train-shape."""
    t = fig["traces"]
    print(f"   traces: {t['samples']} {t['source']} prompts of {t['context']} tokens, greedy futures up to "
          f"{t['future_tokens']} tokens: {t['prompt_tokens']:,} prompt tokens in {t['seconds']:.1f} s = "
          f"{t['tokens_per_s']:,.0f} tokens/s ({t['model_share']:.0%} inside the model)")
    print(f"   on disk: {t['bytes_per_token_head']:.1f} bytes per prompt token per KV head "
          f"(goal {t['goal_bytes_per_token_head']})")
    for r in [fig["training"], *fig.get("training_at_shape", [])]:
        _print_training(r)


def _print_training(r: dict) -> None:
    layers, heads, dim = r["shape"]
    what = "synthetic traces of that cache shape" if r.get("synthetic") else "those traces"
    print(f"   training on {what}, {layers} layers x {heads} KV heads x head dim {dim} ({r['parameters']:,} "
          f"parameters): first step {r['first_step_s']:.1f} s (torch.compile builds its kernels), then "
          f"{r['steps']} steps of {r['batch']} prompts x {r['tokens']} tokens in "
          f"{r['seconds']:.1f} s = {r['steps_per_s']:.2f} steps/s, {r['tokens_per_s']:,.0f} ranked tokens/s "
          "(validation and checkpoint included)")
