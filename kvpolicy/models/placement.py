"""Where a model runs: its device (CUDA when available, else CPU) and dtype (bf16 on CUDA, fp32 on CPU).

Names are parsed here once, for the Python API and for every command's --device/--dtype, so that a CUDA request
without CUDA or an unsupported dtype is one line before any model is read. torch is imported only inside the
functions: the command line builds its parser without it.
"""

from __future__ import annotations

import argparse
from typing import Any

from kvpolicy.errors import KVPError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def dtype_name(dtype: Any) -> str:
    """A torch dtype (or its name) by its plain name: "bfloat16", "float32"."""
    return str(dtype).removeprefix("torch.")


def resolve_device(device: Any = None):
    """A torch.device: `device` ("cpu", "cuda", "cuda:1", a torch.device) or, when None, CUDA if available."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise KVPError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise KVPError(f"device '{device}' was asked for but CUDA is not available here (torch "
                           f"{torch.__version__}); use --device cpu (device='cpu')")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise KVPError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                           "device(s); use cuda:0 .. cuda:N-1")
    elif resolved.type != "cpu":
        raise KVPError(f"device '{device}' is not supported; use cpu or cuda[:N]")
    return resolved


def resolve_dtype(dtype: Any, device) -> Any:
    """A torch dtype: `dtype` (a name such as "bf16"/"bfloat16"/"fp32", or a torch dtype) or, when None, bf16 on
    CUDA and fp32 on CPU. float16 runs on CUDA only (CPU kernels for it are slow or missing); bf16 runs anywhere."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise KVPError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)} (or bf16, fp16, fp32)")
    resolved = getattr(torch, DTYPES[name])
    if resolved == torch.float16 and device.type != "cuda":
        raise KVPError("float16 needs a CUDA device; on CPU use bfloat16 (half the memory of float32) or float32")
    return resolved


def synchronize(device) -> None:
    """Wait until `device` has finished its queued work, so that a clock read next counts it (CUDA runs
    asynchronously; a CPU needs no wait)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, as every command that loads a model takes them."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=(*DTYPE_CHOICES, "bf16", "fp16", "fp32"),
                        help="model weights and cache dtype (default: bfloat16 on CUDA, float32 on CPU)")
