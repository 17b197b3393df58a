"""Models: one factory in front of every timm backbone."""
from cxrcam.models.factory import (DEFAULT_MIN_PROB, IMAGENET_MEAN, IMAGENET_STD, Classifier, channel_stats,
                                   create_classifier, decision_thresholds, grey_to_channels, load_classifier,
                                   stride_kwargs)

__all__ = ["Classifier", "create_classifier", "load_classifier", "grey_to_channels", "channel_stats", "stride_kwargs",
           "decision_thresholds", "DEFAULT_MIN_PROB", "IMAGENET_MEAN", "IMAGENET_STD"]
