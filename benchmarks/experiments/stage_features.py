"""Candidate features for the second stage, measured on held-out patients' rows before any refit.

Usage:
    python benchmarks/experiments/stage_features.py runs/patch/f0 runs/patch/f1 ... [--features base,acf]

Each folder is made by ``benchmarks/experiments/patch_stage.py collect FOLD RUN OUT``: a fold's
second-stage rows (the stage's own places and labels) on its training sources and on its held-out
patients, each with its patch at the scan's own voxels (:func:`ctguard.patches.patches_at`). For
each feature set the trees are fitted on the training rows as the recipe fits them (histogram
boosting, the same columns), and measured on the held-out rows: location AUC of injected and
removed rows against untouched places and clean candidates; the share of edits' rows over the
highest clean held-out candidate (what a threshold with no false finding there would find); and,
at the threshold the training rows give by the stage's rule (out of patient on five grouped folds,
at most ``verifier_max_false`` candidates over it per clean training source), the share of edits'
rows over it and the clean held-out candidates over it. Beside these, the patients' own lesions
against injections: the scores of the held-out real lesions (each untouched copy's rows after its
10 random and 10 dense places, before its candidates) and the share of injected copies' edit
centres over the highest of them; and how many lesion rows and injected centres the trees learn from.

Feature sets (added to the trees' columns):
- ``base``: the stage's columns only (the recipe);
- ``acf``: the residual's texture in rings around the place, from the patch: the lag-1
  autocorrelation of the in-plane residual along x and y and between adjacent slices, its
  kurtosis, and the ratio of fine to coarse high-pass energy, in a 4 px disc and 4-8, 8-14 and
  14-22 px rings (central three slices), and each inner value minus the outer ring's. A region
  cut, resampled to 1 mm and back, and pasted (as the CT-GAN attack and this project's simulator
  do) or given synthetic noise carries another noise spectrum than the scanner's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ctguard.engine import train_verifier as tv  # noqa: E402
from ctguard.patches import SIZE, SLICES  # noqa: E402

RINGS_PX = ((0.0, 4.0), (4.0, 8.0), (8.0, 14.0), (14.0, 22.0))


def load_fold(folder: Path) -> dict:
    parts = [dict(np.load(p, allow_pickle=False)) for p in sorted(folder.glob("[0-9]*.npz"))]
    out = {}
    for side, held in (("train", False), ("test", True)):
        ps = [p for p in parts if bool(p["held"]) == held]
        out[side] = {
            "x": np.concatenate([p["x"] for p in ps]),
            "y": np.concatenate([p["y"] for p in ps]).astype(int),
            "clean": np.concatenate([p["clean"] for p in ps]),
            "group": np.concatenate([[str(p["group"])] * len(p["y"]) for p in ps]),
            "source": np.concatenate([[k] * len(p["y"]) for k, p in enumerate(ps)]),
            "scan": np.concatenate([p["scan"] for p in ps]),
            "patches": np.concatenate([p["patches"].reshape(len(p["y"]), 3, SLICES, SIZE, SIZE) for p in ps]),
            "sources": len(ps),
        }
    return out


def lesions_and_injected_centres(side: dict) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the real lesions' rows (each source's untouched copy: rows made in the order of
    :func:`ctguard.engine.train_verifier.negatives`, the random and dense places first, then every
    lesion, then the candidates) and of the injected copies' edit centres (the rows before their
    candidates; at most ``verifier_per_scan`` (4) per copy)."""
    lesion, centre = np.zeros(len(side["y"]), bool), np.zeros(len(side["y"]), bool)
    for k in np.unique(side["source"]):
        rows = np.flatnonzero(side["source"] == k)
        cands = rows[side["clean"][rows]]
        if not len(cands):
            continue
        untouched = side["scan"][cands[0]]
        own = rows[side["scan"][rows] == untouched]
        lesion[own[(own >= own[0] + 2 * tv.PLACES_EACH) & (own < cands[0])]] = True
        for c in np.unique(side["scan"][rows]):
            first = rows[side["scan"][rows] == c][:4]
            if c != untouched:
                centre[first[side["y"][first] == 1]] = True
    return lesion, centre


def _ring_masks() -> list[np.ndarray]:
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE // 2
    r = np.hypot(yy, xx)
    return [(r >= lo) & (r < hi) for lo, hi in RINGS_PX]


def acf_features(patches: np.ndarray, chunk: int = 512) -> np.ndarray:
    """The residual-texture columns of ``acf`` for ``(n, 3, SLICES, SIZE, SIZE)`` patches."""
    masks = _ring_masks()
    rows = []
    for s in range(0, len(patches), chunk):
        p = patches[s:s + chunk].astype(np.float32)
        hu = p[:, 0, 1:4] * 400.0  # the central three slices
        r = p[:, 1, 1:4]  # in-plane residual / noise (sigma 1 px high-pass)
        fine = hu - ndimage.gaussian_filter(hu, (0, 0, 0.6, 0.6))
        coarse = ndimage.gaussian_filter(hu, (0, 0, 0.6, 0.6)) - ndimage.gaussian_filter(hu, (0, 0, 1.5, 1.5))
        ax = r[..., :, 1:] * r[..., :, :-1]
        ay = r[..., 1:, :] * r[..., :-1, :]
        az = p[:, 1, 1:4] * p[:, 1, 0:3]
        r2 = r * r
        feats = []
        for m in masks:
            mx, my = m[:, 1:] & m[:, :-1], m[1:, :] & m[:-1, :]
            var = r2[..., m].mean(axis=(1, 2)) + 1e-6
            f = [ax[..., mx].mean(axis=(1, 2)) / var, ay[..., my].mean(axis=(1, 2)) / var, az[..., m].mean(axis=(1, 2)) / var,
                 (r2[..., m] ** 2).mean(axis=(1, 2)) / var**2,
                 np.log((fine[..., m] ** 2).mean(axis=(1, 2)) + 1e-3) - np.log((coarse[..., m] ** 2).mean(axis=(1, 2)) + 1e-3)]
            feats.append(np.stack(f, axis=1))
        rows.append(_with_contrasts(feats))
    return np.concatenate(rows)


def _with_contrasts(feats: list[np.ndarray]) -> np.ndarray:
    """Per-ring measures (a list over rings of ``(n, measures)``) as rows: every ring's, then each
    inner ring's less the outer ring's."""
    f = np.stack(feats, axis=1)  # (n, rings, measures)
    return np.concatenate([f.reshape(len(f), -1), (f[:, :-1] - f[:, -1:]).reshape(len(f), -1)], axis=1)


def medians_by(key: np.ndarray, values: np.ndarray, use: np.ndarray | None = None, at_least: int = 1) -> np.ndarray:
    """Each row's median of ``values`` over the rows of its ``key`` (only those in ``use`` where it
    leaves ``at_least`` of them)."""
    ref = np.zeros_like(values)
    for k in np.unique(key):
        m = key == k
        pick = m if use is None or (m & use).sum() < at_least else m & use
        ref[m] = np.median(values[pick], axis=0)
    return ref


def candidate_medians(side: dict, values: np.ndarray) -> np.ndarray:
    """For ``scanref``: each row's median of ``values`` over the network's candidates (network's
    P(not genuine) >= the stage's candidate threshold, 0.3) on the same copy of the same source, as
    screening would have them (all the copy's rows where it has fewer than 5 candidates)."""
    from ctguard.verifier import network_probabilities

    p_edit = 1.0 - network_probabilities(side["x"][:, -3:])[:, 0]
    copy = side["source"].astype(np.int64) * 10_000 + side["scan"].astype(np.int64)
    return medians_by(copy, values, p_edit >= 0.3, at_least=5)


def parenchyma_features(patches: np.ndarray, chunk: int = 512) -> np.ndarray:
    """For ``paren``: in each ring, over parenchyma pixels only (under -600 HU; central three
    slices), the median absolute in-plane and through-plane residual (in noise units), the share of
    in-plane residuals under -1.5 and over +1.5 noise, and the parenchyma's share of the ring; then
    each inner ring's less the outer ring's."""
    masks = _ring_masks()
    rows = []
    for s in range(0, len(patches), chunk):
        p = patches[s:s + chunk].astype(np.float32)
        paren = p[:, 0, 1:4] * 400.0 < -600.0
        r_xy, r_z = np.abs(p[:, 1, 1:4]), np.abs(p[:, 2, 1:4])
        neg, pos = p[:, 1, 1:4] < -1.5, p[:, 1, 1:4] > 1.5
        feats = []
        for m in masks:
            w = paren & m
            n = w.sum(axis=(1, 2, 3)).astype(np.float32)
            safe = np.maximum(n, 1.0)
            med_xy = np.array([np.median(r_xy[i][w[i]]) if n[i] else 0.0 for i in range(len(p))], np.float32)
            med_z = np.array([np.median(r_z[i][w[i]]) if n[i] else 0.0 for i in range(len(p))], np.float32)
            f = [np.log(med_xy + 1e-2), np.log(med_z + 1e-2), (neg & w).sum(axis=(1, 2, 3)) / safe, (pos & w).sum(axis=(1, 2, 3)) / safe,
                 n / (3.0 * m.sum())]
            feats.append(np.stack(f, axis=1))
        rows.append(_with_contrasts(feats))
    return np.concatenate(rows)


def columns(side: dict, cfg: dict, which: str) -> np.ndarray:
    _, cols = tv.tree_columns(cfg)
    base = tv.finite_rows(side["x"][:, cols])
    if which == "base":
        return base
    if which == "paren":
        if "paren" not in side:
            side["paren"] = parenchyma_features(side["patches"])
        return np.concatenate([base, side["paren"]], axis=1)
    if which == "scanref":  # beside each column, its value less its median over the same scan copy's network candidates
        return np.concatenate([base, base - candidate_medians(side, base)], axis=1)
    if which.startswith("acf"):
        if "acf" not in side:
            side["acf"] = acf_features(side["patches"])
        extra = side["acf"]
        n_plain = len(RINGS_PX) * 5
        if which == "acf-diff":  # only each inner region's value minus the outer ring's
            extra = extra[:, n_plain:]
        elif which == "acf-ring":  # only the values in the rings, no differences
            extra = extra[:, :n_plain]
        elif which == "acf-scan":  # the values in the rings less their median over the source's rows (its scanner's own texture)
            plain = extra[:, :n_plain]
            extra = np.concatenate([plain, plain - medians_by(side["source"], plain)], axis=1)
        elif which != "acf":
            raise SystemExit(f"unknown feature set {which!r}")
        return np.concatenate([base, extra], axis=1)
    raise SystemExit(f"unknown feature set {which!r}")


def fold_config(folder: Path, overrides: dict | None = None) -> tuple[dict, dict]:
    """A rows folder's ``fold.json`` and its run's resolved stage config (then ``overrides``)."""
    info = json.loads((folder / "fold.json").read_text())
    return info, {**tv.VERIFIER_DEFAULTS, **json.loads((ROOT / info["run"] / "config.json").read_text()), **(overrides or {})}


def held_out_measures(score: np.ndarray, threshold: float, te: dict) -> dict:
    """The held-out rows ``te`` scored ``score`` (1 - P(genuine), or another stage score), at the
    training rows' ``threshold``: what the module's docstring lists."""
    from sklearn.metrics import roc_auc_score

    y, clean = te["y"], te["clean"]
    neg, pos = y == 0, y > 0

    def auc(m):
        return round(float(roc_auc_score(m[m | neg], score[m | neg])), 4)

    lesion, centre = lesions_and_injected_centres(te)
    n_clean_scans = len(set(te["source"][clean].tolist())) or 1
    return {"auc_injected": auc(y == 1), "auc_removed": auc(y == 2), "threshold": threshold,
            "over_highest_clean": round(float((score[pos] > score[clean].max(initial=0.0)).mean()), 3),
            "edits_over_threshold": round(float((score[pos] >= threshold).mean()), 3),
            "clean_over_threshold_per_scan": round(float((score[clean] >= threshold).sum() / n_clean_scans), 3),
            "held_out_lesion_scores": sorted(round(float(v), 3) for v in score[lesion]),
            "real_lesions_over_threshold": int((score[lesion] >= threshold).sum()),
            "injected_centres_over_threshold": round(float((score[centre] >= threshold).mean()), 3),
            "injected_centres_over_highest_lesion": round(float((score[centre] > score[lesion].max(initial=0.0)).mean()), 3)}


def measure(cfg: dict, fold: dict, which: str) -> dict:
    tr, te = fold["train"], fold["test"]
    xtr, xte = columns(tr, cfg, which), columns(te, cfg, which)
    t0 = time.time()
    oof = tv.out_of_patient_scores({**cfg, "verifier_blend": 0.0}, tr["x"], xtr, tr["y"], tr["group"], folds=5)
    threshold = tv.choose_threshold(oof, tr["clean"], tr["sources"], float(cfg["verifier_max_false"]))
    clf = tv.boosting_classifier(cfg).fit(xtr, tr["y"])
    score = 1.0 - clf.predict_proba(xte)[:, list(clf.classes_).index(0)]
    lesion_tr, centre_tr = lesions_and_injected_centres(tr)
    return {"features": which, "columns": int(xtr.shape[1]), **held_out_measures(score, threshold, te),
            "training_lesion_rows": int(lesion_tr.sum()), "training_injected_centres": int(centre_tr.sum()),
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folds", nargs="+")
    ap.add_argument("--features", default="base,acf")
    ap.add_argument("--out", default=None, help="a JSON file for the results")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a stage setting for the trees (as in the config; e.g. verifier_depth=6), after the fold's own")
    a = ap.parse_args()
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    results = []
    for folder in map(Path, a.folds):
        info, cfg = fold_config(folder, overrides)
        fold = load_fold(folder)
        print(f"{folder}: train {len(fold['train']['y'])} rows, held out {len(fold['test']['y'])}", flush=True)
        for which in a.features.split(","):
            r = {"fold": info["fold"], **overrides, **measure(cfg, fold, which)}
            print(json.dumps(r), flush=True)
            results.append(r)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
