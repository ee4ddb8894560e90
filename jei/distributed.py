"""Training on several processes under ``torchrun``: which process this is, and the few
collective operations the stages need.

``torchrun --nproc_per_node=N jei-train ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous address in their environment; ``init`` joins
them in one process group (NCCL on CUDA, gloo on CPU). Without those variables everything here
is a no-op for a single process, so the single-process path is unchanged.

How the work is divided, and why results match one process:
- Every rank builds the same batches (same seeds), and each trains on its own contiguous slice
  of every batch (``local_rows``). Gradients are summed over ranks with each rank's loss weighted
  by its share of the batch, so for losses that are means over samples the update is the one the
  whole batch gives on one process, up to the order of floating-point sums (and BatchNorm
  statistics, which each rank computes on its slice while the backbone trains).
- Feature extraction: each rank computes a contiguous range of the split's batches
  (``shard_range``), see ``jei.features``.
- Only rank 0 writes results, checkpoints and caches; the exits' evaluation runs there alone.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

TIMEOUT = datetime.timedelta(minutes=30)  # a rank waits this long for the others (feature extraction can be long)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one launch."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes results (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> World:
    """What the environment says (``torchrun``'s variables); one process without them."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def current() -> World:
    """This process's ``World`` once ``init`` has joined the group (one process otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the launch's process group when started by ``torchrun`` (a no-op otherwise).

    Returns this process's ``World`` and the device it runs on: under torchrun on CUDA, the
    GPU of its local rank (``cuda:LOCAL_RANK``), whatever index ``device`` named.
    """
    world = launched()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, **({"device_id": device} if device.type == "cuda" else {}))
    return current(), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def shard_range(count: int, world: World) -> range:
    """This rank's contiguous share of ``count`` items (batches), the first ranks one larger."""
    base, extra = divmod(count, world.size)
    start = world.rank * base + min(world.rank, extra)
    return range(start, start + base + (1 if world.rank < extra else 0))


def local_rows(batch_size: int, world: World) -> tuple[slice, float]:
    """The rows of a ``batch_size`` batch that this rank trains on, and the factor on its mean
    loss that makes the ranks' averaged gradients the whole batch's mean-loss gradient (the
    average is over ``world.size`` ranks). A batch smaller than the world is trained whole on
    every rank (factor 1: each computes the same gradient)."""
    if batch_size < world.size:
        return slice(0, batch_size), 1.0
    rows = shard_range(batch_size, world)
    return slice(rows.start, rows.stop), len(rows) * world.size / batch_size


def take_rows(inputs: Any, rows: slice) -> Any:
    """Rows ``rows`` of a batch: a tensor, or a PyG ``Batch`` of graphs (rebuilt from its graphs)."""
    if isinstance(inputs, Tensor):
        return inputs[rows]
    if hasattr(inputs, "index_select") and hasattr(inputs, "from_data_list"):
        return type(inputs).from_data_list(inputs.index_select(range(rows.start, rows.stop)))
    raise TypeError(f"cannot split a batch of type {type(inputs).__qualname__} across processes")


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``parameters`` over the ranks (what DDP does in its backward),
    one flattened all-reduce; parameters without a gradient count as zero on that rank."""
    world = current()
    if not world.distributed:
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for param, grad in zip(params, grads):
        count = grad.numel()
        param.grad = flat[offset : offset + count].view_as(param).clone()
        offset += count


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (so all ranks start from the same weights)."""
    if not current().distributed:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def _collective_device() -> torch.device:
    """Where small tensors for a collective live: NCCL only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_mean(values: Sequence[float]) -> list[float]:
    """Elementwise mean over the ranks of a few numbers (losses for the log)."""
    world = current()
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return (tensor / world.size).tolist()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    world = current()
    if not world.distributed:
        return [value]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered
