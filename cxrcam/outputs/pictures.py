"""The four pictures localize writes per image, in the frame the model saw (its input), drawn at
least ``size`` pixels on the long side (512 by default: a 128 px input is upsampled, with its
heat map, so the labels can be read):

* ``original_<name>.png``  the grey image;
* ``gtimage_<name>.png``   predicted boxes in class colours, ground-truth boxes in yellow on top
  (so the truth is never hidden); one label per class (its best box), inside the picture;
* ``mask_<name>.png``      the image where any shown class's map is >= the threshold, black elsewhere;
* ``pred_<name>.png``      the heat map (pixel-wise max over the shown classes) over the image
  (pytorch-grad-cam's ``show_cam_on_image``), with the predicted boxes; after ``refine``, the
  refined detections, and with ``show_proposals`` the CAM boxes faint beneath them. An image
  with no class above its operating point shows no map, and says so.

``<name>`` is the image id without an image file extension.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from cxrcam.boxes import scale_boxes
from cxrcam.data.images import IMAGE_SUFFIXES
from cxrcam.files import atomic_write_bytes
from cxrcam.schemas import Schema

TRUTH_BGR = (0, 255, 255)  # yellow; no class colour is near it (schemas.PALETTE)
PICTURE_SIZE = 512  # long side of the pictures at least, whatever the model's input size
KINDS = ("original", "gtimage", "mask", "pred")


def picture_name(image_id: str) -> str:
    """File-system-safe picture name of an image id (NIH ids carry ``.png``)."""
    stem = image_id[: -len(Path(image_id).suffix)] if Path(image_id).suffix.lower() in IMAGE_SUFFIXES else image_id
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def picture_paths(out: str | Path, image_id: str) -> dict[str, Path]:
    name = picture_name(image_id)
    return {kind: Path(out) / f"{kind}_{name}.png" for kind in KINDS}


def remove_pictures(out: str | Path) -> int:
    """Delete the pictures a previous run left in ``out``, so that a new run's folder holds only
    its own (the images may differ); the number removed."""
    old = [p for kind in KINDS for p in Path(out).glob(f"{kind}_*.png")]
    for p in old:
        p.unlink()
    return len(old)


def _bgr(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return rgb[2], rgb[1], rgb[0]


class _Labels:
    """Places box labels on a picture: inside the frame, outside their box where there is room,
    never on top of an earlier label (moved down a line until free)."""

    def __init__(self, canvas: np.ndarray):
        self.canvas, self.placed = canvas, []
        self.scale = max(0.4, max(canvas.shape[:2]) / 1100)
        self.weight = 1 if self.scale < 0.7 else 2

    def _free(self, rect: tuple[int, int, int, int]) -> bool:
        x0, y0, x1, y1 = rect
        return all(x1 <= a or x0 >= c or y1 <= b or y0 >= d for a, b, c, d in self.placed)

    def add(self, text: str, box: np.ndarray, colour: tuple[int, int, int]) -> None:
        h, w = self.canvas.shape[:2]
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, self.scale, self.weight)
        lh = th + base + 4
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        x = min(max(0, x0), max(0, w - tw - 4))
        tops = [y0 - lh, y1 + 1, y0 + 1]  # above the box, below it, inside its top
        top = next((t for t in tops if 0 <= t <= h - lh), max(0, min(y0, h - lh)))
        for _ in range(h // lh):
            if self._free((x, top, x + tw + 4, top + lh)):
                break
            top = top + lh if top + 2 * lh <= h else 0
        self.placed.append((x, top, x + tw + 4, top + lh))
        cv2.rectangle(self.canvas, (x, top), (x + tw + 3, top + lh - 1), colour, -1)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)  # dark text on light fills
        cv2.putText(self.canvas, text, (x + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, self.scale, ink,
                    self.weight, cv2.LINE_AA)


def _draw(canvas: np.ndarray, boxes: np.ndarray, colours: list, thickness: int) -> None:
    for box, colour in zip(boxes, colours):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, thickness)


def _label_best(placer: _Labels, boxes: np.ndarray, classes: np.ndarray, labels: list[str], colours: list,
                scores: np.ndarray | None = None) -> None:
    """One label per class, on its best-scoring (or first) box: a pile of labels helps no one."""
    order = np.argsort(-np.asarray(scores), kind="stable") if scores is not None else range(len(boxes))
    done: set[int] = set()
    for k in order:
        if int(classes[k]) not in done:
            done.add(int(classes[k]))
            placer.add(labels[k], boxes[k], colours[k])


def _png(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if ok:
        atomic_write_bytes(path, data.tobytes())


def _enlarge(image: np.ndarray, cams: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The image (and maps) upsampled so the long side is at least ``size``: small model inputs
    would give pictures whose labels no one can read. Returns the factor the boxes scale by."""
    factor = max(1.0, size / max(image.shape[:2]))
    if factor == 1.0:
        return image, cams, factor
    wh = (round(image.shape[1] * factor), round(image.shape[0] * factor))
    image = cv2.resize(image, wh, interpolation=cv2.INTER_CUBIC)
    if cams is not None and len(cams):
        cams = np.stack([cv2.resize(c.astype(np.float32), wh, interpolation=cv2.INTER_LINEAR) for c in cams])
    return image, cams, factor


def write_pictures(out: str | Path, image_id: str, image: np.ndarray, schema: Schema,
                   truth: tuple[np.ndarray, np.ndarray], preds: tuple[np.ndarray, np.ndarray, np.ndarray],
                   cams: np.ndarray | None, threshold: float | Sequence[float],
                   cam_boxes: tuple[np.ndarray, np.ndarray] | None = None, size: int = PICTURE_SIZE,
                   cuts: np.ndarray | None = None) -> dict[str, Path]:
    """Write the four pictures of one image, at least ``size`` pixels on the long side.

    image: H x W uint8; truth: (boxes N x 4, class ids); preds: (boxes, class ids, scores), all
    boxes in the image's pixels; cams: K x H x W maps of the shown classes (None or K = 0: no map),
    cut at ``threshold`` (one value, or one per map) for the mask (``cuts``: the maps the thresholds
    cut where that is not the map itself, ``boxes.threshold_mode``);
    cam_boxes: (boxes, class ids) the CAM proposed, drawn faint under refined detections."""
    paths = picture_paths(out, image_id)
    cuts = _enlarge(image, cuts, size)[1] if cuts is not None else None
    image, cams, factor = _enlarge(image, cams, size)
    grey = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    thick = max(1, round(max(image.shape) / 300))
    pbox, pcls, pscore = preds
    pbox = scale_boxes(pbox, factor, factor)
    pred_colours = [_bgr(schema.colour(int(c))) for c in pcls]
    pred_labels = [f"{schema.class_name(int(c))} {s:.2f}" for c, s in zip(pcls, pscore)]

    tbox, tcls = truth
    tbox = scale_boxes(tbox, factor, factor)
    truth_labels = [f"truth: {schema.class_name(int(c))}" for c in tcls]
    gt = grey.copy()
    _draw(gt, pbox, pred_colours, thick)
    placer = _Labels(gt)
    _label_best(placer, tbox, tcls, truth_labels, [TRUTH_BGR] * len(tbox))
    _label_best(placer, pbox, pcls, pred_labels, pred_colours, pscore)
    _draw(gt, tbox, [TRUTH_BGR] * len(tbox), thick)  # truth last, so neither a box nor a label hides it

    if cams is None or len(cams) == 0:
        mask, pred = np.zeros_like(image), grey.copy()
        if not len(pbox):
            _Labels(pred).add("no finding predicted", np.array([4.0, 4.0, 4.0, 4.0]), (255, 255, 255))
    else:
        heat = np.max(cams, axis=0)
        above = (cams if cuts is None else cuts) >= np.asarray(threshold, np.float32).reshape(-1, 1, 1)  # or per map
        mask = np.where(above.any(0), image, 0).astype(np.uint8)
        from pytorch_grad_cam.utils.image import show_cam_on_image  # here: the library imports sklearn, matplotlib

        pred = show_cam_on_image(grey.astype(np.float32) / 255, heat, use_rgb=False)
    if cam_boxes is not None and len(cam_boxes[0]):
        faint = pred.copy()
        cbox, ccls = cam_boxes
        _draw(faint, scale_boxes(cbox, factor, factor), [_bgr(schema.colour(int(c))) for c in ccls], max(1, thick // 2))
        pred = cv2.addWeighted(faint, 0.4, pred, 0.6, 0)
    _draw(pred, pbox, pred_colours, thick)
    _label_best(_Labels(pred), pbox, pcls, pred_labels, pred_colours, pscore)

    for kind, picture in zip(KINDS, (image, gt, mask, pred)):
        _png(paths[kind], picture)
    return paths
