"""Evaluation: benchmarks (tasks/), their runners (qa, perplexity, costs), the sweep over models × scorers ×
budgets × tasks × protocols, and the resumable JSONL results store the report reads.

    from kvpolicy.evaluation.sweep import SweepConfig, run_sweep
    run_sweep(SweepConfig(out="results.jsonl", tasks=["ruler", "dialogue"], budgets=["128", "256", "0.5"]))
"""
