"""``torchrun`` support: which rank am I, which samples are mine, wait for the others.

``torchrun --nproc-per-node K -m vgkernels sweep ...`` starts K processes with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. Each rank takes every K-th sample of the
length-sorted order (so ranks get similar lengths), writes its own shard files, and
rank 0 merges all shards after a barrier. Ranks share ``--out`` through the file
system (one machine, or a shared mount across nodes). The process group uses NCCL on
CUDA and gloo on CPU; it is used only for barriers.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = None, backend: str = None, timeout_s: float = 3600.0) -> DistInfo:
    """Join the ``torchrun`` group when ``WORLD_SIZE > 1``; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as tdist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    here = False
    if not tdist.is_initialized():
        tdist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                 timeout=datetime.timedelta(seconds=timeout_s))
        here = True
    if use_cuda:
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local, here)


def device_for(info: DistInfo, device: str = None) -> str:
    """``cuda:LOCAL_RANK`` under torchrun on GPUs, else ``device`` or the default."""
    if device:
        return device
    if torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return "cpu"


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def finish(info: DistInfo) -> None:
    if info.world > 1 and info.initialised_here:
        import torch.distributed as tdist

        tdist.destroy_process_group()


def shard(items: list, info: DistInfo) -> list:
    """This rank's share: items ``rank, rank + world, ...``."""
    return items[info.rank:: info.world]
