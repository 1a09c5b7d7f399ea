"""Cross-checking two reconstructions of one acquisition.

A scanner reconstructs one acquisition more than once: a sharp lung kernel and a smooth soft-tissue
kernel, say. Both come from the same raw data, so their noise is one noise seen through two
filters: band-passed, the two correlate all over the lungs (a median of 0.92 and 0.98 on the two
real pairs at hand, Lung-PET-CT-Dx A0001 and A0002). An edit made in one of them (CT-GAN edits
one series) puts its own voxels there, so there the two stop correlating, whatever the edit holds:
a drawn nodule, a tumour filled in, or a filled or cloned in-painting of healthy lung that leaves
the density as it was. Where the local correlation falls under :data:`DISAGREE_BELOW` over
:data:`MIN_REGION_MM3` or more of lung, the two series disagree: one of them was edited there.
Which one, the correlation cannot say; the difference in density can (a nodule in one is missing
from the other), and the detector's scores of both places can.

Only series of one frame of reference on one voxel grid (the same slices and pixels) are compared;
a pair whose lungs do not correlate (:data:`SAME_ACQUISITION`) is not one acquisition's.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from scipy import ndimage

from ctguard.volume import Volume

BAND_MM = (0.7, 2.0)  # the band of the noise compared: Gaussians of these sigmas in-plane, one less the other
WINDOW_MM = 8.0  # the in-plane side of the window the correlation is taken over
WINDOW_Z_MM = 4.0  # and its depth (at least one slice)
SAME_ACQUISITION = 0.6  # under this median correlation over the lungs, two series are not one acquisition's
DISAGREE_BELOW = 0.3  # a place of the lungs where the two correlate less disagrees
MIN_REGION_MM3 = 50.0  # the least lung a disagreement covers (a ball of 4.6 mm across)
EDGE_VOXELS = 2  # the lungs' rim (in-plane voxels) left out: the window there holds chest wall
SLAB = 32  # slices correlated at once (memory)


OTHER_GRID = "another voxel grid (slices or pixels)"


def comparable(a: Volume, b: Volume) -> str | None:
    """Why ``a`` and ``b`` cannot be cross-checked, or None where they can: DICOM series of one
    frame of reference on one voxel grid."""
    frame_a, frame_b = a.meta.get("frame_of_reference_uid"), b.meta.get("frame_of_reference_uid")
    if not frame_a or frame_a != frame_b:
        return "another frame of reference"
    if a.shape != b.shape or not np.allclose(a.spacing, b.spacing, atol=1e-3) or not np.allclose(a.origin, b.origin, atol=0.01) \
            or not np.allclose(a.direction, b.direction, atol=1e-3):
        return OTHER_GRID
    return None


def _band(hu: np.ndarray, spacing) -> np.ndarray:
    fine, coarse = ((0.0, s / spacing[1], s / spacing[2]) for s in BAND_MM)
    x = hu.astype(np.float32)
    return ndimage.gaussian_filter(x, fine) - ndimage.gaussian_filter(x, coarse)


def noise_correlation(a: np.ndarray, b: np.ndarray, spacing, lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The local correlation of the band-passed noise of ``a`` and ``b`` (HU arrays of one grid)
    over the lungs, in windows of :data:`WINDOW_MM` in-plane and :data:`WINDOW_Z_MM` deep, and the
    share of each window that is lung; both ``float32`` of ``a``'s shape (slab by slab: a whole
    scan's products at once would take gigabytes)."""
    wz = max(int(round(WINDOW_Z_MM / spacing[0])), 1)
    win = (wz, max(int(round(WINDOW_MM / spacing[1])), 1), max(int(round(WINDOW_MM / spacing[2])), 1))
    mean = partial(ndimage.uniform_filter, size=win, mode="constant")
    half = wz // 2 + 1
    r = np.zeros(a.shape, np.float32)
    support = np.zeros(a.shape, np.float32)
    for z0 in range(0, a.shape[0], SLAB):
        lo, hi = max(z0 - half, 0), min(z0 + SLAB + half, a.shape[0])
        m = lungs[lo:hi].astype(np.float32)
        x, y = _band(a[lo:hi], spacing) * m, _band(b[lo:hi], spacing) * m
        n = mean(m)
        w = np.maximum(n, 1e-6)
        mx, my = mean(x) / w, mean(y) / w
        cov = mean(x * y) / w - mx * my
        vx, vy = mean(x * x) / w - mx * mx, mean(y * y) / w - my * my
        keep = slice(z0 - lo, z0 - lo + min(SLAB, a.shape[0] - z0))
        # Clipped: where a window holds little lung, rounding can take the ratio past +-1.
        r[z0: z0 + SLAB] = np.clip(cov / np.sqrt(np.maximum(vx, 1e-6) * np.maximum(vy, 1e-6)), -1.0, 1.0)[keep]
        support[z0: z0 + SLAB] = n[keep]
    return r, support


def cross_check(a: Volume, b: Volume, lungs: np.ndarray) -> dict[str, Any]:
    """Where ``a`` (the series screened, ``lungs`` its lung mask) and ``b`` (another reconstruction
    of its acquisition) disagree: ``correlation`` (the median over the lungs),
    and ``disagreements``, largest first, each with its centre (``voxel`` of ``a``, ``world_mm``),
    its size (``volume_mm3``, ``diameter_mm`` of the ball of that volume), the lowest correlation in
    it, and ``hu_difference``: the mean of ``a`` less ``b`` there (both smoothed over 1 mm): over 0,
    ``a`` is denser there (a nodule in it, missing from ``b``). ``skipped`` says why a pair was not
    compared (:func:`comparable`, no lungs, or noise that does not correlate; then
    ``disagreements`` is empty)."""
    reason = comparable(a, b)
    if reason:
        return {"correlation": None, "disagreements": [], "skipped": reason}
    spacing = np.asarray(a.spacing, float)
    zs, ys, xs = (np.flatnonzero(lungs.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    if not len(zs):
        return {"correlation": None, "disagreements": [], "skipped": "no lungs to compare"}
    margin = (0, int(WINDOW_MM / spacing[1]) + 1, int(WINDOW_MM / spacing[2]) + 1)
    box = tuple(slice(max(int(i[0]) - m, 0), min(int(i[-1]) + m + 1, n)) for i, m, n in zip((zs, ys, xs), margin, a.shape))
    lung = lungs[box]
    r, support = noise_correlation(a.hu[box], b.hu[box], spacing, lung)
    rim = np.zeros((1, 3, 3), bool)
    rim[0, 1, :] = rim[0, :, 1] = True  # in-plane: thick slices would lose whole slices to a 3D erosion
    inner = ndimage.binary_erosion(lung, rim, iterations=EDGE_VOXELS) & (support > 0.8)
    if not inner.any():
        return {"correlation": None, "disagreements": [], "skipped": "no lungs to compare"}
    median = round(float(np.median(r[inner])), 3)
    if median < SAME_ACQUISITION:
        return {"correlation": median, "disagreements": [],
                "skipped": f"their noise does not correlate over the lungs ({median:.2f}): not two reconstructions of one acquisition"}
    low = (r < DISAGREE_BELOW) & inner
    labels, n = ndimage.label(low)
    voxel_mm3 = float(np.prod(spacing))
    out = []
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[where] == k
        volume = float(region.sum()) * voxel_mm3
        if volume < MIN_REGION_MM3:
            continue
        sub = tuple(slice(s.start + o.start, s.stop + o.start) for s, o in zip(where, box))
        smooth = (0.0, 1.0 / spacing[1], 1.0 / spacing[2])
        diff = ndimage.gaussian_filter(a.hu[sub].astype(np.float32), smooth) - ndimage.gaussian_filter(b.hu[sub].astype(np.float32), smooth)
        centre = np.argwhere(region).mean(axis=0) + [s.start for s in sub]
        out.append({"voxel": [round(float(v), 1) for v in centre], "world_mm": [round(float(v), 2) for v in a.voxel_to_world(centre)],
                    "volume_mm3": round(volume), "diameter_mm": round(float(2 * (3 * volume / (4 * np.pi)) ** (1 / 3)), 1),
                    "correlation": round(float(r[where][region].min()), 3), "hu_difference": round(float(diff[region].mean()))})
    return {"correlation": median, "disagreements": sorted(out, key=lambda d: -d["volume_mm3"])}


def reading(d: dict[str, Any]) -> str:
    """A disagreement in words, from the screened series' side, with the detector's scores of its
    place in both series where they are known (``scores``)."""
    if d["hu_difference"] >= 100:
        text = "denser in this series: injected here, or removed from the other"
    elif d["hu_difference"] <= -100:
        text = "less dense in this series: removed here, or injected into the other"
    else:
        text = "the same density, other noise: in-painted in one of the two"
    if d.get("scores"):
        from ctguard.screen import kind_of

        def said(p):
            return f"{1 - p[0]:.2f} ({kind_of(p[1], p[2])})"
        text += f"; the detector scores it {said(d['scores']['this'])} here, {said(d['scores']['other'])} in the other"
    return text


def cross_check_lines(result: dict[str, Any]) -> list[tuple[int, str, bool]]:
    """A screening result's cross-checks (``result["cross_check"]``) as the command line, the report
    and the web page say them: ``(level, text, alarm)``, a line for each other series (level 0) and
    one under it for each disagreement (level 1), ``alarm`` where they disagree."""
    lines = []
    for c in result.get("cross_check") or []:
        other = f"series {c['series_uid']}" + (f" ({c['description']})" if c.get("description") else "")
        if c.get("skipped"):
            lines.append((0, f"not cross-checked with {other}: {c['skipped']}", False))
        elif not c["disagreements"]:
            lines.append((0, f"cross-checked with {other}: agrees (noise correlation {c['correlation']:.2f} over the lungs)", False))
        else:
            n = len(c["disagreements"])
            lines.append((0, f"cross-checked with {other}: DISAGREES at {n} place{'s' if n > 1 else ''} (noise correlation "
                             f"{c['correlation']:.2f} over the lungs)", True))
            lines += [(1, f"at voxel (z, y, x) {d['voxel']}, world {d['world_mm']} mm, {d['diameter_mm']:.0f} mm across, correlation "
                          f"{d['correlation']:.2f}, {d['hu_difference']:+d} HU: {reading(d)}", True) for d in c["disagreements"]]
    return lines
