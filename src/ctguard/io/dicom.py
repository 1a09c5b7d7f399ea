"""DICOM: read a series or one file into a Volume, write a volume back, write a fresh series."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from datetime import datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctguard.errors import ConflictingImages, InputError
from ctguard.volume import Volume, plane

PIXEL_DATA = 0x7FE00010
_HU_PAD = -1024.0


def is_dicom_file(path: str | Path) -> bool:
    """True when the file carries the DICM magic at byte 128 (a Part 10 file)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _list_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in sorted(names) if not n.startswith(".") and n != "DICOMDIR")
    return files


def _read(path: Path, **kwargs) -> Dataset:
    try:
        return pydicom.dcmread(path, **kwargs)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"not a readable DICOM file ({e.__class__.__name__}: {e})", path) from None


def _orientation(ds: Dataset) -> np.ndarray:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return np.array([1.0, 0, 0, 0, 1.0, 0])
    return np.asarray([float(v) for v in iop])


def _direction(iop: np.ndarray) -> np.ndarray:
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    return np.stack([row, col, normal], axis=1)


def _rescale(ds: Dataset) -> tuple[float, float]:
    return float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)


def _stored_dtype(ds: Dataset) -> np.dtype:
    bits = int(ds.BitsAllocated)
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    return np.dtype(f"{'<i' if signed else '<u'}{bits // 8}")


def _slice_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values of one single-frame slice, decoded without a copy when uncompressed."""
    if PIXEL_DATA not in ds:
        raise InputError("has no pixel data", path)
    try:
        ts = ds.file_meta.TransferSyntaxUID
        if not ts.is_compressed and ts.is_little_endian and int(ds.BitsAllocated) in (8, 16, 32):
            rows, cols = int(ds.Rows), int(ds.Columns)
            raw = np.frombuffer(ds.PixelData, dtype=_stored_dtype(ds), count=rows * cols)
            return raw.reshape(rows, cols)
        return ds.pixel_array
    except InputError:
        raise
    except Exception as e:  # decoders raise many types; all mean "bad pixel data"
        raise InputError(f"pixel data cannot be decoded ({e.__class__.__name__}: {e})", path) from None


NOT_A_SECTION = "a projection to plan the scan on, not a cross-section of the chest; ctguard reads axial CT"


def _is_localizer(ds: Dataset) -> bool:
    """Whether an image is a localizer (scout, topogram): ``LOCALIZER`` in its Image Type, as every
    CT scanner marks the projection it plans a scan on."""
    value = ds.get("ImageType") or []
    return any(str(v).strip().upper() == "LOCALIZER" for v in ([value] if isinstance(value, str) else value))


def _same_image(a: Dataset, b: Dataset) -> bool:
    """Whether two slices hold the same image: the same HU in every pixel (the same stored bytes and
    rescale, or, stored otherwise, the same values decoded)."""
    if _rescale(a) == _rescale(b) and a.get("PixelData") == b.get("PixelData"):
        return True
    try:
        (sa, ia), (sb, ib) = _rescale(a), _rescale(b)
        pa, pb = a.pixel_array.astype(np.float64), b.pixel_array.astype(np.float64)
        return pa.shape == pb.shape and np.array_equal(pa * sa + ia, pb * sb + ib)
    except Exception:  # undecodable pixels: not known to be the same
        return False


def _relative(path: Path, folder: Path) -> str:
    """``path`` as a user would name it from ``folder`` (its name where it is not under it; the file
    it links to where it is a link, as the audit's folders of a series' files are)."""
    if path.is_symlink():
        return str(path.resolve())
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return path.name


def _check_modality(modality: str, path: Path, allow_modality: bool) -> None:
    if modality.upper() != "CT" and not allow_modality:
        raise InputError(f"modality is {modality or 'missing'}, not CT (use --allow-modality to read it anyway)", path)


def read_series(
    folder: str | Path,
    series_uid: str | None = None,
    allow_modality: bool = False,
    progress: bool = False,
    files: list[str] | None = None,
) -> Volume:
    """Reads a DICOM series from a folder (searched recursively) into a Volume.

    Files are grouped by SeriesInstanceUID; ``series_uid`` picks one, else the largest is
    read and the others are named in a warning. Slices are sorted by position along the
    slice normal, a second copy of a slice dropped, and stored values rescaled to HU.

    Args:
        folder: the folder.
        series_uid: the series to read. Defaults to the one with most slices.
        allow_modality: read a series whose modality is not CT. Defaults to False.
        progress: show a progress bar. Defaults to False.
        files: the folder's files to read, where the caller knows them (``meta["series_files"]``
            of an earlier read: one series read again without the others). Defaults to all.

    Returns:
        The Volume; ``meta`` holds ``files`` (one path per slice, in z order) and ``series``.

    Raises:
        InputError: no DICOM images, unknown series, non-CT modality, mixed orientations,
            undecodable pixels, two different images at one place (two versions of the series),
            a localizer (scout) series.
    """
    from tqdm import tqdm

    folder = Path(folder)
    files = _list_files(folder) if files is None else [Path(f) for f in files]
    if not files:
        raise InputError("folder is empty", folder)
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    skipped: list[Path] = []
    no_pixels: list[Path] = []
    for path in tqdm(files, desc="read DICOM", unit="file", disable=not progress, leave=False):
        if not is_dicom_file(path):
            # Some old files lack the preamble; accept them only when pydicom can parse them.
            try:
                ds = pydicom.dcmread(path, force=True)
                if "SOPClassUID" not in ds:
                    skipped.append(path)
                    continue
            except Exception:
                skipped.append(path)
                continue
        else:
            ds = _read(path)
        if PIXEL_DATA not in ds:
            no_pixels.append(path)
            continue
        groups[str(getattr(ds, "SeriesInstanceUID", ""))].append((path, ds))
    if not groups:
        if no_pixels:
            raise InputError(f"no DICOM image in the folder ({len(no_pixels)} DICOM files without pixel data)", folder)
        raise InputError(f"no DICOM file in the folder ({len(skipped)} other files)", folder)
    summary = [
        {
            "uid": uid,
            "slices": len(items),
            "modality": str(getattr(items[0][1], "Modality", "")),
            "description": str(getattr(items[0][1], "SeriesDescription", "")),
            "plane": plane(_direction(_orientation(items[0][1]))[:, 2]),
            **({"localizer": True} if all(_is_localizer(ds) for _, ds in items) else {}),
        }
        for uid, items in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ]
    warnings: list[str] = []
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(f"no series {series_uid}; found {', '.join(groups)}", folder)
        chosen = series_uid
    else:
        # The largest axial series (the detector reads axial scans; a reformat or a scout is read only alone).
        first = next((x for x in summary if x["plane"] == "axial" and not x.get("localizer")), summary[0])
        chosen = first["uid"]
        if len(groups) > 1:
            others = ", ".join(f"{x['uid']} ({x['slices']} slices{'' if x['plane'] == 'axial' else ', ' + x['plane']})"
                               for x in summary if x is not first)
            warnings.append(
                f"{folder}: {len(groups)} series found; read the largest {'axial ' if first['plane'] == 'axial' else ''}one, {chosen} "
                f"({first['slices']} slices); others: {others} (choose with --series)"
            )
    if skipped:
        warnings.append(f"{folder}: {len(skipped)} non-DICOM file{'s' if len(skipped) > 1 else ''} skipped (e.g. {skipped[0].name})")
    if no_pixels:
        warnings.append(f"{folder}: {len(no_pixels)} DICOM files without pixel data skipped")
    items = groups[chosen]
    scouts = [it for it in items if _is_localizer(it[1])]
    if scouts and len(scouts) == len(items):
        raise InputError(f"a localizer (scout) series: {NOT_A_SECTION}", folder)
    if scouts:  # a scout kept in the axial series' UID: not one of its slices
        items = [it for it in items if not _is_localizer(it[1])]
        warnings.append(f"{folder}: {len(scouts)} localizer (scout) image{'s' if len(scouts) > 1 else ''} of series {chosen} left out")
    first_path, first = items[0]
    _check_modality(str(getattr(first, "Modality", "")), first_path, allow_modality)
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1 and len(items) == 1:
        vol = _read_multiframe(first, first_path)
        vol.meta["series"] = summary
        vol.warnings.extend(warnings)
        return vol

    iop = _orientation(first)
    for path, ds in items:
        if not np.allclose(_orientation(ds), iop, atol=1e-3):
            raise InputError(f"mixed slice orientations in series {chosen}", path)
        if (int(ds.Rows), int(ds.Columns)) != (int(first.Rows), int(first.Columns)):
            raise InputError(f"slice size {ds.Rows}x{ds.Columns} differs from {first.Rows}x{first.Columns}", path)
    direction = _direction(iop)
    normal = direction[:, 2]

    def position(item: tuple[Path, Dataset]) -> float:
        ipp = getattr(item[1], "ImagePositionPatient", None)
        if ipp is not None:
            return float(np.dot([float(v) for v in ipp], normal))
        return float(getattr(item[1], "InstanceNumber", 0) or 0)

    items.sort(key=position)
    positions = [position(it) for it in items]
    kept: list[tuple[Path, Dataset]] = [items[0]]
    kept_pos = [positions[0]]
    for it, p in zip(items[1:], positions[1:]):
        if abs(p - kept_pos[-1]) < 1e-3:
            # A second slice at a kept slice's place is dropped only where it holds the same image
            # (the same file twice): two different images at one place are two versions of the
            # series, and screening either one, or a mixture, would pass the other unseen.
            if not _same_image(kept[-1][1], it[1]):
                a, b = (_relative(x[0], folder) for x in (kept[-1], it))
                raise ConflictingImages(f"two different images at one place ({p:.2f} mm along the slice normal) in series {chosen}: "
                                 f"{a} and {b}; two versions of one series, or two acquisitions under one series UID "
                                 "(screen each apart)", folder)
            continue
        kept.append(it)
        kept_pos.append(p)
    if len(kept) < len(items):
        warnings.append(f"{folder}: {len(items) - len(kept)} identical slices at duplicate positions dropped")

    rows, cols = int(first.Rows), int(first.Columns)
    hu = np.empty((len(kept), rows, cols), dtype=np.float32)
    for z, (path, ds) in enumerate(kept):
        slope, intercept = _rescale(ds)
        stored = _slice_pixels(ds, path)
        np.multiply(stored, slope, out=hu[z], casting="unsafe")
        hu[z] += intercept
        del ds.PixelData  # drop the raw bytes as soon as they are decoded: keeps peak memory low

    pixel_spacing = [float(v) for v in getattr(first, "PixelSpacing", [1.0, 1.0])]
    thickness = _float_or_none(getattr(first, "SliceThickness", None))
    if len(kept) > 1:
        diffs = np.diff(kept_pos)
        dz = float(np.median(diffs))
        if diffs.max() - diffs.min() > max(0.01, 0.05 * dz):
            warnings.append(
                f"{folder}: uneven slice spacing ({diffs.min():.3g} to {diffs.max():.3g} mm); "
                f"using the median, {dz:.3g} mm (gaps or missing slices?)"
            )
    else:
        dz = thickness or 1.0
    ipp0 = getattr(kept[0][1], "ImagePositionPatient", None)
    origin = tuple(float(v) for v in ipp0) if ipp0 is not None else (0.0, 0.0, 0.0)
    meta = {
        "kind": "dicom-series",
        "modality": str(getattr(first, "Modality", "")),
        "series_uid": chosen,
        "study_uid": str(getattr(first, "StudyInstanceUID", "")),
        "frame_of_reference_uid": str(getattr(first, "FrameOfReferenceUID", "")),
        "slice_thickness": thickness,
        "patient_id": str(getattr(first, "PatientID", "")),
        "manufacturer": str(getattr(first, "Manufacturer", "")),
        "identity": identity(first),
        "transfer_syntax": str(first.file_meta.TransferSyntaxUID),
        "root": str(folder),
        "files": [str(p) for p, _ in kept],
        "sop_instance_uids": [str(getattr(ds, "SOPInstanceUID", "")) for _, ds in kept],
        "signed": [0xFFFAFFFA in ds for _, ds in kept],  # carries a Digital Signatures Sequence (checked by screen)
        "series": summary,
        "series_files": {uid: [str(p) for p, _ in group] for uid, group in groups.items()},  # each series' files, to read it alone
        "warnings": warnings,
    }
    return Volume(hu, (dz, pixel_spacing[0], pixel_spacing[1]), origin, direction, meta)


def _float_or_none(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _read_multiframe(ds: Dataset, path: Path) -> Volume:
    """An enhanced (multi-frame) CT image: positions and rescale from the functional groups."""
    try:
        frames = ds.pixel_array.astype(np.float32)
    except Exception as e:
        raise InputError(f"pixel data cannot be decoded ({e.__class__.__name__}: {e})", path) from None
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])

    def group(i: int, name: str):
        if i < len(per_frame) and name in per_frame[i]:
            return per_frame[i][name][0]
        return shared[name][0] if name in shared else None

    measures = group(0, "PixelMeasuresSequence")
    pixel_spacing = [float(v) for v in getattr(measures, "PixelSpacing", [1, 1])] if measures else [1.0, 1.0]
    orient = group(0, "PlaneOrientationSequence")
    iop = np.asarray([float(v) for v in orient.ImageOrientationPatient]) if orient else np.array([1.0, 0, 0, 0, 1, 0])
    direction = _direction(iop)
    positions, hu_frames = [], []
    for i in range(frames.shape[0]):
        plane = group(i, "PlanePositionSequence")
        ipp = [float(v) for v in plane.ImagePositionPatient] if plane else [0.0, 0.0, float(i)]
        trans = group(i, "PixelValueTransformationSequence")
        slope, intercept = _rescale(trans) if trans is not None else _rescale(ds)
        positions.append((float(np.dot(ipp, direction[:, 2])), ipp))
        hu_frames.append(frames[i] * slope + intercept)
    order = np.argsort([p for p, _ in positions])
    hu = np.stack([hu_frames[i] for i in order]).astype(np.float32)
    sorted_pos = [positions[i][0] for i in order]
    dz = float(np.median(np.diff(sorted_pos))) if len(sorted_pos) > 1 else float(getattr(measures, "SliceThickness", 1) or 1)
    return Volume(
        hu,
        (dz, pixel_spacing[0], pixel_spacing[1]),
        tuple(positions[order[0]][1]),
        direction,
        {
            "kind": "dicom-file",
            "modality": str(getattr(ds, "Modality", "")),
            "series_uid": str(getattr(ds, "SeriesInstanceUID", "")),
            "identity": identity(ds),
            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
            "frames": int(frames.shape[0]),
            "warnings": [],
        },
    )


def series_label(ds) -> str | None:
    """A series' description for a reader: its SeriesDescription, else its kernel and slice
    thickness (LIDC-IDRI's series have no description: "STANDARD kernel, 2.5 mm slices"), else None."""
    text = str(ds.get("SeriesDescription", "") or "").strip()
    if text:
        return text
    kernel = ds.get("ConvolutionKernel") or ""
    kernel = (kernel if isinstance(kernel, str) else "/".join(map(str, kernel))).strip()  # a MultiValue where VM > 1
    try:
        thickness = f"{float(ds.get('SliceThickness')):g} mm slices"
    except (TypeError, ValueError):
        thickness = ""
    return ", ".join(x for x in (f"{kernel} kernel" if kernel else "", thickness) if x) or None


def readable_date(text: str) -> str:
    """A DICOM date (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    return f"{text[:4]}-{text[4:6]}-{text[6:]}" if len(text) == 8 and text.isdigit() else text


def scan_summary(scan: dict[str, str] | None) -> str:
    """A result's ``scan`` (:func:`identity`) on one line: "Patient LIDC-IDRI-0002 · study date
    2000-01-01 · STANDARD kernel, 1.25 mm slices · GE MEDICAL SYSTEMS"; empty for other inputs."""
    scan = scan or {}
    parts = [f"Patient {scan['patient_id']}" if scan.get("patient_id") else "",
             f"study date {readable_date(scan['study_date'])}" if scan.get("study_date") else "",
             scan.get("description", ""), scan.get("manufacturer", "")]
    return " \u00b7 ".join(p for p in parts if p)


def identity(ds: Dataset) -> dict[str, str]:
    """Who and what a DICOM image is, for a result a reader can file: patient, study and series
    (UIDs, study date, the series' description or :func:`series_label`), scanner maker; empty
    values left out."""
    out = {
        "patient_id": str(ds.get("PatientID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "study_date": str(ds.get("StudyDate", "") or ""),
        "description": series_label(ds) or "",
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
    }
    return {k: v for k, v in out.items() if v}


def read_dicom_file(path: str | Path, allow_modality: bool = False) -> Volume:
    """Reads one DICOM file: a single slice (shape ``(1, rows, cols)``) or a multi-frame CT.

    Raises:
        InputError: not DICOM, no pixel data, non-CT modality, undecodable pixels.
    """
    path = Path(path)
    ds = _read(path)
    if PIXEL_DATA not in ds:
        raise InputError("has no pixel data", path)
    _check_modality(str(getattr(ds, "Modality", "")), path, allow_modality)
    if _is_localizer(ds):
        raise InputError(f"a localizer (scout) image: {NOT_A_SECTION}", path)
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(ds, path)
    slope, intercept = _rescale(ds)
    hu = (_slice_pixels(ds, path).astype(np.float32) * slope + intercept)[None]
    pixel_spacing = [float(v) for v in getattr(ds, "PixelSpacing", [1.0, 1.0])]
    ipp = getattr(ds, "ImagePositionPatient", None)
    return Volume(
        hu,
        (float(getattr(ds, "SliceThickness", 1.0) or 1.0), pixel_spacing[0], pixel_spacing[1]),
        tuple(float(v) for v in ipp) if ipp is not None else (0.0, 0.0, 0.0),
        _direction(_orientation(ds)),
        {
            "kind": "dicom-file",
            "modality": str(getattr(ds, "Modality", "")),
            "series_uid": str(getattr(ds, "SeriesInstanceUID", "")),
            "identity": identity(ds),
            "patient_id": str(getattr(ds, "PatientID", "")),
            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
            "files": [str(path)],
            "root": str(path.parent),
            "warnings": [],
        },
    )


def _to_stored(hu: np.ndarray, ds: Dataset) -> np.ndarray:
    slope, intercept = _rescale(ds)
    dtype = _stored_dtype(ds)
    bits = int(getattr(ds, "BitsStored", ds.BitsAllocated))
    if dtype.kind == "i":
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    return np.clip(np.rint((hu - intercept) / slope), lo, hi).astype(dtype)


def _atomic_output(out_dir: Path):
    """A temporary folder beside ``out_dir``; rename it into place only when all is written."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _commit(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        raise InputError("already exists; will not overwrite", out_dir)
    os.replace(tmp, out_dir)


def _recoded(ds: Dataset, stored: np.ndarray) -> bytes:
    """A compressed source file ``ds`` with ``stored`` as its pixels: encoded again in its own
    transfer syntax where that is lossless and pydicom can encode it (JPEG 2000 Lossless, RLE
    Lossless, JPEG-LS Lossless), otherwise uncompressed (explicit VR little endian: JPEG Lossless,
    which pydicom cannot encode, and the lossy syntaxes, whose decoded values are kept as they are
    rather than lost again). Every other element keeps its value, the UIDs among them."""
    from pydicom.pixels.encoders import JPEG2000LosslessEncoder, JPEGLSLosslessEncoder, RLELosslessEncoder

    syntax = ds.file_meta.TransferSyntaxUID
    encoder = next((e for e in (JPEG2000LosslessEncoder, RLELosslessEncoder, JPEGLSLosslessEncoder) if e.UID == syntax), None)
    if encoder is not None and encoder.is_available:
        ds.compress(syntax, stored, generate_instance_uid=False)
    else:
        ds.decompress(generate_instance_uid=False)
        ds.PixelData = stored.tobytes()
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_back(volume: Volume, out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Writes a changed volume over copies of its source DICOM files: only PixelData changes.

    Every file of the source series is copied to ``out_dir`` (same relative path) with the
    bytes of its PixelData value replaced in place, so every other byte of the file (headers,
    UIDs, private tags, preamble) stays exactly as it was. This is how CT-GAN writes its fakes.
    A compressed source's pixels cannot change in place: its file is written again with the new
    pixels encoded in its own transfer syntax where pydicom encodes that losslessly, else
    uncompressed, every other element keeping its value (:func:`_recoded`).
    The output appears all at once: it is written to a temporary folder and renamed.

    Args:
        volume: a volume read by :func:`read_series` (its ``meta["files"]``), voxels changed.
        out_dir: a folder that does not exist yet.
        names: file names to write slice ``z`` to, instead of the source's relative paths
            (the CT-GAN layout names files by slice index). Defaults to None.

    Returns:
        The written paths, in z order.

    Raises:
        InputError: the volume has no source files, the shape changed, ``out_dir`` exists,
            or a source's pixel data does not match its image.
    """
    files = volume.meta.get("files")
    out_dir = Path(out_dir)
    if not files or volume.meta.get("kind") not in ("dicom-series", "dicom-file"):
        raise InputError("volume was not read from DICOM files; cannot write it back", out_dir)
    if len(files) != volume.shape[0]:
        raise InputError(f"volume has {volume.shape[0]} slices but its source has {len(files)} files", out_dir)
    if out_dir.exists():
        raise InputError("already exists; will not overwrite", out_dir)
    root = Path(volume.meta.get("root", Path(files[0]).parent))
    tmp = _atomic_output(out_dir)
    written = []
    try:
        for z, src in enumerate(files):
            src = Path(src)
            raw = src.read_bytes()
            ds = pydicom.dcmread(BytesIO(raw), defer_size=None)  # the same bytes: value_tell is the PixelData's offset in them
            elem = ds.get_item(PIXEL_DATA)
            stored = _to_stored(volume.hu[z], ds)
            if ds.file_meta.TransferSyntaxUID.is_compressed or elem.length == 0xFFFFFFFF:
                try:
                    data = _recoded(ds, stored)
                except Exception as e:  # noqa: BLE001 - a codec's own error, named with the file
                    raise InputError(f"cannot encode the changed pixels in {ds.file_meta.TransferSyntaxUID.name}: {e}", src) from e
            else:
                new = stored.tobytes()
                start, length = elem.value_tell, elem.length
                if len(new) > length:
                    raise InputError("pixel data size does not match the image", src)
                new = new + raw[start + len(new) : start + length]  # keep any odd-length padding byte
                data = raw[:start] + new + raw[start + length :]
            if names is not None:
                rel = Path(names[z])
            else:
                rel = src.relative_to(root) if src.is_relative_to(root) else Path(src.name)
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            written.append(out_dir / rel)
        _commit(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return written


def write_series(
    volume: Volume,
    out_dir: str | Path,
    patient_id: str = "CTGUARD-PHANTOM",
    series_description: str = "ctguard",
    name_pattern: str = "{index:04d}.dcm",
    study_uid: str | None = None,
    series_uid: str | None = None,
    uid_seed: str | None = None,
) -> list[Path]:
    """Writes any volume as a fresh, valid CT Image Storage series (one file per slice).

    New Study/Series/SOP/FrameOfReference UIDs, positions and orientation from the volume's
    geometry, int16 stored values in HU (RescaleSlope 1, RescaleIntercept 0), explicit VR
    little endian. Slice ``z`` is written with InstanceNumber ``z + 1`` to ``name_pattern``
    formatted with ``index=z``. Written to a temporary folder and renamed when complete.
    With ``uid_seed`` the UIDs and dates derive from it, so the same seed writes the same bytes.

    Returns:
        The written paths, in z order.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise InputError("already exists; will not overwrite", out_dir)
    def new_uid(*parts) -> str:
        return generate_uid(entropy_srcs=[uid_seed, *map(str, parts)]) if uid_seed is not None else generate_uid()

    study_uid = study_uid or new_uid("study")
    series_uid = series_uid or new_uid("series")
    frame_uid = new_uid("frame")
    now = datetime(2020, 1, 1) if uid_seed is not None else datetime.now()
    direction = np.asarray(volume.direction, dtype=float)
    iop = [*direction[:, 0], *direction[:, 1]]
    nz, rows, cols = volume.shape
    stored = np.clip(np.rint(volume.hu), -32768, 32767).astype("<i2")
    tmp = _atomic_output(out_dir)
    written = []
    try:
        for z in range(nz):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            sop_uid = new_uid("sop", z)
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
            ds.AccessionNumber = ""
            ds.Modality = "CT"
            ds.Manufacturer = "ctguard"
            ds.ReferringPhysicianName = ""
            ds.SeriesDescription = series_description
            ds.PatientName = f"{patient_id}^"  # a family name alone (PS3.5 6.2: the caret says there is no given name)
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.KVP = "120"
            ds.SliceThickness = f"{volume.spacing[0]:.6g}"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = 1
            ds.InstanceNumber = z + 1
            position = volume.voxel_to_world((z, 0, 0))
            ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
            ds.ImageOrientationPatient = [f"{v:.6g}" for v in iop]
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = f"{float(np.dot(position, direction[:, 2])):.6g}"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = rows, cols
            ds.PixelSpacing = [f"{volume.spacing[1]:.6g}", f"{volume.spacing[2]:.6g}"]
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.WindowCenter = "-600"
            ds.WindowWidth = "1500"
            ds.PixelData = stored[z].tobytes()
            name = name_pattern.format(index=z)
            dst = tmp / name
            ds.save_as(dst, enforce_file_format=True)
            written.append(out_dir / name)
        _commit(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return written
