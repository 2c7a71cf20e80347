"""Which process am I under `torchrun`? One small context for every stage that runs on several processes.

Under `torchrun --nproc_per_node K` (WORLD_SIZE > 1) the process group is started with gloo on CPU and nccl on
GPU: `kvp traces` splits the prompts between the ranks, `kvp train` splits each batch and averages the gradients.
A plain `python`/`kvp` run is a world of one, where every collective is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kvpolicy.errors import KVPError

_REDUCE_OPS = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


LEAVE_TIMEOUT_S = 60  # how long a leaving rank waits for the others at the final barrier


class AnotherRankFailed(KVPError):
    """What a rank that did not fail raises when another rank did (after a status check every rank took part in)."""

    def __init__(self, rank: int):
        super().__init__(f"another rank failed (rank {rank} stopped too); re-run the same command to resume")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that validates, logs and writes checkpoints and manifests."""
        return self.rank == 0

    def all_reduce(self, values: list[int], op: str) -> list[int]:
        """Element-wise "min", "max" or "sum" of `values` over all ranks (a collective: every rank must call it)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=_REDUCE_OPS[op])
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (so all ranks take the same branch)."""
        return self.all_reduce([int(flag)], "max")[0] > 0

    def check(self, ok: bool) -> None:
        """A status check (a collective: every rank takes part in each one, in the same order): raise
        AnotherRankFailed when this rank is `ok` but another is not; a rank that is not ok raises its own error
        after it. A world of one passes at once."""
        if not self.all_reduce([int(ok)], "min")[0] and ok:
            raise AnotherRankFailed(self.rank)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched() -> tuple[int, int]:
    """(rank, world size) that torchrun gave this process, from its environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | None = None) -> DistContext:
    """Join the torchrun process group if there is one; pick the device (cuda:LOCAL_RANK when CUDA is there and
    `device` does not say "cpu")."""
    rank, world = launched()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device(device or "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world=world, device=dev)


_held = False  # a run of several stages (`held_process_group`) keeps one process group for all of them


@contextmanager
def held_process_group(device: str | None = None) -> Iterator[None]:
    """Join the torchrun process group once for a run of several stages (`kvp fit`, `kvp experiment`): each stage's
    own init_distributed then finds it and its shutdown_distributed leaves it, and it is left once, at the end. (A
    group destroyed and made again in one process reads the first one's addresses from torchrun's store: the second
    connection fails.) A world of one: nothing to do."""
    global _held
    if launched()[1] <= 1 or _held:
        yield
        return
    ctx = init_distributed(device)
    _held = True
    try:
        yield
    finally:
        _held = False
        shutdown_distributed(ctx)


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group (every rank, after its last collective), unless a run of several stages holds it.
    Under gloo a bounded barrier first, so that no rank tears down the connections while another still finishes the
    last collective on them (seen once as a SIGABRT, "terminate called without an active exception", in a rank that
    left early)."""
    if ctx.distributed and dist.is_initialized() and not _held:
        if dist.get_backend() == "gloo":
            try:  # bounded: a rank that failed outside a collective never arrives, and the others still leave
                dist.monitored_barrier(timeout=timedelta(seconds=LEAVE_TIMEOUT_S))
            except RuntimeError:
                pass
        dist.destroy_process_group()
