"""Sharded on-disk trace store: safetensors shards + one JSON manifest.

Layout of DIR:
    shard-r{rank:03d}-{seq:05d}.safetensors   per sample i: "{i:07d}.keys"/".values" (L, H, T, d) fp16,
                                              "{i:07d}.utility" (L, H, T) fp32, "{i:07d}.baseline.NAME" (L, H, T)
                                              fp32, with --hidden-states "{i:07d}.states" (L, T, hidden) fp16;
                                              metadata: the run config and, per sample, its record with a
                                              CRC32 of every (tensor, layer) slice
    manifest.json                             written once every sample is present (rank 0 under torchrun)

The layer axis leads, so one (sample, layer) is one contiguous slice that `safe_open(...).get_slice` reads from the
memory map without touching the rest. Shards are written whole under a temporary name and renamed into place:
a killed run leaves only complete shards, and a rerun skips the samples they hold. A shard is closed at about
`shard_bytes`, or after `shard_samples` samples or `shard_seconds`, whichever comes first, so a kill loses little.

The manifest and every shard header are checked against the schemas below on reading, and a manifest may name
only shard files of its own directory: a damaged or hand-edited one is a one-line error naming the file and field.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from kvpolicy.errors import KVPError
from kvpolicy.io import (atomic_path, check_regular_file, describe_os_error, read_json, refuse_link, sha256_json,
                         special_kind, write_durably, write_json)
from kvpolicy.models.handle import MODEL_SCHEMA, ModelIdentity, ModelInfo
from kvpolicy.schema import Optional, validate
from kvpolicy.traces.config import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, DEFAULT_SHARD_SECONDS

FORMAT = "kvpolicy-traces/1"
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-r*.safetensors"
SHARD_NAME = re.compile(r"shard-r\d{3,}-\d{5,}\.safetensors")  # what TraceWriter names its shards
CORE_TENSORS = ("keys", "values", "utility")
# what must agree between a run and traces already in its output directory
COMPATIBILITY_KEYS = ("format", "model", "model_dtype", "source", "split", "context_tokens", "future", "seeds",
                      "baselines", "hidden_states")
UNRECORDED = {"model_dtype": "float32", "hidden_states": False}  # what traces written before a field existed ran with
STATES = "states"  # the optional per-sample tensor of the layers' input hidden states (`kvp traces --hidden-states`)

# Schemas (kvpolicy.schema) of what the readers use: required is what every writer (kvp traces, the synthetic traces
# of kvpolicy.training.synthetic) writes; Optional what only some write.
TRACE_MODEL_SCHEMA = MODEL_SCHEMA | {"family": Optional(str), "n_query_heads": Optional(int),
                                    "max_positions": Optional(int)}
# the run description, stored in every shard header and at the top of the manifest
CONFIG_SCHEMA = {
    "format": str,
    "model": TRACE_MODEL_SCHEMA,
    "source": str,
    "source_description": Optional(str),
    "model_dtype": Optional(str),
    "split": str,
    "context_tokens": Optional(int),
    "future": {"mode": str, "max_tokens": Optional(int)},
    "seeds": dict,
    "baselines": {"names": [str]},
    "hidden_states": Optional(bool),
    "code_version": Optional(str),
}
# one sample as TraceWriter.add records it (plus the prompt's own meta fields)
RECORD_SCHEMA = {"index": int, "id": Optional(str), "length": int, "future_length": Optional(int), "seconds": float,
                 "model_seconds": float, "code_version": str, "warnings": Optional([str]), "threads": Optional(int)}
# a shard header, as `_shard_metadata` parses it: per sample, a CRC32 per layer of each tensor
SHARD_HEADER_SCHEMA = {"kvpolicy.config": CONFIG_SCHEMA,
                       "kvpolicy.samples": [RECORD_SCHEMA | {"crc": {name: [int] for name in CORE_TENSORS}}]}
MANIFEST_SCHEMA = CONFIG_SCHEMA | {
    "samples": [RECORD_SCHEMA | {"shard": str}],
    "shards": [{"file": str, "bytes": int, "samples": int}],
    "n_samples": int,
    "prompt_tokens": int,
    "generation_seconds": float,
    "model_seconds": float,
    "code_versions": [str],
    "last_run": Optional({"world_size": int, "wall_seconds": float, "recorded": int, "skipped": int}),
}
MANIFEST_FIX = "re-run the `kvp traces` command that recorded this directory to rewrite it from its shards"


def tensor_name(index: int, tensor: str) -> str:
    return f"{index:07d}.{tensor}"


def _layer_crc(tensor: torch.Tensor, layer: int) -> int:
    return zlib.crc32(tensor[layer].contiguous().view(torch.uint8).numpy().data)


def shard_paths(directory: str | Path) -> list[Path]:
    """The shard files of a trace directory, refused (by every reader and writer alike) when one is a link or
    not a regular file."""
    paths = sorted(p for p in Path(directory).glob(SHARD_GLOB) if SHARD_NAME.fullmatch(p.name))
    for path in paths:
        _check_shard_file(path)
    return paths


def _check_shard_file(path: Path) -> None:
    refuse_link(path, "trace shard")
    if (kind := special_kind(path)) is not None:
        raise KVPError(f"trace shard {path} is {kind}, not a regular file; remove it and re-run the same "
                       "`kvp traces` command")


def _open_shard(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise KVPError(f"trace shard {path} is truncated or corrupted ({err}); delete it and re-run the same "
                       "`kvp traces` command to regenerate its samples") from None


def _shard_metadata(path: Path) -> tuple[dict, list[dict]]:
    """(run config, sample records) stored in a shard's header, checked against SHARD_HEADER_SCHEMA."""
    meta = _open_shard(path).metadata() or {}
    try:
        if meta.get("kvpolicy.format") != FORMAT:
            raise ValueError(f"format {meta.get('kvpolicy.format')!r}")
        header = {key: json.loads(meta[key]) for key in SHARD_HEADER_SCHEMA}
    except (KeyError, ValueError) as err:
        raise KVPError(f"trace shard {path} has an unreadable header ({err}); delete it and re-run "
                       "`kvp traces`") from None
    validate(header, SHARD_HEADER_SCHEMA, f"trace shard {path}",
             "delete it and re-run the same `kvp traces` command to regenerate its samples")
    return header["kvpolicy.config"], header["kvpolicy.samples"]


def _describe_model(model: dict) -> str:
    return f"{model.get('name')} (fingerprint {model.get('fingerprint')})"


def check_compatible(existing: dict, config: dict, where: str) -> None:
    """Refuse to mix traces of different runs in one directory."""
    if existing.get("model", {}).get("fingerprint") != config["model"]["fingerprint"]:
        raise KVPError(f"{where} holds traces of model {_describe_model(existing.get('model', {}))}, not "
                       f"{_describe_model(config['model'])}; choose another --out directory")
    there, now = ({k: run.get(k, UNRECORDED.get(k)) for k in COMPATIBILITY_KEYS} for run in (existing, config))
    differing = [k for k in COMPATIBILITY_KEYS if there[k] != now[k]]
    if differing:
        detail = "; ".join(f"{k}: {there[k]} there vs {now[k]} now" for k in differing)
        raise KVPError(f"{where} holds traces of another run ({detail}); use the same settings to resume, or "
                       "choose another --out directory")


def check_trace_directory(directory: str | Path) -> None:
    """Refuse, before any work, a trace directory whose shards or manifest a run could neither read nor replace:
    a link or a file that is not a regular one in their place (the rule of kvpolicy.io)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    shard_paths(directory)
    path = directory / MANIFEST
    refuse_link(path, "trace manifest")
    if (kind := special_kind(path)) is not None:
        raise KVPError(f"trace manifest {path} is {kind}, not a regular file; remove it and re-run the same "
                       "`kvp traces` command")


def _previous_run(directory: Path) -> dict | None:
    """The run description in DIR's manifest; None without one or when it is broken (the run rewrites it)."""
    check_trace_directory(directory)
    path = directory / MANIFEST
    try:
        manifest = read_json(path)
        validate(manifest, CONFIG_SCHEMA, str(path), MANIFEST_FIX)
    except (OSError, ValueError, KVPError):
        return None
    return manifest


class TraceWriter:
    """Buffers traces and writes them as shards of about `shard_bytes`, or of `shard_samples` samples, or of what
    was buffered within `shard_seconds` of `clock()` after a shard's first sample, whichever comes first; `done`
    holds the sample indices that complete shards in the directory already hold (any rank), so a rerun skips them,
    and `threads` the CPU thread counts those samples were recorded with."""

    def __init__(self, directory: str | Path, config: dict, rank: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 shard_samples: int = DEFAULT_SHARD_SAMPLES, shard_seconds: float = DEFAULT_SHARD_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.directory = Path(directory)
        self.config = config
        self.rank = rank
        self.shard_bytes = shard_bytes
        self.shard_samples = shard_samples
        self.shard_seconds = shard_seconds
        self.clock = clock
        self.directory.mkdir(parents=True, exist_ok=True)
        if (existing := _previous_run(self.directory)) is not None:
            check_compatible(existing, config, str(self.directory))
        self.done: set[int] = set()
        self.threads: set[int] = set()
        for path in shard_paths(self.directory):
            existing, records = _shard_metadata(path)
            check_compatible(existing, config, str(self.directory))
            self.done.update(r["index"] for r in records)
            self.threads.update(r["threads"] for r in records if "threads" in r)
        prefix = f"shard-r{rank:03d}-"
        for stale in self.directory.glob(f".{prefix}*.tmp"):  # temporaries of a killed run of this rank
            shutil.rmtree(stale, ignore_errors=True)
        mine = [int(p.stem.rsplit("-", 1)[1]) for p in shard_paths(self.directory) if p.name.startswith(prefix)]
        self._next_seq = max(mine, default=-1) + 1
        self._tensors: dict[str, torch.Tensor] = {}
        self._records: list[dict] = []
        self._bytes = 0
        self._started = 0.0  # clock() when the buffered shard got its first sample
        self.written: list[Path] = []

    def add(self, index: int, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Queue sample `index`: record = its JSON-able description; tensors = {"keys", "values", "utility",
        "baseline.NAME"...}, each with a leading layer axis."""
        if not self._records:
            self._started = self.clock()
        crc = {name: [_layer_crc(t, layer) for layer in range(t.shape[0])] for name, t in tensors.items()}
        self._records.append({**record, "index": index, "crc": crc})
        for name, t in tensors.items():
            self._tensors[tensor_name(index, name)] = t.contiguous()
            self._bytes += t.numel() * t.element_size()
        if self._shard_complete():
            self.flush()

    def _shard_complete(self) -> bool:
        """Whether the buffer makes a shard: big enough, enough samples, or its first sample old enough."""
        return (self._bytes >= self.shard_bytes or len(self._records) >= self.shard_samples
                or self.clock() - self._started >= self.shard_seconds)

    def flush(self) -> None:
        if not self._records:
            return
        path = self.directory / f"shard-r{self.rank:03d}-{self._next_seq:05d}.safetensors"
        metadata = {"kvpolicy.format": FORMAT, "kvpolicy.config": json.dumps(self.config, sort_keys=True),
                    "kvpolicy.samples": json.dumps(self._records)}
        data = save_safetensors(self._tensors, metadata=metadata)
        try:
            with atomic_path(path) as tmp:
                write_durably(tmp, data)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise KVPError(f"disk full while writing {path.name} in {self.directory} (no partial shard left); "
                               "free some space and re-run the same command to resume") from None
            raise KVPError(f"cannot write trace shard {path.name}: {describe_os_error(err, path)} (no partial "
                           "shard left); fix the directory (permissions, mount) and re-run the same command to "
                           "resume") from None
        self.written.append(path)
        self._next_seq += 1
        self._tensors, self._records, self._bytes = {}, [], 0

    def close(self) -> None:
        self.flush()


def write_manifest(directory: str | Path, config: dict, n_samples: int, extra: dict | None = None) -> dict:
    """Merge every shard's records into manifest.json (samples 0..n_samples-1, sorted); all must be present."""
    directory = Path(directory)
    refuse_link(directory / MANIFEST, "trace manifest")
    samples: dict[int, dict] = {}
    shards = []
    for path in shard_paths(directory):
        existing, records = _shard_metadata(path)
        check_compatible(existing, config, str(directory))
        kept = [r for r in records if r["index"] < n_samples]
        for r in kept:
            samples[r["index"]] = {k: v for k, v in r.items() if k != "crc"} | {"shard": path.name}
        shards.append({"file": path.name, "bytes": path.stat().st_size, "samples": len(records)})
    missing = sorted(set(range(n_samples)) - set(samples))
    if missing:
        raise KVPError(f"{directory} lacks {len(missing)} of {n_samples} samples (first: {missing[:5]}); re-run the "
                       "same `kvp traces` command to finish them")
    ordered = [samples[i] for i in range(n_samples)]
    manifest = {
        **config,
        "samples": ordered,
        "shards": shards,
        "n_samples": n_samples,
        "prompt_tokens": sum(s["length"] for s in ordered),
        "generation_seconds": round(sum(s["seconds"] for s in ordered), 3),
        "model_seconds": round(sum(s["model_seconds"] for s in ordered), 3),
        "code_versions": sorted({s["code_version"] for s in ordered}),
        **(extra or {}),
    }
    write_json(directory / MANIFEST, manifest)
    return manifest


def _check_shard_name(directory: Path, name: str, where: Path, field: str) -> None:
    """Refuse a shard name that is not a plain writer-made file name of `directory`, or names a link."""
    if not SHARD_NAME.fullmatch(name) or Path(name).name != name:
        raise KVPError(f"{where}: field '{field}' names {name!r}, not a shard file of this directory (shard-rRRR-"
                       f"SSSSS.safetensors, no path); {MANIFEST_FIX}")
    _check_shard_file(directory / name)


def _load_manifest(directory: Path) -> dict:
    """DIR/manifest.json, checked against MANIFEST_SCHEMA, with every shard it names confined to DIR and listed."""
    path = directory / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise KVPError(f"no {MANIFEST} in {directory}: not a finished trace directory; run "
                       "`kvp traces ... --out DIR` until it completes")
    refuse_link(path, "trace manifest")
    check_regular_file(path, "trace manifest", MANIFEST_FIX)
    try:
        manifest = read_json(path)
    except ValueError as err:
        raise KVPError(f"{path} is not valid JSON ({err}); {MANIFEST_FIX}") from None
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
        raise KVPError(f"{path} has format {manifest.get('format')!r}, this kvpolicy reads {FORMAT!r}")
    validate(manifest, MANIFEST_SCHEMA, str(path), MANIFEST_FIX)
    for i, shard in enumerate(manifest["shards"]):
        _check_shard_name(directory, shard["file"], path, f"shards[{i}].file")
    listed = {shard["file"] for shard in manifest["shards"]}
    for i, sample in enumerate(manifest["samples"]):
        if sample["shard"] not in listed:
            _check_shard_name(directory, sample["shard"], path, f"samples[{i}].shard")
            raise KVPError(f"{path}: field 'samples[{i}].shard' names {sample['shard']!r}, which 'shards' does not "
                           f"list; {MANIFEST_FIX}")
    return manifest


@dataclass
class TraceSample:
    """One sample's trace. keys, values: ([L,] H, T, d) fp16; utility: ([L,] H, T) fp32; positions: (T,) int64;
    states: ([L,] T, hidden) fp16, the layers' input hidden states, in traces recorded with them (else None)."""

    keys: torch.Tensor
    values: torch.Tensor
    utility: torch.Tensor
    positions: torch.Tensor
    states: torch.Tensor | None = None


class TraceReader:
    """Read traces one (sample, layer) at a time from memory-mapped shards. `model`: the model they were recorded
    from (name, fingerprint, KV-cache shape).

    The manifest is checked on opening (MANIFEST_SCHEMA; every shard it names a listed file of this directory).
    Every slice read is checked against the CRC32 recorded at write time (`verify=False` skips that); a shard whose
    size differs from the manifest's, or whose header or data does not check out, raises a KVPError naming it.
    """

    def __init__(self, directory: str | Path, verify: bool = True):
        self.directory = Path(directory)
        self.manifest: dict = _load_manifest(self.directory)
        self.model = ModelIdentity.from_dict(self.manifest["model"])
        self.verify = verify
        self._shard_bytes = {s["file"]: s["bytes"] for s in self.manifest["shards"]}
        self._handles: dict[str, Any] = {}
        self._crcs: dict[int, dict[str, list[int]]] = {}

    @property
    def lengths(self) -> list[int]:
        return [s["length"] for s in self.manifest["samples"]]

    @property
    def baselines(self) -> list[str]:
        return list(self.manifest["baselines"]["names"])

    @property
    def has_states(self) -> bool:
        """Whether every sample holds its layers' input hidden states (`kvp traces --hidden-states`)."""
        return bool(self.manifest.get("hidden_states"))

    @property
    def manifest_hash(self) -> str:
        """Fixes the trace set: the manifest without `last_run`, the log of the latest `kvp traces` run, which a
        re-run that records nothing rewrites (a training run resumes on the same traces after such a re-run)."""
        return sha256_json({k: v for k, v in self.manifest.items() if k != "last_run"})

    def __len__(self) -> int:
        return len(self.manifest["samples"])

    def check_model(self, info: ModelInfo) -> None:
        if info.fingerprint != self.model.fingerprint:
            raise KVPError(f"traces in {self.directory} were recorded from {self.model.name} (fingerprint "
                           f"{self.model.fingerprint}), not {info.name} (fingerprint {info.fingerprint}); record "
                           "traces with this model first")

    # reading
    def _shard(self, sample: int):
        if not 0 <= sample < len(self):
            raise KVPError(f"sample {sample} out of range: {self.directory} holds {len(self)} samples")
        name = self.manifest["samples"][sample]["shard"]
        if name not in self._handles:
            path = self.directory / name
            size = path.stat().st_size if path.exists() else None
            if size != self._shard_bytes.get(name):
                raise KVPError(f"trace shard {path} is truncated or missing ({size} bytes, manifest says "
                               f"{self._shard_bytes.get(name)}); delete it and re-run the same `kvp traces` command")
            self._handles[name] = _open_shard(path)
        return self._handles[name]

    def _slice(self, sample: int, tensor: str, layers: int | slice) -> torch.Tensor:
        handle = self._shard(sample)
        try:
            data = handle.get_slice(tensor_name(sample, tensor))[layers]
        except SafetensorError as err:
            raise KVPError(f"trace shard {self.directory / self.manifest['samples'][sample]['shard']} cannot serve "
                           f"{tensor} of sample {sample} ({err}); delete it and re-run `kvp traces`") from None
        if self.verify:
            self._check(sample, tensor, layers, data)
        return data

    def _check(self, sample: int, tensor: str, layers: int | slice, data: torch.Tensor) -> None:
        shard = self.directory / self.manifest["samples"][sample]["shard"]
        if sample not in self._crcs:
            _, records = _shard_metadata(shard)
            self._crcs.update((r["index"], r["crc"]) for r in records if r["index"] < len(self))
        expected = self._crcs[sample][tensor]
        chosen = [layers] if isinstance(layers, int) else list(range(self.model.n_layers)[layers])
        stack = data.unsqueeze(0) if isinstance(layers, int) else data
        for offset, layer in enumerate(chosen):
            if _layer_crc(stack, offset) != expected[layer]:
                raise KVPError(f"trace shard {shard} is corrupted ({tensor} of sample {sample}, layer {layer} fails "
                               "its checksum); delete it and re-run the same `kvp traces` command")

    def positions(self, sample: int) -> torch.Tensor:
        """(T,) int64: a trace holds the whole prompt, token i at position i."""
        return torch.arange(self.manifest["samples"][sample]["length"])

    def read(self, sample: int, layer: int) -> TraceSample:
        """keys, values (H, T, d) fp16, utility (H, T) fp32, positions (T,) of one (sample, layer)."""
        if not 0 <= layer < self.model.n_layers:
            raise KVPError(f"layer {layer} out of range: the traces have {self.model.n_layers} layers")
        parts = [self._slice(sample, t, layer) for t in CORE_TENSORS]
        states = self._slice(sample, STATES, layer) if self.has_states else None
        return TraceSample(*parts, positions=self.positions(sample), states=states)

    def read_layers(self, sample: int, layers: Sequence[int] | None = None) -> TraceSample:
        """keys, values (L, H, T, d), utility (L, H, T), states (L, T, hidden) or None for `layers` (all when
        None), positions (T,)."""
        if layers is None:
            parts = [self._slice(sample, t, slice(None)) for t in CORE_TENSORS]
            states = self._slice(sample, STATES, slice(None)) if self.has_states else None
            return TraceSample(*parts, positions=self.positions(sample), states=states)
        rows = [self.read(sample, layer) for layer in layers]
        states = torch.stack([r.states for r in rows]) if self.has_states else None
        return TraceSample(torch.stack([r.keys for r in rows]), torch.stack([r.values for r in rows]),
                           torch.stack([r.utility for r in rows]), positions=self.positions(sample), states=states)

    def read_baseline(self, sample: int, layer: int, name: str) -> torch.Tensor:
        """(H, T) fp32 scores of a query-based baseline (higher = keep), as listed in manifest["baselines"]."""
        if name not in self.baselines:
            raise KVPError(f"traces in {self.directory} store no '{name}' baseline; stored: "
                           f"{', '.join(self.baselines) or 'none'} (record with --baselines {name})")
        return self._slice(sample, f"baseline.{name}", layer)
