"""Screening results as DICOM objects: the TID 1500 SR and the tamper-probability Segmentation,
checked with a DICOM validator (dicom3tools' dciodvfy) and read back with highdicom."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from ctguard import io
from ctguard.cli import main

pytest.importorskip("highdicom")


def _validate(path) -> None:
    """dciodvfy finds no error in the object (warnings, such as our private coding scheme, are allowed)."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have dciodvfy (apt-get install dicom3tools)")
        return
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_sr_and_seg_of_a_tampered_series(tampered, tmp_path, capsys):
    import highdicom as hd

    from ctguard.report.dicom_objects import read_sr

    root, _, _ = tampered
    out = tmp_path / "dicom"
    assert main(["screen", str(root / "tampered"), "--dicom-out", str(out), "--json", str(tmp_path / "r.json"), "-q"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["verdict"] == "tampered" and result["findings"]
    sr_path, seg_path = out / "ctguard-sr.dcm", out / "ctguard-seg.dcm"
    assert result["dicom"] == {"sr": str(sr_path), "seg": str(seg_path)}
    for p in (sr_path, seg_path):
        _validate(p)
    source = pydicom.dcmread(sorted((root / "tampered").iterdir())[0], stop_before_pixels=True)
    sr, seg = pydicom.dcmread(sr_path), pydicom.dcmread(seg_path)
    for ds in (sr, seg):  # in the screened study, a series of its own
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    screened = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in (root / "tampered").iterdir()}
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == screened
    back = read_sr(sr_path)
    assert back["verdict"] == "tampered" and back["score"] == pytest.approx(result["score"], abs=1e-4)
    assert len(back["findings"]) == len(result["findings"])
    for got, want in zip(back["findings"], result["findings"]):
        assert got["kind"] == want["kind"] and got["score"] == pytest.approx(want["score"], abs=1e-4)
        assert np.allclose(got["world_mm"], want["world_mm"], atol=0.01)
        assert got["source_sop_instance_uid"] in screened
    vol = io.read(root / "tampered")
    segmentation = hd.seg.segread(seg_path)
    assert segmentation.SegmentationType == "FRACTIONAL" and int(segmentation.NumberOfFrames) == vol.shape[0]
    assert segmentation.file_meta.TransferSyntaxUID == RLELossless  # the mostly-zero map packed
    assert seg_path.stat().st_size < 0.5 * vol.hu.size  # under half of one byte a voxel, uncompressed
    probability = segmentation.get_volume(combine_segments=False)  # on the series' grid, in [0, 1]
    assert probability.array.shape[:3] == vol.shape
    inverse = np.linalg.inv(probability.affine)
    for f in result["findings"]:  # high at each finding's centre, found through the SEG's own geometry
        index = np.rint(inverse @ np.array([*f["world_mm"], 1.0]))[:3].astype(int)
        assert probability.array[tuple(index)].max() > 0.5


def test_sr_of_a_clean_series_and_non_dicom_input(tampered, tmp_path, capsys):
    from ctguard.report.dicom_objects import read_sr

    root, _, _ = tampered
    out = tmp_path / "dicom"
    assert main(["screen", str(root / "clean"), "--dicom-out", str(out), "--threshold", "0.9999", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ctguard-sr.dcm"]  # no Segmentation unless asked
    back = read_sr(out / "ctguard-sr.dcm")
    assert back["verdict"] == "clean" and back["findings"] == []
    _validate(out / "ctguard-sr.dcm")
    asked = tmp_path / "asked"
    assert main(["screen", str(root / "clean"), "--dicom-out", str(asked), "--dicom-seg", "--threshold", "0.9999", "-q"]) == 0
    assert (asked / "ctguard-seg.dcm").is_file()
    # Not a DICOM series: refused by name before screening, nothing written.
    nrrd = tmp_path / "scan.nrrd"
    io.write_itk(io.read(root / "clean"), nrrd)
    capsys.readouterr()
    assert main(["screen", str(nrrd), "--dicom-out", str(tmp_path / "none"), "-q"]) == 2
    assert "DICOM results need a DICOM series" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main(["screen", str(root / "clean"), "--dicom-seg", "-q"]) == 2
