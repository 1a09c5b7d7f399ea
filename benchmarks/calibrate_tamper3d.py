"""Calibrates a 3D detector's finding threshold on clean phantoms that neither training nor the
held-out evaluation uses (seeds 6000+), so the threshold is never tuned on the test data.

Usage: python benchmarks/calibrate_tamper3d.py --model PATH [--phantoms 12] [--max-false 1.0]
Prints, per candidate threshold, the false findings per clean scan, and the lowest threshold whose
rate is at most --max-false.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ctguard.screen import load_detector, screen_volume
from ctguard.tamper.simulate import phantom_source

CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--phantoms", type=int, default=12)
    ap.add_argument("--max-false", type=float, default=1.0)
    args = ap.parse_args()
    det = load_detector(args.model)
    scores = []
    for k in range(args.phantoms):
        result, _, _ = screen_volume(phantom_source(6000 + k).volume, det, threshold=min(CANDIDATES))
        scores.append([f["score"] for f in result["findings"]])
    rate = {t: float(np.mean([sum(s >= t for s in sc) for sc in scores])) for t in CANDIDATES}
    chosen = next((t for t in CANDIDATES if rate[t] <= args.max_false), CANDIDATES[-1])
    print(json.dumps({"model": det.path, "phantoms": args.phantoms, "false_findings_per_clean_scan": rate,
                      "max_false": args.max_false, "threshold": chosen}, indent=2))


if __name__ == "__main__":
    main()
