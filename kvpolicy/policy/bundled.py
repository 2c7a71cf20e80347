"""Policies shipped inside the package: one general-purpose KVP policy per supported model, usable right after
install as `kvp:MODEL` (or `load_policy(model=...)`).

A bundled policy is an ordinary policy folder, `kvpolicy/policy/weights/MODEL/` (config.json, model.safetensors and
its README.md card), with its weights in fp16 (a few MB) and a "bundle" section in its config that records how it
was made: the commands, the trace sets, the training steps and the model's fingerprint. `bundle` writes one from a
`kvp train` checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvpolicy.errors import KVPError
from kvpolicy.models.registry import is_hub_id
from kvpolicy.policy.checkpoint import how_to_train, load_checkpoint, save_checkpoint
from kvpolicy.policy.hub import download_policy

BUNDLED_DIR = Path(__file__).parent / "weights"  # MODEL/config.json, MODEL/model.safetensors, MODEL/README.md


def bundled_policies(root: Path | None = None) -> dict[str, Path]:
    """Model name -> directory of every bundled policy."""
    root = BUNDLED_DIR if root is None else root
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()} if root.is_dir() else {}


def bundled_path(model: str, root: Path | None = None) -> Path:
    """The directory of the policy bundled for `model` (a registered model name; any other name or path has none)."""
    known = bundled_policies(root)
    if model not in known:
        have = ", ".join(known) or "none in this install"
        raise KVPError(f"no bundled policy for this model ('{model}'; bundled for: {have}): {how_to_train(model)}")
    return known[model]


def resolve_policy(source: str | Path) -> Path:
    """A policy's directory from a folder path or, when no such path exists, a bundled model name or a Hugging Face
    Hub id ('org/name', fetched into the Hub's cache)."""
    path = Path(source)
    if path.exists():
        return path
    if str(source) in bundled_policies():
        return bundled_path(str(source))
    if is_hub_id(str(source)):
        return download_policy(str(source))
    return path  # load_checkpoint explains what is wrong with a path that holds no checkpoint


def bundle(checkpoint: str | Path, made_by: dict[str, Any], root: Path | None = None) -> Path:
    """Write `checkpoint`'s policy as the bundled policy of its model: fp16 weights, its config plus
    {"bundle": made_by} (how it was made: commands, trace sets, steps...). Returns the bundled directory."""
    loaded = load_checkpoint(checkpoint)
    model = loaded.config["model"]["name"]
    weights = {k: v.to(torch.float16) for k, v in loaded.policy.state_dict().items()}
    config = {k: v for k, v in loaded.config.items() if k not in ("weights_sha256", "state")}
    target = (BUNDLED_DIR if root is None else root) / model
    save_checkpoint(target, {**config, "bundle": {**made_by, "from_checkpoint_sha256": loaded.sha256,
                                                  "model_fingerprint": loaded.config["model"]["fingerprint"]}},
                    weights)
    return target
