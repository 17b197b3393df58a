"""``last.pt``: what both training loops save each epoch and ``--resume`` restores.

Model, optimiser, scheduler, AMP scaler, best score, history and the torch RNG (the
classifier's augmentations and the detector's RPN/RoI samplers draw from it), so a resumed
run ends with the weights of an uninterrupted one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cxrcam.errors import CxrcamError
from cxrcam.io import load_checkpoint, save_checkpoint


def save_last(out: Path, state: dict[str, Any], optimizer, scheduler, scaler, best: float,
              history: list[dict[str, Any]]) -> None:
    save_checkpoint(out / "last.pt", {**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                      "scaler": scaler.state_dict(), "best": best, "history": history,
                                      "rng": torch.get_rng_state()})


def restore_last(out: Path, device: torch.device, model, optimizer, scheduler, scaler, key: str,
                 expected: str) -> tuple[int, float, list[dict[str, Any]]]:
    """Restore ``out/last.pt`` into the given objects; ``ckpt[key]`` must equal ``expected``
    (the architecture). Returns (first epoch to run, best score, history)."""
    path = out / "last.pt"
    if not path.is_file():
        raise CxrcamError(f"nothing to resume: {path} not found")
    ckpt = load_checkpoint(path, device)
    if ckpt[key] != expected:
        raise CxrcamError(f"{path} trained {key} {ckpt[key]}, the config asks for {expected}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"].cpu())
    return ckpt["epoch"] + 1, ckpt["best"], ckpt["history"]
