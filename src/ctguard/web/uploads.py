"""Uploaded files into a job's folder, safely: sanitised names, zip slip and zip bombs refused."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ctguard.io.archive import ArchiveError, ZipLimits, is_zip
from ctguard.io.archive import extract_zip as unpack


class UploadError(Exception):
    """A refused upload; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 2 * 1024**3  # the whole request
    max_files: int = 5000  # files in a request or in a zip
    max_unzipped_bytes: int = 8 * 1024**3
    max_zip_ratio: float = 200.0  # uncompressed / compressed, over the whole archive


def safe_name(name: str | None, index: int) -> str:
    """A plain file name from what a browser sent (no folders, no ``..``, no control characters)."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = "".join(c for c in base if c.isprintable() and c not in '<>:"|?*').strip()
    if base in ("", ".", ".."):
        base = f"file{index:05d}"
    return base


def extract_zip(archive: Path, dest: Path, limits: Limits) -> list[Path]:
    """Extracts ``archive`` under ``dest`` (:func:`ctguard.io.archive.extract_zip`, every member
    checked before any is written) within the upload's limits.

    Raises:
        UploadError: 400 for a corrupt zip or a member path that is absolute, has ``..`` or is a
        link (zip slip); 413 for too many files, too many bytes, or a suspicious compression ratio.
    """
    try:
        return unpack(archive, dest, ZipLimits(limits.max_files, limits.max_unzipped_bytes, limits.max_zip_ratio))
    except ArchiveError as e:
        raise UploadError(413 if e.too_large else 400, f"{archive.name}: {e.problem}") from None


def screening_input(saved: list[Path], folder: Path, limits: Limits) -> Path:
    """What to screen among the uploaded files: one file as itself, a zip's content or many files
    as a folder (a DICOM series)."""
    if len(saved) == 1 and is_zip(saved[0]):
        out = folder / "unzipped"
        out.mkdir()
        files = extract_zip(saved[0], out, limits)
        saved[0].unlink()
        if not files:
            raise UploadError(400, f"{saved[0].name}: the zip is empty")
        return files[0] if len(files) == 1 else out
    return saved[0] if len(saved) == 1 else folder


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
