"""NIfTI, NRRD and MHD through SimpleITK."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctguard.errors import InputError
from ctguard.volume import Volume

SUFFIX_KIND = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mhd": "mhd", ".mha": "mhd"}


def read_itk(path: str | Path, kind: str) -> Volume:
    """Reads a NIfTI/NRRD/MHD file; voxels are taken as HU as stored (SimpleITK applies scl_slope).

    SimpleITK reports geometry in LPS, as ctguard does, so origin and direction carry over.
    """
    import SimpleITK as sitk

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise InputError(f"cannot read {kind} image ({first})", path) from None
    if img.GetDimension() not in (2, 3) or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"expected a 2D or 3D scalar image, got {img.GetDimension()}D with "
            f"{img.GetNumberOfComponentsPerPixel()} components",
            path,
        )
    hu = sitk.GetArrayFromImage(img).astype(np.float32)
    spacing = img.GetSpacing()
    origin = img.GetOrigin()
    direction = np.asarray(img.GetDirection(), dtype=float)
    if img.GetDimension() == 2:
        hu = hu[None]
        spacing = (*spacing, 1.0)
        origin = (*origin, 0.0)
        d2 = direction.reshape(2, 2)
        direction = np.eye(3)
        direction[:2, :2] = d2
    else:
        direction = direction.reshape(3, 3)
    return Volume(
        hu,
        (float(spacing[2]), float(spacing[1]), float(spacing[0])),
        tuple(float(v) for v in origin),
        direction,
        {"kind": kind, "modality": "CT", "warnings": [], "files": None},
    )


def write_itk(volume: Volume, path: str | Path) -> Path:
    """Writes a volume as NIfTI (``.nii``/``.nii.gz``), NRRD or MHD, chosen by suffix (int16 HU)."""
    import SimpleITK as sitk

    path = Path(path)
    img = sitk.GetImageFromArray(np.clip(np.rint(volume.hu), -32768, 32767).astype(np.int16))
    img.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    img.SetOrigin(tuple(float(v) for v in volume.origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(volume.direction).ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial{''.join(path.suffixes)}")
    sitk.WriteImage(img, str(tmp), True)
    tmp.replace(path)
    return path
