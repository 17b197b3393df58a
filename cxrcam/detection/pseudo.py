"""CAM pseudo-boxes: training truth for a detector where the cache has image labels only (NIH).

For every image and every class it is labelled with, the classifier's Grad-CAM++ map gives
the best-scoring box (``maps_to_boxes`` with the config's threshold, or the class's calibrated
one when ``boxes.calibration`` is set; top 1), in original pixels and in the cache frame like
``boxes.csv``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cxrcam.boxes import BoxRules, maps_to_boxes, scale_boxes
from cxrcam.cam import create_cam
from cxrcam.config import Config
from cxrcam.data.cache import CACHE_BOX_COLUMNS, Cache
from cxrcam.data.dataset import CacheDataset
from cxrcam.data.tables import BOX_COLUMNS, target_columns
from cxrcam.models import load_classifier


@torch.no_grad()
def pseudo_boxes(classifier: str | Path, cache: Cache, config: Config, device: torch.device) -> pd.DataFrame:
    model, _ = load_classifier(classifier, device)
    cam = create_cam(model, config.cam.method)
    labels = cache.images[target_columns(cache.schema)].to_numpy() >= 0.5
    rules = BoxRules.from_config(replace(config.boxes, top_k=1))
    rows = []
    loader = DataLoader(CacheDataset(cache), batch_size=config.cam.batch_size, num_workers=config.cam.workers)
    for x, _, idx in loader:
        idx = idx.numpy()
        wanted = [np.flatnonzero(labels[i]).tolist() for i in idx]
        if not any(wanted):
            continue
        out = cam(x, sorted({c for w in wanted for c in w}))  # one CAM call per batch for its labelled classes
        found = maps_to_boxes(out.cams.cpu().numpy(), out.classes, wanted, None, rules)
        for i, (boxes, classes, _) in zip(idx, found):
            rows += [(cache.images.at[i, "image_id"], int(c), *box) for box, c in zip(boxes, classes)]
    frame = pd.DataFrame(rows, columns=["image_id", "class_id", *CACHE_BOX_COLUMNS])
    scales = frame.merge(cache.images[["image_id", "scale_x", "scale_y"]], on="image_id", how="left")
    frame[BOX_COLUMNS] = scale_boxes(frame[CACHE_BOX_COLUMNS].to_numpy(), 1 / scales["scale_x"].to_numpy(),
                                     1 / scales["scale_y"].to_numpy())
    frame["rad_id"] = "cam"
    return frame
