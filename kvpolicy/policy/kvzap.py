"""KVzap weights: what `kvp train-kvzap` writes and the `kvzap_linear` / `kvzap_mlp` scorers read.

A KVzap directory is kvpress's own `KVzapModel` format, so `KVzapModel.from_pretrained(DIR)` reads it:

    DIR/config.json          KVzapConfig (input_dim, output_dim, n_modules, hidden_dim: null for the linear model)
                             plus a "kvpolicy" section: the model it was trained for (name, fingerprint), how it was
                             made (the command, the prompts, the MLP's fit seed) and its held-out R², the sha256 of
                             the weights, and the thresholds of the thresholded form: its window and the quantiles
                             of its scores on the training prompts (kvpolicy.kvzap.calibrate)
    DIR/model.safetensors    per layer nn.Linear (linear) or Linear-GELU-Linear (mlp), in fp16

A training run writes DIR/linear and DIR/mlp; the weights shipped with kvpolicy are such directories under
`kvpolicy/policy/kvzap_weights/MODEL/`. `load_kvzap` checks the hash and refuses weights made for another model.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from kvpolicy.errors import KVPError
from kvpolicy.policy.config import KVZAP_KINDS as KINDS
from kvpolicy.io import atomic_path, read_json_file, refuse_link, sha256_file, write_durably
from kvpolicy.schema import Optional, validate

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SHIPPED_DIR = Path(__file__).parent / "kvzap_weights"  # MODEL/linear, MODEL/mlp
CONFIG_SCHEMA = {"input_dim": int, "output_dim": int, "n_modules": int, "hidden_dim": (int, None),
                  "kvpolicy": {"weights_sha256": str, "kind": str, "model": {"name": str, "fingerprint": str},
                               "command": Optional(str), "seed": Optional((int, None)),
                               "r2_per_layer": Optional(([float], None)),
                               "thresholds": Optional({"window": int, "quantiles": [float]})}}
TRAIN_HINT = "train them with `kvp train-kvzap --model {model} --source mix --split train --n 64 --out DIR`"


def save_kvzap(path: str | Path, model: KVzapModel, section: dict[str, Any]) -> Path:
    """Write `model` in fp16 to the directory `path` in kvpress's format, atomically, with config.json's "kvpolicy"
    section = `section` (kind, model {name, fingerprint}, command, r2_per_layer, ...) + the weights' sha256."""
    with atomic_path(path) as tmp:
        copy.deepcopy(model).to(torch.float16).save_pretrained(tmp)
        config = json.loads((tmp / CONFIG).read_text())
        config["kvpolicy"] = {**section, "weights_sha256": sha256_file(tmp / WEIGHTS)}
        write_durably(tmp / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return Path(path)


def read_kvzap_config(path: str | Path) -> dict[str, Any]:
    """DIR/config.json of a KVzap directory, checked against its schema."""
    fix = "retrain it with `kvp train-kvzap` or restore it"
    file = Path(path) / CONFIG
    refuse_link(file, "KVzap config")
    config = read_json_file(file, "KVzap config", f"give a `kvp train-kvzap` output's linear/ or mlp/; {fix}")
    validate(config, CONFIG_SCHEMA, str(file), fix)
    return config


def check_kvzap_model(config: dict[str, Any], info: Any, where: str) -> None:
    """Refuse KVzap weights trained for another model than `info` (a ModelInfo), by fingerprint."""
    made_for = config["kvpolicy"]["model"]
    if made_for["fingerprint"] != info.fingerprint:
        raise KVPError(f"KVzap weights {where} were trained for {made_for['name']} (fingerprint "
                       f"{made_for['fingerprint']}), not {info.name} (fingerprint {info.fingerprint}); "
                       + TRAIN_HINT.format(model=info.name))


def load_kvzap(path: str | Path, info: Any = None, kind: str | None = None) -> KVzapModel:
    """The KVzapModel (fp32, eval mode, no grad) of a KVzap directory, after checking its config, the weights' hash
    and, when given, that it was trained for the model `info` (a ModelInfo) and is of `kind` (linear, mlp)."""
    config = read_kvzap_config(path)
    if kind is not None and config["kvpolicy"]["kind"] != kind:
        raise KVPError(f"KVzap weights {path} hold the {config['kvpolicy']['kind']} model, not the {kind} one; "
                       f"give the {kind}/ directory of a `kvp train-kvzap` output")
    if info is not None:
        check_kvzap_model(config, info, str(path))
    weights = Path(path) / WEIGHTS
    refuse_link(weights, "KVzap weights")
    if not weights.is_file() or sha256_file(weights) != config["kvpolicy"]["weights_sha256"]:
        raise KVPError(f"{weights} is missing or does not match the hash in its {CONFIG}; retrain it with "
                       "`kvp train-kvzap` or restore it")
    model = KVzapModel(KVzapConfig(**{k: config[k] for k in ("input_dim", "output_dim", "n_modules", "hidden_dim")}))
    try:
        model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    except (SafetensorError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise KVPError(f"{weights} does not fit its {CONFIG} ({first}); retrain it with `kvp train-kvzap`") from None
    return model.eval().requires_grad_(False)


def shipped_kvzap(root: Path | None = None) -> dict[str, Path]:
    """Model name -> directory of the KVzap weights shipped for it (its linear/ and mlp/)."""
    root = SHIPPED_DIR if root is None else root
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if all((p / kind / CONFIG).is_file() for kind in KINDS)}


def kvzap_directory(model: str, kind: str, weights: str | Path | None = None) -> Path:
    """Where the `kind` KVzap weights for `model` (a model name) are: `weights` (a `kvp train-kvzap` output, or
    its linear/ or mlp/ itself) when given, else the weights shipped for the model."""
    if weights:
        path = Path(weights)
        return path / kind if (path / kind / CONFIG).exists() else path
    shipped = shipped_kvzap()
    if model not in shipped:
        raise KVPError(f"no KVzap weights for model {model} (shipped: {', '.join(shipped) or 'none'}); "
                       + TRAIN_HINT.format(model=model) + " and pass weights=DIR")
    return shipped[model] / kind


def kvzap_weights(kind: str, weights: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """What KVzap's scores depend on, before the model is known: model name -> {sha256, seed} of the `kind` weights
    that would score it (`weights` given: its one directory, under the model it was trained for; else every shipped
    one). seed: the MLP's fit seed (None for the linear model, whose fit is closed-form)."""
    directories = ([kvzap_directory("", kind, weights)] if weights
                   else [directory / kind for directory in shipped_kvzap().values()])
    sections = [read_kvzap_config(directory)["kvpolicy"] for directory in directories]
    return {section["model"]["name"]: {"sha256": section["weights_sha256"], "seed": section.get("seed")}
            for section in sections}


def ship_kvzap(directory: str | Path, root: Path | None = None) -> Path:
    """Copy a `kvp train-kvzap` output's linear/ and mlp/ (checked) into the package's shipped KVzap weights of
    the model they were trained for; returns that model's directory there."""
    directory = Path(directory)
    configs = {kind: read_kvzap_config(directory / kind) for kind in KINDS}
    names = {c["kvpolicy"]["model"]["name"] for c in configs.values()}
    if len(names) != 1:
        raise KVPError(f"{directory}'s linear/ and mlp/ were trained for different models ({', '.join(names)}); "
                       "retrain both with one `kvp train-kvzap` run")
    target = (SHIPPED_DIR if root is None else root) / names.pop()
    for kind in KINDS:
        load_kvzap(directory / kind)  # the hash checked before it ships
        with atomic_path(target / kind) as tmp:
            shutil.copytree(directory / kind, tmp)
    return target


def kvzap_thresholds(path: str | Path) -> tuple[int, tuple[float, ...]]:
    """(window, quantiles) calibrating the thresholded form of the KVzap weights in `path`, or a one-line error for
    weights made before `kvp train-kvzap` calibrated them."""
    thresholds = read_kvzap_config(path)["kvpolicy"].get("thresholds")
    if thresholds is None:
        raise KVPError(f"KVzap weights {path} carry no threshold calibration (made by an earlier kvpolicy); re-run "
                       "their `kvp train-kvzap` command on the same --out: it refits and calibrates without "
                       "collecting again")
    return thresholds["window"], tuple(thresholds["quantiles"])
