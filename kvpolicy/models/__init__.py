"""Models: the registry of supported models and the loader that turns them into a `ModelHandle`."""

from kvpolicy.models.handle import ModelHandle, ModelInfo
from kvpolicy.models.loader import load_model
from kvpolicy.models.registry import MODELS, ModelSpec, resolve_model

__all__ = ["MODELS", "ModelHandle", "ModelInfo", "ModelSpec", "load_model", "resolve_model"]
