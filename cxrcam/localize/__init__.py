"""``cxrcam localize``: classifier heat maps -> boxes, pictures, ``bb_results.csv``, ``submission.csv``.

``run.py`` is the loop (input -> batches -> outputs), ``step.py`` what happens to one batch
(maps, boxes, optional refinement, peaks), ``write.py`` the pictures and tables.

``cxrcam refine`` is this same loop with one more step per batch: the CAM boxes go to a
Faster R-CNN's RoI heads as extra proposals (:mod:`cxrcam.detection.refine`), and its
detections replace them in ``submission.csv`` (the CAM boxes go to ``cam_submission.csv``).
"""
from cxrcam.localize.run import localize
from cxrcam.localize.write import LocalizeSummary

__all__ = ["localize", "LocalizeSummary"]
