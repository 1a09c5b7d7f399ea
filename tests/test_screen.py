from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctguard import api, io
from ctguard.cli import main
from ctguard.data.phantom import make_chest
from ctguard.lung import lung_mask
from ctguard.tamper.simulate import phantom_source


def _found(result, t, spacing):
    near = [f for f in result["findings"]
            if np.linalg.norm((np.asarray(f["voxel"]) - t["voxel"]) * np.asarray(spacing)) <= 10.0 + t["diameter_mm"] / 2]
    return t["kind"] in {f["kind"] for f in near}


def test_bundled_detector_finds_a_real_tumour_removed(real_series, lung_pet_ct):
    """A real series with its tumour in-painted (Lung-PET-CT-Dx A0001, one of the bundled detector's
    training patients, edited here with a seed of its own) is tampered, with a removal over the
    tumour; the untouched series is clean, at the card's threshold."""
    from ctguard.tamper.simulate import remove_tumour, tumours_from

    vol = io.read(real_series["A0001-L"])
    assert api.screen(vol)["verdict"] == "clean"
    edited, edit = remove_tumour(vol, tumours_from(vol, lung_pet_ct / "annotations")[0], np.random.default_rng(1))
    result = api.screen(edited)
    assert result["verdict"] == "tampered" and result["model"]["second_stage"]
    assert _found(result, edit.to_dict(), vol.spacing)



def test_a_large_removal_is_one_finding(lidc, monkeypatch):
    """LIDC-IDRI-0002's 43 mm nodule in-painted holds places the stage scores "removed" 25-30 mm
    apart, farther than the 24 mm that merges them: the stage scoring the way between them edited
    too, they are one finding that reaches over 20 mm, not two; without that (BRIDGE_MM 0), two."""
    from ctguard import screen
    from ctguard.tamper.simulate import remove_tumour, tumours_from

    scan = lidc / "LIDC-IDRI-0002"
    vol = io.read(scan)
    (tumour,) = [t for t in tumours_from(vol, scan / "nodules.nrrd") if t.diameter_mm > 40]
    edited, edit = remove_tumour(vol, tumour, np.random.default_rng(2))
    (finding,) = api.screen(edited)["findings"]
    n, far = screen.spread(finding, vol.spacing)
    assert finding["kind"] == "removed" and _found({"findings": [finding]}, edit.to_dict(), vol.spacing)
    assert n >= 2 and far > 24.0
    monkeypatch.setattr(screen, "BRIDGE_MM", 0.0)
    apart = api.screen(edited)["findings"]
    assert len(apart) == 2 and {f["kind"] for f in apart} == {"removed"}


def test_findings_are_bridged_only_over_an_edited_way_of_their_kind():
    """:func:`ctguard.screen.bridged` with a stage that scores the way between two findings as it is
    told: merged where every point between is over the lower threshold with their kind; apart where
    one point is under it, where the way is of the other kind, or where they are too far apart."""
    from types import SimpleNamespace

    from ctguard import screen
    from ctguard.volume import Volume

    vol = Volume(np.zeros((40, 100, 100), np.float32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), {})
    calls = []

    def stage(way_scores):
        def score_places(vol, places, p_network, lungs, **kw):
            calls.append(len(places))
            return np.asarray(way_scores, float)
        return SimpleNamespace(score_places=score_places)

    heat = SimpleNamespace(probabilities_at=lambda v: np.zeros((len(v), 3)))
    reading = SimpleNamespace(noise=(1.0, 1.0), reference=None)

    def finding(kind, score, voxel, thr=0.8):
        return {"kind": kind, "score": score, "voxel": voxel, "source": "trace", "threshold": thr}

    a, b = finding("removed", 0.99, [20, 50, 20]), finding("removed", 0.9, [20, 50, 50], thr=0.75)  # 30 mm apart
    edited = [[0.1, 0.0, 0.9], [0.2, 0.0, 0.8], [0.24, 0.01, 0.75]]  # p_genuine, p_injected, p_removed
    (one,) = screen.bridged([a, b], vol, None, stage(edited), heat, reading)
    assert one["voxel"] == a["voxel"] and one["also_at"] == [{k: b[k] for k in ("voxel", "score", "source", "threshold")}]
    assert screen.spread(one, vol.spacing) == (1, 30.0) and calls == [3]
    gap = [[0.1, 0.0, 0.9], [0.3, 0.0, 0.7], [0.1, 0.0, 0.9]]  # one point under 0.75
    assert len(screen.bridged([a, b], vol, None, stage(gap), heat, reading)) == 2
    injected = [[0.1, 0.5, 0.4]] * 3
    assert len(screen.bridged([a, b], vol, None, stage(injected), heat, reading)) == 2
    assert len(screen.bridged([a, finding("injected", 0.9, [20, 50, 50])], vol, None, stage(edited), heat, reading)) == 2
    far = finding("removed", 0.9, [20, 50, 85])  # 65 mm away
    calls.clear()
    assert len(screen.bridged([a, far], vol, None, stage(edited), heat, reading)) == 2 and calls == []

def test_bundled_detector_finds_injection(tampered, tmp_path):
    """The bundled detector finds the injection and the removal of a phantom it never trained on, at a
    clinical set-up (at the quick 1.9 mm one its stage's resampling trace reads almost no ripple:
    docs/benchmarks.md), each with its kind, at its own thresholds."""
    root, truth, spacing = tampered
    # The node's setting (a report only for a tampered scan) still writes this one.
    result = api.screen(root / "tampered", json_out=tmp_path / "r.json", report_dir=tmp_path / "report", report_tampered_only=True)
    assert result["verdict"] == "tampered"
    for t in truth:
        near = [f for f in result["findings"]
                if np.linalg.norm((np.asarray(f["voxel"]) - t["voxel"]) * np.asarray(spacing)) <= 10.0 + t["diameter_mm"] / 2]
        assert near, f"{t['kind']} at {t['voxel']} not found"
        assert _found(result, t, spacing), f"{t['kind']} at {t['voxel']} found as another kind"
    # JSON shape as documented in docs/DESIGN.md.
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc) >= {"input", "shape", "spacing_mm", "verdict", "score", "findings", "model", "elapsed_s"}
    assert doc["shape"] == [64, 384, 384] and 0.0 <= doc["score"] <= 1.0
    assert all(f["score"] >= f["threshold"] == (doc["model"]["threshold"] if f["source"] == "network" else doc["model"]["peak_threshold"])
               for f in doc["findings"])
    scores = [f["score"] for f in doc["findings"]]
    assert scores == sorted(scores, reverse=True)
    for f in doc["findings"]:
        assert f["kind"] in ("injected", "removed") and len(f["voxel"]) == 3 and len(f["world_mm"]) == 3 and f["radius_mm"] > 0
    # The HTML report references images that exist.
    page = (tmp_path / "report" / "index.html").read_text()
    images = re.findall(r'src="([^"]+)"', page)
    assert images and all((tmp_path / "report" / img).is_file() for img in images)
    assert "Verdict: tampered" in page
    # Which patient, study and series it is about, from the DICOM headers, in the JSON and atop the report.
    first = pydicom.dcmread(sorted((root / "tampered").rglob("*.dcm"))[0], stop_before_pixels=True)
    assert {k: doc["scan"][k] for k in ("patient_id", "study_uid", "series_uid")} == {
        "patient_id": first.PatientID, "study_uid": first.StudyInstanceUID, "series_uid": first.SeriesInstanceUID}
    assert f"<p>Patient {first.PatientID} \u00b7 " in page and first.SeriesInstanceUID in page


def test_clean_phantom_screens_clean(tampered, tmp_path):
    root, _, _ = tampered
    result = api.screen(root / "clean", report_dir=tmp_path / "clean-report", report_tampered_only=True)
    assert result["verdict"] == "clean" and result["findings"] == []
    assert not (tmp_path / "clean-report").exists()  # the node's setting: no report of a clean series


def test_locations_scores(tampered, tmp_path):
    root, truth, _ = tampered
    locs = tmp_path / "locs.csv"
    rows = [[round(v) for v in t["voxel"]] for t in truth] + [[32, 192, 192]]
    locs.write_text("z,y,x\n" + "".join(f"{z},{y},{x}\n" for z, y, x in rows))
    out = tmp_path / "scores.csv"
    assert main(["screen", str(root / "tampered"), "--locations", str(locs), "--scores-out", str(out), "-q"]) == 0
    got = list(csv.DictReader(out.read_text().splitlines()))
    assert len(got) == 3
    for r in got:
        p_i, p_r, p_t = float(r["p_injected"]), float(r["p_removed"]), float(r["p_tampered"])
        assert 0 <= p_i <= 1 and 0 <= p_r <= 1 and p_t == pytest.approx(p_i + p_r, abs=2e-4)
    from ctguard.screen import load_detector

    threshold = load_detector().threshold  # the bundled detector's own operating threshold
    assert float(got[0]["p_injected"]) >= threshold  # the injection's centre, injected at it
    assert float(got[1]["p_removed"]) >= threshold  # the removal's centre, removed at it
    assert float(got[2]["p_tampered"]) < threshold  # a place nobody touched


def test_locations_combine_with_the_whole_scan(tampered, tmp_path, monkeypatch, capsys):
    """--locations with --json screens the whole scan too, from one read of it; --scores-out
    without --locations is refused rather than ignored."""
    from ctguard import io

    root, truth, _ = tampered
    locs = tmp_path / "locs.csv"
    locs.write_text("z,y,x\n" + "".join("{},{},{}\n".format(*(round(v) for v in t["voxel"])) for t in truth))
    reads = []
    real_read = io.read
    monkeypatch.setattr(io, "read", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    out, js = tmp_path / "scores.csv", tmp_path / "result.json"
    assert main(["screen", str(root / "tampered"), "--locations", str(locs), "--scores-out", str(out), "--json", str(js), "-q"]) == 0
    assert len(reads) == 1
    assert len(list(csv.DictReader(out.read_text().splitlines()))) == len(truth)
    result = json.loads(js.read_text())
    assert result["verdict"] == "tampered" and result["findings"]
    assert main(["screen", str(root / "tampered"), "--scores-out", str(out), "-q"]) == 2
    assert "--scores-out is where --locations writes" in capsys.readouterr().err


class _CentreDetector:
    """A stand-in detector with the training targets' geometry: a cell is "injected" when the
    voxels at its centre (the middle 2x2x2 of its 8 mm) are bright, as a cell's target is set by
    an edit's centre lying near the cell's centre."""

    def probabilities(self, block: np.ndarray) -> np.ndarray:
        c = block[3::8, 3::8, 3::8] + block[4::8, 4::8, 4::8] if block.ndim == 3 else block[3::8, 3::8] + block[4::8, 4::8]
        p = (c > 0).astype(np.float32)
        return np.stack([1 - p, p, np.zeros_like(p)])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7), (5.0, 1.9, 1.3)])
def test_a_location_is_read_from_the_cell_centred_on_it(spacing):
    """--locations reads the detector's cell centred on the place, in the scan's millimetres
    whatever its voxel size: a 3 mm bright spot at the place scores 1, and 0 from 4 mm away (the
    cells around a place, read before, all have their centres 6.9 mm from it)."""
    from ctguard.screen import score_locations, score_locations_2d
    from ctguard.volume import Volume

    shape = tuple(int(round(120 / s)) for s in spacing)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij", sparse=True)
    place = np.array([n // 2 + 0.3 for n in shape])
    mm = place * np.asarray(spacing)
    spot = np.sqrt((zz - mm[0]) ** 2 + (yy - mm[1]) ** 2 + (xx - mm[2]) ** 2) <= 1.5 + max(spacing) / 2
    vol = Volume(np.where(spot, 100.0, -800.0).astype(np.float32), spacing)
    away = place + np.array([0.0, 4.0 / spacing[1], 0.0])
    p = score_locations(vol, _CentreDetector(), np.array([place, away]))
    assert p[0, 1] == 1.0 and p[1, 1] == 0.0 and np.allclose(p.sum(1), 1.0)
    # The same on one slice with the 2D detector's geometry.
    flat = Volume(np.where(spot[int(round(place[0]))], 100.0, -800.0).astype(np.float32)[None], (1.0, *spacing[1:]))
    p2 = score_locations_2d(flat, _CentreDetector(), np.array([[0.0, *place[1:]], [0.0, *away[1:]]]))
    assert p2[0, 1] == 1.0 and p2[1, 1] == 0.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (5.0, 0.7, 0.7)])
def test_cell_targets_give_every_edit_a_cell_from_a_7_mm_radius(spacing):
    """Cell targets: a small edit where eight cells meet (6.93 mm from each centre) gets no cell at
    the default 6 mm radius and all eight at 7 mm; one at a cell's centre gets that cell, of its kind."""
    from ctguard.data.cubes import cell_targets
    from ctguard.models.grid import CLASSES

    spacing = np.asarray(spacing)
    # The cube's centre, in voxels; cells are 8 mm, so in a 64 mm cube it is where eight cells meet.
    centre = np.array([40.0, 40.0, 40.0]) / spacing
    edit = [{"voxel": centre, "diameter_mm": 6.0, "kind": "injected"}]
    assert not cell_targets(centre, 64, spacing, edit).any()
    t7 = cell_targets(centre, 64, spacing, edit, min_radius=7.0)
    assert (t7 == CLASSES.index("injected")).sum() == 8 and t7[3:5, 3:5, 3:5].all()
    at_cell = [{"voxel": centre + 4.0 / spacing, "diameter_mm": 6.0, "kind": "removed"}]
    t = cell_targets(centre, 64, spacing, at_cell)
    assert t[4, 4, 4] == CLASSES.index("removed") and (t > 0).sum() == 1


def test_screen_bad_inputs(tmp_path, capsys, tampered):
    root, _, _ = tampered
    # Two slices: too thin to screen in 3D.
    thin = io.read(root / "clean")
    thin.hu = thin.hu[:2]
    thin.meta["files"] = thin.meta["files"][:2]
    io.write_series(thin, tmp_path / "thin")
    assert main(["screen", str(tmp_path / "thin")]) == 2
    assert "at least 24 mm" in capsys.readouterr().err
    # No lungs in view: a block of soft tissue.
    from ctguard.volume import Volume

    io.write_series(Volume(np.full((20, 64, 64), 40.0, np.float32), (3.0, 2.0, 2.0)), tmp_path / "belly")
    assert main(["screen", str(tmp_path / "belly")]) == 2
    err = capsys.readouterr().err
    assert "no lungs in view (is this a chest CT?)" in err and "label map" not in err
    # A label map (an archive's segmentation beside its series) is named for what it is.
    labels = np.zeros((20, 64, 64), np.float32)
    labels[5:9, 10:20, 10:20], labels[12:14, 40:50, 30:40] = 1, 3
    io.write_itk(Volume(labels, (3.0, 2.0, 2.0)), tmp_path / "nodules.nrrd")
    assert main(["screen", str(tmp_path / "nodules.nrrd")]) == 2
    assert "not a CT: its voxels hold only 3 whole values from 0 to 3 (a label map or mask)" in capsys.readouterr().err
    # A 2D image with no lungs in it.
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    assert main(["screen", str(tmp_path / "x.png")]) == 2
    assert "no lungs in view in this slice" in capsys.readouterr().err
    # A model file that is not a detector.
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["screen", str(root / "clean"), "--model", str(tmp_path / "bad.pt")]) == 2
    assert "not a loadable checkpoint" in capsys.readouterr().err


def test_demo_finds_its_injection_and_nothing_else(tmp_path, capsys):
    """The bundled detector finds the demo's injection, with its kind, among the scan's highest
    places (no more of them above it than the demo has edits); every finding lies at one of the
    demo's edits (no false finding on the phantom); each edit is called found exactly when the best
    place near it is over the threshold with the edit's kind."""
    from ctguard.engine.train_verifier import near

    out = api.demo(tmp_path / "demo", progress=False)
    thr = out["result"]["model"]["threshold"]
    kinds = [t["kind"] for t in out["truth"]]
    assert kinds == ["injected", "removed"]
    assert out["matched"][0], out["nearest"]
    assert out["nearest"][0]["kind"] == "injected" and out["nearest"][0]["rank"] <= len(out["truth"])
    spacing = out["result"]["spacing_mm"]
    for f in out["result"]["findings"]:
        assert any(near(f["voxel"], t["voxel"], t["diameter_mm"], spacing) for t in out["truth"]), f
    assert len(out["result"]["findings"]) <= len(out["truth"])  # one finding an edit
    assert out["matched"] == [n is not None and n["score"] >= thr and n["kind"] == t["kind"]
                              for n, t in zip(out["nearest"], out["truth"])]
    assert out["result"]["verdict"] == ("tampered" if any(out["matched"]) else "clean")
    assert Path(out["report"]).is_file() and Path(out["json"]).is_file()
    doc = json.loads(Path(out["json"]).read_text())
    assert len(doc["findings"]) + len(doc["under_threshold"]) >= 2
    assert all(f["score"] < thr for f in doc["under_threshold"])
    page = Path(out["report"]).read_text()
    assert ("Highest places under the threshold" in page) == bool(doc["under_threshold"])
    assert all(f"{f['score']:.3f}" in page for f in doc["under_threshold"])
    printed = capsys.readouterr().out
    assert printed.count("FOUND") + printed.count("MISSED") == 2


def test_lung_mask_of_a_single_slice(real_series):
    """A lone slice is segmented in-plane: the same lung as in the whole series' mask of that slice."""
    from ctguard.volume import Volume

    vol = io.read(real_series["A0002-B40f"])
    full = lung_mask(vol)
    z = 15
    one = lung_mask(Volume(vol.hu[z : z + 1].copy(), (1.0, *vol.spacing[1:])))
    assert one.shape == (1, 512, 512)
    overlap = (one[0] & full[z]).sum() / full[z].sum()
    assert full[z].sum() > 20_000 and overlap > 0.9 and one.sum() < 1.1 * full[z].sum()


def test_axial_hole_filling_matches_scipy_slice_by_slice(real_series):
    """One labelling pass fills the same holes as ``binary_fill_holes`` run on each axial slice: on
    a real body mask (the lungs are its holes) and on random masks (holes touching no edge, holes
    on the edge, nested islands), and the holes are never joined through the slices above or below."""
    from scipy import ndimage

    from ctguard.lung import fill_holes_axial

    vol = io.read(real_series["A0002-B40f"])
    rng = np.random.default_rng(2)
    for mask in [vol.hu > -500, rng.random((6, 40, 50)) < 0.55, rng.random((3, 30, 30)) < 0.7]:
        want = np.stack([ndimage.binary_fill_holes(m) for m in mask])
        got = fill_holes_axial(mask)
        assert np.array_equal(got, want) and got.sum() > mask.sum()
    ring = np.zeros((3, 9, 9), bool)
    ring[1, 2:7, 2:7] = True
    ring[1, 3:6, 3:6] = False  # a hole in the middle slice only
    assert fill_holes_axial(ring)[1, 4, 4] and not fill_holes_axial(ring)[[0, 2], 4, 4].any()


@pytest.mark.parametrize("radius", [(3.0, 2.86, 2.86), (1.2, 7.1, 7.1), (0.0, 3.0, 3.0), (2.0, 3.0, 2.5)])
def test_closing_by_rows_matches_scipy(radius):
    """The lung mask's closing, row by row, is scipy's binary closing with the same ball, voxel for
    voxel: on random masks that touch every edge (outside the array counts as empty for both)."""
    from scipy import ndimage

    from ctguard.lung import _ball, close_with_ball

    ball = _ball(np.asarray(radius))
    for k in range(3):
        mask = np.random.default_rng(k).random((12, 31, 40)) < 0.2 + 0.2 * k
        want = ndimage.binary_closing(mask, structure=ball)
        assert np.array_equal(close_with_ball(mask, ball), want) and not np.array_equal(want, mask)


@pytest.mark.parametrize("threads", [2, 3])
def test_mask_steps_over_slabs_are_the_whole_arrays(threads):
    """The lung mask's local steps computed on slabs of slices at once (each with its margin) give
    every voxel the whole array's step gives: the erosion, the closing and the in-plane hole filling,
    on random masks tall enough to be split (and the split really taken), and the whole lung mask
    of a phantom chest with one thread and with several."""
    from scipy import ndimage

    import ctguard.lung as L

    cross = ndimage.generate_binary_structure(3, 1)
    ball = L._ball(np.asarray((3.0, 2.86, 2.86)))
    steps = [(lambda m: ndimage.binary_erosion(m, structure=cross, iterations=2), 2),
             (lambda m: L._by_rows(L._by_rows(m, ball, True), ball, False), 2 * (ball.shape[0] // 2)),
             (L._fill_holes_axial, 0)]
    for k in range(3):
        mask = np.random.default_rng(k).random((70, 33, 41)) < 0.3 + 0.2 * k
        for fn, reach in steps:
            calls = []
            got = L.in_slabs(lambda m: calls.append(len(m)) or fn(m), mask, reach, threads=threads)
            assert len(calls) == threads and max(calls) < len(mask)
            assert np.array_equal(got, fn(mask))
    chest, calls = make_chest(seed=3), []
    split = L.in_slabs
    try:
        L.SLAB_THREADS = 1
        one = L.lung_mask(chest)
        L.SLAB_THREADS = threads
        L.in_slabs = lambda fn, a, reach: split(lambda m: calls.append(len(m)) or fn(m), a, reach)
        many = L.lung_mask(chest)
    finally:
        L.SLAB_THREADS, L.in_slabs = 2, split
    assert one.any() and np.array_equal(one, many) and len(calls) >= 3 * threads and max(calls) < len(chest.hu)


def test_sums_over_a_short_last_axis_are_numpys_bit_for_bit():
    """The maps' cell sums over a short last axis, slice after slice, are ``sum(axis=-1)`` to the
    last bit (float and integer, 1 to 9 values a sum)."""
    from ctguard.verifier import _sum_last

    rng = np.random.default_rng(0)
    for n in range(1, 10):
        x = rng.random((50, 40, n)) * 10.0 ** rng.integers(-3, 6, size=(50, 40, n))
        assert np.array_equal(_sum_last(x).view(np.uint64), x.sum(axis=-1).view(np.uint64))
        i = rng.integers(0, 1000, size=(7, 5, n)).astype(np.int32)
        assert np.array_equal(_sum_last(i), i.sum(axis=-1))


def test_single_slice_is_screened_in_2d(tampered, tmp_path):
    root, truth, spacing = tampered
    inj = truth[0]
    z = int(round(inj["voxel"][0]))
    files = sorted((root / "tampered").iterdir())
    result = api.screen(files[z], json_out=tmp_path / "r.json", report_dir=tmp_path / "report")
    assert result["shape"] == [1, 384, 384]
    assert any("2D" in w for w in result["warnings"])
    assert all(f["voxel"][0] == 0.0 for f in result["findings"])
    near = [f for f in result["findings"]
            if np.hypot(*((np.asarray(f["voxel"][1:]) - inj["voxel"][1:]) * np.asarray(spacing[1:]))) <= 10.0 + inj["diameter_mm"] / 2]
    assert near and near[0]["kind"] == "injected", result["findings"][:3]
    assert (tmp_path / "report" / "index.html").is_file()


def test_png_slice_is_read_in_the_lung_window(real_series, tmp_path):
    """An 8-bit PNG in the lung window (what export-slices writes) of a real 512-px slice is screened
    in 2D, with the HU and pixel-size assumptions in the warnings."""
    from PIL import Image

    vol = io.read(real_series["A0002-B40f"])
    hu = vol.hu[15]
    Image.fromarray(np.rint(np.clip((hu + 1000) / 1400, 0, 1) * 255).astype(np.uint8)).save(tmp_path / "slice.png")
    r = api.screen(tmp_path / "slice.png")
    assert r["shape"] == [1, 512, 512] and r["spacing_mm"][1:] == [0.7, 0.7]
    assert any("lung window" in w for w in r["warnings"])
    assert r["model"]["name"] == "tamper2d" and 0.0 <= r["score"] <= 1.0  # a slice goes to the 2D detector
    assert all(f["voxel"][0] == 0 and f["score"] >= r["model"]["threshold"] for f in r["findings"])  # one slice: z = 0


def test_onnx_runtime_matches_torch(tampered, monkeypatch):
    """The bundled ONNX export gives the torch network's probabilities and the same findings."""
    from ctguard.screen import load_detector

    det = load_detector(None)
    assert det.session is not None, "src/ctguard/weights/tamper3d.onnx is bundled and onnxruntime installed"
    block = io.read(tampered[0] / "tampered").resampled((1.0, 1.0, 1.0)).hu[:64, 40:136, 40:136]
    p_onnx = det.probabilities(block)
    det.session = None
    p_torch = det.probabilities(block)
    assert p_onnx.shape == p_torch.shape == (3, 8, 12, 12)
    assert np.abs(p_onnx - p_torch).max() < 1e-4
    monkeypatch.setenv("CTGUARD_RUNTIME", "torch")
    assert load_detector(None).session is None
    with_torch = api.screen(tampered[0] / "tampered")
    monkeypatch.setenv("CTGUARD_RUNTIME", "onnx")
    with_onnx = api.screen(tampered[0] / "tampered")
    assert [f["voxel"] for f in with_onnx["findings"]] == [f["voxel"] for f in with_torch["findings"]]


NO_TORCH = """
import json, sys
sys.modules["torch"] = sys.modules["torchvision"] = None  # as if PyTorch were not installed
from ctguard import api
from ctguard.cli import main
out = {"volume": api.screen(sys.argv[1]), "slice": api.screen(sys.argv[2]), "train_rc": main(["train", "--config", sys.argv[3]])}
out["torch_loaded"] = sorted(m for m, v in sys.modules.items() if m.split(".")[0] in ("torch", "torchvision") and v is not None)
print(json.dumps(out))
"""


def test_screening_runs_without_pytorch(tampered, tmp_path, monkeypatch):
    """Where PyTorch is not installed (a clinic's screening machine), the bundled ONNX detectors
    screen a volume and a single slice exactly as PyTorch does; training says what to install."""
    import subprocess
    import sys

    from PIL import Image

    root, truth, _ = tampered
    hu = io.read(root / "tampered").hu[int(truth[0]["voxel"][0])]
    Image.fromarray(np.rint(np.clip((hu + 1000) / 1400, 0, 1) * 255).astype(np.uint8)).save(tmp_path / "slice.png")
    (tmp_path / "cfg.yaml").write_text("task: tamper3d\n")
    run = subprocess.run([sys.executable, "-c", NO_TORCH, str(root / "tampered"), str(tmp_path / "slice.png"), str(tmp_path / "cfg.yaml")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["torch_loaded"] == []
    assert out["train_rc"] == 2 and "needs torch, which is not installed: pip install 'ctguard[train]'" in run.stderr
    monkeypatch.setenv("CTGUARD_RUNTIME", "torch")  # the reference: PyTorch eager, in this process
    for key, path in (("volume", root / "tampered"), ("slice", tmp_path / "slice.png")):
        ref, got = api.screen(path), out[key]
        assert got["verdict"] == ref["verdict"] and got["model"] == ref["model"]
        assert [(f["kind"], f["voxel"]) for f in got["findings"]] == [(f["kind"], f["voxel"]) for f in ref["findings"]]
        assert np.allclose([f["score"] for f in got["findings"]], [f["score"] for f in ref["findings"]], atol=2e-4)
    assert out["volume"]["verdict"] == "tampered" and out["volume"]["model"]["name"] == "tamper3d"
    assert out["slice"]["shape"][0] == 1 and out["slice"]["model"]["name"] == "tamper2d"


def test_onnx_model_file(tmp_path):
    """``--model`` takes an .onnx export: its card (threshold) comes from the .json beside it; a 2D
    export given where a 3D detector is needed, or a file that is not ONNX, is refused by name."""
    import shutil

    from ctguard.errors import InputError
    from ctguard.screen import load_detector, load_detector2d

    weights = Path(api.__file__).parent / "weights"
    det = load_detector(str(weights / "tamper3d.onnx"))
    assert det.net is None and det.session is not None and det.dims == 3
    assert det.threshold == json.loads((weights / "tamper3d.json").read_text())["threshold"]
    assert load_detector2d(str(weights / "tamper2d.onnx")).dims == 2
    shutil.copy(weights / "tamper2d.onnx", tmp_path / "flat.onnx")
    with pytest.raises(InputError, match="not a 3D tamper detector") as e:
        load_detector(str(tmp_path / "flat.onnx"))
    assert "flat.onnx" in str(e.value)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a loadable ONNX model"):
        load_detector(str(tmp_path / "junk.onnx"))


def test_train_tamper3d_tiny_run(tmp_path):
    """The 3D trainer end to end on a tiny phantom: cubes with dense targets, extra cube files,
    a hard-negative round, and a checkpoint that screening loads."""
    from ctguard.screen import load_detector, screen_volume

    extra = tmp_path / "extra.npz"
    np.savez(extra, x=np.full((3, 32, 32, 32), -800, np.int16), y=np.zeros((3, 4, 4, 4), np.int8))
    cfg = {"task": "tamper3d", "seed": 3, "phantoms": 1, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
           "inject": 1, "remove": 0, "per_scan": 1, "cube": 32, "width": 4, "epochs": 1, "batch_size": 8,
           "cache": str(tmp_path / "cubes.npz"), "extra_cubes": [str(extra)],
           "hard_rounds": 1, "hard_phantoms": 1, "hard_threshold": 0.0, "hard_max_per_scan": 2, "hard_epochs": 1}
    summary = api.train(cfg, tmp_path / "run", progress=False, echo=lambda *_: None)
    with np.load(tmp_path / "cubes.npz") as d:
        own, targets = len(d["x"]), d["y"]
    assert targets.shape[1:] == (4, 4, 4) and (targets == 1).any() and (targets == 0).any()  # injected and genuine cells
    with np.load(tmp_path / "run" / "hard_round1.npz") as d:
        mined = len(d["x"])
        assert mined == 2 and not d["y"].any()  # threshold 0: the cap; mined cubes are all genuine
    assert summary["cubes"] == own + 3 + mined
    assert len(summary["history"]) == 2 and json.loads((tmp_path / "run" / "config.json").read_text())["extra_cubes"] == [str(extra)]
    # The summary says what the network learnt from (the cubes' hashes) and what it was trained on.
    import torch

    from ctguard.engine.train3d import cubes_digest

    with np.load(tmp_path / "cubes.npz") as d, np.load(extra) as e:
        x, y = np.concatenate([d["x"].astype(np.int16), e["x"]]), np.concatenate([d["y"], e["y"]])
    assert summary["cubes_sha256"] == cubes_digest(x, y) != cubes_digest(x, y[::-1])
    with np.load(tmp_path / "run" / "hard_round1.npz") as d:
        assert summary["hard_round1_sha256"] == cubes_digest(d["x"], d["y"])
    machine = json.loads((tmp_path / "run" / "summary.json").read_text())["machine"]
    assert machine["device"] == "CPU" and machine["cpu"] and machine["cores"] >= 1 and machine["torch"] == torch.__version__
    det = load_detector(str(tmp_path / "run" / "model.pt"))
    assert det.torch_net().features[0][0].out_channels == 4  # the config's width, not the bundled network's
    assert det.session is not None and Path(det.path).with_suffix(".onnx").is_file()  # the run's ONNX export, preferred
    vol = phantom_source(8, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    _, heat_onnx, _ = screen_volume(vol, det, threshold=0.5)
    det.session = None  # the same run's network on PyTorch: the export must give its probabilities
    _, heat_torch, _ = screen_volume(vol, det, threshold=0.5)
    assert heat_onnx.probs.shape == heat_torch.probs.shape and np.abs(heat_onnx.probs - heat_torch.probs).max() < 1e-4


def test_a_cube_cache_of_another_recipe_is_made_again(tmp_path):
    """The run's ``cache`` file is used only for the sources and simulation settings it was made
    with: a changed recipe (here one more phantom) makes its cubes again instead of training on
    the old ones."""
    from ctguard.engine.train3d import DEFAULTS, cubes_key, source_specs

    cfg = {"task": "tamper3d", "seed": 3, "phantoms": 1, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
           "inject": 1, "remove": 0, "per_scan": 1, "cube": 32, "width": 4, "epochs": 1, "batch_size": 8, "hard_rounds": 0,
           "cache": str(tmp_path / "cubes.npz")}
    api.train(cfg, tmp_path / "one", progress=False, echo=lambda *_: None)
    with np.load(tmp_path / "cubes.npz") as d:
        one = len(d["x"])
        assert str(d["key"]) == cubes_key({**DEFAULTS, **cfg}, source_specs({**DEFAULTS, **cfg}))
    said = []
    summary = api.train({**cfg, "phantoms": 2}, tmp_path / "two", progress=False, echo=said.append)
    assert any("making them again" in m for m in said)
    with np.load(tmp_path / "cubes.npz") as d:
        assert len(d["x"]) > one and summary["cubes"] == len(d["x"])
    assert cubes_key({**DEFAULTS, **cfg}, source_specs({**DEFAULTS, **cfg})) != cubes_key({**DEFAULTS, **cfg, "inject": 2},
                                                                                         source_specs({**DEFAULTS, **cfg}))


def test_train_tamper2d_on_cube_slices(tmp_path, capsys):
    """The 2D detector trains on axial slices of 3D cubes, each with the targets of the cell row it
    lies in; a cube file that is not one is a one-line error, and the failed run leaves no folder."""
    from ctguard.engine.train_patch2d import slices_from_cubes
    from ctguard.screen import load_detector2d

    rng = np.random.default_rng(0)
    x = rng.normal(-700, 100, (4, 32, 32, 32)).astype(np.int16)
    y = np.zeros((4, 4, 4, 4), np.int8)
    y[:, 1, 2, 2], y[:, 2, 1, 1] = 1, 2  # one injected cell in row 1, one removed cell in row 2
    sx, sy = slices_from_cubes(x, y, 16, rng)  # the 16 slices of the two middle rows (z 8-23)
    assert sx.shape == (64, 32, 32) and sy.shape == (64, 4, 4)
    assert sorted(sy[:16, 2, 2].tolist()) == [0] * 8 + [1] * 8 and sorted(sy[:16, 1, 1].tolist()) == [0] * 8 + [2] * 8
    for k in range(16):  # each slice is a slice of its cube, with that slice's row of targets
        z = next(z for z in range(8, 24) if np.array_equal(x[0, z], sx[k]))
        assert np.array_equal(sy[k], y[0, z // 8])
    cubes = tmp_path / "cubes.npz"
    np.savez(cubes, x=x, y=y)
    cfg = {"task": "tamper2d", "cubes": [str(cubes)], "slices_per_cube": 4, "width": 4, "epochs": 2, "batch_size": 8}
    summary = api.train(cfg, tmp_path / "run", progress=False, echo=lambda *_: None)
    assert summary["slices"] == 16 and len(summary["history"]) == 2
    assert load_detector2d(str(tmp_path / "run" / "model.pt")).dims == 2 and (tmp_path / "run" / "model.onnx").is_file()
    bad = tmp_path / "bad.npz"
    bad.write_text("x,y\n1,2\n")
    cfg_file = tmp_path / "t2d.yaml"
    cfg_file.write_text(f"task: tamper2d\ncubes: [{cubes}, {bad}]\nepochs: 1\n")
    assert main(["train", "-q", "--config", str(cfg_file), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.npz" in err and "not a numpy archive" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run2").exists()
    # A slice stage whose scans' config is missing is refused before the network trains.
    cfg_file.write_text(f"task: tamper2d\ncubes: [{cubes}]\nepochs: 1\nslice_stage: true\nslice_stage_scans: {tmp_path / 'nothere.yaml'}\n")
    assert main(["train", "-q", "--config", str(cfg_file), "--out", str(tmp_path / "run3")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothere.yaml" in err and "slice_stage_scans" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run3").exists()


def test_train_config_paths_are_project_relative_and_checked_first(tmp_path, capsys, monkeypatch):
    """A config two folders deep (benchmarks/experiments/) reads its data paths from the project
    root, like one in configs/; a missing real series is a one-line error before any simulating,
    and no model is written."""
    from ctguard.api import config_root

    project = tmp_path / "project"
    (project / "benchmarks" / "experiments").mkdir(parents=True)
    (project / "configs").mkdir()
    (project / "pyproject.toml").write_text("")
    assert config_root(project / "benchmarks" / "experiments" / "x.yaml") == project.resolve()
    assert config_root(project / "configs" / "x.yaml") == project.resolve()
    cfg = project / "benchmarks" / "experiments" / "x.yaml"
    import ctguard.engine.train3d as train3d

    def simulate(*args, **kwargs):
        raise AssertionError("simulated before the config's paths were checked")

    monkeypatch.setattr(train3d, "make_cubes", simulate)
    cfg.write_text("task: tamper3d\nphantoms: 2\nreal_series: [data/A0009]\nepochs: 1\n")
    rc = main(["train", "-q", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(project.resolve() / "data" / "A0009") in err and "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # The same for a checkpoint to start from and extra cubes (read only after simulating).
    for line in ("init: runs/base/model.pt", "extra_cubes: [runs/base/hard_round1.npz]"):
        cfg.write_text(f"task: tamper3d\nphantoms: 2\nepochs: 1\n{line}\n")
        rc = main(["train", "-q", "--config", str(cfg), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and str(project.resolve() / "runs" / "base") in err and len(err.splitlines()) == 1
        assert not (tmp_path / "run").exists()
    # real_scans: paths read from the project root too, each checked; a malformed list is named.
    cfg.write_text("task: tamper3d\nphantoms: 2\nepochs: 1\nreal_scans:\n  - {scan: data/p1.nrrd, tumours: data/p1_label.nrrd}\n")
    (project / "data").mkdir()
    (project / "data" / "p1.nrrd").write_text("")
    assert main(["train", "-q", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(project.resolve() / "data" / "p1_label.nrrd") in err and "does not exist" in err and len(err.splitlines()) == 1
    cfg.write_text("task: tamper3d\nphantoms: 2\nepochs: 1\nreal_scans: [data/p1.nrrd]\n")
    assert main(["train", "-q", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "real_scans should be a list of mappings" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # A phantom shape that is no shape: named, before anything runs.
    cfg.write_text("task: tamper3d\nphantoms: 2\nphantom_shape: [0, 64, 64]\nepochs: 1\n")
    assert main(["train", "-q", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "phantom_shape" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # A run that fails later (its cube cache is not a cube file) removes the folder it made, which
    # held only its config ...
    (project / "runs").mkdir()
    (project / "runs" / "cubes.npz").write_text("not a numpy file")
    cfg.write_text("task: tamper3d\ncache: runs/cubes.npz\nepochs: 1\n")
    assert main(["train", "-q", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a cube file" in err and str(project.resolve() / "runs" / "cubes.npz") in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # ... but never a folder that was there before, nor what is in it.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["train", "-q", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine" and (tmp_path / "run" / "config.json").is_file()


def test_train_tamper3d_sources_and_workers():
    """Sources come in a fixed order, each seeded by what it is; real series repeat with
    ``real_repeats``; one-set-up phantoms can join varied ones; worker processes make exactly the cubes one process makes; a GPU asked for
    where there is none is refused by name."""
    import torch

    from ctguard.engine.train3d import DEFAULTS, _device, _pool, build_source, make_cubes, source_specs, spec_seed
    from ctguard.errors import InputError

    cfg = {**DEFAULTS, "seed": 4, "phantoms": 2, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
           "real_series": ["a", "b"], "annotations": "boxes", "real_thick": [2], "real_repeats": 2}
    assert source_specs(cfg) == [("phantom", 4000), ("phantom", 4001)] + [
        ("series", path, factor, "boxes", r) for r in (0, 1) for path in ("a", "b") for factor in (1, 2)]
    # More patients, each with its own tumours, come after the series.
    more = {**cfg, "real_thick": [], "real_repeats": 1, "real_scans": [{"scan": "c.nrrd", "tumours": "c_label.nrrd"}, {"scan": "d.nii"}]}
    assert source_specs(more)[2:] == [("series", "a", 1, "boxes", 0), ("series", "b", 1, "boxes", 0),
                                      ("series", "c.nrrd", 1, "c_label.nrrd", 0), ("series", "d.nii", 1, None, 0)]
    # A source's edits are seeded by what it is, not by its place among the others: a run on
    # fewer patients (a cross-validation fold) gives the sources it keeps the same edits.
    fewer = {**more, "real_series": ["b"]}
    assert spec_seed(more, ("series", "/x/b", 1, "boxes", 0)) == spec_seed(fewer, ("series", "/y/b", 1, "boxes", 0))
    assert len({spec_seed(more, s) for s in source_specs(more)}) == len(source_specs(more))
    varied = {**cfg, "phantom_variety": True, "fixed_phantoms": 1, "real_series": []}
    assert source_specs(varied) == [("phantom", 4000), ("phantom", 4001), ("fixed phantom", 4002)]
    # Without variety, fixed phantoms are more of the same phantoms, not ignored.
    assert source_specs({**varied, "phantom_variety": False}) == source_specs(varied)
    assert build_source(varied, ("fixed phantom", 4002)).volume.spacing == (4.0, 3.6, 3.6)  # the one set-up's
    cfg.update(real_series=[], inject=1, remove=0, per_scan=1, cube=32, workers=2)
    x1, y1 = make_cubes(cfg, None, progress=False)
    pool = _pool(cfg)
    try:
        x2, y2 = make_cubes(cfg, pool, progress=False)
    finally:
        pool.terminate()
    assert x1.shape[0] > 0 and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no GPU"):
            _device({"device": "cuda"})
    with pytest.raises(InputError, match="unknown device"):
        _device({"device": "gpu please"})
    with pytest.raises(InputError, match="nothing to train on"):
        make_cubes({**cfg, "phantoms": 0}, None, progress=False)
    assert _device({"device": "auto"}).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_ensemble_detector_averages_its_members(tmp_path):
    """A checkpoint whose config lists members loads as their ensemble: its probabilities are the
    mean of theirs, on PyTorch and on its ONNX export alike."""
    import torch

    from ctguard.models.cube3d import TamperNet3D, build
    from ctguard.screen import export_onnx, load_detector

    torch.manual_seed(0)
    members = [TamperNet3D(4).eval(), TamperNet3D(8).eval()]
    cfg = {"task": "tamper3d", "members": [{"width": 4}, {"width": 8}]}
    net = build(cfg)
    net.load_state_dict({f"members.{i}.{k}": v for i, m in enumerate(members) for k, v in m.state_dict().items()})
    torch.save({"model": net.state_dict(), "config": cfg, "arch": "tamper3d"}, tmp_path / "model.pt")
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 1, 32, 40, 48)).astype(np.float32))
    with torch.inference_mode():
        want = torch.stack([m(x).softmax(1) for m in members]).mean(0)[0].numpy()
    hu = (x[0, 0].numpy() * 800.0 - 300.0)  # the HU that normalise maps back to x
    det = load_detector(str(tmp_path / "model.pt"))
    assert det.session is None and np.abs(det.probabilities(hu) - want).max() < 1e-5
    export_onnx(det.torch_net(), tmp_path / "model.onnx")
    det = load_detector(str(tmp_path / "model.pt"))
    assert det.session is not None and np.abs(det.probabilities(hu) - want).max() < 1e-5


def test_sigterm_stops_a_training_run_and_its_workers(tmp_path):
    """`kill` on `ctguard train` ends it with 143 and takes its worker processes with it (they used
    to run on, orphaned)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "w.yaml"
    cfg.write_text("task: tamper3d\nphantoms: 6\nworkers: 2\nepochs: 1\n")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ctguard"), "train", "-q", "--config", str(cfg), "--out", str(tmp_path / "run")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "multiprocessing.spawn import spawn_main"],
                               capture_output=True, text=True).stdout.split()
        return [int(p) for p in found]

    deadline = time.monotonic() + 120
    while len(children()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    workers = children()
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return not open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"

    deadline = time.monotonic() + 30
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in workers)


def test_bundled_detectors_name_no_path_of_a_machine():
    """The bundled cards and checkpoints hold no absolute path (of the machine that trained them)."""
    import torch

    weights = Path(__file__).resolve().parents[1] / "src" / "ctguard" / "weights"

    def strings(v):
        if isinstance(v, dict):
            return [s for x in v.values() for s in strings(x)]
        if isinstance(v, (list, tuple)):
            return [s for x in v for s in strings(x)]
        return [v] if isinstance(v, str) else []

    for name in ("tamper3d", "tamper2d"):
        card = json.loads((weights / f"{name}.json").read_text())
        ckpt = torch.load(weights / f"{name}.pt", map_location="cpu", weights_only=True)
        found = [s for s in strings(card) + strings(ckpt["config"]) + strings(ckpt.get("card", {})) if s.startswith(("/", "~"))]
        assert not found, f"{name}: {found[:3]}"


# A tiny recipe with a re-centring second stage (histogram trees blind to the scan's own columns) on
# one phantom: what the stage's training tests fit, each with the setting it is about.
TINY_STAGE_RECIPE = {
    "task": "tamper3d", "seed": 5, "phantoms": 1, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
    "inject": 1, "remove": 0, "per_scan": 1, "healthy": 1, "cube": 32, "width": 4, "epochs": 1, "batch_size": 8,
    "verifier": True, "verifier_phantoms": 2, "verifier_fixed_phantoms": 1, "verifier_inject": 1, "verifier_healthy": 1, "verifier_trees": 10,
    "verifier_candidate_threshold": 0.0, "verifier_max_candidates": 6, "verifier_recentre": True, "verifier_per_scan": 2,
    "verifier_scan_columns": False, "verifier_boosting": "histogram"}


def test_train_tamper3d_with_a_second_stage(tmp_path):
    """A tiny recipe with ``verifier: true``: the network, then the second stage fitted on fresh
    edits of its sources, blended with the network's probabilities; the run's detector re-scores its
    candidates with it, at the stage's own out-of-patient threshold."""
    from ctguard.engine.train_verifier import choose_threshold
    from ctguard.errors import InputError
    from ctguard.screen import load_detector, score_locations, screen_volume
    from ctguard.verifier import SCAN_COLUMNS, Verifier, feature_names

    cfg = {**TINY_STAGE_RECIPE, "verifier_blend": 0.5}
    with pytest.raises(InputError, match="verifier_boosting must be classic or histogram, not 'forest'"):
        api.train({**cfg, "verifier_boosting": "forest"}, tmp_path / "bad", progress=False, echo=lambda *_: None)
    assert not (tmp_path / "bad" / "model.pt").exists()  # refused before training
    for bad in (1.5, "half"):
        with pytest.raises(InputError, match=f"verifier_blend must be a number from 0 to 1, not {bad!r}"):
            api.train({**cfg, "verifier_blend": bad}, tmp_path / "bad", progress=False, echo=lambda *_: None)
    assert not (tmp_path / "bad" / "model.pt").exists()
    summary = api.train(cfg, tmp_path / "run", progress=False, echo=lambda *_: None)
    report = json.loads((tmp_path / "run" / "verifier.json").read_text())
    assert summary["verifier"]["threshold"] == report["threshold"] and report["sources"] == 3 and len(report["groups"]) == 3
    assert len(list((tmp_path / "run" / "verifier_rows").glob("*.npz"))) == 3  # each source's rows, kept for a later fit
    with np.load(tmp_path / "run" / "verifier_oof.npz") as oof:  # every row's out-of-patient score, which chose the threshold
        assert choose_threshold(oof["score"], oof["clean"], report["sources"], 0.1) == report["threshold"] and "cnn" not in oof.files
        assert len(oof["y"]) == report["rows"]
        counted_before = oof["clean"].copy()  # the untouched copies' candidates the threshold's rule counts
    # The untouched scans' highest candidates out of patient, which set the threshold: each from one of the groups, best first.
    highest = report["highest_clean_candidates_oof"]
    assert highest and all(h["group"] in report["groups"] for h in highest)
    assert [h["score"] for h in highest] == sorted((h["score"] for h in highest), reverse=True)
    over = sum(h["score"] >= report["threshold"] for h in highest)
    assert over / report["sources"] <= 0.1 or report["threshold"] == max(float(t) for t in report["false_per_clean_scan_oof"])
    v = Verifier.load(tmp_path / "run" / "model.verifier.npz")
    assert v.meta["recentre"] and len(v.meta["names"]) == len(feature_names(recentre=True)) + 3 and len(v.feature) == 10 * 3  # 10 stages of 3 classes
    assert v.meta["boosting"] == "histogram" and v.rate == 1.0  # histogram trees' leaves carry the rate
    assert v.meta["blend_network"] == 0.5  # its scores: the mean of the trees' and the network's probabilities
    # Trees blind to the scan's own columns (slice, pixel size, noise) never split on them.
    scan_cols = [v.meta["names"].index(n) for n in SCAN_COLUMNS]
    assert not v.meta["scan_columns"] and not np.isin(v.feature, scan_cols).any() and (v.feature >= 0).any()
    det = load_detector(str(tmp_path / "run" / "model.pt"))
    assert det.verifier is not None and det.threshold == report["threshold"]
    vol = phantom_source(9, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    result, _, _ = screen_volume(vol, det, threshold=0.0)
    net, _, _ = screen_volume(vol, det, threshold=0.0, stage2=False)
    assert result["model"]["second_stage"] and "second_stage" not in net["model"]
    assert result["findings"] and all("network_score" in f for f in result["findings"])
    by_place = {tuple(f["voxel"]): f["score"] for f in net["findings"]}
    assert all(by_place[tuple(f["voxel"])] == f["network_score"] for f in result["findings"])  # the same candidates, re-scored
    places = np.asarray([f["voxel"] for f in result["findings"][:3]], float)
    p2 = score_locations(vol, det, places)
    assert np.allclose(p2.sum(1), 1, atol=1e-5)
    assert np.allclose(1 - p2[:, 0], [f["score"] for f in result["findings"][:3]], atol=2e-3)  # the same stage at the same places
    assert not np.allclose(p2, score_locations(vol, det, places, stage2=False))
    # Fitted again on the kept rows with verifier_label_mm: the candidates labelled with an edit more
    # than 2 mm outside its rim are not learnt from, and the stage says how many; with
    # verifier_bagging, its trees are two fits averaged, which the run's detector reads.
    from ctguard.engine.train_verifier import fit_verifier, run_rows

    resolved, _, parts = run_rows(tmp_path / "run")
    far = sum(int(((p["y"] > 0) & (p["rim_mm"] > 2.0)).sum()) for p in parts)
    assert far and all(np.isnan(p["rim_mm"][p["y"] == 0]).all() for p in parts)  # some edit rows lie far out; untouched rows have no rim
    again = fit_verifier({**resolved, "verifier_label_mm": 2.0, "verifier_bagging": 2}, tmp_path / "run", echo=lambda *_: None)
    assert again["label_mm"] == 2.0 and again["rows_not_learnt"] == far and again["rows"] == report["rows"]
    bagged = Verifier.load(tmp_path / "run" / "model.verifier.npz")
    assert again["bagging"] == 2 and len(bagged.feature) == 2 * len(v.feature)  # twice the trees, each leaf halved
    # With verifier_off_centre, also two rows around each edit of every edited copy, labelled with it
    # and kept beside the source's rows; none is a candidate, so the threshold's rule counts the same rows.
    from ctguard.engine.train_verifier import OFF_CENTRE_MM, off_centre_rows, verifier_specs

    off = {**resolved, "verifier_off_centre": 2}
    moved = fit_verifier(off, tmp_path / "run", echo=lambda *_: None)
    extra = [off_centre_rows((off, spec, str(tmp_path / "run" / "model.pt"))) for spec in verifier_specs(off)]
    n_extra, n_edits = sum(len(e["y"]) for e in extra), sum(int(((p["y"] > 0) & ~p["candidate"]).sum()) for p in parts)
    assert moved["off_centre"] == 2 and moved["rows"] == report["rows"] + n_extra and 0 < n_extra <= 2 * n_edits
    assert all((e["y"] > 0).all() and not (e["candidate"] | e["clean"] | e["lesion"]).any() for e in extra)
    assert all((e["rim_mm"] <= OFF_CENTRE_MM[1] + 1e-3).all() for e in extra if len(e["y"]))
    assert len(list((tmp_path / "run" / "verifier_rows").glob("*.npz"))) == 6  # each source's rows off centre, kept beside its own
    with np.load(tmp_path / "run" / "verifier_oof.npz") as oof:  # the same rows counted, the off-centre ones after each source's
        assert len(oof["clean"]) == report["rows"] + n_extra and oof["clean"].sum() == counted_before.sum() > 0
        assert (oof["y"] > 0).sum() == sum(int((p["y"] > 0).sum()) for p in parts) + n_extra


def _refused_before_training(cfg: dict, tmp_path: Path, bad: list[tuple[dict, str]]) -> None:
    """Each change of ``cfg`` in ``bad`` stops ``api.train`` with its one-line error before any training."""
    from ctguard.errors import InputError

    for change, why in bad:
        with pytest.raises(InputError, match=why):
            api.train({**cfg, **change}, tmp_path / "bad", progress=False, echo=lambda *_: None)
        assert not (tmp_path / "bad" / "model.pt").exists()  # refused before training


def test_second_stage_threshold_counts_the_second_look(tmp_path):
    """``verifier_refine_from``: the threshold's rule counts each untouched training copy's candidate
    as screening will score it, the highest of it and its two re-centred places (their rows made
    once, kept beside the source's rows), from trees fitted without its patient; the trees
    themselves are the same; the detector's stage takes the second look."""
    from ctguard.engine.train_verifier import choose_threshold
    from ctguard.screen import load_detector

    cfg = {"task": "tamper3d", "seed": 5, "phantoms": 1, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
           "inject": 1, "remove": 0, "per_scan": 1, "healthy": 1, "cube": 32, "width": 4, "epochs": 1, "batch_size": 8,
           "verifier": True, "verifier_phantoms": 2, "verifier_fixed_phantoms": 1, "verifier_inject": 1, "verifier_healthy": 1,
           "verifier_trees": 10, "verifier_candidate_threshold": 0.0, "verifier_max_candidates": 6, "verifier_recentre": True,
           "verifier_per_scan": 2, "verifier_boosting": "histogram", "verifier_refine_from": 0.01}
    _refused_before_training(cfg, tmp_path, [({"verifier_refine_from": 1.5}, "must be a score over 0 and under 1"),
                                             ({"verifier_refine_from": 0.2, "verifier_scan_reference": True},
                                              "cannot be used with verifier_scan_reference")])
    run = tmp_path / "run"
    api.train(cfg, run, progress=False, echo=lambda *_: None)
    report = json.loads((run / "verifier.json").read_text())
    assert report["refine_from"] == 0.01 and "re-centred places" in report["threshold_rule"]
    assert len(list((run / "verifier_rows").glob("*.npz"))) == 2 * 3  # each source's rows and its re-centred rows
    with np.load(run / "verifier_oof.npz") as oof:
        score, trees, clean = oof["score"], oof["trees"], oof["clean"]
        assert choose_threshold(score, clean, report["sources"], 0.1) == report["threshold"]
    assert np.array_equal(score[~clean], trees[~clean])  # only the untouched copies' candidates get the second look
    assert (score[clean] >= trees[clean] - 1e-12).all() and (score[clean] > trees[clean] + 1e-6).any()
    det = load_detector(str(run / "model.pt"))
    assert det.verifier.meta["refine_from"] == 0.01 and det.threshold == report["threshold"]


# A tiny recipe with a second stage for the tests of the candidates from the lungs' maps (the trace's, the smooth map's).
MAP_PEAKS_RECIPE = {"task": "tamper3d", "seed": 5, "phantoms": 1, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
                    "inject": 1, "remove": 0, "per_scan": 1, "healthy": 1, "cube": 32, "width": 4, "epochs": 1, "batch_size": 8,
                    "verifier": True, "verifier_phantoms": 2, "verifier_fixed_phantoms": 0, "verifier_inject": 1, "verifier_healthy": 1,
                    "verifier_trees": 10, "verifier_candidate_threshold": 0.3, "verifier_max_candidates": 4, "verifier_recentre": True,
                    "verifier_resampling": True, "verifier_per_scan": 2, "verifier_boosting": "histogram"}


def _map_peaks_screening(det):
    """A fresh phantom of :data:`MAP_PEAKS_RECIPE`'s set-up screened by ``det``: ``(vol, lungs,
    heat, the candidates its stage takes, the network's own: from the stage's 0.3, its cap of 4)``."""
    from ctguard.lung import lung_mask
    from ctguard.screen import findings_from, heatmap, stage_candidates

    vol = phantom_source(77, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    lungs = lung_mask(vol)
    heat = heatmap(vol, det, lungs)
    return vol, lungs, heat, stage_candidates(heat, vol, det.verifier, 1.0, lungs), findings_from(heat, vol, 0.3)[:4]


def test_second_stage_takes_the_trace_peaks_as_candidates(tmp_path):
    """``verifier_trace_peaks``: each training copy's rows also hold the resampling trace's strongest
    peaks that the network's candidates do not already hold (kept beside the source's rows, under
    their own key), labelled and counted by the threshold's rule as candidates are; the detector's
    stage then takes the same peaks in screening, after the network's candidates. Training makes both
    kinds of rows in one pass over each source's copies; made apart they are the same."""
    from ctguard.engine.train_verifier import _source_rows, _trace_rows, run_rows, source_rows, stage_network, trace_rows
    from ctguard.screen import load_detector
    from ctguard.verifier import scan_noise, trace_peaks

    cfg = {**MAP_PEAKS_RECIPE, "verifier_trace_peaks": 3}
    _refused_before_training(cfg, tmp_path, [({"verifier_trace_peaks": -1}, "must be a whole number of peaks, 0 or more, not -1"),
                                             ({"verifier_trace_peaks": 2.5}, "not 2.5"),
                                             ({"verifier_resampling": False}, "needs verifier_resampling"),
                                             ({"verifier_refine_from": 0.2}, "cannot be used with verifier_refine_from")])
    run = tmp_path / "run"
    api.train(cfg, run, progress=False, echo=lambda *_: None)
    report = json.loads((run / "verifier.json").read_text())
    assert report["trace_peaks"] == 3 and report["sources"] == 2
    assert len(list((run / "verifier_rows").glob("*.npz"))) == 2 * 2  # each source's rows and its trace peaks' rows
    resolved, specs, parts = run_rows(run)
    assert report["rows"] == sum(len(p["y"]) for p in parts)
    for spec, part in zip(specs, parts):
        job = (resolved, spec, stage_network(resolved, run, spec))
        own, peaks = source_rows(job), trace_rows(job)
        n = len(own["y"])
        assert 0 < len(peaks["y"]) <= 3 * (1 + int(own["scan"].max()))  # at most 3 peaks a copy
        assert np.array_equal(part["x"][n:], peaks["x"]) and np.array_equal(part["y"][n:], peaks["y"])
        assert part["candidate"][n:].all() and np.array_equal(part["clean"][n:], peaks["scan"] == 0)  # copy 0: the untouched one
        for kept, apart in ((own, _source_rows(*job)), (peaks, _trace_rows(*job))):
            assert kept.keys() == apart.keys() and all(np.array_equal(kept[k], apart[k], equal_nan=np.asarray(kept[k]).dtype.kind == "f") for k in kept)
    det = load_detector(str(run / "model.pt"))
    assert det.verifier.meta["trace_peaks"] == 3
    vol, lungs, heat, taken, network = _map_peaks_screening(det)
    peaks = trace_peaks(vol, lungs, scan_noise(vol, lungs)[0], 3, np.asarray([f["voxel"] for f in network], float).reshape(-1, 3))
    assert taken[: len(network)] == [{**f, "source": "network"} for f in network]
    assert len(peaks) and [f["voxel"] for f in taken[len(network):]] == [[round(float(c), 1) for c in p] for p in peaks]
    assert all(f["source"] == "trace" for f in taken[len(network):])
    # Screening reads the whole scan for the stage (its noise, the trace's map, its own level of the
    # trace) in a thread beside the network; read in line instead, the result is the same.
    from ctguard.screen import _result, screen_volume

    reading = det.verifier.read_scan(vol, lungs)
    assert reading.noise == scan_noise(vol, lungs) and len(reading.trace[0]) > len(peaks)
    assert (reading.reference is not None) == bool(det.verifier.meta.get("trace_scan"))
    threaded, heat_again, _ = screen_volume(vol, det, threshold=0.3)
    inline = _result(vol, det, heat_again, 0.3, "", list(vol.warnings), 0.0, lungs, det.verifier)
    assert threaded["model"]["second_stage"] and threaded["findings"] + threaded["under_threshold"]  # candidates the stage scored
    assert {k: v for k, v in threaded.items() if k != "elapsed_s"} == {k: v for k, v in inline.items() if k != "elapsed_s"}


def test_the_smooth_map_finds_a_place_filled_smooth():
    """:func:`ctguard.verifier.smooth_map`: in lung of noise alone, a 16 mm ball replaced by its
    smoothed self (an in-painting without the scan's noise) is the map's strongest peak, and the map
    is flat (within noise) where nothing was filled; the same map comes from the one pass that reads
    the trace's map too."""
    from scipy import ndimage

    from ctguard.verifier import lung_maps, strongest_peaks, smooth_map, trace_map
    from ctguard.volume import Volume

    rng = np.random.default_rng(3)
    spacing = (1.25, 0.7, 0.7)
    hu = (-850.0 + 20.0 * rng.standard_normal((64, 128, 128))).astype(np.float32)
    lungs = np.ones(hu.shape, bool)
    centre = np.array([30, 70, 60])
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(hu.shape, centre, spacing)], indexing="ij")
    ball = zz**2 + yy**2 + xx**2 <= 8.0**2
    filled = hu.copy()
    filled[ball] = ndimage.gaussian_filter(hu, 2.0)[ball]
    score, centres = smooth_map(Volume(filled, spacing), lungs, 20.0)
    top = strongest_peaks((score, centres), spacing, 1)[0]
    assert np.linalg.norm((top - centre) * np.asarray(spacing)) <= 6.0
    plain, _ = smooth_map(Volume(hu, spacing), lungs, 20.0)
    finite = np.isfinite(plain)
    assert finite.any() and np.abs(plain[finite]).max() < 0.5 < score.max()
    trace, smooth = lung_maps(Volume(filled, spacing), lungs, 20.0, trace=True, smooth=True)
    assert np.array_equal(smooth[0], score) and np.array_equal(smooth[1], centres)
    assert all(np.array_equal(a, b) for a, b in zip(trace, trace_map(Volume(filled, spacing), lungs, 20.0)))


def test_second_stage_takes_the_smooth_maps_peaks_as_candidates(tmp_path):
    """``verifier_smooth_peaks``: each training copy's rows also hold the smooth map's strongest
    peaks that the network's candidates do not already hold, labelled as candidates are, and the
    detector's stage takes the same peaks in screening after the network's candidates."""
    from ctguard.engine.train_verifier import run_rows, source_rows, stage_network, trace_rows
    from ctguard.screen import load_detector, stage_candidates
    from ctguard.verifier import scan_noise, smooth_map, strongest_peaks

    cfg = {**MAP_PEAKS_RECIPE, "verifier_smooth_peaks": 2}
    _refused_before_training(cfg, tmp_path, [({"verifier_smooth_peaks": -1}, "must be a whole number of peaks, 0 or more, not -1"),
                                             ({"verifier_smooth_peaks": True}, "not True"),
                                             ({"verifier_shape": "yes"}, "verifier_shape must be true or false, not 'yes'"),
                                             ({"verifier_refine_from": 0.2}, "verifier_smooth_peaks cannot be used with verifier_refine_from")])
    run = tmp_path / "run"
    api.train(cfg, run, progress=False, echo=lambda *_: None)
    report = json.loads((run / "verifier.json").read_text())
    assert report["smooth_peaks"] == 2 and "trace_peaks" not in report
    resolved, specs, parts = run_rows(run)
    for spec, part in zip(specs, parts):
        job = (resolved, spec, stage_network(resolved, run, spec))
        own, peaks = source_rows(job), trace_rows(job)
        n = len(own["y"])
        assert 0 < len(peaks["y"]) <= 2 * (1 + int(own["scan"].max()))  # at most 2 peaks a copy
        assert np.array_equal(part["x"][n:], peaks["x"]) and part["candidate"][n:].all()
    det = load_detector(str(run / "model.pt"))
    assert det.verifier.meta["smooth_peaks"] == 2
    vol, lungs, heat, taken, network = _map_peaks_screening(det)
    peaks = strongest_peaks(smooth_map(vol, lungs, scan_noise(vol, lungs)[0]), vol.spacing, 2,
                            np.asarray([f["voxel"] for f in network], float).reshape(-1, 3))
    assert taken[: len(network)] == [{**f, "source": "network"} for f in network]
    assert len(peaks) and [f["voxel"] for f in taken[len(network):]] == [[round(float(c), 1) for c in p] for p in peaks]
    assert all(f["source"] == "smooth" for f in taken[len(network):])
    reading = det.verifier.read_scan(vol, lungs)
    assert reading.trace is None and all(np.array_equal(a, b) for a, b in zip(reading.smooth, smooth_map(vol, lungs, reading.noise[0])))
    assert stage_candidates(heat, vol, det.verifier, 1.0, lungs, reading.noise, reading.trace, reading.smooth) == taken


def test_the_maps_peaks_get_a_threshold_of_their_own(tmp_path, monkeypatch):
    """``verifier_peak_threshold``: the network's candidates and the maps' peaks each get the rule's
    threshold on their own untouched training candidates, with half the budget each; screening holds
    each scored place to its own source's threshold (a caller's threshold holds them all), and the
    cross-validation's findings, read from a screening at a lower threshold, are screening's own."""
    from ctguard.engine.train_verifier import choose_threshold, run_rows
    from ctguard.screen import every_place, load_detector, screen_volume, source_thresholds

    cfg = {**MAP_PEAKS_RECIPE, "verifier_trace_peaks": 3, "verifier_smooth_peaks": 2, "verifier_peak_threshold": True}
    _refused_before_training(cfg, tmp_path, [({"verifier_peak_threshold": "yes"}, "verifier_peak_threshold must be true or false"),
                                             ({"verifier_trace_peaks": 0, "verifier_smooth_peaks": 0},
                                              "verifier_peak_threshold needs candidates from the maps' peaks")])
    run = tmp_path / "run"
    api.train(cfg, run, progress=False, echo=lambda *_: None)
    report = json.loads((run / "verifier.json").read_text())
    _, _, parts = run_rows(run)
    peak = np.concatenate([p["peak"] for p in parts])
    with np.load(run / "verifier_oof.npz") as oof:
        assert (oof["clean"] & peak).any() and (oof["clean"] & ~peak).any()
        assert report["threshold"] == choose_threshold(oof["score"], oof["clean"] & ~peak, report["sources"], 0.05)
        assert report["peak_threshold"] == choose_threshold(oof["score"], oof["clean"] & peak, report["sources"], 0.05)
    det = load_detector(str(run / "model.pt"))
    assert det.verifier.meta["peak_threshold"] == report["peak_threshold"]
    vol = phantom_source(77, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    low, _, _ = screen_volume(vol, det, threshold=0.0)  # every place the stage scores, each held to the caller's threshold
    assert "peak_threshold" not in low["model"] and all(f["threshold"] == 0.0 for f in every_place(low["findings"]))
    scores = {s: [p["score"] for p in every_place(low["findings"]) if (p["source"] == "network") == (s == "network")] for s in ("network", "maps")}
    assert len(scores["network"]) >= 2 and len(scores["maps"]) >= 2
    # Each source's median as its threshold, so that each source has places over and under its own.
    det.threshold, det.verifier.meta["peak_threshold"] = float(np.median(scores["network"])), float(np.median(scores["maps"]))
    net, maps = det.threshold, det.verifier.meta["peak_threshold"]
    assert source_thresholds(det) == {"network": net, "trace": maps, "smooth": maps, "blob": maps}
    assert source_thresholds(det, 0.3) == {"network": 0.3, "trace": 0.3, "smooth": 0.3, "blob": 0.3}
    own, _, _ = screen_volume(vol, det)
    assert own["model"]["threshold"] == net and own["model"]["peak_threshold"] == maps
    places = own["findings"] + own["under_threshold"]
    assert all(f["threshold"] == (net if f["source"] == "network" else maps) for f in places)
    assert all(f["score"] >= f["threshold"] for f in own["findings"]) and all(f["score"] < f["threshold"] for f in own["under_threshold"])
    assert {"network", "trace", "smooth"} & {f["source"] for f in own["findings"]}
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cross_validate import listed_findings

    def key(findings):
        return [(p.get("kind"), p["score"], p["voxel"], p["source"], p["threshold"]) for p in every_place(findings)]

    assert key(listed_findings(low["findings"], vol.spacing, source_thresholds(det))) == key(own["findings"])


def test_the_threshold_rule_can_leave_out_the_stage_phantoms_own_nodules():
    """``verifier_count_phantom_lesions: false``: the rule does not count the stage phantoms'
    candidates at their own genuine nodules (drawn by the injection renderer), but still counts a
    real patient's at its lesions and every other untouched candidate; a wrong value is refused."""
    from ctguard.engine.train_verifier import check_stage_config, choose_threshold, threshold_counted
    from ctguard.errors import InputError

    parts = [{"group": "phantom 903", "lesion": np.array([True, False, False]), "y": np.zeros(3)},
             {"group": "LIDC-IDRI-0001", "lesion": np.array([True, False]), "y": np.zeros(2)},
             {"group": "phantom 904", "lesion": np.array([True, False]), "y": np.zeros(2)}]
    clean = np.array([True, True, False, True, True, True, True])  # the phantom's third row is an edit's
    assert threshold_counted({}, parts, clean) is clean  # counted by default
    counted = threshold_counted({"verifier_count_phantom_lesions": False}, parts, clean)
    assert counted.tolist() == [False, True, False, True, True, False, True]
    scores = np.array([0.999, 0.6, 0.99, 0.7, 0.2, 0.97, 0.1])  # the phantoms' nodules score as injections do
    assert choose_threshold(scores, clean, 3, 0.0) > 0.99 and choose_threshold(scores, counted, 3, 0.0) == 0.75
    with pytest.raises(InputError, match="verifier_count_phantom_lesions must be true or false"):
        check_stage_config({"seed": 0, "verifier_count_phantom_lesions": "no"})


def test_the_stage_can_leave_out_edit_labels_far_from_their_edit():
    """``verifier_label_mm``: a candidate labelled with an edit (within 10 mm of its rim) more than r mm
    outside the rim gets weight 0 in the stage's fits; an edit's own centre, a near candidate and every
    untouched row keep weight 1; kept rows without the distance and a wrong value are refused."""
    from ctguard.engine.train_verifier import check_stage_config, joined_peaks, label_weights, rim_mm
    from ctguard.errors import InputError

    assert rim_mm([10, 100, 112], [10, 100, 100], 8.0, (2.0, 1.0, 1.0)) == pytest.approx(8.0)
    assert rim_mm([11, 100, 100], [10, 100, 100], 8.0, (2.0, 1.0, 1.0)) == pytest.approx(-2.0)
    parts = [{"source": "a", "y": np.array([1, 1, 1, 0]), "rim_mm": np.array([-5.0, 2.0, 7.5, np.nan], np.float32)},
             {"source": "b", "y": np.array([2, 0]), "rim_mm": np.array([9.0, np.nan], np.float32)}]
    assert label_weights({}, parts) is None  # off by default: every row alike
    assert label_weights({"verifier_label_mm": 5}, parts).tolist() == [1, 1, 0, 1, 0, 1]
    assert label_weights({"verifier_label_mm": 0}, parts).tolist() == [1, 0, 0, 1, 0, 1]
    with pytest.raises(InputError, match="kept rows of b lack"):
        label_weights({"verifier_label_mm": 5}, parts[:1] + [{"source": "b", "y": np.array([0])}])
    # A source's rows joined with its maps' peaks' rows keep the distance only where both hold it.
    rows = {"x": np.zeros((2, 3)), "y": np.array([1, 0]), "scan": np.zeros(2), "clean": np.zeros(2, bool), "candidate": np.ones(2, bool),
            "lesion": np.zeros(2, bool), "rim_mm": np.array([3.0, np.nan]), "source": "c"}
    older = {k: v for k, v in rows.items() if k != "rim_mm"}
    assert label_weights({"verifier_label_mm": 2}, joined_peaks([rows], [rows])).tolist() == [0, 1, 0, 1]
    with pytest.raises(InputError, match="kept rows of c lack"):
        label_weights({"verifier_label_mm": 2}, joined_peaks([rows], [older]))
    for wrong in (10, -1, "5", True):
        with pytest.raises(InputError, match="verifier_label_mm must be a distance"):
            check_stage_config({"seed": 0, "verifier_label_mm": wrong})
    with pytest.raises(InputError, match="verifier_label_mm cannot be used with verifier_patches"):
        check_stage_config({"seed": 0, "verifier_label_mm": 2, "verifier_patches": True})


def test_the_stage_can_learn_edits_off_their_centre():
    """``verifier_off_centre``: places around an edit, in the lungs, from 1.5 mm off its centre to 4 mm
    past its rim (none where no lung is near); joined after a source's rows as neither candidates nor
    clean nor a map's peak; a wrong value, or use with patches, is refused."""
    from ctguard.engine.train_verifier import OFF_CENTRE_MM, check_stage_config, joined_off_centre, off_centre_place
    from ctguard.errors import InputError

    lungs = np.zeros((20, 40, 40), bool)
    lungs[2:18, 5:35, 5:35] = True
    centre, spacing, rng = np.array([10.0, 20.0, 20.0]), np.array([2.0, 1.0, 1.0]), np.random.default_rng(0)
    places = [off_centre_place(centre, 6.0, spacing, lungs, rng) for _ in range(200)]
    d = np.array([np.linalg.norm((q - centre) * spacing) for q in places])
    assert d.min() >= OFF_CENTRE_MM[0] and d.max() <= 3.0 + OFF_CENTRE_MM[1] and d.min() < 2.5 and d.max() > 6.0
    assert all(lungs[tuple(np.rint(q).astype(int))] for q in places)
    assert off_centre_place(centre, 6.0, spacing, np.zeros_like(lungs), rng) is None
    lungs[:, :, :] = False
    lungs[:, :, 21:] = True  # lung only on one side: every place there
    assert all(off_centre_place(centre, 6.0, spacing, lungs, rng)[2] >= 20.5 for _ in range(20))
    rows = {"x": np.zeros((2, 3), np.float32), "y": np.array([1, 0], np.int8), "scan": np.array([1, 0], np.int16),
            "clean": np.array([False, True]), "candidate": np.array([False, True]), "lesion": np.zeros(2, bool),
            "rim_mm": np.array([-3.0, np.nan], np.float32), "peak": np.array([False, True]), "group": "p", "source": "s"}
    extra = {"x": np.ones((1, 3), np.float32), "y": np.array([2], np.int8), "scan": np.array([2], np.int16), "clean": np.zeros(1, bool),
             "candidate": np.zeros(1, bool), "lesion": np.zeros(1, bool), "rim_mm": np.array([1.5], np.float32)}
    (joined,) = joined_off_centre([rows], [extra])
    assert joined["y"].tolist() == [1, 0, 2] and joined["x"][2].tolist() == [1, 1, 1] and joined["peak"].tolist() == [False, True, False]
    assert joined["candidate"].tolist() == [False, True, False] and joined["rim_mm"][2] == 1.5 and joined["group"] == "p"
    for wrong in (-1, 1.5, "2", True):
        with pytest.raises(InputError, match="verifier_off_centre must be a whole number"):
            check_stage_config({"seed": 0, "verifier_off_centre": wrong})
    with pytest.raises(InputError, match="verifier_off_centre cannot be used with verifier_patches"):
        check_stage_config({"seed": 0, "verifier_off_centre": 2, "verifier_patches": True})


def test_the_stage_can_average_fits_of_other_seeds():
    """``verifier_bagging: k``: the stage's trees are k histogram fits of other seeds (the first the
    single fit's), their raw scores averaged; the detector's trees read the same probabilities; a
    wrong value, or bagging of classic boosting, is refused."""
    from ctguard.engine.train_verifier import VERIFIER_DEFAULTS, boosting_classifier, check_stage_config
    from ctguard.errors import InputError
    from ctguard.verifier import Verifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    cfg = {**VERIFIER_DEFAULTS, "seed": 0, "verifier_boosting": "histogram", "verifier_trees": 30}
    bag = boosting_classifier({**cfg, "verifier_bagging": 3}).fit(x, y)
    one = boosting_classifier(cfg).fit(x, y)
    assert len(bag.members) == 3 and np.array_equal(bag.members[0].predict_proba(x), one.predict_proba(x))
    assert not np.allclose(bag.predict_proba(x), one.predict_proba(x))  # the other seeds' column halves differ
    mean_raw = np.mean([m.decision_function(x) for m in bag.members], axis=0)
    assert np.allclose(np.log(bag.predict_proba(x)) - np.log(bag.predict_proba(x))[:, :1], mean_raw - mean_raw[:, :1], atol=1e-6)
    assert np.allclose(Verifier.from_sklearn(bag, x, {}).probabilities(x), bag.predict_proba(x), atol=1e-5)
    with pytest.raises(InputError, match="verifier_bagging needs verifier_boosting: histogram"):
        check_stage_config({"seed": 0, "verifier_bagging": 2})
    for wrong in (0, 2.5, True):
        with pytest.raises(InputError, match="verifier_bagging must be a whole number of fits"):
            check_stage_config({"seed": 0, "verifier_boosting": "histogram", "verifier_bagging": wrong})


def test_the_stage_trees_share_of_columns_is_a_setting():
    """``verifier_max_features``: the share of the columns each split of the stage's trees chooses
    from, passed to either kind of boosting (half by default); a share that is not over 0 and at most
    1 is refused before anything is trained."""
    from ctguard.engine.train_verifier import VERIFIER_DEFAULTS, boosting_classifier, check_stage_config
    from ctguard.errors import InputError

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    cfg = {**VERIFIER_DEFAULTS, "seed": 0, "verifier_boosting": "histogram", "verifier_trees": 20}
    assert boosting_classifier(cfg).max_features == 0.5
    quarter = boosting_classifier({**cfg, "verifier_max_features": 0.25})
    assert quarter.max_features == 0.25
    assert boosting_classifier({**cfg, "verifier_boosting": "classic", "verifier_max_features": 0.25}).max_features == 0.25
    assert not np.allclose(quarter.fit(x, y).predict_proba(x), boosting_classifier(cfg).fit(x, y).predict_proba(x))
    for wrong in (0, -0.5, 1.5, "0.3", True):
        with pytest.raises(InputError, match="verifier_max_features must be a share of the columns"):
            check_stage_config({"seed": 0, "verifier_boosting": "histogram", "verifier_max_features": wrong})


def test_a_place_over_its_own_threshold_is_never_merged_into_one_under_its_own():
    """:func:`ctguard.screen.over_own_threshold`: a peak of the maps over the peaks' threshold beside
    a better-scored network candidate under the network's stays a finding, and the candidate is
    merged into it; places of one source keep :func:`ctguard.screen.merged`'s order."""
    from ctguard.screen import over_own_threshold

    def place(source, score, voxel):
        return {"kind": "removed", "score": score, "voxel": voxel, "radius_mm": 8.0, "source": source}

    scored = [place("network", 0.9, [10, 100, 100]), place("trace", 0.8, [10, 100, 110]), place("network", 0.97, [10, 100, 140])]
    out = over_own_threshold(scored, (2.0, 1.0, 1.0), {"network": 0.95, "trace": 0.7, "smooth": 0.7})
    assert [(f["source"], f["score"], f["threshold"]) for f in out] == [("network", 0.97, 0.95), ("trace", 0.8, 0.7)]
    assert out[1]["also_at"] == [{"voxel": [10, 100, 100], "score": 0.9, "source": "network", "threshold": 0.95}]
    one = over_own_threshold(scored, (2.0, 1.0, 1.0), dict.fromkeys(("network", "trace", "smooth"), 0.7))
    assert [(f["score"], len(f.get("also_at", []))) for f in one] == [(0.97, 0), (0.9, 1)]


def test_second_stage_rows_from_cross_fit_networks(tmp_path, monkeypatch):
    """``verifier_cross_fit``: a network of the recipe for each group of training patients, trained
    without them; each patient's stage rows (its edits' and untouched places' probabilities, and the
    candidates) come from the network that never saw it, a phantom's from the run's own; a refit
    keeps the networks whose config differs only in the stage's settings."""
    from ctguard import io
    from ctguard.engine import train3d
    from ctguard.engine.train_verifier import cross_fit_groups, source_rows, stage_network, verifier_specs
    from ctguard.errors import InputError

    scans = [{"patient": patient, "scan": str(io.write_itk(phantom_source(30 + k, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume,
                                                            tmp_path / f"{patient}.nrrd"))} for k, patient in enumerate(("P1", "P2"))]
    cfg = {"task": "tamper3d", "seed": 5, "phantoms": 1, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
           "real_scans": scans, "inject": 1, "remove": 0, "per_scan": 1, "healthy": 1, "cube": 32, "width": 4, "epochs": 1, "batch_size": 8,
           "verifier": True, "verifier_phantoms": 0, "verifier_fixed_phantoms": 0, "verifier_inject": 1, "verifier_healthy": 1,
           "verifier_trees": 10, "verifier_candidate_threshold": 0.0, "verifier_max_candidates": 4, "verifier_per_scan": 1,
           "verifier_boosting": "histogram", "verifier_cross_fit": 2}
    for bad, says in ((1, r"must be 0 \(off\) or a whole number from 2, not 1"), (True, "not True"),
                      (3, r"verifier_cross_fit \(3\) needs at least as many training patients; it has 2")):
        with pytest.raises(InputError, match=says):
            api.train({**cfg, "verifier_cross_fit": bad}, tmp_path / "bad", progress=False, echo=lambda *_: None)
    assert not (tmp_path / "bad" / "model.pt").exists()  # refused before training
    three = {"real_scans": [{"patient": p, "scan": f"{p}.nrrd"} for p in ("A", "B", "A", "C")], "verifier_cross_fit": 2}
    assert cross_fit_groups(three) == [["A", "C"], ["B"]]  # each patient once, dealt in turn in the config's order
    run = tmp_path / "run"
    api.train(cfg, run, progress=False, echo=lambda *_: None)
    for g, left_out in enumerate(("P1", "P2")):
        sub = json.loads((run / f"cross_fit{g}" / "config.json").read_text())
        assert [e["patient"] for e in sub["real_scans"]] == [e["patient"] for e in scans if e["patient"] != left_out]
        assert not sub["verifier"] and (run / f"cross_fit{g}" / "model.pt").is_file()
    report = json.loads((run / "verifier.json").read_text())
    assert report["cross_fit"] == [["P1"], ["P2"]] and report["sources"] == 2
    resolved = json.loads((run / "config.json").read_text())
    specs = verifier_specs(resolved)
    assert [stage_network(resolved, run, s) for s in specs] == [str(run / "cross_fit0" / "model.pt"), str(run / "cross_fit1" / "model.pt")]
    assert stage_network(resolved, run, ("phantom", 900)) == str(run / "model.pt")
    # Each source's rows are kept beside the network that made them, and found there again.
    kept = sorted(run.glob("**/verifier_rows/*.npz"))
    assert [len(list((run / d / "verifier_rows").glob("*.npz"))) for d in (".", "cross_fit0", "cross_fit1")] == [0, 1, 1]
    for spec in specs:
        source_rows((resolved, spec, stage_network(resolved, run, spec)))
    assert sorted(run.glob("**/verifier_rows/*.npz")) == kept
    trained, said = [], []
    monkeypatch.setattr(train3d, "_train", lambda sub, where, *a: trained.append(where.name))
    train3d.train_cross_fit_networks({**resolved, "verifier_blend": 0.5}, run, echo=said.append)  # a stage setting: the same networks
    assert not trained and sum("kept from" in m for m in said) == 2
    train3d.train_cross_fit_networks({**resolved, "epochs": 2}, run, echo=said.append)  # another recipe: both anew
    assert trained == ["cross_fit0", "cross_fit1"]


def test_second_stage_with_a_patch_cnn(tmp_path):
    """``verifier_patches``: the stage's rows keep each place's native patch, a small CNN is trained
    on them (out of patient for the threshold, then on all rows), exported as ONNX beside the trees,
    and screening averages its probabilities with the trees' at the meta's weight."""
    import dataclasses

    from ctguard.engine.train_verifier import choose_threshold
    from ctguard.errors import InputError
    from ctguard.patches import CHANNELS, SIZE, PatchScorer, patches_at
    from ctguard.screen import load_detector, score_locations
    from ctguard.verifier import Verifier, blend, scan_noise

    cfg = {"task": "tamper3d", "seed": 5, "phantoms": 1, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
           "inject": 1, "remove": 0, "per_scan": 1, "healthy": 1, "cube": 32, "width": 4, "epochs": 1, "batch_size": 8,
           "verifier": True, "verifier_phantoms": 2, "verifier_fixed_phantoms": 1, "verifier_inject": 1, "verifier_healthy": 1, "verifier_trees": 10,
           "verifier_candidate_threshold": 0.0, "verifier_max_candidates": 6, "verifier_per_scan": 2, "verifier_boosting": "histogram",
           "verifier_patches": True, "verifier_patch_weight": 0.4, "verifier_patch_epochs": 1}
    for key, bad, says in [("verifier_patches", "yes", "true or false"), ("verifier_patch_weight", 0, "over 0 and at most 1"),
                           ("verifier_patch_weight", 1.5, "over 0 and at most 1"), ("verifier_patch_epochs", 0, "whole number from 1")]:
        with pytest.raises(InputError, match=f"{key} must be (a number |a )?{says}.*not {re.escape(repr(bad))}"):
            api.train({**cfg, key: bad}, tmp_path / "bad", progress=False, echo=lambda *_: None)
    assert not (tmp_path / "bad" / "model.pt").exists()  # refused before training
    run = tmp_path / "run"
    api.train(cfg, run, progress=False, echo=lambda *_: None)
    report = json.loads((run / "verifier.json").read_text())
    assert report["patch_weight"] == 0.4 and report["patch_seconds"] > 0 and (run / "model.patches.onnx").is_file()
    with np.load(run / "verifier_oof.npz") as oof:  # the threshold chosen on the average of the out-of-patient scores
        assert np.allclose(oof["score"], 0.6 * oof["trees"] + 0.4 * oof["cnn"])
        assert choose_threshold(oof["score"], oof["clean"], report["sources"], 0.1) == report["threshold"]
        assert set(oof["group"].tolist()) == set(report["groups"]) and len(oof["y"]) == report["rows"]
    for f in (run / "verifier_rows").glob("*.npz"):  # every row with its patch
        with np.load(f) as d:
            assert d["patches"].shape == (len(d["y"]), CHANNELS, SIZE, SIZE) and d["patches"].dtype == np.float16
    det = load_detector(str(run / "model.pt"))
    assert isinstance(det.verifier.patches, PatchScorer)
    vol = phantom_source(9, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    places = np.asarray([[20.0, 48.0, 30.0], [20.0, 40.0, 66.0], [0.0, 0.0, 0.0]])
    p_net = score_locations(vol, det, places, stage2=False)
    p = score_locations(vol, det, places)
    trees = dataclasses.replace(det.verifier, meta={**det.verifier.meta, "patch_weight": 0.0}, patches=None)
    lungs = lung_mask(vol)
    p_trees = trees.score_places(vol, places, p_net, lungs)
    p_cnn = det.verifier.patches.probabilities(patches_at(vol, places, scan_noise(vol, lungs)))
    assert np.allclose(p.sum(1), 1, atol=1e-5) and np.allclose(p_cnn.sum(1), 1, atol=1e-5)
    assert np.allclose(p, blend(p_trees, p_cnn, 0.4), atol=1e-6) and not np.allclose(p, p_trees)
    (run / "model.patches.onnx").unlink()
    with pytest.raises(InputError, match=r"needs its patch CNN beside it \(model.patches.onnx\)"):
        Verifier.load(run / "model.verifier.npz")


def test_second_stage_reads_places_against_the_scans_candidates(tmp_path):
    """``verifier_scan_reference``: each row also less the median row of its scan copy's network
    candidates, in training (rows say which are candidates) and in screening (a scan's candidates
    against themselves); scoring other places needs the scan's reference."""
    from ctguard.engine.train_verifier import VERIFIER_DEFAULTS, row_names, with_scan_reference
    from ctguard.errors import InputError
    from ctguard.screen import findings_from, every_place, finding_probabilities, heatmap, load_detector, score_locations, screen_volume
    from ctguard.verifier import Verifier, finite_rows, scan_noise

    cfg = {"task": "tamper3d", "seed": 5, "phantoms": 1, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
           "inject": 1, "remove": 0, "per_scan": 1, "healthy": 1, "cube": 32, "width": 4, "epochs": 1, "batch_size": 8,
           "verifier": True, "verifier_phantoms": 2, "verifier_fixed_phantoms": 1, "verifier_inject": 1, "verifier_healthy": 1, "verifier_trees": 10,
           "verifier_candidate_threshold": 0.0, "verifier_max_candidates": 6, "verifier_per_scan": 2, "verifier_boosting": "histogram",
           "verifier_scan_reference": True}
    with pytest.raises(InputError, match="verifier_scan_reference must be true or false, not 'yes'"):
        api.train({**cfg, "verifier_scan_reference": "yes"}, tmp_path / "bad", progress=False, echo=lambda *_: None)
    assert not (tmp_path / "bad" / "model.pt").exists()  # refused before training
    run = tmp_path / "run"
    api.train(cfg, run, progress=False, echo=lambda *_: None)
    made = len(row_names({**VERIFIER_DEFAULTS, **cfg}))
    parts = [dict(np.load(f)) for f in sorted((run / "verifier_rows").glob("*.npz"))]
    assert len(parts) == 3
    for part in parts:  # the clean copy's candidates are candidates; each copy's candidates follow its edits' and places' rows
        assert part["candidate"].dtype == bool and part["candidate"][part["clean"]].all() and part["candidate"].any()
        for k in np.unique(part["scan"]):
            flags = part["candidate"][part["scan"] == k]
            assert not flags[0] and (np.diff(flags.astype(int)) >= 0).all()
    part = parts[0]
    ref = with_scan_reference(part)["x"]
    copy = part["scan"] == part["scan"][-1]
    median = np.median(finite_rows(part["x"][copy & part["candidate"]]), axis=0)
    assert ref.shape == (len(part["y"]), 2 * made) and np.allclose(ref[copy, :made], part["x"][copy])
    assert np.allclose(ref[copy, made:], part["x"][copy] - median, atol=1e-4)
    v = Verifier.load(run / "model.verifier.npz")
    assert v.meta["scan_reference"] and len(v.meta["names"]) == 2 * made and v.meta["names"][made] == v.meta["names"][0] + "_vs_scan"
    assert (v.feature >= made).any()  # the trees split on columns read against the scan

    det = load_detector(str(run / "model.pt"))
    vol = phantom_source(9, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    lungs = lung_mask(vol)
    result, _, _ = screen_volume(vol, det, threshold=0.0)
    cands = findings_from(heatmap(vol, det, lungs), vol, 0.0)[:6]
    at, p_cands = np.asarray([f["voxel"] for f in cands], float), finding_probabilities(cands)
    rows = finite_rows(v.rows(vol, at, p_cands, scan_noise(vol, lungs)))
    by_hand = v.probabilities(np.hstack([rows, rows - np.median(rows, axis=0)]))
    scores = {tuple(p["voxel"]): p["score"] for p in every_place(result["findings"])}  # every scored place
    assert sorted(scores) == sorted(tuple(c["voxel"]) for c in cands)
    assert np.allclose([scores[tuple(c["voxel"])] for c in cands], 1 - by_hand[:, 0], atol=1e-4)
    places = np.asarray([[20.0, 48.0, 30.0], [20.0, 40.0, 66.0]])
    p_net = score_locations(vol, det, places, stage2=False)
    at_places = finite_rows(v.rows(vol, places, p_net, scan_noise(vol, lungs)))
    expect = v.probabilities(np.hstack([at_places, at_places - np.median(rows, axis=0)]))
    assert np.allclose(score_locations(vol, det, places), expect, atol=1e-5)
    with pytest.raises(ValueError, match="against the scan's candidates"):
        v.score_places(vol, places, p_net, lungs)


def test_second_stage_checks_injected_places_against_genuine_nodules(tmp_path):
    """``verifier_nodule_check``: two-class trees (genuine nodule or injected), learnt from the
    training sources' lesions and injections and from phantoms each with a genuine nodule, take the
    "injected" share of a place's probabilities that they call genuine back to genuine, in the
    threshold's out-of-patient scores and in screening; saved in the stage's file."""
    from ctguard.engine.train_verifier import VERIFIER_DEFAULTS, nodule_specs, nodule_table
    from ctguard.errors import InputError
    from ctguard.screen import findings_from, every_place, finding_probabilities, heatmap, load_detector, screen_volume
    from ctguard.verifier import Verifier, finite_rows, nodule_checked, scan_noise

    p = np.array([[0.2, 0.7, 0.1], [0.5, 0.1, 0.4]], np.float32)
    checked = nodule_checked(p, np.array([0.25, 1.0]))
    assert np.allclose(checked, [[0.725, 0.175, 0.1], [0.5, 0.1, 0.4]]) and np.allclose(checked.sum(axis=1), 1)

    cfg = {"task": "tamper3d", "seed": 5, "phantoms": 1, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6],
           "inject": 1, "remove": 0, "per_scan": 1, "healthy": 1, "cube": 32, "width": 4, "epochs": 1, "batch_size": 8,
           "verifier": True, "verifier_phantoms": 2, "verifier_fixed_phantoms": 1, "verifier_inject": 1, "verifier_healthy": 1,
           "verifier_trees": 10, "verifier_candidate_threshold": 0.0, "verifier_max_candidates": 6, "verifier_per_scan": 2,
           "verifier_boosting": "histogram", "verifier_nodule_check": True, "verifier_nodule_phantoms": 2}
    for key, bad, says in (("verifier_nodule_check", "yes", "verifier_nodule_check must be true or false, not 'yes'"),
                           ("verifier_nodule_phantoms", -1, "verifier_nodule_phantoms must be a whole number from 0, not -1")):
        with pytest.raises(InputError, match=says):
            api.train({**cfg, key: bad}, tmp_path / "bad", progress=False, echo=lambda *_: None)
        assert not (tmp_path / "bad" / "model.pt").exists()  # refused before training
    specs = nodule_specs({**VERIFIER_DEFAULTS, **cfg})
    assert specs == [("phantom", 5300, True), ("phantom", 5301, True)]
    run = tmp_path / "run"
    api.train(cfg, run, progress=False, echo=lambda *_: None)
    parts = [dict(np.load(f)) for f in sorted((run / "verifier_rows").glob("*.npz"))]
    assert len(parts) == 5  # the stage's 3 sources and the check's 2 phantoms
    for part in parts:  # a lesion row is on the untouched copy, never an edit
        assert part["lesion"].dtype == bool and (part["y"][part["lesion"]] == 0).all()
    nodule_phantoms = [q for q in parts if str(q["group"]) in ("phantom 5300", "phantom 5301")]
    assert len(nodule_phantoms) == 2 and all(q["lesion"].any() for q in nodule_phantoms)  # each has its genuine nodule
    rows, label = nodule_table(nodule_phantoms)
    assert set(label.tolist()) == {0, 1} and rows.sum() == len(label)

    v = Verifier.load(run / "model.verifier.npz")
    assert v.meta["nodule_check"] and v.nodules is not None and v.nodules.baseline.shape == (2,)
    assert v.nodules.meta["phantoms"] == 2 and v.nodules.meta["genuine"] >= 2 and v.nodules.meta["injected"] > 0
    names = v.meta["names"]
    assert not any(names[k].startswith("log_p_") for k in v.nodules.feature[v.nodules.feature >= 0])  # texture only
    report = json.loads((run / "verifier.json").read_text())
    assert report["nodule_check"] and report["nodule_rows"] == v.nodules.meta["rows"]
    with np.load(run / "verifier_oof.npz") as d:  # the threshold's scores carry the check, out of patient
        q, y, score, trees = d["nodule_check"], d["y"], d["score"], d["trees"]
    assert q.shape == y.shape and ((q >= 0) & (q <= 1)).all() and (score <= trees + 1e-9).all() and (score < trees - 1e-6).any()

    det = load_detector(str(run / "model.pt"))
    vol = phantom_source(9, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    lungs = lung_mask(vol)
    result, _, _ = screen_volume(vol, det, threshold=0.0)
    cands = findings_from(heatmap(vol, det, lungs), vol, 0.0)[:6]
    at = np.asarray([f["voxel"] for f in cands], float)
    x = finite_rows(v.rows(vol, at, finding_probabilities(cands), scan_noise(vol, lungs)))
    p_stage, q_at = v.probabilities(x), v.nodules.probabilities(x)[:, 1]
    expect = 1 - (p_stage[:, 0] + p_stage[:, 1] * (1 - q_at))
    scores = {tuple(p["voxel"]): p["score"] for p in every_place(result["findings"])}  # every scored place
    assert np.allclose([scores[tuple(c["voxel"])] for c in cands], expect, atol=1e-4)
    # A stage whose file lost the check's trees is refused by name.
    with np.load(run / "model.verifier.npz") as d:
        np.savez(tmp_path / "cut.verifier.npz", **{k: d[k] for k in d.files if not k.startswith("nodule_")})
    with pytest.raises(InputError, match="nodule check but its trees are missing"):
        Verifier.load(tmp_path / "cut.verifier.npz")


def test_nodule_check_without_phantoms_learns_from_real_lesions_alone():
    """With ``verifier_nodule_phantoms: 0`` the check learns from the training sources' genuine
    lesions and injections alone, each patient's rows scored by trees fitted without it."""
    from ctguard.engine.train_verifier import VERIFIER_DEFAULTS, fit_nodule_check, joined_rows, nodule_columns, row_names

    cfg = {**VERIFIER_DEFAULTS, "seed": 0, "verifier_boosting": "histogram", "verifier_trees": 100, "verifier_nodule_check": True,
           "verifier_nodule_phantoms": 0}
    rng = np.random.default_rng(0)
    width = len(row_names(cfg))
    parts = []
    for k in range(4):  # four patients: 30 injections (shifted texture), 10 genuine lesions, 20 other places
        y = np.r_[np.ones(30, int), np.zeros(30, int)]
        x = rng.normal(size=(60, width)).astype(np.float32)
        x[:30, nodule_columns(cfg)] += 3.0
        parts.append({"x": x, "y": y, "lesion": np.r_[np.zeros(30, bool), np.ones(10, bool), np.zeros(20, bool)], "group": f"p{k}"})
    x, y, groups, _ = joined_rows([{**p, "clean": np.zeros(60, bool)} for p in parts])
    trees, q = fit_nodule_check(cfg, parts, [], x, groups, folds=2)
    assert trees.meta["phantoms"] == 0 and trees.meta["genuine"] == 40 and trees.meta["injected"] == 120 and trees.meta["rows"] == 160
    lesion = np.concatenate([p["lesion"] for p in parts])
    assert q.shape == (240,) and q[y == 1].mean() > 0.8 > 0.2 > q[lesion].mean()  # each patient's rows scored by trees fitted without it


def test_patches_at_the_scans_own_voxels(tmp_path):
    """A place's patch: HU / 400 on its own voxels, residuals in units of the scan's noise (zero on a
    flat scan), the scan's edge repeated past it; the CNN's ONNX export gives the network's own
    probabilities."""
    import torch

    from ctguard.engine.train_patches import augmented, patch_probabilities
    from ctguard.models.patchnet import PatchNet, export_onnx
    from ctguard.errors import InputError
    from ctguard.patches import CHANNELS, CROP, SIZE, SLICES, PatchScorer, centre_crop, patches_at
    from ctguard.volume import Volume

    rng = np.random.default_rng(0)
    hu = rng.normal(-800, 20, (12, 64, 64)).astype(np.float32)
    vol = Volume(hu, (2.0, 0.7, 0.7), (0.0, 0.0, 0.0), np.eye(3), {})
    p = patches_at(vol, np.asarray([[6.0, 32.0, 32.0], [0.0, 0.0, 0.0]]), (20.0, 20.0)).astype(np.float32)
    assert p.shape == (2, CHANNELS, SIZE, SIZE)
    hu_ch, xy_ch = p[0, :SLICES], p[0, SLICES:2 * SLICES]
    assert np.allclose(hu_ch[SLICES // 2, SIZE // 2, SIZE // 2], hu[6, 32, 32] / 400, atol=2e-3)  # float16
    assert np.allclose(hu_ch[0], hu[4, 8:56, 8:56] / 400, atol=2e-3)
    assert 0.5 < xy_ch.std() < 1.5  # the noise, in its own units
    corner = p[1, :SLICES]
    # The edge repeated: slices 0, 0, 0, 1, 2 (the place's slice 0), the first row and column over the patch's first half.
    for k, z in enumerate((0, 0, 0, 1, 2)):
        assert np.allclose(corner[k, : SIZE // 2 + 1, : SIZE // 2 + 1], hu[z, 0, 0] / 400, atol=2e-3)
    flat = patches_at(Volume(np.full((12, 64, 64), -700.0, np.float32), (2.0, 0.7, 0.7), (0.0, 0.0, 0.0), np.eye(3), {}),
                      np.asarray([[6.0, 32.0, 32.0]]), (20.0, 20.0))
    assert np.all(flat[:, SLICES:] == 0) and np.allclose(flat[:, :SLICES], -700 / 400)
    crops = augmented(p, np.random.default_rng(1))
    assert crops.shape == (2, CHANNELS, CROP, CROP) and centre_crop(p).shape == crops.shape
    torch.manual_seed(0)
    net = PatchNet().eval()
    export_onnx(net, tmp_path / "cnn.onnx")
    assert np.allclose(PatchScorer(tmp_path / "cnn.onnx").probabilities(p), patch_probabilities(net, p), atol=1e-5)
    (tmp_path / "other.onnx").write_bytes(b"not onnx")
    with pytest.raises(InputError, match="not a loadable ONNX model"):
        PatchScorer(tmp_path / "other.onnx")


def test_second_stage_phantoms_with_and_without_their_own_nodules():
    """``verifier_phantom_lesions``: the stage's phantoms are the same chests (same seeds, same
    edits' seeds) with a genuine nodule in about half of them (some), in each (all) or in none; the
    real scans are untouched by the setting; another value is refused in one line."""
    from ctguard.engine.train3d import DEFAULTS, build_source, spec_seed
    from ctguard.engine.train_verifier import VERIFIER_DEFAULTS, check_stage_config, verifier_specs
    from ctguard.errors import InputError

    cfg = {**DEFAULTS, **VERIFIER_DEFAULTS, "phantom_shape": [40, 96, 96], "phantom_spacing": [4.0, 3.6, 3.6], "phantom_variety": False,
           "verifier_phantoms": 3, "verifier_fixed_phantoms": 3}
    specs = {v: verifier_specs({**cfg, "verifier_phantom_lesions": v}) for v in ("some", "all", "none")}
    assert specs["some"] == verifier_specs(cfg)  # the default
    assert all([s[:2] for s in specs[v]] == [s[:2] for s in specs["some"]] for v in specs)
    assert [spec_seed(cfg, s) for s in specs["all"]] == [spec_seed(cfg, s) for s in specs["some"]] == [spec_seed(cfg, s) for s in specs["none"]]
    built = {v: [build_source(cfg, s) for s in specs[v]] for v in specs}
    counts = {v: [len(src.tumours) for src in built[v]] for v in specs}
    assert counts["all"] == [1] * 6 and counts["none"] == [0] * 6 and 0 < sum(counts["some"]) < 6
    k = counts["some"].index(1)
    a, b = built["some"][k], built["none"][k]  # a phantom with its nodule, and the same chest without
    differ = np.argwhere(a.volume.hu != b.volume.hu)
    t = a.tumours[0]  # only the nodule's place differs: its soft edge, spicules and the scanner's blur stay within a diameter and two voxels of its centre
    assert len(differ) and np.linalg.norm((differ - t.voxel) * a.volume.spacing, axis=1).max() <= t.diameter_mm + 2 * max(a.volume.spacing)
    for bad in (False, "half"):
        with pytest.raises(InputError, match=f"verifier_phantom_lesions must be one of some, all, none, not {bad!r}"):
            check_stage_config({**cfg, "verifier_phantom_lesions": bad})


def test_second_stage_thicker_slice_sources(tmp_path):
    """``verifier_thick``: each real series also as a thicker-slice source of the same patient (its
    own edits' seed); one thicker than THICK_MAX_MM gives no rows (and needs no network); a wrong
    value is refused in one line."""
    from ctguard.engine.train3d import DEFAULTS, build_source, spec_seed
    from ctguard.engine.train_verifier import THICK_MAX_MM, VERIFIER_DEFAULTS, check_stage_config, source_rows, verifier_specs
    from ctguard.errors import InputError
    from ctguard.io.itk import write_itk

    vol = phantom_source(3, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    scan = write_itk(vol, tmp_path / "chest.nrrd")
    cfg = {**DEFAULTS, **VERIFIER_DEFAULTS, "verifier_phantoms": 1, "verifier_fixed_phantoms": 0,
           "real_scans": [{"patient": "P", "scan": str(scan)}], "verifier_thick": [2, 3]}
    specs = verifier_specs(cfg)
    assert [s[2] for s in specs if s[0] == "series"] == [1, 2, 3]
    assert len({spec_seed(cfg, s) for s in specs}) == len(specs)  # each its own edits
    thick = build_source(cfg, specs[2])
    assert thick.volume.spacing[0] == 8.0 > THICK_MAX_MM and thick.volume.shape[0] == 20
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"not a network")  # never loaded
    rows = source_rows((cfg, specs[2], str(tmp_path / "run" / "model.pt")))
    assert len(rows["y"]) == 0 and rows["x"].shape[0] == 0 and rows["group"] == "chest.nrrd"  # the patient of the series (no PatientID: its file); past chest CT's slice range: no rows, no network read
    for bad in ([1], 2, [2.5], [True]):
        with pytest.raises(InputError, match=f"verifier_thick must be a list of whole numbers from 2 .* not {re.escape(repr(bad))}"):
            check_stage_config({**cfg, "verifier_thick": bad})


def test_out_of_patient_scores_one_fit_per_patient_left_out():
    """``verifier_oof_folds: 0``: each patient's rows are scored by trees fitted on every other
    patient's rows (the same numbers as fitting them by hand); 5 grouped folds differ; a value that
    is no such number is refused in one line."""
    from ctguard.engine.train_verifier import VERIFIER_DEFAULTS, boosting_classifier, check_stage_config, out_of_patient_scores
    from ctguard.errors import InputError

    cfg = {**VERIFIER_DEFAULTS, "seed": 0, "verifier_boosting": "histogram", "verifier_trees": 20}
    rng = np.random.default_rng(1)
    groups = np.repeat(np.array([f"patient {k}" for k in range(7)]), 30)
    x = rng.normal(size=(len(groups), 6)).astype(np.float32)
    y = np.where(x[:, 0] > 0.8, 1, np.where(x[:, 1] > 0.8, 2, 0))
    x[:, -3:] = np.log(np.full((len(y), 3), 1 / 3) + 1e-4)  # the network's columns (unused without a blend)
    got = out_of_patient_scores(cfg, x, x, y, groups, folds=0)
    for g in np.unique(groups):
        held = groups == g
        clf = boosting_classifier(cfg).fit(x[~held], y[~held])
        assert np.allclose(got[held], 1 - clf.predict_proba(x[held])[:, list(clf.classes_).index(0)])
    assert not np.allclose(got, out_of_patient_scores(cfg, x, x, y, groups, folds=5))
    for bad in (1, -1, "5", True, 2.5):
        with pytest.raises(InputError, match=f"verifier_oof_folds must be 0 .* not {re.escape(repr(bad))}"):
            check_stage_config({**cfg, "verifier_oof_folds": bad})


def test_verifier_trees_match_sklearn(tmp_path):
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier

    from ctguard.errors import InputError
    from ctguard.verifier import Verifier, float32_at_or_below

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1)
    clf = GradientBoostingClassifier(n_estimators=20, max_depth=3, subsample=0.8, random_state=0).fit(x, y)
    path = Verifier.from_sklearn(clf, x, {"threshold": 0.9}).save(tmp_path / "v.npz")
    v = Verifier.load(path)
    assert v.meta == {"threshold": 0.9} and np.abs(v.probabilities(x) - clf.predict_proba(x)).max() < 1e-5
    # Trees fitted on some columns of a row (the scan's own columns left out) read whole rows.
    cols = np.array([0, 2, 5])
    part = GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0).fit(x[:, cols], y)
    v = Verifier.from_sklearn(part, x, {}, columns=cols)
    assert set(v.feature[v.feature >= 0].tolist()) <= {0, 2, 5} and 2 in v.feature
    assert np.abs(v.probabilities(x) - part.predict_proba(x[:, cols])).max() < 1e-5
    # Histogram trees (leaf values already scaled by the rate), on some columns of a row too.
    hist = HistGradientBoostingClassifier(max_iter=30, max_depth=3, max_leaf_nodes=8, max_features=0.5, early_stopping=False,
                                          random_state=0).fit(x[:, cols], y)
    v = Verifier.load(Verifier.from_sklearn(hist, x, {}, columns=cols).save(tmp_path / "h.npz"))
    assert v.rate == 1.0 and set(v.feature[v.feature >= 0].tolist()) == {0, 2, 5}
    assert np.abs(v.probabilities(x) - hist.predict_proba(x[:, cols])).max() < 1e-5
    # Two classes (a nodule check's trees): every tree adds to the second class, sklearn's one raw score.
    two = (x[:, 0] - x[:, 2] > 0.3).astype(int)
    for clf in (GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0).fit(x[:, cols], two),
                HistGradientBoostingClassifier(max_iter=30, max_depth=3, early_stopping=False, random_state=0).fit(x[:, cols], two)):
        v = Verifier.from_sklearn(clf, x, {}, columns=cols)
        assert v.baseline.shape == (2,) and set(v.tree_class.tolist()) == {1}
        p2 = v.probabilities(x)
        assert p2.shape == (600, 2) and np.abs(p2 - clf.predict_proba(x[:, cols])).max() < 1e-5
        assert 0.05 < p2[:, 1].mean() < 0.95 and ((p2[:, 1] > 0.5) == two).mean() > 0.9
    # A float64 split is stored as the largest float32 at or below it: 0.1 rounds up to float32(0.1),
    # which is above 0.1 and must go right, as in sklearn.
    split = float32_at_or_below(np.array([0.1, 0.5]))
    assert split[1] == 0.5 and split[0] < np.float32(0.1) and split[0] == np.nextafter(np.float32(0.1), np.float32(0))
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a ctguard verifier"):
        Verifier.load(tmp_path / "bad.npz")


def test_recentred_finds_a_nodules_core_and_an_in_paintings_smooth_place():
    """Near a candidate 6 mm off, :func:`recentred` gives the dense nodule's centre and the centre of
    a patch whose noise was smoothed away, on the scan's own anisotropic voxels."""
    from scipy import ndimage

    from ctguard.verifier import recentred
    from ctguard.volume import Volume

    rng = np.random.default_rng(3)
    hu = (-850 + 25 * rng.normal(size=(30, 80, 80))).astype(np.float32)
    spacing = (2.0, 0.8, 0.8)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(hu.shape, spacing)], indexing="ij")
    nodule = (15 * 2.0, 25 * 0.8, 25 * 0.8)
    hu += 800 * np.exp(-((z - nodule[0]) ** 2 + (y - nodule[1]) ** 2 + (x - nodule[2]) ** 2) / (2 * 3.0**2))
    patch = (np.abs(z - 15 * 2.0) <= 6) & (np.abs(y - 55 * 0.8) <= 6) & (np.abs(x - 55 * 0.8) <= 6)
    hu[patch] = ndimage.gaussian_filter(hu, 3)[patch]  # in-painted: the fine noise gone
    vol = Volume(hu, spacing)
    off = np.array([15.0, 25.0 + 6 / 0.8, 25.0])
    dense, _ = recentred(vol, off)
    assert np.linalg.norm((dense - (15, 25, 25)) * spacing) <= 1.0
    _, smooth = recentred(vol, np.array([15.0, 55.0, 55.0 - 6 / 0.8]))
    assert np.linalg.norm((smooth - (15, 55, 55)) * spacing) <= 4.0
    far = recentred(vol, np.array([15.0, 70.0, 10.0]))
    assert all(np.linalg.norm((p - (15, 70, 10)) * spacing) <= 10.0 + 1e-6 for p in far)  # never beyond its reach


@pytest.mark.parametrize("spacing", [(1.0, 0.7, 0.7), (5.0, 0.78, 0.78), (2.5, 0.66, 0.66)])
def test_stage_profiles_inside_the_scan_are_the_box_rule_bit_for_bit(spacing):
    """The second stage reads a place inside the scan at its ball's voxels only (a shared layout,
    central differences); that gives the very values the box of the place gives, shell by shell and
    in the same order (so the trees see the features they were fitted on), at integer and
    fractional places; a place whose box leaves the scan takes the box rule."""
    from ctguard.verifier import _shell_values, _shell_values_interior

    shape = (60, 150, 150) if spacing[0] < 2 else (30, 150, 150)
    vol = make_chest(shape, spacing, seed=3)
    rng = np.random.default_rng(0)
    lo = np.ceil(25.0 / np.asarray(spacing)) + 2
    inside = rng.uniform(lo, np.asarray(shape) - 1 - lo, (8, 3))
    places = np.vstack([inside, np.rint(inside[:3]), np.round(inside[3:6], 1)])
    sp = np.asarray(spacing, float)
    for p in places:
        fast, box = _shell_values_interior(vol, p, sp), _shell_values(vol, p, sp)
        assert fast is not None and len(fast) == len(box) == 7
        for a, b in zip(fast, box):
            assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
    assert _shell_values_interior(vol, np.array([2.0, 75.0, 75.0]), sp) is None  # its box leaves the scan


def test_stage_medians_of_magnitudes_are_numpys():
    """The stage's medians of absolute residuals order the values by their bits as integers: the
    same number as ``np.median``, odd and even lengths, ties, zeros and subnormals included."""
    from ctguard.verifier import _median_of_magnitudes

    rng = np.random.default_rng(4)
    tiny = np.float32(1e-40)  # subnormal
    for n in (1, 2, 3, 10, 11, 1000, 1001):
        for x in (np.abs(rng.normal(0, 30, n)), rng.integers(0, 4, n), np.r_[np.zeros(n // 2), np.full(n - n // 2, tiny)]):
            x = np.abs(np.asarray(x, np.float32))
            want = np.median(x)
            got = _median_of_magnitudes(x.copy())
            assert got.dtype == want.dtype and got == want, (n, x[:5])


def _stage_scan():
    """A small phantom, its lungs, its noise and four lung places: what the stage tests read rows at."""
    from ctguard.verifier import scan_noise

    vol = phantom_source(2, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    lungs = lung_mask(vol)
    return vol, lungs, scan_noise(vol, lungs), np.argwhere(lungs)[::997][:4].astype(float)


def _fitted_stage(x: np.ndarray, meta: dict, columns: np.ndarray | None = None):
    """Tiny trees fitted on rows ``x`` and noisy copies of them (on ``columns`` of them where given),
    as a stage with ``meta`` that reads whole rows (and the sklearn model)."""
    from sklearn.ensemble import GradientBoostingClassifier

    from ctguard.verifier import Verifier

    xs = np.vstack([x, (x[None] + np.random.default_rng(0).normal(scale=0.1, size=(60, *x.shape))).reshape(-1, x.shape[1])]).astype(np.float32)
    fit = xs if columns is None else xs[:, columns]
    clf = GradientBoostingClassifier(n_estimators=5, max_depth=2, random_state=0).fit(fit, np.arange(len(xs)) % 3)
    return Verifier.from_sklearn(clf, xs, meta, columns=columns), clf


def test_a_recentring_stage_reads_each_place_and_its_two_recentred_places_in_one_row():
    """With ``recentre`` a row holds the place's profiles, those at its densest and its smoothest
    point nearby (less the per-scan columns) and how far those are; a stage fitted so scores on them."""
    from ctguard.verifier import SCAN_COLUMNS, feature_names, features_at, network_probabilities, place_features, recentred, stage_inputs

    vol, lungs, noise, places = _stage_scan()
    plain, wide = features_at(vol, places, noise), features_at(vol, places, noise, recentre=True)
    names = feature_names(recentre=True)
    assert wide.shape == (4, len(names)) and len(names) == 3 * len(feature_names()) - 2 * len(SCAN_COLUMNS) + 2
    assert np.allclose(wide[:, : plain.shape[1]], plain)
    own = [k for k, n in enumerate(feature_names()) if n not in SCAN_COLUMNS]
    for row, p in zip(wide, places):
        dense, smooth = recentred(vol, p)
        assert np.allclose(row[names.index("hu_mean_0_3@dense")], place_features(vol, dense, noise)[0])
        assert np.allclose(row[plain.shape[1] + len(own) : -2], place_features(vol, smooth, noise)[own])
        assert np.isclose(row[-2], np.linalg.norm((dense - p) * np.asarray(vol.spacing)), atol=1e-4) and 0 <= row[-1] <= 10.0 + 1e-4
    p_net = np.tile([[0.6, 0.3, 0.1]], (len(places), 1)).astype(np.float32)
    x = stage_inputs(vol, places, p_net, noise, recentre=True)
    v, clf = _fitted_stage(x, {"uses_network": True, "recentre": True})
    assert np.allclose(v.score_places(vol, places, p_net, lungs), clf.predict_proba(x), atol=1e-5)
    assert np.allclose(network_probabilities(x[:, -3:]), p_net, atol=1e-6)  # the rows' network columns read back
    # Blended with the network: a quarter of the network's probabilities, three quarters of the trees'.
    v.meta["blend_network"] = 0.25
    blended = v.score_places(vol, places, p_net, lungs)
    assert np.allclose(blended, 0.75 * clf.predict_proba(x) + 0.25 * p_net, atol=1e-5) and np.allclose(blended.sum(1), 1, atol=1e-5)


def test_candidates_are_the_maxima_no_closer_than_the_suppression_distance_to_a_better_one():
    """``findings_from``: the local maxima over the threshold, best first, each kept unless a kept one
    lies closer than ``nms_mm``: the same cells as checking every pair, also where a flat map makes
    every cell a maximum (a threshold of 0 on an untrained network)."""
    from ctguard.models.grid import STRIDE
    from ctguard.screen import NMS_MM, Heatmap, findings_from
    from ctguard.volume import Volume
    from scipy import ndimage

    rng = np.random.default_rng(3)
    flat = np.zeros((3, 9, 12, 12), np.float32)
    flat[0], flat[1], flat[2] = 0.9, 0.06, 0.04
    flat[:, 2:4, 3:5, 6:9] = np.array([0.2, 0.7, 0.1])[:, None, None, None]
    noisy = rng.dirichlet([4, 1, 1], size=(9, 12, 12)).transpose(3, 0, 1, 2).round(2).astype(np.float32)  # ties too
    for probs in (flat, noisy):
        heat = Heatmap(probs, tuple(slice(0, n * STRIDE) for n in probs.shape[1:]), (1.0, 1.0, 1.0))
        vol = Volume(np.zeros([n * STRIDE for n in probs.shape[1:]], np.float32), (1.0, 1.0, 1.0))
        p_t = 1.0 - probs[0]
        for threshold in (0.0, 0.3):
            peaks = (p_t == ndimage.maximum_filter(p_t, size=3)) & (p_t >= threshold)
            kept = []
            for c in sorted((tuple(c) for c in np.argwhere(peaks)), key=lambda c: -p_t[c]):
                if all(np.linalg.norm((np.asarray(c) - k) * STRIDE) >= NMS_MM for k in kept):
                    kept.append(np.asarray(c))
            found = findings_from(heat, vol, threshold)
            assert len(found) == len(kept) >= 1
            assert threshold or len(kept) > 10  # from 0: many maxima, most of them suppressed
            assert [f["score"] for f in found] == [round(float(p_t[tuple(k)]), 4) for k in kept]
            cells = np.asarray([f["voxel"] for f in found]) // STRIDE
            assert all(np.abs(c - k).max() <= 1 for c, k in zip(cells, kept))  # each at its cell's weighted centre


def test_a_triage_reads_each_place_alone_first_and_the_whole_row_only_over_its_cut_off(tmp_path):
    """A stage with a triage (``verifier_triage``) scores every place first by the triage's trees on
    the place's own columns and the network's; a place under the cut-off keeps the triage's
    probabilities, the others the stage's own on their whole rows, re-centred places read only for
    them and the place's own columns not read twice. Saved and loaded with the stage."""
    from dataclasses import replace

    from ctguard.errors import InputError
    from ctguard.verifier import TRIAGE_PREFIX, Verifier, feature_names, features_at, point_rows, point_width, stage_inputs

    vol, lungs, noise, places = _stage_scan()
    own = features_at(vol, places, noise, resampling=True)
    whole = features_at(vol, places, noise, recentre=True, resampling=True)
    assert np.array_equal(features_at(vol, places, noise, recentre=True, resampling=True, at_places=own), whole)
    p_net = np.tile([[0.6, 0.3, 0.1]], (len(places), 1)).astype(np.float32)
    x = stage_inputs(vol, places, p_net, noise, recentre=True, resampling=True)
    names = feature_names(recentre=True, resampling=True) + ["log_p_injected", "log_p_removed", "log_p_genuine"]
    width = point_width(names)
    assert width == own.shape[1] and np.array_equal(point_rows(x, width), np.hstack([own, x[:, -3:]]))
    stage, clf = _fitted_stage(x, {"uses_network": True, "recentre": True, "resampling": True})
    triage, _ = _fitted_stage(point_rows(x, width), {"names": names[:width] + names[-3:]})
    first = 1.0 - triage.probabilities(point_rows(x, width))[:, 0]
    assert len(np.unique(first)) > 1
    cut = float(np.unique(first)[:2].mean())  # some places under it, the others over
    stage.meta["triage"], stage.triage = cut, triage
    p = stage.score_places(vol, places, p_net, lungs)
    under = first < cut
    assert 0 < under.sum() < len(places)
    assert np.array_equal(p[under], triage.probabilities(point_rows(x, width))[under])
    assert np.allclose(p[~under], clf.predict_proba(x)[~under], atol=1e-5)
    assert np.array_equal(p[~under], replace(stage, triage=None).score_places(vol, places, p_net, lungs)[~under])
    path = stage.save(tmp_path / "m.verifier.npz")
    back = Verifier.load(path)
    assert back.meta["triage"] == cut and np.array_equal(back.score_places(vol, places, p_net, lungs), p)
    with np.load(path) as d:  # the triage's trees missing from the file: a one-line error, not a stage that reads every place whole
        np.savez(tmp_path / "cut.verifier.npz", **{k: d[k] for k in d.files if not k.startswith(TRIAGE_PREFIX)})
    with pytest.raises(InputError, match="has a triage but its trees are missing"):
        Verifier.load(tmp_path / "cut.verifier.npz")


def test_a_triage_cut_off_loses_at_most_its_share_of_the_edits_the_stage_finds():
    """``fit_triage``: the highest cut-off of its grid under which the triage's out-of-patient scores
    put at most the config's share of the edit rows that the stage's own out-of-patient scores find at
    the threshold; a bad share or setting is refused before anything is trained."""
    from ctguard.engine.train_verifier import TRIAGE_GRID, VERIFIER_DEFAULTS, fit_triage, row_names, triage_share
    from ctguard.errors import InputError

    cfg = {**VERIFIER_DEFAULTS, "seed": 0, "verifier_recentre": True, "verifier_boosting": "histogram", "verifier_trees": 20}
    names = row_names(cfg)
    rng = np.random.default_rng(0)
    n = 600
    y = np.arange(n) % 3
    x = rng.normal(size=(n, len(names))).astype(np.float32)
    x[:, 0] += 2.0 * (y > 0)  # the place's own first column tells edits from untouched places
    groups = np.asarray([f"p{k % 6}" for k in range(n)])
    oof = np.where(y > 0, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.5, n))
    for share in (0.0, 0.05, 0.5):
        triage, cut, score, _ = fit_triage({**cfg, "verifier_triage": share}, x, y, groups, y == 0, oof, 0.9, 3)
        found = (oof >= 0.9) & (y > 0)
        assert cut in TRIAGE_GRID or cut == 0.0
        assert ((score < cut) & found).sum() <= share * found.sum()
        higher = [c for c in TRIAGE_GRID if c > cut]
        assert not higher or ((score < higher[0]) & found).sum() > share * found.sum()  # the highest that keeps the share
        assert triage.meta["names"] == names[: triage.meta["triage_width"]] + names[-3:]
    assert triage_share(cfg) is None
    for change, why in (({"verifier_triage": 1.5}, "must be a share from 0 up to 1"), ({"verifier_triage": "half"}, "not 'half'"),
                        ({"verifier_triage": 0.01, "verifier_recentre": False}, "needs verifier_recentre"),
                        ({"verifier_triage": 0.01, "verifier_blend": 0.5}, "cannot be used with verifier_blend")):
        with pytest.raises(InputError, match=why):
            triage_share({**cfg, **change})


def test_trace_blind_trees_score_a_scan_whose_pixels_leave_the_trace_nothing_to_read(tmp_path):
    """A stage with trace-blind trees (``verifier_blind``) scores a scan whose pixels lie within 0.04
    mm of a whole millimetre by those trees, which never split on a column that reads the trace, at
    their own thresholds; any other scan as before. Saved and loaded with the stage; their arrays
    missing from the file are a one-line error."""
    from dataclasses import replace

    from ctguard.errors import InputError
    from ctguard.screen import Detector, source_thresholds
    from ctguard.verifier import BLIND_PREFIX, Verifier, feature_names, has_ripple, reads_trace, scan_noise, stage_inputs

    vol, lungs, noise, places = _stage_scan()
    flat = phantom_source(2, shape=(40, 96, 96), spacing=(4.0, 3.0, 3.0)).volume  # 3 mm pixels: no ripple
    flat_lungs = lung_mask(flat)
    flat_places = np.argwhere(flat_lungs)[::997][:4].astype(float)
    assert has_ripple(vol) and not has_ripple(flat)
    names = feature_names(resampling=True, trace_scan=True) + ["log_p_injected", "log_p_removed", "log_p_genuine"]
    trace = [k for k, n in enumerate(names) if reads_trace(n)]
    assert [names[k] for k in trace] == [f"resampling_trace_{r}{v}" for v in ("", "_vs_scan") for r in (5, 8, 12)]
    meta = {"uses_network": True, "resampling": True, "trace_scan": True, "threshold": 0.6, "peak_threshold": 0.7, "blind": True}
    p_net = np.tile([[0.6, 0.3, 0.1]], (4, 1)).astype(np.float32)
    x = stage_inputs(vol, places, p_net, noise, resampling=True, trace_reference=np.ones(3))
    stage, _ = _fitted_stage(x, meta)
    keep = np.asarray([k for k in range(len(names)) if k not in trace])
    blind, _ = _fitted_stage(x, {"threshold": 0.9, "peak_threshold": 0.95}, columns=keep)
    assert not np.isin(blind.feature, trace).any()
    on_vol = stage.score_places(vol, places, p_net, lungs)
    stage.blind = blind
    assert stage.for_scan(vol) is stage and stage.for_scan(flat) is blind
    assert np.array_equal(stage.score_places(vol, places, p_net, lungs), on_vol)  # a scan with a ripple: the full trees
    rows = stage.rows(flat, flat_places, p_net, scan_noise(flat, flat_lungs), flat_lungs)
    assert np.isnan(rows[:, trace]).all()  # the trace reads nothing there
    p = stage.score_places(flat, flat_places, p_net, flat_lungs)
    assert np.array_equal(p, blind.probabilities(rows)) and not np.array_equal(p, stage.probabilities(rows))
    det = Detector(net=None, name="tamper3d", version="t", path="m.pt", threshold=0.6, verifier=stage)
    assert source_thresholds(det, vol=vol) == {"network": 0.6, "trace": 0.7, "smooth": 0.7, "blob": 0.7}
    assert source_thresholds(det, vol=flat) == {"network": 0.9, "trace": 0.95, "smooth": 0.95, "blob": 0.95}
    assert set(source_thresholds(det, 0.5, vol=flat).values()) == {0.5}  # a caller's threshold for all still holds
    assert source_thresholds(replace(det, verifier=replace(stage, blind=None)), vol=flat)["network"] == 0.6
    path = stage.save(tmp_path / "m.verifier.npz")
    back = Verifier.load(path)
    assert np.array_equal(back.score_places(flat, flat_places, p_net, flat_lungs), p) and back.blind.meta["threshold"] == 0.9
    with np.load(path) as d:
        np.savez(tmp_path / "cut.verifier.npz", **{k: d[k] for k in d.files if not k.startswith(BLIND_PREFIX)})
    with pytest.raises(InputError, match="has trace-blind trees but they are missing"):
        Verifier.load(tmp_path / "cut.verifier.npz")


def test_trace_blind_trees_are_fitted_without_the_trace_and_their_thresholds_by_the_same_rule():
    """``fit_blind``: on rows where the trace tells every edit apart, the trace-blind trees read
    only the other columns, and their thresholds are the lowest of the grid giving at most the
    budget of the untouched training candidates over them out of patient; a setting it cannot be
    used with is refused before anything is trained."""
    from ctguard.engine.train_verifier import GRID, VERIFIER_DEFAULTS, blind_on, fit_blind, rippled_counted, row_names, rows_with_ripple
    from ctguard.errors import InputError
    from ctguard.verifier import reads_trace

    cfg = {**VERIFIER_DEFAULTS, "seed": 0, "verifier_resampling": True, "verifier_trace_scan": True, "verifier_boosting": "histogram",
           "verifier_trees": 20, "verifier_blind": True}
    names = row_names(cfg)
    trace = np.asarray([reads_trace(n) for n in names])
    rng = np.random.default_rng(0)
    n = 600
    y = np.arange(n) % 3
    x = rng.normal(size=(n, len(names))).astype(np.float32)
    x[:, trace] += 5.0 * (y > 0)[:, None]  # the trace alone tells edits apart
    x[:, 0] += 1.0 * (y > 0)  # the first texture column a little
    groups = np.asarray([f"p{k // 3 % 6}" for k in range(n)])  # every patient with rows of each class
    parts = [{"y": y, "peak": np.zeros(n, bool)}]
    clean = y == 0
    blind, oof, report = fit_blind(cfg, parts, x, y, groups, clean, 6, 3)
    assert blind.feature.max() < len(names) and not np.isin(blind.feature, np.flatnonzero(trace)).any()
    assert report["columns_left_out"] == int(trace.sum()) and report["threshold"] in GRID
    t = report["threshold"]
    assert (oof[clean] >= t).sum() / 6 <= cfg["verifier_max_false"]
    lower = [g for g in GRID if g < t]
    assert not lower or (oof[clean] >= lower[-1]).sum() / 6 > cfg["verifier_max_false"]  # the lowest that keeps the budget
    assert blind.meta["threshold"] == t and "peak_threshold" not in blind.meta
    full = 1.0 - blind.probabilities(x)[:, 0]
    assert np.corrcoef(full, x[:, 0])[0, 1] > 0.3  # it learnt the texture column
    assert blind_on({**cfg, "verifier_blind": False}) is False
    # The full trees' rule counts only scans with a ripple: a scan of 0.977 mm pixels teaches them but holds up only the blind trees'.
    pixel = names.index("log_pixel_mm")
    flat, sharp = x[:300].copy(), x[300:].copy()
    flat[:, pixel], sharp[:, pixel] = np.log(0.977), np.log(0.78)
    parts = [{"x": flat, "y": y[:300]}, {"x": sharp, "y": y[300:]}, {"x": np.zeros((0, len(names)), np.float32), "y": np.zeros(0, int)}]
    assert rows_with_ripple(cfg, np.vstack([flat, sharp])).tolist() == [False] * 300 + [True] * 300
    kept, scans = rippled_counted(cfg, parts, clean)
    assert scans == 1 and np.array_equal(kept, clean & (np.arange(n) >= 300))
    for change, why in (({"verifier_resampling": False}, "needs verifier_resampling"), ({"verifier_blend": 0.5}, "cannot be used with verifier_blend"),
                        ({"verifier_blind": "yes"}, "must be true or false")):
        with pytest.raises(InputError, match=why):
            blind_on({**cfg, **change})


def test_a_second_look_scores_a_candidate_again_at_its_recentred_places():
    """A stage with ``refine_from``: each candidate scoring that or more is scored again at its
    densest and smoothest point nearby; the highest of the three is the finding, at its place.
    From a score no candidate reaches, the findings are the plain stage's."""
    from ctguard.engine.train_verifier import refined_scores
    from ctguard.screen import verify_findings
    from ctguard.verifier import recentred, stage_inputs

    vol, lungs, noise, places = _stage_scan()
    p_net = np.tile([[0.6, 0.3, 0.1]], (len(places), 1)).astype(np.float32)
    v, _ = _fitted_stage(stage_inputs(vol, places, p_net, noise, recentre=True), {"uses_network": True, "recentre": True})
    # Each candidate's network score tells it apart in the findings (which come best first).
    cands = [{"voxel": [float(c) for c in p], "world_mm": [0.0, 0.0, 0.0], "score": 0.5 + k / 100, "p_injected": 0.3, "p_removed": 0.1}
             for k, p in enumerate(places)]
    plain = v.score_places(vol, places, p_net, lungs)
    alt = np.concatenate([recentred(vol, p) for p in places])
    q = v.score_places(vol, alt, np.repeat(p_net, 2, axis=0), lungs).reshape(len(places), 2, 3)
    assert not np.allclose(plain, q[:, 0])  # the re-centred places score otherwise

    def findings(start: float) -> list[tuple[float, list[float]]]:
        v.meta["refine_from"] = start
        out = sorted(verify_findings(vol, lungs, cands, v), key=lambda f: f["network_score"])
        return [(f["score"], f["voxel"]) for f in out]

    start = float(np.median(1 - plain[:, 0]))  # half the candidates get a second look
    expect = []
    for k, p in enumerate(places):
        best, at = plain[k], p
        if 1 - plain[k, 0] >= start:
            j = int(np.argmin(q[k, :, 0]))
            if q[k, j, 0] < plain[k, 0]:
                best, at = q[k, j], alt[2 * k + j]
        expect.append((round(float(1 - best[0]), 4), [round(float(c), 1) for c in at]))
    assert findings(start) == expect
    assert any(e[1] != [round(float(c), 1) for c in p] for e, p in zip(expect, places))  # a finding moved to a re-centred place
    assert any(e[0] > round(float(1 - plain[k, 0]), 4) for k, e in enumerate(expect))  # and scored higher there
    # From a score no candidate reaches: the plain stage's findings, where the network put them.
    assert findings(1.0 - 1e-9) == [(round(float(1 - pk[0]), 4), [round(float(c), 1) for c in p]) for pk, p in zip(plain, places)]
    # The training side's arithmetic, the same rule: from ``start``, the highest of a row and the rows it owns.
    assert np.allclose(refined_scores(np.array([0.1, 0.6, 0.7]), np.array([0.9, 0.2, 0.95, 0.5]), np.array([0, 1, 1, 2]), 0.5),
                       [0.1, 0.95, 0.7])


def _noise_chest(seed: int, pixel_mm: float):
    """A slab of parenchyma-like noise (-850 HU, about 30 HU of fine grain) at ``pixel_mm`` pixels."""
    from scipy import ndimage

    from ctguard.volume import Volume

    grain = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((12, 96, 96)), (0, 0.5, 0.5))
    return Volume(np.rint(-850 + 30 * grain / grain.std()).astype(np.float32), (2.0, pixel_mm, pixel_mm))


def test_the_resampling_trace_finds_a_cube_pasted_back_from_1mm_and_not_a_smoothed_place():
    """A region cut to a 1 mm cube and pasted back unchanged (the simulator's round trip, nothing
    drawn), or zoomed to 1 mm and back by cubic splines as CT-GAN does, ripples at the pixel
    spacing's frequency; the same noise untouched, or smoothed in place, does not."""
    from scipy import ndimage

    from ctguard.tamper.cube import apply_edit
    from ctguard.verifier import TRACE_RADII_MM, resampling_trace, ripple_frequency

    assert np.isclose(ripple_frequency(0.7), 0.3) and np.isclose(ripple_frequency(1.9), 0.1) and ripple_frequency(1.0) == 0.0
    centre, far = np.array([6.0, 30.0, 30.0]), np.array([6.0, 70.0, 70.0])
    for seed in range(2):
        for pixel in (0.6, 0.7, 0.842):
            vol = _noise_chest(seed, pixel)
            pasted = apply_edit(vol, centre, 16, 14.0, lambda cube: cube.hu, brighten_only=False)
            assert np.count_nonzero(pasted.hu != vol.hu) > 1000
            smoothed = vol.with_hu(np.where(np.abs(np.arange(96) - 30)[None, :, None].repeat(96, 2) < 20,
                                            np.rint(ndimage.gaussian_filter(vol.hu, (0, 0.7, 0.7))), vol.hu).astype(np.float32))
            edited = resampling_trace(pasted, centre, 8.0)
            assert edited.shape == (len(TRACE_RADII_MM),) and edited[1] > 3.5, (seed, pixel, edited)
            for other in (resampling_trace(vol, centre, 8.0), resampling_trace(pasted, far, 8.0), resampling_trace(smoothed, centre, 8.0)):
                assert other[1] < 2.5, (seed, pixel, other)
            # CT-GAN's own round trip: scipy's zoom to 1 mm and back, by cubic splines.
            zoomed = ndimage.zoom(vol.hu[:, 10:60, 10:60], (1, pixel, pixel), order=3)
            hu = vol.hu.copy()
            hu[:, 10:60, 10:60] = np.rint(ndimage.zoom(zoomed, (1, 50 / zoomed.shape[1], 50 / zoomed.shape[2]), order=3))
            assert resampling_trace(vol.with_hu(hu), np.array([6.0, 35.0, 35.0]), 8.0)[1] > 3.5
    # A pixel spacing of a whole millimetre puts the 1 mm grid on the scan's: no ripple to read.
    assert np.isnan(resampling_trace(_noise_chest(0, 1.0), centre, 8.0)).all()


def test_the_trace_maps_strongest_peak_is_a_pasted_cube():
    """``trace_peaks``: on a slab of noise with one region cut to a 1 mm cube and pasted back, the
    resampling trace's strongest peak over the slab lies on the pasted region; a peak at one of the
    network's candidates is left to it; a whole-millimetre pixel leaves no peaks. The candidates
    screening makes of them carry the network's probabilities of their cells."""
    from ctguard.screen import Heatmap, trace_candidates
    from ctguard.tamper.cube import apply_edit
    from ctguard.verifier import TRACE_PEAK_SAME_MM, TRACE_PEAKS_APART_MM, trace_map, trace_peaks

    centre = np.array([6.0, 40.0, 56.0])
    for seed, pixel in ((0, 0.7), (1, 0.842), (2, 0.6)):
        vol = _noise_chest(seed, pixel)
        pasted = apply_edit(vol, centre, 16, 14.0, lambda cube: cube.hu, brighten_only=False)
        lungs = np.ones(vol.shape, bool)
        peaks = trace_peaks(pasted, lungs, 8.0, 4)
        assert len(peaks) == 4, (seed, pixel)
        assert np.linalg.norm((peaks[0] - centre) * pasted.spacing) <= 10.0, (seed, pixel, peaks[0])  # the pasted cube reaches 14 mm
        mm = peaks * np.asarray(pasted.spacing)
        assert min(np.linalg.norm(mm[i] - mm[j]) for i in range(4) for j in range(i)) >= TRACE_PEAKS_APART_MM
        rest = trace_peaks(pasted, lungs, 8.0, 4, taken=peaks[:1] + [0.0, 0.5, 0.5])  # within TRACE_PEAK_SAME_MM of the first
        assert TRACE_PEAK_SAME_MM > 1.0 and np.array_equal(rest, peaks[1:])
    assert len(trace_peaks(_noise_chest(0, 1.0), np.ones((12, 96, 96), bool), 8.0, 4)) == 0
    # As candidates: each with its cell's probabilities (8 mm cells of a heatmap over the whole slab).
    cells = np.floor(peaks * np.asarray(pasted.spacing) / 8).astype(int)
    probs = np.zeros((3, 3, 8, 8))
    probs[0], probs[2, :, : cells[0, 1] + 1] = 1.0, 0.7  # the rows of cells up to the pasted cube's "removed" at 0.7
    probs[0, :, : cells[0, 1] + 1] = 0.3
    heat = Heatmap(probs, (slice(0, 12), slice(0, 96), slice(0, 96)), pasted.spacing)
    found = trace_candidates(heat, pasted, lungs, 4, [], noise_xy=8.0)
    assert [f["voxel"] for f in found] == [[round(float(c), 1) for c in p] for p in peaks]
    assert [(f["kind"], f["score"]) for f in found] == [("removed", 0.7) if c[1] <= cells[0, 1] else ("injected", 0.0) for c in cells]
    assert trace_candidates(heat, pasted, lungs, 4, found[:1], noise_xy=8.0) == found[1:]
    assert trace_candidates(heat, pasted, lungs, 4, [], trace=trace_map(pasted, lungs, 8.0)) == found  # the map the caller has


def test_candidates_in_the_order_of_their_resampling_trace():
    """``trace_order``: a candidate the network scores lower but that ripples as a pasted cube does
    goes before one it scores higher in untouched noise; a small weight keeps the network's order,
    and so does a pixel spacing that leaves no ripple."""
    from ctguard.tamper.cube import apply_edit
    from ctguard.verifier import trace_ordered

    centre, far = np.array([6.0, 30.0, 30.0]), np.array([6.0, 70.0, 70.0])
    for pixel, moves in ((0.7, True), (1.0, False)):
        vol = _noise_chest(0, pixel)
        pasted = apply_edit(vol, centre, 16, 14.0, lambda cube: cube.hu, brighten_only=False)
        lungs = np.ones(vol.shape, bool)
        found = [{"score": 0.9, "voxel": list(far)}, {"score": 0.6, "voxel": list(centre)}]
        order = [f["score"] for f in trace_ordered(found, pasted, lungs, 8.0, 1.0)]
        assert order == ([0.6, 0.9] if moves else [0.9, 0.6]), (pixel, order)
        assert [f["score"] for f in trace_ordered(found, pasted, lungs, 8.0, 0.01)] == [0.9, 0.6]


def test_a_stage_with_the_resampling_trace_reads_it_at_each_place_and_its_recentred_places():
    from ctguard.verifier import SCAN_COLUMNS, TRACE_RADII_MM, feature_names, features_at, recentred, resampling_trace, scan_trace, stage_inputs

    vol, lungs, noise, places = _stage_scan()
    names = feature_names(recentre=True, resampling=True)
    base = feature_names(resampling=True)
    assert base[-len(TRACE_RADII_MM):] == [f"resampling_trace_{int(r)}" for r in TRACE_RADII_MM]
    assert len(names) == 3 * len(base) - 2 * len(SCAN_COLUMNS) + 2 and "resampling_trace_8@smooth" in names
    wide = features_at(vol, places, noise, recentre=True, resampling=True)
    assert wide.shape == (4, len(names))
    without = features_at(vol, places, noise, recentre=True)
    assert np.allclose(wide[:, [names.index(n) for n in feature_names(recentre=True)]], without, equal_nan=True)
    for row, p in zip(wide, places):
        dense, _ = recentred(vol, p)
        assert np.allclose(row[names.index("resampling_trace_5"): names.index("resampling_trace_12") + 1], resampling_trace(vol, p, noise[0]))
        assert np.isclose(row[names.index("resampling_trace_12@dense")], resampling_trace(vol, dense, noise[0])[2])
    # Read against the scan's own trace: the same columns, then each less the scan's median at 64 parenchyma places.
    reference = scan_trace(vol, lungs, noise[0])
    assert reference.shape == (len(TRACE_RADII_MM),) and np.isfinite(reference).all()
    names_scan = feature_names(recentre=True, resampling=True, trace_scan=True)
    against = features_at(vol, places, noise, recentre=True, resampling=True, trace_reference=reference)
    assert against.shape == (4, len(names_scan)) and "resampling_trace_8_vs_scan@dense" in names_scan
    for k, r in enumerate(TRACE_RADII_MM):
        for at in ("", "@dense", "@smooth"):
            assert np.allclose(against[:, names_scan.index(f"resampling_trace_{int(r)}_vs_scan{at}")],
                               against[:, names_scan.index(f"resampling_trace_{int(r)}{at}")] - reference[k])
    p_net = np.tile([[0.6, 0.3, 0.1]], (len(places), 1)).astype(np.float32)
    for meta, x in (({}, stage_inputs(vol, places, p_net, noise, recentre=True, resampling=True)),
                    ({"trace_scan": True}, stage_inputs(vol, places, p_net, noise, recentre=True, resampling=True, trace_reference=reference))):
        v, clf = _fitted_stage(x, {"uses_network": True, "recentre": True, "resampling": True, **meta})
        assert np.allclose(v.score_places(vol, places, p_net, lungs), clf.predict_proba(x), atol=1e-5)


def test_places_of_one_edit_are_one_finding():
    """The stage's scored places closer than 24 mm to a better one of the same kind are listed in its
    ``also_at``, not on their own; another kind, or a place farther off, stays a finding of its own."""
    from ctguard.screen import merged

    def place(kind, score, voxel):
        return {"kind": kind, "score": score, "voxel": voxel, "radius_mm": 8.0}

    scored = [place("removed", 0.99, [10, 100, 100]), place("removed", 0.98, [10, 100, 120]),  # 20 mm at 1 mm pixels
              place("injected", 0.97, [10, 100, 110]), place("removed", 0.96, [10, 100, 130]),  # 30 mm from the first
              place("removed", 0.2, [12, 100, 100])]
    out = merged(scored, (2.0, 1.0, 1.0))
    assert [(f["kind"], f["score"]) for f in out] == [("removed", 0.99), ("injected", 0.97), ("removed", 0.96)]
    assert out[0]["also_at"] == [{"voxel": [10, 100, 120], "score": 0.98}, {"voxel": [12, 100, 100], "score": 0.2}]
    assert "also_at" not in out[1] and "also_at" not in out[2]
    assert "also_at" not in scored[0]  # the stage's own list is left as it was


@pytest.mark.parametrize("what, negative", [("ball", 3), ("tube", 2), ("sheet", 1)])
def test_the_shape_columns_tell_a_ball_from_a_tube_and_a_sheet(what, negative):
    """:func:`shape_features`: the Hessian's eigenvalues at each scale, times the scale squared; a
    bright ball (a nodule) bends down along all three axes, a tube (a vessel) along two, a sheet (a
    fissure) along one. The same as scipy's Gaussian derivative filters at the place."""
    from scipy import ndimage

    from ctguard.verifier import SHAPE_REACH, SHAPE_SCALES_MM, shape_features
    from ctguard.volume import Volume

    spacing = (1.25, 0.7, 0.7)
    z, y, x = np.meshgrid(*[(np.arange(n) - n // 2) * s for n, s in zip((40, 80, 80), spacing)], indexing="ij")
    inside = {"ball": x**2 + y**2 + z**2 <= 16, "tube": x**2 + y**2 <= 4, "sheet": np.abs(x) <= 1.5}[what]
    hu = np.where(inside, 0.0, -850.0) + np.random.default_rng(0).normal(0, 20, x.shape)
    vol = Volume(hu.astype(np.float32), spacing)
    f = shape_features(vol, np.array([20.0, 40.0, 40.0]))
    assert f.shape == (3 * len(SHAPE_SCALES_MM),)
    for k, s in enumerate(SHAPE_SCALES_MM):
        ev = f[3 * k : 3 * k + 3]
        assert list(ev) == sorted(ev) and (ev < -50).sum() == negative and (np.abs(ev[negative:]) < 20).all()
        sigma = s / np.asarray(spacing)
        hess = np.empty((3, 3))
        for i in range(3):
            for j in range(3):
                order = [0, 0, 0]
                order[i] += 1
                order[j] += 1
                d = ndimage.gaussian_filter(hu, sigma, order=order, truncate=SHAPE_REACH + 1)[20, 40, 40]
                hess[i, j] = d / (spacing[i] * spacing[j])
        assert np.allclose(ev, np.linalg.eigvalsh(hess) * s * s, rtol=0.05, atol=3.0)


def test_a_stage_with_shape_reads_it_at_each_place_and_its_recentred_places():
    """With ``shape`` a row also holds :func:`shape_features` at the place and at its re-centred
    places, and nothing else in it changes; a stage fitted so (``shape`` in its meta) scores on them."""
    from ctguard.verifier import feature_names, features_at, recentred, shape_features, stage_inputs

    vol, lungs, noise, places = _stage_scan()
    names = feature_names(recentre=True, resampling=True, shape=True)
    assert "hessian_1.5mm_1" in names and "hessian_3mm_3@dense" in names and "hessian_3mm_2@smooth" in names
    wide = features_at(vol, places, noise, recentre=True, resampling=True, shape=True)
    without = features_at(vol, places, noise, recentre=True, resampling=True)
    assert wide.shape == (4, len(names))
    assert np.allclose(wide[:, [names.index(n) for n in feature_names(recentre=True, resampling=True)]], without, equal_nan=True)
    cols = [n for n in names if n.startswith("hessian_") and "@" not in n]
    for row, p in zip(wide, places):
        dense, smooth = recentred(vol, p)
        assert np.allclose(row[[names.index(n) for n in cols]], shape_features(vol, p))
        assert np.allclose(row[[names.index(n + "@dense") for n in cols]], shape_features(vol, dense))
        assert np.allclose(row[[names.index(n + "@smooth") for n in cols]], shape_features(vol, smooth))
    p_net = np.tile([[0.6, 0.3, 0.1]], (len(places), 1)).astype(np.float32)
    x = stage_inputs(vol, places, p_net, noise, recentre=True, resampling=True, shape=True)
    v, clf = _fitted_stage(x, {"uses_network": True, "recentre": True, "resampling": True, "shape": True})
    assert np.allclose(v.score_places(vol, places, p_net, lungs), clf.predict_proba(x), atol=1e-5)


def test_train_a_second_stage_that_reads_the_shape(tmp_path):
    """``verifier_shape: true``: the stage's rows, kept and fitted, carry :func:`shape_features` at
    each place and its re-centred places, and screening reads them as training made them."""
    from ctguard.screen import load_detector, score_locations
    from ctguard.verifier import feature_names, scan_noise, stage_inputs

    cfg = {**TINY_STAGE_RECIPE, "verifier_shape": True}
    api.train(cfg, tmp_path / "run", progress=False, echo=lambda *_: None)
    det = load_detector(str(tmp_path / "run" / "model.pt"))
    names = det.verifier.meta["names"]
    assert det.verifier.meta["shape"] and names[:-3] == feature_names(recentre=True, shape=True) and "hessian_1.5mm_1@dense" in names
    with np.load(next((tmp_path / "run" / "verifier_rows").glob("*.npz"))) as kept:
        assert kept["x"].shape[1] == len(names)
    vol = phantom_source(9, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6)).volume
    lungs = lung_mask(vol)
    places = np.argwhere(lungs)[::1500][:3].astype(float)
    p_net = score_locations(vol, det, places, stage2=False)
    x = stage_inputs(vol, places, p_net, scan_noise(vol, lungs), recentre=True, shape=True)
    assert np.allclose(score_locations(vol, det, places), det.verifier.probabilities(x), atol=1e-5)


def test_the_blob_map_finds_a_small_nodule_and_not_a_vessel():
    """:func:`ctguard.verifier.blob_map`: in lung of noise alone with a 8 mm nodule and a vessel
    (a 4 mm tube) of the same density, its strongest peak is the nodule and no peak lies on the
    vessel away from its ends; its score there is the scale-normalised negative Laplacian of the
    smoothed HU, as scipy's filter gives it on the map's grid."""
    from scipy import ndimage

    from ctguard.verifier import BLOB_GRID_MM, BLOB_SCALES_MM, blob_map
    from ctguard.volume import Volume

    rng = np.random.default_rng(4)
    spacing = (1.0, 0.7, 0.7)
    shape = (60, 140, 140)
    hu = -850.0 + 20.0 * rng.standard_normal(shape)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    nodule = np.array([30.0, 40.0, 40.0])  # mm
    hu[(z - nodule[0]) ** 2 + (y - nodule[1]) ** 2 + (x - nodule[2]) ** 2 <= 16.0] = -20.0
    hu[((y - 60.0) ** 2 + (x - 70.0) ** 2 <= 4.0) & (z >= 5.0) & (z <= 55.0)] = -20.0  # a vessel along z, ends at 5 and 55 mm
    vol = Volume(hu.astype(np.float32), spacing)
    lungs = np.ones(shape, bool)
    score, centres = blob_map(vol, lungs)
    mm = centres * np.asarray(spacing)
    assert np.linalg.norm(mm[np.argmax(score)] - nodule) <= 2.5
    on_vessel = (np.hypot(mm[:, 1] - 60.0, mm[:, 2] - 70.0) <= 4.0) & (mm[:, 0] >= 15.0) & (mm[:, 0] <= 45.0)
    assert not on_vessel.any()
    step = np.maximum(np.rint(BLOB_GRID_MM / np.asarray(spacing)).astype(int), 1)
    grid = np.asarray(spacing) * step
    cell = tuple(np.rint(centres[np.argmax(score)] / step).astype(int))
    coarse = hu[:: step[0], :: step[1], :: step[2]].astype(np.float32)
    expected = max(-(s * s) * sum(
        (np.roll(g, 1, a) + np.roll(g, -1, a) - 2 * g)[cell] / grid[a] ** 2 for a in range(3))
        for s in BLOB_SCALES_MM for g in [ndimage.gaussian_filter(coarse, s / grid, mode="nearest")])
    assert score.max() == pytest.approx(expected, rel=1e-4)
    assert blob_map(vol, np.zeros(shape, bool)) is None


def test_the_blob_maps_peaks_are_candidates_with_a_threshold_of_their_own(tmp_path):
    """``verifier_blob_peaks`` with ``verifier_blob_threshold``: each training copy's rows at the
    maps' peaks also hold the blob map's strongest peaks not among the other candidates, marked as
    such; the network's candidates, the other maps' peaks and the blob map's each get the rule's
    threshold on their own untouched training candidates with a third of the budget; screening
    takes the blob map's peaks last and holds each to its own source's threshold."""
    from ctguard.engine.train_verifier import choose_threshold, run_rows
    from ctguard.screen import load_detector, screen_volume, source_thresholds, stage_candidates
    from ctguard.verifier import blob_map, strongest_peaks

    cfg = {**MAP_PEAKS_RECIPE, "verifier_trace_peaks": 2, "verifier_blob_peaks": 3, "verifier_peak_threshold": True,
           "verifier_blob_threshold": True}
    _refused_before_training(cfg, tmp_path, [({"verifier_blob_peaks": 2.5}, "verifier_blob_peaks must be a whole number of peaks"),
                                             ({"verifier_refine_from": 0.2}, "cannot be used with verifier_refine_from"),
                                             ({"verifier_blob_threshold": "yes"}, "verifier_blob_threshold must be true or false"),
                                             ({"verifier_blob_peaks": 0}, "verifier_blob_threshold needs verifier_blob_peaks")])
    run = tmp_path / "run"
    api.train(cfg, run, progress=False, echo=lambda *_: None)
    report = json.loads((run / "verifier.json").read_text())
    assert report["blob_peaks"] == 3 and "a third of it" in report["threshold_rule"]
    _, _, parts = run_rows(run)
    peak, blob = (np.concatenate([p[k] for p in parts]) for k in ("peak", "blob"))
    assert blob.any() and not (blob & ~peak).any()
    with np.load(run / "verifier_oof.npz") as oof:
        assert (oof["clean"] & blob).any()
        third = 0.1 / 3
        assert report["threshold"] == choose_threshold(oof["score"], oof["clean"] & ~peak, report["sources"], third)
        assert report["peak_threshold"] == choose_threshold(oof["score"], oof["clean"] & peak & ~blob, report["sources"], third)
        assert report["blob_threshold"] == choose_threshold(oof["score"], oof["clean"] & blob, report["sources"], third)
    det = load_detector(str(run / "model.pt"))
    vol, lungs, heat, taken, network = _map_peaks_screening(det)
    others = [f for f in taken if f["source"] != "blob"]
    assert taken[: len(others)] == others and [f["source"] for f in others[: len(network)]] == ["network"] * len(network)
    peaks = strongest_peaks(blob_map(vol, lungs), vol.spacing, 3, np.asarray([f["voxel"] for f in others], float).reshape(-1, 3))
    assert len(peaks) and [f["voxel"] for f in taken[len(others):]] == [[round(float(c), 1) for c in p] for p in peaks]
    reading = det.verifier.read_scan(vol, lungs)
    assert all(np.array_equal(a, b) for a, b in zip(reading.blob, blob_map(vol, lungs)))
    assert stage_candidates(heat, vol, det.verifier, 1.0, lungs, reading.noise, reading.trace, reading.smooth, reading.blob) == taken
    det.threshold, det.verifier.meta["peak_threshold"], det.verifier.meta["blob_threshold"] = 0.9, 0.6, 0.2
    assert source_thresholds(det) == {"network": 0.9, "trace": 0.6, "smooth": 0.6, "blob": 0.2}
    own, _, _ = screen_volume(vol, det)
    assert own["model"]["peak_threshold"] == 0.6 and own["model"]["blob_threshold"] == 0.2
    places = own["findings"] + own["under_threshold"]
    assert "blob" in {f["source"] for f in places}
    assert all(f["threshold"] == source_thresholds(det)[f["source"]] for f in places)


def test_a_threshold_is_a_probability(tampered, capsys):
    """A threshold over 1 would pass every scan as clean, under 0 flag every one: refused, by the CLI
    before anything is read and by the API."""
    from ctguard.errors import InputError

    root, _, _ = tampered
    for bad in ("1.5", "-0.1", "high"):
        with pytest.raises(SystemExit) as stop:
            main(["screen", str(root / "tampered"), "--threshold", bad, "-q"])
        assert stop.value.code == 2 and "argument --threshold" in capsys.readouterr().err
    with pytest.raises(InputError, match="a probability from 0 to 1, not 2"):
        api.screen(root / "tampered", threshold=2.0)


def test_pixels_of_about_1mm_are_screened_with_a_warning_that_the_trace_reads_nothing():
    """Within 0.04 mm of a whole millimetre the pasted cube's ripple is too slow to read (0.977 mm:
    one cycle in 43 pixels): the bundled detector's stage has only texture there, and on such an
    external patient it found 3 of 12 edits and flagged the clean scan. Screening says so."""
    from ctguard.screen import load_detector, screen_volume

    det = load_detector("tamper3d")
    warned = {}
    for pixel in (0.977, 0.78):
        vol = phantom_source(4343, shape=(40, 256, 256), spacing=(3.0, pixel, pixel), with_tumour=False).volume
        result, _, _ = screen_volume(vol, det, input_name="p")
        warned[pixel] = [w for w in result["warnings"] if "resampling trace nothing to read" in w]
    assert len(warned[0.977]) == 1 and warned[0.977][0].startswith("p: pixels of 0.977/0.977 mm") and warned[0.78] == []
