"""PyTorch datasets: a ``prepare`` cache (grey images in [0, 1] plus targets), and any image files."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from cxrcam.config import AugmentConfig
from cxrcam.data.cache import Cache
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
    """Rows of a cache manifest -> (1 x S x S float tensor in [0, 1], targets, row index)."""

    def __init__(self, cache: Cache, rows: np.ndarray | None = None, transform=None, soft: bool = False):
        images = cache.images if rows is None else cache.images.iloc[rows]
        self.files = [str(cache.root / f) for f in images["file"]]
        cols = soft_columns(cache.schema) if soft else target_columns(cache.schema)
        self.targets = torch.from_numpy(images[cols].to_numpy(np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        x = image_tensor(read_image(self.files[i]).image)
        if self.transform is not None:
            x = self.transform(x).clamp_(0, 1)
        return x, self.targets[i], i


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
