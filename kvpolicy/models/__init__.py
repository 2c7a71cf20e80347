"""Models: the registry of supported models, the loader that turns them into a `ModelHandle` (placement.py: on
which device and in which dtype; fingerprint.py: which model it is; integrity.py: whether its converted cache is
intact; directory.py: whether a Hugging Face directory is complete and safe to load), and the mechanics every later
stage runs on a model: attention.py (recording attention inputs, recomputing queries, causal window attention),
decoding.py (the one decoding loop, greedy or sampled) and text_stream.py (an answer's text as it is produced).

The names below are imported on first use, so that reading the registry (as `kvp --help` does) never imports torch.
"""

from kvpolicy.lazy import lazy_exports

_HOMES = {
    "ModelHandle": "kvpolicy.models.handle",
    "ModelInfo": "kvpolicy.models.handle",
    "load_model": "kvpolicy.models.loader",
    "MODELS": "kvpolicy.models.registry",
    "ModelSpec": "kvpolicy.models.registry",
    "resolve_model": "kvpolicy.models.registry",
}

__all__ = sorted(_HOMES)

__getattr__ = lazy_exports(__name__, _HOMES)
