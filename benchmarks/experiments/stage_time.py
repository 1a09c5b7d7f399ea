"""Where a detector's second stage spends its time on one scan: its candidates, the triage's rows at
all of them and how many pass its cut-off, then the whole rows (re-centred places) of those.

Usage: python benchmarks/experiments/stage_time.py [SCAN] [--model M] [--repeat 2]
SCAN defaults to the 512x512x300 phantom series that benchmarks/read_speed.py writes
(benchmarks/_work/phantom_300); M to the bundled detector. Each step is timed in one process after
a first screening (warm caches), best of --repeat.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ctguard import io
from ctguard.screen import finding_probabilities, load_detector, screen_volume, stage_candidates

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scan", nargs="?", default=str(ROOT / "benchmarks/_work/phantom_300"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    vol = io.read(a.scan)
    det = load_detector(a.model)
    v = det.verifier
    if v is None or v.triage is None:
        raise SystemExit(f"{det.name} {det.version} has no second stage with a triage")
    _, heat, lungs = screen_volume(vol, det)
    reading = v.read_scan(vol, lungs)
    cands = stage_candidates(heat, vol, v, det.threshold, lungs, reading.noise, reading.trace, reading.smooth)
    at, p_net = np.asarray([f["voxel"] for f in cands], float), finding_probabilities(cands)
    best = {"triage_seconds": float("inf"), "whole_seconds": float("inf")}
    for _ in range(a.repeat):  # the two looks of Verifier.triaged, timed apart
        t = time.perf_counter()
        own, _, passed = v.triage_first(vol, at, p_net, lungs, reading.noise, reading.reference)
        t_own = time.perf_counter() - t
        t = time.perf_counter()
        v.probabilities(v.rows(vol, at[passed], p_net[passed], reading.noise, lungs, reading.reference, own[passed]))
        t_whole = time.perf_counter() - t
        best = {"triage_seconds": min(t_own, best["triage_seconds"]), "whole_seconds": min(t_whole, best["whole_seconds"])}
    print(f"{det.name} {det.version}: {len(cands)} candidates; the triage's rows and trees {best['triage_seconds']:.3f} s; "
          f"{len(passed)} over its cut-off {v.meta['triage']}, their whole rows and trees {best['whole_seconds']:.3f} s")


if __name__ == "__main__":
    main()
