"""The 2D detector's single-slice second stage (ctguard.engine.train_slice_stage)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml

from ctguard import api
from ctguard.errors import InputError


@pytest.fixture(scope="module")
def slice_stage(real_series, tmp_path_factory):
    """A slice stage fitted on two copy sets of A0001's two real series (with its tumour boxes) and
    one phantom of the quick set-up, beside the bundled 2D network, as a run of ``ctguard train``
    holds them (the network is there first: the threshold's clean slices are screened with it)."""
    from ctguard.engine.train_slice_stage import fit_slice_stage

    root = tmp_path_factory.mktemp("slice-stage")
    annotations = Path(real_series["A0001-L"]).parents[3] / "annotations"
    (root / "scans.yaml").write_text(yaml.safe_dump({"real_scans": [
        {"patient": "Lung_Dx-A0001", "scan": str(real_series[k]), "tumours": str(annotations)} for k in ("A0001-L", "A0001-B")]}))
    run = root / "run"
    run.mkdir()
    weights = Path(str(resources.files("ctguard") / "weights"))
    shutil.copy(weights / "tamper2d.onnx", run / "model.onnx")
    shutil.copy(weights / "tamper2d.pt", run / "model.pt")
    cfg = {"slice_stage_scans": str(root / "scans.yaml"), "slice_stage_copies": 2, "slice_stage_fixed_phantoms": 1, "verifier_trees": 60,
           "slice_stage_cache": str(root / "rows")}
    summary = fit_slice_stage(cfg, run, echo=lambda m: None)
    return run, summary, root, cfg


def test_slice_stage_learns_edits_of_a_scan_on_single_slices(slice_stage, real_series):
    """Fitted on two copy sets of a patient's series, the trees score fresh edits of that series (seeds
    they never saw), read on single slices, higher than its untouched places; the rows hold every
    class, each row has the columns the names say, and the rows kept are those a fresh run makes."""
    from ctguard.engine.train_slice_stage import LABELS, SEED_BASE, copy_places, entry_rows, slice_rows, source_of, source_rows
    from ctguard.verifier import Verifier, feature_names, slice_names

    run, summary, root, _ = slice_stage
    stage = Verifier.load(run / "model.verifier.npz")
    assert stage.meta["slice"] and not stage.meta["uses_network"] and stage.meta["patients"] == ["Lung_Dx-A0001"]
    assert min(stage.meta["rows_by_class"].values()) > 10 and summary["rows"] == sum(stage.meta["rows_by_class"].values())
    assert not {n for n in slice_names() if n.startswith("res_z") or n in ("log_slice_mm", "log_noise_xy")}
    entries = yaml.safe_load((root / "scans.yaml").read_text())["real_scans"]
    src = source_of(entries[0])
    # Each scan's rows are kept, a set of copies a file, and a set made again gives the same rows.
    assert len(list((root / "rows").glob("*.npz"))) == 4 + 1 + 3  # two series' two sets, the phantom's set, three sources' clean slices
    kept, _, patient = entry_rows(entries, 0, 1, str(root / "rows"))
    fresh, _ = source_rows(src, SEED_BASE)
    assert patient == "Lung_Dx-A0001" and np.array_equal(kept, fresh, equal_nan=True)
    x, y = [], []
    for vol, places in copy_places(src, SEED_BASE + 999, np.random.default_rng(5)):
        x.append(slice_rows(vol, [w for _, w in places]))
        y += [LABELS[k] for k, _ in places]
    x, y = np.concatenate(x), np.asarray(y)
    assert x.shape[1] == len(feature_names(True, True, False, True))
    p_tampered = 1.0 - stage.probabilities(x)[:, 0]
    assert p_tampered[y > 0].mean() > p_tampered[y == 0].mean() + 0.2, (p_tampered[y > 0].mean(), p_tampered[y == 0].mean())


def test_a_single_slice_is_screened_with_its_stage(slice_stage, real_series, tmp_path):
    """A 2D run with a slice stage beside it: screening a slice re-scores the network's candidates
    with the stage (each finding keeps the network's own score), and ``--locations`` scores places
    with the stage; a 3D detector refuses a slice stage beside it."""
    from ctguard import io
    from ctguard.lung import lung_mask
    from ctguard.screen import as_ct_slice, load_detector, load_detector2d, score_locations_2d

    run, _, _, _ = slice_stage
    det = load_detector2d(str(run / "model.pt"))
    assert det.verifier is not None and det.verifier.meta["slice"]
    files = sorted(Path(real_series["A0001-L"]).iterdir())
    middle = next(f for f in files if lung_mask(as_ct_slice(io.read(f))).sum() > 20_000)  # a DICOM slice through the lungs
    one = io.read(middle)
    r = api.screen(middle, model=str(run / "model.pt"), threshold=0.0)
    assert r["model"].get("second_stage") is True
    scored = r["findings"] + r["under_threshold"]
    assert scored and all("network_score" in f for f in scored)
    flat = as_ct_slice(one)
    places = np.array([[0.0, flat.shape[1] / 2, flat.shape[2] / 3], [0.0, flat.shape[1] / 2, 2 * flat.shape[2] / 3]])
    p_stage = score_locations_2d(flat, det, places)
    p_net = score_locations_2d(flat, det, places, stage2=False)
    assert np.allclose(p_stage.sum(1), 1.0, atol=1e-4) and not np.allclose(p_stage, p_net)
    # A whole-scan detector with a slice stage beside it is refused, naming the file.
    three = tmp_path / "three"
    three.mkdir()
    weights = Path(str(resources.files("ctguard") / "weights"))
    for suffix in (".pt", ".onnx", ".json"):
        shutil.copy(weights / f"tamper3d{suffix}", three / f"model{suffix}")
    shutil.copy(run / "model.verifier.npz", three / "model.verifier.npz")
    with pytest.raises(InputError, match="single slice"):
        load_detector(str(three / "model.pt"))


def test_the_slice_stages_threshold_is_chosen_out_of_patient(slice_stage):
    """The stage's threshold is the lowest of the grid giving at most ``slice_stage_max_false``
    candidates over it per clean slice (six lung slices of each untouched source screened alone),
    each candidate scored by trees that never learnt its patient: with A0001 and one phantom, A0001's
    by trees fitted on the phantom's rows alone. The run's detector takes the threshold; settings out
    of range and a single patient are refused with one line."""
    from ctguard.engine import train_slice_stage as tss
    from ctguard.engine.train_verifier import GRID
    from ctguard.screen import load_detector2d
    from ctguard.verifier import Verifier, finite_rows, slice_columns

    run, summary, root, cfg = slice_stage
    stage = Verifier.load(run / "model.verifier.npz")
    thr = stage.meta["threshold"]
    assert thr == summary["threshold"] == load_detector2d(str(run / "model.pt")).threshold
    full = tss.stage_settings(cfg)
    entries = tss.scan_entries(full)
    parts = [tss.entry_rows(entries, i, 2, full["slice_stage_cache"]) for i in range(len(entries))] + tss.phantom_rows(full, full["slice_stage_cache"])
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    groups = np.concatenate([np.full(len(p[1]), p[2], dtype=object) for p in parts])
    det, net_hash = tss.network_only(run / "model.pt")
    clean = tss.clean_rows(full, entries, det, net_hash, stage)  # read back from the rows kept
    assert [g for _, _, g in clean] == ["Lung_Dx-A0001", "Lung_Dx-A0001", "phantom 7050"] and sum(len(r) for r, _, _ in clean) > 0
    again, fit, score = tss.slice_threshold(full, x, y, groups, clean)
    assert again == thr and fit == summary["threshold_fit"] and fit["clean_slices"] == 18
    # A0001's clean candidates, scored by trees fitted on the phantom's rows alone.
    a0001 = np.concatenate([r for r, _, g in clean if g == "Lung_Dx-A0001"])
    trees = tss.fit_trees(full, x[groups != "Lung_Dx-A0001"], y[groups != "Lung_Dx-A0001"])
    p = np.zeros((len(a0001), 3))
    p[:, trees.classes_.astype(int)] = trees.predict_proba(finite_rows(a0001[:, slice_columns()]))
    assert np.allclose(score[: len(a0001)], 1.0 - p[:, 0])
    # The rule: at most max_false over the threshold per clean slice, more over the grid's step below it.
    rate = {float(t): (score >= t).sum() / 18 for t in GRID}
    assert rate[thr] <= full["slice_stage_max_false"] and fit["false_per_clean_slice"][str(thr)] == round(rate[thr], 4)
    below = [t for t in rate if t < thr]
    assert not below or rate[max(below)] > full["slice_stage_max_false"]
    for bad in ({"slice_stage_clean_slices": 0}, {"slice_stage_clean_slices": 2.5}, {"slice_stage_max_false": -1}, {"slice_stage_max_false": "lots"}):
        with pytest.raises(InputError, match=next(iter(bad))) as e:
            tss.check_slice_settings({**full, **bad})
        assert len(str(e.value).splitlines()) == 1
    with pytest.raises(InputError, match="at least two patients"):
        tss.slice_threshold(full, x, y, np.full(len(y), "one", dtype=object), clean)
