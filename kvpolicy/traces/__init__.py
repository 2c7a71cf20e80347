"""Traces: future-utility training data recorded from real model runs.

sources (RULER-style tasks, ShareGPT dialogues, essays, their mix) → record (prefill, greedy or reference future,
one chunk over the prompt cache; attention inputs recorded and greedy decoding from models/) → utility (future
queries' grouped attention to each prompt token) + baselines (TOVA, SnapKV scores), both from models/attention.py's
causal window attention → store (sharded safetensors + manifest; `TraceReader`) ← pipeline / cli (`kvp traces`,
torchrun-aware).
"""
