"""What a classifier's heat maps give a detector in training, from one pass over the cache.

- **Pseudo-boxes**, the training truth of images with labels and no boxes (NIH, or the images
  whose boxes ``detector.box_images`` withholds): for every class an image is *labelled* with,
  the best-scoring CAM box (``maps_to_boxes`` with the config's threshold, or the class's
  calibrated one when ``boxes.calibration`` is set; top 1).
- **CAM proposals** (``detector.cam_proposals_from``): for every class the classifier
  *predicts* (p > ``boxes.min_prob``), every component of its map at the calibrated threshold
  and around it (:func:`~cxrcam.boxes.cam_proposals`), the same boxes ``refine`` proposes at
  inference, so the RoI heads learn to correct them.

Both are in the cache frame (``cx_min``...); pseudo-boxes also in original pixels like ``boxes.csv``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrcam.boxes import BoxRules, cam_proposals, maps_to_boxes, scale_boxes
from cxrcam.cam import create_cam
from cxrcam.config import Config
from cxrcam.data.cache import CACHE_BOX_COLUMNS, Cache
from cxrcam.data.dataset import CacheDataset
from cxrcam.data.tables import BOX_COLUMNS, target_columns
from cxrcam.models import load_classifier

PROPOSAL_COLUMNS = ["image_id", *CACHE_BOX_COLUMNS]


@torch.no_grad()
def cam_training_boxes(classifier: str | Path, cache: Cache, config: Config, device: torch.device,
                       rows: np.ndarray | None = None, pseudo: bool = True, proposals: bool = False,
                       progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pseudo-boxes of the labelled classes, CAM proposals of the predicted classes) of the
    cache ``rows`` (all by default); each part only when asked for, else an empty frame."""
    model, _ = load_classifier(classifier, device)
    cam = create_cam(model, config.cam.method)
    rows = np.arange(len(cache.images)) if rows is None else np.asarray(rows)
    labels = cache.images[target_columns(cache.schema)].to_numpy() >= 0.5
    pseudo_rules = BoxRules.from_config(replace(config.boxes, top_k=1))
    rules = BoxRules.from_config(config.boxes)
    pseudo_rows, proposal_rows = [], []
    loader = DataLoader(CacheDataset(cache, rows), batch_size=config.cam.batch_size, num_workers=config.cam.workers)
    for x, _, k in tqdm(loader, desc="CAM boxes for the detector", unit="batch", disable=not progress, leave=False):
        idx = rows[k.numpy()]
        labelled = [np.flatnonzero(labels[i]).tolist() if pseudo else [] for i in idx]
        predicted: list[list[int]] = [[] for _ in idx]

        def needed(logits: torch.Tensor) -> list[int]:
            if proposals:
                p = torch.sigmoid(logits).cpu().numpy()
                predicted[:] = [np.flatnonzero(row > config.boxes.min_prob).tolist() for row in p]
            return sorted({c for w in (*labelled, *predicted) for c in w})

        out = cam(x, needed)  # one CAM call per batch, for the classes some image needs
        if not out.classes:
            continue
        maps = out.cams.cpu().numpy()
        for i, (boxes, classes, _) in zip(idx, maps_to_boxes(maps, out.classes, labelled, None, pseudo_rules)):
            pseudo_rows += [(cache.images.at[i, "image_id"], int(c), *box) for box, c in zip(boxes, classes)]
        for i, boxes in zip(idx, cam_proposals(maps, out.classes, predicted, rules)):
            proposal_rows += [(cache.images.at[i, "image_id"], *box) for box in boxes]
    frame = pd.DataFrame(pseudo_rows, columns=["image_id", "class_id", *CACHE_BOX_COLUMNS])
    scales = frame.merge(cache.images[["image_id", "scale_x", "scale_y"]], on="image_id", how="left")
    frame[BOX_COLUMNS] = scale_boxes(frame[CACHE_BOX_COLUMNS].to_numpy(), 1 / scales["scale_x"].to_numpy(),
                                     1 / scales["scale_y"].to_numpy())
    frame["rad_id"] = "cam"
    return frame, pd.DataFrame(proposal_rows, columns=PROPOSAL_COLUMNS)


def pseudo_boxes(classifier: str | Path, cache: Cache, config: Config, device: torch.device) -> pd.DataFrame:
    """One pseudo-box per (image, labelled class) of the whole cache."""
    return cam_training_boxes(classifier, cache, config, device)[0]


__all__ = ["cam_training_boxes", "pseudo_boxes", "PROPOSAL_COLUMNS"]
