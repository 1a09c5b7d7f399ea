from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctguard import io
from ctguard.cli import main
from ctguard.errors import InputError


@pytest.mark.parametrize(
    "name,slices,pixel,thickness",
    [("A0001-L", 64, 0.841796875, 5.0), ("A0001-B", 64, 0.841796875, 5.0), ("A0002-B70f", 30, 0.646484375, 8.0), ("A0002-B40f", 30, 0.646484375, 8.0)],
)
def test_real_series_geometry(real_series, name, slices, pixel, thickness):
    vol = io.read(real_series[name])
    assert vol.meta["kind"] == "dicom-series"
    assert vol.shape == (slices, 512, 512)
    assert vol.spacing == pytest.approx((thickness, pixel, pixel))
    assert vol.hu.min() == -1024.0  # air outside the body, in HU after rescale
    assert 1000 < vol.hu.max() < 3100  # bone
    # Slices are in ascending position along the normal (axial: superior is +z in LPS).
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in vol.meta["files"]]
    assert np.all(np.diff(z) == pytest.approx(thickness))
    assert vol.warnings == []
    # Voxel -> world of the last slice matches that file's ImagePositionPatient.
    ipp = [float(v) for v in pydicom.dcmread(vol.meta["files"][-1], stop_before_pixels=True).ImagePositionPatient]
    assert vol.voxel_to_world((slices - 1, 0, 0)) == pytest.approx(ipp, abs=1e-3)
    assert vol.world_to_voxel(ipp) == pytest.approx([slices - 1, 0, 0], abs=1e-6)


def test_tumour_boxes_are_soft_tissue(lung_pet_ct, real_series):
    """Every annotated tumour box lands on soft-tissue density (the series is read right)."""
    checked = 0
    for patient, names in (("A0001", ["A0001-L", "A0001-B"]), ("A0002", ["A0002-B70f", "A0002-B40f"])):
        vols = [io.read(real_series[n]) for n in names]
        for xml in sorted((lung_pet_ct / "annotations" / patient).glob("*.xml")):
            uid = xml.stem
            vol = next((v for v in vols if uid in v.meta["sop_instance_uids"]), None)
            assert vol is not None, f"annotated slice {uid} not in any series"
            z = vol.meta["sop_instance_uids"].index(uid)
            for box in ET.parse(xml).getroot().iter("bndbox"):
                x0, y0, x1, y1 = (int(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
                cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
                centre = vol.hu[z, cy - 3 : cy + 4, cx - 3 : cx + 4]
                assert -150 < float(np.median(centre)) < 250, f"{xml.name}: median {np.median(centre)} HU"
                checked += 1
    assert checked == 38


def test_write_back_changes_only_pixel_data(real_series, tmp_path):
    vol = io.read(real_series["A0002-B40f"])
    hu = vol.hu.copy()
    hu[12, 200:210, 300:310] = 55.0
    out = tmp_path / "edited"
    written = io.write_back(vol.with_hu(hu), out)
    assert len(written) == 30
    back = io.read(out)
    assert np.array_equal(back.hu, hu)
    for src, dst in zip(vol.meta["files"], back.meta["files"]):
        a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
        for elem in a:
            if elem.tag != 0x7FE00010:
                assert b[elem.tag].value == elem.value, elem.tag
        raw_a, raw_b = Path(src).read_bytes(), Path(dst).read_bytes()
        assert len(raw_a) == len(raw_b)
        start = pydicom.dcmread(src).get_item(0x7FE00010).value_tell
        assert raw_a[:start] == raw_b[:start]  # every byte before PixelData is identical
    changed = [i for i, (s, d) in enumerate(zip(vol.meta["files"], back.meta["files"])) if Path(s).read_bytes() != Path(d).read_bytes()]
    assert changed == [12]


def test_write_back_refuses_existing_output(real_series, tmp_path):
    vol = io.read(real_series["A0002-B40f"])
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match="already exists"):
        io.write_back(vol, tmp_path / "x")


def test_fresh_series_round_trip(small_chest, tmp_path, monkeypatch):
    files = io.write_series(small_chest, tmp_path / "s")
    assert len(files) == small_chest.shape[0]
    back = io.read(tmp_path / "s")
    assert np.array_equal(back.hu, np.rint(small_chest.hu))
    assert back.spacing == pytest.approx(small_chest.spacing)
    assert back.origin == pytest.approx(small_chest.origin, abs=1e-3)
    # Strict reading: any value that breaks its VR's rules raises.
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    ds = pydicom.dcmread(files[0])
    for elem in ds:
        elem.value  # noqa: B018  (decoding validates)
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ImagePositionPatient",
                    "ImageOrientationPatient", "PixelSpacing", "RescaleIntercept", "RescaleSlope", "KVP", "InstanceNumber"):
        assert keyword in ds, keyword
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert len(uids) == len(files)


@pytest.mark.parametrize("suffix,kind", [(".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"), (".mhd", "mhd")])
def test_itk_round_trip(small_chest, tmp_path, suffix, kind):
    path = io.write_itk(small_chest, tmp_path / f"chest{suffix}")
    back = io.read(path)
    assert back.meta["kind"] == kind
    assert np.array_equal(back.hu, np.rint(small_chest.hu))
    assert back.spacing == pytest.approx(small_chest.spacing)
    assert back.origin == pytest.approx(small_chest.origin)


def test_png_reading_and_sniffing_by_content(tmp_path):
    from PIL import Image

    img = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)
    Image.fromarray(img).save(tmp_path / "slice.dat", format="PNG")  # wrong suffix on purpose
    vol = io.read(tmp_path / "slice.dat")
    assert vol.meta["kind"] == "image" and vol.shape == (1, 48, 64)
    assert np.array_equal(vol.hu[0], img)
    wide = (np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32)
    Image.fromarray(wide).save(tmp_path / "w.png")
    assert io.read_image(tmp_path / "w.png").max() == wide.max()


def test_resample_round_trip(small_chest):
    iso = small_chest.resampled(1.0)
    assert iso.spacing == (1.0, 1.0, 1.0)
    assert iso.shape == tuple(int(round(n * s)) for n, s in zip(small_chest.shape, small_chest.spacing))
    back = iso.resample_back()
    assert back.shape == small_chest.shape
    assert np.median(np.abs(back.hu - small_chest.hu)) < 15.0
    # World position of a voxel is preserved across the resampling.
    assert iso.voxel_to_world((4.0 * 10, 0, 0)) == pytest.approx(small_chest.voxel_to_world((10, 0, 0)))


def test_info_json(real_series, capsys):
    assert main(["info", str(real_series["A0002-B70f"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "dicom-series" and out["modality"] == "CT"
    assert out["shape"] == [30, 512, 512]
    assert out["spacing_mm"] == pytest.approx([8.0, 0.646484375, 0.646484375])
    assert out["hu_range"] == [-1024.0, 1904.0]
    assert out["series"][0]["slices"] == 30 and out["warnings"] == []
    assert out["scan"] == {"patient_id": "Lung_Dx-A0002", "study_uid": out["scan"]["study_uid"], "series_uid": out["series_uid"],
                           "study_date": "20070425", "description": "ThoraxRoutine  8.0.0  B70f", "manufacturer": "SIEMENS"}
    assert main(["info", str(real_series["A0002-B70f"])]) == 0
    text = capsys.readouterr().out
    assert "  patient            Lung_Dx-A0002\n  study date         2007-04-25\n  description        ThoraxRoutine" in text


def test_a_series_without_description_is_named_by_its_kernel_and_slices():
    """LIDC-IDRI's series have no SeriesDescription: a reader gets the kernel and slice thickness."""
    from pydicom.dataset import Dataset

    from ctguard.io.dicom import series_label

    ds = Dataset()
    assert series_label(ds) is None
    ds.SliceThickness = "2.500000"
    ds.ConvolutionKernel = "STANDARD"
    assert series_label(ds) == "STANDARD kernel, 2.5 mm slices"
    ds.ConvolutionKernel = ["B", "40f"]
    assert series_label(ds) == "B/40f kernel, 2.5 mm slices"
    ds.SeriesDescription = " Chest 1.25 "
    assert series_label(ds) == "Chest 1.25"


def test_folder_with_two_series_warns_and_series_picks(real_series, capsys):
    patient = real_series["A0001-L"].parents[1]
    assert main(["info", str(patient), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["series"]) == 2 and "2 series found" in out["warnings"][0]
    other = out["series"][1]["uid"]
    assert main(["info", str(patient), "--json", "--series", other]) == 0
    assert json.loads(capsys.readouterr().out)["series_uid"] == other
    assert main(["info", str(patient), "--series", "1.2.3"]) == 2
    assert "no series 1.2.3" in capsys.readouterr().err


def test_a_folder_is_read_at_its_largest_axial_series(small_chest, tmp_path):
    """A study folder with an axial series and a coronal reformat of it with more slices: the
    axial one is read (the detector reads axial scans), and the series list names each one's plane."""
    from ctguard.tamper.simulate import coronal_reformat

    coronal = coronal_reformat(small_chest, thickness_mm=1.0)
    assert coronal.shape[0] > small_chest.shape[0]
    axial_files = io.write_series(small_chest, tmp_path / "study" / "axial", uid_seed="axial")
    io.write_series(coronal, tmp_path / "study" / "coronal", uid_seed="coronal")
    vol = io.read(tmp_path / "study")
    assert vol.meta["series_uid"] == pydicom.dcmread(axial_files[0]).SeriesInstanceUID
    assert sorted(s["plane"] for s in vol.meta["series"]) == ["axial", "coronal"]
    assert "read the largest axial one" in vol.warnings[0] and "coronal)" in vol.warnings[0]


def _expect_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert fragment in err, err
    return err


def test_bad_inputs(tmp_path, capsys, small_chest):
    (tmp_path / "notes.txt").write_text("hello")
    _expect_error(capsys, ["info", str(tmp_path / "notes.txt")], "not a recognised")
    (tmp_path / "empty").mkdir()
    _expect_error(capsys, ["info", str(tmp_path / "empty")], "folder is empty")
    _expect_error(capsys, ["info", str(tmp_path / "missing")], "does not exist")
    files = io.write_series(small_chest, tmp_path / "s")
    # Non-CT modality: refused unless --allow-modality.
    mr = tmp_path / "mr.dcm"
    ds = pydicom.dcmread(files[0]); ds.Modality = "MR"; ds.save_as(mr)
    _expect_error(capsys, ["info", str(mr)], "modality is MR")
    assert main(["info", str(mr), "--allow-modality"]) == 0
    capsys.readouterr()
    # Missing pixel data.
    nopix = tmp_path / "nopix.dcm"
    ds = pydicom.dcmread(files[0]); del ds.PixelData; ds.save_as(nopix)
    _expect_error(capsys, ["info", str(nopix)], "has no pixel data")
    # Truncated file.
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(Path(files[0]).read_bytes()[:5000])
    err = _expect_error(capsys, ["info", str(trunc)], "trunc.dcm")
    assert "pixel data cannot be decoded" in err
    # Mixed orientations in one series.
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "s", mixed)
    one = sorted(mixed.glob("*.dcm"))[3]
    ds = pydicom.dcmread(one); ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]; ds.save_as(one)
    _expect_error(capsys, ["info", str(mixed)], "mixed slice orientations")



def test_two_versions_of_one_series_are_not_read_as_one(tmp_path, capsys, small_chest):
    """A folder holding a series twice, as the simulator writes an untouched copy and a tampered
    one under the same UIDs: identical copies read as one; where one slice differs, neither
    version nor a mixture is screened (the other would pass unseen), and the error names both files."""
    files = io.write_series(small_chest, tmp_path / "a" / "s")
    shutil.copytree(tmp_path / "a" / "s", tmp_path / "a" / "copy")
    vol = io.read(tmp_path / "a")
    assert vol.shape == small_chest.shape and np.array_equal(vol.hu, np.rint(small_chest.hu))
    assert any(f"{small_chest.shape[0]} identical slices at duplicate positions dropped" in w for w in vol.warnings)
    changed = tmp_path / "a" / "copy" / Path(files[5]).name
    ds = pydicom.dcmread(changed)
    pixels = ds.pixel_array.copy()
    pixels[10, 10] += 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(changed)
    err = _expect_error(capsys, ["screen", "-q", str(tmp_path / "a")], "two different images at one place")
    assert f"copy/{changed.name}" in err and f"s/{changed.name}" in err
    with pytest.raises(InputError, match="two versions of one series"):
        io.read(tmp_path / "a")
    # The same pixels stored another way (a rescale that gives the same HU) are the same image.
    ds = pydicom.dcmread(files[5])
    stored = ds.pixel_array.astype(np.int32)
    ds.PixelData = (stored + 1000).astype(ds.pixel_array.dtype).tobytes()
    ds.RescaleIntercept = float(ds.RescaleIntercept) - 1000
    ds.save_as(changed)
    assert np.array_equal(io.read(tmp_path / "a").hu, vol.hu)


def test_a_localizer_is_refused_and_left_out_of_an_axial_series(tmp_path, capsys, small_chest):
    """A scout (Image Type LOCALIZER: the projection a scan is planned on) is not a cross-section:
    alone, as a file or a series, it is refused with the reason; kept under the axial series' UID,
    it is left out of the volume with a warning."""
    files = io.write_series(small_chest, tmp_path / "s")
    ds = pydicom.dcmread(files[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImagePositionPatient = [0.0, -200.0, 500.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal, as an AP scout is
    scout = tmp_path / "scout" / "1.dcm"
    scout.parent.mkdir()
    ds.save_as(scout)
    _expect_error(capsys, ["info", str(scout)], "a localizer (scout) image: a projection")
    _expect_error(capsys, ["screen", "-q", str(scout.parent)], "a localizer (scout) series: a projection")
    shutil.copy(scout, tmp_path / "s" / "scout.dcm")
    vol = io.read(tmp_path / "s")
    assert vol.shape == small_chest.shape and np.array_equal(vol.hu, np.rint(small_chest.hu))
    assert any("1 localizer (scout) image of series" in w for w in vol.warnings)

@pytest.mark.parametrize("spacing, new", [((5.0, 0.842, 0.842), (1.0, 1.0, 1.0)), ((0.7, 1.3, 2.5), (1.0, 0.9, 2.0)),
                                          ((8.0, 0.646, 0.646), (3.0, 3.0, 3.0))])
def test_resample_nearest_matches_order0_interpolation(spacing, new):
    """The index-lookup resampling the screener uses for lung masks picks the very voxels scipy's
    order-0 interpolation picks (on a random mask, so every voxel counts)."""
    from ctguard.volume import resample_array, resample_nearest

    mask = np.random.default_rng(0).random((23, 41, 37)) < 0.5
    fast = resample_nearest(mask, spacing, new)
    assert fast.dtype == bool and np.array_equal(fast, resample_array(mask.astype(np.float32), spacing, new, order=0) > 0.5)


@pytest.mark.parametrize("spacing, new, shape", [((5.0, 0.842, 0.842), (1.0, 1.0, 1.0), None), ((0.7, 1.3, 2.5), (1.0, 0.9, 2.0), None),
                                                 ((8.0, 0.646, 0.646), (3.0, 3.0, 3.0), None), ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (30, 20, 37))])
def test_linear_resampling_matches_scipy_trilinear(spacing, new, shape):
    """Separable linear resampling gives scipy's trilinear values (order 1, edges clamped) to float32
    rounding, on random HU, where every voxel counts; an unchanged axis is copied, never aliased."""
    from scipy import ndimage

    from ctguard.volume import resample_array

    hu = np.random.default_rng(1).uniform(-1000, 400, (23, 41, 37)).astype(np.float32)
    want = shape or tuple(max(1, int(round(n * s / t))) for n, s, t in zip(hu.shape, spacing, new))
    ref = ndimage.affine_transform(hu, np.asarray(new) / np.asarray(spacing), output_shape=want, order=1, mode="nearest")
    got = resample_array(hu, spacing, new, shape=shape)
    assert got.shape == want and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-3  # HU
    same = resample_array(hu, new, new, shape=shape and hu.shape)  # nothing to resample: a copy, never hu itself
    same[...] = 0
    assert hu.any()
    # Into a given array (the screener resamples into a view of the network's padded input): the same
    # voxels, written there and nowhere else.
    pad = np.full([n + 3 for n in want], 7.0, dtype=np.float32)
    view = pad[: want[0], : want[1], : want[2]]
    assert resample_array(hu, spacing, new, shape=shape, out=view) is view
    assert np.array_equal(view, got) and (pad[want[0] :] == 7).all() and (pad[:, want[1] :] == 7).all() and (pad[:, :, want[2] :] == 7).all()
    with pytest.raises(ValueError, match="out must be"):
        resample_array(hu, spacing, new, shape=want, out=np.zeros((2, 2, 2), np.float32))


def test_a_closed_pipe_ends_the_command_quietly():
    """``ctguard list-models | head -1``: the reader goes before the output is written; the command
    stops with 141 (128 + SIGPIPE) and says nothing, as Unix tools do, instead of 'failed:
    BrokenPipeError'."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "ctguard.cli", "list-models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read()
    p.stderr.close()
    assert (p.wait(), err) == (141, b"")


def test_series_and_trust_are_not_dropped_without_a_word(tmp_path, small_chest):
    """--series picks one of a DICOM folder's series: on any other input it is an error, not left
    unused; --trust on an input with no DICOM signatures says so in the result's warnings."""
    from ctguard import api

    path = io.write_itk(small_chest, tmp_path / "chest.nrrd")
    with pytest.raises(InputError, match="picks one of a DICOM folder's series; this is a nrrd file"):
        io.read(path, series_uid="1.2.3")
    files = io.write_series(small_chest, tmp_path / "series", uid_seed="s")
    with pytest.raises(InputError, match="no series 1.2.3: this file is of series"):
        io.read(files[0], series_uid="1.2.3")
    assert io.read(files[0], series_uid=str(pydicom.dcmread(files[0]).SeriesInstanceUID)).shape[0] == 1
    result = api.screen(path, trust=tmp_path / "certs.pem")
    assert any("no DICOM signatures to judge by the trusted certificates" in w for w in result["warnings"])
