"""What a classifier's heat maps give a detector in training, from one pass over the cache.

- **Pseudo-boxes**, the training truth of images with labels and no boxes (NIH, or the images
  whose boxes ``detector.box_images`` withholds): for every class an image is *labelled* with,
  the best-scoring CAM box (``maps_to_boxes`` with the config's threshold, or the class's
  calibrated one when ``boxes.calibration`` is set; top 1).
- **CAM proposals** (``detector.cam_proposals_from``): for every class the classifier
  *predicts* (p above its decision threshold: the checkpoint's operating point, or ``boxes.min_prob``),
  every component of its map at the calibrated threshold
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

from cxrcam.boxes import BoxRules, cam_proposals, maps_to_boxes, scale_boxes
from cxrcam.cam import create_cam
from cxrcam.config import Config
from cxrcam.data.cache import CACHE_BOX_COLUMNS, Cache
from cxrcam.data.dataset import CacheDataset
from cxrcam.data.tables import BOX_COLUMNS, target_columns
from cxrcam.models import decision_thresholds, load_classifier
from cxrcam.schemas import get_schema
from cxrcam.runtime.progress import progress_bar

PROPOSAL_COLUMNS = ["image_id", *CACHE_BOX_COLUMNS]


@torch.no_grad()
def cam_training_boxes(classifier: str | Path, cache: Cache, config: Config, device: torch.device,
                       pseudo_rows: np.ndarray = (), proposal_rows: np.ndarray = (),
                       progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pseudo-boxes of the labelled classes of the cache rows ``pseudo_rows``, CAM proposals of
    the predicted classes of ``proposal_rows``), from one pass over the rows of either: each
    image's maps are computed only for the classes its parts need."""
    model, ckpt = load_classifier(classifier, device)
    thresholds = decision_thresholds(ckpt, config.boxes.min_prob)
    rules = BoxRules.from_config(config.boxes)
    rules.check_schema(get_schema(ckpt["schema"]))
    cam = create_cam(model, *rules.cam_settings(config.cam))
    wants_pseudo, wants_proposals = set(np.asarray(pseudo_rows).tolist()), set(np.asarray(proposal_rows).tolist())
    rows = np.array(sorted(wants_pseudo | wants_proposals), dtype=np.int64)
    labels = cache.images[target_columns(cache.schema)].to_numpy() >= 0.5
    pseudo_rules = BoxRules.from_config(replace(config.boxes, top_k=1))
    pseudo_found, proposal_found = [], []
    loader = DataLoader(CacheDataset(cache, rows), batch_size=config.cam.batch_size, num_workers=config.cam.workers)
    for x, _, k in progress_bar(loader, desc="CAM boxes for the detector", unit="batch", disable=not progress, leave=False):
        idx = rows[k.numpy()]
        labelled = [np.flatnonzero(labels[i]).tolist() if i in wants_pseudo else [] for i in idx]
        predicted: list[list[int]] = [[] for _ in idx]

        def needed(logits: torch.Tensor) -> list[int]:
            p = torch.sigmoid(logits).cpu().numpy()
            predicted[:] = [np.flatnonzero(row > thresholds).tolist() if i in wants_proposals else []
                            for i, row in zip(idx, p)]
            return sorted({c for w in (*labelled, *predicted) for c in w})

        out = cam(x, needed)  # one CAM call per batch, for the classes some image needs
        if not out.classes:
            continue
        maps = out.cams.cpu().numpy()
        for i, (boxes, classes, _) in zip(idx, maps_to_boxes(maps, out.classes, labelled, None, pseudo_rules)):
            pseudo_found += [(cache.images.at[i, "image_id"], int(c), *box) for box, c in zip(boxes, classes)]
        for i, boxes in zip(idx, cam_proposals(maps, out.classes, predicted, rules)):
            proposal_found += [(cache.images.at[i, "image_id"], *box) for box in boxes]
    frame = pd.DataFrame(pseudo_found, columns=["image_id", "class_id", *CACHE_BOX_COLUMNS])
    scales = frame.merge(cache.images[["image_id", "scale_x", "scale_y"]], on="image_id", how="left")
    frame[BOX_COLUMNS] = scale_boxes(frame[CACHE_BOX_COLUMNS].to_numpy(), 1 / scales["scale_x"].to_numpy(),
                                     1 / scales["scale_y"].to_numpy())
    frame["rad_id"] = "cam"
    return frame, pd.DataFrame(proposal_found, columns=PROPOSAL_COLUMNS)


def pseudo_boxes(classifier: str | Path, cache: Cache, config: Config, device: torch.device) -> pd.DataFrame:
    """One pseudo-box per (image, labelled class) of the whole cache."""
    return cam_training_boxes(classifier, cache, config, device, pseudo_rows=np.arange(len(cache.images)))[0]


__all__ = ["cam_training_boxes", "pseudo_boxes", "PROPOSAL_COLUMNS"]
