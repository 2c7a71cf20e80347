"""Compression: cut a model's KV cache to a budget with any scorer and keep generating on it.

budget.py (Budget, keep_indices) → scorers/ (the registry of eviction methods) → state.py (KVState: cache +
true positions + the attention inputs recorded for query-based scorers + the token ids of an uncut cache, which
KVzip re-reads) → engine.py (prefill, rank, evict, compress, greedy_decode, continuation_nll, generate, under a
protocol of protocols.py) → multi_turn.py (dialogue: feed_turn, continue_dialogue, converse) → press.py
(KVPolicyPress for kvpress) → cli.py (`kvp generate`).
Recording attention inputs, the greedy loop and TOVA's and SnapKV's settings are shared with traces and live in
models/ (attention.py, decoding.py, baseline_defaults.py).
"""
