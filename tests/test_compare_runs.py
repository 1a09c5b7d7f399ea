"""benchmarks/compare_runs.py: two cross-validation runs compared place by place."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # as when the script runs: it imports cross_validate beside it
import compare_runs  # noqa: E402


def _report(path: Path, fold: int, scores: dict[str, list[float]], found: list[bool], flagged: tuple[bool, ...] = (),
            called: tuple[bool, ...] = ()) -> Path:
    places = []
    for what, ss in scores.items():
        for i, s in enumerate(ss):
            places.append({"patient": "p", "what": what, "family": "drawn" if what == "injected" else None,
                           "mean_hu": -800.0 + i + 100 * len(what), "smoothness": 0.1 * i, "p_tampered": s})
    edits = [{"kind": "injected", "family": "drawn", "found": f} for f in found]
    clean = [{"false_findings": [{"kind": "removed", "score": 0.99}] if f else []} for f in flagged]
    lesions = [{"called_injected": c} for c in called]
    path.write_text(json.dumps({"folds": [{"fold": fold, "eval": {"places": places, "edits": edits, "clean_scans": clean,
                                                                  "real_lesions": lesions}}]}))
    return path


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s, y = np.round(rng.random(25), 1), (rng.random(25) < 0.4).astype(int)
        if 0 < y.sum() < len(y):
            assert compare_runs.auc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_paired_comparison_of_two_runs(tmp_path):
    untouched = [0.1, 0.2, 0.3, 0.6]
    a = _report(tmp_path / "a.json", 2, {"injected": [0.5, 0.9], "lung": untouched}, [False, True])
    # B ranks the first injection over every untouched place; its places listed in another order
    b = _report(tmp_path / "b.json", 2, {"lung": untouched, "injected": [0.7, 0.9]}, [True, True], flagged=(True, False), called=(True,))
    (row,) = compare_runs.compare(str(a), str(b), boot=200)
    assert row["injected"]["a"] == pytest.approx(0.875) and row["injected"]["b"] == pytest.approx(1.0)
    assert row["injected"]["b_minus_a"] == pytest.approx(0.125)
    lo, hi = row["injected"]["interval_95"]
    assert lo <= 0.125 + 1e-9 and hi >= 0.0
    assert row["removed"] is None
    assert row["edits_found"] == {"edits": 2, "a": 1, "b": 2, "both": 1, "a_only": 0, "b_only": 1}
    assert row["a"] == {"clean_flagged": 0, "clean_scans": 0, "lesions_called_injected": 0, "lesions": 0}
    assert row["b"] == {"clean_flagged": 1, "clean_scans": 2, "lesions_called_injected": 1, "lesions": 1}
    line = compare_runs.markdown([row]).splitlines()[-1]
    assert line.startswith("| 2 | 0.875 | 1.0 |") and line.endswith("| 0/0 | 1/2 | 0/0 | 1/1 |")


def test_runs_on_other_places_are_refused(tmp_path):
    a = _report(tmp_path / "a.json", 2, {"injected": [0.5], "lung": [0.1, 0.2]}, [True])
    b = _report(tmp_path / "b.json", 2, {"injected": [0.5], "lung": [0.1]}, [True])
    with pytest.raises(SystemExit, match="not tested on the same places"):
        compare_runs.compare(str(a), str(b), boot=10)
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(SystemExit, match="bad.json: not a report of benchmarks/cross_validate.py"):
        compare_runs.compare(str(tmp_path / "bad.json"), str(a), boot=10)
    c = _report(tmp_path / "c.json", 3, {"injected": [0.5], "lung": [0.1]}, [True])
    with pytest.raises(SystemExit, match="no fold"):
        compare_runs.compare(str(a), str(c), boot=10)


def test_folds_in_both_runs_are_pooled(tmp_path):
    def two_folds(name: str, second: list[float], found: list[bool]) -> Path:
        folds = []
        for k, inj in ((0, [0.9]), (1, second)):
            one = json.loads(_report(tmp_path / "x.json", k, {"injected": inj, "lung": [0.1, 0.5]}, found, flagged=(k == 1,)).read_text())
            folds += one["folds"]
        (tmp_path / name).write_text(json.dumps({"folds": folds}))
        return tmp_path / name

    rows = compare_runs.compare(str(two_folds("a.json", [0.3], [False])), str(two_folds("b.json", [0.6], [True])), boot=50)
    assert [r["fold"] for r in rows] == [0, 1, "pooled"]
    pooled = rows[-1]
    assert pooled["injected"]["n"] == 2 and pooled["injected"]["a"] == pytest.approx(0.75) and pooled["injected"]["b"] == pytest.approx(1.0)
    assert pooled["edits_found"] == {"edits": 2, "a": 0, "b": 2, "both": 0, "a_only": 0, "b_only": 2}
    assert pooled["a"]["clean_flagged"] == 1 and pooled["a"]["clean_scans"] == 2


def test_a_fold_holds_out_only_the_patients_its_config_has():
    """cross_validate's folds on a config with some of their patients (an external config of one
    patient, or the recipe with one added): each fold holds out those it has, in the fold's order
    (which seeds their test copies), and trains on the rest."""
    import cross_validate

    def cfg(*patients):
        return {p: [{"patient": p, "scan": f"{p}.nrrd"}] for p in patients}

    eight = cfg("Lung_Dx-A0001", "Lung_Dx-A0002", "LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003", "LIDC-IDRI-0314", "lung1", "lung2")
    training, held = cross_validate.split_fold(eight, 2)
    assert list(held) == ["LIDC-IDRI-0314", "lung1"] and "LCTSC-Test-S1-101" not in training and len(training) == 6
    nine = {**eight, **cfg("LCTSC-Test-S1-101")}
    training, held = cross_validate.split_fold(nine, 2)
    assert list(held) == ["LIDC-IDRI-0314", "lung1", "LCTSC-Test-S1-101"] and len(training) == 6
    assert "LCTSC-Test-S1-101" in cross_validate.split_fold(nine, 0)[0]
    external = cfg("LCTSC-Test-S1-101")
    assert [list(cross_validate.split_fold(external, k)[1]) for k in range(4)] == [[], [], ["LCTSC-Test-S1-101"], []]
