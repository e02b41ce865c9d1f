"""``torchrun`` support: which rank am I, which samples are mine, wait for the others,
and which GPUs hold my model.

``torchrun --nproc-per-node K -m vgkernels sweep ...`` starts K processes with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. Each rank takes every K-th sample of the
length-sorted order (so ranks get similar lengths), writes its own shard files, and
rank 0 merges all shards after a barrier. Ranks share ``--out`` through the file
system (one machine, or a shared mount across nodes). The process group uses NCCL on
CUDA and gloo on CPU; it is used only for barriers.

Models larger than one GPU: ``--device-map auto`` splits a process's model layer by
layer over the GPUs it sees (accelerate's ``device_map``, one process). Under torchrun,
``--gpus-per-instance K`` gives each process its own block of K GPUs
(:func:`instance_gpus`) and splits its model over them: data parallel across
processes, model split within each. Start ``torchrun --nproc-per-node GPUS/K``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

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


def init(device: str = None, backend: str = None, timeout_s: float = 3600.0,
         gpus_per_instance: Optional[int] = None) -> DistInfo:
    """Join the ``torchrun`` group when ``WORLD_SIZE > 1``; single process otherwise.

    With ``gpus_per_instance`` K, local rank ``r`` makes GPU ``r*K`` (the first of its
    instance, see :func:`instance_gpus`) its current device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as tdist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda and gpus_per_instance:
        instance_gpus(local, local_world_size(world), gpus_per_instance, torch.cuda.device_count())  # checks
    here = False
    if not tdist.is_initialized():
        tdist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                 timeout=datetime.timedelta(seconds=timeout_s))
        here = True
    if use_cuda:
        torch.cuda.set_device(local * (gpus_per_instance or 1))
    return DistInfo(rank, world, local, here)


# ----------------------------------------------------------------------------- models over several GPUs


def local_world_size(world: int = 1) -> int:
    """Processes on this node (torchrun's ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def instance_gpus(local_rank: int, local_world: int, per_instance: Optional[int], visible: int) -> list:
    """GPU indices of one model instance: local rank ``r`` of ``local_world`` processes
    on a node with ``visible`` GPUs, each instance split over ``per_instance`` GPUs
    (None: an equal share of the visible GPUs, at least one).

    Instances take consecutive, disjoint blocks: ``[r*K, r*K + K)``. Raises
    :class:`~vgkernels.clitools.UsageError` when the node has too few GPUs.
    """
    from ..clitools import UsageError

    if local_world < 1 or not 0 <= local_rank < local_world:
        raise UsageError(f"local rank {local_rank} of {local_world} processes: not a valid rank")
    if visible < 1:
        raise UsageError("--device-map auto / --gpus-per-instance: no CUDA GPU is visible")
    k = int(per_instance) if per_instance else max(1, visible // local_world)
    if k < 1:
        raise UsageError(f"--gpus-per-instance: expected >= 1, got {per_instance}")
    if local_world * k > visible:
        raise UsageError(f"--gpus-per-instance {k} with {local_world} process(es) on this node needs "
                         f"{local_world * k} GPUs, but {visible} are visible; start torchrun with --nproc-per-node "
                         f"{max(1, visible // k)} (GPUs / K)")
    return list(range(local_rank * k, local_rank * k + k))


def max_memory_for(gpus, fraction: float = 0.9) -> dict:
    """accelerate's ``max_memory`` for a ``device_map`` restricted to ``gpus``: a share of
    each GPU's free memory (the rest is left for activations and the KV cache), and no
    other device, so no layer lands on another instance's GPUs or on the CPU."""
    out = {}
    for g in gpus:
        free, _ = torch.cuda.mem_get_info(g)
        out[int(g)] = int(free * fraction)
    return out


def gpus_per_instance(args) -> Optional[int]:
    return getattr(args, "gpus_per_instance", None)


def placement(info: DistInfo, args) -> dict:
    """``load_model`` keywords that place this rank's model: ``{"device": ...}``, or with
    ``--device-map auto`` / ``--gpus-per-instance K`` a ``device_map`` over this
    instance's GPUs only (all visible GPUs in a single process)."""
    from ..clitools import UsageError

    k = gpus_per_instance(args)
    dm = getattr(args, "device_map", None) or ("auto" if k else None)
    if dm is None:
        return {"device": device_for(info, args.device)}
    if args.device:
        raise UsageError(f"--device {args.device} and --device-map / --gpus-per-instance are exclusive")
    if not torch.cuda.is_available():
        return {"device_map": dm}  # everything on the CPU (tests, or a machine without GPUs)
    visible = torch.cuda.device_count()
    gpus = instance_gpus(info.local_rank, local_world_size(info.world), k, visible)
    return {"device_map": dm, "max_memory": max_memory_for(gpus)}


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
