"""kvpolicy: learned per-head KV-cache eviction (KV Policy, KVP).

Pipeline: models → data → traces → training → compression → evaluation → report. The Python API:

    import kvpolicy as kvp
    model = kvp.load_model("smollm2-135m")                  # CUDA + bf16 where available, else CPU + fp32
    policy = kvp.load_policy(model=model)                   # bundled for it, or load_policy("CKPT") (kvp train)
    result = kvp.generate(model, context, question, policy, kvp.Budget(tokens=128))
    moved = kvp.with_allocation(policy, "model")            # the same memory, spread over heads and layers
    press = kvp.KVPolicyPress(compression_ratio=0.5, scorer=policy)  # the same policy inside kvpress
    model.model.generate(**inputs, past_key_values=kvp.EvictingCache(policy, budget=256))  # inside transformers

The names are imported on first use, so `import kvpolicy` (and `kvp --help`) stays light.
"""

from kvpolicy.lazy import lazy_exports

__version__ = "0.1.0"

_HOMES = {
    "load_model": "kvpolicy.models.loader",
    "load_policy": "kvpolicy.compression.scorers.learned",
    "make_scorer": "kvpolicy.compression.scorers",
    "with_allocation": "kvpolicy.compression.scorers.allocated",
    "Budget": "kvpolicy.compression.budget",
    "generate": "kvpolicy.compression.engine",
    "GenerationResult": "kvpolicy.compression.engine",
    "KVPolicyPress": "kvpolicy.compression.press",
    "EvictingCache": "kvpolicy.compression.evicting_cache",
    "KVPError": "kvpolicy.errors",
}

__all__ = sorted(_HOMES)

__getattr__ = lazy_exports(__name__, _HOMES)


def __dir__() -> list[str]:
    """The lazily exported API names too, so that completion finds them before their first use."""
    return sorted(set(globals()) | set(_HOMES))
