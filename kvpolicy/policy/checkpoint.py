"""KVP checkpoints: a directory written atomically (all files or none, never a half-written one).

    CKPT/config.json          format, model (name, fingerprint, layers, KV heads, head dim), policy network shape,
                              training hyperparameters, trace manifest hashes, training state, validation summary,
                              sha256 of the weights (and of the resume state)
    CKPT/policy.safetensors   the deployed weights: the EMA weights with the best validation reward
    CKPT/resume.safetensors   what a killed run needs to continue: raw weights, EMA, AdamW moments and steps
    CKPT/history.jsonl        the training log, one JSON object per logged step (per-layer reward, advantage, grad norm)

`load_checkpoint` verifies the format, the weights' hash and their shapes against the config, and refuses a
checkpoint recorded for a different model than the one it is applied to; `load_resume` verifies the resume
state's hash and `load_history` every line of the log. Each file is a regular file, never a link (kvpolicy.io's
rule for the entries of a directory it manages), refused in one line otherwise. Files are written whole and
flushed to disk before the directory is swapped in; a write that fails (a full disk) is one KVPError naming the
checkpoint, which keeps its previous version.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from kvpolicy.errors import KVPError
from kvpolicy.io import (atomic_path, check_regular_file, describe_os_error, read_lines, read_json_file,
                         recover_directory, refuse_link, sha256_file, write_durably, write_json)
from kvpolicy.models.handle import MODEL_SCHEMA
from kvpolicy.schema import Optional, validate
from kvpolicy.policy.calibration import CALIBRATION, Calibration
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
    CALIBRATION: Optional(dict),  # `kvp calibrate` (policy/calibration.py)
}
RESUME_SCHEMA = {
    "resume_sha256": Optional(str),  # absent from checkpoints written before it was recorded
    "training": dict,
    "traces": {"train": {"manifest_hash": str}},
    "state": {"step": int, "skipped_batches": int, "elapsed_s": float, "best_step": int,
              "best_val_reward": (float, None), "val_history": Optional([dict])},
}
# one line of history.jsonl (Trainer._log)
HISTORY_SCHEMA = {"step": int, "lr": float, "loss": float, "reward": float, "reward_per_layer": [float],
                  "advantage_abs_per_layer": [float], "advantage_clipped": float, "grad_norm_per_layer": [float],
                  "skipped_batches": int}


def _write(file: Path, data: bytes) -> str:
    """Write `data` to `file` durably; returns its sha256."""
    write_durably(file, data)
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": FORMAT})


def save_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    resume: dict[str, torch.Tensor] | None = None,
    history: list[dict] | None = None,
) -> dict[str, Any]:
    """Write the checkpoint directory atomically; returns the config as written (with the sha256 of the weights and
    of the resume state). A file that cannot be written is a KVPError, the previous checkpoint left in place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KVPError(f"{path} exists and is not a checkpoint directory; choose another --out")
    config = {k: v for k, v in config.items() if k != "resume_sha256"}  # a bundle of a trained checkpoint has none
    try:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            config |= {"format": FORMAT, "weights_sha256": _write(tmp / WEIGHTS, _tensor_bytes(weights))}
            if resume is not None:
                config["resume_sha256"] = _write(tmp / RESUME, _tensor_bytes(resume))
            if history:
                _write(tmp / HISTORY, "".join(json.dumps(h, sort_keys=True) + "\n" for h in history).encode())
            _write(tmp / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    except OSError as err:  # the temporary's name would only confuse: name the checkpoint
        reason = describe_os_error(OSError(err.errno, err.strerror) if err.errno else err)
        raise KVPError(f"cannot write checkpoint {path}: {reason}; it keeps its previous version (if any): free some "
                       "space or fix the directory, then re-run the same command to resume") from None
    return config


def _entry(path: Path, name: str, what: str, fix: str) -> Path:
    """The checkpoint file `path/name`, refused in one line when it is a link or not a regular file."""
    file = path / name
    refuse_link(file, what)
    return check_regular_file(file, what, fix)


def how_to_train(model: str) -> str:
    """How to get a policy for `model` (a model name or directory), for the refusals that find none."""
    return f"train one with `kvp fit --model {model} --out DIR` (or kvp traces + kvp train), then use kvp:DIR"


def read_config(path: str | Path, resume: bool = False) -> dict[str, Any]:
    """The checkpoint's config.json, checked for format and schema (with `resume`, also for the training
    state a resumed run needs)."""
    path = Path(path)
    recover_directory(path)  # a save killed between the two renames of a fallback swap
    file = path / CONFIG
    if not os.path.lexists(file):
        raise KVPError(f"{path} is not a KVP checkpoint (no {CONFIG}); "
                       f"train one with `kvp train --traces DIR --out {path}`")
    refuse_link(file, "checkpoint config")
    config = read_json_file(file, "checkpoint config", "retrain the policy or restore the checkpoint")
    if isinstance(config, dict) and "model_type" in config:  # a Hugging Face model's own config.json
        raise KVPError(f"{path} is not a KVP checkpoint but a model directory: {how_to_train(str(path))}")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        if not isinstance(found, str) or not found.startswith("kvpolicy-checkpoint/"):
            raise KVPError(f"{path} is not a KVP checkpoint (its {CONFIG} is not one that `kvp train` writes); give "
                           "the --out directory of a `kvp train` run")
        raise KVPError(f"{path} has checkpoint format {found!r}; this kvpolicy reads {FORMAT!r}")
    validate(config, CONFIG_SCHEMA, str(file), "retrain the policy or restore the checkpoint")
    if resume:
        validate(config, RESUME_SCHEMA, str(file), f"pass --restart to train {path} again from scratch")
    return config


def has_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a checkpoint, after finishing a directory swap that a kill interrupted."""
    recover_directory(path)
    return os.path.lexists(Path(path) / CONFIG)  # a link or a FIFO in its place is refused when it is read


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

    @property
    def calibration(self) -> Calibration | None:
        """The map of its scores onto one scale across heads (`kvp calibrate`), or None when it has none."""
        if CALIBRATION not in self.config:
            return None
        shape = (self.policy.config.n_layers, self.policy.config.n_kv_heads)
        return Calibration.from_config(self.config[CALIBRATION], shape, self.path / CONFIG)


def save_calibration(path: str | Path, calibration: Calibration) -> None:
    """Write `calibration` into the checkpoint's config.json (atomically; the weights are untouched)."""
    config = read_config(path)
    write_json(Path(path) / CONFIG, config | {CALIBRATION: calibration.to_config()})


def load_checkpoint(path: str | Path, model: Any = None, device: str | torch.device = "cpu") -> Checkpoint:
    """Load CKPT/policy.safetensors after checking its format, hash, shapes and (if `model`, a ModelInfo, is
    given) that it was trained for that model."""
    path = Path(path)
    config = read_config(path)
    if model is not None:
        check_model(config, model, str(path))
    weights = _entry(path, WEIGHTS, "checkpoint weights", "retrain or restore the checkpoint")
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


def _restart(path: Path) -> str:
    return f"pass --restart to train {path} again from scratch, or restore the checkpoint"


def load_resume(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor] | None:
    """The resume tensors of a checkpoint, or None when it has none; checked against `sha256` (config.json's
    "resume_sha256") when given."""
    path = Path(path)
    if not os.path.lexists(path / RESUME):
        return None
    file = _entry(path, RESUME, "resume state", _restart(path))
    if sha256 is not None and sha256_file(file) != sha256:
        raise KVPError(f"{file} does not match the hash in {CONFIG}: the resume state is damaged; {_restart(path)}")
    return _load_tensors(file)


def load_history(path: str | Path) -> list[dict]:
    """The training log, each line checked (HISTORY_SCHEMA); [] when there is none."""
    path = Path(path)
    if not os.path.lexists(path / HISTORY):
        return []
    file = _entry(path, HISTORY, "training log", _restart(path))
    with open(file, "rb") as f:
        lines, tail = read_lines(f, str(file))
    history = []
    for number, line in enumerate(lines.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise KVPError(f"{file}:{number} is not valid JSON ({getattr(err, 'msg', err)}); {_restart(path)}") \
                from None
        validate(entry, HISTORY_SCHEMA, f"{file}:{number}", _restart(path))
        history.append(entry)
    if tail:  # written whole with the checkpoint: a line without its newline is damage
        last = len(lines.splitlines()) + 1
        raise KVPError(f"{file}:{last} is cut short (no end of line); {_restart(path)}")
    return history
