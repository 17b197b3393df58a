"""Box geometry shared by every stage: format conversion, overlap, and heat map -> boxes."""
from cxrcam.boxes.convert import resize_boxes, scale_boxes, xywh_to_xyxy, xyxy_to_xywh
from cxrcam.boxes.from_cam import (BoxRules, Detections, cam_peak, cam_proposals, cam_to_boxes, components,
                                   maps_to_boxes, rate_components, score_components, select_boxes,
                                   THRESHOLD_MODES, cut_map)
from cxrcam.boxes.ops import intersection, paired_iobb, paired_iou, pairwise_iobb, pairwise_iou, points_in_boxes

__all__ = ["scale_boxes", "resize_boxes", "cut_map", "THRESHOLD_MODES", "xywh_to_xyxy", "xyxy_to_xywh", "cam_to_boxes",
           "maps_to_boxes", "select_boxes", "cam_peak",
           "cam_proposals", "Detections", "BoxRules", "components", "rate_components", "score_components",
           "intersection", "pairwise_iou", "pairwise_iobb", "paired_iou", "paired_iobb", "points_in_boxes"]
