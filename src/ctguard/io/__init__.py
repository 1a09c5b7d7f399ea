"""One reader interface: :func:`read` chooses by what the input is, not only by its suffix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctguard.errors import InputError
from ctguard.io.dicom import is_dicom_file, read_dicom_file, read_series, write_back, write_series
from ctguard.io.images import read_image
from ctguard.io.itk import read_itk, write_itk
from ctguard.volume import Volume

__all__ = ["sniff", "read", "read_series", "read_dicom_file", "read_image", "write_back", "write_series", "write_itk"]


def sniff(path: str | Path) -> str:
    """What a path holds: ``dicom-series``, ``dicom-file``, ``nifti``, ``nrrd``, ``mhd`` or ``image``.

    Files are recognised by their first bytes (DICM at 128, NIfTI's header size, the NRRD
    magic, PNG/JPEG signatures, MetaImage keys); the suffix only breaks ties (e.g. gzip).

    Raises:
        InputError: the path does not exist or its content is not recognised.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("does not exist", path)
    if path.is_dir():
        return "dicom-series"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise InputError(f"cannot be read ({e.strerror})", path) from None
    name = path.name.lower()
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom-file"
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
        return "image"
    if head.startswith(b"NRRD"):
        return "nrrd"
    if head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c") or head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if head.startswith(b"\x1f\x8b") and name.endswith(".nii.gz"):
        return "nifti"
    text = head.decode("latin-1")
    if any(text.startswith(k) for k in ("ObjectType", "NDims")) or "ElementDataFile" in text:
        return "mhd"
    if is_dicom_file(path) or name.endswith(".dcm"):
        return "dicom-file"  # a preamble-less file: the DICOM reader gives the precise error
    raise InputError("not a recognised CT or image file (DICOM, NIfTI, NRRD, MHD, PNG, JPG)", path)


def read(
    path: str | Path,
    series_uid: str | None = None,
    allow_modality: bool = False,
    progress: bool = False,
) -> Volume:
    """Reads any supported input into a Volume.

    Args:
        path: a DICOM folder or file, a NIfTI/NRRD/MHD file, or a PNG/JPG image.
        series_uid: for a folder with several series, the one to read. Defaults to the largest.
        allow_modality: accept a DICOM modality other than CT. Defaults to False.
        progress: show progress bars. Defaults to False.

    Returns:
        The Volume; a 2D image is a one-slice volume with 1 mm spacing whose voxels are the
        image's grey values (``meta["kind"] == "image"``), not HU.
    """
    kind = sniff(path)
    if kind == "dicom-series":
        return read_series(path, series_uid=series_uid, allow_modality=allow_modality, progress=progress)
    if series_uid is not None and kind != "dicom-file":  # not left unread without a word
        raise InputError(f"--series {series_uid} picks one of a DICOM folder's series; this is a {kind} file", path)
    if kind == "dicom-file":
        vol = read_dicom_file(path, allow_modality=allow_modality)
        if series_uid is not None and vol.meta.get("series_uid") != series_uid:
            raise InputError(f"no series {series_uid}: this file is of series {vol.meta.get('series_uid')}", path)
        return vol
    if kind == "image":
        pixels = read_image(path).astype(np.float32)
        return Volume(pixels[None], (1.0, 1.0, 1.0), meta={"kind": "image", "modality": "", "warnings": []})
    return read_itk(path, kind)
