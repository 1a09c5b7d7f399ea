"""The second stage's second look: a small CNN on each candidate's patch at the scan's own voxels.

The trees of :mod:`ctguard.verifier` read hand-made radial profiles around a place. Beside them, a
stage fitted with ``verifier_patches`` keeps a small 2D CNN that reads the place itself: five
slices of 48 x 48 pixels around it on the scan's own grid, as HU and as the in-plane and
through-plane high-pass residuals divided by the scan's own noise (so a sharp and a smooth kernel
read alike). The CNN sees the central 40 x 40 pixels (shifted by up to 4 pixels, flipped and
turned while it trains). Its probabilities are averaged with the trees' (``patch_weight`` in the
stage's meta). It runs on onnxruntime, as the network does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ctguard.errors import InputError
from ctguard.volume import Volume

SIZE, SLICES, CROP = 48, 5, 40  # a patch's pixels and slices as kept; the pixels the CNN reads
CHANNELS = 3 * SLICES  # HU, in-plane residual, through-plane residual, each on SLICES slices
_MARGIN = 4  # pixels read beyond the patch so that its residuals are those of the whole scan


def patches_at(vol: Volume, places: np.ndarray, noise: tuple[float, float]) -> np.ndarray:
    """``(n, CHANNELS, SIZE, SIZE)`` float16 patches around ``places`` (voxels ``(z, y, x)``): HU /
    400 (clipped to -1100..600) and the in-plane and through-plane residuals divided by the scan's
    noise ``noise`` (:func:`ctguard.verifier.scan_noise`), clipped to +-8; a patch past the scan's
    edge repeats its edge."""
    places = np.asarray(places, float).reshape(-1, 3)
    out = np.zeros((len(places), 3, SLICES, SIZE, SIZE), np.float16)
    shape = np.asarray(vol.hu.shape)
    half = SIZE // 2 + _MARGIN
    crop = (slice(1, 1 + SLICES), slice(_MARGIN, _MARGIN + SIZE), slice(_MARGIN, _MARGIN + SIZE))
    for k, p in enumerate(np.clip(np.rint(places).astype(int), 0, shape - 1)):
        zi = np.clip(p[0] + np.arange(-(SLICES // 2) - 1, SLICES // 2 + 2), 0, shape[0] - 1)  # a slice more each way
        yi = np.clip(p[1] + np.arange(-half, half), 0, shape[1] - 1)
        xi = np.clip(p[2] + np.arange(-half, half), 0, shape[2] - 1)
        sub = vol.hu[np.ix_(zi, yi, xi)].astype(np.float32)
        r_xy = (sub - ndimage.gaussian_filter(sub, (0.0, 1.0, 1.0), mode="nearest")) / max(float(noise[0]), 1e-3)
        r_z = (sub - ndimage.gaussian_filter1d(sub, 1.0, axis=0, mode="nearest")) / max(float(noise[1]), 1e-3)
        out[k, 0] = np.clip(sub[crop], -1100.0, 600.0) / 400.0
        out[k, 1] = np.clip(r_xy[crop], -8.0, 8.0)
        out[k, 2] = np.clip(r_z[crop], -8.0, 8.0)
    return out.reshape(len(places), CHANNELS, SIZE, SIZE)


def centre_crop(patches: np.ndarray) -> np.ndarray:
    """The central ``CROP`` x ``CROP`` pixels of ``patches``, float32: what the CNN reads at screening."""
    c = (SIZE - CROP) // 2
    return np.ascontiguousarray(patches[:, :, c:c + CROP, c:c + CROP], dtype=np.float32)


class PatchScorer:
    """The CNN's ONNX export on onnxruntime: ``(n, 3)`` probabilities genuine, injected, removed."""

    def __init__(self, path: str | Path):
        from ctguard.screen import _onnx_session

        self.path = Path(path)
        self.session = _onnx_session(self.path)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "patches" or inputs[0].shape[1:] != [CHANNELS, CROP, CROP]:
            raise InputError(f"not a ctguard patch stage (its input is not patches of {CHANNELS} x {CROP} x {CROP})", self.path)

    def probabilities(self, patches: np.ndarray) -> np.ndarray:
        if not len(patches):
            return np.zeros((0, 3), np.float32)
        logits = self.session.run(None, {"patches": centre_crop(patches)})[0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
