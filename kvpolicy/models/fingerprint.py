"""A model's fingerprint: 16 hex digits that traces and checkpoints record, so that a policy is never applied
to a model other than the one it was trained for.

Registered (GGUF) models are fingerprinted once, over their dequantized weights, when they are converted into
the cache (`weights_fingerprint`). Hugging Face models are fingerprinted from their files
(`files_fingerprint`): the config plus the sha256 of every weight file, which the hub cache already names (a
blob's file name is its sha256) and which is hashed once and remembered for local files, so that loading a
large model never hashes its weights again. Neither depends on the device or dtype a model is loaded in.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from kvpolicy.io import sha256_file, write_json

VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "quantization_config")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _config_bytes(config: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in config.items() if k not in VOLATILE_CONFIG}, sort_keys=True,
                      default=str).encode()


def weights_fingerprint(model) -> str:
    """sha256 over the config (minus volatile fields) and every parameter's name, shape, dtype and bytes."""
    import torch

    h = hashlib.sha256(_config_bytes(model.config.to_dict()))
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()[:16]


def file_digest(path: Path, memo: Path) -> str:
    """sha256 of a weight file: the name of the hub-cache blob it links to, else remembered in `memo` (a JSON file
    keyed by resolved path, size and mtime), else computed and remembered."""
    real = Path(os.path.realpath(path))
    if _SHA256.fullmatch(real.name) and real.parent.name == "blobs":
        return real.name
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    known = _read_memo(memo)
    if key in known:
        return known[key]
    digest = sha256_file(real)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with open(memo.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            write_json(memo, {**_read_memo(memo), key: digest})
    except OSError:
        pass  # an unwritable cache only costs hashing again next time
    return digest


def _read_memo(memo: Path) -> dict[str, str]:
    try:
        known = json.loads(memo.read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def files_fingerprint(directory: Path, config: dict[str, Any], memo: Path) -> str:
    """sha256 over the config (minus volatile fields) and the name and sha256 of every weight file in `directory`."""
    h = hashlib.sha256(_config_bytes(config))
    files = sorted(p for p in Path(directory).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    for path in files:
        h.update(f"{path.name}:{file_digest(path, memo)}".encode())
    return h.hexdigest()[:16]
