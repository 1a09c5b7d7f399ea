"""The 2D detector's single-slice stage cross-validated by patient, on the 2D detector's own test places.

Usage:
    python benchmarks/experiments/slice_stage.py [--config configs/tamper2d.yaml] [--out FILE.json]

For each fold of ``benchmarks/cross_validate.py`` the stage (``ctguard.engine.train_slice_stage``,
the config's ``slice_stage*`` settings) is fitted on the rows of the fold's training patients only,
exactly as ``ctguard train`` fits it on every patient (the same rows for each scan it keeps, and
the stage's phantoms in every fold), and
scores the held-out patients' test places: the cross-validation's own copies and places (its seeds
for the fold; each edit's centre, and untouched lung, dense places and real lesions of the untouched
scan), each read on its axial slice alone, as a single slice is screened. The stage alone scores a
place (the network only proposes candidates), so these are the 2D detector's location AUCs, reported
as the 2D table is: P(tampered), injected against untouched and removed against untouched, per fold
and pooled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from cross_validate import FOLDS, held_out_places, patient_scans  # noqa: E402

from ctguard import api  # noqa: E402
from ctguard.engine.train_slice_stage import LABELS, SLICE_DEFAULTS, entry_rows, fit_trees, phantom_rows, scan_entries, slice_rows  # noqa: E402
from ctguard.verifier import finite_rows, slice_columns  # noqa: E402


def test_places(held: dict[str, list[dict]], fold: int) -> tuple[np.ndarray, list[str]]:
    """Rows and kinds of the fold's test places (``cross_validate.held_out_places``, as the fold scores them)."""
    xs, what = [], []
    for *_, vol, _edits, _lungs, where in held_out_places(held, fold):
        xs.append(slice_rows(vol, [w for _, w in where]))
        what += [k for k, _ in where]
    return np.concatenate(xs), what


def aucs(p_tampered: np.ndarray, what: list[str]) -> dict:
    w = np.asarray(what)
    neg = np.isin(w, ["lung", "dense", "real lesion"])
    out = {}
    for kind in ("injected", "removed"):
        pos = w == kind
        y = np.r_[np.ones(pos.sum()), np.zeros(neg.sum())]
        out[f"auc_{kind}"] = round(float(roc_auc_score(y, np.r_[p_tampered[pos], p_tampered[neg]])), 4)
        out[f"n_{kind}"] = int(pos.sum())
    out["n_untouched"] = int(neg.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tamper2d.yaml"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = {**SLICE_DEFAULTS, **api.load_config(a.config)}
    entries = scan_entries(cfg)
    by_patient = patient_scans({"real_scans": entries})
    t0 = time.time()
    rows = [entry_rows(entries, i, int(cfg["slice_stage_copies"]), cfg.get("slice_stage_cache")) for i in range(len(entries))]
    rows += phantom_rows(cfg, cfg.get("slice_stage_cache"))  # in every fold's training
    print(f"training rows of {len(entries)} scans and the phantoms: {sum(len(y) for _, y, _ in rows)} ({time.time() - t0:.0f} s)", flush=True)
    columns = slice_columns()
    folds, pooled_p, pooled_what = [], [], []
    for k, fold in enumerate(FOLDS):
        held = {p: by_patient[p] for p in fold["held_out"]}
        x_test, what = test_places(held, k)
        train = [(x, y) for x, y, patient in rows if patient not in held]
        x, y = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
        trees = fit_trees(cfg, x, y)
        probs = np.zeros((len(x_test), 3))
        probs[:, trees.classes_.astype(int)] = trees.predict_proba(finite_rows(x_test[:, columns]))
        p_t = 1.0 - probs[:, 0]
        row = {"fold": k, "held_out": fold["held_out"], "train_rows": int(len(y)), **aucs(p_t, what)}
        folds.append(row)
        pooled_p.append(p_t)
        pooled_what += what
        print(json.dumps(row), flush=True)
    pooled = {"fold": "pooled", **aucs(np.concatenate(pooled_p), pooled_what), "seconds": round(time.time() - t0)}
    print(json.dumps(pooled))
    if a.out:
        Path(a.out).write_text(json.dumps({"config": Path(a.config).name, "settings": {k: cfg[k] for k in SLICE_DEFAULTS if k not in ("slice_stage_scans", "slice_stage_cache")},
                                           "labels": LABELS, "folds": folds, "pooled": pooled}, indent=1) + "\n")


if __name__ == "__main__":
    main()
