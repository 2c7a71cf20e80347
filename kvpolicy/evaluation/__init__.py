"""Evaluation: benchmarks (tasks/), their runners (qa, perplexity, bounded_stream, costs), the sweep over models ×
scorers × budgets × tasks × protocols, and the resumable JSONL results store (typed `Result` records) the report reads;
bench/ is `kvp bench`: costs, memory and speed side by side, and the policy's ranking cost on held-out traces.

    from kvpolicy.evaluation.sweep import SweepConfig, run_sweep
    run_sweep(SweepConfig(out="results.jsonl", tasks=["ruler", "dialogue"], budgets=["128", "256", "0.5"]))
"""
