"""Training on several processes started by torchrun: the process group, each rank's device and share of the work,
and a clean exit.

Outside torchrun (no LOCAL_RANK in the environment) every function here acts for a single process, so
`python train.py` runs exactly as it does without this module.
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

# A gloo group beside the training one, for Python objects (captions, scores) and for waits that can outlast the
# default group's timeout (NCCL's is 10 minutes): rank 0 building the feature cache of COCO takes longer.
_cpu_group: dist.ProcessGroup | None = None
_device = torch.device("cpu")  # where the training group's collectives put their tensors


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); returns this rank's device: cuda:LOCAL_RANK on
    GPUs. Ranks other than 0 stop writing to stdout: everything they would print repeats rank 0's lines (errors
    still reach stderr)."""
    global _cpu_group, _device
    if "LOCAL_RANK" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)  # binds this process's collectives to its GPU
    else:
        dist.init_process_group("gloo")
    _cpu_group = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
    _device = device
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 writes checkpoints, logs and plots, and shows the progress bars."""
    return rank() == 0


def wrap(module: nn.Module) -> nn.Module:
    """DistributedDataParallel around `module` (its forward then averages the ranks' gradients in backward), or
    `module` itself in a single process. The wrapper shares the module's parameters."""
    if world_size() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[_device.index] if _device.type == "cuda" else None)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (one all_reduce); `values` itself in a single process."""
    if world_size() == 1:
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=_device)
    dist.all_reduce(totals)
    return totals.tolist()


def max_over_ranks(value: float) -> float:
    if world_size() == 1:
        return value
    highest = torch.tensor([value], dtype=torch.float64, device=_device)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    return highest.item()


def shard(n: int) -> range:
    """This rank's contiguous share of n items; the shares of ranks 0, 1, ... concatenate to range(n)."""
    r, w = rank(), world_size()
    return range(r * n // w, (r + 1) * n // w)


def gather(items: list[T]) -> list[T]:
    """Every rank's list, concatenated in rank order, on every rank (the inverse of `shard`)."""
    if world_size() == 1:
        return items
    lists: list[list[T] | None] = [None] * world_size()
    dist.all_gather_object(lists, items, group=_cpu_group)
    return [item for part in lists for item in part]


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` run by rank 0 alone, its result sent to every rank, so that all take the same decisions."""
    if world_size() == 1:
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_cpu_group)
    return box[0]


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a file) while the others wait; then the others run it."""
    if not is_main():
        dist.barrier(group=_cpu_group)
    yield
    if is_main() and world_size() > 1:
        dist.barrier(group=_cpu_group)


def exit_cleanly(entry: Callable[[], object]) -> None:
    """Run a script's entry point; under torchrun, end the process the way gloo and NCCL need.

    Every rank that finished normally (or stopped on a signal the ranks agreed on) reaches a barrier and destroys
    the process group before leaving: leaving without it makes gloo abort at exit in about one run in five. The
    process then ends with os._exit, after flushing, so no library tears down its threads in a random order. An
    error exits at once, without the barrier, because the other ranks may never reach it; torchrun then stops them.
    """
    try:
        entry()
        code = 0
    except SystemExit as e:
        if not dist.is_initialized():
            raise
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        if not dist.is_initialized():
            raise
        traceback.print_exc()
        code = 1
    if not dist.is_initialized():
        return
    if code == 0 or code > 128:  # finished, or stopped by SIGINT/SIGTERM at a step all ranks agreed on
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
