"""Candidates from the resampling trace's map over the whole lungs, beside the network's, on a fold's held-out copies.

Usage:
    python benchmarks/experiments/trace_candidates.py FOLD RUN [--config configs/tamper3d.yaml] --out FILE.npz [--peaks 40]

RUN is the fold's run (its network and second stage, e.g. runs/rvq/fold2). The fold's held-out
patients are edited as cross_validate.py edits them (the same seeds). For every copy (untouched ones
too) two candidate sets are kept, each scored by the fold's stage:
- the screening's own (the network's candidates, capped and re-scored as ``screen_volume`` does);
- the ``--peaks`` strongest local maxima (12 mm apart) of :func:`ctguard.verifier.trace_map` over
  the lungs, each with the network's probabilities of its cell, its map score and its rank.
Each candidate notes the edit (or the real lesion of an untouched copy) it lies near. Whether
adding the trace's peaks to the network's candidates finds edits the network's cells miss, at
what cost in false findings, is then a matter of reading the file.
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
from ctguard.screen import STRIDE, _result, heatmap, load_detector  # noqa: E402
from ctguard.verifier import TRACE_BLOCK_MM, scan_noise, trace_map  # noqa: E402

NMS_MM = 12.0


def trace_peaks(vol, lungs, noise_xy: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` strongest local maxima of the trace map, ``NMS_MM`` apart: ``(voxels (k, 3), scores (k,))``,
    scores less the map's median over the lungs."""
    found = trace_map(vol, lungs, noise_xy)
    if found is None:
        return np.zeros((0, 3)), np.zeros(0)
    score, centres = found
    score = score - np.median(score)
    # Local maxima on the cells' grid: a cell whose score is the highest within one cell's reach.
    spacing = np.asarray(vol.spacing, float)
    mm = centres * spacing
    order = np.argsort(-score)
    kept: list[int] = []
    for k in order:
        if len(kept) == n:
            break
        if all(np.linalg.norm(mm[k] - mm[j]) >= NMS_MM for j in kept):
            kept.append(int(k))
    return centres[kept], score[kept]


def network_at(heat, places: np.ndarray) -> np.ndarray:
    """The network's probabilities ``(n, 3)`` at the cells holding ``places`` (voxels)."""
    lo = np.array([s.start for s in heat.box], float)
    cell = np.floor((places - lo) * np.asarray(heat.spacing) / STRIDE).astype(int)
    cell = np.clip(cell, 0, np.asarray(heat.probs.shape[1:]) - 1)
    return heat.probs[:, cell[:, 0], cell[:, 1], cell[:, 2]].T.astype(float)


def main() -> None:
    ap = cv.fold_run_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the table (.npz) and beside it the edits' (.json)")
    ap.add_argument("--peaks", type=int, default=40)
    args = ap.parse_args()
    _, _, held = cv.fold_of(args)
    det = load_detector(str(Path(args.run) / "model.pt"))
    stage = det.verifier
    cols: dict[str, list] = {k: [] for k in ("copy", "clean", "source", "rank", "trace", "p", "edit", "lesion")}
    edits_out, copies = [], 0
    for i, src, label, vol, edits in cv.held_out_copies(held, args.fold):
        lungs = lung_mask(vol)
        heat = heatmap(vol, det, lungs)
        result = _result(vol, det, heat, 0.3, "", [], 0.0, lungs, stage)
        net = result["findings"] + result["under_threshold"]
        noise = scan_noise(vol, lungs)
        at, tr = trace_peaks(vol, lungs, noise[0], args.peaks)
        p_tr = stage.score_places(vol, at, network_at(heat, at), lungs, candidates=True) if len(at) else np.zeros((0, 3))
        for e in edits:
            edits_out.append({"copy": copies, "patient": src.patient, "kind": e.kind, "family": e.extra.get("family"),
                              "target": e.extra.get("target", "lung"), "diameter_mm": round(e.diameter_mm, 1)})
        first_edit = len(edits_out) - len(edits)
        rows = [(0, k, np.nan, np.array([1 - f["score"], f["p_injected"], f["p_removed"]]), np.asarray(f["voxel"], float))
                for k, f in enumerate(net)]
        rows += [(1, k, float(t), pk, a) for k, (a, t, pk) in enumerate(zip(at, tr, p_tr))]
        for source, rank, t, p, v in rows:
            f = {"voxel": v}
            hit = next((j for j, e in enumerate(edits) if cv._near(f, e.voxel, e.diameter_mm, vol)), None)
            cols["copy"].append(copies)
            cols["clean"].append(not edits)
            cols["source"].append(source)
            cols["rank"].append(rank)
            cols["trace"].append(t)
            cols["p"].append(p)
            cols["edit"].append(-1 if hit is None else first_edit + hit)
            cols["lesion"].append(not edits and any(cv._near(f, tt.voxel, tt.diameter_mm, vol) for tt in src.tumours))
        print(f"copy {copies} ({src.patient}, {label}): {len(edits)} edits, {len(net)} network and {len(at)} trace candidates", flush=True)
        copies += 1
    out = Path(args.out)
    np.savez_compressed(out, **{k: np.asarray(v) for k, v in cols.items()}, threshold=det.threshold, copies=copies,
                        block_mm=TRACE_BLOCK_MM)
    out.with_suffix(".json").write_text(json.dumps(edits_out, indent=1) + "\n")
    print(f"wrote {out} ({len(cols['copy'])} candidates, {len(edits_out)} edits, {copies} copies)")


if __name__ == "__main__":
    main()
