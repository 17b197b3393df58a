"""``cxrcam train-detector``: torchvision Faster R-CNN on a cache, read top to bottom.

Setup only: truth (the cache's fused boxes, or CAM pseudo-boxes from a classifier,
``detector.pseudo_from``), images without findings kept as negatives, the Faster R-CNN, SGD with
momentum, linear warm-up and step decay. The epoch loop, AMP, checkpoints (``best.pt`` on
validation VOC mAP@0.4, ``last.pt`` for ``--resume``) and ``metrics.csv`` are the engine's
(:mod:`cxrcam.train.engine`), as for the classifier; DDP under torchrun.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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
from cxrcam.runtime import dist
from cxrcam.train.engine import Run, fit


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


def _validation(model, loader, val_set: DetectionDataset, truth: pd.DataFrame, iou_thr: float, info):
    """The validation step (rank 0): VOC mAP of the findings on the validation fold."""
    val_truth = truth[truth["image_id"].isin(set(val_set.images["image_id"]))][["image_id", "class_id", *BOX_COLUMNS]]

    def validate(autocast) -> dict[str, float] | None:
        if not info.is_main:
            return None
        return {"val_map": voc_map(val_truth, detect(model, loader, val_set.images, info.device), iou_thr)[0]}

    return validate


def _training_boxes(cache: Cache, config: Config, device: torch.device) -> tuple[pd.DataFrame, str]:
    """The cache's truth boxes, or CAM pseudo-boxes from ``detector.pseudo_from``."""
    if config.detector.pseudo_from:
        return pseudo_boxes(config.detector.pseudo_from, cache, config, device), "cam pseudo-boxes"
    if cache.boxes.empty:
        raise CxrcamError(f"{cache.root} has no boxes: set detector.pseudo_from to a classifier checkpoint")
    return cache.boxes, "truth"


def train_detector(config: Config, data: str | Path, out: str | Path, resume: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Train on the cache at ``data``; write checkpoints and logs to ``out``. Returns the last epoch's metrics."""
    info = dist.setup()
    dcfg = config.detector
    cuda = info.device.type == "cuda"
    torch.manual_seed(dcfg.seed)

    # --- data: truth boxes, or CAM pseudo-boxes where the cache has none
    cache = open_cache(data)
    truth, source = _training_boxes(cache, config, info.device)
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

    def epoch_loader(epoch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        return DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=dcfg.workers,
                          collate_fn=_collate, pin_memory=cuda)

    # --- model, loss, optimiser, schedule
    classes = list(cache.schema.findings)
    model = create_detector(dcfg.backbone, len(classes), cache.size, dcfg.init or None, dcfg.trainable_layers,
                            dcfg.score_thresh, dcfg.detections_per_img, dcfg.rois_per_image).to(info.device)
    raw_model = model
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[info.local_rank] if cuda else None)

    def batch_loss(batch) -> tuple[dict[str, torch.Tensor], int]:
        x, targets, _ = batch
        targets = [{k: v.to(info.device) for k, v in t.items()} for t in targets]
        return model(to_detector_input(torch.stack(x).to(info.device)), targets), len(x)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=dcfg.lr, momentum=dcfg.momentum, weight_decay=dcfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(sampler) / per_rank_batch))

    def lr_factor(step: int) -> float:  # linear warm-up, then step decay by epoch
        warm = min(1.0, (step + 1) / dcfg.warmup_iters) if dcfg.warmup_iters > 0 else 1.0
        return warm * dcfg.gamma ** ((step // steps_per_epoch) // max(1, dcfg.step_size))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    meta = {"backbone": dcfg.backbone, "output_stride": raw_model.output_stride, "classes": classes, "schema": cache.schema.name,
            "input_size": cache.size, "truth": source, "config": config_to_dict(config),
            "train_images": train_set.images["image_id"].tolist()}
    run = Run("detector", dcfg.backbone, model, raw_model, optimizer, scheduler, epoch_loader, batch_loss,
              _validation(raw_model, val_loader, val_set, truth, config.eval.iou_thr, info), "val_map", dcfg.epochs,
              dcfg.amp, 0.0, "detector.lr", meta,
              {"loss": "train_loss", f"val mAP@{config.eval.iou_thr}": "val_map"})
    return fit(run, out, info, resume, progress)


__all__ = ["train_detector", "detect", "DetectionDataset"]
