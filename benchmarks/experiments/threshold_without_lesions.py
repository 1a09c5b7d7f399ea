"""What the stage's threshold rule would give if it did not count some untouched training candidates.

Usage:
    python benchmarks/experiments/threshold_without_lesions.py RUNS CV_JSON [--json FILE]

RUNS holds the folds' trained runs (``RUNS/foldK``, each with ``verifier_oof.npz`` and its rows kept in
``verifier_rows/``); CV_JSON is their cross-validation (``cross_validate.py --json``, which keeps every
candidate's score). For each fold the threshold is chosen again from the stage's own out-of-patient
scores by its rule (the lowest of the grid with at most 0.1 untouched candidates over it per
untouched training source), counting:
- ``all``: every untouched candidate (the rule as fitted; it must give the fold's own threshold);
- ``no_lesions``: none at a genuine lesion (the patients' nodules and tumours, the stage phantoms'
  genuine nodules): what a perfect genuine-nodule check would leave to the rule;
- ``real_only``: the real patients' alone (the phantoms' candidates and sources left out);
- ``clinical_set_ups``: all but the phantoms of the one quick 1.9 mm set-up (``verifier_fixed_phantoms``,
  seeds 50 past the stage phantoms' base), which no clinical scan resembles;
and each threshold is read on the fold's held-out evaluation (:func:`cross_validate.counts_at`):
edits found with their right kind, false findings on the clean held-out scans, real lesions
called injected. Pooled over the folds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cross_validate as cv  # noqa: E402

from ctguard.engine import train_verifier as tv  # noqa: E402

RULES = ("all", "no_lesions", "real_only", "clinical_set_ups")


def fold_thresholds(run: Path) -> dict[str, float]:
    """Each rule's threshold on one fold's out-of-patient scores."""
    z = np.load(run / "verifier_oof.npz")
    cfg, _, parts = tv.run_rows(run)
    lesion = np.concatenate([p["lesion"] for p in parts])
    if len(lesion) != len(z["score"]):
        raise SystemExit(f"{run}: {len(lesion)} rows kept, {len(z['score'])} scored out of patient")
    real = ~np.char.startswith(z["group"].astype(str), "phantom")
    n_real = sum(not str(p["group"]).startswith("phantom") for p in parts)
    budget = float(cfg["verifier_max_false"])
    clean, score = z["clean"], z["score"]
    quick = np.isin(z["group"].astype(str), [f"phantom {spec[1]}" for spec in tv.verifier_specs(cfg) if spec[0] == "fixed phantom"])
    n_quick = sum(spec[0] == "fixed phantom" for spec in tv.verifier_specs(cfg))
    return {"all": tv.choose_threshold(score, clean, len(parts), budget),
            "clinical_set_ups": tv.choose_threshold(score, clean & ~quick, len(parts) - n_quick, budget),
            "no_lesions": tv.choose_threshold(score, clean & ~lesion, len(parts), budget),
            "real_only": tv.choose_threshold(score, clean & real, n_real, budget)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs")
    ap.add_argument("cv_json")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    report = json.loads(Path(a.cv_json).read_text())
    folds, pooled = [], {r: {} for r in RULES}
    for fold in report["folds"]:
        k = int(fold["fold"])
        thresholds = fold_thresholds(Path(a.runs) / f"fold{k}")
        counts = {r: cv.counts_at(fold["eval"], t) for r, t in thresholds.items()}
        folds.append({"fold": k, "threshold_as_fitted": fold["row"]["threshold"], "thresholds": thresholds, "held_out": counts})
        for r in RULES:
            for key, v in counts[r].items():
                pooled[r][key] = pooled[r].get(key, 0) + v
        print(f"fold {k}: {thresholds}", flush=True)
    out = {"folds": folds, "pooled": pooled,
           "how": f"python benchmarks/experiments/threshold_without_lesions.py {a.runs} {a.cv_json}" + (f" --json {a.json}" if a.json else "")}
    text = json.dumps(out, indent=2) + "\n"
    print(json.dumps(pooled, indent=2))
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
