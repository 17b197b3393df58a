"""Box geometry shared by every stage."""
from cxrcam.boxes.convert import scale_boxes, xywh_to_xyxy, xyxy_to_xywh

__all__ = ["scale_boxes", "xywh_to_xyxy", "xyxy_to_xywh"]
