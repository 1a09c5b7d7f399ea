"""Held-out quality of the 2D tamper detector, one slice at a time.

Usage: python benchmarks/eval_tamper2d.py [--model PATH] [--threshold T] [--phantoms 6] [--out FILE]

The same held-out sources as eval_tamper3d.py (both series of A0002 with their real tumours, and
phantoms of seeds 5000+), the same simulated edits. For each edit, the axial slice through its
centre is screened alone; for each clean scan, 4 random lung slices and every real tumour's slice.
Measures the location AUC (p_tampered at the edit vs at untouched places on clean slices), edits
found at the right place and of the right kind, and false findings per clean slice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ctguard.errors import InputError
from ctguard.lung import lung_mask
from ctguard.screen import load_detector2d, score_locations_2d, screen_slice
from ctguard.tamper.simulate import phantom_source, variants
from ctguard.volume import Volume
from eval_tamper3d import patient_sources  # benchmarks/ is the script's folder, so on sys.path



def one_slice(vol: Volume, z: int) -> Volume:
    return Volume(vol.hu[z : z + 1].copy(), (1.0, *vol.spacing[1:]), meta={"kind": "dicom-file", "warnings": []})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--phantoms", type=int, default=6)
    ap.add_argument("--threshold", type=float, default=None, help="the operating threshold (default: the model card's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    det = load_detector2d(args.model)
    if args.threshold is not None:
        det.threshold = args.threshold
    sources = patient_sources("A0002")
    sources += [phantom_source(5000 + k) for k in range(args.phantoms)]
    pos = {"injected": [], "removed": []}
    neg, found, clean_slices, false_findings, no_lungs = [], {"injected": [0, 0], "removed": [0, 0]}, 0, 0, 0
    for i, src in enumerate(sources):
        rng = np.random.default_rng([321, i])
        lungs = lung_mask(src.volume)
        for label, vol, edits in variants(src, 900_000 + i, inject=2, remove=len(src.tumours), per_scan=2):
            if label in ("TB", "TM"):
                zs = [int(z) for z in rng.choice(np.nonzero(lungs.sum((1, 2)) > 0.3 * lungs.sum((1, 2)).max())[0], 4, replace=False)]
                zs += [int(round(t.voxel[0])) for t in src.tumours]
                for z in zs:
                    s = one_slice(vol, z)
                    try:
                        result, _, sl = screen_slice(s, det)
                    except InputError:  # the 2D lung mask found under 10 cm^2 of lung here
                        no_lungs += 1
                        continue
                    clean_slices += 1
                    false_findings += len(result["findings"])
                    pts = np.argwhere(sl[0])
                    places = [(0, *pts[j]) for j in rng.integers(len(pts), size=3)]
                    places += [(0, *t.voxel[1:]) for t in src.tumours if int(round(t.voxel[0])) == z]
                    neg += list(score_locations_2d(s, det, np.asarray(places, float))[:, 1:].sum(1))
            else:
                for e in edits:
                    z = int(round(e.voxel[0]))
                    s = one_slice(vol, z)
                    p = score_locations_2d(s, det, np.asarray([(0, *e.voxel[1:])], float))[0]
                    pos[e.kind].append(float(p[1:].sum()))
                    try:
                        result, _, _ = screen_slice(s, det)
                    except InputError:
                        no_lungs += 1
                        result = {"findings": []}
                    hit = any(np.hypot(*((np.asarray(f["voxel"][1:]) - e.voxel[1:]) * np.asarray(vol.spacing[1:]))) <= 10 + e.diameter_mm / 2
                              and f["kind"] == e.kind for f in result["findings"])
                    found[e.kind][0] += hit
                    found[e.kind][1] += 1
    report = {
        "model": det.path, "holdout": "A0002 + phantoms 5000+", "threshold": det.threshold,
        "auc_injected": round(roc_auc_score([1] * len(pos["injected"]) + [0] * len(neg), pos["injected"] + neg), 4),
        "auc_removed": round(roc_auc_score([1] * len(pos["removed"]) + [0] * len(neg), pos["removed"] + neg), 4) if pos["removed"] else None,
        "n_injected": len(pos["injected"]), "n_removed": len(pos["removed"]), "n_negatives": len(neg),
        "edits_found_right_kind": {k: f"{v[0]}/{v[1]}" for k, v in found.items()},
        "false_findings_per_clean_slice": round(false_findings / max(clean_slices, 1), 3), "clean_slices": clean_slices,
        "slices_refused_no_lungs": no_lungs,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
