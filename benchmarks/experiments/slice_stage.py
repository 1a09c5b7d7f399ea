"""Does a second stage on the single axial slice through a place rank it as the 3D one does? Trees
over the place's texture on that slice alone, cross-validated by patient on the 2D detector's own
test places.

Usage:
    python benchmarks/experiments/slice_stage.py [--config configs/tamper3d.yaml] [--out FILE.json]
                                                 [--compare docs/cross_validation_2d.json]

For every real patient of the config, two sets of copies are simulated (every edit family, as
``benchmarks/cross_validate.py`` makes them): with the cross-validation's own seeds for the fold that
holds the patient out (the 2D table's places, the same ones), and with seeds of no other run (the
rows the trees learn from). Each place (an edit's centre; untouched lung, dense places and real
lesions of the untouched copy) is read on its axial slice only, as a single DICOM slice is screened:
the stage's radial profiles, in-plane residual as a ratio to the slice's own parenchyma noise,
re-centred places and resampling trace (``ctguard.verifier.features_at`` on a one-slice volume,
less the slice's thickness, pixel size and noise and the through-plane residual, which one slice
does not have). For each fold, gradient-boosted trees (the 3D stage's settings) are fitted on the
training patients' rows and score the held-out patients' test places. Reported as the 2D table is:
location AUC of P(tampered), injected against untouched and removed against untouched, per fold and
pooled; with ``--compare``, beside the 2D network's own AUCs on the same places.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from cross_validate import EVAL_SEED, FOLDS, held_out_copies, patient_scans  # noqa: E402

from ctguard import api  # noqa: E402
from ctguard.engine.train_verifier import VERIFIER_DEFAULTS, boosting_classifier, negatives  # noqa: E402
from ctguard.lung import lung_depth, lung_mask  # noqa: E402
from ctguard.verifier import SCAN_COLUMNS, feature_names, features_at, finite_rows, scan_trace  # noqa: E402
from ctguard.volume import Volume  # noqa: E402

TRAIN_FOLDS = (20, 21)  # seeds EVAL_SEED + 1000 * fold + i: no training or test run uses them
LABEL = {"lung": 0, "dense": 0, "real lesion": 0, "injected": 1, "removed": 2}


def slice_noise(hu: np.ndarray, lungs: np.ndarray) -> float:
    """The slice's own noise: the median absolute in-plane residual (a Gaussian of one pixel
    subtracted) over its parenchyma (lung pixels under -600 HU)."""
    r = hu - ndimage.gaussian_filter(hu, 1.0, mode="nearest")
    where = lungs & (hu < -600)
    return float(np.median(np.abs(r[where]))) + 1e-3 if where.sum() > 100 else 1.0


def slice_rows(vol: Volume, places: list[np.ndarray]) -> np.ndarray:
    """Each place's features on its axial slice alone (one row per place)."""
    rows = []
    for p in places:
        z = int(np.clip(np.rint(p[0]), 0, vol.shape[0] - 1))
        hu = vol.hu[z : z + 1].astype(np.float32)
        one = Volume(hu, (1.0, *vol.spacing[1:]))
        lungs = lung_mask(one)
        n_xy = slice_noise(hu[0], lungs[0])
        ref = scan_trace(one, lungs, n_xy)
        rows.append(features_at(one, np.asarray([(0.0, *p[1:])]), (n_xy, 1.0), threads=2, recentre=True, resampling=True,
                                trace_reference=ref)[0])
    return np.stack(rows)


def patient_rows(entries: dict[str, list[dict]], fold: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rows, labels and place kinds of every copy ``held_out_copies`` makes of these patients for ``fold``'s seeds."""
    xs, ys, what = [], [], []
    source = None
    for i, src, _label, vol, edits in held_out_copies(entries, fold):
        if source is None or source[0] != i:
            lungs = lung_mask(src.volume)
            source = (i, np.random.default_rng([EVAL_SEED, fold, i]), lungs, lung_depth(src.volume, lungs))
        _, rng, lungs, depth = source
        where = negatives(src, lungs, depth, rng) if not edits else [(e.kind, np.asarray(e.voxel, float)) for e in edits]
        xs.append(slice_rows(vol, [w for _, w in where]))
        ys += [LABEL[k] for k, _ in where]
        what += [k for k, _ in where]
    return np.concatenate(xs), np.asarray(ys), what


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
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", default=None, help="a cross-validation JSON with the 2D network's scores (p2d_tampered) at these places")
    a = ap.parse_args()
    cfg = {**VERIFIER_DEFAULTS, **api.load_config(a.config)}
    by_patient = patient_scans(cfg)
    names = feature_names(True, True, False, True)
    keep = [j for j, n in enumerate(names) if n not in SCAN_COLUMNS and not n.startswith("res_z") and "_res_z" not in n]
    t0 = time.time()
    train: dict[str, tuple] = {}
    for p in by_patient:
        parts = [patient_rows({p: by_patient[p]}, f) for f in TRAIN_FOLDS]
        train[p] = (np.concatenate([x for x, _, _ in parts]), np.concatenate([y for _, y, _ in parts]))
        print(f"{p}: {len(train[p][1])} training rows ({time.time() - t0:.0f} s)", flush=True)
    folds, pooled_p, pooled_what = [], [], []
    for k, fold in enumerate(FOLDS):
        held = {p: by_patient[p] for p in fold["held_out"]}
        x_test, _, what = patient_rows(held, k)
        x = np.concatenate([train[p][0] for p in by_patient if p not in held])
        y = np.concatenate([train[p][1] for p in by_patient if p not in held])
        trees = boosting_classifier(cfg).fit(finite_rows(x[:, keep]), y)
        probs = np.zeros((len(x_test), 3))
        probs[:, trees.classes_.astype(int)] = trees.predict_proba(finite_rows(x_test[:, keep]))
        p_t = 1.0 - probs[:, 0]
        row = {"fold": k, "held_out": fold["held_out"], "train_rows": len(y), **aucs(p_t, what)}
        if a.compare:
            places = json.loads(Path(a.compare).read_text())["folds"][k].get("eval", {}).get("places", [])
            if len(places) == len(what) and [q["what"] for q in places] == what:
                row["network_2d"] = aucs(np.asarray([q["p2d_tampered"] for q in places]), what)
            else:
                row["network_2d"] = f"not the same places ({len(places)} against {len(what)})"
        folds.append(row)
        pooled_p.append(p_t)
        pooled_what += what
        print(json.dumps(row), flush=True)
    pooled = {"fold": "pooled", **aucs(np.concatenate(pooled_p), pooled_what), "seconds": round(time.time() - t0)}
    print(json.dumps(pooled))
    if a.out:
        Path(a.out).write_text(json.dumps({"config": Path(a.config).name, "columns": [names[j] for j in keep], "folds": folds,
                                           "pooled": pooled}, indent=1) + "\n")


if __name__ == "__main__":
    main()
