"""Where a fold's held-out edits get lost between the network and the finding.

Usage:
    python benchmarks/experiments/where_edits_are_lost.py FOLD RUN [--config configs/tamper3d.yaml] [--out FILE] [--limit N]

RUN is the fold's run of benchmarks/cross_validate.py (its network and second stage, e.g.
runs/cv/fold0). The fold's held-out patients are edited exactly as cross_validate.py edits them
(the same seeds); for each edit: the network and the second stage scored at the edit's own centre,
the network's candidates near it (local maxima from 0.3, their rank before the cap of 40), and the
second stage's score at that candidate. The counts at the end say how many edits the network gives
no candidate for, how many only past the cap, and how many the second stage scores under the
threshold at the candidate though it would score them over it at the centre.
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
from ctguard.screen import findings_from, heatmap, load_detector, score_locations, stage_probabilities, verify_findings  # noqa: E402


def main() -> None:
    ap = cv.fold_run_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write every edit's row here (JSON)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N copies of the held-out scans (a quick look)")
    args = ap.parse_args()
    _, _, held = cv.fold_of(args)
    det = load_detector(str(Path(args.run) / "model.pt"))
    cap = int(det.verifier.meta.get("max_candidates", 40))
    thr = det.threshold
    rows, copies = [], 0
    for _, src, _, vol, edits in cv.held_out_copies(held, args.fold):
        if not edits:
            continue
        copies += 1
        if args.limit is not None and copies > args.limit:
            break
        lungs = lung_mask(vol)
        candidates = findings_from(heatmap(vol, det, lungs), vol, 0.3)
        scored = verify_findings(vol, lungs, candidates[:cap], det.verifier)
        at = np.asarray([e.voxel for e in edits], float)
        p_net = score_locations(vol, det, at, stage2=False)
        p_stage = stage_probabilities(vol, det, at, p_net, lungs)
        for e, pn, ps in zip(edits, p_net, p_stage):
            rank = next((r for r, c in enumerate(candidates) if cv._near(c, e.voxel, e.diameter_mm, vol)), None)
            best = max((f for f in scored if cv._near(f, e.voxel, e.diameter_mm, vol)), key=lambda f: f["score"], default=None)
            rows.append({"patient": src.patient, "kind": e.kind, "family": e.extra.get("family"), "diameter_mm": round(e.diameter_mm, 1),
                         "network_at_centre": round(float(pn[1] + pn[2]), 4), "stage_at_centre": round(float(ps[1] + ps[2]), 4),
                         "stage_kind_at_centre": "injected" if ps[1] >= ps[2] else "removed",
                         "candidates": len(candidates), "candidate_rank": rank,
                         "stage_at_candidate": None if best is None else best["score"], "stage_kind_at_candidate": None if best is None else best["kind"]})
    n = len(rows)
    at_centre = [r for r in rows if r["stage_at_centre"] >= thr and r["stage_kind_at_centre"] == r["kind"]]
    found = [r for r in rows if (r["stage_at_candidate"] or 0.0) >= thr and r["stage_kind_at_candidate"] == r["kind"]]
    none = [r for r in rows if r["candidate_rank"] is None]
    past_cap = [r for r in rows if r["candidate_rank"] is not None and r["candidate_rank"] >= cap]
    low = [r for r in rows if r["candidate_rank"] is not None and r["candidate_rank"] < cap and r not in found]
    summary = {"fold": args.fold, "threshold": thr, "edits": n, "found": len(found),
               "stage_over_threshold_at_the_centre": len(at_centre),
               "no_candidate_near": len(none), "of_which_network_under_0.3_at_the_centre": sum(r["network_at_centre"] < 0.3 for r in none),
               "candidate_only_past_the_cap": len(past_cap),
               "candidate_in_the_cap_not_found": len(low), "of_which_over_threshold_at_the_centre": sum(r in at_centre for r in low)}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "edits": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
