"""Traces: future-utility training data recorded from real model runs.

sources (RULER-style tasks, ShareGPT dialogues) → record (prefill, future, one chunk over the prompt cache)
→ utility (future queries' grouped attention to each prompt token) + baselines (TOVA, SnapKV scores)
→ store (sharded safetensors + manifest; `TraceReader`) ← pipeline / cli (`kvp traces`, torchrun-aware).
"""
