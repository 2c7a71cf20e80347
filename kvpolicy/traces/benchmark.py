"""Trace-generation benchmark: samples/min, share of wall time inside the model's own forward passes and
generation, and bytes on disk per prompt token per KV head (goal: <= 2·head_dim·2 + 8).

    python -m kvpolicy.traces.benchmark --contexts 1024 2048 --n 2 --future reference --future-tokens 64

Each context records n fresh traces through the real pipeline (prompt generation, model runs, utility, baselines,
shards, manifest) into a temporary directory; wall time covers all of it, after one untimed warm-up sample.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kvpolicy.models.registry import DEFAULT_MODEL
from kvpolicy.progress import silence_libraries
from kvpolicy.traces.baselines import BASELINES
from kvpolicy.traces.pipeline import TraceRunConfig, record_traces
from kvpolicy.traces.future import FUTURE_MODES, FutureConfig
from kvpolicy.traces.sources import SOURCES
from kvpolicy.traces.store import shard_paths


def measure(handle, cfg: TraceRunConfig) -> dict:
    """Record cfg's traces into a temporary directory; return the figures."""
    with tempfile.TemporaryDirectory(prefix="kvp-bench-") as tmp:
        start = time.perf_counter()
        manifest = record_traces(handle, cfg, tmp, show_progress=False)
        wall = time.perf_counter() - start
        on_disk = sum(p.stat().st_size for p in shard_paths(Path(tmp)))
    info = handle.info
    cells = manifest["prompt_tokens"] * info.n_layers * info.n_kv_heads  # (token, layer, KV head) entries
    baseline_bytes = 4 * cells * len(cfg.baselines)
    return {
        "context": cfg.context_tokens,
        "samples_per_min": 60 * cfg.n / wall,
        "model_share": manifest["model_seconds"] / wall,
        "bytes_per_token_head": on_disk / cells,
        "core_bytes_per_token_head": (on_disk - baseline_bytes) / cells,
        "mean_future": sum(s["future_length"] for s in manifest["samples"]) / cfg.n,
        "wall": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--source", default="ruler", choices=SOURCES)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--n", type=int, default=2, help="samples per context")
    parser.add_argument("--future", default="reference", choices=FUTURE_MODES)
    parser.add_argument("--future-tokens", type=int, default=64)
    parser.add_argument("--baselines", default=",".join(BASELINES), help="comma list or 'none'")
    args = parser.parse_args(argv)
    silence_libraries()
    from kvpolicy.models.loader import load_model

    handle = load_model(args.model)
    baselines = tuple(b for b in args.baselines.split(",") if b and b != "none")
    future = FutureConfig(args.future, args.future_tokens)
    measure(handle, TraceRunConfig(args.source, n=1, context_tokens=256, future=future, baselines=baselines))  # warm-up
    info = handle.info
    goal = 2 * info.head_dim * 2 + 8
    print(f"{info.name}: source {args.source}, future {args.future} (max {args.future_tokens} tokens), "
          f"baselines {', '.join(baselines) or 'none'}, {args.n} samples per context")
    print(f"{'context':>8} {'samples/min':>12} {'in model':>9} {'mean F':>7} {'B/token/head':>13} "
          f"{'without baselines':>18} {'goal':>5}")
    for context in args.contexts:
        cfg = TraceRunConfig(args.source, n=args.n, context_tokens=context, future=future, baselines=baselines)
        r = measure(handle, cfg)
        print(f"{context:>8} {r['samples_per_min']:>12.2f} {r['model_share']:>8.1%} {r['mean_future']:>7.1f} "
              f"{r['bytes_per_token_head']:>13.1f} {r['core_bytes_per_token_head']:>18.1f} {goal:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
