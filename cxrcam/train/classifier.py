"""``cxrcam train-classifier``: multi-label BCE training of a timm classifier on a cache.

Setup only, top to bottom: data -> model -> BCE loss -> optimiser/schedule; the epoch loop,
checkpoints and logs are the engine's (:mod:`cxrcam.train.engine`). Validation: loss and
per-class AUROC on the cache's validation fold; ``best.pt`` keeps the best mean AUROC. Under
``torchrun`` each rank trains on a shard with DistributedDataParallel; rank 0 alone writes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from cxrcam.config import Config, class_thresholds, config_to_dict
from cxrcam.data.cache import Cache, open_cache
from cxrcam.data.dataset import CacheDataset, train_transforms
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.classification import (auroc_per_class, defined_mean, mean_auroc, operating_points,
                                              sensitivity_specificity)
from cxrcam.files import save_figure
from cxrcam.models import create_classifier, load_classifier
from cxrcam.runtime import dist
from cxrcam.runtime.progress import progress_bar
from cxrcam.train.engine import Run, fit, start_run


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
def _predict_shard(model, loader, info, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, rows) of this rank's validation shard."""
    model.eval()
    logits, targets, rows = [], [], []
    for x, y, idx in loader:
        with autocast():
            logits.append(model(x.to(info.device, non_blocking=True)).float())
        targets.append(y.to(info.device))
        rows.append(idx.to(info.device))
    return torch.cat(logits), torch.cat(targets), torch.cat(rows)


def _validation(model, loader, loss_fn, info, classes: list[str], meta: dict[str, Any]):
    """The validation step: loss and per-class AUROC over every rank's shard, gathered in row order;
    each class's operating point (F1 on the fold) goes into ``meta``, which the epoch's checkpoints
    store as ``op_threshs``, with the mean sensitivity and specificity there in the metrics."""
    def validate(autocast) -> dict[str, float]:
        logits, targets, rows = _predict_shard(model, loader, info, autocast)
        loss_sum = torch.stack([loss_fn(logits, targets) * len(rows),
                                torch.tensor(float(len(rows)), device=info.device)])
        if info.distributed:
            torch.distributed.all_reduce(loss_sum)
        probs, truth, rows = (dist.gather_cat(t, info) for t in (torch.sigmoid(logits), targets, rows))
        order = torch.argsort(rows)
        truth, probs = truth[order].cpu().numpy(), probs[order].cpu().numpy()
        per_class = auroc_per_class(truth, probs)
        ops = operating_points(truth, probs)
        meta["op_threshs"] = [float(v) for v in ops]  # NaN: too few positives, boxes.min_prob's default
        sens, spec = sensitivity_specificity(truth, probs, class_thresholds("auto", ops, len(classes)))
        return {"val_loss": float(loss_sum[0] / loss_sum[1]), "val_mean_auroc": mean_auroc(per_class),
                "val_sensitivity": defined_mean(sens), "val_specificity": defined_mean(spec),
                **{f"auroc_{name}": float(v) for name, v in zip(classes, per_class)}}

    return validate


def box_map_loss(maps: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, decided: torch.Tensor,
                 size: int) -> torch.Tensor:
    """``train.box_loss``'s term: per decided (image, class), a BCE between the class's score map
    (B x C x h x w logits) and its boxes (B x M x 4 in the S x S input, ``classes`` B x M, -1 =
    padding) drawn on the cells: 1 where a box of the class overlaps the cell, 0 elsewhere.
    Positive and negative cells weigh half each (a small box covers one cell of 64); a class whose
    boxes augmentation pushed out of the image is not decided. Mean over the decided pairs."""
    b, c, h, w = maps.shape
    device = maps.device
    starts_y, starts_x = (torch.arange(n, device=device, dtype=torch.float32) * size / n for n in (h, w))
    boxes = boxes.float()
    valid = (classes >= 0) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    over_x = (boxes[..., 0, None] < starts_x + size / w) & (boxes[..., 2, None] > starts_x)  # B x M x w
    over_y = (boxes[..., 1, None] < starts_y + size / h) & (boxes[..., 3, None] > starts_y)  # B x M x h
    cover = (over_y[..., :, None] & over_x[..., None, :] & valid[..., None, None]).float()  # B x M x h x w
    of_class = F.one_hot(classes.clamp_min(0), c).float() * (classes >= 0)[..., None]  # B x M x C
    target = (torch.einsum("bmhw,bmc->bchw", cover, of_class * valid[..., None]) > 0).float()
    cells = F.binary_cross_entropy_with_logits(maps.float(), target, reduction="none")
    positive = target.sum((2, 3))
    on = (cells * target).sum((2, 3)) / positive.clamp_min(1)
    off = (cells * (1 - target)).sum((2, 3)) / (h * w - positive).clamp_min(1)
    per_pair = torch.where(positive > 0, (on + off) / 2, off)
    weight = decided.float() * ~((of_class.amax(1) > 0) & (positive == 0))  # its boxes lost: say nothing
    return (per_pair * weight).sum() / weight.sum().clamp_min(1)


def supervised_boxes(cache: Cache, train_rows: np.ndarray, count: int, seed: int) -> pd.DataFrame:
    """The cache-frame boxes ``train.box_loss`` fits: those of the training fold's boxed images, or
    of a seeded sample of ``count`` of them (``train.box_images``; 0 = all)."""
    boxed = set(cache.boxes["image_id"])
    ids = [i for i in cache.images["image_id"].to_numpy()[train_rows] if i in boxed]
    if not ids:
        raise CxrcamError(f"train.box_loss: {cache.root} has no boxes on its training fold; set train.box_loss=0")
    if 0 < count < len(ids):
        ids = list(np.random.default_rng(seed).choice(ids, count, replace=False))
    return cache.boxes[cache.boxes["image_id"].isin(set(ids))]


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
                     progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train the classifier (``train.*``) on the cache at ``data``; checkpoints and logs go to ``out``
    (a folder holding a run needs ``resume`` or ``overwrite``). Returns the last epoch's metrics."""
    tcfg = config.train
    info, cache, train_rows, val_rows = start_run(config, data, out, resume, overwrite, tcfg.seed)
    cuda = info.device.type == "cuda"
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    # --- data
    classes = list(cache.schema.findings)
    boxes = supervised_boxes(cache, train_rows, tcfg.box_images, tcfg.seed) if tcfg.box_loss > 0 else None
    train_set = CacheDataset(cache, train_rows, train_transforms(config.augment), soft=tcfg.soft_targets, boxes=boxes)
    val_set = CacheDataset(cache, val_rows)
    per_rank_batch = max(1, tcfg.batch_size // info.world_size)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=tcfg.seed, drop_last=False)
    val_loader = DataLoader(Subset(val_set, range(info.rank, len(val_set), info.world_size)),
                            batch_size=per_rank_batch * 2, num_workers=tcfg.workers, pin_memory=cuda)
    drop_last = len(sampler) > per_rank_batch

    def epoch_loader(epoch: int) -> DataLoader:
        """Every epoch reseeds from train.seed and its number: a resumed run draws the same
        shuffles, augmentations and dropout as an uninterrupted one."""
        torch.manual_seed(tcfg.seed * 100_003 + epoch * 1_009 + info.rank)
        sampler.set_epoch(epoch)
        return DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=tcfg.workers,
                          pin_memory=cuda, drop_last=drop_last,
                          generator=torch.Generator().manual_seed(tcfg.seed + epoch))

    # --- model, loss, optimiser, schedule
    model = create_classifier(config.model.name, len(classes), config.model.pretrained,
                              config.model.in_chans, config.model.drop_rate, config.model.output_stride,
                              config.model.pooling, config.model.lse_r,
                              config.model.csra_lambda).to(info.device)
    channels_last = cuda and tcfg.channels_last
    if channels_last:
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

    def batch_loss(batch) -> tuple[dict[str, torch.Tensor], int]:
        x, y, _, *boxed = batch
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not boxed:
            return {"bce": loss_fn(model(x).float(), y)}, len(x)
        logits, maps = model(x, maps=True)
        fitted = box_map_loss(maps, *(t.to(info.device) for t in boxed[0]), x.shape[-1])
        return {"bce": loss_fn(logits.float(), y), "box": tcfg.box_loss * fitted}, len(x)

    optimizer = _optimizer(model, tcfg)
    steps_per_epoch = max(1, len(sampler) // per_rank_batch if drop_last else math.ceil(len(sampler) / per_rank_batch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(tcfg, steps_per_epoch))

    meta = {"model_name": config.model.name, "in_chans": config.model.in_chans,
            "output_stride": config.model.output_stride, "pooling": config.model.pooling, "lse_r": config.model.lse_r,
            "csra_lambda": config.model.csra_lambda,
            "classes": classes,
            "schema": cache.schema.name, "input_size": cache.size,
            "mean": raw_model.mean.flatten().tolist(), "std": raw_model.std.flatten().tolist(),
            "config": config_to_dict(config)}
    run = Run("classifier", config.model.name, model, raw_model, optimizer, scheduler, epoch_loader, batch_loss,
              _validation(model, val_loader, loss_fn, info, classes, meta), "val_mean_auroc", tcfg.epochs, tcfg.amp,
              tcfg.grad_clip, "train.lr", meta,
              {"train loss": "train_loss", "val loss": "val_loss", "mean AUROC": "val_mean_auroc"}, _plot_curves)
    return fit(run, out, info, resume, progress)


@torch.no_grad()
def predict(checkpoint: str | Path | list, data: str | Path, batch_size: int = 64, workers: int = 2,
            progress: bool = True, device: str = "auto", rows: np.ndarray | None = None) -> pd.DataFrame:
    """Image-level probabilities for every image of a cache (or its ``rows``): ``image_id`` + one
    column per class; several checkpoints (an ensemble): their mean probability."""
    device = dist.pick_device(device)
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    loaded = [load_classifier(path, device) for path in paths]
    cache = open_cache(data)
    for path, (_, ckpt) in zip(paths, loaded):
        if list(cache.schema.findings) != ckpt["classes"]:
            raise CxrcamError(f"{path} predicts {ckpt['schema']} classes; {data} is a {cache.schema.name} cache")
    loader = DataLoader(CacheDataset(cache, rows), batch_size=batch_size, num_workers=workers)
    with torch.no_grad():
        probs = [torch.stack([torch.sigmoid(model(x.to(device)).float()) for model, _ in loaded]).mean(0).cpu()
                 for x, _, _ in progress_bar(loader, desc="predict", unit="batch", disable=not progress)]
    table = pd.DataFrame(torch.cat(probs).numpy(), columns=loaded[0][1]["classes"])
    images = cache.images if rows is None else cache.images.iloc[rows]
    table.insert(0, "image_id", images["image_id"].to_numpy())
    return table


__all__ = ["train_classifier", "predict", "box_map_loss", "supervised_boxes"]
