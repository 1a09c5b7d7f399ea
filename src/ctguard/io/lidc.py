"""LIDC-IDRI annotation XML (``LidcReadMessage``): every reader's outline of every nodule.

Each ``readingSession`` is one radiologist; each of its ``unblindedReadNodule`` elements with an
outline (nodules of 3 mm or more) has one ``roi`` per slice: the pixels of its edge
(``edgeMap``) on the slice named by ``imageSOP_UID`` (or ``imageZposition``), and whether the region
is part of the nodule (``inclusion`` TRUE) or a hole cut out of it (FALSE). A reader's rois make
one mask; the readers' masks that overlap are one nodule, whose outline is their union (as the
``nodules.nrrd`` label maps of ``../shared/data/lidc-idri`` are made). Small nodules marked by a
point and non-nodules are not outlines and are left out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from matplotlib.path import Path as Polygon
from scipy import ndimage

from ctguard.errors import InputError
from ctguard.volume import Volume


def is_lidc_xml(path: str | Path) -> bool:
    """Whether a file is an LIDC read message (by its root element, without parsing it all)."""
    try:
        for _, elem in ET.iterparse(str(path), events=("start",)):
            return elem.tag.split("}")[-1] == "LidcReadMessage"
    except (ET.ParseError, OSError):
        return False
    return False


def _text(elem, name: str) -> str | None:
    found = elem.find(f"{{*}}{name}")
    return None if found is None or found.text is None else found.text.strip()


def reader_masks(vol: Volume, path: str | Path) -> list[tuple[int, np.ndarray]]:
    """Every outlined nodule of every reader as ``(reader index, mask on the scan's grid)``.

    Raises:
        InputError: not an LIDC read message, of another series, or naming slices the scan lacks.
    """
    try:
        root = ET.parse(str(path)).getroot()
    except (ET.ParseError, OSError) as e:
        raise InputError(f"cannot read LIDC XML ({e})", path) from None
    if root.tag.split("}")[-1] != "LidcReadMessage":
        raise InputError("not an LIDC annotation file (no LidcReadMessage)", path)
    header = root.find("{*}ResponseHeader")
    series = _text(header, "SeriesInstanceUid") if header is not None else None
    own = vol.meta.get("series_uid")
    if series and own and series != own:
        raise InputError(f"annotates series {series}, not this scan's {own}", path)
    uids = {u: z for z, u in enumerate(vol.meta.get("sop_instance_uids") or [])}
    z_mm = _slice_positions(vol)
    out = []
    for reader, session in enumerate(root.iterfind(".//{*}readingSession")):
        for nodule in session.iterfind("{*}unblindedReadNodule"):
            mask = np.zeros(vol.shape, dtype=bool)
            holes = np.zeros(vol.shape, dtype=bool)
            for roi in nodule.iterfind("{*}roi"):
                pts = [(int(float(_text(e, "xCoord"))), int(float(_text(e, "yCoord")))) for e in roi.iterfind("{*}edgeMap")]
                if len(pts) < 3:
                    continue  # a point: a nodule under 3 mm, not outlined
                z = _slice_of(roi, uids, z_mm, path)
                region = outline_to_region(pts, vol.shape[1:])
                (mask if (_text(roi, "inclusion") or "TRUE").upper() == "TRUE" else holes)[z] |= region
            mask &= ~holes
            if mask.any():
                out.append((reader, mask))
    return out


def outline_to_region(points: list[tuple[float, float]], shape: tuple[int, int], include_outline: bool = True) -> np.ndarray:
    """The pixels inside a closed outline through pixel positions ``(x, y)``; with ``include_outline``
    the outline's own pixels too (LIDC's edge maps are the nodule's boundary pixels)."""
    xy = np.asarray(points, dtype=float)
    region = np.zeros(shape, dtype=bool)
    x0, y0 = np.maximum(np.floor(xy.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(xy.max(0)).astype(int), [shape[1] - 1, shape[0] - 1])
    yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    inside = Polygon(xy).contains_points(np.column_stack([xx.ravel(), yy.ravel()])).reshape(xx.shape)
    region[y0 : y1 + 1, x0 : x1 + 1] = inside
    if not include_outline:
        return region
    ok = (xy[:, 0] >= 0) & (xy[:, 0] < shape[1]) & (xy[:, 1] >= 0) & (xy[:, 1] < shape[0])
    region[xy[ok, 1].astype(int), xy[ok, 0].astype(int)] = True
    return region


def _slice_positions(vol: Volume) -> np.ndarray:
    """Each slice's position along the patient's z axis (mm), as ``imageZposition`` gives it."""
    idx = np.zeros((vol.shape[0], 3))
    idx[:, 0] = np.arange(vol.shape[0])
    return np.array([vol.voxel_to_world(v)[2] for v in idx])


def _slice_of(roi, uids: dict[str, int], z_mm: np.ndarray, path) -> int:
    uid = _text(roi, "imageSOP_UID")
    if uid in uids:
        return uids[uid]
    z = _text(roi, "imageZposition")
    if z is not None:
        k = int(np.argmin(np.abs(z_mm - float(z))))
        if abs(z_mm[k] - float(z)) < 0.1:
            return k
    raise InputError(f"outlines a slice this scan does not have (SOP {uid}, z {z} mm)", path)


def nodules(vol: Volume, path: str | Path) -> list[np.ndarray]:
    """The nodules of an LIDC read message: the readers' outlines grouped by overlap (two
    readers' outlines that share a voxel, or lie within 2 mm, are one nodule), each the union of
    its outlines; largest first."""
    masks = [m for _, m in reader_masks(vol, path)]
    if not masks:
        return []
    near = np.maximum(np.rint(2.0 / np.asarray(vol.spacing)).astype(int), 1)
    boxes = [ndimage.find_objects(m.astype(np.uint8))[0] for m in masks]
    group = list(range(len(masks)))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    def touch(i: int, j: int) -> bool:
        lo = [max(a.start, b.start) - n for a, b, n in zip(boxes[i], boxes[j], near)]
        hi = [min(a.stop, b.stop) + n for a, b, n in zip(boxes[i], boxes[j], near)]
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            return False  # boxes more than 2 mm apart
        box = tuple(slice(max(a, 0), b) for a, b in zip(lo, hi))
        grown = ndimage.binary_dilation(masks[i][box], structure=np.ones(tuple(2 * near + 1), bool))
        return bool((grown & masks[j][box]).any())

    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            if find(i) != find(j) and touch(i, j):
                group[find(i)] = find(j)
    unions: dict[int, np.ndarray] = {}
    for i, m in enumerate(masks):
        r = find(i)
        unions[r] = unions[r] | m if r in unions else m.copy()
    return sorted(unions.values(), key=lambda m: -int(m.sum()))
