"""Candidates from the resampling trace's map over the whole lungs, beside the network's, on a fold's held-out copies.

Usage:
    python benchmarks/experiments/trace_candidates.py FOLD RUN [--config configs/tamper3d.yaml] --out FILE.npz [--peaks 40]
    python benchmarks/experiments/trace_candidates.py --summary FILE.npz [FILE.npz ...] [--json OUT.json]

RUN is the fold's run (its network and second stage, e.g. runs/rvq/fold2). The fold's held-out
patients are edited as cross_validate.py edits them (the same seeds). For every copy (untouched ones
too) two candidate sets are kept, each scored by the fold's stage:
- the screening's own (the network's candidates, capped and re-scored as ``screen_volume`` does);
- the ``--peaks`` strongest local maxima of the resampling trace's map over the lungs
  (:func:`ctguard.verifier.trace_peaks`, 12 mm apart, none left out for being at one of the
  network's candidates), each with the network's probabilities of its cell and its rank.
Each candidate notes the edit (or the real lesion of an untouched copy) it lies near. Whether
adding the trace's peaks to the network's candidates finds edits the network's cells miss, at
what cost in false findings, is then a matter of reading the file: ``--summary`` reads the folds'
files (each at its stage's threshold) and counts, for the first 0, 5, 10, 20 and 40 peaks added to
the screening's candidates, the edits found with their right kind, the false findings on the
untouched copies and the real lesions called injected, pooled over the files.
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
from ctguard.screen import heatmap, load_detector, stage_candidates, verify_findings  # noqa: E402
from ctguard.verifier import scan_noise, trace_peaks  # noqa: E402

def summary(paths: list[str], out: str | None) -> None:
    """For each number of peaks added, the edits found, false findings and lesions called injected, pooled over ``paths``."""
    table = {}
    for n in (0, 5, 10, 20, 40):
        counts = {"found": 0, "edits": 0, "false": 0, "clean_copies": 0, "lesions_injected": 0}
        for path in paths:
            z = dict(np.load(path))
            edits = json.loads(Path(path).with_suffix(".json").read_text())
            score = 1 - z["p"][:, 0]
            kind = np.where(z["p"][:, 1] >= z["p"][:, 2], 1, 2)
            over = ((z["source"] == 0) | ((z["source"] == 1) & (z["rank"] < n))) & (score >= float(z["threshold"]))
            counts["found"] += sum(bool(np.any(over & (z["edit"] == j) & (kind == (1 if e["kind"] == "injected" else 2))))
                                   for j, e in enumerate(edits))
            counts["edits"] += len(edits)
            counts["false"] += int((over & z["clean"]).sum())
            counts["clean_copies"] += len(np.unique(z["copy"][z["clean"]]))
            counts["lesions_injected"] += int((over & z["lesion"] & (kind == 1)).sum())
        table[n] = counts
        print(f"the network's candidates and the trace's first {n} peaks: {json.dumps(counts)}")
    if out:
        Path(out).write_text(json.dumps({"files": [Path(p).name for p in paths], "by_peaks": table}, indent=1) + "\n")


def main() -> None:
    if sys.argv[1:2] == ["--summary"]:
        rest = sys.argv[2:]
        out = rest[rest.index("--json") + 1] if "--json" in rest else None
        return summary([p for p in rest if p.endswith(".npz")], out)
    ap = cv.fold_run_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the table (.npz) and beside it the edits' (.json)")
    ap.add_argument("--peaks", type=int, default=40)
    args = ap.parse_args()
    _, _, held = cv.fold_of(args)
    det = load_detector(str(Path(args.run) / "model.pt"))
    stage = det.verifier
    cols: dict[str, list] = {k: [] for k in ("copy", "clean", "source", "rank", "p", "edit", "lesion")}
    edits_out, copies = [], 0
    for i, src, label, vol, edits in cv.held_out_copies(held, args.fold):
        lungs = lung_mask(vol)
        heat = heatmap(vol, det, lungs)
        reading = stage.read_scan(vol, lungs)  # every candidate the screening scores, each on its own (not merged into findings)
        net = verify_findings(vol, lungs, stage_candidates(heat, vol, stage, 0.3, lungs, reading.noise, reading.trace, reading.smooth),
                              stage, reading.noise, reading.reference)
        noise = scan_noise(vol, lungs)
        at = trace_peaks(vol, lungs, noise[0], args.peaks)
        p_tr = stage.score_places(vol, at, heat.probabilities_at(at), lungs, candidates=True) if len(at) else np.zeros((0, 3))
        for e in edits:
            edits_out.append({"copy": copies, "patient": src.patient, "kind": e.kind, "family": e.extra.get("family"),
                              "target": e.extra.get("target", "lung"), "diameter_mm": round(e.diameter_mm, 1)})
        first_edit = len(edits_out) - len(edits)
        rows = [(0, k, np.array([1 - f["score"], f["p_injected"], f["p_removed"]]), np.asarray(f["voxel"], float))
                for k, f in enumerate(net)]
        rows += [(1, k, pk, a) for k, (a, pk) in enumerate(zip(at, p_tr))]
        for source, rank, p, v in rows:
            f = {"voxel": v}
            hit = next((j for j, e in enumerate(edits) if cv._near(f, e.voxel, e.diameter_mm, vol)), None)
            cols["copy"].append(copies)
            cols["clean"].append(not edits)
            cols["source"].append(source)
            cols["rank"].append(rank)
            cols["p"].append(p)
            cols["edit"].append(-1 if hit is None else first_edit + hit)
            cols["lesion"].append(not edits and any(cv._near(f, tt.voxel, tt.diameter_mm, vol) for tt in src.tumours))
        print(f"copy {copies} ({src.patient}, {label}): {len(edits)} edits, {len(net)} network and {len(at)} trace candidates", flush=True)
        copies += 1
    out = Path(args.out)
    np.savez_compressed(out, **{k: np.asarray(v) for k, v in cols.items()}, threshold=det.threshold, copies=copies)
    out.with_suffix(".json").write_text(json.dumps(edits_out, indent=1) + "\n")
    print(f"wrote {out} ({len(cols['copy'])} candidates, {len(edits_out)} edits, {copies} copies)")


if __name__ == "__main__":
    main()
