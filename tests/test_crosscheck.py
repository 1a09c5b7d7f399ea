"""The cross-check of two reconstructions of one acquisition (ctguard.crosscheck), on Lung-PET-CT-Dx
A0002's two series (B70f and B40f kernels of one acquisition)."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pydicom
import pytest

from ctguard import io
from ctguard.cli import main
from ctguard.crosscheck import OBLIQUE, comparable, cross_check, onto
from ctguard.engine.train_verifier import near
from ctguard.lung import lung_depth, lung_mask
from ctguard.tamper.families import remove_healthy
from ctguard.tamper.simulate import Source, coronal_reformat, inject_random, thick_slice_source
from ctguard.volume import Volume


def first_file(folder):
    return sorted(folder.glob("*.dcm"))[0]


@pytest.fixture(scope="module")
def pair(real_series):
    sharp, smooth = io.read(real_series["A0002-B70f"]), io.read(real_series["A0002-B40f"])
    return sharp, smooth, lung_mask(sharp)


def test_two_untouched_reconstructions_agree(pair, real_series):
    """Two kernels of one acquisition: one noise filtered two ways, correlated all over the lungs,
    no disagreement; series of another patient's frame of reference, or of another grid, are not
    compared; one of the same grid whose noise is not this one's is not one acquisition's."""
    sharp, smooth, lungs = pair
    assert comparable(sharp, smooth) is None
    found = cross_check(sharp, smooth, lungs)
    assert found["correlation"] > 0.9 and found["disagreements"] == [] and "skipped" not in found
    assert comparable(sharp, io.read(real_series["A0001-L"])) == "another frame of reference"
    turn = np.radians(30)  # about the body's long axis: an oblique reformat, whose axes are none of the series'
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
    assert comparable(sharp, replace(smooth, direction=rotation @ np.asarray(smooth.direction))) == OBLIQUE
    other = cross_check(sharp, replace(smooth, hu=np.roll(smooth.hu, 5, axis=2)), lungs)  # 3 mm off: the same anatomy, other noise
    assert other["disagreements"] == [] and "not two reconstructions of one acquisition" in other["skipped"]
    from ctguard import api

    assert api.cross_check(real_series["A0002-B70f"], real_series["A0002-B40f"]) == found  # the same, from the folders
    assert api.cross_check(sharp, real_series["A0001-B"])["skipped"] == "another frame of reference"


@pytest.mark.parametrize("how", ["drawn", "fill", "clone"])
def test_an_edit_in_one_reconstruction_is_where_the_two_disagree(pair, how):
    """A nodule drawn into one series, or healthy lung in-painted in it (which leaves the density
    as it was), is found where the two reconstructions stop correlating, and nowhere else; the
    difference in density says which way a nodule went."""
    sharp, smooth, lungs = pair
    rng = np.random.default_rng(11)
    if how == "drawn":
        edited, edits = inject_random(sharp, lungs, rng, n=1)
    else:
        edited, edits = remove_healthy(sharp, lung_depth(sharp, lungs), rng, 1, how)
    (edit,) = [e.to_dict() for e in edits]
    found = cross_check(replace(sharp, hu=edited.hu), smooth, lungs)
    assert found["correlation"] > 0.9 and len(found["disagreements"]) == 1
    (d,) = found["disagreements"]
    assert near(d["voxel"], edit["voxel"], edit["diameter_mm"], sharp.spacing) and d["correlation"] < 0.3
    if how == "drawn":
        assert d["hu_difference"] > 100  # denser in the series edited
        back = cross_check(smooth, replace(sharp, hu=edited.hu), lung_mask(smooth))["disagreements"]
        assert len(back) == 1 and back[0]["hu_difference"] < -100  # and less dense in the other


def test_screening_a_study_cross_checks_its_reconstructions(pair, real_series, tmp_path, capsys):
    """``ctguard screen STUDY`` screens one series and cross-checks it against the folder's other
    reconstruction: a nodule drawn into the other one (which the series screened does not hold) is
    a disagreement that makes the study tampered, with the detector's scores of the place in both;
    ``--no-cross-check`` leaves it out."""
    sharp, smooth, lungs = pair
    edited, edits = inject_random(sharp, lungs, np.random.default_rng(3), n=1)
    io.write_back(replace(sharp, hu=edited.hu), tmp_path / "study" / "sharp")
    shutil.copytree(real_series["A0002-B40f"], tmp_path / "study" / "smooth")
    scout = pydicom.dcmread(first_file(real_series["A0002-B40f"]))  # the study's scout, a series of its own: not cross-checked
    scout.ImageType, scout.SeriesInstanceUID = ["ORIGINAL", "PRIMARY", "LOCALIZER"], "1.2.826.0.1.3680043.8.498.1"
    scout.save_as(tmp_path / "study" / "scout.dcm")
    uid = smooth.meta["series_uid"]
    assert main(["screen", "-q", str(tmp_path / "study"), "--series", uid, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "TAMPERED" in out and "DISAGREES at 1 place" in out and "injected into the other" in out
    import json

    result = json.loads((tmp_path / "r.json").read_text())
    (check,) = result["cross_check"]
    assert check["series_uid"] == sharp.meta["series_uid"] and check["description"] == "ThoraxRoutine  8.0.0  B70f"
    (d,) = check["disagreements"]
    assert near(d["voxel"], edits[0].voxel, edits[0].diameter_mm, sharp.spacing)
    this, other = d["scores"]["this"], d["scores"]["other"]
    assert 1 - other[0] > 1 - this[0] and other[1] > other[2]  # the detector: injected in the other series, not here
    assert main(["screen", "-q", str(tmp_path / "study"), "--series", uid, "--no-cross-check", "--json", str(tmp_path / "n.json")]) == 0
    assert "cross-checked" not in capsys.readouterr().out and "cross_check" not in json.loads((tmp_path / "n.json").read_text())


def test_an_audit_cross_checks_each_series_against_its_studys_other_reconstruction(pair, real_series, tmp_path):
    """An archive audit gives each CT series its study's other reconstructions to cross-check it
    against: with a nodule drawn into one of A0002's two series, both rows are tampered (each
    disagrees with the other), the disagreement is in the row, the report and the CSV. Results
    written before the cross-check had its column are resumed, the column added."""
    import sqlite3

    from ctguard.audit.store import Results

    sharp, smooth, lungs = pair
    edited, edits = inject_random(sharp, lungs, np.random.default_rng(3), n=1)
    io.write_back(replace(sharp, hu=edited.hu), tmp_path / "pacs" / "study" / "sharp")
    shutil.copytree(real_series["A0002-B40f"], tmp_path / "pacs" / "study" / "smooth")
    db = tmp_path / "audit.sqlite"
    con = sqlite3.connect(db)  # a results file of before: no cross_check column
    con.execute("CREATE TABLE series (key TEXT NOT NULL, pixel_hash TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL, "
                "study_uid TEXT, series_uid TEXT, patient_id TEXT, description TEXT, source TEXT, slices INTEGER, verdict TEXT, "
                "score REAL, findings TEXT, signatures TEXT, seconds REAL, error TEXT, screened_at TEXT, PRIMARY KEY (key, pixel_hash, model_version))")
    con.commit()
    con.close()
    assert main(["audit", str(tmp_path / "pacs"), "--results", str(db), "-q"]) == 0
    rows = {r["series_uid"]: r for r in Results(db).rows()}
    assert {r["verdict"] for r in rows.values()} == {"tampered"}
    for uid, other in ((sharp.meta["series_uid"], smooth), (smooth.meta["series_uid"], sharp)):
        (check,) = rows[uid]["cross_check"]
        assert check["series_uid"] == other.meta["series_uid"]
        (d,) = check["disagreements"]
        assert near(d["voxel"], edits[0].voxel, edits[0].diameter_mm, sharp.spacing)
    assert main(["audit-report", str(db), "--out", str(tmp_path / "report"), "-q"]) == 0
    assert (tmp_path / "report" / "index.html").read_text().count("disagrees with ThoraxRoutine") == 2
    header, *lines = (tmp_path / "report" / "series.csv").read_text().splitlines()
    assert "cross_check" in header.split(",") and len(lines) == 2
    hu = {uid: rows[uid]["cross_check"][0]["disagreements"][0]["hu_difference"] for uid in rows}
    assert hu[sharp.meta["series_uid"]] > 100 and hu[smooth.meta["series_uid"]] < -100  # the nodule is in the sharp series



def test_onto_brings_a_series_onto_another_grid():
    """Each slice of the coarser grid is the mean of the finer series' slices over its thickness, at
    its own pixel centres; voxels the finer series does not cover (past its slices or its field of
    view) are marked so."""
    z, y, x = np.meshgrid(np.arange(12), np.arange(40), np.arange(50), indexing="ij")
    # 12 slices of 1.25 mm from z = 0 (they cover -0.625 to 14.375 mm), pixels of 0.8 mm: HU = 8 z + 0.625 x, in mm
    fine = Volume((10.0 * z + 0.5 * x).astype(np.float32), (1.25, 0.8, 0.8), (0.0, 0.0, 0.0))
    # 7 slices of 2.5 mm from z = 0.625 mm, rows of 1 mm from y = 3 mm, columns of 1.5 mm from x = 4 mm
    coarse = Volume(np.zeros((7, 40, 20), np.float32), (2.5, 1.0, 1.5), (4.0, 3.0, 0.625), meta={"slice_thickness": 2.5})
    out, covered = onto(fine, coarse)
    rows_inside = 3.0 + np.arange(40) <= 39 * 0.8
    assert np.array_equal(covered, np.broadcast_to((np.arange(7) < 6)[:, None, None] & rows_inside[None, :, None], covered.shape))
    k, _, j = np.meshgrid(np.arange(7), np.arange(40), np.arange(20), indexing="ij")
    expected = 8 * (0.625 + 2.5 * k) + 0.625 * (4.0 + 1.5 * j)
    assert np.allclose(out[covered], expected[covered], atol=1e-3)


def test_a_thin_and_a_thick_series_are_cross_checked_on_the_thick_one(pair):
    """A0002's sharp kernel (8 mm slices) against its smooth kernel made 16 mm thick: the untouched
    pair agrees; a nodule drawn into the sharp one is where they disagree, placed in the sharp
    series' own voxels, whichever of the two is screened."""
    sharp, smooth, lungs = pair
    thick = thick_slice_source(Source("A0002", smooth, "A0002", []), 2).volume
    assert comparable(sharp, thick) is None
    agree = cross_check(sharp, thick, lungs)
    assert agree["correlation"] > 0.8 and agree["disagreements"] == []
    edited, edits = inject_random(sharp, lungs, np.random.default_rng(11), n=1, sizes=(12.0, 16.0))
    (edit,) = [e.to_dict() for e in edits]
    (d,) = cross_check(replace(sharp, hu=edited.hu), thick, lungs)["disagreements"]
    assert near(d["voxel"], edit["voxel"], edit["diameter_mm"], sharp.spacing) and d["hu_difference"] > 100
    (back,) = cross_check(thick, replace(sharp, hu=edited.hu), lung_mask(thick))["disagreements"]
    assert near(thick.world_to_voxel(sharp.voxel_to_world(edit["voxel"])), back["voxel"], edit["diameter_mm"], thick.spacing)
    assert back["hu_difference"] < -100


def test_screening_a_study_of_thin_and_thick_series(pair, tmp_path, capsys):
    """``ctguard screen`` of a study's thick series beside its thin one with a nodule drawn into the
    thin one: the two are cross-checked on the thick grid, disagree at the nodule, and the detector
    scores the place in each series on that series' own voxels."""
    import json

    sharp, smooth, lungs = pair
    edited, edits = inject_random(sharp, lungs, np.random.default_rng(3), n=1, sizes=(12.0, 16.0))
    io.write_back(replace(sharp, hu=edited.hu), tmp_path / "study" / "sharp")
    thick = thick_slice_source(Source("A0002", smooth, "A0002", []), 2).volume
    for f in io.write_series(thick, tmp_path / "study" / "thick", uid_seed="thick"):  # the thick series, filed in the study
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = smooth.meta["study_uid"], smooth.meta["frame_of_reference_uid"]
        ds.save_as(f)
    uid = pydicom.dcmread(first_file(tmp_path / "study" / "thick")).SeriesInstanceUID
    assert main(["screen", "-q", str(tmp_path / "study"), "--series", uid, "--json", str(tmp_path / "r.json")]) == 0
    assert "DISAGREES at 1 place" in capsys.readouterr().out
    (check,) = json.loads((tmp_path / "r.json").read_text())["cross_check"]
    (d,) = check["disagreements"]
    at = thick.world_to_voxel(sharp.voxel_to_world(edits[0].voxel))
    assert near(d["voxel"], at, edits[0].diameter_mm, thick.spacing) and d["hu_difference"] < -100
    this, other = d["scores"]["this"], d["scores"]["other"]
    assert 1 - other[0] > 1 - this[0]  # scored on the thin series' voxels, where the nodule is


def test_an_axial_series_and_its_coronal_reformat(lidc, tmp_path):
    """LIDC-IDRI-0001's axial series (2.5 mm) and a coronal reformat of it (3 mm slabs), filed as
    DICOM in its frame of reference: compared on the reformat's grid, the untouched pair agrees; a
    nodule drawn into the axial series is where they disagree, placed in the axial series' voxels."""
    from ctguard import api

    folder = next(p for p in (lidc / "LIDC-IDRI-0001").rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    axial = io.read(folder)
    coronal = coronal_reformat(axial)
    assert coronal.shape[0] > 100 and np.allclose(np.asarray(coronal.direction)[:, 2], np.asarray(axial.direction)[:, 1])
    for f in io.write_series(coronal, tmp_path / "coronal", uid_seed="coronal"):
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = axial.meta["frame_of_reference_uid"]
        ds.save_as(f)
    agree = api.cross_check(folder, tmp_path / "coronal")
    assert agree["correlation"] > 0.9 and agree["disagreements"] == [] and "skipped" not in agree
    lungs = lung_mask(axial)
    edited, edits = inject_random(axial, lungs, np.random.default_rng(1), n=1, sizes=(12.0, 16.0))
    (d,) = api.cross_check(replace(axial, hu=edited.hu), tmp_path / "coronal")["disagreements"]
    assert near(d["voxel"], edits[0].voxel, edits[0].diameter_mm, axial.spacing) and d["hu_difference"] > 100
    # Screened as a study (the edited axial series beside the reformat): the detector scores the
    # place in both, the reformat in axial order, and scores it edited in the axial series only.
    io.write_back(replace(axial, hu=edited.hu), tmp_path / "study" / "axial")
    shutil.copytree(tmp_path / "coronal", tmp_path / "study" / "coronal")
    result = api.screen(tmp_path / "study")
    assert result["scan"]["series_uid"] == axial.meta["series_uid"] and result["verdict"] == "tampered"
    (check,) = result["cross_check"]
    (d,) = check["disagreements"]
    this, other = d["scores"]["this"], d["scores"]["other"]
    assert 1 - this[0] > 0.5 > 1 - other[0]


def test_a_coronal_reformat_is_screened_in_axial_order(lidc, tmp_path):
    """The detector reads axial cubes: a coronal reformat (of LIDC-IDRI-0001, untouched) screened as
    it lies gave false findings; in axial order it is clean. With two nodules drawn into the
    reformat, a finding lies at one, given on the reformat's own voxels, and its report and DICOM
    results (the SEG's heatmap on its voxels) are written."""
    from ctguard import api

    folder = next(p for p in (lidc / "LIDC-IDRI-0001").rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    coronal = coronal_reformat(io.read(folder))
    io.write_series(coronal, tmp_path / "clean", uid_seed="coronal")
    clean = api.screen(tmp_path / "clean")
    assert clean["verdict"] == "clean" and clean["shape"] == list(coronal.shape)
    assert any("screened in axial order" in w for w in clean["warnings"])
    edited, edits = inject_random(coronal, lung_mask(coronal), np.random.default_rng(1), n=2, sizes=(10.0, 18.0))
    io.write_series(replace(coronal, hu=edited.hu), tmp_path / "edited", uid_seed="edited")
    found = api.screen(tmp_path / "edited", report_dir=tmp_path / "report", dicom_out=tmp_path / "dicom")
    assert found["verdict"] == "tampered" and (tmp_path / "report" / "index.html").is_file()
    assert any(near(f["voxel"], e.voxel, e.diameter_mm, coronal.spacing) for f in found["findings"] for e in edits)
    seg = pydicom.dcmread(found["dicom"]["seg"])
    assert seg.NumberOfFrames == coronal.shape[0] and (seg.Rows, seg.Columns) == coronal.shape[1:]
