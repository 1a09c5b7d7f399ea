"""What an archive audit screens: every CT series under a folder tree, found by SeriesInstanceUID
(several series in one folder, one series over several folders), and every NIfTI/NRRD/MHD file."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ctguard.errors import InputError

ITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class SeriesRef:
    """One series to screen: its key in the results (the SeriesInstanceUID, or the file of a NIfTI/NRRD/MHD
    volume), its files, and what its headers said."""

    key: str
    kind: str  # "dicom" or "itk"
    files: list[str]
    study_uid: str | None = None
    series_uid: str | None = None
    patient_id: str | None = None
    description: str | None = None
    modality: str | None = None
    error: str | None = None  # known before screening: unreadable headers, not CT
    extra: dict = field(default_factory=dict)


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def folder_series(root: str | Path) -> Iterator[SeriesRef]:
    """Every series under ``root`` (any depth), in a stable order (by key).

    A DICOM file whose header cannot be read becomes a series of its own with an error, so that
    the audit records it instead of stopping.
    """
    import pydicom

    root = Path(root)
    if not root.is_dir():
        raise InputError("no such folder", root)
    series: dict[str, SeriesRef] = {}
    volumes: list[SeriesRef] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = path.name.lower()
        if name.endswith(ITK_SUFFIXES):
            volumes.append(SeriesRef(str(path), "itk", [str(path)], description=path.name))
            continue
        if not _is_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "SeriesDescription", "Modality", "SOPInstanceUID"])
            uid = str(ds.SeriesInstanceUID)
        except Exception as e:  # a corrupt header: its own error row
            volumes.append(SeriesRef(str(path), "dicom", [str(path)], error=f"unreadable DICOM header ({e.__class__.__name__})"))
            continue
        ref = series.get(uid)
        if ref is None:
            ref = series[uid] = SeriesRef(uid, "dicom", [], str(ds.get("StudyInstanceUID", "")) or None, uid,
                                          str(ds.get("PatientID", "")) or None, str(ds.get("SeriesDescription", "")) or None,
                                          str(ds.get("Modality", "")) or None)
        ref.files.append(str(path))
    for ref in series.values():
        if ref.modality and ref.modality != "CT":
            ref.error = f"not a CT series (modality {ref.modality})"
    yield from sorted([*series.values(), *volumes], key=lambda r: r.key)
