"""Where each held-out edit of a cross-validation fold is lost, on the fold's own detector.

Usage:
    python benchmarks/experiments/where_lost.py FOLD MODEL [--config configs/tamper3d.yaml] [--out OUT.json]

For every edit of the fold's held-out copies (``benchmarks/cross_validate.py``'s, same seeds), one of:
found (as the cross-validation counts it: a finding of its kind near it, listed at the detector's own
thresholds); a candidate of any source near it that the stage scores under its threshold; no maximum of the network's map from 0.3 near it; a maximum
there, but suppressed by the network's 24 mm non-maximum suppression; or past the cap of the
network's candidates. Beside it, the edit's rank among the blob map's peaks, strongest first
(:func:`ctguard.verifier.blob_map`, the map a stage with ``blob_peaks`` takes candidates from), and
on the untouched copies the same rank of each real lesion: how far candidates at blobs reach.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cross_validate as cv  # noqa: E402
from ctguard import api  # noqa: E402
from ctguard.engine.train_verifier import near  # noqa: E402
from ctguard.screen import findings_from, load_detector, scored_places, screen_volume, source_thresholds  # noqa: E402
from ctguard.verifier import blob_map  # noqa: E402


def blob_places(vol, lungs: np.ndarray) -> np.ndarray:
    """Voxels of the blob map's peaks in the lungs (:func:`ctguard.verifier.blob_map`), strongest first."""
    found = blob_map(vol, lungs)
    if found is None:
        return np.zeros((0, 3))
    score, centres = found
    return centres[np.argsort(-score, kind="stable")]


def first_near(places, voxel, diameter_mm: float, spacing) -> int | None:
    return next((k for k, p in enumerate(places) if near(p, voxel, diameter_mm, spacing)), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fold", type=int)
    ap.add_argument("model")
    ap.add_argument("--config", default="configs/tamper3d.yaml")
    ap.add_argument("--out")
    a = ap.parse_args()
    _, held = cv.split_fold(cv.patient_scans(api.load_config(a.config)), a.fold)
    det = load_detector(a.model)
    thresholds = source_thresholds(det)
    rows = []
    for _, src, _, vol, edits, lungs, _ in cv.held_out_places(held, a.fold):
        blobs = blob_places(vol, lungs)
        if not edits:
            rows += [{"lesion": True, "diameter_mm": round(t.diameter_mm, 1), "blob_rank": first_near(blobs, t.voxel, t.diameter_mm, vol.spacing)}
                     for t in src.tumours]
            continue
        result, heat, _ = screen_volume(vol, det, threshold=0.0)  # every place the stage scores, and the network's map
        maxima = [f["voxel"] for f in findings_from(heat, vol, 0.3, nms_mm=0.1)]
        kept = [f["voxel"] for f in findings_from(heat, vol, 0.3)]
        places = scored_places(result["findings"])
        listed = cv.listed_findings(result["findings"], vol.spacing, thresholds)  # as screening lists them at the detector's own
        for e in edits:
            close = [p for p in places if near(p["voxel"], e.voxel, e.diameter_mm, vol.spacing)]
            if cv.over_at(listed, e.kind, e.voxel, e.diameter_mm, vol):  # found, as the cross-validation counts it
                why = "found"
            elif close:
                why = "candidate, scored under"
            elif first_near(maxima, e.voxel, e.diameter_mm, vol.spacing) is None:
                why = "no network maximum from 0.3"
            elif first_near(kept, e.voxel, e.diameter_mm, vol.spacing) is None:
                why = "suppressed by the 24 mm NMS"
            else:
                why = "past the cap"
            rows.append({"patient": src.patient, "kind": e.kind, "family": e.extra.get("family"), "diameter_mm": round(e.diameter_mm, 1),
                         "why": why, "blob_rank": first_near(blobs, e.voxel, e.diameter_mm, vol.spacing)})
            print(rows[-1], flush=True)
    print(dict(Counter(r["why"] for r in rows if "why" in r)))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
