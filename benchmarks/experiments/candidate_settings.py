"""Other candidate settings at screening, with a fold's own network and second stage: edits found
and false findings on the fold's held-out scans when the network's local maxima are kept further
or closer apart (non-maximum suppression) and more or fewer of them go to the second stage (the
cap). Evaluation only: the stage's rows and threshold stay as trained.

Usage:
    python benchmarks/experiments/candidate_settings.py FOLD RUN [--config configs/tamper3d.yaml] [--out FILE] [--limit N]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cross_validate as cv  # noqa: E402

from ctguard.lung import lung_mask  # noqa: E402
from ctguard.screen import NMS_MM, findings_from, heatmap, load_detector, verify_findings  # noqa: E402

SETTINGS = [(NMS_MM, 40), (16.0, 40), (12.0, 40), (NMS_MM, 80), (12.0, 80)]  # (NMS mm, cap); the first is screening's own


def main() -> None:
    ap = cv.fold_run_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--limit", type=int, default=None, help="only the first N copies of the held-out scans (a quick look)")
    args = ap.parse_args()
    _, _, held = cv.fold_of(args)
    det = load_detector(str(Path(args.run) / "model.pt"))
    thr = det.threshold
    res = {s: {"found": 0, "edits": 0, "false": [], "candidates": []} for s in SETTINGS}
    copies = 0
    for _, _, _, vol, edits in cv.held_out_copies(held, args.fold):
        copies += 1
        if args.limit is not None and copies > args.limit:
            break
        lungs = lung_mask(vol)
        heat = heatmap(vol, det, lungs)
        for nms, cap in SETTINGS:
            candidates = findings_from(heat, vol, 0.3, nms_mm=nms)[:cap]
            hits = [f for f in verify_findings(vol, lungs, candidates, det.verifier) if f["score"] >= thr]
            r = res[(nms, cap)]
            r["candidates"].append(len(candidates))
            if not edits:
                r["false"].append(len(hits))
            for e in edits:
                r["edits"] += 1
                r["found"] += any(f["kind"] == e.kind and cv._near(f, e.voxel, e.diameter_mm, vol) for f in hits)
    out = [{"nms_mm": nms, "cap": cap, "edits_found": f"{r['found']}/{r['edits']}", "clean_scans": len(r["false"]),
            "false_findings_per_clean_scan": round(sum(r["false"]) / max(len(r["false"]), 1), 3),
            "median_candidates": float(np.median(r["candidates"]))} for (nms, cap), r in res.items()]
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"fold": args.fold, "threshold": thr, "settings": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
