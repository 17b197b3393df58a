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

from cxrcam.boxes import BoxRules, cam_proposals, maps_to_boxes, scale_boxes
from cxrcam.cam.checkpoint import CheckpointMaps, needed_classes
from cxrcam.config import Config
from cxrcam.data.cache import CACHE_BOX_COLUMNS, Cache
from cxrcam.data.tables import BOX_COLUMNS, target_columns

PROPOSAL_COLUMNS = ["image_id", *CACHE_BOX_COLUMNS]


@torch.no_grad()
def cam_training_boxes(classifier: str | Path, cache: Cache, config: Config, device: torch.device,
                       pseudo_rows: np.ndarray = (), proposal_rows: np.ndarray = (),
                       progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pseudo-boxes of the labelled classes of the cache rows ``pseudo_rows``, CAM proposals of
    the predicted classes of ``proposal_rows``), from one pass over the rows of either: each
    image's maps are computed only for the classes its parts need."""
    maps = CheckpointMaps(classifier, config, device)
    wants_pseudo, wants_proposals = set(np.asarray(pseudo_rows).tolist()), set(np.asarray(proposal_rows).tolist())
    rows = np.array(sorted(wants_pseudo | wants_proposals), dtype=np.int64)
    images = cache.images.iloc[rows].reset_index(drop=True)
    images = images.assign(path=[str(cache.root / f) for f in images["file"]])
    labels = images[target_columns(cache.schema)].to_numpy() >= 0.5

    def plan(k: int, p: np.ndarray):  # the detector pass's additions: labels for pseudo-boxes, if wanted
        return needed_classes(p, maps.thresholds, predict=rows[k] in wants_proposals,
                              extra=np.flatnonzero(labels[k]) if rows[k] in wants_pseudo else ())

    pseudo_rules = BoxRules(replace(maps.rules.default, top_k=1),
                            {c: replace(r, top_k=1) for c, r in maps.rules.per_class.items()})
    pseudo_found, proposal_found = [], []
    for batch in maps.stream(images, plan, "CAM boxes for the detector", progress, leave=False,
                             size=cache.size):
        if batch.maps is None or not len(batch.maps):
            continue
        found = batch.maps
        labelled = [plan.extra for plan in found.plans]
        predicted = [plan.predicted for plan in found.plans]
        for image_id, (boxes, classes, _) in zip(batch.ids, maps_to_boxes(found.map, None, labelled, None,
                                                                         pseudo_rules)):
            pseudo_found += [(image_id, int(c), *box) for box, c in zip(boxes, classes)]
        for image_id, boxes in zip(batch.ids, cam_proposals(found.map, None, predicted, maps.rules)):
            proposal_found += [(image_id, *box) for box in boxes]
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
