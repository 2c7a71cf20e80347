"""KVP checkpoints: a directory written atomically (all files or none, never a half-written one).

    CKPT/config.json          format, model (name, fingerprint, layers, KV heads, head dim), policy network shape,
                              training hyperparameters, trace manifest hashes, training state, validation summary,
                              sha256 of the weights
    CKPT/policy.safetensors   the deployed weights: the EMA weights with the best validation reward
    CKPT/resume.safetensors   what a killed run needs to continue: raw weights, EMA, AdamW moments and steps
    CKPT/history.jsonl        the training log (per-layer reward, advantage, grad norm; validation rewards)

`load_checkpoint` verifies the format, the weights' hash and their shapes against the config, and refuses a
checkpoint recorded for a different model than the one it is applied to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvpolicy.errors import KVPError
from kvpolicy.io import atomic_path, recover_directory, sha256_file
from kvpolicy.models.handle import MODEL_SCHEMA
from kvpolicy.schema import Optional, validate
from kvpolicy.policy.network import PolicyConfig, PolicyNet

FORMAT = "kvpolicy-checkpoint/1"
CONFIG = "config.json"
WEIGHTS = "policy.safetensors"
RESUME = "resume.safetensors"
HISTORY = "history.jsonl"

# what every reader of config.json relies on; the training sections are written by `kvp train` (a policy
# saved by other means may lack them) and are required to resume
CONFIG_SCHEMA = {
    "format": str,
    "weights_sha256": str,
    "model": MODEL_SCHEMA,
    "policy": {"n_layers": int, "n_kv_heads": int, "head_dim": int, "hidden": Optional(int),
               "position_dim": Optional(int), "max_position": Optional(int), "position_encoding": Optional(str)},
    "training": Optional(dict),
    "traces": Optional({"train": {"manifest_hash": str, "source": Optional((str, None)),
                                  "context_tokens": Optional((int, None))}}),
}
RESUME_SCHEMA = {
    "training": dict,
    "traces": {"train": {"manifest_hash": str}},
    "state": {"step": int, "skipped_batches": int, "elapsed_s": float, "best_step": int,
              "best_val_reward": (float, None), "val_history": Optional([dict])},
}


def save_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    resume: dict[str, torch.Tensor] | None = None,
    history: list[dict] | None = None,
) -> dict[str, Any]:
    """Write the checkpoint directory atomically; returns the config as written (with the weights' sha256)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KVPError(f"{path} exists and is not a checkpoint directory; choose another --out")
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS),
                  metadata={"format": FORMAT})
        config = {**config, "format": FORMAT, "weights_sha256": sha256_file(tmp / WEIGHTS)}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if resume is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in resume.items()}, str(tmp / RESUME),
                      metadata={"format": FORMAT})
        if history:
            (tmp / HISTORY).write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))
    return config


def read_config(path: str | Path, resume: bool = False) -> dict[str, Any]:
    """The checkpoint's config.json, checked for format and schema (with `resume`, also for the training
    state a resumed run needs)."""
    path = Path(path)
    recover_directory(path)  # a save killed between the two renames of a fallback swap
    file = path / CONFIG
    if not file.is_file():
        raise KVPError(f"{path} is not a KVP checkpoint (no {CONFIG}); "
                       f"train one with `kvp train --traces DIR --out {path}`")
    try:
        config = json.loads(file.read_text())
    except ValueError as err:
        raise KVPError(f"{file} is not valid JSON ({err}); retrain or restore the checkpoint") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise KVPError(f"{path} has checkpoint format {found!r}; this kvpolicy reads {FORMAT!r}")
    validate(config, CONFIG_SCHEMA, str(file), "retrain the policy or restore the checkpoint")
    if resume:
        validate(config, RESUME_SCHEMA, str(file), f"pass --restart to train {path} again from scratch")
    return config


def has_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a checkpoint, after finishing a directory swap that a kill interrupted."""
    recover_directory(path)
    return (Path(path) / CONFIG).exists()


def check_model(config: dict[str, Any], info: Any, where: str) -> None:
    """Refuse a checkpoint trained for another model (fingerprint or cache shape). info: a ModelInfo."""
    model = config["model"]
    if model["fingerprint"] != info.fingerprint:
        raise KVPError(
            f"checkpoint {where} was trained for {model['name']} (fingerprint {model['fingerprint']}), not "
            f"{info.name} (fingerprint {info.fingerprint}); train a policy on traces of this model"
        )
    theirs = (model["n_layers"], model["n_kv_heads"], model["head_dim"])
    ours = (info.n_layers, info.n_kv_heads, info.head_dim)
    if theirs != ours:
        raise KVPError(f"checkpoint {where} expects (layers, KV heads, head dim) {theirs}, the model has {ours}")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise KVPError(f"{file} is unreadable ({err}); the checkpoint is damaged: retrain or restore it") from None


def load_state(net: PolicyNet, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` into `net`, refusing missing, unexpected or mis-shaped tensors with a clear error."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        name = diff[0]
        raise KVPError(
            f"{where} does not match the network shape {net.config.to_dict()}: tensor '{name}' is "
            f"{got.get(name, 'missing')}, expected {expected.get(name, 'absent')}; use a checkpoint written with "
            "this network shape (or train a new one)"
        )
    net.load_state_dict(state)


@dataclass
class Checkpoint:
    """A loaded policy: the network (eval mode, no grad) and its config."""

    path: Path
    config: dict[str, Any]
    policy: PolicyNet

    @property
    def sha256(self) -> str:
        return self.config["weights_sha256"]


def load_checkpoint(path: str | Path, model: Any = None, device: str | torch.device = "cpu") -> Checkpoint:
    """Load CKPT/policy.safetensors after checking its format, hash, shapes and (if `model`, a ModelInfo, is
    given) that it was trained for that model."""
    path = Path(path)
    config = read_config(path)
    if model is not None:
        check_model(config, model, str(path))
    weights = path / WEIGHTS
    if not weights.is_file():
        raise KVPError(f"checkpoint {path} has no {WEIGHTS}; retrain or restore it")
    if sha256_file(weights) != config.get("weights_sha256"):
        raise KVPError(f"{weights} does not match the hash in {CONFIG} (damaged or replaced); retrain or restore it")
    try:
        policy_config = PolicyConfig(**config["policy"])
    except TypeError as err:
        raise KVPError(f"checkpoint {path} has an unreadable policy config ({err}); retrain it") from None
    net = PolicyNet(policy_config)
    load_state(net, _load_tensors(weights), f"checkpoint {path}")
    net.to(device).eval().requires_grad_(False)
    return Checkpoint(path, config, net)


def load_resume(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The resume tensors of a checkpoint, or None when it has none."""
    file = Path(path) / RESUME
    return _load_tensors(file) if file.is_file() else None


def load_history(path: str | Path) -> list[dict]:
    file = Path(path) / HISTORY
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []
