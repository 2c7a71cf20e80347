"""Evaluation: benchmarks (tasks/), their runners (qa, perplexity, costs), the sweep over models × scorers ×
budgets × tasks × protocols, and the resumable JSONL results store (typed `Result` records) the report reads;
ranking_benchmark.py compares the learned policy with every heuristic on held-out traces.

    from kvpolicy.evaluation.sweep import SweepConfig, run_sweep
    run_sweep(SweepConfig(out="results.jsonl", tasks=["ruler", "dialogue"], budgets=["128", "256", "0.5"]))
"""
