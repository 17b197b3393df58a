"""Distributed and device helpers: the same command runs alone or under ``torchrun``.

Under torchrun (``WORLD_SIZE`` > 1) the process group starts with NCCL on GPUs and gloo on
CPUs; each rank trains on its shard with DistributedDataParallel and only rank 0 writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> DistInfo:
    """Start the process group if launched by torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local, device)


def mixed_precision(amp: str, device: torch.device):
    """(autocast factory, GradScaler) for ``amp`` none/bf16/fp16: active on CUDA only (CPU runs
    fp32); the scaler only scales for fp16."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    enabled = device.type == "cuda" and dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=enabled and dtype == torch.float16)
    return (lambda: torch.autocast("cuda", dtype=dtype, enabled=enabled)), scaler


def cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_cat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate a tensor of any first-dimension length from every rank (on every rank)."""
    if not info.distributed:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
