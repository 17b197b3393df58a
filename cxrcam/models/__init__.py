"""Models: one factory in front of every timm backbone."""
from cxrcam.models.factory import (IMAGENET_MEAN, IMAGENET_STD, Classifier, channel_stats, create_classifier,
                                   grey_to_channels, load_classifier, stride_kwargs)

__all__ = ["Classifier", "create_classifier", "load_classifier", "grey_to_channels", "channel_stats", "stride_kwargs",
           "IMAGENET_MEAN", "IMAGENET_STD"]
