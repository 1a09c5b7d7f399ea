"""The per-series work of an archive audit, the same on every engine: hash the pixels, skip what the
results already hold, screen, and return the row (the driver alone writes it)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ctguard.audit.sources import SeriesRef
from ctguard.errors import InputError


def pixel_hash(ref: SeriesRef) -> str:
    """SHA-256 of the series' pixel data as stored (PixelData of each instance, in SOPInstanceUID
    order), or of the whole file for a NIfTI/NRRD/MHD volume."""
    import pydicom

    h = hashlib.sha256()
    if ref.kind == "itk":
        with open(ref.files[0], "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    parts = []
    for path in ref.files:
        ds = pydicom.dcmread(path)
        parts.append((str(ds.get("SOPInstanceUID", path)), bytes(ds.get("PixelData", b"") or b"")))
    for _, data in sorted(parts):
        h.update(data)
    return h.hexdigest()


def _row(ref: SeriesRef, **values: Any) -> dict[str, Any]:
    return {"key": ref.key, "study_uid": ref.study_uid, "series_uid": ref.series_uid, "patient_id": ref.patient_id,
            "description": ref.description, "source": ref.extra.get("source") or (os.path.dirname(ref.files[0]) if ref.kind == "dicom" else ref.files[0]),
            "slices": len(ref.files) if ref.kind == "dicom" else None, **values}


def screen_series(ref: SeriesRef, model: str | None, threshold: float | None, results_path: str | None,
                  trust: str | None = None) -> dict[str, Any]:
    """One series: ``{"skipped": True, ...}`` when the results hold it already, else its row (an
    error row with a one-line reason when it cannot be screened: never an exception)."""
    from ctguard.screen import load_detector

    t0 = time.time()
    detector = load_detector(model)  # once per process (cached)
    ident = {"model": detector.name, "model_version": str(detector.version)}
    if ref.error:
        return _row(ref, **ident, pixel_hash="", verdict="error", error=ref.error, seconds=0.0)
    if ref.kind == "dicomweb":
        with tempfile.TemporaryDirectory(prefix="ctguard-wado-") as tmp:
            try:
                local = _retrieve(ref, Path(tmp))
            except Exception as e:  # the PACS refused or broke off: this series' error row
                return _row(ref, **ident, pixel_hash="", verdict="error", error=f"cannot retrieve the series ({e.__class__.__name__}: {str(e)[:200]})",
                            seconds=round(time.time() - t0, 2))
            row = _screen_local(local, model, threshold, results_path, trust, ident, t0)
            if not row.get("skipped"):
                row.update(source=ref.extra.get("source"), slices=row.get("slices") or len(local.files))
            return row
    return _screen_local(ref, model, threshold, results_path, trust, ident, t0)


def _retrieve(ref: SeriesRef, folder: Path) -> SeriesRef:
    """WADO-RS: the series' instances into ``folder``; the same series, now as local files."""
    from ctguard.audit.sources import dicomweb_client

    client = dicomweb_client(ref.extra["url"])
    files = []
    for i, ds in enumerate(client.retrieve_series(ref.study_uid, ref.series_uid)):
        path = folder / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    if not files:
        raise ValueError("the server returned no instances")
    return SeriesRef(ref.key, "dicom", files, ref.study_uid, ref.series_uid, ref.patient_id, ref.description, ref.modality,
                     extra=dict(ref.extra))


def _screen_local(ref: SeriesRef, model, threshold, results_path, trust, ident: dict, t0: float) -> dict[str, Any]:
    from ctguard import api

    try:
        digest = pixel_hash(ref)
    except Exception as e:  # a file that cannot be read to the end
        return _row(ref, **ident, pixel_hash="", verdict="error", error=f"cannot read the pixel data ({e.__class__.__name__}: {e})",
                    seconds=round(time.time() - t0, 2))
    if results_path:
        from ctguard.audit.store import already_screened

        if already_screened(results_path, ref.key, digest, ident["model_version"]):
            return {"skipped": True, "key": ref.key}
    _maybe_die_for_a_test(ref)
    try:
        with tempfile.TemporaryDirectory(prefix="ctguard-audit-") as tmp:
            if ref.kind == "dicom":  # the series' files, wherever they are, as one folder of links
                for i, f in enumerate(ref.files):
                    os.symlink(os.path.abspath(f), Path(tmp) / f"{i:06d}.dcm")
                for j, files in enumerate(ref.extra.get("siblings", [])):  # and its other reconstructions, to cross-check it against
                    for i, f in enumerate(files):
                        os.symlink(os.path.abspath(f), Path(tmp) / f"other{j}_{i:06d}.dcm")
                target = tmp
            else:
                target = ref.files[0]
            result = api.screen(target, model=model, threshold=threshold, trust=trust, series_uid=ref.series_uid if ref.kind == "dicom" else None)
    except InputError as e:
        return _row(ref, **ident, pixel_hash=digest, verdict="error", error=e.problem, seconds=round(time.time() - t0, 2))
    except Exception as e:  # anything else: this series' error row, the audit goes on
        return _row(ref, **ident, pixel_hash=digest, verdict="error", error=f"{e.__class__.__name__}: {e}", seconds=round(time.time() - t0, 2))
    return _row(ref, **ident, pixel_hash=digest, verdict=result["verdict"], score=result["score"], findings=result["findings"],
                cross_check=result.get("cross_check"),
                signatures=result.get("signatures"), slices=result["shape"][0], seconds=round(time.time() - t0, 2))


def _maybe_die_for_a_test(ref: SeriesRef) -> None:
    """Tests of worker death: with CTGUARD_AUDIT_DIE_ON=<key>:<marker file>, the first worker to
    screen that series kills itself (the marker says it happened)."""
    spec = os.environ.get("CTGUARD_AUDIT_DIE_ON")
    if not spec:
        return
    key, _, marker = spec.rpartition(":")
    if key == ref.key and marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(137)
