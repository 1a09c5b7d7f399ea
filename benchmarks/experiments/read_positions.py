"""Where the second stage reads a candidate: at the network's place, or at one of the two places it
re-centres on (the densest point and the point of weakest fine texture within 10 mm).

Usage:
    python benchmarks/experiments/read_positions.py FOLD RUN [--config configs/tamper3d.yaml] [--out FILE]

RUN is the fold's run of benchmarks/cross_validate.py (e.g. runs/cv/fold2). Its held-out copies are
edited as cross_validate.py edits them; the network's candidates (from 0.3, at most the stage's cap)
are scored by the run's stage three times: with the row made at the candidate (as screening does),
at its densest point and at its smoothest point (each a row of its own, with its own re-centred
places). For every rule (the candidate; the best of the three) it prints, at each threshold, the
edits found with their right kind and the clean held-out copies with a finding (a real lesion's
copy too), so two rules can be compared at the same false findings on held-out scans. The trees are
the run's, fitted on rows made at the network's places only.
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
from ctguard.screen import finding_probabilities, heatmap, load_detector, stage_candidates  # noqa: E402
from ctguard.verifier import with_recentred  # noqa: E402

RULES = ("candidate", "dense", "smooth", "best of three")
THRESHOLDS = (0.9, 0.93, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.995)


def main() -> None:
    ap = cv.fold_run_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write every copy's candidates and scores here (JSON)")
    args = ap.parse_args()
    _, _, held = cv.fold_of(args)
    det = load_detector(str(Path(args.run) / "model.pt"))
    copies = []
    for _, src, label, vol, edits in cv.held_out_copies(held, args.fold):
        lungs = lung_mask(vol)
        cands = stage_candidates(heatmap(vol, det, lungs), vol, det.verifier)  # as screening gives them to the stage
        candidates = []
        if cands:
            at = np.asarray([f["voxel"] for f in cands], float)
            three = with_recentred(vol, at, threads=2)  # each candidate, its densest, its smoothest point
            p_net = np.repeat(finding_probabilities(cands), 3, axis=0)
            p = det.verifier.score_places(vol, three, p_net, lungs, candidates=True).reshape(len(cands), 3, 3)
            offsets = np.linalg.norm((three.reshape(-1, 3, 3)[:, 1:] - at[:, None]) * np.asarray(vol.spacing), axis=-1)
            candidates = [{"p": np.round(pk, 4).tolist(), "offset_mm": np.round(o, 1).tolist()} for pk, o in zip(p, offsets)]
        edit_rows = [{"kind": e.kind, "family": e.extra.get("family"), "diameter_mm": round(e.diameter_mm, 1),
                      "near": [k for k, f in enumerate(cands) if cv._near(f, e.voxel, e.diameter_mm, vol)]} for e in edits]
        copies.append({"patient": src.patient, "label": label, "edits": edit_rows, "candidates": candidates})
        print(f"{src.patient} {label}: {len(cands)} candidates, {len(edits)} edits", flush=True)
    table = summarise(copies)
    print(json.dumps(table, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"fold": args.fold, "threshold": det.threshold, "summary": table, "copies": copies}) + "\n")


def rule_scores(c: dict, rule: str) -> tuple[float, str]:
    """A candidate's score and kind under ``rule``."""
    p = np.asarray(c["p"])
    rows = {"candidate": [0], "dense": [1], "smooth": [2], "best of three": [0, 1, 2]}[rule]
    j = max(rows, key=lambda r: 1.0 - p[r, 0])
    return float(1.0 - p[j, 0]), "injected" if p[j, 1] >= p[j, 2] else "removed"


def summarise(copies: list[dict]) -> dict:
    """For every rule and threshold: edits found with their kind and clean copies flagged."""
    out = {}
    for rule in RULES:
        scored = [[rule_scores(f, rule) for f in c["candidates"]] for c in copies]  # once a rule, for every threshold
        per_t = {}
        for t in THRESHOLDS:
            found = total = flagged = clean = 0
            for c, s in zip(copies, scored):
                if c["edits"]:
                    total += len(c["edits"])
                    found += sum(any(s[k][0] >= t and s[k][1] == e["kind"] for k in e["near"]) for e in c["edits"])
                else:
                    clean += 1
                    flagged += any(v >= t for v, _ in s)
            per_t[str(t)] = {"found": f"{found}/{total}", "clean_flagged": f"{flagged}/{clean}"}
        out[rule] = per_t
    return out


if __name__ == "__main__":
    main()
