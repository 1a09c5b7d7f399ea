"""Held-out quality of a 3D tamper detector on simulated data (location and scan level).

Usage:
    python benchmarks/eval_tamper3d.py [--model PATH] [--threshold T] [--holdout A0002|A0001|lung1|lung2[,...]] [--phantoms N] [--varied [--opacities N]] [--out FILE]

Held-out sources: both series of the held-out patient (with their real tumours) and N phantoms
whose seeds were never used in training (5000+); with ``--varied`` each phantom has its own random
scanner set-up (slice spacing, pixel size, noise, kernel: ``ctguard.tamper.simulate.acquisition``). For each source it simulates 2 injected scans
(2 nodules each) and 1 removal per real tumour, with seeds unused in training, then measures:
- location level: ROC AUC of p_tampered at edit centres against untouched places (10 random lung
  places per control scan and every untouched real tumour), for injections and removals apart;
- scan level: every tampered scan flagged? false findings per clean (control) scan.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ctguard import io
from ctguard.lung import lung_mask
from ctguard.screen import load_detector, score_locations, screen_volume
from ctguard.tamper.simulate import Source, phantom_source, tumours_from, varied_phantom_source, variants

SHARED = Path(__file__).resolve().parents[2] / "shared/data/lung-pet-ct-dx"
EXTRA = Path(__file__).resolve().parents[1] / "runs/extra-ct"  # benchmarks/fetch_extra_ct.py writes it
PATIENTS = {
    "A0001": ["Lung_Dx-A0001/04-04-2007-NA-Chest-07990/2.000000-5mm-40805", "Lung_Dx-A0001/04-04-2007-NA-Chest-07990/3.000000-5mm-41315"],
    "A0002": ["Lung_Dx-A0002/04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834/2.000000-ThoraxRoutine  8.0.0  B70f-62919",
              "Lung_Dx-A0002/04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834/3.000000-ThoraxRoutine  8.0.0  B40f-10983"],
}
EXTRA_PATIENTS = ("lung1", "lung2")  # PyRadiomics' two test chest CTs, each with a tumour label map


def patient_sources(patient: str) -> list[Source]:
    """A patient's scans with their known tumours: Lung-PET-CT-Dx's from ../shared/data, the extra
    ones from runs/extra-ct."""
    if patient in EXTRA_PATIENTS:
        scan = EXTRA / f"{patient}_image.nrrd"
        if not scan.is_file():
            raise SystemExit(f"{scan}: not there; run python benchmarks/fetch_extra_ct.py first")
        vol = io.read(scan)
        return [Source(scan.name, vol, patient, tumours_from(vol, EXTRA / f"{patient}_label.nrrd"))]
    out = []
    for rel in PATIENTS[patient]:
        vol = io.read(SHARED / "Lung-PET-CT-Dx" / rel)
        out.append(Source(rel, vol, patient, tumours_from(vol, SHARED / "annotations")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--holdout", default="A0002", help="held-out patients, comma-separated: A0001, A0002, lung1, lung2 (default: A0002)")
    ap.add_argument("--phantoms", type=int, default=6)
    ap.add_argument("--varied", action="store_true", help="phantoms under random scanner set-ups")
    ap.add_argument("--opacities", type=int, default=0, help="with --varied: up to N genuine hazy patches per phantom")
    ap.add_argument("--threshold", type=float, default=None, help="the operating threshold (default: the model card's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    det = load_detector(args.model)
    if args.threshold is not None:
        det.threshold = args.threshold
    holdout = args.holdout.split(",")
    if unknown := [p for p in holdout if p not in (*PATIENTS, *EXTRA_PATIENTS)]:
        ap.error(f"unknown patients {unknown}: choose from {sorted(PATIENTS) + list(EXTRA_PATIENTS)}")
    sources = [s for p in holdout for s in patient_sources(p)]
    sources += [varied_phantom_source(5000 + k, opacities=args.opacities) if args.varied else phantom_source(5000 + k)
                for k in range(args.phantoms)]
    pos = {"injected": [], "removed": []}
    neg = []
    flagged, tampered_scans, false_findings, clean_scans, times = 0, 0, 0, 0, []
    per_kind_found = {"injected": [0, 0], "removed": [0, 0]}
    sweep = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
    clean_finding_scores, edit_hit_scores, scan_scores = [], [], {"clean": [], "tampered": []}
    edit_rows, neg_rows, clean_rows = [], [], []  # every edit, untouched place and clean scan: where, and what the detector said
    for i, src in enumerate(sources):
        rng = np.random.default_rng([123, i])
        name = src.name.split("/")[-1]  # the series folder, or phantom-<seed>
        lungs = lung_mask(src.volume)
        for label, vol, edits in variants(src, 900_000 + i, inject=2, remove=len(src.tumours), per_scan=2):
            t0 = time.time()
            result, _, _ = screen_volume(vol, det, threshold=min(sweep))
            times.append(time.time() - t0)
            scan_scores["clean" if label in ("TB", "TM") else "tampered"].append(result["score"])
            if label in ("TB", "TM"):
                clean_scans += 1
                wrong = [{"kind": f["kind"], "score": round(float(f["score"]), 4), "voxel": [round(float(v), 1) for v in f["voxel"]]}
                         for f in result["findings"] if f["score"] >= det.threshold]
                false_findings += len(wrong)
                clean_rows.append({"source": name, "label": label, "false_findings": wrong})
                clean_finding_scores += [f["score"] for f in result["findings"]]
                pts = np.argwhere(lungs[:, ::4, ::4]) * np.array([1, 4, 4])
                places = [pts[j] for j in rng.integers(len(pts), size=10)] + [t.voxel for t in src.tumours]
                pn = score_locations(vol, det, np.asarray(places, float))[:, 1:].sum(1)
                neg += list(pn)
                neg_rows += [{"source": name, "what": "lung" if j < 10 else "real tumour",
                              "voxel": [round(float(v), 1) for v in places[j]], "p_tampered": round(float(pn[j]), 4)}
                             for j in range(len(places))]
            else:
                tampered_scans += 1
                flagged += any(f["score"] >= det.threshold for f in result["findings"])
                p = score_locations(vol, det, np.asarray([e.voxel for e in edits], float))
                for e, pe in zip(edits, p):
                    pos[e.kind].append(float(pe[1:].sum()))
                    near = [f["score"] for f in result["findings"] if f["kind"] == e.kind
                            and np.linalg.norm((np.asarray(f["voxel"]) - e.voxel) * np.asarray(vol.spacing)) <= 10 + e.diameter_mm / 2]
                    best = max(near, default=0.0)
                    edit_hit_scores.append((e.kind, best))
                    edit_rows.append({"source": name, "slice_mm": round(float(vol.spacing[0]), 2),
                                      "pixel_mm": round(float(vol.spacing[1]), 3), "kind": e.kind, "nodule_type": e.nodule_type, "diameter_mm": round(float(e.diameter_mm), 1),
                                      "voxel": [round(float(v), 1) for v in e.voxel], "p_tampered_at_centre": round(float(pe[1:].sum()), 4),
                                      "best_finding_right_kind": round(float(best), 4)})
                    per_kind_found[e.kind][0] += best >= det.threshold
                    per_kind_found[e.kind][1] += 1
    report = {
        "model": det.path, "holdout": args.holdout, "phantoms": args.phantoms, "varied": args.varied, "opacities": args.opacities,
        "auc_injected": round(roc_auc_score([1] * len(pos["injected"]) + [0] * len(neg), pos["injected"] + neg), 4),
        "auc_removed": round(roc_auc_score([1] * len(pos["removed"]) + [0] * len(neg), pos["removed"] + neg), 4) if pos["removed"] else None,
        "n_injected": len(pos["injected"]), "n_removed": len(pos["removed"]), "n_negatives": len(neg),
        "tampered_scans_flagged": f"{flagged}/{tampered_scans}",
        "edits_found_right_kind": {k: f"{v[0]}/{v[1]}" for k, v in per_kind_found.items()},
        "false_findings_per_clean_scan": round(false_findings / max(clean_scans, 1), 3),
        "clean_scans": clean_scans,
        "clean_scans_flagged": f"{sum(x >= det.threshold for x in scan_scores['clean'])}/{clean_scans}",
        "threshold": det.threshold,
        "scan_auc": round(roc_auc_score([1] * len(scan_scores["tampered"]) + [0] * len(scan_scores["clean"]),
                                        scan_scores["tampered"] + scan_scores["clean"]), 4),
        "sweep": {str(t): {"false_findings_per_clean_scan": round(sum(x >= t for x in clean_finding_scores) / max(clean_scans, 1), 3),
                           "clean_scans_flagged": f"{sum(x >= t for x in scan_scores['clean'])}/{clean_scans}",
                           "injected_found": f"{sum(s >= t for k, s in edit_hit_scores if k == 'injected')}/{per_kind_found['injected'][1]}",
                           "removed_found": f"{sum(s >= t for k, s in edit_hit_scores if k == 'removed')}/{per_kind_found['removed'][1]}"}
                  for t in sweep},
        "median_screen_seconds": round(float(np.median(times)), 2),
        "edits": edit_rows,
        "clean_scans_findings": clean_rows,
        "untouched_above_half": sorted([r for r in neg_rows if r["p_tampered"] >= 0.5], key=lambda r: -r["p_tampered"]),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
