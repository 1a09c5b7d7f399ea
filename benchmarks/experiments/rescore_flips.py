"""Experiment (negative): does re-scoring each candidate with flipped copies separate real edits from
false findings better than the whole-scan heatmap does?

Usage: python benchmarks/experiments/rescore_flips.py [--phantoms 4] [--model PATH]

Screens A0002's two series (held out) and N varied phantoms (seeds 5000+), clean and tampered as in
eval_tamper3d.py. Each finding on a clean scan (>= 0.5) is a negative; each edit is a positive,
scored by the best finding within 10 mm + its radius (0 when none). Every one is then re-scored from
a 64 mm cube around it: as is, and averaged over the 16 flips and in-plane transposes the detector
was trained with. Prints ROC AUC of edits vs clean findings and the false findings left at the
threshold that keeps the heatmap's number of edits found.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval_tamper3d import patient_sources  # noqa: E402

from ctguard.screen import STRIDE, load_detector, screen_volume  # noqa: E402
from ctguard.tamper.cube import cut  # noqa: E402
from ctguard.tamper.simulate import variants, varied_phantom_source  # noqa: E402


def rescore(vol, det, loc, cube_mm: int = 64) -> tuple[float, float]:
    """p_tampered of the central 2x2x2 cells of a cube around ``loc``: as is, and over 16 flips."""
    cube = cut(vol, np.asarray(loc, float), cube_mm // 2).hu[:cube_mm, :cube_mm, :cube_mm]
    mid = cube_mm // STRIDE // 2
    centre = (slice(None),) + (slice(mid - 1, mid + 1),) * 3
    p_genuine = []
    for k in range(4):
        for axes in itertools.combinations((0, 1, 2), k):
            for transpose in (False, True):
                c = np.flip(cube, axes) if axes else cube
                c = c.transpose(0, 2, 1) if transpose else c
                p = det.probabilities(np.ascontiguousarray(c))
                p = p.transpose(0, 1, 3, 2) if transpose else p
                p = np.flip(p, tuple(a + 1 for a in axes)) if axes else p
                p_genuine.append(p[centre][0].mean())
    return 1.0 - p_genuine[0], 1.0 - float(np.mean(p_genuine))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--phantoms", type=int, default=4)
    args = ap.parse_args()
    det = load_detector(args.model)
    sources = patient_sources("A0002")
    sources += [varied_phantom_source(5000 + k) for k in range(args.phantoms)]
    pos, neg = [], []  # (heatmap score, cube score, flip-averaged score)
    for i, src in enumerate(sources):
        for label, vol, edits in variants(src, 900_000 + i, inject=2, remove=len(src.tumours), per_scan=2):
            result, _, _ = screen_volume(vol, det, threshold=0.5)
            if label in ("TB", "TM"):
                neg += [(f["score"],) + rescore(vol, det, f["voxel"]) for f in result["findings"]]
                continue
            for e in edits:
                near = [f for f in result["findings"]
                        if np.linalg.norm((np.asarray(f["voxel"]) - e.voxel) * np.asarray(vol.spacing)) <= 10 + e.diameter_mm / 2]
                best = max(near, key=lambda f: f["score"], default=None)
                pos.append((best["score"] if best else 0.0,) + rescore(vol, det, best["voxel"] if best else e.voxel))
    pos, neg = np.array(pos), np.array(neg)
    keep = int((pos[:, 0] >= det.threshold).sum())
    print(f"{len(pos)} edits, {len(neg)} findings on clean scans; heatmap at {det.threshold}: {keep} edits found")
    for j, name in enumerate(("heatmap", "64 mm cube", "cube, 16 flips averaged")):
        auc = roc_auc_score([1] * len(pos) + [0] * len(neg), np.r_[pos[:, j], neg[:, j]])
        thr = np.sort(pos[:, j])[::-1][max(keep, 1) - 1]
        print(f"{name}: AUC edits vs clean findings {auc:.3f}; at {thr:.3f} ({keep} edits found): "
              f"{int((neg[:, j] >= thr).sum())} clean findings left")


if __name__ == "__main__":
    main()
