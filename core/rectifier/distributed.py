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


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
