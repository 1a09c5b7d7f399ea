"""Would candidates at small compact blobs let a fold's stage find the small injections it misses?

Usage:
    python benchmarks/experiments/blob_candidates.py RUNS OUT [--folds 0,1,2,3] [--n 20]
    python benchmarks/experiments/blob_candidates.py --summary OUT [--json FILE]

Of the edits the recipe misses, most are drawn injections under 15 mm that no candidate lies at
(the network's 8 mm cells do not rank them). This takes, on the same held-out copies as
``cross_validate.py`` (the same seeds) and with each fold's own stage (``RUNS/foldK``), the
strongest local maxima of a small-blob map over the lungs (:func:`blob_map`: the scale-normalised
negative Laplacian of Gaussian at 2 and 3 mm, on a grid of about 2 mm, where the Hessian is
negative in all three directions and the weakest curvature is at least a third of the strongest,
so that a vessel's tube is not a blob), ``--n`` of them not within one cell of the recipe's own
candidates (taken as screening takes the maps' peaks, :func:`ctguard.screen.peak_candidates`), and scores each once with the stage as screening scores its candidates. It writes per
copy the recipe's own screening (found or not per edit, at the fold's threshold) and each blob
candidate's score and which edit it lies at (``OUT/foldK.json``). ``--summary`` then counts, pooled
over the folds at each fold's own threshold: edits found by the recipe, by the recipe with the
first 5, 10 and 20 blob candidates, and the blob candidates over the threshold on the clean copies
(false findings) and on the untouched real lesions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "experiments"))

import cross_validate as cv  # noqa: E402
from candidate_policies import cli, screened_copies, tally, write_report  # noqa: E402

from ctguard.engine.train_verifier import near  # noqa: E402
from ctguard.screen import peak_candidates, stage_candidates, verify_findings  # noqa: E402

GRID_MM = 2.0
SCALES_MM = (2.0, 3.0)


def blob_map(vol, lungs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The small-blob map's strongest maxima over the lungs, ``(score, centres)`` as the trace's map
    gives them (:func:`ctguard.screen.peak_candidates` takes its ``n`` strongest 12 mm apart)."""
    spacing = np.asarray(vol.spacing, float)
    step = np.maximum(np.rint(GRID_MM / spacing).astype(int), 1)
    hu = vol.hu[:: step[0], :: step[1], :: step[2]].astype(np.float32)
    lung = lungs[:: step[0], :: step[1], :: step[2]]
    grid = spacing * step
    best = np.full(hu.shape, -np.inf, np.float32)
    hessians = []
    for s in SCALES_MM:
        sigma = s / grid
        d = {}
        for a in range(3):
            for b in range(a, 3):
                order = [0, 0, 0]
                order[a] += 1
                order[b] += 1
                d[a, b] = ndimage.gaussian_filter(hu, sigma, order=order, mode="nearest") / (grid[a] * grid[b])
        hessians.append(d)
        log = np.where(lung, -(s**2) * (d[0, 0] + d[1, 1] + d[2, 2]), -np.inf).astype(np.float32)
        best = np.maximum(best, log)
    peaks = (best == ndimage.maximum_filter(best, size=3)) & np.isfinite(best) & (best > 0)
    cells = np.argwhere(peaks)
    keep = np.zeros(len(cells), bool)
    for d, s in zip(hessians, SCALES_MM):  # a blob at either scale: all three curvatures down, the weakest a third of the strongest
        at = tuple(cells.T)
        h = np.stack([np.stack([d[min(a, b), max(a, b)][at] for b in range(3)], -1) for a in range(3)], -2)
        ev = np.linalg.eigvalsh(h)
        keep |= (ev[:, 2] < 0) & (ev[:, 2] / np.minimum(ev[:, 0], -1e-6) >= 1.0 / 3.0)
    score, centres = best[peaks][keep], cells[keep] * step + (step - 1) / 2.0
    top = np.argsort(-score, kind="stable")[: 50 * max(n, 1)]  # the strongest: enough for n peaks 12 mm apart
    return score[top], centres[top]


def collect(runs: Path, out: Path, folds: list[int], n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for k in folds:
        rows = []
        for v, src, label, vol, edits, result, heat, lungs, reading in screened_copies(runs, k):
            thr = float(v.meta["threshold"])
            recipe = stage_candidates(heat, vol, v, 1.0, lungs, reading.noise, reading.trace, reading.smooth)
            cands = [{**f, "rank": r} for r, f in enumerate(peak_candidates(heat, vol, blob_map(vol, lungs, n), n, recipe))]
            scored = verify_findings(vol, lungs, cands, v, reading.noise, reading.reference) if cands else []
            lesions = [] if edits else src.tumours
            rows.append({"patient": src.patient, "label": label, "threshold": thr,
                         "edits": [{"kind": e.kind, "family": e.extra.get("family"), "diameter_mm": round(float(e.diameter_mm), 1)} for e in edits],
                         "recipe_found": [cv.best_at(result["findings"], e.kind, e.voxel, e.diameter_mm, vol) >= thr for e in edits],
                         "blobs": [{"rank": f["rank"], "score": f["score"], "kind": f["kind"],
                                    "at_kind": [j for j, e in enumerate(edits) if e.kind == f["kind"] and near(f["voxel"], e.voxel, e.diameter_mm, vol.spacing)],
                                    "at_lesion": any(near(f["voxel"], t.voxel, t.diameter_mm, vol.spacing) for t in lesions)} for f in scored]})
            print(f"fold {k}: {src.patient} {label}: {len(edits)} edits, {len(cands)} blob candidates, "
                  f"over the threshold {sum(f['score'] >= thr for f in scored)}", flush=True)
        (out / f"fold{k}.json").write_text(json.dumps(rows) + "\n")


def summary(out: Path, json_path: str | None) -> None:
    folds = {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("fold*.json"))}
    copies = [copy for rows in folds.values() for copy in rows]
    report = {"folds": sorted(folds)}
    for n in (0, 5, 10, 20):
        def over(copy: dict) -> list[dict]:
            return [b for b in copy["blobs"] if b["rank"] < n and b["score"] >= copy["threshold"]]

        report[f"blobs_{n}"] = {**tally(copies, lambda copy, j: copy["recipe_found"][j] or any(j in b["at_kind"] for b in over(copy)),
                                        lambda copy: sum(not b["at_lesion"] for b in over(copy))),
                                "lesions_called_injected": sum(b["at_lesion"] and b["kind"] == "injected"
                                                               for copy in copies if not copy["edits"] for b in over(copy))}
    missed, clean = [], []
    for copy in copies:  # the recipe's misses that a blob candidate of their kind lies at, and the clean copies' blob scores
        for j, e in enumerate(copy["edits"]):
            at = [b["score"] for b in copy["blobs"] if j in b["at_kind"]]
            if not copy["recipe_found"][j] and at:
                missed.append({"score": max(at), "threshold": copy["threshold"], "patient": copy["patient"], **e})
        if not copy["edits"]:
            clean += [b["score"] for b in copy["blobs"]]
    report["missed_by_the_recipe"] = sum(not f for copy in copies for f in copy["recipe_found"])
    report["missed_with_a_blob_candidate_of_their_kind"] = sorted(missed, key=lambda m: -m["score"])
    report["clean_copies_blob_scores"] = {"n": len(clean), "max": max(clean, default=None),
                                          "p99": round(float(np.percentile(clean, 99)), 4) if clean else None}
    write_report(report, json_path)


def main() -> None:
    cli(__doc__, lambda runs, out, folds, a: collect(runs, out, folds, a.n), summary,
        extra=[("--n", {"type": int, "default": 20, "help": "blob candidates a copy"})])


if __name__ == "__main__":
    main()
