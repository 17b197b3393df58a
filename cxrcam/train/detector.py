"""``cxrcam train-detector``: torchvision Faster R-CNN on a cache, read top to bottom.

Truth: the cache's fused boxes, or CAM pseudo-boxes from a classifier (``detector.pseudo_from``)
when the cache has none. Images without findings stay in as negatives. SGD with momentum,
linear warm-up, step decay; AMP on CUDA; DDP under torchrun; best.pt (validation VOC mAP@0.4)
and last.pt (resume) like the classifier, ``metrics.csv`` per epoch.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from cxrcam.boxes import scale_boxes
from cxrcam.config import Config, config_to_dict
from cxrcam.data.cache import CACHE_BOX_COLUMNS, Cache, open_cache
from cxrcam.data.dataset import image_tensor
from cxrcam.data.images import read_image
from cxrcam.data.splits import train_val_rows
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS
from cxrcam.detection.model import create_detector, to_detector_input
from cxrcam.detection.pseudo import pseudo_boxes
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.detection import voc_map
from cxrcam.io import save_checkpoint, write_csv
from cxrcam.train import dist
from cxrcam.train.state import restore_last, save_last


class DetectionDataset(Dataset):
    """Cache rows -> (1 x S x S image in [0, 1], {"boxes": cache-frame xyxy, "labels": class + 1}, row)."""

    def __init__(self, cache: Cache, rows: np.ndarray, boxes: pd.DataFrame):
        self.images = cache.images.iloc[rows].reset_index(drop=True)
        self.root = cache.root
        groups = {k: g for k, g in boxes.groupby("image_id")}
        self.targets = []
        for image_id in self.images["image_id"]:
            g = groups.get(image_id)
            b = np.zeros((0, 4), np.float32) if g is None else g[CACHE_BOX_COLUMNS].to_numpy(np.float32)
            c = np.zeros(0, np.int64) if g is None else g["class_id"].to_numpy(np.int64) + 1
            keep = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)  # no degenerate boxes
            self.targets.append({"boxes": torch.from_numpy(b[keep]), "labels": torch.from_numpy(c[keep])})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return image_tensor(read_image(self.root / self.images.at[i, "file"]).image), self.targets[i], i


def _collate(batch):
    return tuple(zip(*batch))


@torch.no_grad()
def detect(model, loader, images: pd.DataFrame, device: torch.device) -> pd.DataFrame:
    """DETECTION_COLUMNS in original pixels (class ids 0-based) for every image of ``loader``."""
    model.eval()
    rows = []
    for x, _, idx in loader:
        for out, i in zip(model(to_detector_input(torch.stack(x).to(device))), idx):
            row = images.iloc[i]
            boxes = scale_boxes(out["boxes"].float().cpu().numpy(), 1 / row["scale_x"], 1 / row["scale_y"])
            for box, label, score in zip(boxes, out["labels"].cpu().numpy(), out["scores"].float().cpu().numpy()):
                rows.append((row["image_id"], int(label) - 1, float(score), *box))
    return pd.DataFrame(rows, columns=DETECTION_COLUMNS)


def train_detector(config: Config, data: str | Path, out: str | Path, resume: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    info = dist.setup()
    dcfg, out = config.detector, Path(out)
    cuda = info.device.type == "cuda"
    torch.manual_seed(dcfg.seed)

    # --- data: truth boxes, or CAM pseudo-boxes where the cache has none
    cache = open_cache(data)
    truth, source = cache.boxes, "truth"
    if dcfg.pseudo_from:
        truth, source = pseudo_boxes(dcfg.pseudo_from, cache, config, info.device), "cam pseudo-boxes"
    elif truth.empty:
        raise CxrcamError(f"{data} has no boxes: set detector.pseudo_from to a classifier checkpoint")
    train_rows, val_rows = train_val_rows(cache.images["fold"].to_numpy(), config.split.val_fold, cache.root)
    if dcfg.box_images < 0:
        raise CxrcamError(f"detector.box_images must be >= 0, got {dcfg.box_images}")
    if 0 < dcfg.box_images < len(train_rows):  # the setting where boxes are scarce and image labels are not
        train_rows = np.sort(np.random.default_rng(dcfg.seed).choice(train_rows, dcfg.box_images, replace=False))
    train_set = DetectionDataset(cache, train_rows, truth)
    val_set = DetectionDataset(cache, val_rows, truth)
    per_rank_batch = max(1, dcfg.batch_size // info.world_size)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=dcfg.seed)
    val_loader = DataLoader(val_set, batch_size=per_rank_batch, num_workers=dcfg.workers, collate_fn=_collate)

    # --- model, optimiser, schedule
    classes = list(cache.schema.findings)
    model = create_detector(dcfg.backbone, len(classes), cache.size, dcfg.init or None, dcfg.trainable_layers,
                            dcfg.score_thresh, dcfg.detections_per_img, dcfg.rois_per_image).to(info.device)
    raw_model = model
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[info.local_rank] if cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=dcfg.lr, momentum=dcfg.momentum, weight_decay=dcfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(sampler) / per_rank_batch))

    def lr_factor(step: int) -> float:  # linear warm-up, then step decay by epoch
        warm = min(1.0, (step + 1) / dcfg.warmup_iters) if dcfg.warmup_iters > 0 else 1.0
        return warm * dcfg.gamma ** ((step // steps_per_epoch) // max(1, dcfg.step_size))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    autocast, scaler = dist.mixed_precision(dcfg.amp, info.device)

    start_epoch, best, history = 0, -math.inf, []
    if resume:
        start_epoch, best, history = restore_last(out, info.device, raw_model, optimizer, scheduler, scaler,
                                                  "backbone", dcfg.backbone)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "detector", "backbone": dcfg.backbone, "classes": classes, "schema": cache.schema.name,
            "input_size": cache.size, "truth": source, "config": config_to_dict(config),
            "train_images": train_set.images["image_id"].tolist()}

    metrics: dict[str, Any] = history[-1] if history else {}
    for epoch in range(start_epoch, dcfg.epochs):
        # --- train one epoch
        sampler.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=dcfg.workers,
                            collate_fn=_collate, pin_memory=cuda)
        model.train()
        totals: dict[str, float] = {}
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"detector epoch {epoch + 1}/{dcfg.epochs}", unit="step", leave=False,
                   disable=not (progress and info.is_main))
        for x, targets, _ in bar:
            images = to_detector_input(torch.stack(x).to(info.device))
            targets = [{k: v.to(info.device) for k, v in t.items()} for t in targets]
            with autocast():
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise CxrcamError(f"detector loss is {loss.item()} at epoch {epoch + 1}: lower detector.lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        seconds = time.perf_counter() - start

        # --- validate (rank 0): VOC mAP@0.4 of the findings on the validation fold
        if info.is_main:
            dets = detect(raw_model, val_loader, val_set.images, info.device)
            val_truth = truth[truth["image_id"].isin(set(val_set.images["image_id"]))]
            val_map = voc_map(val_truth[["image_id", "class_id", *BOX_COLUMNS]], dets, config.eval.iou_thr)[0]
            metrics = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                       **{k: v / max(1, len(loader)) for k, v in totals.items()},
                       "val_map": val_map, "images_per_s": len(sampler) * info.world_size / seconds}
            history.append(metrics)
            improved = not math.isnan(val_map) and val_map > best
            best = val_map if improved else best
            state = {**meta, "model": raw_model.state_dict(), "metrics": metrics, "epoch": epoch}
            if improved or epoch == 0:
                save_checkpoint(out / "best.pt", state)
            save_last(out, state, optimizer, scheduler, scaler, best, history)
            write_csv(out / "metrics.csv", pd.DataFrame(history))
            tqdm.write(f"detector epoch {epoch + 1}/{dcfg.epochs}: loss {sum(totals.values()) / max(1, len(loader)):.3f}"
                       f"  val mAP@{config.eval.iou_thr} {val_map:.3f}  {metrics['images_per_s']:.1f} img/s")
        if info.distributed:
            torch.distributed.barrier()
    dist.cleanup()
    return metrics


__all__ = ["train_detector", "detect", "DetectionDataset"]
