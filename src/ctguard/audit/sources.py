"""What an archive audit screens: every CT series under a folder tree, found by SeriesInstanceUID
(several series in one folder, one series over several folders), each with its study's other CT
series to cross-check it against, and every NIfTI/NRRD/MHD file; or every CT
series of a PACS through DICOMweb (QIDO-RS lists them, WADO-RS retrieves each)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ctguard.errors import InputError
from ctguard.io.dicom import is_dicom_file, series_label

ITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class SeriesRef:
    """One series to screen: its key in the results (the SeriesInstanceUID, or the file of a NIfTI/NRRD/MHD
    volume), its files, and what its headers said."""

    key: str
    kind: str  # "dicom", "itk" or "dicomweb" (retrieved by the worker)
    files: list[str]
    study_uid: str | None = None
    series_uid: str | None = None
    patient_id: str | None = None
    description: str | None = None
    modality: str | None = None
    error: str | None = None  # known before screening: unreadable headers, not CT
    extra: dict = field(default_factory=dict)


def dicomweb_client(url: str):
    """A DICOMweb client for ``dicomweb+http(s)://[user:password@]host:port/prefix``."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session, create_session_from_user_pass
    except ImportError:
        raise InputError("a DICOMweb source needs dicomweb-client: pip install 'ctguard[dicomweb]'") from None
    parts = urlsplit(url.removeprefix("dicomweb+"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{url!r}: expected dicomweb+http://host:port/prefix (or dicomweb+https://)")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    session = create_session_from_user_pass(parts.username, parts.password or "") if parts.username else create_session()
    return DICOMwebClient(urlunsplit((parts.scheme, netloc, parts.path, "", "")), session=session)


def _without_credentials(url: str) -> str:
    """The URL as the results may keep it: ``user:password@`` taken out, the scheme kept."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _tag(record: dict, tag: str) -> str | None:
    value = (record.get(tag) or {}).get("Value") or [None]
    return None if value[0] is None else str(value[0])


def dicomweb_series(url: str, page: int = 500) -> Iterator[SeriesRef]:
    """Every CT series a DICOMweb server lists (QIDO-RS, ``Modality=CT``, in pages of ``page``);
    each is retrieved (WADO-RS) by the worker that screens it."""
    client = dicomweb_client(url)
    offset, refs = 0, []
    while True:
        try:
            found = client.search_for_series(search_filters={"Modality": "CT"}, offset=offset, limit=page)
        except Exception as e:  # connection refused, 401, not a DICOMweb server
            raise InputError(f"cannot list the series ({e.__class__.__name__}: {str(e)[:200]})", url) from None
        for rec in found:
            uid = _tag(rec, "0020000E")
            if uid:
                n = _tag(rec, "00201209")
                refs.append(SeriesRef(uid, "dicomweb", [], _tag(rec, "0020000D"), uid, _tag(rec, "00100020"), _tag(rec, "0008103E"), "CT",
                                      extra={"source": _without_credentials(url), "url": url,
                                             "instances": int(n) if n and n.isdigit() else None}))
        if len(found) < page:
            break
        offset += len(found)
    yield from sorted({r.key: r for r in refs}.values(), key=lambda r: r.key)


def series_of(source: str | Path) -> Iterator[SeriesRef]:
    """The series of a folder tree or of a DICOMweb server (``dicomweb+http://...``)."""
    if str(source).startswith("dicomweb+"):
        return dicomweb_series(str(source))
    return folder_series(source)


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
        if not is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "SeriesDescription", "Modality", "SOPInstanceUID",
                "ConvolutionKernel", "SliceThickness"])
            uid = str(ds.SeriesInstanceUID)
        except Exception as e:  # a corrupt header: its own error row
            volumes.append(SeriesRef(str(path), "dicom", [str(path)], error=f"unreadable DICOM header ({e.__class__.__name__})"))
            continue
        ref = series.get(uid)
        if ref is None:
            ref = series[uid] = SeriesRef(uid, "dicom", [], str(ds.get("StudyInstanceUID", "")) or None, uid,
                                          str(ds.get("PatientID", "")) or None, series_label(ds),
                                          str(ds.get("Modality", "")) or None)
        ref.files.append(str(path))
    for ref in series.values():
        if ref.modality and ref.modality != "CT":
            ref.error = f"not a CT series (modality {ref.modality})"
    add_siblings(list(series.values()))
    yield from sorted([*series.values(), *volumes], key=lambda r: r.key)


def add_siblings(refs: list[SeriesRef]) -> None:
    """Each CT series' other reconstructions to cross-check it against (``extra["siblings"]``: their
    files): the study's other CT series (the screening checks that they can be compared,
    :func:`ctguard.crosscheck.comparable`)."""
    by_study: dict[str, list[SeriesRef]] = {}
    for ref in refs:
        if ref.kind == "dicom" and not ref.error and ref.study_uid:
            by_study.setdefault(ref.study_uid, []).append(ref)
    for study in by_study.values():
        for ref in study:
            others = [o.files for o in study if o is not ref]
            if others:
                ref.extra["siblings"] = others
