"""The training engine both trainers share, in the manner of torchvision's detection references.

``start_run`` is the setup both share (device, run folder, seed, the cache's folds);
``train_one_epoch`` runs the optimisation steps of one epoch; ``save_epoch`` is the checkpoint +
log step (``best.pt`` on the best validation score, ``last.pt`` with everything ``--resume``
needs, ``metrics.csv``); ``restore_last`` resumes; ``fit`` is the epoch loop around them. A
trainer (``classifier.py``, ``detector.py``) only builds a :class:`Run`: its data, model,
optimiser and the one thing that differs, the loss of a batch and the validation metrics.

``last.pt`` holds model, optimiser, scheduler, AMP scaler, best score, history and the torch
RNG (the classifier's augmentations and the detector's RPN/RoI samplers draw from it), so a
resumed run ends with the weights of an uninterrupted one.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrcam.config import Config
from cxrcam.data.cache import Cache, open_cache
from cxrcam.data.splits import train_val_rows
from cxrcam.errors import CxrcamError
from cxrcam.files import load_checkpoint, remove_stale_temporaries, save_checkpoint, write_csv
from cxrcam.runtime import dist
from cxrcam.runtime.progress import progress_bar

# a batch -> ({loss name: scalar}, images in the batch); runs under autocast
LossFn = Callable[[Any], tuple[dict[str, torch.Tensor], int]]


@dataclass
class Run:
    """What a trainer hands the engine."""

    name: str  # "classifier" or "detector": progress bars, messages, the checkpoint's kind
    arch: str  # the architecture (timm name / backbone): --resume refuses another
    model: nn.Module  # what trains (DDP-wrapped under torchrun)
    raw_model: nn.Module  # what is saved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Callable[[int], DataLoader]  # the training loader of an epoch (0-based)
    loss: LossFn
    validate: Callable[[Any], dict[str, float] | None]  # autocast -> validation metrics (None: not on this rank)
    score: str  # the validation metric that picks best.pt (higher is better)
    epochs: int
    amp: str = "auto"  # train.amp / detector.amp: auto, fp32, bf16, fp16 (resolved by dist.resolve_precision)
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    lr_key: str = "train.lr"  # the setting to lower when the loss diverges (its section's amp sets the precision)
    meta: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint
    report: dict[str, str] = field(default_factory=dict)  # printed label -> metric key, each epoch
    plot: Callable[[list[dict[str, Any]], Path], None] | None = None  # curves of the history

    @property
    def section(self) -> str:
        """The config section of this training (``train`` or ``detector``): where its amp and epochs are."""
        return self.lr_key.split(".")[0]


def train_one_epoch(run: Run, loader: DataLoader, epoch: int, autocast, scaler, info: dist.DistInfo,
                    progress: bool = True) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss over all ranks' images
    (``train_loss`` is their sum), images per second and the share of time spent waiting for data."""
    run.model.train()
    sums: dict[str, float] = {}
    seen, wait, start = 0, 0.0, time.perf_counter()
    bar = progress_bar(total=len(loader), desc=f"{run.name} epoch {epoch + 1}/{run.epochs}", unit="step",
               disable=not (progress and info.is_main), leave=False)
    fetch = time.perf_counter()
    for batch in loader:
        wait += time.perf_counter() - fetch
        with autocast():
            losses, n = run.loss(batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise CxrcamError(f"{run.name} loss is {loss.item()} at epoch {epoch + 1}: lower {run.lr_key}")
        run.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if run.grad_clip > 0:
            scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), run.grad_clip)
        scaler.step(run.optimizer)
        scaler.update()
        run.scheduler.step()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.item() * n
        seen += n
        elapsed = time.perf_counter() - start
        bar.set_postfix(refresh=False, loss=f"{sum(sums.values()) / seen:.4f}",  # drawn with the next update
                        img_s=f"{seen * info.world_size / elapsed:.1f}", data=f"{100 * wait / elapsed:.0f}%")
        bar.update()
        fetch = time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - start
    keys = sorted(sums)
    totals = torch.tensor([*(sums[k] for k in keys), seen], dtype=torch.float64, device=info.device)
    if info.distributed:
        torch.distributed.all_reduce(totals)
    count = max(float(totals[-1]), 1.0)
    means = {k: float(v) / count for k, v in zip(keys, totals)}
    components = means if len(means) > 1 else {}
    return {"train_loss": sum(means.values()), **components, "images_per_s": float(totals[-1]) / seconds,
            "data_wait": wait / seconds}


def save_epoch(run: Run, out: Path, epoch: int, metrics: dict[str, Any], history: list[dict[str, Any]],
               best: float, scaler, precision: str = "fp32") -> float:
    """The checkpoint + log step (rank 0): best.pt when the score improves (and after the first
    epoch, so a run whose score is undefined still leaves one), last.pt, metrics.csv, curves.
    Returns the best score so far."""
    score = metrics.get(run.score, float("nan"))
    improved = not math.isnan(score) and score > best
    state = {**run.meta, "kind": run.name, "arch": run.arch, "model": run.raw_model.state_dict(),
             "metrics": metrics, "epoch": epoch + 1, "precision": precision}  # counted from 1, as the logs count
    if improved or epoch == 0:
        save_checkpoint(out / "best.pt", state)
    if math.isnan(score):
        tqdm.write(f"warning: validation {run.score} is undefined at epoch {epoch + 1} (too few validation "
                   f"images or positives?); best.pt keeps {'this' if epoch == 0 else 'an earlier'} epoch")
    best = score if improved else best
    save_checkpoint(out / "last.pt", {**state, "optimizer": run.optimizer.state_dict(),
                                      "scheduler": run.scheduler.state_dict(), "scaler": scaler.state_dict(),
                                      "best": best, "history": history, "rng": torch.get_rng_state()})
    write_csv(out / "metrics.csv", pd.DataFrame(history))
    if run.plot is not None:
        run.plot(history, out / "curves.png")
    return best


RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "curves.png", "pseudo_boxes.csv", "cam_proposals.csv")


class Start(NamedTuple):
    """What both trainers set up first (:func:`start_run`)."""

    info: dist.DistInfo
    cache: Cache
    train_rows: np.ndarray
    val_rows: np.ndarray


def start_run(config: Config, data: str | Path, out: str | Path, resume: bool, overwrite: bool, seed: int) -> Start:
    """The process group and device, the run folder check, the seed, and the cache with its
    training and validation rows (fold ``split.val_fold``)."""
    info = dist.setup(config.runtime.device)
    check_run_folder(out, resume, overwrite, info)
    torch.manual_seed(seed)
    cache = open_cache(data)
    train_rows, val_rows = train_val_rows(cache.images["fold"].to_numpy(), config.split.val_fold, cache.root)
    return Start(info, cache, train_rows, val_rows)


def check_run_folder(out: str | Path, resume: bool, overwrite: bool, info: dist.DistInfo) -> None:
    """A new run into a folder that holds one would replace its last.pt and could leave its old
    best.pt beside the new run: refused unless ``overwrite``, which removes the old run's files."""
    out = Path(out)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if resume or not {"best.pt", "last.pt"} & set(found):
        return
    if not overwrite:
        raise CxrcamError(f"{out} holds a run ({', '.join(found)}): pass --resume to continue it, or --overwrite "
                          f"to start a new one there")
    if info.is_main:
        for name in found:
            (out / name).unlink(missing_ok=True)


def restore_last(run: Run, out: Path, scaler, device: torch.device, precision: str = "fp32"
                 ) -> tuple[int, float, list[dict[str, Any]]]:
    """Restore ``out/last.pt`` into the run, which must be of its kind, architecture and precision.
    Returns (first epoch to run, best score, history)."""
    path = out / "last.pt"
    if not path.is_file():
        raise CxrcamError(f"nothing to resume: {path} not found")
    ckpt = load_checkpoint(path, device, kind=run.name)
    arch = ckpt.get("arch", ckpt.get("model_name", ckpt.get("backbone")))  # checkpoints from before `arch`
    if arch != run.arch:
        raise CxrcamError(f"{path} trained a {arch} {run.name}; the config asks for {run.arch}")
    section = run.section
    saved = ckpt.get("precision", "fp32")
    if saved != precision:
        raise CxrcamError(f"{path} trained in {saved}; this run would continue in {precision}: set {section}.amp={saved}")
    planned = ckpt.get("config", {}).get(section, {}).get("epochs")
    done = len(ckpt["history"])  # one history row per finished epoch
    if planned is not None and planned != run.epochs and done < run.epochs:
        change = "stretched" if run.epochs > planned else "shortened"
        warnings.warn(f"{path} was trained on a {planned}-epoch schedule and resumes to {run.epochs} epochs: its "
                      f"learning-rate schedule ({section}.scheduler) is {change} to the new length mid-run, so the rate "
                      f"jumps from where the run had brought it"
                      + (" (after a finished cosine run, from 0 back to the middle of the curve)"
                         if change == "stretched" else ""), stacklevel=2)
    run.raw_model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"].cpu())
    return done, ckpt["best"], ckpt["history"]


def fit(run: Run, out: str | Path, info: dist.DistInfo, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """The epoch loop: train, validate, then (rank 0) log and checkpoint. Returns the last epoch's
    metrics, with ``best``: those of the epoch saved as best.pt."""
    out = Path(out)
    precision = dist.resolve_precision(run.amp, info.device, f"{run.section}.amp")
    autocast, scaler = dist.mixed_precision(precision, info.device)
    start_epoch, best, history = (restore_last(run, out, scaler, info.device, precision) if resume
                                  else (0, -math.inf, []))
    if info.is_main:
        where = (f", resuming at epoch {start_epoch + 1} of {run.epochs}" if resume and start_epoch < run.epochs
                 else f": {out / 'last.pt'} has finished {start_epoch} epochs, nothing to train (raise "
                      f"{run.section}.epochs to train on)" if resume else "")
        tqdm.write(f"{run.name}: {run.arch} on {info.device}"
                   f"{f' x {info.world_size} processes' if info.distributed else ''}, precision {precision} "
                   f"({run.section}.amp={run.amp}){where}")
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # a checkpoint cut short by a kill: hundreds of MB for a ResNet-50
    writer = _tensorboard(out) if info.is_main else None
    metrics: dict[str, Any] = history[-1] if history else {}
    for epoch in range(start_epoch, run.epochs):
        loader = run.loader(epoch)
        trained = train_one_epoch(run, loader, epoch, autocast, scaler, info, progress)
        validated = run.validate(autocast)
        if info.is_main:
            metrics = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"], "precision": precision,
                       **trained, **(validated or {})}
            history.append(metrics)
            best = save_epoch(run, out, epoch, metrics, history, best, scaler, precision)
            _log(writer, metrics)
            shown = "  ".join(f"{label} {metrics[key]:.4f}" for label, key in run.report.items())
            tqdm.write(f"{run.name} epoch {epoch + 1}/{run.epochs}: {shown}  {metrics['images_per_s']:.1f} img/s  "
                       f"data wait {100 * metrics['data_wait']:.0f}%")
        if info.distributed:
            torch.distributed.barrier()
    if writer is not None:
        writer.close()
    dist.cleanup()
    return {**metrics, "best": best_epoch(history, run.score)} if metrics else metrics


def best_epoch(history: list[dict[str, Any]], score: str) -> dict[str, Any]:
    """The epoch ``best.pt`` holds: the first with the highest score, or the first epoch when no
    score is defined (as :func:`save_epoch` chooses)."""
    scored = [m for m in history if not math.isnan(m.get(score, float("nan")))]
    return max(scored, key=lambda m: m[score]) if scored else history[0]


def _tensorboard(out: Path):
    """A TensorBoard writer when tensorboard is installed; None otherwise."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _log(writer, metrics: dict[str, Any]) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        if key != "epoch" and isinstance(value, (int, float)) and not math.isnan(value):
            writer.add_scalar(key, value, metrics["epoch"])
    writer.flush()


__all__ = ["Run", "fit", "train_one_epoch", "save_epoch", "restore_last", "best_epoch", "check_run_folder"]
