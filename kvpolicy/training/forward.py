"""The forward pass a training step runs: the policy network, wrapped in DistributedDataParallel under torchrun and
compiled with torch.compile when asked, and the eager fallback for machines where the compiler cannot build it (no
C compiler, an unsupported CPU): training then continues uncompiled instead of failing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel

from kvpolicy.distributed import DistContext
from kvpolicy.policy.network import PolicyNet

T = TypeVar("T")
_COMPILER_MODULES = ("torch._dynamo", "torch._inductor")  # where torch.compile's own errors come from


def training_forward(net: PolicyNet, ctx: DistContext, compile: bool) -> torch.nn.Module:
    """`net` as training calls it: DDP-wrapped under torchrun (gradients averaged over ranks), compiled if asked."""
    module: torch.nn.Module = net
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        module = DistributedDataParallel(net, device_ids=ids)
    return torch.compile(module) if compile else module


def with_eager_fallback(step: Callable[[], T], go_eager: Callable[[], None]) -> T:
    """step(); if torch.compile's compiler fails inside it, warn, `go_eager()` (rebuild the forward uncompiled)
    and run step() again. Any other error propagates."""
    try:
        return step()
    except Exception as err:
        if not type(err).__module__.startswith(_COMPILER_MODULES):
            raise
        warnings.warn(f"torch.compile failed here ({type(err).__name__}); training without compilation", stacklevel=2)
        go_eager()
        return step()
