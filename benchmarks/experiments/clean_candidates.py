"""Where the candidates that set a run's second-stage threshold lie.

Usage:
    python benchmarks/experiments/clean_candidates.py RUN [--top 8] [--json OUT.json]

For a trained run (its ``config.json``, ``model.pt`` and ``verifier_rows/``), scores every stage row
out of patient as the fit does, takes the untouched training scans' highest candidates (the ones
that set the threshold) and finds each one's place again: the network's candidates on that source's
untouched copy, in the order its rows were made. For each it prints the source, the score, the
voxel and its distance to the source's nearest known lesion (a real tumour, or a phantom's own
drawn nodule) and that lesion's diameter. A candidate within 10 mm of a lesion's rim is on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ctguard.engine.train3d import build_source
from ctguard.engine.train_verifier import joined_rows, out_of_patient_scores, run_rows, tree_columns
from ctguard.screen import load_detector, screen_volume
from ctguard.verifier import finite_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args()
    run = Path(a.run)
    cfg, specs, parts = run_rows(run)
    x, y, groups, clean = joined_rows(parts)
    source = np.concatenate([[k] * len(p["y"]) for k, p in enumerate(parts)])
    within = np.concatenate([np.cumsum(p["clean"]) - 1 for p in parts])  # a clean row's index among its source's candidates
    _, columns = tree_columns(cfg)
    oof = out_of_patient_scores(cfg, x, finite_rows(x[:, columns]), y, groups)
    rows = np.flatnonzero(clean)
    top = rows[np.argsort(-oof[rows], kind="stable")[: a.top]]
    det = load_detector(run / "model.pt")
    found_by_source: dict[int, list] = {}
    out = []
    for i in top:
        k = int(source[i])
        src = build_source(cfg, specs[k])
        if k not in found_by_source:
            result, _, _ = screen_volume(src.volume, det, threshold=float(cfg["verifier_candidate_threshold"]), stage2=False)
            found_by_source[k] = result["findings"][: int(cfg["verifier_max_candidates"])]
        f = found_by_source[k][int(within[i])]
        voxel = np.asarray(f["voxel"], float)
        sp = np.asarray(src.volume.spacing)
        lesions = [(float(np.linalg.norm((voxel - np.asarray(t.voxel)) * sp)), float(t.diameter_mm)) for t in src.tumours]
        dist, diam = min(lesions) if lesions else (None, None)
        entry = {"group": str(groups[i]), "source": specs[k][0] + " " + Path(str(specs[k][1])).name[-24:], "score": round(float(oof[i]), 4),
                 "network": f.get("kind"), "network_score": round(float(f["score"]), 3), "voxel": [round(v, 1) for v in voxel.tolist()],
                 "lesion_mm": None if dist is None else round(dist, 1), "lesion_diameter_mm": diam,
                 "on_lesion": dist is not None and dist <= 10 + diam / 2}
        out.append(entry)
        print(json.dumps(entry), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
