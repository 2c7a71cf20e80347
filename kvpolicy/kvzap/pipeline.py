"""A `kvp train-kvzap` run: collect the data (resumable), fit each kind, write the weights and their held-out R².

    DATA/run.json                       the model (name, fingerprint, shape) and what fixes the collected data
    DATA/SPLIT/NNNNN.safetensors        prompt NNNNN's inputs, targets and token positions (collect.py)
    OUT/linear/, OUT/mlp/               KVzap weights in kvpress's KVzapModel format, fp16 (kvpolicy.policy.kvzap),
                                        with the quantiles of their scores on the training prompts that calibrate
                                        the thresholded form (calibrate.py)
    OUT/metrics.json                    per kind: R² per layer on the held-out prompts and its mean, the in-sample
                                        mean, the fit's seconds; the MLP's losses per epoch

DATA is --data, by default OUT/data: runs that differ only in what they fit (--fit-seed, --kind, the MLP's sizes,
--alpha, a smaller --n) share one, each writing its own OUT. A rerun collects only the prompts missing from DATA (a
grown --n or --val-n adds its new prompts), then fits again; a DATA collected for another model or with other
collection settings (--source, --context, --seed, --tokens-per-prompt) is refused. An OUT of the earlier layout
(OUT/run.json beside OUT/data) has its record moved into OUT/data on its next run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kvpolicy.errors import KVPError
from kvpolicy.io import check_writable, read_json_file, write_json
from kvpolicy.compression.allocation import DMS_WINDOW
from kvpolicy.kvzap.calibrate import outside_window, score_quantiles
from kvpolicy.kvzap.collect import collect_split, load_split
from kvpolicy.kvzap.config import KVzapRunConfig
from kvpolicy.kvzap.fit import fit_mlp, fit_ridge, linear_model, r_squared
from kvpolicy.models import ModelHandle
from kvpolicy.policy.kvzap import save_kvzap
from kvpolicy.schema import validate

RUN_FORMAT = "kvpolicy-kvzap-run/1"
RUN = "run.json"
METRICS = "metrics.json"
RUN_SCHEMA = {"format": str, "model": {"name": str, "fingerprint": str}, "collection": dict}


def check_run(data: Path, handle: ModelHandle, cfg: KVzapRunConfig, fix: str, legacy: Path | None = None) -> None:
    """Record in data/run.json what the data directory is collected for, or refuse one that holds data of another
    model or collected with other settings (`fix` says what to do instead). `legacy`: the earlier layout's record
    (OUT/run.json, for the default data directory), checked and moved into `data` when `data` has none."""
    file = data / RUN
    source = legacy if legacy is not None and legacy.exists() and not file.exists() else file
    if not source.exists():
        data.mkdir(parents=True, exist_ok=True)
        write_json(file, {"format": RUN_FORMAT, "model": handle.info.to_dict(), "collection": cfg.collection()})
        return
    record = read_json_file(source, "KVzap run record", fix)
    validate(record, RUN_SCHEMA, str(source), fix)
    made_for, info = record["model"], handle.info
    if made_for["fingerprint"] != info.fingerprint:
        raise KVPError(f"{data} holds KVzap data of {made_for['name']} (fingerprint {made_for['fingerprint']}), not "
                       f"{info.name} (fingerprint {info.fingerprint}); {fix}")
    theirs, mine = cfg.collection_difference(record["collection"])
    if theirs or mine:
        raise KVPError(f"{data} holds KVzap data collected with {theirs}, not {mine}; re-run with {theirs} or {fix}")
    if source != file:
        source.replace(file)


def earlier_kinds(out: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The metrics of the kinds an earlier run fitted on the same data (a rerun with `--kind mlp` keeps linear's; one
    on data of another --seed, from another --data, does not)."""
    file = out / METRICS
    if not file.exists():
        return {}
    earlier = read_json_file(file, "KVzap metrics", "delete it and re-run the same command")
    return earlier.get("kinds", {}) if earlier.get("data") == data else {}


def train_kvzap(handle: ModelHandle, cfg: KVzapRunConfig, out: str | Path,
                data: str | Path | None = None) -> dict[str, Any]:
    """Collect what the data directory `data` (default: out/data) lacks, fit every kind of `cfg.kinds` on the
    training prompts, measure it on the held-out ones as it ships (fp16 weights) and write it to out/KIND; returns
    the metrics, also written to out/metrics.json."""
    out = Path(out)
    shared = data is not None and Path(data) != out / "data"
    data = Path(data) if data is not None else out / "data"
    check_writable(out, "KVzap directory", directory=True)
    check_writable(data, "KVzap data directory", directory=True)
    out.mkdir(parents=True, exist_ok=True)
    check_run(data, handle, cfg, "choose another --data" if shared else "choose another --out",
              legacy=None if shared else out / RUN)
    start = time.perf_counter()
    splits = {cfg.split: cfg.n, **({cfg.val_split: cfg.val_n} if cfg.val_n else {})}
    collected = {split: collect_split(handle, cfg, split, n, data / split) for split, n in splits.items()}
    collect_seconds = time.perf_counter() - start
    X, y = load_split(data / cfg.split, cfg.n)
    calibration_rows = outside_window(data / cfg.split, cfg.n)
    held_out = load_split(data / cfg.val_split, cfg.val_n) if cfg.val_n else None
    info = handle.info
    command = cfg.command(info.name, str(out), str(data))
    data_record = {"source": cfg.source, "split": cfg.split, "prompts": cfg.n, "tokens": X.shape[0],
                   "context_tokens": cfg.context_tokens, "val_split": cfg.val_split if held_out else None,
                   "val_prompts": cfg.val_n, "val_tokens": held_out[0].shape[0] if held_out else 0,
                   "seed": cfg.seed}
    metrics: dict[str, Any] = {"model": info.to_dict(), "command": command, "data": data_record,
                               "collected_now": collected, "collect_seconds": round(collect_seconds, 1),
                               "kinds": earlier_kinds(out, data_record)}
    for kind in cfg.kinds:
        start = time.perf_counter()
        extra: dict[str, Any] = {}
        if kind == "linear":
            model = linear_model(*fit_ridge(X, y, cfg.alpha))
        else:
            mlp, extra["history"] = fit_mlp(X, y, cfg.mlp)
            extra["seed"] = cfg.mlp.seed
            model = mlp.to_kvzap()
        model = model.half().float()  # measured as it ships
        r2 = r_squared(model, *held_out).tolist() if held_out else None
        summary = {"r2_per_layer": r2, "r2_mean": sum(r2) / len(r2) if r2 else None,
                   "train_r2_mean": float(r_squared(model, X, y).mean()),
                   "fit_seconds": round(time.perf_counter() - start, 1)}
        thresholds = {"window": DMS_WINDOW, "split": cfg.split, "prompts": cfg.n,
                      "quantiles": score_quantiles(model, X, calibration_rows)}
        save_kvzap(out / kind, model, {"kind": kind, "model": {"name": info.name, "fingerprint": info.fingerprint},
                                       "seed": extra.get("seed"), "command": command, "data": data_record,
                                       "thresholds": thresholds, **summary})
        metrics["kinds"][kind] = {**summary, **extra}
    write_json(out / METRICS, metrics)
    return metrics
