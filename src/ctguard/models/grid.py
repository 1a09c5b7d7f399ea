"""What every tamper detector shares, without PyTorch: its classes, its output grid and how HU are
scaled for it. Screening imports only this, so it runs on onnxruntime where torch is not installed."""

from __future__ import annotations

import numpy as np

CLASSES = ("genuine", "injected", "removed")
STRIDE = 8  # mm between output cells: the input is at 1 mm and the networks stride by 2 three times
HU_LOW, HU_HIGH = -1100.0, 500.0


HU_MID = (HU_LOW + HU_HIGH) / 2
HU_HALF = (HU_HIGH - HU_LOW) / 2


def normalise_array(hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """HU -> about [-1, 1] over the range that matters for lung (air to soft tissue and a bit more);
    into ``out`` (which may be ``hu`` itself, a float array) to spare a whole block's copies."""
    x = np.clip(hu, HU_LOW, HU_HIGH, out=out)
    x -= HU_MID
    x /= HU_HALF
    return x


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Class probabilities from logits along ``axis``."""
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
