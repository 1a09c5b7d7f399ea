"""The one Python API that the CLI, the web app and the DICOM node call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ctguard import io
from ctguard.volume import Volume


def load(path: str | Path, series_uid: str | None = None, allow_modality: bool = False, progress: bool = False) -> Volume:
    """Reads a scan or image (see :func:`ctguard.io.read`)."""
    return io.read(path, series_uid=series_uid, allow_modality=allow_modality, progress=progress)


def info(path: str | Path, series_uid: str | None = None, allow_modality: bool = False) -> dict[str, Any]:
    """What a scan is: kind, modality, shape, spacing, HU range, series found and warnings.

    Returns:
        The object that ``ctguard info --json`` prints (see docs/DESIGN.md).
    """
    vol = load(path, series_uid=series_uid, allow_modality=allow_modality)
    meta = vol.meta
    series = meta.get("series") or (
        [{"uid": meta.get("series_uid", ""), "slices": vol.shape[0], "modality": meta.get("modality", "")}]
        if meta.get("kind", "").startswith("dicom")
        else []
    )
    return {
        "input": str(path),
        "kind": meta.get("kind"),
        "modality": meta.get("modality", ""),
        "shape": list(vol.shape),
        "spacing_mm": [round(float(s), 6) for s in vol.spacing],
        "origin_mm": [round(float(v), 4) for v in vol.origin],
        "hu_range": [float(np.min(vol.hu)), float(np.max(vol.hu))],
        "series_uid": meta.get("series_uid"),
        "patient_id": meta.get("patient_id"),
        "transfer_syntax": meta.get("transfer_syntax"),
        "series": series,
        "warnings": list(vol.warnings),
    }


def demo(out_dir: str | Path = "ctguard-demo", seed: int = 7, progress: bool = True, echo=print) -> dict[str, Any]:
    """The main job on an embedded default (see ``ctguard demo``).

    Builds a phantom chest scan, writes it as a DICOM series, reads it back and reports what
    was read.

    Returns:
        A summary dict (paths written, shape, spacing, HU range).
    """
    import shutil

    from ctguard.data.phantom import make_chest

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vol = make_chest((80, 192, 192), (2.0, 1.9, 1.9), seed=seed)
    io.write_series(vol, out / "phantom-dicom", patient_id=f"PHANTOM-{seed}")
    back = load(out / "phantom-dicom")
    io.write_itk(back, out / "phantom.nii.gz")
    summary = info(out / "phantom-dicom")
    echo(f"phantom chest CT written as DICOM: {out / 'phantom-dicom'} ({summary['shape']} voxels, spacing {summary['spacing_mm']} mm)")
    echo(f"read back: HU range {summary['hu_range']}; NIfTI copy: {out / 'phantom.nii.gz'}")
    return summary


def simulate(
    inputs: list[str | Path],
    out_dir: str | Path,
    inject: int = 2,
    remove: int = 1,
    per_scan: int = 1,
    phantoms: int = 0,
    annotations: str | Path | None = None,
    seed: int = 0,
    sizes: tuple[float, float] = (6.0, 20.0),
    progress: bool = True,
    echo=None,
) -> dict:
    """Makes a labelled CT-GAN-layout dataset of deepfakes from real scans and/or phantoms.

    Args:
        inputs: scans to tamper with (DICOM folders are written back header-for-header).
        out_dir: the dataset folder to create.
        inject: FM copies per source. Defaults to 2.
        remove: FB copies per source that has a known tumour. Defaults to 1.
        per_scan: nodules per FM copy. Defaults to 1.
        phantoms: also use this many phantom chests (seeded from ``seed``). Defaults to 0.
        annotations: a folder of PASCAL-VOC XML tumour boxes named by SOPInstanceUID. Defaults to None.
        seed: random seed. Defaults to 0.
        sizes: injected nodule diameter range (mm). Defaults to (6, 20).

    Returns:
        The manifest written beside the labels.
    """
    from ctguard.tamper.simulate import Source, phantom_source, simulate as _simulate, tumours_from_voc

    sources = []
    for path in inputs:
        vol = load(path, progress=progress)
        tumours = tumours_from_voc(vol, annotations) if annotations else []
        patient = vol.meta.get("patient_id") or Path(path).name
        sources.append(Source(str(path), vol, patient, tumours))
    sources += [phantom_source(seed * 1000 + k) for k in range(phantoms)]
    if not sources:
        from ctguard.errors import InputError

        raise InputError("nothing to simulate from: give scans or --phantoms N")
    return _simulate(sources, out_dir, inject, remove, per_scan, seed, sizes, progress, echo)
