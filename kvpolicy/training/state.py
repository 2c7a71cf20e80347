"""What a training run saves so that a restart continues exactly where it stopped, and which checkpoints it may
continue.

CKPT/resume.safetensors holds, per parameter NAME of the policy network: "param.NAME" (the raw weights),
"ema.NAME" (their exponential moving average), "best.NAME" (the EMA with the best validation reward so far) and
AdamW's "adam.NAME.step", "adam.NAME.exp_avg", "adam.NAME.exp_avg_sq"; config.json's "state" section holds the
counters. A run continues only a checkpoint of the same model, policy shape and training traces, trained with the
same settings except those in `RESUMABLE`. The resume state must match its hash in config.json ("resume_sha256")
and hold only finite values: a damaged one would make every later step skip its batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvpolicy.errors import KVPError
from kvpolicy.policy import checkpoint as ckpt

# settings that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE = ("steps", "val_every", "checkpoint_every", "log_every", "compile")
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def pack_resume(
    names: list[str],
    params: list[torch.Tensor],
    ema: list[torch.Tensor],
    best: list[torch.Tensor],
    opt: torch.optim.Optimizer,
) -> dict[str, torch.Tensor]:
    """The resume tensors of a run: weights, EMA, best EMA and the optimizer's moments, by parameter name."""
    resume: dict[str, torch.Tensor] = {}
    for name, p, e, b in zip(names, params, ema, best):
        resume[f"param.{name}"], resume[f"ema.{name}"], resume[f"best.{name}"] = p, e, b
        for k, v in opt.state.get(p, {}).items():
            resume[f"adam.{name}.{k}"] = v.reshape(1) if v.dim() == 0 else v
    return resume


@torch.no_grad()
def unpack_resume(
    tensors: dict[str, torch.Tensor],
    names: list[str],
    params: list[torch.Tensor],
    ema: list[torch.Tensor],
    best: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    device: torch.device,
) -> None:
    """Copy `pack_resume`'s tensors back into the run's weights, EMA, best EMA and optimizer state (in place)."""
    for name, p, e, b in zip(names, params, ema, best):
        p.copy_(tensors[f"param.{name}"])
        e.copy_(tensors[f"ema.{name}"])
        b.copy_(tensors[f"best.{name}"])
        if f"adam.{name}.step" in tensors:
            opt.state[p] = {k: tensors[f"adam.{name}.{k}"].to(device) for k in ADAM_STATE}


def check_resumable(saved: dict[str, Any], mine: dict[str, Any], out: Path) -> None:
    """Refuse to continue the checkpoint config `saved` with a run described by `mine` (same sections) when the
    model, the policy shape, the training traces or a setting outside RESUMABLE differ."""
    for key in ("model", "policy"):
        theirs = saved.get(key) or {}
        if key == "model" and "family" not in theirs:  # recorded since the policy folder's second format
            mine = {**mine, "model": {k: v for k, v in mine["model"].items() if k != "family"}}
        if theirs != mine[key]:
            raise KVPError(f"{out} holds a checkpoint with another {key} ({saved.get(key)}), not {mine[key]}; "
                           "choose another --out or pass --restart to overwrite it")
    if saved["traces"]["train"]["manifest_hash"] != mine["traces"]["train"]["manifest_hash"]:
        raise KVPError(f"{out} was trained on other traces; choose another --out or pass --restart")
    differing = [k for k in mine["training"] if k not in RESUMABLE and saved["training"].get(k) != mine["training"][k]]
    if differing:
        raise KVPError(f"{out} was trained with other settings ({', '.join(differing)}); use the same settings "
                       "to resume, or pass --restart")


def read_resume(out: Path, mine: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The "state" section and resume tensors of the checkpoint in `out`, once `check_resumable` accepts it and the
    tensors check out (hash, finite values)."""
    saved = ckpt.read_config(out, resume=True)
    check_resumable(saved, mine, out)
    tensors = ckpt.load_resume(out, saved.get("resume_sha256"))
    if tensors is None:
        raise KVPError(f"{out} has no resume state; pass --restart to train it again from scratch")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise KVPError(f"{out / ckpt.RESUME} holds non-finite values ('{name}'): the run it continues diverged "
                           f"or the file is damaged; pass --restart to train {out} again from scratch (with a lower "
                           "--lr if it diverged)")
    return saved["state"], tensors
