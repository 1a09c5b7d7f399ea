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

Each fold's operating point as well: its threshold chosen by the stage's own rule on its training
patients and the phantoms only (``slice_threshold``: the clean slices of its training sources, each
candidate scored out of patient), then on the held-out patients the findings per clean slice (six
lung slices of each untouched held-out scan screened alone) and the edits found: the axial slice
through each edit's centre screened alone, found when a candidate of the edit's kind near it scores
the threshold or more. The candidates are the bundled 2D network's, which trained on every patient
(the 2D network is not trained per fold): what this measures is the stage.
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
from ctguard.engine.train_slice_stage import (LABELS, SLICE_DEFAULTS, candidate_rows, clean_rows, entry_rows, fit_trees,  # noqa: E402
                                              network_only, phantom_rows, scan_entries, slice_candidates, slice_rows,
                                              slice_threshold, stage_settings, tree_probabilities)
from ctguard.engine.train_verifier import near  # noqa: E402
from ctguard.screen import load_detector2d  # noqa: E402
from ctguard.verifier import axial_slice  # noqa: E402


def test_places(held: dict[str, list[dict]], fold: int, det, stage) -> tuple[np.ndarray, list[str], list[tuple]]:
    """Rows and kinds of the fold's test places (``cross_validate.held_out_places``, as the fold
    scores them), and each held-out edit's slice screened alone (:func:`edit_slice`)."""
    xs, what, edits = [], [], []
    for *_, vol, copy_edits, _lungs, where in held_out_places(held, fold):
        xs.append(slice_rows(vol, [w for _, w in where]))
        what += [k for k, _ in where]
        edits += [edit_slice(det, stage, vol, e) for e in copy_edits]
    return np.concatenate(xs), what, edits


def edit_slice(det, stage, vol, edit) -> tuple:
    """The axial slice through ``edit``'s centre screened alone by the network ``det``: ``(edit's
    kind, rows of the candidates the stage takes that lie near the edit)``."""
    one = axial_slice(vol, edit.voxel[0])
    at, lungs = slice_candidates(det, stage, one)
    at = np.asarray([a for a in at if near((np.rint(edit.voxel[0]), *a[1:]), edit.voxel, edit.diameter_mm, vol.spacing)]).reshape(-1, 3)
    return edit.kind, candidate_rows(stage, one, at, lungs)


def operating_point(trees, thr: float, held_clean: list, n_slices: int, edits: list[tuple]) -> dict:
    """Findings on the ``n_slices`` clean held-out slices (``held_clean``: their candidates' rows)
    and edits found (a candidate of the edit's kind near it at ``thr`` or more) at the threshold ``thr``."""
    false = sum(int((1.0 - tree_probabilities(trees, x)[:, 0] >= thr).sum()) for x, _, _ in held_clean)
    found = 0
    for kind, x in edits:
        p = tree_probabilities(trees, x)
        right = p[:, 1] >= p[:, 2] if kind == "injected" else p[:, 2] > p[:, 1]
        found += bool(((1.0 - p[:, 0] >= thr) & right).any())
    return {"false_findings": false, "n_slices": n_slices, "edits_found": found, "n_edits": len(edits)}


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
    cfg = stage_settings(api.load_config(a.config))
    entries = scan_entries(cfg)
    by_patient = patient_scans({"real_scans": entries})
    t0 = time.time()
    rows = [entry_rows(entries, i, int(cfg["slice_stage_copies"]), cfg.get("slice_stage_cache")) for i in range(len(entries))]
    rows += phantom_rows(cfg, cfg.get("slice_stage_cache"))  # in every fold's training
    print(f"training rows of {len(entries)} scans and the phantoms: {sum(len(y) for _, y, _ in rows)} ({time.time() - t0:.0f} s)", flush=True)
    bundled = load_detector2d()
    det, net_hash = network_only(Path(bundled.path))
    clean = clean_rows(cfg, entries, det, net_hash, bundled.verifier)  # every source's clean slices: the candidates the stage takes
    print(f"clean slices' candidates: {sum(len(x) for x, _, _ in clean)} ({time.time() - t0:.0f} s)", flush=True)
    per_source = int(cfg["slice_stage_clean_slices"])
    folds, pooled_p, pooled_what, totals = [], [], [], {"false_findings": 0, "n_slices": 0, "edits_found": 0, "n_edits": 0}
    for k, fold in enumerate(FOLDS):
        held = {p: by_patient[p] for p in fold["held_out"]}
        x_test, what, edits = test_places(held, k, det, bundled.verifier)
        train = [(x, y, g) for x, y, g in rows if g not in held]
        x, y = np.concatenate([x for x, _, _ in train]), np.concatenate([y for _, y, _ in train])
        groups = np.concatenate([np.full(len(y), g, dtype=object) for _, y, g in train])
        trees = fit_trees(cfg, x, y)
        thr, fit, _ = slice_threshold(cfg, x, y, groups, [c for c in clean if c[2] not in held])
        held_clean = [c for c in clean if c[2] in held]
        op = operating_point(trees, thr, held_clean, per_source * len(held_clean), edits)
        p_t = 1.0 - tree_probabilities(trees, x_test)[:, 0]
        row = {"fold": k, "held_out": fold["held_out"], "train_rows": int(len(y)), **aucs(p_t, what), "threshold": thr,
               "train_false_per_clean_slice": fit["false_per_clean_slice"][str(thr)], **op,
               "false_per_clean_slice": round(op["false_findings"] / max(op["n_slices"], 1), 4)}
        folds.append(row)
        pooled_p.append(p_t)
        pooled_what += what
        totals = {key: totals[key] + op[key] for key in totals}
        print(json.dumps(row), flush=True)
    pooled = {"fold": "pooled", **aucs(np.concatenate(pooled_p), pooled_what), **totals,
              "false_per_clean_slice": round(totals["false_findings"] / max(totals["n_slices"], 1), 4), "seconds": round(time.time() - t0)}
    print(json.dumps(pooled))
    if a.out:
        Path(a.out).write_text(json.dumps({"config": Path(a.config).name, "settings": {k: cfg[k] for k in SLICE_DEFAULTS if k not in ("slice_stage_scans", "slice_stage_cache")},
                                           "network": f"{bundled.name} v{bundled.version} (bundled; trained on every patient)",
                                           "labels": LABELS, "folds": folds, "pooled": pooled}, indent=1) + "\n")


if __name__ == "__main__":
    main()
