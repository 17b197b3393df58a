"""Models: one factory in front of every timm backbone."""
from cxrcam.models.factory import Classifier, create_classifier, load_classifier

__all__ = ["Classifier", "create_classifier", "load_classifier"]
