from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from ctguard import io
from ctguard.cli import main
from ctguard.errors import InputError
from ctguard.lung import lung_mask, parenchyma_sites
from ctguard.tamper.inject import NoduleInjector
from ctguard.tamper.nodules import NoduleSpec
from ctguard.tamper.remove import LesionRemover


@pytest.fixture(scope="module")
def chest():
    from ctguard.data.phantom import make_chest

    return make_chest((48, 112, 112), (3.0, 3.0, 3.0), seed=21, nodules=[{"fraction": (0.5, 0.45, 0.3), "diameter_mm": 14, "kind": "solid"}])


def _dist_mm(vol, centre):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1)
    return np.linalg.norm((grid - centre) * np.asarray(vol.spacing), axis=-1)


@pytest.mark.parametrize("kind", ["solid", "spiculated", "part-solid", "lobulated"])
def test_injection_facts(chest, kind):
    lungs = lung_mask(chest)
    site = parenchyma_sites(chest, lungs, 12.0)[0].astype(float)
    new, edit = NoduleInjector(NoduleSpec(kind, 14.0, 3), lungs=lungs)(chest, site, np.random.default_rng(0))
    diff = new.hu - chest.hu
    dist = _dist_mm(chest, site)
    assert np.all(diff >= 0), "injection darkened a voxel"
    assert np.all(diff[dist >= edit.radius_mm] == 0), "a voxel beyond the blending radius changed"
    assert edit.changed_voxels == int((diff != 0).sum()) > 20
    c = tuple(np.rint(site).astype(int))
    assert -250 < new.hu[c] < 200 if kind != "part-solid" else new.hu[c] > -650  # soft tissue at the centre
    assert chest.hu[c] < -650  # it was parenchyma before
    # The change is centred on the labelled place.
    weights = np.clip(diff, 0, None)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in chest.shape], indexing="ij"), -1)
    centroid = (grid * weights[..., None]).sum((0, 1, 2)) / weights.sum()
    assert np.linalg.norm((centroid - site) * np.asarray(chest.spacing)) < 4.0


def test_removal_brings_lung_levels(chest):
    nod = chest.meta["phantom"]["nodules"][0]
    centre = np.asarray(nod["voxel"])
    dist = _dist_mm(chest, centre)
    mask = dist <= 9.0
    new, edit = LesionRemover(mask=mask)(chest, centre, np.random.default_rng(1))
    core = dist <= 5.0
    assert chest.hu[core].mean() > -100  # a solid nodule before
    shell = (dist > 12) & (dist < 25) & (chest.hu < -600)
    lo, hi = np.percentile(chest.hu[shell], [5, 95])
    assert lo < new.hu[core].mean() < hi  # parenchyma density after
    assert new.hu[core].std() < 3 * chest.hu[shell].std()
    assert np.all(new.hu[dist >= edit.radius_mm] == chest.hu[dist >= edit.radius_mm])


def test_bad_tamper_requests(chest):
    lungs = lung_mask(chest)
    inj = NoduleInjector(NoduleSpec("solid", 10.0, 0), lungs=lungs)
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="outside the volume"):
        inj(chest, np.array([100.0, 5, 5]), rng)
    with pytest.raises(InputError, match="not inside the lungs"):
        inj(chest, np.array([24.0, 56, 56]), rng)  # the mediastinum
    edge = np.argwhere(lungs & (np.abs(np.gradient(lungs.astype(float), axis=2)) > 0))[0].astype(float)
    with pytest.raises(InputError, match="does not fit"):
        NoduleInjector(NoduleSpec("solid", 30.0, 0), lungs=lungs)(chest, edge, rng)
    with pytest.raises(InputError, match="mask has shape"):
        LesionRemover(mask=np.zeros((3, 3, 3), bool))(chest, np.array([24.0, 50, 30]), rng)
    with pytest.raises(ValueError, match="outside 4.0-30.0 mm"):
        NoduleSpec("solid", 45.0)


def test_simulate_real_series_changes_only_pixel_data(real_series, lung_pet_ct, tmp_path):
    out = tmp_path / "sim"
    assert main(["simulate", str(real_series["A0002-B40f"]), "--annotations", str(lung_pet_ct / "annotations"),
                 "--out", str(out), "--inject", "1", "--remove", "1", "--seed", "4", "-q"]) == 0
    from ctguard.data.ctgan import load_dataset

    scans = {s.label: s for s in load_dataset(out)}
    assert set(scans) == {"TM", "FM", "FB"}
    src_files = io.read(real_series["A0002-B40f"]).meta["files"]
    for label in ("FM", "FB"):
        files = [scans[label].folder / f"{z}.dcm" for z in range(30)]
        changed = 0
        for a, b in zip(src_files, files):
            ra, rb = Path(a).read_bytes(), Path(b).read_bytes()
            start = pydicom.dcmread(a).get_item(0x7FE00010).value_tell
            assert len(ra) == len(rb) and ra[:start] == rb[:start]
            changed += ra != rb
        assert changed >= 1
        vol = io.read(scans[label].folder)
        z, y, x = scans[label].locations[0]
        before = io.read(real_series["A0002-B40f"]).hu[z, y, x]
        assert (vol.hu[z, y, x] > before + 300) if label == "FM" else (vol.hu[z, y, x] < before - 300)


def test_simulate_says_when_a_scan_has_no_tumour_to_remove(small_chest, tmp_path, capsys):
    """A removal asked for on a scan with no known tumour is said, not silently dropped."""
    io.write_itk(small_chest, tmp_path / "chest.nii.gz")
    assert main(["simulate", str(tmp_path / "chest.nii.gz"), "--out", str(tmp_path / "a"), "--inject", "0", "--remove", "1", "-q"]) == 0
    said = capsys.readouterr().out
    assert "chest.nii.gz: no known tumour (--annotations names them), so no removal copy of it" in said
    assert "wrote 1 scans" in said and "FB 0" in said


def test_simulate_other_edit_families(tmp_path, capsys):
    """``--inject-families``, ``--remove-families`` and ``--healthy``: a real tumour moved, a tumour
    erased by cloning healthy lung, and healthy lung in-painted, each recorded with its family; a
    family the simulator does not make is refused before anything is read or written."""
    import json

    from ctguard.tamper.simulate import phantom_source

    seed = next(s for s in range(20) if phantom_source(s * 1000).tumours)  # --phantoms 1 with --seed s has a tumour
    out = tmp_path / "sim"
    assert main(["simulate", "--phantoms", "1", "--seed", str(seed), "--out", str(out), "--inject", "1", "--remove", "1", "--healthy", "1",
                 "--inject-families", "moved", "--remove-families", "clone", "-q"]) == 0
    assert "TM 1, FB 2, FM 1" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["inject_families"], manifest["remove_families"], manifest["healthy"]) == (["moved"], ["clone"], 1)
    made = [(s["label"], e["extra"].get("family"), e["extra"].get("target", "lung")) for s in manifest["scans"] for e in s["edits"]]
    assert sorted(made) == [("FB", "clone", "healthy"), ("FB", "clone", "tumour"), ("FM", "moved", "lung")]
    labels = (out / "labels_exp1.csv").read_text().splitlines()
    assert len(labels) == 1 + 1 + 3  # header, the control's tumour, one row per edit
    assert main(["simulate", "--phantoms", "1", "--out", str(tmp_path / "no"), "--inject-families", "drawn,glued", "-q"]) == 2
    assert "inject families should be a non-empty list from ['drawn', 'moved']" in capsys.readouterr().err
    assert main(["simulate", "--phantoms", "1", "--out", str(tmp_path / "no"), "--healthy", "-1", "-q"]) == 2
    assert not (tmp_path / "no").exists()


def test_write_back_over_real_jpeg2000_slices(lidc, tmp_path):
    """LIDC-IDRI's slices are JPEG 2000 Lossless: an edit written back keeps that syntax, and reads
    back exactly as edited."""
    series = next(p for p in (lidc / "LIDC-IDRI-0002").rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    (tmp_path / "three").mkdir()
    for f in sorted(series.glob("*.dcm"))[100:103]:
        (tmp_path / "three" / f.name).write_bytes(f.read_bytes())
    vol = io.read(tmp_path / "three")
    edited = vol.hu.copy()
    edited[1, 200:230, 200:230] = 40.0
    paths = io.write_back(vol.with_hu(edited), tmp_path / "out")
    assert all(pydicom.dcmread(p).file_meta.TransferSyntaxUID == JPEG2000Lossless for p in paths)
    assert np.array_equal(io.read(tmp_path / "out").hu, edited)


def test_same_seed_same_bytes(tmp_path):
    from ctguard.tamper.simulate import phantom_source, simulate

    def build(name):
        src = phantom_source(5, shape=(32, 80, 80), spacing=(4.0, 4.0, 4.0), with_tumour=True)
        simulate([src], tmp_path / name, inject=1, remove=1, seed=9, progress=False)
        h = hashlib.sha256()
        for p in sorted((tmp_path / name).rglob("*")):
            if p.is_file():
                h.update(p.relative_to(tmp_path / name).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    assert build("a") == build("b")


def test_simulate_bad_input_writes_nothing(tmp_path, capsys):
    (tmp_path / "junk.txt").write_text("x")
    assert main(["simulate", str(tmp_path / "junk.txt"), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "not a recognised" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    assert main(["simulate", "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "nothing to simulate" in capsys.readouterr().err
    # A flag that would be left unused is refused, not ignored.
    for argv, words in ((["--roi", "GTV*"], "--roi names the tumours' ROIs of an RTSTRUCT: give it as --annotations"),
                        (["--inject", "0", "--inject-families", "moved"], "with --inject 0 there are none"),
                        (["--remove", "0", "--remove-families", "clone"], "with --remove 0 and --healthy 0 there are none"),
                        (["--sizes", "big"], "--sizes 'big': MIN,MAX in mm")):
        assert main(["simulate", "--phantoms", "1", "--out", str(tmp_path / "o"), *argv, "-q"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_varied_acquisitions():
    from scipy import ndimage

    from ctguard.data.phantom import make_chest
    from ctguard.tamper.simulate import SLICE_MM, acquisition

    setups = [acquisition(s) for s in range(40)]
    assert acquisition(3) == setups[3]  # the seed fixes the set-up
    assert {a["spacing"][0] for a in setups} >= {1.0, 5.0, 8.0}  # thin and thick slices both occur
    for a in setups:
        nz, ny, nx = a["shape"]
        assert a["spacing"][0] in SLICE_MM and 0.6 <= a["spacing"][1] <= 1.0 and ny == nx
        assert 230 <= ny * a["spacing"][1] <= 340  # a chest-sized field of view
        assert nz * ny * nx <= 12_000_000 and 10 <= a["noise_hu"] <= 50
    # A smooth kernel (large grain) leaves less high-frequency noise than a sharp one.
    plain = make_chest((8, 64, 64), (4.0, 3.0, 3.0), seed=1, noise_hu=0.0).hu
    noise = [make_chest((8, 64, 64), (4.0, 3.0, 3.0), seed=1, noise_hu=30.0, grain=g).hu - plain for g in (0.4, 1.2)]
    body = plain > -900  # air is clipped at -1024, so measure inside the body
    assert all(abs(float(n[body].std()) - 30.0) < 3.0 for n in noise)  # the asked noise level
    hp = [float(np.std(n - ndimage.gaussian_filter(n, (0, 1, 1)))) for n in noise]
    assert hp[1] < 0.5 * hp[0]


def test_phantom_opacities_are_hazy_lung_only():
    from ctguard.data.phantom import make_chest

    args = ((12, 96, 96), (4.0, 3.6, 3.6))
    plain, hazy = make_chest(*args, seed=2), make_chest(*args, seed=2, opacities=3)
    assert np.array_equal(plain.hu, make_chest(*args, seed=2, opacities=0).hu)  # off by default: same bytes
    lungs = plain.meta["lung_mask"]
    raised = hazy.hu.astype(float) - plain.hu
    assert raised[lungs].max() > 150  # lung got denser somewhere
    # Before blur and noise the patches touch lung only; blurring lets them reach ~1 voxel beyond.
    from scipy import ndimage
    assert np.abs(raised[~ndimage.binary_dilation(lungs, iterations=2)]).max() <= 1.0
    assert np.percentile(hazy.hu[lungs & (raised > 150)], 50) < -350  # hazy, not solid


def test_thick_slice_source_keeps_anatomy_in_place():
    from ctguard.tamper.simulate import phantom_source, thick_slice_source

    src = phantom_source(11, shape=(41, 96, 96), spacing=(4.0, 3.6, 3.6), with_tumour=True)
    thick = thick_slice_source(src, 2)
    assert thick.volume.shape == (20, 96, 96) and thick.volume.spacing == (8.0, 3.6, 3.6)
    assert np.allclose(thick.volume.hu[3], np.rint(src.volume.hu[6:8].mean(0)))  # slab = mean of its slices
    (t0,), (t1,) = src.tumours, thick.tumours
    assert np.allclose(src.volume.voxel_to_world(t0.voxel), thick.volume.voxel_to_world(t1.voxel))  # same place in the body
    assert t1.mask.shape == thick.volume.shape and t1.mask.any()
    with pytest.raises(InputError):
        thick_slice_source(src, 30)


def test_tumours_from_a_label_map(tmp_path, capsys):
    """A segmentation label map on the scan's grid names its real tumours (for removals and TM
    controls): `ctguard simulate --annotations LABELS.nrrd` erases the one it holds. A label map on
    another grid is a one-line error naming it, and nothing is written."""
    import json
    from dataclasses import replace

    from ctguard.tamper.simulate import phantom_source, tumours_from, tumours_from_labelmap

    src = phantom_source(11, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6), with_tumour=True)
    (truth,) = src.tumours
    scan, labels = tmp_path / "scan.nrrd", tmp_path / "scan_label.nrrd"
    io.write_itk(src.volume, scan)
    io.write_itk(replace(src.volume, hu=truth.mask.astype(np.float32) * 3), labels)  # any non-zero label
    vol = io.read(scan)
    (t,) = tumours_from(vol, labels)
    assert np.array_equal(t.mask, truth.mask) and np.allclose(t.voxel, np.argwhere(truth.mask).mean(0))
    assert abs(t.diameter_mm - 2 * 0.6 * truth.diameter_mm) < 10  # the phantom's mask is a ball of 0.6 x its diameter + 1 mm
    assert tumours_from(vol, None) == []

    out = tmp_path / "sim"
    assert main(["simulate", str(scan), "--annotations", str(labels), "--inject", "0", "--remove", "1", "--out", str(out), "-q", "--seed", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (fb,) = [s for s in manifest["scans"] if s["label"] == "FB"]
    (edit,) = fb["edits"]
    assert edit["kind"] == "removed" and np.allclose(edit["voxel"], t.voxel, atol=0.01)
    assert all(v == round(v, 2) for v in [*edit["voxel"], *edit["world_mm"], edit["radius_mm"]])  # to 0.01, not 14 decimals
    assert {s["label"] for s in manifest["scans"]} == {"TM", "FB"}  # the control is known to hold a real tumour

    io.write_itk(replace(src.volume, hu=truth.mask[:, :, :90].astype(np.float32)), labels)
    assert main(["simulate", str(scan), "--annotations", str(labels), "--out", str(tmp_path / "sim2"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(labels) in err and "voxel grid" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "sim2").exists()
    with pytest.raises(InputError, match="voxel grid"):
        tumours_from_labelmap(vol, labels)


def test_lung_depth_on_its_box_is_the_whole_grid_transform(chest):
    from scipy import ndimage

    from ctguard.lung import lung_depth

    lungs = lung_mask(chest)
    assert np.allclose(lung_depth(chest, lungs), ndimage.distance_transform_edt(lungs, sampling=chest.spacing))
    touching = lungs.copy()
    touching[0] = touching[1]  # lungs reaching the first slice: the scan's edge is not outside them
    assert np.allclose(lung_depth(chest, touching), ndimage.distance_transform_edt(touching, sampling=chest.spacing))


def test_edit_families(chest):
    """Every family edits only within its blending radius, injections never darken, removals over
    healthy places change them, and a moved tumour carries the tumour's own voxels."""
    from ctguard.tamper.simulate import phantom_source, variants

    src = phantom_source(11, shape=(48, 112, 112), spacing=(3.0, 3.0, 3.0), with_tumour=True)
    out = list(variants(src, 5, inject=2, remove=2, per_scan=2, inject_families=("drawn", "moved"), remove_families=("fill", "clone"),
                        healthy=2))
    assert [label for label, _, _ in out] == ["TM", "FM", "FM", "FB", "FB", "FB", "FB"]
    families = [[(e.extra["family"], e.extra.get("target")) for e in edits] for _, _, edits in out[1:]]
    assert families == [[("drawn", None)] * 2, [("moved", None)] * 2, [("fill", "tumour")], [("clone", "tumour")],
                        [("fill", "healthy")] * 2, [("clone", "healthy")] * 2]
    t = src.tumours[0]
    for label, vol, edits in out[1:]:
        diff = vol.hu - src.volume.hu
        near = np.zeros(vol.shape, bool)
        for e in edits:
            near |= _dist_mm(vol, np.asarray(e.voxel)) < e.radius_mm
            assert np.abs(diff[_dist_mm(vol, np.asarray(e.voxel)) <= 3.0]).max() > 0, f"{e.extra} left its centre untouched"
        assert np.all(diff[~near] == 0), f"{edits[0].extra} changed a voxel beyond its blending radius"
        if label == "FM":
            assert np.all(diff >= 0)
    # The moved tumour is the tumour: its core HU reappear at the new place.
    moved = out[2][2][0]
    assert moved.nodule_type == "moved" and np.allclose(moved.extra["from_voxel"], t.voxel)
    core = src.volume.hu[tuple(np.rint(t.voxel).astype(int))]
    assert abs(out[2][1].hu[tuple(np.rint(moved.voxel).astype(int))] - core) < 150
    # A healthy in-painting leaves parenchyma-level HU at the place, whatever was there.
    for _, vol, edits in out[5:]:
        for e in edits:
            assert vol.hu[_dist_mm(vol, np.asarray(e.voxel)) <= 2.0].mean() < -600


def test_unknown_family_is_refused():
    from ctguard.engine.train3d import DEFAULTS, check_inputs
    from ctguard.tamper.simulate import phantom_source, variants

    with pytest.raises(InputError, match="inject families should be .*drawn"):
        next(variants(phantom_source(1, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)), 0, 1, 0, inject_families=("gan",)))
    with pytest.raises(InputError, match="the config's remove families"):
        check_inputs({**DEFAULTS, "remove_families": ["blur"]})


def test_lidc_xml_nodules_match_the_label_map(lidc, tmp_path, capsys):
    """Every outlined nodule of an LIDC read message is found, as the union of its readers'
    outlines (Dice >= 0.9 with the collection's label map); an XML of another series is refused by
    name, and simulate writes nothing then."""
    from ctguard.tamper.simulate import tumours_from

    folder = next((lidc / "LIDC-IDRI-0003").glob("*/*"))
    xml = next(folder.glob("*.xml"))
    vol = io.read(folder)
    labels = io.read(lidc / "LIDC-IDRI-0003" / "nodules.nrrd").hu.astype(int)
    tumours = tumours_from(vol, xml)
    assert len(tumours) == labels.max() == 3
    for k in range(1, 4):
        ref = labels == k
        dice = max(2 * (t.mask & ref).sum() / (t.mask.sum() + ref.sum()) for t in tumours)
        assert dice >= 0.9, f"nodule {k}: Dice {dice:.3f}"
    other = next((lidc / "LIDC-IDRI-0001").glob("*/*/*.xml"))
    with pytest.raises(InputError, match="annotates series .* not this scan's"):
        tumours_from(vol, other)
    out = tmp_path / "sim"
    assert main(["simulate", str(folder), "--annotations", str(other), "--out", str(out), "-q"]) == 2
    assert "annotates series" in capsys.readouterr().err and not out.exists()


def _spheres_series(tmp_path):
    """A phantom chest written as DICOM with two spheres' centres and radii (mm) to outline."""
    from ctguard.data.phantom import make_chest

    vol = make_chest((40, 128, 128), (2.0, 1.5, 1.5), seed=3)
    files = io.write_series(vol, tmp_path / "series", uid_seed="spheres")
    vol = io.read(tmp_path / "series")
    spheres = [(np.array([20.0, 60.0, 40.0]), 12.0), (np.array([24.0, 70.0, 90.0]), 8.0)]
    return vol, files, spheres


def _sphere_mask(vol, centre, radius):
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(vol.shape, centre, vol.spacing)], indexing="ij")
    return np.sqrt(zz**2 + yy**2 + xx**2) <= radius


def _rtstruct(vol, files, spheres, path, names=("GTV-1", "GTV-2"), series_uid=None):
    """An RT Structure Set outlining each sphere slice by slice (64-point polygons in patient mm)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "RTSTRUCT", src.PatientID, src.StudyInstanceUID, generate_uid()
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series_uid or src.SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = Sequence([ref_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = src.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, contours = [], []
    for number, ((centre, radius), name) in enumerate(zip(spheres, names), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, src.FrameOfReferenceUID
        rois.append(roi)
        items = []
        for z in range(vol.shape[0]):
            dz = (z - centre[0]) * vol.spacing[0]
            if abs(dz) > radius:
                continue
            r = np.sqrt(radius**2 - dz**2)
            t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            pts = [vol.voxel_to_world((z, centre[1] + r * np.sin(a) / vol.spacing[1], centre[2] + r * np.cos(a) / vol.spacing[2])) for a in t]
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(pts)
            c.ContourData = [round(float(v), 4) for p in pts for v in p]
            items.append(c)
        rc = Dataset()
        rc.ReferencedROINumber, rc.ContourSequence = number, Sequence(items)
        contours.append(rc)
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(rois), Sequence(contours)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_tumours_from_rtstruct_and_seg(tmp_path, capsys):
    """RTSTRUCT contours are rasterised on the series' grid (Dice >= 0.95 with the spheres they
    outline), ROIs are chosen by name, and a DICOM SEG of the same masks reads back exactly; a
    structure set of another series, or naming no matching ROI, is refused by name."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from ctguard.tamper.simulate import tumours_from

    vol, files, spheres = _spheres_series(tmp_path)
    rt = _rtstruct(vol, files, spheres, tmp_path / "rt.dcm", names=("GTV-1", "gtv 2"))
    tumours = tumours_from(vol, rt)
    assert len(tumours) == 2
    for t, (centre, radius) in zip(tumours, spheres):
        truth = _sphere_mask(vol, centre, radius)
        assert 2 * (t.mask & truth).sum() / (t.mask.sum() + truth.sum()) >= 0.95
        assert np.allclose(t.voxel, centre, atol=0.5)
    assert len(tumours_from(vol, _rtstruct(vol, files, spheres, tmp_path / "rt2.dcm", names=("GTV-1", "Lung")))) == 1
    with pytest.raises(InputError, match=r"names no ROI matching 'PTV\*' \(its ROIs: GTV-1, gtv 2\)"):
        tumours_from(vol, rt, roi="PTV*")
    other = _rtstruct(vol, files, spheres, tmp_path / "other.dcm", series_uid="1.2.3.4")
    with pytest.raises(InputError, match="outlines series 1.2.3.4, not this scan's"):
        tumours_from(vol, other)
    assert main(["simulate", str(tmp_path / "series"), "--annotations", str(other), "--out", str(tmp_path / "sim"), "-q"]) == 2
    assert "outlines series 1.2.3.4" in capsys.readouterr().err and not (tmp_path / "sim").exists()
    # The same spheres as a DICOM SEG (written by highdicom) read back voxel for voxel.
    sources = [pydicom.dcmread(f) for f in vol.meta["files"]]  # in the volume's slice order, as the masks
    masks = np.stack([_sphere_mask(vol, c, r) for c, r in spheres], -1).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="test", family=codes.DCM.ArtificialIntelligence, version="1")
    segments = [hd.seg.SegmentDescription(k + 1, f"tumour {k + 1}", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm,
                                          "AUTOMATIC", algorithm) for k in range(2)]
    seg = hd.seg.Segmentation(sources, masks, "BINARY", segments, hd.UID(), 2, hd.UID(), 1, "test", "test", "1", "1")
    seg.save_as(tmp_path / "seg.dcm")
    from_seg = tumours_from(vol, tmp_path / "seg.dcm")
    assert len(from_seg) == 2
    with pytest.raises(InputError, match="--roi 'GTV\\*' names an RTSTRUCT's ROIs; these annotations are a DICOM SEG"):
        tumours_from(vol, tmp_path / "seg.dcm", roi="GTV*")  # not left unused
    for t, (centre, radius) in zip(from_seg, spheres):
        assert np.array_equal(t.mask, _sphere_mask(vol, centre, radius))
