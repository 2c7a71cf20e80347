"""Checks of a local Hugging Face model directory before transformers reads it, each failing in one line that says
what to do: a config that is not JSON or asks to run code shipped with the model (`auto_map`), weights only as
pickles (which can run code when loaded, so kvpolicy never loads them), no weights, or a safetensors file that is
truncated or not safetensors at all.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from kvpolicy.errors import KVPError
from kvpolicy.io import check_regular_file, read_json_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CODE_CONFIGS = ("config.json", "tokenizer_config.json")  # where `auto_map` would point transformers at model code
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def _read_json(path: Path, what: str) -> dict:
    value = read_json_file(path, what, f"copy the model's {path.name} again")
    if not isinstance(value, dict):
        raise KVPError(f"{what} {path} is not a JSON object; copy the model's {path.name} again")
    return value


def check_config_file(directory: Path) -> None:
    """Refuse a directory whose config.json is not a regular JSON file, or whose config asks for remote code."""
    check_regular_file(directory / "config.json", "model config", "point to a Hugging Face model directory")
    for name in CODE_CONFIGS:
        path = directory / name
        if path.exists():
            check_regular_file(path, "model file", f"copy the model's {name} again")
            if "auto_map" in _read_json(path, "model file"):
                raise KVPError(f"model directory {directory} asks to run code shipped with the model (auto_map in "
                               f"{name}); kvpolicy never runs such code: use a model whose architecture transformers "
                               f"includes (e.g. Llama, Qwen2), or, if its model_type is one, remove auto_map from "
                               f"{name}")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (None when its header parses and its size is exactly the
    header's plus every tensor's bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it has {size} bytes, too few for a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            return f"its header claims {length:,} bytes but the file has {size:,}: truncated or not safetensors"
        try:
            header = json.loads(f.read(length))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a safetensors header"
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"it has {size:,} bytes where its header describes {expected:,}: truncated or damaged"
    return None


def check_weight_files(directory: Path) -> None:
    """Refuse a directory without complete safetensors weights (a sharded model's index included), naming the file
    and what to do; weights only as pickles (pytorch_model.bin...) are refused, never loaded."""
    weights = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise KVPError(f"weight index {index} has no weight_map; copy the model's {index.name} again")
        weights = sorted({directory / str(shard) for shard in weight_map.values()})
    if not weights:
        pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise KVPError(f"model directory {directory} holds its weights only as pickles ({', '.join(pickles)}), "
                           "which can run code when loaded, so kvpolicy does not load them; use the model's "
                           "safetensors weights (convert them where you trust the pickle's origin)")
        raise KVPError(f"model directory {directory} holds no weights (*.safetensors); copy the model's "
                       "safetensors files into it")
    for path in weights:
        check_regular_file(path, "weight file", "copy the model's weight files again")
        if (problem := safetensors_problem(path)) is not None:
            raise KVPError(f"weight file {path} is not usable: {problem}; copy or download it again")
