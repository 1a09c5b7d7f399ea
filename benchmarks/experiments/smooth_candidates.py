"""Would candidates where the lung is smoother than around it find the small in-paintings the recipe misses?

Usage:
    python benchmarks/experiments/smooth_candidates.py RUNS POLICIES OUT [--folds 0,1,2,3] [--n 20]
    python benchmarks/experiments/smooth_candidates.py --summary POLICIES OUT [--json FILE]

An in-painting that fills a place (and a drawn nodule, whose own texture is the simulator's) has
less fine texture than the lung around it. :func:`smooth_map` reads that over the whole lungs on
cells of 4 mm: the in-plane residual (a 3x3 mean subtracted, clipped at 6 times the scan's noise)
squared and summed per cell, then for each cell the log of its 10-22 mm ring's mean over its own
6 mm square's (lung cells only). Its strongest maxima, 12 mm apart and not within 4 mm of the
recipe's candidates (the network's 40 from 0.3 and the trace's 20 peaks), are scored once by each
fold's stage on the same held-out copies as ``candidate_policies.py`` (whose OUT is POLICIES here,
same order of copies) and written to ``OUT/foldK.json``. ``--summary`` reads both and prints edits
found and false findings on the clean held-out scans for the recipe plus the first n of these.
The package's :func:`ctguard.verifier.smooth_map` (``verifier_smooth_peaks``) is the same map read
in the trace map's pass, one slice in every 2 mm; this script reads every slice, as it was measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks/experiments"))

from candidate_policies import RECIPE, screened_copies, taken  # noqa: E402

from ctguard.engine.train_verifier import near  # noqa: E402
from ctguard.screen import stage_candidates, trace_candidates, verify_findings  # noqa: E402
from ctguard.verifier import TRACE_CLIP  # noqa: E402

CELL_MM, INNER_MM, OUTER_MM = 4.0, 6.0, 22.0


def smooth_map(vol, lungs: np.ndarray, noise_xy: float) -> tuple[np.ndarray, np.ndarray]:
    """``(score, centres)`` over the lung cells: log of the ring's mean squared fine residual over the cell's own."""
    spacing = np.asarray(vol.spacing, float)
    b = np.maximum(np.rint(CELL_MM / spacing).astype(int), 1)
    pts = np.argwhere(lungs)
    lo = pts.min(0)
    n = (pts.max(0) + 1 - lo) // b
    box = tuple(slice(int(a), int(a + k * s)) for a, k, s in zip(lo, n, b))
    hu = vol.hu[box].astype(np.float32)
    clip = TRACE_CLIP * max(float(noise_xy), 1e-3)
    e = np.clip(hu - ndimage.uniform_filter(hu, (1, 3, 3), mode="nearest"), -clip, clip) ** 2
    shape6 = (n[0], b[0], n[1], b[1], n[2], b[2])
    energy = e.reshape(shape6).sum(axis=(1, 3, 5), dtype=np.float64)
    lung = lungs[box].reshape(shape6).sum(axis=(1, 3, 5)) > 0.5 * np.prod(b)
    energy = energy * lung

    def window(mm: float) -> tuple[int, ...]:
        return tuple(int(max(2 * round(mm / (s * k)) + 1, 1)) for s, k in zip(spacing, b))

    win_in, win_out = window(INNER_MM), window(OUTER_MM)
    v_in, v_out = float(np.prod(win_in)), float(np.prod(win_out))
    e_in, n_in = ndimage.uniform_filter(energy, win_in, mode="constant") * v_in, ndimage.uniform_filter(lung * 1.0, win_in, mode="constant") * v_in
    e_out, n_out = ndimage.uniform_filter(energy, win_out, mode="constant") * v_out, ndimage.uniform_filter(lung * 1.0, win_out, mode="constant") * v_out
    inner = e_in / np.maximum(n_in, 1e-9)
    ring = (e_out - e_in) / np.maximum(n_out - n_in, 1e-9)
    keep = lung & (n_in >= 0.5 * v_in) & (n_out - n_in >= 0.3 * (v_out - v_in))
    score = np.log((ring + 1e-6) / (inner + 1e-6))
    cz, cy, cx = np.nonzero(keep)
    centres = np.stack([lo[0] + cz * b[0] + b[0] / 2.0, lo[1] + cy * b[1] + b[1] / 2.0, lo[2] + cx * b[2] + b[2] / 2.0], axis=1)
    return score[keep].astype(np.float32), centres.astype(float)


def collect(runs: Path, out: Path, folds: list[int], n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for k in folds:
        rows = []
        for v, src, label, vol, edits, _, heat, lungs, reading in screened_copies(runs, k):
            recipe = stage_candidates(heat, vol, v, 1.0, lungs, reading.noise, reading.trace)
            cands = trace_candidates(heat, vol, lungs, n, recipe, trace=smooth_map(vol, lungs, reading.noise[0]))
            for r, f in enumerate(cands):
                f["rank"] = r
            scored = []
            for f in verify_findings(vol, lungs, cands, v, reading.noise, reading.reference):
                at = [j for j, e in enumerate(edits) if near(f["voxel"], e.voxel, e.diameter_mm, vol.spacing)]
                scored.append({"source": "smooth", "rank": f["rank"], "network": f["network_score"], "score": f["score"], "kind": f["kind"],
                               "at": at, "at_kind": [j for j in at if edits[j].kind == f["kind"]]})
            rows.append({"patient": src.patient, "scan": src.name, "label": label, "candidates": scored})
            print(f"fold {k}: {src.patient} {label}: {len(edits)} edits, {len(cands)} smooth peaks, "
                  f"at edits {sum(bool(c['at_kind']) for c in scored)}", flush=True)
        (out / f"fold{k}.json").write_text(json.dumps(rows) + "\n")


def summary(policies: Path, out: Path, json_path: str | None) -> None:
    report = []
    for n_smooth in (0, 5, 10, 20, 40):
        found = edits = false = clean = 0
        small = small_found = 0
        for p in sorted(out.glob("fold*.json")):
            base, extra = json.loads((policies / p.name).read_text()), json.loads(p.read_text())
            for copy, more in zip(base, extra):
                assert copy["patient"] == more["patient"] and copy["label"] == more["label"]
                thr = copy["threshold"]
                cands = taken(copy, *RECIPE) + sorted(more["candidates"], key=lambda c: c["rank"])[:n_smooth]
                if copy["edits"]:
                    for j, e in enumerate(copy["edits"]):
                        hit = max((c["score"] for c in cands if j in c["at_kind"]), default=0.0) >= thr
                        found += hit
                        edits += 1
                        if e["diameter_mm"] < 15:
                            small += 1
                            small_found += hit
                else:
                    clean += 1
                    false += sum(c["score"] >= thr for c in cands)
        report.append({"smooth_peaks": n_smooth, "edits_found": found, "edits": edits, "under_15mm_found": small_found, "under_15mm": small,
                       "false_findings": false, "clean_scans": clean})
        print(json.dumps(report[-1]))
    if json_path:
        how = f"python benchmarks/experiments/smooth_candidates.py RUNS {policies} {out}, then --summary {policies} {out}"
        Path(json_path).write_text(json.dumps({"how": how, "rows": report}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--folds", default="0,1,2,3")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.summary and len(a.paths) == 2:
        summary(Path(a.paths[0]), Path(a.paths[1]), a.json)
    elif len(a.paths) == 3:
        collect(Path(a.paths[0]), Path(a.paths[2]), [int(k) for k in a.folds.split(",")], a.n)
    else:
        ap.error("give RUNS POLICIES OUT, or --summary POLICIES OUT")


if __name__ == "__main__":
    main()
