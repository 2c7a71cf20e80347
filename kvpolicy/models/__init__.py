"""Models: the registry of supported models, the loader that turns them into a `ModelHandle`, and the mechanics
every later stage runs on a model: attention.py (recording attention inputs, recomputing queries, causal window
attention) and decoding.py (the one greedy decoding loop).

The names below are imported on first use, so that reading the registry (as `kvp --help` does) never imports torch.
"""

import importlib

_HOMES = {
    "ModelHandle": "kvpolicy.models.handle",
    "ModelInfo": "kvpolicy.models.handle",
    "load_model": "kvpolicy.models.loader",
    "MODELS": "kvpolicy.models.registry",
    "ModelSpec": "kvpolicy.models.registry",
    "resolve_model": "kvpolicy.models.registry",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'kvpolicy.models' has no attribute '{name}'")
    return getattr(importlib.import_module(_HOMES[name]), name)
