"""Zipped series (as a PACS or TCIA exports them): screened and described as their folders are, and
unpacked safely."""
from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import pytest

from ctguard.cli import main
from ctguard.io.archive import ArchiveError, ZipLimits, extract_zip


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_zipped_series_is_screened_as_its_folder(tampered, tmp_path, capsys):
    root, _, _ = tampered
    members = {f"export/series/{f.name}": f.read_bytes() for f in sorted((root / "tampered").iterdir())}
    archive = _zip(tmp_path / "series.zip", {**members, "export/README.txt": b"exported by a PACS"})
    left_before = set(Path(tempfile.gettempdir()).glob("ctguard-zip-*"))
    assert main(["screen", str(archive), "--json", str(tmp_path / "zip.json"), "-q"]) == 0
    assert main(["screen", str(root / "tampered"), "--json", str(tmp_path / "folder.json"), "-q"]) == 0
    zipped, folder = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("zip", "folder"))
    assert zipped["verdict"] == folder["verdict"] == "tampered" and zipped["findings"] == folder["findings"]
    assert zipped["input"] == str(archive)
    assert f"{archive}: 1 non-DICOM file skipped (e.g. README.txt)" in zipped["warnings"]
    assert "ctguard-zip-" not in (tmp_path / "zip.json").read_text()  # never the temporary folder
    assert set(Path(tempfile.gettempdir()).glob("ctguard-zip-*")) == left_before  # removed once screened
    # Given places are scored from the zip as from the folder, alone and beside the whole screening.
    (tmp_path / "places.csv").write_text("z,y,x\n" + "".join(f"{f['voxel'][0]},{f['voxel'][1]},{f['voxel'][2]}\n" for f in folder["findings"]))
    assert main(["screen", str(root / "tampered"), "--locations", str(tmp_path / "places.csv"), "--scores-out", str(tmp_path / "folder.csv"), "-q"]) == 0
    assert main(["screen", str(archive), "--locations", str(tmp_path / "places.csv"), "--scores-out", str(tmp_path / "zip.csv"), "-q"]) == 0
    assert (tmp_path / "zip.csv").read_text() == (tmp_path / "folder.csv").read_text()
    assert main(["screen", str(archive), "--locations", str(tmp_path / "places.csv"), "--scores-out", str(tmp_path / "zip2.csv"),
                 "--json", str(tmp_path / "zip2.json"), "-q"]) == 0
    assert (tmp_path / "zip2.csv").read_text() == (tmp_path / "folder.csv").read_text()
    assert json.loads((tmp_path / "zip2.json").read_text())["findings"] == folder["findings"]
    capsys.readouterr()
    assert main(["info", str(archive), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["kind"] == "dicom-series" and described["shape"] == folder["shape"]


def test_unsafe_or_oversized_zips_are_refused_before_anything_is_written(tmp_path, capsys):
    dest = tmp_path / "out"
    dest.mkdir()
    for members, words, too_large in (({"ok.dcm": b"x", "../../evil.dcm": b"x"}, "unsafe member path", False),
                                      ({"/etc/evil.dcm": b"x"}, "unsafe member path", False),
                                      ({f"f{i}.dcm": b"x" for i in range(6)}, "more than the limit of 5", True)):
        archive = _zip(tmp_path / "a.zip", members)
        with pytest.raises(ArchiveError, match=words) as e:
            extract_zip(archive, dest, ZipLimits(max_files=5))
        assert e.value.too_large == too_large and e.value.path == str(archive)
        assert not any(dest.iterdir())
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    assert main(["screen", str(tmp_path / "broken.zip"), "-q"]) == 2
    assert "broken.zip: not a readable zip" in capsys.readouterr().err
