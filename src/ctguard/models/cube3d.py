"""The 3D tamper detector: a small fully convolutional network on 1 mm isotropic CT.

It maps a block of lung at 1 mm to a heatmap of three classes (genuine, injected, removed) at a
stride of 8 mm, with a receptive field of about 60 mm, enough to see a 30 mm nodule and the
ring that blending leaves around it. Early striding keeps a whole-lung pass cheap on a CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ctguard.models.grid import CLASSES, HU_HALF, HU_HIGH, HU_LOW, HU_MID, STRIDE, normalise_array

__all__ = ["CLASSES", "STRIDE", "TamperEnsemble3D", "TamperNet3D", "build", "normalise"]


def normalise(hu: np.ndarray | torch.Tensor):
    """HU -> about [-1, 1] over the range that matters for lung (air to soft tissue and a bit more)."""
    if isinstance(hu, torch.Tensor):
        return (hu.clamp(HU_LOW, HU_HIGH) - HU_MID) / HU_HALF
    return normalise_array(hu)


class TamperNet3D(nn.Module):
    """Input ``(n, 1, z, y, x)`` normalised HU at 1 mm; output logits ``(n, 3, z/8, y/8, x/8)``."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout, stride=1, dilation=1):
            return nn.Sequential(
                nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(1, w, stride=2),
            block(w, 2 * w, stride=2),
            block(2 * w, 3 * w, stride=2),
            block(3 * w, 4 * w),
            block(4 * w, 4 * w, dilation=2),
        )
        self.head = nn.Conv3d(4 * w, len(CLASSES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TamperEnsemble3D(nn.Module):
    """Several detectors on the same input whose class probabilities are averaged. Its outputs are
    the log of the mean probabilities, so a softmax of them gives that mean: screening, ONNX export
    and thresholds treat it as one network."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([m(x).softmax(1) for m in self.members]).mean(0)
        return p.clamp_min(1e-12).log()


def build(cfg: dict) -> nn.Module:
    """The network a checkpoint's config describes: one detector of ``width``, or with ``members``
    (a list of member configs) their ensemble."""
    if cfg.get("members"):
        return TamperEnsemble3D([build(m) for m in cfg["members"]])
    return TamperNet3D(int(cfg.get("width", 16)))
