"""Multi-process training under ``torchrun`` (``python -m torch.distributed.run``).

The trainer (:func:`core.rectifier.train.train_rectifier`) wraps R in torch's
DistributedDataParallel when a process group is up; this module starts and ends that group
from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL with one
GPU per process when CUDA is there, gloo on CPUs.

    torchrun --nproc_per_node 4 -m core.rectifier train --mode recon --model ddpm-celebahq-256 \\
        --images faces/ --batch 8 --out recon.safetensors      # 4 x 8 images per step
"""

from __future__ import annotations

import os

import torch


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); initialises the process group under torchrun."""
    import torch.distributed as dist

    if not launched():
        return 0, 1, device or torch.device("cpu")
    cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def nonfinite_ranks(value: torch.Tensor) -> list[int]:
    """The ranks whose ``value`` is not finite (NaN or inf anywhere), agreed by every rank.

    Outside a process group: ``[0]`` or ``[]``.  Inside one, every rank must call this at the
    same point (it is a collective: one all-reduce of a [world size] flag vector), so all of them
    learn the same answer and can stop together, before the backward pass whose gradient
    all-reduce a stopped rank would never join (which would leave the others waiting)."""
    import torch.distributed as dist

    bad = not bool(torch.isfinite(value.detach()).all())
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [0] if bad else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.float32, device=value.device)  # NCCL: on the GPU
    flags[dist.get_rank()] = float(bad)
    dist.all_reduce(flags)
    return [i for i, f in enumerate(flags.tolist()) if f > 0]


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
