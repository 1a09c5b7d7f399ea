"""Zip archives of scans (a series as a PACS or TCIA exports it), unpacked safely: zip slip and zip
bombs refused before anything is written."""

from __future__ import annotations

import contextlib
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from ctguard.errors import InputError


class ArchiveError(InputError):
    """A refused archive; ``too_large``: over a limit (files, bytes, compression ratio) rather than
    unreadable or unsafe."""

    def __init__(self, problem: str, path: str | Path | None = None, too_large: bool = False):
        super().__init__(problem, path)
        self.too_large = too_large

    def __reduce__(self):
        return (type(self), (self.problem, self.path, self.too_large))


@dataclass(frozen=True)
class ZipLimits:
    max_files: int = 5000
    max_unzipped_bytes: int = 8 * 1024**3
    max_zip_ratio: float = 200.0  # uncompressed / compressed, over the whole archive


def is_zip(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts as a zip archive does."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def extract_zip(archive: str | Path, dest: str | Path, limits: ZipLimits = ZipLimits()) -> list[Path]:
    """Extracts ``archive`` under ``dest``; checks every member before writing any. Returns the
    files written.

    Raises:
        ArchiveError: a corrupt zip, or a member path that is absolute, has ``..`` or is a link (zip
            slip); ``too_large`` for too many files, too many bytes, or a compression ratio of a zip bomb.
    """
    archive = Path(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"not a readable zip ({e})", archive) from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > limits.max_files:
            raise ArchiveError(f"{len(members)} files, more than the limit of {limits.max_files}", archive, too_large=True)
        total = sum(m.file_size for m in members)
        packed = max(sum(m.compress_size for m in members), 1)
        if total > limits.max_unzipped_bytes:
            raise ArchiveError(f"unpacks to {total} bytes, more than the limit of {limits.max_unzipped_bytes}", archive, too_large=True)
        if total / packed > limits.max_zip_ratio and total > 10 * 1024**2:
            raise ArchiveError(f"compression ratio {total / packed:.0f}:1 looks like a zip bomb", archive, too_large=True)
        root = Path(dest).resolve()
        targets = []
        for m in members:
            p = PurePosixPath(m.filename.replace("\\", "/"))
            mode = m.external_attr >> 16
            if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]) or stat.S_ISLNK(mode):
                raise ArchiveError(f"unsafe member path {m.filename!r} (absolute, '..' or a link)", archive)
            target = (root / Path(*p.parts)).resolve()
            if root not in target.parents:
                raise ArchiveError(f"member {m.filename!r} would land outside the folder it is unpacked to", archive)
            targets.append((m, target))
        written = 0
        for m, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > limits.max_unzipped_bytes:  # sizes in the header can lie
                        raise ArchiveError(f"unpacks to more than {limits.max_unzipped_bytes} bytes", archive, too_large=True)
                    dst.write(chunk)
        return [t for _, t in targets]


@contextlib.contextmanager
def unzipped(archive: str | Path, limits: ZipLimits = ZipLimits()) -> Iterator[tuple[Path, Path]]:
    """``archive`` unpacked into a temporary folder, removed on leaving: yields ``(what, folder)``,
    ``what`` the folder (a series, or a tree of them) or its one file when it holds only one."""
    with tempfile.TemporaryDirectory(prefix="ctguard-zip-") as tmp:
        files = extract_zip(archive, tmp, limits)
        if not files:
            raise ArchiveError("the zip is empty", archive)
        yield (files[0] if len(files) == 1 else Path(tmp)), Path(tmp)


def named_inside(text: str, folder: Path, name: str | Path) -> str:
    """``text`` (a reader's warning) naming ``name`` wherever it names ``folder`` (the temporary
    folder a zip or an upload was unpacked to), so that the user reads what they gave."""
    for f in sorted({str(folder), str(Path(folder).resolve())}, key=len, reverse=True):
        text = text.replace(f, str(name))
    return text
