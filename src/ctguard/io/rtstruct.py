"""Tumour outlines from DICOM: an RT Structure Set (RTSTRUCT) or a Segmentation (SEG).

RTSTRUCT: the ROIs whose name matches a pattern (``GTV*`` by default, case-insensitive), each
contour (closed planar polygons in patient mm) rasterised on the slice it lies on of the referenced
series; contours on one slice combine even-odd, so a contour inside another is a hole.
SEG: each segment, read by highdicom on the scan's grid.
Both must reference the scan's own series or frame of reference; another one is refused by name.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np

from ctguard.errors import InputError
from ctguard.io.lidc import outline_to_region
from ctguard.volume import Volume

RTSTRUCT_UID = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"
DEFAULT_ROI = "GTV*"


def dicom_kind(path: str | Path) -> str | None:
    """``"rtstruct"`` or ``"seg"`` for a DICOM file of either kind, else None."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except Exception:
        return None
    uid = str(ds.get("SOPClassUID", ""))
    return {RTSTRUCT_UID: "rtstruct", SEG_UID: "seg"}.get(uid)


def _frame_of_reference(vol: Volume) -> str | None:
    import pydicom

    files = vol.meta.get("files") or []
    if not files:
        return None
    return str(pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["FrameOfReferenceUID"]).get("FrameOfReferenceUID", "")) or None


def rtstruct_masks(vol: Volume, path: str | Path, pattern: str = DEFAULT_ROI) -> list[tuple[str, np.ndarray]]:
    """``(ROI name, mask)`` of every ROI whose name matches ``pattern``.

    Raises:
        InputError: another series or frame of reference, no ROI matching, or a contour off the scan.
    """
    import pydicom

    ds = pydicom.dcmread(str(path))
    frames = [str(f.FrameOfReferenceUID) for f in ds.get("ReferencedFrameOfReferenceSequence", [])]
    series = [str(s.SeriesInstanceUID) for f in ds.get("ReferencedFrameOfReferenceSequence", [])
              for st in f.get("RTReferencedStudySequence", []) for s in st.get("RTReferencedSeriesSequence", [])]
    own_frame, own_series = _frame_of_reference(vol), vol.meta.get("series_uid")
    if own_series and series and own_series not in series:
        raise InputError(f"outlines series {series[0]}, not this scan's {own_series}", path)
    if own_frame and frames and own_frame not in frames:
        raise InputError(f"is in frame of reference {frames[0]}, not this scan's {own_frame}", path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    chosen = {n: name for n, name in names.items() if fnmatch.fnmatch(name.lower(), pattern.lower())}
    if not chosen:
        raise InputError(f"names no ROI matching {pattern!r} (its ROIs: {', '.join(sorted(names.values())) or 'none'})", path)
    out = []
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        if number not in chosen:
            continue
        mask = np.zeros(vol.shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            xyz = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            zyx = np.array([vol.world_to_voxel(p) for p in xyz])
            z = int(np.rint(zyx[:, 0].mean()))
            if not 0 <= z < vol.shape[0] or np.ptp(zyx[:, 0]) > 0.5:
                raise InputError(f"ROI {chosen[number]!r} has a contour that is not on one of the scan's slices", path)
            if len(zyx) >= 3:
                mask[z] ^= outline_to_region([(x, y) for _, y, x in zyx], vol.shape[1:], include_outline=False)
        if mask.any():
            out.append((chosen[number], mask))
    return out


def seg_masks(vol: Volume, path: str | Path) -> list[tuple[str, np.ndarray]]:
    """``(segment label, mask)`` of every segment of a DICOM SEG of the scan's series."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    own_frame = _frame_of_reference(vol)
    if own_frame and str(seg.FrameOfReferenceUID) != own_frame:
        raise InputError(f"is in frame of reference {seg.FrameOfReferenceUID}, not this scan's {own_frame}", path)
    uids = vol.meta.get("sop_instance_uids") or []
    referenced = {str(i.ReferencedSOPInstanceUID) for s in seg.get("ReferencedSeriesSequence", []) for i in s.ReferencedInstanceSequence}
    if referenced and not referenced & set(uids):
        raise InputError("segments images that are not this scan's", path)
    out = []
    for number in seg.segment_numbers:
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number],
                                                   assert_missing_frames_are_empty=True)
        mask = pixels[..., 0] > 0 if pixels.ndim == 4 else pixels > 0
        if mask.any():
            out.append((seg.get_segment_description(number).segment_label, mask))
    return out
