"""Distributed data parallel training under torchrun: which process this is, its device, and the few
collectives the learner needs.

torchrun starts one process per device and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, and the rendezvous in MASTER_ADDR/MASTER_PORT). A process started without
torchrun is rank 0 of a world of one, and every helper here is then the identity, so the
single-process path pays nothing and needs no process group.

Sharding is interleaved: rank r of w holds items r, r + w, r + 2w, ... of a list. `gather_rows`
undoes it, so that a result gathered from every rank is in the list's own order, equal to what one
process computes (tested in tests/trainer/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import distributed as torch_dist
from torch import nn

T = TypeVar("T")

# How long a collective waits for the other ranks before the run fails: long enough for rank 0 to
# run lr_find or write an export while the others wait, short enough that a rank that died ends the
# run rather than hanging it (torchrun then restarts or stops the group).
TIMEOUT = datetime.timedelta(minutes=30)


class DistributedError(RuntimeError):
    """A torchrun environment that cannot be used; the message says which variable and what to do."""


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks. Dist() is one process on its own."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank on this machine: the GPU it uses

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, plots, reports and the export."""
        return self.rank == 0

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`, interleaved (see the module's docstring)."""
        return list(items[self.rank :: self.world_size])

    # The seam the learner and the recipe go through: each is what one process would do (the value
    # itself, nothing to wait for) unless several ranks run.

    def broadcast(self, value: T | None) -> T:
        """Rank 0's `value` on every rank."""
        return broadcast(value, self)

    def from_main(self, read: Callable[[], T]) -> T:
        """What `read` returns on rank 0 (a file only it reads), on every rank; the others never call it."""
        return broadcast(read() if self.is_main else None, self)

    def main_writes(self, write: Callable[[], object]) -> None:
        """`write` on rank 0 alone; every rank goes on once it is done, so that any may read what it wrote."""
        if self.is_main:
            write()
        barrier(self)

    def barrier(self) -> None:
        barrier(self)

    def mean(self, value: float) -> float:
        return mean(value, self)

    def gather(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's interleaved share of `n` rows, in item order, on the CPU (gather_rows)."""
        return gather_rows(rows, n, self)

    def replicate(self, module: nn.Module) -> nn.Module:
        return replicate(module, self)

    def sync_buffers(self, module: nn.Module) -> None:
        sync_buffers(module, self)


def from_env(env: Mapping[str, str] = os.environ) -> Dist:
    """The Dist torchrun's variables describe; Dist() when they are absent."""
    if "WORLD_SIZE" not in env:
        return Dist()
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    except (KeyError, ValueError) as e:
        raise DistributedError(
            f"WORLD_SIZE is set but RANK/LOCAL_RANK are not whole numbers ({e}); start the trainer with "
            "torchrun, which sets them, or unset WORLD_SIZE for one process"
        ) from None
    if not 0 <= rank < world or local < 0:
        raise DistributedError(f"RANK {rank} is not within WORLD_SIZE {world}; start the trainer with torchrun")
    return Dist(rank, world, local)


def init(env: Mapping[str, str] = os.environ) -> Dist:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU) and pick this rank's GPU.
    A single process joins nothing. Safe to call twice."""
    d = from_env(env)
    if d.active and not torch_dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(d.local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend, rank=d.rank, world_size=d.world_size, timeout=TIMEOUT)
    return d


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def broadcast(value: T | None, d: Dist) -> T:
    """Rank 0's `value` on every rank (any picklable object: an lr, a decision, a state dict); the
    other ranks may pass None, as they often have nothing to offer."""
    if not d.active:
        return cast(T, value)
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])


def barrier(d: Dist) -> None:
    """Wait until every rank reaches this point (after rank 0 wrote a file the others read next)."""
    if d.active:
        torch_dist.barrier()


@contextlib.contextmanager
def local_main_first(d: Dist) -> Iterator[None]:
    """Run the block on each machine's local rank 0 first, then on its other ranks, which then find
    what it wrote there (resized copies of the images, the demo's digits) instead of racing it."""
    if d.active and d.local_rank != 0:
        barrier(d)
    yield
    if d.active and d.local_rank == 0:
        barrier(d)


def mean(value: float, d: Dist) -> float:
    """The mean of `value` over the ranks."""
    if not d.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    torch_dist.all_reduce(t)
    return float(t.item()) / d.world_size


def gather_rows(rows: torch.Tensor, n: int, d: Dist) -> torch.Tensor:
    """Every rank's `rows` (its interleaved shard of `n` items, first dimension) back in item order:
    the tensor one process would have computed for all `n`. Returned on the CPU, on every rank."""
    if not d.active:
        return rows.cpu()
    per_rank = -(-n // d.world_size)  # shards differ by one at most: pad each to the longest
    padded = torch.zeros((per_rank, *rows.shape[1:]), dtype=rows.dtype, device=_collective_device())
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(d.world_size)]
    torch_dist.all_gather(parts, padded)
    # Item i came from rank i % w, at row i // w.
    stacked = torch.stack(parts, dim=1).reshape(per_rank * d.world_size, *rows.shape[1:])
    return stacked[:n].cpu()


def replicate(module: nn.Module, d: Dist) -> nn.Module:
    """`module` wrapped in DistributedDataParallel, whose backward averages the gradients over the
    ranks; the module itself on one process. Build it after freezing: DDP registers only the
    parameters that require grad when it is made."""
    if not d.active:
        return module
    device_ids = [d.local_rank] if torch.cuda.is_available() else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


@torch.no_grad()
def sync_buffers(module: nn.Module, d: Dist) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP sends them at the start
    of each training forward, so after the last step of an epoch each rank holds statistics updated
    by its own batch; evaluation and saving need them equal."""
    if not d.active:
        return
    for buffer in module.buffers():
        moved = buffer.to(_collective_device())
        torch_dist.broadcast(moved, src=0)
        buffer.copy_(moved)


def _collective_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    if torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
