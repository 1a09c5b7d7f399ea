"""Does a detector find the edits of tampered phantoms? Seeds 2026 (the demo's), 4242 (the tests')
and four more (5011-5014), one injection and one removal each, plus clean phantoms.

Usage:
    python benchmarks/experiments/phantom_edits.py MODEL [--network-only] [--demo-setup [--pixel MM]]

By default the phantoms have the quick set-up of the tests (2 mm slices, 1.9 mm pixels; the tests'
tampered phantom, tests/conftest.py); ``--demo-setup``: that of ``ctguard demo`` (2.5 mm slices,
0.78 mm pixels: ``ctguard.tamper.simulate.DEMO_SHAPE``, ``DEMO_SPACING``), and six clean ones;
with ``--pixel MM`` as well, pixels of MM instead (0.977: a 500 mm field of view's, where the
resampling trace reads nothing).

For each edit: the best score of a right-kind scored place within 10 mm + half its diameter (``*``:
a place there at or over its own threshold, :func:`ctguard.screen.source_thresholds`); for each scan,
its three best places elsewhere (false ones, ``*`` likewise).
"""

from __future__ import annotations

import argparse

import numpy as np

from ctguard.screen import load_detector, scored_places, screen_volume, source_thresholds
from ctguard.tamper.simulate import DEMO_SHAPE, DEMO_SPACING, phantom_source, tampered_phantom


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="tamper3d (bundled) or a run's model.pt")
    ap.add_argument("--network-only", action="store_true", help="without the second stage")
    ap.add_argument("--demo-setup", action="store_true", help="the demo's scanner set-up instead of the tests' quick one")
    ap.add_argument("--pixel", type=float, help="with --demo-setup: pixels of this many mm instead of the demo's")
    a = ap.parse_args()
    if a.pixel is not None and not a.demo_setup:
        ap.error("--pixel needs --demo-setup")
    spacing = DEMO_SPACING if a.pixel is None else (DEMO_SPACING[0], a.pixel, a.pixel)
    setup = {"shape": DEMO_SHAPE, "spacing": spacing} if a.demo_setup else {}
    det = load_detector(a.model)
    cases = [("demo (2026)", *tampered_phantom(2026, 2026, **setup)), ("tests (4242)", *tampered_phantom(4242, 1, **setup))]
    cases += [(f"seed {s}", *tampered_phantom(s, s, **setup)) for s in (5011, 5012, 5013, 5014)]
    # One set-up for every phantom: its thresholds (a trace-blind stage's where it scores such pixels).
    own = source_thresholds(det, vol=cases[0][1]) if not a.network_only else dict.fromkeys(("network",), det.threshold)
    print(f"{a.model}: thresholds {own}" + (" (network only)" if a.network_only else ""))

    def over(p: dict) -> bool:
        return p["score"] >= own[p.get("source", "network")]

    def shown(p: dict) -> str:
        return f"{p['score']:.3f}" + ("*" if over(p) else "")

    found = 0
    for name, vol, truth in cases:
        result, _, _ = screen_volume(vol, det, threshold=0.0, stage2=not a.network_only)
        sp = np.asarray(vol.spacing)
        scored = scored_places(result["findings"])
        close = [[p for p in scored if np.linalg.norm((np.asarray(p["voxel"]) - t.voxel) * sp) <= 10 + t.diameter_mm / 2]
                 for t in truth]
        cells = []
        for t, near in zip(truth, close):
            right = [p for p in near if p["kind"] == t.kind]
            hit = any(over(p) for p in right)
            found += hit
            cells.append(f"{t.kind} {max((p['score'] for p in right), default=0.0):.3f}{'*' if hit else ''}")
        false = sorted((p for p in scored if not any(p is q for near in close for q in near)), key=lambda p: -p["score"])[:3]
        print(f"{name}: " + ", ".join(cells) + f"; best false {[shown(p) for p in false]}")
    print(f"found at the threshold: {found}/{2 * len(cases)}")
    for seed in (4343, 77, 2027, 5012, 5013, 5015) if a.demo_setup else (4343, 77):
        result, _, _ = screen_volume(phantom_source(seed, with_tumour=False, **setup).volume, det, threshold=0.0, stage2=not a.network_only)
        best = sorted(scored_places(result["findings"]), key=lambda p: -p["score"])[:3]
        print(f"clean phantom {seed}: best {[shown(p) for p in best]}")


if __name__ == "__main__":
    main()
