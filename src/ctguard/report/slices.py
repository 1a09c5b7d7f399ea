"""Axial slices with the tamper heatmap overlaid, for scrolling through a screened scan (web page).

:func:`save_viewer` keeps the scan in a lung window and the heatmap as two uint8 ``.npy`` files
(memory-mapped when read back, so a 300-slice scan costs no RAM per request); :func:`render_slice`
draws one slice as PNG.
"""

from __future__ import annotations

import io as _io
import json
from pathlib import Path

import numpy as np

from ctguard.report.html import LUNG_WINDOW

OVERLAY_FROM = 0.2  # heat below this is not drawn


def save_viewer(vol, heat_vox: np.ndarray, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = LUNG_WINDOW
    np.save(out / "ct.npy", np.rint(np.clip((vol.hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))
    np.save(out / "heat.npy", np.rint(np.clip(heat_vox, 0, 1) * 255).astype(np.uint8))
    (out / "viewer.json").write_text(json.dumps({"shape": list(vol.shape), "spacing_mm": [float(s) for s in vol.spacing]}) + "\n")
    return out


def viewer_shape(viewer_dir: str | Path) -> tuple[int, int, int]:
    return tuple(json.loads((Path(viewer_dir) / "viewer.json").read_text())["shape"])


def render_slice(viewer_dir: str | Path, z: int, overlay: bool = True) -> bytes:
    """Slice ``z`` as PNG: the lung-window image, the heatmap in red-to-yellow over it.

    Raises:
        IndexError: ``z`` outside the scan.
    """
    from PIL import Image

    d = Path(viewer_dir)
    ct = np.load(d / "ct.npy", mmap_mode="r")
    if not 0 <= z < ct.shape[0]:
        raise IndexError(f"slice {z} outside 0..{ct.shape[0] - 1}")
    g = np.asarray(ct[z], np.float32)
    rgb = np.stack([g, g, g], -1)
    if overlay:
        h = np.asarray(np.load(d / "heat.npy", mmap_mode="r")[z], np.float32) / 255.0
        alpha = np.clip((h - OVERLAY_FROM) / (1 - OVERLAY_FROM), 0, 1)[..., None] * 0.6
        colour = np.stack([np.full_like(h, 255.0), 255.0 * np.clip((h - 0.5) * 2, 0, 1), np.zeros_like(h)], -1)  # red -> yellow
        rgb = rgb * (1 - alpha) + colour * alpha
    buf = _io.BytesIO()
    Image.fromarray(np.rint(rgb).astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
