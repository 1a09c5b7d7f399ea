"""The patch stage's CNN (:mod:`ctguard.patches`): a small 2D network on a candidate's native patch."""

from __future__ import annotations

import torch
from torch import nn

from ctguard.patches import CHANNELS, CROP


class PatchNet(nn.Module):
    """Input ``(n, CHANNELS, y, x)`` patches; output ``(n, 3)`` logits genuine, injected, removed.
    Four stages of 3x3 convolutions (32, 64, 96, 128 channels, three poolings), then the mean and
    the maximum of the last map into a small head."""

    def __init__(self, channels: int = CHANNELS):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(channels, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64), nn.MaxPool2d(2),
                                  block(64, 96), nn.MaxPool2d(2), block(96, 128))
        self.head = nn.Sequential(nn.Linear(256, 64), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


def export_onnx(net: PatchNet, path) -> None:
    """The CNN as ONNX (opset 17, any number of patches), input ``patches``, output ``logits``."""
    torch.onnx.export(net.eval(), (torch.zeros(1, CHANNELS, CROP, CROP),), str(path), input_names=["patches"], output_names=["logits"],
                      opset_version=17, dynamo=False, dynamic_axes={"patches": {0: "n"}, "logits": {0: "n"}})
