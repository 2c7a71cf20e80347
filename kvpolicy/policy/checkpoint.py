"""KVP checkpoints: a Hugging Face-style folder written atomically (all files or none, never a half-written one).

    CKPT/config.json          format, model (name, fingerprint, layers, KV heads, head dim), policy network shape,
                              training hyperparameters, trace manifest hashes, training state, validation summary,
                              held-out costs (when measured), sha256 of the weights (and of the resume state), and the
                              Hub's "model_type" / "architectures" / "base_model" keys
    CKPT/model.safetensors    the deployed weights: the EMA weights with the best validation reward
    CKPT/README.md            the model card (policy/card.py), rendered from config.json at every write
    CKPT/resume.safetensors   what a killed run needs to continue: raw weights, EMA, AdamW moments and steps
    CKPT/history.jsonl        the training log, one JSON object per logged step (per-layer reward, advantage, grad norm)

The first three are the policy a user deploys (`save_pretrained` writes those alone; the folder can be pushed to the
Hugging Face Hub as it is). A checkpoint of the first format (kvpolicy-checkpoint/1: weights in policy.safetensors, no
card) still loads; writing it again (`kvp policies --convert`) gives the current layout.

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
import warnings
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
from kvpolicy.models.registry import base_model
from kvpolicy.policy.card import HELD_OUT, HELD_OUT_SCHEMA, render_card
from kvpolicy.schema import Optional, validate
from kvpolicy.policy.calibration import CALIBRATION, Calibration
from kvpolicy.policy.network import PolicyConfig, PolicyNet

FORMAT = "kvpolicy-checkpoint/2"
LEGACY_FORMAT = "kvpolicy-checkpoint/1"  # read, never written: its weights file was LEGACY_WEIGHTS
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "policy.safetensors"
CARD = "README.md"
HUB_KEYS = {"model_type": "kvpolicy", "architectures": ["PolicyNet"]}  # what the Hub reads of any config.json
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
    HELD_OUT: Optional(HELD_OUT_SCHEMA),  # `kvp fit`, the bundled recipe (policy/card.py)
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


def hub_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The keys the Hugging Face Hub reads of a config.json: model type, architecture and the base model it serves
    (registry.base_model: the Hub id of a registered model, or the name a Hub model was loaded by)."""
    base = base_model(config["model"]["name"]) if "model" in config else None
    return {**HUB_KEYS, **({"base_model": base} if base else {})}


def save_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    resume: dict[str, torch.Tensor] | None = None,
    history: list[dict] | None = None,
) -> dict[str, Any]:
    """Write the checkpoint directory atomically: config.json, the weights, the model card, and the resume state
    and training log when given; returns the config as written (with the sha256 of the weights and of the resume
    state). A file that cannot be written is a KVPError, the previous checkpoint left in place."""
    log = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history).encode() if history else None
    return _write_checkpoint(path, config, _tensor_bytes(weights),
                             None if resume is None else _tensor_bytes(resume), log)


def _write_checkpoint(path: str | Path, config: dict[str, Any], weights: bytes, resume: bytes | None,
                      history: bytes | None) -> dict[str, Any]:
    """save_checkpoint's writer, from the files' bytes (a conversion copies them unchanged)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KVPError(f"{path} exists and is not a checkpoint directory; choose another --out")
    if HELD_OUT in config:  # the card renders it: checked before anything is written
        validate(config[HELD_OUT], HELD_OUT_SCHEMA, f"policy {path}, {HELD_OUT}",
                 "give the held-out costs in the card's schema (policy/card.py)")
    config = {k: v for k, v in config.items() if k != "resume_sha256"}  # a bundle or save_pretrained copy has none
    try:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            config |= {"format": FORMAT, "weights_sha256": _write(tmp / WEIGHTS, weights), **hub_keys(config)}
            if resume is not None:
                config["resume_sha256"] = _write(tmp / RESUME, resume)
            if history:
                _write(tmp / HISTORY, history)
            _write(tmp / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            _write(tmp / CARD, render_card(config).encode())
    except OSError as err:  # the temporary's name would only confuse: name the checkpoint
        reason = describe_os_error(OSError(err.errno, err.strerror) if err.errno else err)
        raise KVPError(f"cannot write checkpoint {path}: {reason}; it keeps its previous version (if any): free some "
                       "space or fix the directory, then re-run the same command to resume") from None
    return config


def convert_checkpoint(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the checkpoint `path` in the current format at `out` (default: in place, atomically), every file's
    bytes unchanged (so its weights' sha256, and every result keyed by it, stay the same); returns where."""
    path = Path(path)
    config = load_checkpoint(path).config  # the weights' hash and shapes checked
    load_resume(path, config.get("resume_sha256"))  # and the resume state's and training log's, when there are
    load_history(path)
    weights = (path / weights_file(config)).read_bytes()
    extra = {name: (path / name).read_bytes() if os.path.lexists(path / name) else None for name in (RESUME, HISTORY)}
    target = path if out is None else Path(out)
    _write_checkpoint(target, config, weights, extra[RESUME], extra[HISTORY])
    return target


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
    ours = HUB_KEYS["model_type"]
    if isinstance(config, dict) and config.get("model_type", ours) != ours:  # a Hugging Face model's own config.json
        raise KVPError(f"{path} is not a KVP checkpoint but a model directory: {how_to_train(str(path))}")
    if not isinstance(config, dict) or config.get("format") not in (FORMAT, LEGACY_FORMAT):
        found = config.get("format") if isinstance(config, dict) else None
        if not isinstance(found, str) or not found.startswith("kvpolicy-checkpoint/"):
            raise KVPError(f"{path} is not a KVP checkpoint (its {CONFIG} is not one that `kvp train` writes); give "
                           "the --out directory of a `kvp train` run")
        raise KVPError(f"{path} has checkpoint format {found!r}; this kvpolicy reads {FORMAT!r} and {LEGACY_FORMAT!r}: "
                       "upgrade kvpolicy to read it")
    validate(config, CONFIG_SCHEMA, str(file), "retrain the policy or restore the checkpoint")
    if resume:
        validate(config, RESUME_SCHEMA, str(file), f"pass --restart to train {path} again from scratch")
    return config


def has_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a checkpoint, after finishing a directory swap that a kill interrupted."""
    recover_directory(path)
    return os.path.lexists(Path(path) / CONFIG)  # a link or a FIFO in its place is refused when it is read


class OtherWeightsWarning(UserWarning):
    """A policy applied to a model of its architecture and cache shape whose weights are not those it was trained on
    (a fine-tune, the original checkpoint of a converted model, another copy): it runs, and may rank worse."""


def check_model(config: dict[str, Any], info: Any, where: str, check_weights: bool = True) -> None:
    """Refuse a policy that cannot work on the model `info` (a ModelInfo, or the ModelIdentity of a trace set): one
    of another cache shape (layers, KV heads, head dim), other sliding-window layers (for a ModelInfo; a policy that
    records none was trained on a model without them) or, where both record it, another architecture family. Only
    other weights (fingerprint) are an OtherWeightsWarning, which says whether the Hub ids of the two models' base
    models (`registry.base_model`) agree, and with `check_weights=False` not even that: the
    policy is then trusted to fit weights it never saw, and its measured costs do not carry over to them."""
    model = config["model"]
    theirs = (model["n_layers"], model["n_kv_heads"], model["head_dim"])
    ours = (info.n_layers, info.n_kv_heads, info.head_dim)
    if theirs != ours:
        raise KVPError(f"policy {where} was trained for {model['name']}, whose cache has (layers, KV heads, head dim) "
                       f"{theirs}; {info.name} has {ours}: train a policy for it with `kvp fit --model {info.name} "
                       "--out DIR`")
    family, theirs_family = getattr(info, "family", None), model.get("family")
    if family and theirs_family and family != theirs_family:
        raise KVPError(f"policy {where} was trained for a {theirs_family} model ({model['name']}), {info.name} is a "
                       f"{family} model: train a policy for it with `kvp fit --model {info.name} --out DIR`")
    if hasattr(info, "layer_windows") and list(model.get("layer_windows") or []) != list(info.layer_windows or []):
        raise KVPError(f"policy {where} was trained for {model['name']}, whose layers slide as "
                       f"{_layout(model.get('layer_windows'))}; {info.name}'s slide as {_layout(info.layer_windows)}, "
                       f"so its agents would cut other layers: train a policy for it with `kvp fit --model {info.name} "
                       "--out DIR`")
    if check_weights and model["fingerprint"] != info.fingerprint:
        theirs_base, ours_base = config.get("base_model") or base_model(model["name"]), base_model(info.name)
        if theirs_base and theirs_base == ours_base:  # the Hub ids agree: the same model, converted or copied apart
            kind = f"is the same base model ({ours_base}) with other weights (another conversion, quantization or copy)"
        elif theirs_base and ours_base:
            kind = f"is another model ({ours_base}, the policy's is {theirs_base}) of its cache shape and architecture"
        else:
            kind = "has its cache shape but other weights"
        warnings.warn(OtherWeightsWarning(
            f"policy {where} was trained for {model['name']} (fingerprint {model['fingerprint']}); {info.name} {kind} "
            f"(fingerprint {info.fingerprint}): it runs, and may rank worse than on its own model "
            "(load_policy(..., check_weights=False) silences this)"), stacklevel=2)


def _layout(windows: list | tuple | None) -> str:
    """A model's layer windows in words: which layers slide, or none."""
    sliding = [i for i, window in enumerate(windows or []) if window is not None]
    return f"layers {sliding} (of {len(windows)})" if sliding else "none of them (all full attention)"


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


    def save_pretrained(self, path: str | Path) -> Path:
        """Write the deployable policy (config.json, model.safetensors, README.md; no resume state or training log)
        as a folder `path`, atomically, in the current format: what `load_policy(path)` and the Hub take. The
        weights file is copied byte for byte, so the copy has the same sha256 (and results keyed by it carry over)."""
        weights = (self.path / weights_file(self.config)).read_bytes()
        if hashlib.sha256(weights).hexdigest() != self.sha256:
            raise KVPError(f"{self.path} changed on disk since this policy was loaded; load it again, then save it")
        _write_checkpoint(path, self.config, weights, None, None)
        return Path(path)


def save_calibration(path: str | Path, calibration: Calibration) -> None:
    """Write `calibration` into the checkpoint's config.json and its card (atomically each; the weights are
    untouched)."""
    config = read_config(path) | {CALIBRATION: calibration.to_config()}
    write_json(Path(path) / CONFIG, config)
    if config["format"] == FORMAT:  # a checkpoint of the first format has no card
        write_durably(Path(path) / CARD, render_card(config).encode())


def weights_file(config: dict[str, Any]) -> str:
    """The name of the weights file in a checkpoint with this config (the first format named it otherwise)."""
    return LEGACY_WEIGHTS if config["format"] == LEGACY_FORMAT else WEIGHTS


def load_checkpoint(path: str | Path, model: Any = None, device: str | torch.device = "cpu",
                    check_weights: bool = True) -> Checkpoint:
    """Load CKPT's weights after checking its format, hash, shapes and (if `model`, a ModelInfo, is given) that
    it can serve that model (`check_model`, with `check_weights`)."""
    path = Path(path)
    config = read_config(path)
    if model is not None:
        check_model(config, model, str(path), check_weights)
    weights = _entry(path, weights_file(config), "checkpoint weights", "retrain or restore the checkpoint")
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
