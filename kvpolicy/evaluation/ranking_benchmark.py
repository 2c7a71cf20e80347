"""Benchmark of the learned policy on held-out traces: ranking quality against every baseline, and cost.

    python -m kvpolicy.evaluation.ranking_benchmark --traces TRAIN_DIR --val VAL_DIR [--test TEST_DIR]
        [--checkpoint CKPT]

Trains with the default settings (unless --checkpoint is given), then prints
- the mean normalized ranking cost cost(σ)/cost(sorted u) (1.0 = oracle) of KVP, StreamingLLM, KNorm, KeyDiff,
  LagKV, Random, TOVA, SnapKV and the oracle, over every (held-out prompt, layer, KV head), and the per-budget
  curve (share of the future attention evicted at each absolute budget, sinks and recent window included in
  the budget as in `Budget`). Costs follow the inference protocol (kvpolicy.policy.protocol): only the evictable
  tokens are ranked, the first `sinks` and last `recent` (the checkpoint's training settings) are always kept, by
  every method. Scores come from the evaluation's `trace_scores`, so TOVA and SnapKV use the question's attention
  stored with the traces, and the figures are those `kvp sweep` records for traces;
- training wall time against the time it took to generate the training traces (from their manifest),
  steps/s and tokens/s, parameters and checkpoint bytes, and the time to score all layers at 2K tokens as a
  share of the 2K prefill (with the real model; --no-timing skips it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Sequence

import torch

from kvpolicy.errors import KVPError
from kvpolicy.evaluation.costs import trace_scorable, trace_scores
from kvpolicy.evaluation.lineup import Contender, make_contenders
from kvpolicy.policy import checkpoint as ckpt
from kvpolicy.policy.protocol import RECENT, SINKS, evictable_cost, evicted_shares
from kvpolicy.traces.store import TraceReader, TraceSample

HEURISTICS = ("streaming_llm", "knorm", "keydiff", "lagkv", "random")  # attention-free
QUERY_BASELINES = ("tova", "snapkv")  # scores recorded with held-out traces
DEFAULT_BUDGETS = (64, 128, 256, 512)

# (trace, sample index) -> scores (L, H, T), higher = keep
Method = Callable[[TraceSample, int], torch.Tensor]


def scorer_method(reader: TraceReader, contender: Contender) -> Method:
    """A contender's scores on the traces of `reader`, exactly as the evaluation's trace costs compute them."""
    return lambda trace, sample: trace_scores(reader, sample, contender, trace)


def evaluate(reader, methods: dict[str, Method], budgets: Sequence[int], sinks: int = SINKS, recent: int = RECENT,
             samples: Sequence[int] | None = None) -> dict[str, dict]:
    """Per method: mean normalized cost over (prompt, layer, head), its per-layer means, and the mean share of
    future utility evicted at each budget (budgets count sinks and recent). Oracle included as "Oracle"."""
    samples = list(range(len(reader))) if samples is None else list(samples)
    if not samples:
        raise KVPError("no held-out traces to evaluate on")
    costs: dict[str, list[torch.Tensor]] = {name: [] for name in [*methods, "Oracle"]}
    lost: dict[str, list[torch.Tensor]] = {name: [] for name in costs}
    for sample in samples:
        trace = reader.read_layers(sample)
        utility = trace.utility.float()
        for name in costs:
            scores = utility if name == "Oracle" else methods[name](trace, sample)
            costs[name].append(evictable_cost(scores, utility, sinks, recent))  # (L, H)
            lost[name].append(evicted_shares(scores, utility, budgets, sinks, recent)[0])  # (L, H, n_budgets)
    results = {}
    for name in costs:
        c = torch.stack(costs[name])  # (S, L, H)
        f = torch.stack(lost[name])  # (S, L, H, nb)
        results[name] = {
            "normalized_cost": float(c.mean()),
            "per_layer": [round(v, 4) for v in c.mean(dim=(0, 2)).tolist()],
            "evicted_share": {int(b): float(v) for b, v in zip(budgets, f.mean(dim=(0, 1, 2)).tolist())},
        }
    return results


def scoring_overhead(checkpoint: Path, context: int = 2048, repeats: int = 3) -> dict[str, float]:
    """Median time to score every layer with KVP on a `context`-token prefill, and the prefill itself."""
    from kvpolicy.compression.engine import prefill, rank
    from kvpolicy.compression.scorers import make_scorer
    from kvpolicy.data.essays import load_essays
    from kvpolicy.models import load_model

    handle = load_model(ckpt.read_config(checkpoint)["model"]["name"])
    scorer = make_scorer(f"kvp:{checkpoint}", model=handle.info)
    text = " ".join(e.text for e in load_essays()[:4])
    ids = handle.encode(text)[:, :context]
    prefill_s, score_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, _ = prefill(handle, ids)
        t1 = time.perf_counter()
        rank(handle, state, scorer)
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        score_s.append(t2 - t1)
    p, s = statistics.median(prefill_s), statistics.median(score_s)
    return {"context": ids.shape[1], "prefill_s": round(p, 4), "score_all_layers_s": round(s, 4),
            "share_of_prefill": round(s / p, 5)}


def _print_table(results: dict[str, dict], budgets: Sequence[int]) -> None:
    header = f"{'method':<14}{'norm. cost':>11}" + "".join(f"{f'b={b}':>9}" for b in budgets)
    print(header)
    order = sorted(results, key=lambda n: results[n]["normalized_cost"])
    for name in order:
        r = results[name]
        print(f"{name:<14}{r['normalized_cost']:>11.3f}" + "".join(f"{r['evicted_share'][b]:>9.3f}" for b in budgets))
    print("(norm. cost: cost(σ)/cost(sorted u), 1 = oracle; "
          "b=N: share of future attention evicted keeping N tokens/head)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", required=True, help="training traces")
    parser.add_argument("--val", required=True, help="validation traces (best checkpoint)")
    parser.add_argument("--test", help="held-out traces to report on (default: --val)")
    parser.add_argument("--checkpoint", help="evaluate this checkpoint instead of training one")
    parser.add_argument("--out", help="where to write the trained checkpoint (default: a temporary directory)")
    parser.add_argument("--steps", type=int, help="training steps (default: TrainConfig's)")
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)))
    parser.add_argument("--no-timing", action="store_true", help="skip the real-model scoring-time measurement")
    parser.add_argument("--json", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]

    from kvpolicy.progress import silence_libraries
    from kvpolicy.training.trainer import TrainConfig, Trainer

    silence_libraries()
    train, val = TraceReader(args.traces), TraceReader(args.val)
    test = TraceReader(args.test) if args.test else val
    report: dict = {"train_traces": args.traces, "val_traces": args.val, "test_traces": args.test or args.val}
    tmp = None
    if args.checkpoint:
        path = Path(args.checkpoint)
    else:
        tmp = None if args.out else tempfile.TemporaryDirectory()
        path = Path(args.out or tmp.name) / "kvp"
        config = TrainConfig(**({"steps": args.steps} if args.steps else {}))
        result = Trainer(train, path, val=val, config=config, resume=False).run()
        report["training"] = {"steps": result.steps, "seconds": round(result.seconds, 1),
                              "steps_per_s": round(result.steps_per_s, 3), "tokens_per_s": round(result.tokens_per_s),
                              "best_step": result.best_step, "best_val_reward": round(result.best_val_reward, 4)}
    loaded = ckpt.load_checkpoint(path)
    state = loaded.config["state"]
    report.setdefault("training", {"steps": state["step"], "seconds": state["elapsed_s"],
                                   "steps_per_s": round(state["step"] / max(state["elapsed_s"], 1e-9), 3)})
    report["training"]["config"] = loaded.config["training"]
    generation = train.manifest.get("generation_seconds")
    report["trace_generation_seconds"] = generation
    report["parameters"] = loaded.policy.n_parameters()
    report["checkpoint_bytes"] = (path / ckpt.WEIGHTS).stat().st_size
    train_cfg = loaded.config["training"]

    contenders = [c for c in make_contenders([f"kvp:{path}", *HEURISTICS, *QUERY_BASELINES]) if trace_scorable(c, test)]
    methods = {c.label: scorer_method(test, c) for c in contenders}
    attention_free = [c.label for c in contenders if c.kind == "heuristic" and c.query_window == 0]
    query_based = [c.label for c in contenders if c.kind == "heuristic" and c.query_window != 0]
    t0 = time.perf_counter()
    results = evaluate(test, methods, budgets, train_cfg["sinks"], train_cfg["recent"])
    report["evaluation_seconds"] = round(time.perf_counter() - t0, 1)
    report["ranking"] = results
    if not args.no_timing:
        report["scoring"] = scoring_overhead(path)

    _print_table(results, budgets)
    best_free = min(attention_free, key=lambda n: results[n]["normalized_cost"])
    kvp = results["KVP"]["normalized_cost"]
    free = results[best_free]["normalized_cost"]
    print(f"KVP {kvp:.3f} vs best attention-free {best_free} {free:.3f}: ratio {kvp / free:.2f}, "
          f"excess over oracle ratio {(kvp - 1) / max(free - 1, 1e-9):.2f}")
    for label in query_based:
        print(f"KVP vs {label}: {kvp:.3f} vs {results[label]['normalized_cost']:.3f}")
    t = report["training"]
    ratio = f"; trace generation took {generation:.0f} s (training/generation = {t['seconds'] / generation:.2f})"
    print(f"training: {t['steps']} steps in {t['seconds']:.0f} s ({t['steps_per_s']} steps/s"
          + (f", {t['tokens_per_s']:,} tokens/s" if "tokens_per_s" in t else "") + ")" + (ratio if generation else ""))
    print(f"policy: {report['parameters']:,} parameters, checkpoint {report['checkpoint_bytes']:,} bytes")
    if "scoring" in report:
        s = report["scoring"]
        print(f"scoring all layers at {s['context']} tokens: {s['score_all_layers_s'] * 1000:.0f} ms = "
              f"{100 * s['share_of_prefill']:.2f}% of the {s['prefill_s']:.2f} s prefill")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except KVPError as err:
        print(f"benchmark: error: {err}", file=sys.stderr)
        sys.exit(2)
