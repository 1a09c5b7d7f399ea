"""How much of the second stage's score is lost because the network's candidate sits a few
millimetres off the edit, and what an image-based re-centring of the candidate would win back.

Usage:
    python benchmarks/experiments/stage2_refine.py --run runs/cv/fold2 --fold 2 [--scan 0]

For one held-out scan of a cross-validation fold (the fold's own detector, with its second stage),
the held-out edits of benchmarks/cross_validate.py (same seeds) are screened; for every edit it
prints the stage's score at the edit's centre, at the nearest network candidate, and at that
candidate re-centred on the image (the densest point within 10 mm for an injection, the point whose
fine texture is weakest within 10 mm for a removal, each scored with the candidate's own network
probabilities); then the same for the candidates on the untouched scan, whose scores are false
findings. The stage was not trained on re-centred candidates: this measures the headroom, not a
recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cross_validate import EVAL_SEED, FOLDS, patient_scans, sources_of  # noqa: E402

from ctguard import api  # noqa: E402
from ctguard.lung import lung_mask  # noqa: E402
from ctguard.screen import finding_probabilities, load_detector, score_locations, screen_volume, stage_probabilities  # noqa: E402
from ctguard.tamper.simulate import variants  # noqa: E402
from ctguard.verifier import recentred  # noqa: E402


def stage_scores(det, vol, lungs, places: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return 1.0 - stage_probabilities(vol, det, places, probs, lungs)[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a fold's run folder (model.pt with its model.verifier.npz)")
    ap.add_argument("--fold", type=int, required=True)
    ap.add_argument("--scan", type=int, default=0, help="which of the fold's held-out scans")
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    a = ap.parse_args()
    det = load_detector(str(Path(a.run) / "model.pt"))
    by_patient = patient_scans(api.load_config(a.config))
    src = [s for p in FOLDS[a.fold]["held_out"] for s in sources_of(by_patient[p])][a.scan]
    lungs = lung_mask(src.volume)
    sp = np.asarray(src.volume.spacing)
    print(f"{src.patient}: threshold {det.threshold}")
    for _, vol, edits in variants(src, EVAL_SEED + 1000 * a.fold + a.scan, inject=4, remove=len(src.tumours), per_scan=2,
                                  inject_families=("drawn", "moved"), remove_families=("fill", "clone"), healthy=2):
        result, _, _ = screen_volume(vol, det, threshold=0.0, stage2=False)
        cands = result["findings"][:40]
        at = np.asarray([f["voxel"] for f in cands], float)
        probs = finding_probabilities(cands)
        if not edits:
            moved = np.concatenate([at, *np.stack([recentred(vol, v) for v in at], axis=1)])  # as found, densest, smoothest
            s = stage_scores(det, vol, lungs, moved, np.concatenate([probs] * 3)).reshape(3, -1)
            print("untouched scan, top candidates: as found", np.round(np.sort(s[0])[::-1][:5], 3),
                  "| best of the three places", np.round(np.sort(s.max(0))[::-1][:5], 3))
            continue
        centres = np.asarray([e.voxel for e in edits], float)
        at_centre = stage_scores(det, vol, lungs, centres, score_locations(vol, det, centres, stage2=False))
        for e, sc in zip(edits, at_centre):
            j = int(np.argmin([np.linalg.norm((v - e.voxel) * sp) for v in at]))
            d = float(np.linalg.norm((at[j] - e.voxel) * sp))
            moved = np.vstack([at[j : j + 1], recentred(vol, at[j])])
            s = stage_scores(det, vol, lungs, moved, np.repeat(probs[j : j + 1], 3, 0))
            print(f"{e.kind} {e.extra.get('family')} over {e.extra.get('target', 'lung')}: at its centre {sc:.3f}; "
                  f"nearest candidate {d:.1f} mm off {s[0]:.3f}; re-centred as injection {s[1]:.3f}, as removal {s[2]:.3f}")


if __name__ == "__main__":
    main()
