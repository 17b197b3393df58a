"""The optional second stage: torchvision Faster R-CNN refining CAM proposals."""
from cxrcam.detection.model import TimmFPN, create_detector, load_detector, to_detector_input

__all__ = ["create_detector", "load_detector", "to_detector_input", "TimmFPN"]
