"""The four pictures localize writes per image, in the frame the model saw (input size):

* ``original_<name>.png``  the grey image;
* ``gtimage_<name>.png``   predicted boxes in class colours with label and score, ground-truth
  boxes in yellow on top (so the truth is never hidden);
* ``mask_<name>.png``      the image where any shown class's map is >= the threshold, black elsewhere;
* ``pred_<name>.png``      the heat map (pixel-wise max over the shown classes) over the image
  (pytorch-grad-cam's ``show_cam_on_image``), with the predicted boxes; after ``refine``,
  with the CAM boxes (thin, "CAM" labels) under the refined ones.

``<name>`` is the image id without an image file extension.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from pytorch_grad_cam.utils.image import show_cam_on_image

from cxrcam.data.images import IMAGE_SUFFIXES
from cxrcam.files import atomic_write_bytes
from cxrcam.schemas import Schema

TRUTH_BGR = (0, 255, 255)  # yellow
KINDS = ("original", "gtimage", "mask", "pred")


def picture_name(image_id: str) -> str:
    """File-system-safe picture name of an image id (NIH ids carry ``.png``)."""
    stem = image_id[: -len(Path(image_id).suffix)] if Path(image_id).suffix.lower() in IMAGE_SUFFIXES else image_id
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def picture_paths(out: str | Path, image_id: str) -> dict[str, Path]:
    name = picture_name(image_id)
    return {kind: Path(out) / f"{kind}_{name}.png" for kind in KINDS}


def _bgr(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return rgb[2], rgb[1], rgb[0]


def _draw(canvas: np.ndarray, boxes: np.ndarray, colours: list, labels: list[str], thickness: int) -> None:
    side = max(canvas.shape[:2])
    scale = max(0.3, side / 1200)
    for box, colour, label in zip(np.asarray(boxes).reshape(-1, 4), colours, labels):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, thickness)
        if label:
            (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
            ty = y0 - 3 if y0 - th - 3 >= 0 else min(y1 + th + 3, canvas.shape[0] - 1)
            cv2.putText(canvas, label, (x0, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def _png(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if ok:
        atomic_write_bytes(path, data.tobytes())


def write_pictures(out: str | Path, image_id: str, image: np.ndarray, schema: Schema,
                   truth: tuple[np.ndarray, np.ndarray], preds: tuple[np.ndarray, np.ndarray, np.ndarray],
                   cams: np.ndarray | None, threshold: float | Sequence[float],
                   cam_boxes: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Path]:
    """Write the four pictures of one image.

    image: H x W uint8; truth: (boxes N x 4, class ids); preds: (boxes, class ids, scores), all
    boxes in the image's pixels; cams: K x H x W maps of the shown classes (None or K = 0: no map),
    cut at ``threshold`` (one value, or one per map) for the mask;
    cam_boxes: (boxes, class ids) the CAM proposed, when ``preds`` are refined detections."""
    paths = picture_paths(out, image_id)
    grey = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    thick = max(1, round(max(image.shape) / 400))
    pbox, pcls, pscore = preds
    pred_colours = [_bgr(schema.colour(int(c))) for c in pcls]
    pred_labels = [f"{schema.class_name(int(c))} {s:.2f}" for c, s in zip(pcls, pscore)]

    gt = grey.copy()
    _draw(gt, pbox, pred_colours, pred_labels, thick)
    tbox, tcls = truth
    _draw(gt, tbox, [TRUTH_BGR] * len(tbox), [schema.class_name(int(c)) for c in tcls], thick)

    if cams is None or len(cams) == 0:
        heat, mask = np.zeros(image.shape, np.float32), np.zeros_like(image)
    else:
        heat = np.max(cams, axis=0)
        above = cams >= np.asarray(threshold, np.float32).reshape(-1, 1, 1)  # one threshold, or one per map
        mask = np.where(above.any(0), image, 0).astype(np.uint8)
    pred = show_cam_on_image(grey.astype(np.float32) / 255, heat, use_rgb=False)
    if cam_boxes is not None:
        cbox, ccls = cam_boxes
        _draw(pred, cbox, [_bgr(schema.colour(int(c))) for c in ccls],
              [f"CAM {schema.class_name(int(c))}" for c in ccls], 1)
    _draw(pred, pbox, pred_colours, pred_labels, thick)

    for kind, picture in zip(KINDS, (image, gt, mask, pred)):
        _png(paths[kind], picture)
    return paths
