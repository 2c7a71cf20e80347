"""Optional section: the learned policy's ranking quality on held-out traces against every baseline.

The mean normalized ranking cost cost(σ)/cost(sorted u) (1.0 = oracle) of KVP, the bench baselines of
compression/catalog.py (attention-free ones, then those reading attention) and the oracle over every (held-out
prompt, layer, KV head), and per budget the share of the future attention evicted (sinks and recent window
included in the budget as in `Budget`). Costs follow the inference protocol (kvpolicy.policy.protocol): only the
evictable tokens are ranked, the first `sinks` and last `recent` (the checkpoint's training settings) are always
kept, by every method. Scores come from the evaluation's `trace_scores`, so the baselines reading attention use
the question's attention stored with the traces, and the figures are those `kvp sweep` records for traces.
Without --policy a policy is trained on --traces (validated on --val) with the default settings, and its
training time is set against the traces' generation time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kvpolicy.compression.catalog import BENCH, CATALOG, attention_free, default_lineup
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.costs import trace_scorable, trace_scores
from kvpolicy.evaluation.lineup import Contender, make_contenders
from kvpolicy.policy import checkpoint as ckpt
from kvpolicy.policy.protocol import RECENT, SINKS, evictable_cost, evicted_shares
from kvpolicy.traces.store import TraceReader, TraceSample
from kvpolicy.training.trainer import Trainer


# (trace, sample index) -> scores (L, H, T), higher = keep
Method = Callable[[TraceSample, int], torch.Tensor]


def baselines() -> tuple[str, ...]:
    """The catalog's bench baselines: the attention-free ones, then those reading attention (their scores come
    from the held-out traces, which store them when recorded with `kvp traces --baselines`)."""
    lineup = default_lineup(BENCH)
    return (*[n for n in lineup if not CATALOG[n].reads_attention], *[n for n in lineup if CATALOG[n].reads_attention])


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


def best_attention_free(reader, samples: Sequence[int], sinks: int = SINKS, recent: int = RECENT) -> tuple[str, float]:
    """The attention-free heuristic of the catalog that ranks the traces `samples` of `reader` best, and its mean
    whole-ranking cost on them as `evaluate` measures it (1 = oracle): minus the validation reward of `kvp train`, so
    the reward a policy reaches on those traces reads beside it."""
    contenders = make_contenders(list(attention_free()))
    costs = evaluate(reader, {c.label: scorer_method(reader, c) for c in contenders}, (), sinks, recent, samples)
    best = min((c.label for c in contenders), key=lambda label: costs[label]["normalized_cost"])
    return best, costs[best]["normalized_cost"]


def train_policy(train: TraceReader, val: TraceReader, out: Path) -> dict:
    """Train a policy with the default settings (`kvp train`'s) into `out`; its training figures."""
    result = Trainer(train, out, val=val, resume=False).run()
    return {"steps": result.steps, "seconds": round(result.seconds, 1), "steps_per_s": round(result.steps_per_s, 3),
            "tokens_per_s": round(result.tokens_per_s), "best_step": result.best_step,
            "best_val_reward": round(result.best_val_reward, 4)}


def measure_ranking(train_dir: str, val_dir: str, test_dir: str | None, policy: Path | None, budgets: Sequence[int],
                    work: Path) -> dict:
    """The ranking costs on --test (default --val) of `policy`, or of one trained into `work` on the training
    traces, against every baseline the traces can score; and the policy's training time, size and parameters."""
    train, val = TraceReader(train_dir), TraceReader(val_dir)
    test = TraceReader(test_dir) if test_dir else val
    report: dict = {"train_traces": train_dir, "val_traces": val_dir, "test_traces": test_dir or val_dir}
    path = policy if policy is not None else work / "ranking-kvp"
    if policy is None:
        report["training"] = train_policy(train, val, path)
    loaded = ckpt.load_checkpoint(path)
    state, train_cfg = loaded.config["state"], loaded.config["training"]
    report.setdefault("training", {"steps": state["step"], "seconds": state["elapsed_s"],
                                   "steps_per_s": round(state["step"] / max(state["elapsed_s"], 1e-9), 3)})
    report["training"]["config"] = train_cfg
    report["trace_generation_seconds"] = train.manifest.get("generation_seconds")
    report["parameters"] = loaded.policy.n_parameters()
    report["checkpoint_bytes"] = (path / ckpt.WEIGHTS).stat().st_size

    contenders = [c for c in make_contenders([f"kvp:{path}", *baselines()]) if trace_scorable(c, test)]
    methods = {c.label: scorer_method(test, c) for c in contenders}
    report["attention_free"] = [c.label for c in contenders if c.kind == "heuristic" and c.attention_free]
    report["query_based"] = [c.label for c in contenders if c.kind == "heuristic" and not c.attention_free]
    start = time.perf_counter()
    report["ranking"] = evaluate(test, methods, budgets, train_cfg["sinks"], train_cfg["recent"])
    report["evaluation_seconds"] = round(time.perf_counter() - start, 1)
    return report


def print_ranking(report: dict) -> None:
    """The cost table (best first), KVP against the baselines, and the policy's training time and size."""
    results = report["ranking"]
    budgets = list(next(iter(results.values()))["evicted_share"])
    print(f"   {'method':<14}{'norm. cost':>11}" + "".join(f"{f'b={b}':>9}" for b in budgets))
    for name in sorted(results, key=lambda n: results[n]["normalized_cost"]):
        shares = "".join(f"{results[name]['evicted_share'][b]:>9.3f}" for b in budgets)
        print(f"   {name:<14}{results[name]['normalized_cost']:>11.3f}{shares}")
    print("   (norm. cost: cost(σ)/cost(sorted u), 1 = oracle; "
          "b=N: share of future attention evicted keeping N tokens/head)")
    best_free = min(report["attention_free"], key=lambda n: results[n]["normalized_cost"])
    kvp, free = results["KVP"]["normalized_cost"], results[best_free]["normalized_cost"]
    print(f"   KVP {kvp:.3f} vs best attention-free {best_free} {free:.3f}: ratio {kvp / free:.2f}, "
          f"excess over oracle ratio {(kvp - 1) / max(free - 1, 1e-9):.2f}")
    for label in report["query_based"]:
        print(f"   KVP vs {label}: {kvp:.3f} vs {results[label]['normalized_cost']:.3f}")
    t, generation = report["training"], report["trace_generation_seconds"]
    ratio = f"; trace generation took {generation:.0f} s (training/generation = {t['seconds'] / generation:.2f})" \
        if generation else ""
    print(f"   training: {t['steps']} steps in {t['seconds']:.0f} s ({t['steps_per_s']} steps/s"
          + (f", {t['tokens_per_s']:,} tokens/s" if "tokens_per_s" in t else "") + ")" + ratio)
    print(f"   policy: {report['parameters']:,} parameters, checkpoint {report['checkpoint_bytes']:,} bytes")
