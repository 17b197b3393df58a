"""``cxrcam train-detector``: torchvision Faster R-CNN on a cache, read top to bottom.

Setup only: the supervision (:func:`_supervision`: the cache's fused boxes; CAM pseudo-boxes from
a classifier, ``detector.pseudo_from``, for labelled images without boxes, at loss weight
``detector.pseudo_weight``; images without findings as negatives), the CAM proposals that join
the RoI heads' training proposals (``detector.cam_proposals_from``, jittered each step), the
optional box-aware augmentation, the Faster R-CNN, SGD with momentum, linear warm-up and step
decay. The epoch loop, AMP, checkpoints (``best.pt`` on
validation VOC mAP@0.4, ``last.pt`` for ``--resume``) and ``metrics.csv`` are the engine's
(:mod:`cxrcam.train.engine`), as for the classifier; DDP under torchrun.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from cxrcam.boxes import resize_boxes, scale_boxes
from cxrcam.config import AugmentConfig, Config, DetectorConfig, config_to_dict
from cxrcam.data.cache import CACHE_BOX_COLUMNS, Cache
from cxrcam.data.dataset import image_tensor, train_transforms
from cxrcam.data.images import read_image
from cxrcam.data.tables import BOX_COLUMNS, DETECTION_COLUMNS, target_columns
from cxrcam.detection.model import (CamRetinaNet, anchor_sizes, check_init, create_detector, load_detector,
                                    to_detector_input)
from cxrcam.detection.pseudo import PROPOSAL_COLUMNS, cam_training_boxes
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.detection import voc_map
from cxrcam.evaluation.rsna import rsna_score
from cxrcam.files import load_checkpoint, save_checkpoint, write_csv
from cxrcam.runtime import dist
from cxrcam.train.engine import Run, fit, start_run


class DetectionDataset(Dataset):
    """Cache rows -> (1 x S x S image in [0, 1], {"boxes": cache-frame xyxy, "labels": class + 1,
    "weight": the image's loss weight}, position). ``pseudo``: the image ids whose boxes are CAM
    pseudo-boxes, weighted ``pseudo_weight``; ``transform``: a v2 transform moving image and boxes."""

    def __init__(self, cache: Cache, rows: np.ndarray, boxes: pd.DataFrame, pseudo: set[str] = frozenset(),
                 pseudo_weight: float = 1.0, transform=None):
        self.images = cache.images.iloc[rows].reset_index(drop=True)
        self.root, self.transform = cache.root, transform
        groups = {k: g for k, g in boxes.groupby("image_id")}
        self.targets = []
        for image_id in self.images["image_id"]:
            g = groups.get(image_id)
            b = np.zeros((0, 4), np.float32) if g is None else g[CACHE_BOX_COLUMNS].to_numpy(np.float32)
            c = np.zeros(0, np.int64) if g is None else g["class_id"].to_numpy(np.int64) + 1
            keep = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)  # no degenerate boxes
            weight = pseudo_weight if image_id in pseudo else 1.0
            self.targets.append({"boxes": torch.from_numpy(b[keep]), "labels": torch.from_numpy(c[keep]),
                                 "weight": torch.tensor(weight)})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = image_tensor(read_image(self.root / self.images.at[i, "file"]).image)
        target = self.targets[i]
        if self.transform is not None:
            boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(x.shape[-2:]))
            image, moved = self.transform(tv_tensors.Image(x), {"boxes": boxes, "labels": target["labels"]})
            x = image.as_subclass(torch.Tensor).clamp(0, 1)
            target = {**target, "boxes": moved["boxes"].as_subclass(torch.Tensor), "labels": moved["labels"]}
        return x, target, i


def box_transforms(cfg: AugmentConfig) -> v2.Compose:
    """The classifier's augmentations (:func:`train_transforms`), boxes included; boxes pushed
    out of the image or below 1 pixel are dropped."""
    return v2.Compose([train_transforms(cfg), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1)])


def jitter_boxes(boxes: torch.Tensor, share: float, size: int, copies: int = 2) -> torch.Tensor:
    """``boxes`` and ``copies`` jittered copies of each, every edge moved by up to ``share`` of the
    box's side (torch's RNG, so a resumed run draws the same), clipped to the image."""
    if share <= 0 or len(boxes) == 0:
        return boxes
    side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    moved = boxes.repeat(copies, 1) + (torch.rand(copies * len(boxes), 4) * 2 - 1) * share * side.repeat(copies, 1)
    moved = moved.clamp(0, size)
    moved = moved[(moved[:, 2] - moved[:, 0] >= 1) & (moved[:, 3] - moved[:, 1] >= 1)]
    return torch.cat([boxes, moved])


def detector_optimizer(model: nn.Module, dcfg: DetectorConfig) -> torch.optim.Optimizer:
    """``detector.optimizer`` over the trainable parameters; "auto" is SGD for Faster R-CNN (the VinBigData
    baselines' recipe) and AdamW for RetinaNet, whose focal loss under SGD at 0.01 stays at its prior
    for a CPU-sized run (docs/BENCHMARKS.md, issue 37). ``lr`` "auto": 0.01 for SGD, 3e-4 for AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    name = dcfg.optimizer if dcfg.optimizer != "auto" else ("adamw" if dcfg.arch == "retinanet" else "sgd")
    lr = dcfg.lr if dcfg.lr != "auto" else {"sgd": 0.01, "adamw": 3e-4}[name]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=dcfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=dcfg.momentum, weight_decay=dcfg.weight_decay)


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


NMS_GRID = (0.3, 0.4, 0.5, 0.6)  # the NMS IoU thresholds the validation sweep tries
SCALE_GRID = (0.8, 0.875, 0.9, 0.95, 1.0, 1.1)  # and the box scales (RSNA's winners: 0.875-0.9)
# and, on RSNA's score, which counts every box on an image without pneumonia as a miss, the detector
# score below which boxes are dropped (AP ranks boxes: dropping the lowest never raises it, so not swept)
SCORE_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@torch.no_grad()
def raw_detections(model, loader, val_set: DetectionDataset, device: torch.device) -> tuple[pd.DataFrame, int]:
    """(the validation fold's detections without NMS, up to 300 an image; the model's own cap per
    image): computed once, what the post-processing sweep and the filter choice both cut."""
    holder = model if isinstance(model, CamRetinaNet) else model.roi_heads
    saved = holder.nms_thresh, holder.detections_per_img
    holder.nms_thresh, holder.detections_per_img = 1.0, max(saved[1], 300)
    try:
        return detect(model, loader, val_set.images, device), saved[1]
    finally:
        holder.nms_thresh, holder.detections_per_img = saved


def choose_postprocess(raw: pd.DataFrame, max_detections: int, val_set: DetectionDataset, truth: pd.DataFrame,
                       schema, iou_thr: float) -> dict[str, Any]:
    """The NMS threshold and box scale that score best on the validation fold
    (:func:`sweep_postprocess`) for its :func:`raw_detections`. What ``refine`` reads
    (``refine.iou`` and ``refine.scale`` "auto")."""
    val_truth = truth[truth["image_id"].isin(set(val_set.images["image_id"]))][["image_id", "class_id", *BOX_COLUMNS]]
    sizes = val_set.images.set_index("image_id")[["width", "height"]].astype(float)
    return sweep_postprocess(raw, val_truth, list(val_set.images["image_id"]), sizes, schema.name == "rsna", iou_thr,
                             max_detections)


def choose_detector_filter(raw: pd.DataFrame, max_detections: int, val_set: DetectionDataset, truth: pd.DataFrame,
                           cache: Cache, classifier: str | Path, chosen: dict[str, Any], iou_thr: float,
                           device: torch.device, normal_rule: str = "max", top_k: int = 0) -> dict[str, Any]:
    """The 2-class filter's thresholds for this detector's own boxes (``choose_filter``: held out on
    both halves of the validation fold), from the ``classifier``'s p_normal (``detector.init``, the
    classifier refine is normally given); the :func:`raw_detections` are cut at the chosen NMS (as
    the sweep cut them), box scale and minimum score, and to refine's ``top_k`` per class and image.
    Scored on the images whose truth is complete: the boxed ones and those without findings."""
    from cxrcam.calibrate.run import half_of
    from cxrcam.outputs.postprocess import choose_filter_where_complete
    from cxrcam.train.classifier import predict

    found = raw.iloc[nms_rows(raw, chosen["nms"], max_detections)]
    found = found[found["score"] >= chosen.get("min_score", 0.0)]
    if top_k > 0:  # what refine submits: each class's top_k boxes per image (and fewer boxes to score)
        found = found.sort_values("score", ascending=False, kind="stable").groupby(["image_id", "class_id"]).head(top_k)
    found = found.reset_index(drop=True)
    sizes = val_set.images.set_index("image_id").loc[found["image_id"], ["width", "height"]].to_numpy(np.float64)
    found[BOX_COLUMNS] = resize_boxes(found[BOX_COLUMNS].to_numpy(), chosen["scale"], sizes[:, 0], sizes[:, 1])
    rows = np.flatnonzero(cache.images["image_id"].isin(set(val_set.images["image_id"])).to_numpy())
    probs = predict(classifier, cache.root, workers=0, progress=False, device=str(device), rows=rows)
    labels = val_set.images.set_index("image_id")[target_columns(cache.schema)]
    result = choose_filter_where_complete(found, probs.set_index("image_id")[list(cache.schema.findings)], labels,
                                          truth, cache.schema, iou_thr, half_of, normal_rule)
    return {k: v for k, v in result.items() if k != "grid"}


def nms_rows(raw: pd.DataFrame, nms: float, max_detections: int = 100) -> np.ndarray:
    """The rows of ``raw`` (detections before NMS) that NMS at IoU ``nms`` keeps per (image, class),
    then each image's ``max_detections`` best: what the model returns at that NMS threshold."""
    from torchvision.ops import batched_nms

    image = pd.factorize(raw["image_id"])[0]
    groups = torch.tensor(image.astype(np.int64) * (int(raw["class_id"].max()) + 1 if len(raw) else 1)
                          + raw["class_id"].to_numpy(np.int64))
    boxes, scores = torch.tensor(raw[BOX_COLUMNS].to_numpy(np.float64)), torch.tensor(raw["score"].to_numpy(np.float64))
    keep = batched_nms(boxes, scores, groups, nms).numpy()
    kept = raw.iloc[keep].assign(_row=keep)
    return kept.sort_values("score", ascending=False).groupby("image_id").head(max_detections)["_row"].to_numpy()


def sweep_postprocess(raw: pd.DataFrame, truth: pd.DataFrame, image_ids: list[str], sizes: pd.DataFrame, rsna: bool,
                      iou_thr: float, max_detections: int = 100) -> dict[str, Any]:
    """Each (NMS IoU, box scale, minimum score) of :data:`NMS_GRID` x :data:`SCALE_GRID` x
    :data:`SCORE_GRID` (RSNA; else no minimum) applied to ``raw`` detections (before NMS; original
    pixels; ``sizes``: width, height by image id) and scored with the dataset's own metric: RSNA's
    score (``rsna``), else VOC mAP@``iou_thr``. The best wins; ties keep the setting nearest NMS 0.5,
    scale 1 and no minimum (the least change)."""
    w, h = sizes.loc[raw["image_id"], "width"].to_numpy(), sizes.loc[raw["image_id"], "height"].to_numpy()

    def score(rows: np.ndarray, scale: float, min_score: float) -> float:
        rows = rows[raw["score"].to_numpy()[rows] >= min_score]
        found = raw.iloc[rows]
        resized = resize_boxes(found[BOX_COLUMNS].to_numpy(), scale, w[rows], h[rows])
        found = found.assign(**dict(zip(BOX_COLUMNS, resized.T)))
        return rsna_score(truth, found, image_ids)[0] if rsna else voc_map(truth, found, iou_thr)[0]

    kept = {nms: nms_rows(raw, nms, max_detections) for nms in NMS_GRID}  # NMS once a threshold; scales re-cut
    table = [(nms, scale, t, score(kept[nms], scale, t)) for nms in NMS_GRID for scale in SCALE_GRID
             for t in (SCORE_GRID if rsna else (0.0,))]
    values = np.array([v for *_, v in table], np.float64)
    if not np.isfinite(values).any():
        return {"nms": 0.5, "scale": 1.0, "min_score": 0.0, "metric": "none", "why": "no validation truth to choose by"}
    best = np.nanmax(values)
    _, nms, scale, min_score, value = min((abs(n - 0.5) + abs(np.log(sc)) + t, n, sc, t, v)
                                          for n, sc, t, v in table if v >= best - 1e-9)
    return {"nms": nms, "scale": scale, "min_score": min_score, "metric": "RSNA score" if rsna else f"mAP@{iou_thr}",
            "value": float(value),
            "default_value": float(dict(((n, sc, t), v) for n, sc, t, v in table)[(0.5, 1.0, 0.0)]),
            "grid": [[n, sc, t, float(v)] for n, sc, t, v in table]}


def _record_postprocess(out: Path, chosen: dict[str, Any]) -> None:
    """The validation fold's post-processing, written into best.pt and last.pt (where refine reads it)."""
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(out / name, "cpu", kind="detector")
        save_checkpoint(out / name, {**ckpt, "postprocess": chosen})


@dataclass
class Supervision:
    """What each image trains on: truth boxes, CAM pseudo-boxes, or none (a negative)."""

    train_rows: np.ndarray  # the training-fold rows the detector sees
    boxes: pd.DataFrame  # truth and pseudo-boxes of every row that has them
    pseudo: set[str]  # the image ids whose boxes are pseudo-boxes
    proposals: dict[str, np.ndarray]  # image id -> CAM proposals (cache frame), detector.cam_proposals_from
    source: str  # "truth", "cam pseudo-boxes" or "truth + cam pseudo-boxes"
    counts: dict[str, int] = field(default_factory=dict)


def _supervision(cache: Cache, config: Config, info: dist.DistInfo, train_rows: np.ndarray, val_rows: np.ndarray,
                 out: Path, resume: bool, progress: bool) -> Supervision:
    """Which rows train on what. ``detector.box_images`` withholds boxes (a seeded sample of K
    training images keeps them; "none": no image does, validation included); labelled images
    without boxes take CAM pseudo-boxes from ``detector.pseudo_from``, or are left out; images
    without findings are negatives, or left out (``detector.negatives=false``)."""
    dcfg = config.detector
    ids = cache.images["image_id"].to_numpy()
    if isinstance(dcfg.box_images, int) and dcfg.box_images < 0:
        raise CxrcamError(f"detector.box_images must be >= 0 or none, got {dcfg.box_images}")
    if dcfg.pseudo_weight <= 0:
        raise CxrcamError(f"detector.pseudo_weight must be > 0, got {dcfg.pseudo_weight}")
    shown = np.ones(len(ids), bool)  # rows whose truth boxes the detector may see
    if dcfg.box_images == "none":
        shown[:] = False
    elif 0 < dcfg.box_images < len(train_rows):  # the setting where boxes are scarce and image labels are not
        sample = np.random.default_rng(dcfg.seed).choice(train_rows, dcfg.box_images, replace=False)
        shown[train_rows] = False
        shown[sample] = True
    truth = cache.boxes[cache.boxes["image_id"].isin(set(ids[shown]))]
    finding = (cache.images[target_columns(cache.schema)].to_numpy() >= 0.5).any(1)
    unboxed = finding & ~np.isin(ids, truth["image_id"].unique())  # labelled, and no box to learn from
    if dcfg.pseudo_from:
        pseudo_rows = np.concatenate([train_rows, val_rows])
        pseudo_rows = pseudo_rows[unboxed[pseudo_rows]]
    else:
        if truth.empty:
            why = ("detector.box_images=none withholds every box" if dcfg.box_images == "none"
                   else f"{cache.root} has no boxes")
            raise CxrcamError(f"{why}: set detector.pseudo_from to a classifier checkpoint (CAM pseudo-boxes)")
        train_rows = train_rows[shown[train_rows] & ~unboxed[train_rows]]  # the boxed images alone
        pseudo_rows = train_rows[:0]
    if not dcfg.negatives:
        train_rows = train_rows[finding[train_rows]]
    pseudo, proposals = _cam_boxes(cache, config, info, pseudo_rows, train_rows, out, resume, progress)
    source = ("truth" if not len(pseudo_rows) else "cam pseudo-boxes" if truth.empty
              else "truth + cam pseudo-boxes")
    counts = {"truth": int((finding & ~unboxed)[train_rows].sum()), "pseudo": int(unboxed[train_rows].sum()),
              "negative": int((~finding[train_rows]).sum())}
    return Supervision(train_rows, pd.concat([truth, pseudo], ignore_index=True), set(ids[pseudo_rows]),
                       proposals, source, counts)


def _cam_boxes(cache: Cache, config: Config, info: dist.DistInfo, pseudo_rows: np.ndarray, proposal_rows: np.ndarray,
               out: Path, resume: bool, progress: bool) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Pseudo-boxes of ``pseudo_rows`` (``detector.pseudo_from``) and CAM proposals of
    ``proposal_rows`` (``detector.cam_proposals_from``): one pass per classifier, written to
    ``out`` (``pseudo_boxes.csv``, ``cam_proposals.csv``) and read back by ``--resume``."""
    dcfg = config.detector
    files = {"pseudo": out / "pseudo_boxes.csv", "proposals": out / "cam_proposals.csv"}
    source = {"pseudo": dcfg.pseudo_from if len(pseudo_rows) else "", "proposals": dcfg.cam_proposals_from}
    rows = {"pseudo": pseudo_rows, "proposals": proposal_rows}
    found = {part: pd.read_csv(files[part], dtype={"image_id": str})
             for part in files if source[part] and resume and files[part].is_file()}
    for classifier in sorted({source[p] for p in files if source[p] and p not in found}):
        parts = [p for p in files if source[p] == classifier and p not in found]
        both = cam_training_boxes(classifier, cache, config, info.device,
                                  pseudo_rows=rows["pseudo"] if "pseudo" in parts else (),
                                  proposal_rows=rows["proposals"] if "proposals" in parts else (),
                                  progress=progress and info.is_main)
        for part, frame in zip(files, both):
            if part in parts:
                found[part] = frame
                if info.is_main:
                    out.mkdir(parents=True, exist_ok=True)
                    write_csv(files[part], found[part])
    pseudo = found.get("pseudo", pd.DataFrame(columns=cache.boxes.columns))
    proposals = found.get("proposals", pd.DataFrame(columns=PROPOSAL_COLUMNS))
    # copies: pandas hands out read-only arrays, which torch.from_numpy warns about (issue 38)
    return pseudo, {k: g[CACHE_BOX_COLUMNS].to_numpy(np.float32, copy=True) for k, g in proposals.groupby("image_id")}


def train_detector(config: Config, data: str | Path, out: str | Path, resume: bool = False,
                   progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train the Faster R-CNN or RetinaNet (``detector.*``) on the cache's boxes (and CAM pseudo-boxes
    where asked); checkpoints and logs go to ``out`` (as :func:`~cxrcam.train.classifier.train_classifier`)."""
    dcfg = config.detector
    info, cache, train_rows, val_rows = start_run(config, data, out, resume, overwrite, dcfg.seed)
    cuda = info.device.type == "cuda"
    if dcfg.init:  # a wrong detector.init stops the run before the CAM pass, not after it
        check_init(dcfg.init, dcfg.backbone)
    if dcfg.arch == "retinanet" and dcfg.cam_proposals_from:
        raise CxrcamError("detector.cam_proposals_from needs detector.arch=fasterrcnn: a RetinaNet has no RoI heads "
                          "for CAM proposals to train (pseudo-boxes, detector.pseudo_from, work with both)")

    # --- data: truth boxes, CAM pseudo-boxes where there are none, CAM proposals
    sup = _supervision(cache, config, info, train_rows, val_rows, Path(out), resume, progress)
    if info.is_main and progress:
        shown = ", ".join(f"{n} {k}" for k, n in sup.counts.items())
        extra = f"; CAM proposals on {len(sup.proposals)} images" if dcfg.cam_proposals_from else ""
        tqdm.write(f"detector training images: {shown} ({sup.source}){extra}")
    train_set = DetectionDataset(cache, sup.train_rows, sup.boxes, sup.pseudo, dcfg.pseudo_weight,
                                 box_transforms(config.augment) if dcfg.augment else None)
    val_set = DetectionDataset(cache, val_rows, sup.boxes)
    no_boxes = np.zeros((0, 4), np.float32)
    proposals = [torch.from_numpy(sup.proposals.get(i, no_boxes)) for i in train_set.images["image_id"]]
    per_rank_batch = max(1, dcfg.batch_size // info.world_size)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=dcfg.seed)
    val_loader = DataLoader(val_set, batch_size=per_rank_batch, num_workers=dcfg.workers, collate_fn=_collate)

    def epoch_loader(epoch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        return DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=dcfg.workers,
                          collate_fn=_collate, pin_memory=cuda)

    # --- model, loss, optimiser, schedule
    classes = list(cache.schema.findings)
    anchors = None
    if dcfg.arch == "retinanet":  # sized from the boxes it trains on (cache frame), recorded in the checkpoint
        anchors = anchor_sizes(np.concatenate([t["boxes"].numpy() for t in train_set.targets] or [np.zeros((0, 4))]))
    model = create_detector(dcfg.backbone, len(classes), cache.size, dcfg.init or None, dcfg.trainable_layers,
                            dcfg.score_thresh, dcfg.detections_per_img, dcfg.rois_per_image,
                            channels=dcfg.channels, head_size=dcfg.head_size, arch=dcfg.arch, anchors=anchors,
                            global_head=dcfg.global_head, retinanet_head=dcfg.retinanet_head).to(info.device)
    raw_model = model
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[info.local_rank] if cuda else None)

    def batch_loss(batch) -> tuple[dict[str, torch.Tensor], int]:
        x, targets, idx = batch
        targets = [{k: v.to(info.device) for k, v in t.items()} for t in targets]
        cam = ([jitter_boxes(proposals[i], dcfg.proposal_jitter, cache.size) for i in idx]
               if dcfg.cam_proposals_from else None)
        return model(to_detector_input(torch.stack(x).to(info.device)), targets, cam_boxes=cam), len(x)

    optimizer = detector_optimizer(model, dcfg)
    steps_per_epoch = max(1, math.ceil(len(sampler) / per_rank_batch))

    def lr_factor(step: int) -> float:  # linear warm-up, then step decay by epoch
        warm = min(1.0, (step + 1) / dcfg.warmup_iters) if dcfg.warmup_iters > 0 else 1.0
        return warm * dcfg.gamma ** ((step // steps_per_epoch) // max(1, dcfg.step_size))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    meta = {"backbone": dcfg.backbone, "output_stride": raw_model.output_stride, "classes": classes, "anchors": anchors,
            "schema": cache.schema.name,
            "input_size": cache.size, "truth": sup.source, "config": config_to_dict(config),
            "train_images": train_set.images["image_id"].tolist()}
    # --resume refuses another
    arch = dcfg.backbone if dcfg.arch == "fasterrcnn" else f"{dcfg.arch} ({dcfg.retinanet_head} head) {dcfg.backbone}"
    run = Run("detector", arch, model, raw_model, optimizer, scheduler, epoch_loader, batch_loss,
              _validation(raw_model, val_loader, val_set, sup.boxes, config.eval.iou_thr, info), "val_map", dcfg.epochs,
              dcfg.amp, 0.0, "detector.lr", meta,
              {"loss": "train_loss", f"val mAP@{config.eval.iou_thr}": "val_map"})
    metrics = fit(run, out, info, resume, progress)
    # the RSNA recipe's NMS sweep and box scale, chosen with the best epoch's weights (rank 0 alone: fit has
    # closed the process group)
    if info.is_main and metrics:
        best, _ = load_detector(Path(out) / "best.pt", info.device)
        raw, cap = raw_detections(best, val_loader, val_set, info.device)
        chosen = choose_postprocess(raw, cap, val_set, sup.boxes, cache.schema, config.eval.iou_thr)
        if dcfg.init and chosen["metric"] != "none":  # the 2-class filter for these boxes, by the init's p_normal
            chosen["filter"] = choose_detector_filter(raw, cap, val_set, sup.boxes, cache, dcfg.init, chosen,
                                                      config.eval.iou_thr, info.device, config.boxes.normal_score,
                                                      config.refine.top_k)
        _record_postprocess(Path(out), chosen)
        if progress and chosen["metric"] != "none":
            floor = f", minimum score {chosen['min_score']}" if chosen["min_score"] else ""
            tqdm.write(f"post-processing chosen on the validation fold: NMS IoU {chosen['nms']}, box scale "
                       f"{chosen['scale']}{floor} ({chosen['metric']} {chosen['value']:.3f}; NMS 0.5, scale 1: "
                       f"{chosen['default_value']:.3f})")
            if "filter" in chosen:
                f = chosen["filter"]
                tqdm.write(f"2-class filter for its boxes: low {f['low']:g}, high {f['high']:g} ({f['why']})")
    return metrics


__all__ = ["train_detector", "detect", "DetectionDataset", "jitter_boxes", "box_transforms"]
