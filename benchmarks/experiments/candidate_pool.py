"""Every network candidate of a fold's held-out copies, with no cap, scored by the fold's second stage.

Usage:
    python benchmarks/experiments/candidate_pool.py FOLD RUN [--config configs/tamper3d.yaml] --out FILE.npz [--refine-from 0.2]

RUN is the fold's run of benchmarks/cross_validate.py (its network and second stage). The fold's
held-out patients are edited as cross_validate.py edits them (the same seeds). For every copy
(untouched ones too), every local maximum of the network's map from 0.3 (``findings_from``, in the
network's order) is kept, not only the first ``max_candidates``: its network probabilities, its
resampling trace less the scan's (NaN where the pixel spacing leaves no ripple), the stage's row
and probabilities, and which edit (or real lesion of an untouched copy) it lies near. Candidates
whose stage score reaches ``--refine-from`` are also scored at their two re-centred places
(``ctguard.verifier.recentred``: the densest and the smoothest point within 10 mm), each as a place
of its own. What cap, order or re-scoring would find more edits at what cost in false findings is
then a matter of reading the file (``candidate_rules.py``, ``stage_variants.py``), with no
screening again.
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
from ctguard.screen import findings_from, heatmap, load_detector  # noqa: E402
from ctguard.verifier import recentred, resampling_trace, scan_noise, scan_trace  # noqa: E402

KINDS = {"injected": 1, "removed": 2}


def main() -> None:
    ap = cv.fold_run_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the candidates' table (.npz) and beside it the edits' (.json)")
    ap.add_argument("--refine-from", type=float, default=0.2, help="stage score from which a candidate is also scored at its re-centred places")
    args = ap.parse_args()
    _, _, held = cv.fold_of(args)
    det = load_detector(str(Path(args.run) / "model.pt"))
    stage = det.verifier
    cols: dict[str, list] = {k: [] for k in ("copy", "clean", "rank", "p_net", "trace", "x", "p_stage", "edit", "lesion",
                                             "p_dense", "p_smooth")}
    edits_out, copies = [], 0
    for i, src, label, vol, edits in cv.held_out_copies(held, args.fold):
        lungs = lung_mask(vol)
        noise = scan_noise(vol, lungs)
        ref = scan_trace(vol, lungs, noise[0])
        cands = findings_from(heatmap(vol, det, lungs), vol, 0.3)
        for e in edits:
            edits_out.append({"copy": copies, "patient": src.patient, "kind": e.kind, "family": e.extra.get("family"),
                              "diameter_mm": round(e.diameter_mm, 1)})
        first_edit = len(edits_out) - len(edits)
        if cands:
            at = np.asarray([c["voxel"] for c in cands], float)
            p_net = np.asarray([[1.0 - c["p_injected"] - c["p_removed"], c["p_injected"], c["p_removed"]] for c in cands])
            x = stage.rows(vol, at, p_net, noise, lungs)
            p = stage.probabilities(x)
            score = 1.0 - p[:, 0]
            dense = np.full((len(cands), 3), np.nan)
            smooth = np.full((len(cands), 3), np.nan)
            for k in np.flatnonzero(score >= args.refine_from):
                two = recentred(vol, at[k])
                q = stage.score_places(vol, two, np.repeat(p_net[k : k + 1], 2, 0), lungs)
                dense[k], smooth[k] = q
            for k, c in enumerate(cands):
                hit = next((j for j, e in enumerate(edits) if cv._near(c, e.voxel, e.diameter_mm, vol)), None)
                cols["copy"].append(copies)
                cols["clean"].append(not edits)
                cols["rank"].append(k)
                cols["p_net"].append(p_net[k])
                cols["trace"].append(resampling_trace(vol, at[k], noise[0]) - ref)
                cols["x"].append(x[k])
                cols["p_stage"].append(p[k])
                cols["edit"].append(-1 if hit is None else first_edit + hit)
                cols["lesion"].append(not edits and any(cv._near(c, t.voxel, t.diameter_mm, vol) for t in src.tumours))
                cols["p_dense"].append(dense[k])
                cols["p_smooth"].append(smooth[k])
        print(f"copy {copies} ({src.patient}, {label}): {len(edits)} edits, {len(cands)} candidates", flush=True)
        copies += 1
    out = Path(args.out)
    np.savez_compressed(out, **{k: np.asarray(v) for k, v in cols.items()}, threshold=det.threshold,
                        cap=int(stage.meta.get("max_candidates", 40)), copies=copies)
    out.with_suffix(".json").write_text(json.dumps(edits_out, indent=1) + "\n")
    print(f"wrote {out} ({len(cols['copy'])} candidates, {len(edits_out)} edits, {copies} copies)")


if __name__ == "__main__":
    main()
