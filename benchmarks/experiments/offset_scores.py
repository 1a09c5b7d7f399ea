"""How steep the second stage is around each held-out edit of a fold: its score for the edit's own
kind at the edit's centre and at offsets around it.

Usage:
    python benchmarks/experiments/offset_scores.py FOLD MODEL [PATIENT,PATIENT ...]

For each edit of the fold's held-out copies (``benchmarks/cross_validate.py``'s, the same seeds),
the detector ``MODEL`` (a fold's ``model.pt``) scores the edit's centre, four places 3, 6 and 9 mm
off it in-plane and one slice above and below it, as ``cross_validate.py`` scores places (the
network's cell there, then the stage); a score is 0 where the stage calls the place the other kind.
Screening's candidates (the network's 8 mm cells, the maps' peaks 12 mm apart) rarely fall on an
edit's centre: where the score falls steeply off it, an edit the stage knows at its centre is missed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cross_validate as cv  # noqa: E402

from ctguard import api  # noqa: E402
from ctguard.screen import load_detector, score_locations, stage_probabilities  # noqa: E402

OFFSETS_MM = (3, 6, 9)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    fold, model = int(sys.argv[1]), sys.argv[2]
    patients = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
    _, held = cv.split_fold(cv.patient_scans(api.load_config("configs/tamper3d.yaml")), fold)
    det = load_detector(model)
    for _, src, _, vol, edits, lungs, _ in cv.held_out_places(held, fold):
        if not edits or (patients and src.patient not in patients):
            continue
        sp = np.asarray(vol.spacing, float)
        for e in edits:
            offs = [(0.0, 0.0, 0.0)] + [(0.0, dy / sp[1], dx / sp[2]) for r in OFFSETS_MM for dy, dx in ((r, 0), (-r, 0), (0, r), (0, -r))]
            offs += [(-1.0, 0.0, 0.0), (1.0, 0.0, 0.0)]
            at = np.clip(np.asarray(e.voxel, float) + np.asarray(offs), 0, np.asarray(vol.shape) - 1)
            p = stage_probabilities(vol, det, at, score_locations(vol, det, at, stage2=False), lungs)
            k = 1 if e.kind == "injected" else 2
            own = np.where(p[:, k] >= p[:, 3 - k], p[:, 1] + p[:, 2], 0.0)
            rings = " | ".join(f"{r} mm " + " ".join(f"{v:.2f}" for v in own[1 + 4 * j: 5 + 4 * j]) for j, r in enumerate(OFFSETS_MM))
            print(f"{src.patient} {e.kind} {e.extra.get('family')} {e.diameter_mm:.1f} mm: centre {own[0]:.2f} | {rings} | "
                  f"slice -1/+1 {own[-2]:.2f} {own[-1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
