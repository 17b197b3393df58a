"""Device, precision and distributed helpers: the same command runs alone or under ``torchrun``.

Under torchrun (``WORLD_SIZE`` > 1) the process group starts with NCCL on GPUs and gloo on
CPUs; each rank trains on its shard with DistributedDataParallel and only rank 0 writes.
``runtime.device`` (``--device``) picks the device; ``train.amp``/``detector.amp`` the training
precision, resolved once (:func:`resolve_precision`) and recorded with the run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cxrcam.errors import CxrcamError

PRECISIONS = ("fp32", "bf16", "fp16")


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


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU where torch sees one, else the CPU; ``cpu``; ``cuda`` (this rank's
    GPU) or ``cuda:N``. A GPU asked for where there is none is one line, not a CUDA traceback."""
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
            raise CxrcamError(f"device {name} (--device, or runtime.device in the config): torch sees no CUDA device on "
                              f"this machine (torch {torch.__version__}, {build}); use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else local_rank
        if index >= torch.cuda.device_count():
            raise CxrcamError(f"device {name} (--device, or runtime.device in the config): this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise CxrcamError(f"device {name!r} (--device, or runtime.device in the config): choose auto, cpu, cuda or cuda:N")


def setup(device: str = "auto") -> DistInfo:
    """Start the process group if launched by torchrun; pick this rank's device (``runtime.device``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local, chosen)


def resolve_precision(amp: str, device: torch.device, key: str = "train.amp") -> str:
    """The precision a run trains in: ``auto`` is bf16 on a GPU that has it (fp16 on older ones) and
    fp32 on a CPU; an explicit ``bf16`` autocasts on a CPU too; ``fp16`` needs CUDA (its gradient
    scaling is a GPU path); ``none`` is fp32."""
    cuda = device.type == "cuda"
    if amp == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if amp in ("none", "fp32"):
        return "fp32"
    if amp == "fp16" and not cuda:
        raise CxrcamError(f"{key}=fp16 runs on CUDA only; on a CPU use {key}=bf16 (CPU autocast) or fp32")
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise CxrcamError(f"{key}=bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32")
    if amp not in PRECISIONS:
        raise CxrcamError(f"{key}={amp!r}: choose auto, fp32, bf16 or fp16")
    return amp


def mixed_precision(precision: str, device: torch.device):
    """(autocast factory, GradScaler) for a resolved ``precision``: autocast to bf16/fp16 on the
    run's device (CPU autocast included), none for fp32; the scaler only scales for fp16."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return (lambda: torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)), scaler


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
