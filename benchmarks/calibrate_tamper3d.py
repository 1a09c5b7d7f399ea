"""Calibrates a 3D detector's finding threshold on clean phantoms that neither training nor the
held-out evaluation uses (seeds 6000+), so the threshold is never tuned on the test data.

Usage: python benchmarks/calibrate_tamper3d.py --model PATH [--phantoms 12] [--max-false 1.0] [--2d] [--varied [--opacities N]]
                                              [--real-scans CONFIG]
Prints, per candidate threshold, the false findings per clean scan (with --2d: per clean slice, 6
lung slices per phantom screened alone by a 2D detector), and the lowest threshold whose rate is at
most --max-false. With --varied every phantom has its own random scanner set-up. With --real-scans
the untouched real scans of a config (its ``real_scans``) are counted too, each as one more scan (6
slices each with --2d): for a detector trained on them, an in-sample count.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from ctguard import api, io
from ctguard.engine.train_slice_stage import lung_slices
from ctguard.screen import load_detector, load_detector2d, screen_slice, screen_volume
from ctguard.volume import Volume
from ctguard.tamper.simulate import phantom_source, varied_phantom_source

CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--phantoms", type=int, default=12)
    ap.add_argument("--max-false", type=float, default=1.0)
    ap.add_argument("--2d", dest="two_d", action="store_true", help="calibrate a 2D detector on single slices")
    ap.add_argument("--varied", action="store_true", help="phantoms under random scanner set-ups")
    ap.add_argument("--opacities", type=int, default=0, help="with --varied: up to N genuine hazy patches per phantom")
    ap.add_argument("--real-scans", default=None, metavar="CONFIG", help="also count the untouched real scans of this config")
    args = ap.parse_args()
    det = load_detector2d(args.model) if args.two_d else load_detector(args.model)
    scores = []
    phantoms = ((varied_phantom_source(6000 + k, opacities=args.opacities) if args.varied else phantom_source(6000 + k)).volume
                for k in range(args.phantoms))
    real = (io.read(e["scan"]) for e in (api.load_config(args.real_scans).get("real_scans") or [])) if args.real_scans else ()
    for vol in itertools.chain(phantoms, real):
        if args.two_d:
            ok = lung_slices(vol)
            for z in ok[np.linspace(0, len(ok) - 1, 6).astype(int)]:
                one = Volume(vol.hu[z : z + 1].copy(), (1.0, *vol.spacing[1:]), meta={"kind": "dicom-file", "warnings": []})
                result, _, _ = screen_slice(one, det, threshold=min(CANDIDATES))
                scores.append([f["score"] for f in result["findings"]])
        else:
            result, _, _ = screen_volume(vol, det, threshold=min(CANDIDATES))
            scores.append([f["score"] for f in result["findings"]])
    rate = {t: float(np.mean([sum(s >= t for s in sc) for sc in scores])) for t in CANDIDATES}
    chosen = next((t for t in CANDIDATES if rate[t] <= args.max_false), CANDIDATES[-1])
    print(json.dumps({"model": det.path, "phantoms": args.phantoms, "real_scans": args.real_scans, "counted": len(scores), "varied": args.varied, "opacities": args.opacities, "false_findings_per_clean_scan": rate,
                      "max_false": args.max_false, "threshold": chosen}, indent=2))


if __name__ == "__main__":
    main()
