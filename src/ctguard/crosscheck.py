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

Only series of one frame of reference are compared; a pair whose lungs do not correlate
(:data:`SAME_ACQUISITION`) is not one acquisition's. Two series on other grids (thin and thick
slices, another field of view, an axial series and its coronal or sagittal reformat) are compared
on the coarser one's (:func:`onto`): each of its slices against the mean of the finer series over
its thickness, at its pixels. An oblique reformat is not compared.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from scipy import ndimage

from ctguard.volume import Volume, turned

BAND_MM = (0.7, 2.0)  # the band of the noise compared: Gaussians of these sigmas in-plane, one less the other
WINDOW_MM = 8.0  # the in-plane side of the window the correlation is taken over
WINDOW_Z_MM = 4.0  # and its depth (at least one slice)
SAME_ACQUISITION = 0.6  # under this median correlation over the lungs, two series are not one acquisition's
DISAGREE_BELOW = 0.3  # a place of the lungs where the two correlate less disagrees
MIN_REGION_MM3 = 50.0  # the least lung a disagreement covers (a ball of 4.6 mm across)
EDGE_VOXELS = 2  # the lungs' rim (in-plane voxels) left out: the window there holds chest wall
GROUP_MM = 2.0  # parts of a disagreement up to twice this far apart in-plane are one place
SOLID_HU = -300.0  # a place solid in both series (a vessel, or soft tissue a lung mask took in) is not compared
SLAB = 32  # slices correlated at once (memory)


OBLIQUE = "an oblique reformat (its axes are not the other series' axes)"
MIN_COVERED = 0.9  # a slice of the coarser series is compared where the finer covers this much of its thickness


def comparable(a: Volume, b: Volume) -> str | None:
    """Why ``a`` and ``b`` cannot be cross-checked, or None where they can: DICOM series of one
    frame of reference, on one voxel grid or not, with the same axes or the same in another order
    (an axial series and its coronal or sagittal reformat; :func:`onto`)."""
    frame_a, frame_b = a.meta.get("frame_of_reference_uid"), b.meta.get("frame_of_reference_uid")
    if not frame_a or frame_a != frame_b:
        return "another frame of reference"
    if turned(b, a.direction) is None:
        return OBLIQUE
    return None


def same_grid(a: Volume, b: Volume) -> bool:
    return a.shape == b.shape and np.allclose(a.spacing, b.spacing, atol=1e-3) and np.allclose(a.origin, b.origin, atol=0.01) \
        and np.allclose(a.direction, b.direction, atol=1e-3)


def thickness(v: Volume) -> float:
    """A series' slice thickness (DICOM SliceThickness where it was read), else its slice spacing."""
    return float(v.meta.get("slice_thickness") or v.spacing[0])


def coarser(a: Volume, b: Volume) -> bool:
    """Whether ``a``'s grid is the coarser of the two (thicker slices; or, as thick, larger
    pixels): the grid a pair is compared on."""
    return (thickness(a), a.spacing[1] * a.spacing[2]) >= (thickness(b), b.spacing[1] * b.spacing[2])


def onto(src: Volume, dst: Volume, data: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``src``'s voxels (or ``data``, an array on ``src``'s grid) on ``dst``'s grid: each slice of
    ``dst`` the mean of ``src``'s slices over its thickness (weighted by how much of each falls in
    it), at ``dst``'s pixel centres (linear interpolation in-plane); and which voxels of ``dst``
    ``src`` covers (:data:`MIN_COVERED` of the slice's thickness, inside ``src``'s field of view).
    Where ``dst`` is a reformat of ``src`` (its axes in another order), ``src``'s voxels are
    taken along ``dst``'s axes first. The model: a thick slice, or a reformat's slab, of an
    acquisition is about the mean of its thin slices."""
    x = src.hu if data is None else data
    if not np.allclose(src.direction, dst.direction, atol=1e-3):  # a reformat: src's voxels along dst's axes
        src, turn = turned(src, dst.direction)
        x = turn.forward(x)
    normal = np.asarray(dst.direction)[:, 2]
    q = float(np.dot(src.origin, normal)) + np.arange(src.shape[0]) * src.spacing[0]  # src slices along the normal
    p = float(np.dot(dst.origin, normal)) + np.arange(dst.shape[0]) * dst.spacing[0]
    half_t, half_s = thickness(dst) / 2, src.spacing[0] / 2
    w = np.clip(np.minimum(p[:, None] + half_t, q[None, :] + half_s) - np.maximum(p[:, None] - half_t, q[None, :] - half_s), 0, None)
    covered_z = w.sum(axis=1) >= MIN_COVERED * 2 * half_t
    step = (dst.spacing[1] / src.spacing[1], dst.spacing[2] / src.spacing[2])
    offset = (np.asarray(dst.origin) - np.asarray(src.origin)) @ np.asarray(dst.direction)  # (x, y, z) in mm, dst's axes
    start = (offset[1] / src.spacing[1], offset[0] / src.spacing[2])
    same_plane = np.allclose(step, 1, atol=1e-4) and np.allclose(start, 0, atol=1e-3) and src.shape[1:] == dst.shape[1:]
    out = np.full(dst.shape, np.nan, np.float32)
    for k in np.flatnonzero(covered_z):
        j = np.flatnonzero(w[k])
        mean = np.tensordot(w[k, j] / w[k, j].sum(), x[j].astype(np.float32), axes=1)
        out[k] = mean if same_plane else ndimage.affine_transform(mean, step, offset=start, output_shape=dst.shape[1:], order=1,
                                                                  cval=np.nan)
    return out, ~np.isnan(out)


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
    if same_grid(a, b):
        grid, x, y, lung = a, a.hu, b.hu, lungs
    else:  # compared on the coarser grid: the finer series (and the lungs) brought onto it
        grid = a if coarser(a, b) else b
        (x, cover_a), (y, cover_b) = (onto(v, grid) if v is not grid else (v.hu, np.ones(v.shape, bool)) for v in (a, b))
        lung = (lungs if grid is a else onto(a, grid, lungs.astype(np.float32))[0] > 0.5) & cover_a & cover_b
        x, y = np.nan_to_num(x, nan=-1000.0), np.nan_to_num(y, nan=-1000.0)
    found = _disagreements(grid, x, y, lung)
    if grid is not a:  # places of the series screened
        for d in found["disagreements"]:
            d["voxel"] = [round(float(v), 1) for v in a.voxel_within(d["world_mm"])]
    return found


def _disagreements(grid: Volume, a: np.ndarray, b: np.ndarray, lungs: np.ndarray) -> dict[str, Any]:
    """:func:`cross_check` on one grid (``grid``'s): ``a`` and ``b`` HU arrays of its shape,
    ``lungs`` the lungs to compare."""
    spacing = np.asarray(grid.spacing, float)
    zs, ys, xs = (np.flatnonzero(lungs.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    if not len(zs):
        return {"correlation": None, "disagreements": [], "skipped": "no lungs to compare"}
    margin = (0, int(WINDOW_MM / spacing[1]) + 1, int(WINDOW_MM / spacing[2]) + 1)
    box = tuple(slice(max(int(i[0]) - m, 0), min(int(i[-1]) + m + 1, n)) for i, m, n in zip((zs, ys, xs), margin, a.shape))
    lung = lungs[box]
    r, support = noise_correlation(a[box], b[box], spacing, lung)
    rim = np.zeros((1, 3, 3), bool)
    rim[0, 1, :] = rim[0, :, 1] = True  # in-plane: thick slices would lose whole slices to a 3D erosion
    inner = ndimage.binary_erosion(lung, rim, iterations=EDGE_VOXELS) & (support > 0.8)
    smooth = (0.0, 1.0 / spacing[1], 1.0 / spacing[2])
    inner &= ~((ndimage.gaussian_filter(a[box], smooth) > SOLID_HU) & (ndimage.gaussian_filter(b[box], smooth) > SOLID_HU))
    if not inner.any():
        return {"correlation": None, "disagreements": [], "skipped": "no lungs to compare"}
    median = round(float(np.median(r[inner])), 3)
    if median < SAME_ACQUISITION:
        return {"correlation": median, "disagreements": [],
                "skipped": f"their noise does not correlate over the lungs ({median:.2f}): not two reconstructions of one acquisition"}
    low = (r < DISAGREE_BELOW) & inner
    # One place: parts of one edit a few millimetres apart (a vessel between them) are grouped.
    reach = (0, max(int(round(GROUP_MM / spacing[1])), 1), max(int(round(GROUP_MM / spacing[2])), 1))
    grouped, _ = ndimage.label(ndimage.binary_dilation(low, np.ones([2 * h + 1 for h in reach], bool)) if low.any() else low)
    labels = np.where(low, grouped, 0)
    voxel_mm3 = float(np.prod(spacing))
    out = []
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[where] == k
        volume = float(region.sum()) * voxel_mm3
        if volume < MIN_REGION_MM3:
            continue
        sub = tuple(slice(s.start + o.start, s.stop + o.start) for s, o in zip(where, box))
        diff = ndimage.gaussian_filter(a[sub].astype(np.float32), smooth) - ndimage.gaussian_filter(b[sub].astype(np.float32), smooth)
        centre = np.argwhere(region).mean(axis=0) + [s.start for s in sub]
        out.append({"voxel": [round(float(v), 1) for v in centre], "world_mm": [round(float(v), 2) for v in grid.voxel_to_world(centre)],
                    "volume_mm3": round(volume), "diameter_mm": round(float(2 * (3 * volume / (4 * np.pi)) ** (1 / 3)), 1),
                    "correlation": round(float(r[where][region].min()), 3), "hu_difference": round(float(diff[region].mean()))})
    return {"correlation": median, "disagreements": sorted(out, key=lambda d: -d["volume_mm3"])}


def seen_from_the_other(check: dict[str, Any], series_uid: str, description: str | None, other: Volume) -> dict[str, Any]:
    """A cross-check entry of a screening result (``check``, of series ``A`` against ``other``) as
    ``other``'s own result would give it, against ``A`` (``series_uid``, ``description``): its places
    on ``other``'s voxels, the difference in density and the detector's scores the other way round."""
    flipped = []
    for d in check["disagreements"]:
        e = {**d, "voxel": [round(float(v), 1) for v in other.voxel_within(d["world_mm"])], "hu_difference": -d["hu_difference"]}
        if d.get("scores"):
            e["scores"] = {"this": d["scores"]["other"], "other": d["scores"]["this"]}
        flipped.append(e)
    return {**check, "series_uid": series_uid, "description": description, "disagreements": flipped}


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
