"""Maps of several checkpoints as one: ``predict``, ``localize``, ``refine`` and ``calibrate`` given
several classifiers.

CheXlocalize (Saporta et al. 2022) found maps averaged over an ensemble of checkpoints localised
better than one checkpoint's. Here each member runs its forward pass; the image's plan is made
on the members' mean probabilities; each member cuts the maps of the same (image, target) pairs,
and their scaled maps are averaged and min-max scaled again (as fused target layers are,
:func:`~cxrcam.cam.base.scale_cams`), so a threshold means the same on one checkpoint's maps as
on an ensemble's.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from cxrcam.cam.base import BaseCAM, PairMaps, scale_cams


class EnsembleCAM:
    """Several engines (one per checkpoint, the same method and layer) behind :meth:`BaseCAM.pairs`."""

    def __init__(self, members: Sequence[BaseCAM]):
        self.members = list(members)
        self.method = self.members[0].method

    @property
    def target_name(self) -> str:
        return self.members[0].target_name

    def pairs(self, images: torch.Tensor, plan: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> PairMaps:
        """As :meth:`BaseCAM.pairs`; the logits handed to ``plan`` (and returned) are those whose
        sigmoid is the members' mean probability."""
        device = self.members[0].device
        images = images.to(device)
        with torch.autocast(device.type, enabled=False):
            member_logits = [m.forward(images.float()) for m in self.members]
            probs = torch.stack([torch.sigmoid(x) for x in member_logits]).mean(0)
            logits = torch.logit(probs.clamp(1e-7, 1 - 1e-7))
            targets = list(plan(logits))
            outs = [m.pair_maps(images, x, targets) for m, x in zip(self.members, member_logits)]
        if not len(outs[0].images):
            return PairMaps(outs[0].maps, [], logits)
        mean = torch.stack([o.maps for o in outs]).mean(0)
        return PairMaps(scale_cams(mean[:, None], tuple(mean.shape[-2:]))[:, 0], outs[0].images, logits)


__all__ = ["EnsembleCAM"]
