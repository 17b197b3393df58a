"""Class activation maps for every class of a batch.

``compute_cams(model, images)`` is the one-call API; ``create_cam(model, method, target_layer)``
(:mod:`.factory`) builds a reusable engine whose call returns scaled maps and logits for chosen
classes: the closed form (:mod:`.closed_form`), the gradient engine (:mod:`.gradients`) or
pytorch-grad-cam (:mod:`.library`), each overriding one function of :class:`BaseCAM`
(:mod:`.base`); the methods' formulas are in :mod:`.methods`. :mod:`.checkpoint` is the map pass
the stages share: a classifier checkpoint with its calibration, streamed over images.
"""
from cxrcam.cam.base import (BaseCAM, CamOutput, Classes, PairMaps, map_name, parse_layers, parse_map, probe,
                              resolve_layer, scale_cams, target_weights)
from cxrcam.cam.checkpoint import CheckpointMaps, MapBatch, Plan, needed_classes
from cxrcam.cam.closed_form import ClosedFormCAM
from cxrcam.cam.factory import compute_cams, create_cam
from cxrcam.cam.gradients import GradientCAM
from cxrcam.cam.library import LIBRARY_METHODS, LibraryCAM
from cxrcam.cam.methods import GRADIENT_METHODS

__all__ = ["compute_cams", "create_cam", "BaseCAM", "CamOutput", "Classes", "ClosedFormCAM", "GradientCAM",
           "LibraryCAM", "PairMaps", "target_weights", "GRADIENT_METHODS", "LIBRARY_METHODS", "probe", "scale_cams",
           "parse_layers", "parse_map",
           "map_name", "resolve_layer", "CheckpointMaps", "MapBatch", "Plan", "needed_classes"]
