"""Uploaded files into a job's folder, safely: sanitised names, zip slip and zip bombs refused."""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


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
    """Extracts ``archive`` under ``dest``; checks every member before writing any.

    Raises:
        UploadError: 400 for a corrupt zip or a member path that is absolute, has ``..`` or is a
        link (zip slip); 413 for too many files, too many bytes, or a suspicious compression ratio.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UploadError(400, f"{archive.name}: not a readable zip ({e})") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > limits.max_files:
            raise UploadError(413, f"{archive.name}: {len(members)} files, more than the limit of {limits.max_files}")
        total = sum(m.file_size for m in members)
        packed = max(sum(m.compress_size for m in members), 1)
        if total > limits.max_unzipped_bytes:
            raise UploadError(413, f"{archive.name}: unpacks to {total} bytes, more than the limit of {limits.max_unzipped_bytes}")
        if total / packed > limits.max_zip_ratio and total > 10 * 1024**2:
            raise UploadError(413, f"{archive.name}: compression ratio {total / packed:.0f}:1 looks like a zip bomb")
        root = dest.resolve()
        targets = []
        for m in members:
            p = PurePosixPath(m.filename.replace("\\", "/"))
            mode = m.external_attr >> 16
            if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]) or stat.S_ISLNK(mode):
                raise UploadError(400, f"{archive.name}: unsafe member path {m.filename!r} (absolute, '..' or a link)")
            target = (root / Path(*p.parts)).resolve()
            if root not in target.parents:
                raise UploadError(400, f"{archive.name}: member {m.filename!r} would land outside the upload folder")
            targets.append((m, target))
        written = 0
        for m, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > limits.max_unzipped_bytes:  # sizes in the header can lie
                        raise UploadError(413, f"{archive.name}: unpacks to more than {limits.max_unzipped_bytes} bytes")
                    dst.write(chunk)
        return [t for _, t in targets]


def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


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
