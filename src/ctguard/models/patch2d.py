"""The 2D tamper detector for a single slice or image: the 3D detector's design in-plane.

A small fully convolutional network on one axial slice at 1 mm: three classes (genuine, injected,
removed) every 8 mm, receptive field about 60 mm. It sees no neighbouring slices, so it is weaker
than the 3D detector; ctguard uses it only when a single slice or image is all there is.
"""

from __future__ import annotations

import torch
from torch import nn

from ctguard.models.cube3d import CLASSES, STRIDE, normalise

__all__ = ["CLASSES", "STRIDE", "TamperNet2D", "normalise"]


class TamperNet2D(nn.Module):
    """Input ``(n, 1, y, x)`` normalised HU at 1 mm; output logits ``(n, 3, y/8, x/8)``."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(cin, cout, stride=1, dilation=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(1, w), block(w, w, stride=2),
            block(w, 2 * w), block(2 * w, 2 * w, stride=2),
            block(2 * w, 3 * w, stride=2), block(3 * w, 4 * w), block(4 * w, 4 * w, dilation=2),
        )
        self.head = nn.Conv2d(4 * w, len(CLASSES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
