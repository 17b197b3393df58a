"""``cxrcam train-classifier``: multi-label BCE training of a timm classifier on a cache.

A plain loop, top to bottom: data -> model -> optimiser/schedule -> (resume) -> for each
epoch: train, validate (loss, per-class AUROC), log, checkpoint. Every epoch reseeds from
``train.seed`` and the epoch number, so a resumed run draws the same shuffles and
augmentations as an uninterrupted one. Under ``torchrun`` each rank trains on a shard with
DistributedDataParallel; rank 0 alone writes.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from cxrcam.config import Config, config_to_dict
from cxrcam.data.cache import open_cache
from cxrcam.data.dataset import CacheDataset, train_transforms
from cxrcam.data.splits import train_val_rows
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.classification import auroc_per_class, mean_auroc
from cxrcam.io import save_checkpoint, save_figure, write_csv
from cxrcam.models import create_classifier, load_classifier
from cxrcam.train import dist
from cxrcam.train.state import restore_last, save_last


def _schedule(cfg, steps_per_epoch: int):
    """LR multiplier per optimisation step: linear warm-up, then cosine or step decay."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "cosine":
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.scheduler == "step":
            return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
        return 1.0

    return factor


def _optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def _validate(model, loader, loss_fn, info, autocast) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities for this rank's validation shard, gathered in row order on every rank."""
    model.eval()
    probs, rows, loss_sum = [], [], torch.zeros(2, device=info.device)
    for x, y, idx in loader:
        x, y = x.to(info.device, non_blocking=True), y.to(info.device)
        with autocast:
            logits = model(x).float()
        loss_sum += torch.stack([loss_fn(logits, y) * len(x), torch.tensor(float(len(x)), device=info.device)])
        probs.append(torch.sigmoid(logits))
        rows.append(idx.to(info.device))
    probs_t = dist.gather_cat(torch.cat(probs), info)
    rows_t = dist.gather_cat(torch.cat(rows), info)
    if info.distributed:
        torch.distributed.all_reduce(loss_sum)
    order = torch.argsort(rows_t)
    return probs_t[order].cpu().numpy(), rows_t[order].cpu().numpy(), float(loss_sum[0] / loss_sum[1])


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="BCE loss", title="Loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_mean_auroc"] for h in history], "o-", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="mean AUROC", title="Validation AUROC", ylim=(0.4, 1.0))
    fig.tight_layout()
    save_figure(fig, path)


def train_classifier(config: Config, data: str | Path, out: str | Path, resume: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Train on the cache at ``data``; write checkpoints and logs to ``out``. Returns the last epoch's metrics."""
    info = dist.setup()
    tcfg, out = config.train, Path(out)
    cuda = info.device.type == "cuda"
    torch.manual_seed(tcfg.seed)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    # --- data
    cache = open_cache(data)
    classes = list(cache.schema.findings)
    train_rows, val_rows = train_val_rows(cache.images["fold"].to_numpy(), config.split.val_fold, cache.root)
    train_set = CacheDataset(cache, train_rows, train_transforms(config.augment), soft=tcfg.soft_targets)
    val_set = CacheDataset(cache, val_rows)
    per_rank_batch = max(1, tcfg.batch_size // info.world_size)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=tcfg.seed, drop_last=False)
    val_loader = DataLoader(Subset(val_set, range(info.rank, len(val_set), info.world_size)),
                            batch_size=per_rank_batch * 2, num_workers=tcfg.workers, pin_memory=cuda)

    # --- model, loss, optimiser, schedule
    model = create_classifier(config.model.name, len(classes), config.model.pretrained,
                              config.model.in_chans, config.model.drop_rate).to(info.device)
    if cuda and tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[info.local_rank] if cuda else None)
    pos_weight = None
    if tcfg.pos_weight:
        y = train_set.targets.numpy() >= 0.5
        pos_weight = torch.tensor(np.clip((len(y) - y.sum(0)) / np.maximum(y.sum(0), 1), 1, 100),
                                  dtype=torch.float32, device=info.device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = _optimizer(model, tcfg)
    drop_last = len(sampler) > per_rank_batch
    steps_per_epoch = max(1, len(sampler) // per_rank_batch if drop_last else math.ceil(len(sampler) / per_rank_batch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(tcfg, steps_per_epoch))
    autocast, scaler = dist.mixed_precision(tcfg.amp, info.device)

    # --- resume
    start_epoch, best, history = 0, -math.inf, []
    if resume:
        start_epoch, best, history = restore_last(out, info.device, raw_model, optimizer, scheduler, scaler,
                                                  "model_name", config.model.name)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    writer = _tensorboard(out) if info.is_main else None

    meta = {"model_name": config.model.name, "in_chans": config.model.in_chans, "classes": classes,
            "schema": cache.schema.name, "input_size": cache.size,
            "mean": raw_model.mean.flatten().tolist(), "std": raw_model.std.flatten().tolist(),
            "config": config_to_dict(config)}
    metrics: dict[str, Any] = history[-1] if history else {}
    for epoch in range(start_epoch, tcfg.epochs):
        # --- train one epoch
        torch.manual_seed(tcfg.seed * 100_003 + epoch * 1_009 + info.rank)  # augmentations, dropout
        sampler.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=tcfg.workers,
                            pin_memory=cuda, drop_last=drop_last,
                            generator=torch.Generator().manual_seed(tcfg.seed + epoch))
        model.train()
        loss_sum, seen, wait, start = 0.0, 0, 0.0, time.perf_counter()
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{tcfg.epochs}", unit="step",
                   disable=not (progress and info.is_main), leave=False)
        fetch = time.perf_counter()
        for x, y, _ in loader:
            wait += time.perf_counter() - fetch
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            if cuda and tcfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tcfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum, seen = loss_sum + loss.item() * len(x), seen + len(x)
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen * info.world_size / elapsed:.1f}",
                            data=f"{100 * wait / elapsed:.0f}%")
            bar.update()
            fetch = time.perf_counter()
        bar.close()
        train_time = time.perf_counter() - start
        totals = torch.tensor([loss_sum, seen], device=info.device, dtype=torch.float64)
        if info.distributed:
            torch.distributed.all_reduce(totals)

        # --- validate
        probs, rows, val_loss = _validate(model, val_loader, loss_fn, info, autocast())
        per_class = auroc_per_class(val_set.targets.numpy()[rows], probs)
        metrics = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": float(totals[0] / totals[1]), "val_loss": val_loss,
                   "val_mean_auroc": mean_auroc(per_class),
                   **{f"auroc_{name}": float(v) for name, v in zip(classes, per_class)},
                   "images_per_s": float(totals[1]) / train_time, "data_wait": wait / train_time}
        history.append(metrics)

        # --- log and checkpoint (rank 0)
        if info.is_main:
            score = metrics["val_mean_auroc"]
            improved = not math.isnan(score) and score > best
            best = score if improved else best
            state = {**meta, "model": raw_model.state_dict(), "metrics": metrics, "epoch": epoch}
            if improved:
                save_checkpoint(out / "best.pt", state)
            save_last(out, state, optimizer, scheduler, scaler, best, history)
            write_csv(out / "metrics.csv", pd.DataFrame(history))
            _plot_curves(history, out / "curves.png")
            if writer is not None:
                for key, value in metrics.items():
                    if key != "epoch" and not (isinstance(value, float) and math.isnan(value)):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            tqdm.write(f"epoch {epoch + 1}/{tcfg.epochs}: train loss {metrics['train_loss']:.4f}  "
                       f"val loss {val_loss:.4f}  mean AUROC {metrics['val_mean_auroc']:.3f}  "
                       f"{metrics['images_per_s']:.1f} img/s  data wait {100 * metrics['data_wait']:.0f}%")
        if info.distributed:
            torch.distributed.barrier()
    if writer is not None:
        writer.close()
    dist.cleanup()
    return metrics


def _tensorboard(out: Path):
    """A TensorBoard writer when tensorboard is installed; None otherwise."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


@torch.no_grad()
def predict(checkpoint: str | Path, data: str | Path, batch_size: int = 64, workers: int = 2,
            progress: bool = True) -> pd.DataFrame:
    """Image-level probabilities for every image of a cache: ``image_id`` + one column per class."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, ckpt = load_classifier(checkpoint, device)
    cache = open_cache(data)
    if list(cache.schema.findings) != ckpt["classes"]:
        raise CxrcamError(f"{checkpoint} predicts {ckpt['schema']} classes; {data} is a {cache.schema.name} cache")
    loader = DataLoader(CacheDataset(cache), batch_size=batch_size, num_workers=workers)
    probs = [torch.sigmoid(model(x.to(device)).float()).cpu()
             for x, _, _ in tqdm(loader, desc="predict", unit="batch", disable=not progress)]
    table = pd.DataFrame(torch.cat(probs).numpy(), columns=ckpt["classes"])
    table.insert(0, "image_id", cache.images["image_id"].to_numpy())
    return table


__all__ = ["train_classifier", "predict"]
