"""Models: the registry of supported models, the loader that turns them into a `ModelHandle`, and the mechanics
every later stage runs on a model: attention.py (recording attention inputs, recomputing queries, causal window
attention) and decoding.py (the one greedy decoding loop)."""

from kvpolicy.models.handle import ModelHandle, ModelInfo
from kvpolicy.models.loader import load_model
from kvpolicy.models.registry import MODELS, ModelSpec, resolve_model

__all__ = ["MODELS", "ModelHandle", "ModelInfo", "ModelSpec", "load_model", "resolve_model"]
