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
from ctguard.engine.train_verifier import near, out_of_patient_scores, run_rows, stage_table, tree_columns
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
    x, y, groups, clean = stage_table(cfg, parts)
    source = np.concatenate([[k] * len(p["y"]) for k, p in enumerate(parts)])
    within = np.concatenate([np.cumsum(p["clean"]) - 1 for p in parts])  # a clean row's index among its source's candidates
    _, columns = tree_columns(cfg)
    oof = out_of_patient_scores(cfg, x, finite_rows(x[:, columns]), y, groups)
    rows = np.flatnonzero(clean)
    top = rows[np.argsort(-oof[rows], kind="stable")[: a.top]]
    det = load_detector(run / "model.pt")
    seen: dict[int, tuple] = {}  # each source built and screened once: its candidates as its rows were made
    out = []
    for i in top:
        k = int(source[i])
        if k not in seen:
            src = build_source(cfg, specs[k])
            result, _, _ = screen_volume(src.volume, det, threshold=float(cfg["verifier_candidate_threshold"]), stage2=False)
            seen[k] = src, result["findings"][: int(cfg["verifier_max_candidates"])]
        src, found = seen[k]
        f = found[int(within[i])]
        voxel = np.asarray(f["voxel"], float)
        sp = np.asarray(src.volume.spacing)
        dists = [float(np.linalg.norm((voxel - np.asarray(t.voxel)) * sp)) for t in src.tumours]
        lesion, dist = (src.tumours[int(np.argmin(dists))], min(dists)) if dists else (None, None)
        entry = {"group": str(groups[i]), "source": specs[k][0] + " " + Path(str(specs[k][1])).name[-24:], "score": round(float(oof[i]), 4),
                 "network": f.get("kind"), "network_score": round(float(f["score"]), 3), "voxel": [round(v, 1) for v in voxel.tolist()],
                 "lesion_mm": None if dist is None else round(dist, 1), "lesion_diameter_mm": None if lesion is None else float(lesion.diameter_mm),
                 "on_lesion": lesion is not None and near(voxel, lesion.voxel, lesion.diameter_mm, sp)}
        out.append(entry)
        print(json.dumps(entry), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
