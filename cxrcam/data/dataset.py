"""PyTorch datasets: a ``prepare`` cache (grey images in [0, 1] plus targets), and any image files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cxrcam.config import AugmentConfig
from cxrcam.data.cache import CACHE_BOX_COLUMNS, Cache
from cxrcam.data.images import read_image
from cxrcam.data.tables import soft_columns, target_columns


def train_transforms(cfg: AugmentConfig) -> v2.Compose:
    """Small affine and exposure changes; never a vertical flip (a chest has an up)."""
    steps: list = [v2.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate),
                                   scale=(1 - cfg.scale, 1 + cfg.scale))]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.brightness or cfg.contrast:
        steps.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
    return v2.Compose(steps)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """A decoded H x W uint8 image -> the 1 x H x W float tensor in [0, 1] every model takes."""
    return torch.from_numpy(image).unsqueeze(0).float().div_(255)


class CacheDataset(Dataset):
    """Rows of a cache manifest -> (1 x S x S float tensor in [0, 1], targets, row index).

    ``boxes`` (cache-frame boxes of the images whose maps are supervised, ``train.box_loss``): each
    item also carries its boxes padded to the most any image has (M x 4, moved with the image by
    ``transform``), their class ids (M, -1 = padding) and which classes its boxes decide (C: the
    boxed classes, and the absent ones, on a boxed image; none on an image without boxes)."""

    def __init__(self, cache: Cache, rows: np.ndarray | None = None, transform=None, soft: bool = False,
                 boxes: pd.DataFrame | None = None):
        images = cache.images if rows is None else cache.images.iloc[rows]
        self.files = [str(cache.root / f) for f in images["file"]]
        cols = soft_columns(cache.schema) if soft else target_columns(cache.schema)
        self.targets = torch.from_numpy(images[cols].to_numpy(np.float32))
        self.transform = transform
        self.boxes = None if boxes is None else _padded_boxes(images, boxes, target_columns(cache.schema))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        x = image_tensor(read_image(self.files[i]).image)
        if self.boxes is None:
            if self.transform is not None:
                x = self.transform(x).clamp_(0, 1)
            return x, self.targets[i], i
        boxes, classes, decided = (t[i] for t in self.boxes)
        if self.transform is not None:
            image, moved = self.transform(tv_tensors.Image(x), tv_tensors.BoundingBoxes(
                boxes, format="XYXY", canvas_size=tuple(x.shape[-2:])))
            x, boxes = image.as_subclass(torch.Tensor).clamp(0, 1), v2.functional.clamp_bounding_boxes(
                moved).as_subclass(torch.Tensor)
        return x, self.targets[i], i, (boxes, classes, decided)


def _padded_boxes(images: pd.DataFrame, boxes: pd.DataFrame, label_columns: list[str]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N x M x 4 cache-frame boxes, N x M class ids with -1 padding, N x C classes decided) for
    :class:`CacheDataset`: on an image with boxes, a class is decided where it has a box or its label
    is negative (a positive label without a box says nothing of where)."""
    groups = {k: g for k, g in boxes.groupby("image_id")}
    most = max((len(g) for g in groups.values()), default=0)
    n, c = len(images), len(label_columns)
    xyxy, ids, decided = torch.zeros(n, max(most, 1), 4), torch.full((n, max(most, 1)), -1), torch.zeros(n, c)
    negative = images[label_columns].to_numpy(np.float32) < 0.5
    for k, image_id in enumerate(images["image_id"]):
        g = groups.get(image_id)
        if g is None:
            continue
        xyxy[k, :len(g)] = torch.tensor(g[CACHE_BOX_COLUMNS].to_numpy(np.float32))
        ids[k, :len(g)] = torch.tensor(g["class_id"].to_numpy(np.int64))
        decided[k] = torch.tensor(negative[k], dtype=torch.float32)
        decided[k, torch.tensor(g["class_id"].to_numpy(np.int64))] = 1
    return xyxy, ids, decided


class ImageFiles(Dataset):
    """Decode one image at the model's input size; a failure becomes a reason, not an exception.
    Items: (1 x size x size image in [0, 1], index, original height, original width, reason)."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            d = read_image(self.paths[i], self.size)
            return image_tensor(d.image), i, d.orig_height, d.orig_width, ""
        except Exception as exc:  # ImageReadError or anything a decoder throws
            return torch.zeros(1, self.size, self.size), i, 0, 0, str(exc) or type(exc).__name__
