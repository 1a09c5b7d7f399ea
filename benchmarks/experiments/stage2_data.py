"""Rows for the second stage: native-resolution features at places and at the networks' candidates.

Usage:
    python benchmarks/experiments/stage2_data.py [--cv runs/cv] [--all runs/tamper3d] [--out runs/stage2] [--workers 2]

For every real scan of configs/tamper3d.yaml:
- "eval" rows: exactly the held-out edits, untouched places and scans of cross_validate.py (same
  seeds), scored by the network of the fold that holds the patient out;
- "train" rows: fresh edits (seeds 700,000+) of the same families, scored by every network that
  trained on the patient (the folds that keep it, and the all-patient run).
And "train" rows of 4 varied phantoms (seeds 7000+), scored by every network.
Each row: the place, what it is, :func:`ctguard.verifier.place_features`, and each network's
probabilities there; candidates are each network's findings at 0.3 (at most 40 a scan).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

TRAIN_SEED = 700_000
MAX_CANDIDATES = 40


def nets_for(patient: str | None, folds: list[dict]) -> list[str]:
    keep = [f"fold{k}" for k, f in enumerate(folds) if patient not in f["held_out"]]
    return keep + ["all"]


def job(args: tuple) -> str:
    import cross_validate as cv

    from ctguard.lung import lung_depth, lung_mask
    from ctguard.screen import load_detector, score_locations, screen_volume
    from ctguard.tamper.simulate import variants, varied_phantom_source
    from ctguard.verifier import place_features, scan_noise

    kind, key, cv_dir, all_dir, out_dir, cfg_path = args
    cfg = cv.api.load_config(cfg_path)
    by_patient = cv.patient_scans(cfg)
    paths = {f"fold{k}": Path(cv_dir) / f"fold{k}/model.pt" for k in range(len(cv.FOLDS))} | {"all": Path(all_dir) / "model.pt"}
    dets = {}

    def det(name):
        if name not in dets:
            dets[name] = load_detector(str(paths[name]))
        return dets[name]

    plans = []  # (split, source, seed, counts, nets, neg_rng, fold_out)
    if kind == "real":
        patient, j = key
        entry = by_patient[patient][j]
        src = cv.sources_of([entry])[0]
        k = next(k for k, f in enumerate(cv.FOLDS) if patient in f["held_out"])
        i = [(p, jj) for p in cv.FOLDS[k]["held_out"] for jj in range(len(by_patient[p]))].index((patient, j))
        plans.append(("eval", cv.EVAL_SEED + 1000 * k + i, dict(inject=4, remove=len(src.tumours), healthy=2), [f"fold{k}"],
                      np.random.default_rng([cv.EVAL_SEED, k, i]), k))
        g = sorted(by_patient).index(patient) * 10 + j
        plans.append(("train", TRAIN_SEED + g, dict(inject=2, remove=min(len(src.tumours), 3), healthy=2), nets_for(patient, cv.FOLDS),
                      np.random.default_rng([TRAIN_SEED, g]), None))
        name = f"{patient}-{j}"
    else:
        src = varied_phantom_source(7000 + key, opacities=int(cfg.get("phantom_opacities") or 0))
        plans.append(("train", TRAIN_SEED + 500 + key, dict(inject=2, remove=len(src.tumours), healthy=2), nets_for(None, cv.FOLDS),
                      np.random.default_rng([TRAIN_SEED, 500 + key]), None))
        name = f"phantom{key}"
    lungs = lung_mask(src.volume)
    depth = lung_depth(src.volume, lungs)
    rows = []
    for split, seed, counts, nets, rng, fold_out in plans:
        for v, (label, vol, edits) in enumerate(variants(src, seed, per_scan=2, inject_families=("drawn", "moved"),
                                                         remove_families=("fill", "clone"), **counts)):
            noise = scan_noise(vol, lungs)
            if edits:
                where = [(e.kind, np.asarray(e.voxel, float), e.extra.get("family"), e.diameter_mm) for e in edits]
            else:
                where = [(w, p, None, None) for w, p in cv.negatives(src, lungs, depth, rng)]
            base = {"source": name, "patient": src.patient, "split": split, "fold_out": fold_out, "variant": v, "label": label,
                    "noise": [round(n, 3) for n in noise]}
            feats = [place_features(vol, p, noise) for _, p, _, _ in where]
            probs = {n: score_locations(vol, det(n), np.asarray([p for _, p, _, _ in where], float)) for n in nets}
            for q, (what, p, fam, diam) in enumerate(where):
                rows.append({**base, "what": what, "family": fam, "voxel": [round(float(x), 1) for x in p], "candidate": None,
                             "f": [round(float(x), 4) for x in feats[q]], "p": {n: [round(float(x), 4) for x in probs[n][q]] for n in nets}})
            for n in nets:
                result, _, _ = screen_volume(vol, det(n), threshold=0.3)
                for f in result["findings"][:MAX_CANDIDATES]:
                    fv = np.asarray(f["voxel"], float)
                    near = [e for e in edits if cv._near(f, e.voxel, e.diameter_mm, vol)]
                    if near:
                        what, fam = near[0].kind, near[0].extra.get("family")
                        right = any(e.kind == f["kind"] for e in near)
                    else:
                        lesion = any(cv._near(f, t.voxel, t.diameter_mm, vol) for t in src.tumours)
                        what, fam, right = ("real lesion" if lesion else "untouched"), None, None
                    rows.append({**base, "what": what, "family": fam, "voxel": [round(float(x), 1) for x in fv],
                                 "candidate": {"net": n, "score": f["score"], "kind": f["kind"], "right_kind": right},
                                 "f": [round(float(x), 4) for x in place_features(vol, fv, noise)],
                                 "p": {n: [round(1 - f["p_injected"] - f["p_removed"], 4), f["p_injected"], f["p_removed"]]}})
            print(f"{name} {split} {v} {label}: {len(rows)} rows", flush=True)
    out = Path(out_dir) / f"{name}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    ap.add_argument("--cv", default=str(ROOT / "runs/cv"))
    ap.add_argument("--all", default=str(ROOT / "runs/tamper3d"))
    ap.add_argument("--out", default=str(ROOT / "runs/stage2"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--phantoms", type=int, default=4)
    args = ap.parse_args()
    import cross_validate as cv

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    by_patient = cv.patient_scans(cv.api.load_config(args.config))
    todo = [("real", (p, j)) for p in by_patient for j in range(len(by_patient[p]))] + [("phantom", k) for k in range(args.phantoms)]
    todo = [t for t in todo if not (out / (f"{t[1][0]}-{t[1][1]}" if t[0] == "real" else f"phantom{t[1]}")).with_suffix(".jsonl").is_file()]
    with ProcessPoolExecutor(args.workers) as pool:
        for path in pool.map(job, [(kind, key, args.cv, args.all, str(out), args.config) for kind, key in todo]):
            print("wrote", path, flush=True)


if __name__ == "__main__":
    main()
