"""Does a detector find the edits of the demo's phantom set-up? The demo's and the tests' tampered
phantoms (as `ctguard demo` and tests/conftest.py make them) and four more (seeds 5011-5014), one
injection and one removal each, plus two clean phantoms.

Usage:
    python benchmarks/experiments/phantom_edits.py MODEL [--network-only]

For each edit: the best score of a right-kind finding within 10 mm + half its diameter (``*``: at or
over the detector's threshold); for each scan, its three best findings elsewhere (false ones).
"""

from __future__ import annotations

import argparse

import numpy as np

from ctguard.screen import load_detector, screen_volume
from ctguard.tamper.simulate import phantom_source, tampered_phantom


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="tamper3d (bundled) or a run's model.pt")
    ap.add_argument("--network-only", action="store_true", help="without the second stage")
    a = ap.parse_args()
    det = load_detector(a.model)
    print(f"{a.model}: threshold {det.threshold}" + (" (network only)" if a.network_only else ""))
    cases = [("demo (2026)", *tampered_phantom(2026, 2026)), ("tests (4242)", *tampered_phantom(4242, 1))]
    cases += [(f"seed {s}", *tampered_phantom(s, s)) for s in (5011, 5012, 5013, 5014)]
    found = 0
    for name, vol, truth in cases:
        result, _, _ = screen_volume(vol, det, threshold=0.0, stage2=not a.network_only)
        sp = np.asarray(vol.spacing)
        close = [[f for f in result["findings"] if np.linalg.norm((np.asarray(f["voxel"]) - t.voxel) * sp) <= 10 + t.diameter_mm / 2]
                 for t in truth]
        cells = []
        for t, near in zip(truth, close):
            s = max((f["score"] for f in near if f["kind"] == t.kind), default=0.0)
            found += s >= det.threshold
            cells.append(f"{t.kind} {s:.3f}{'*' if s >= det.threshold else ''}")
        false = sorted((f["score"] for f in result["findings"] if not any(f in near for near in close)), reverse=True)[:3]
        print(f"{name}: " + ", ".join(cells) + f"; best false {[round(x, 3) for x in false]}")
    print(f"found at the threshold: {found}/{2 * len(cases)}")
    for seed in (4343, 77):
        result, _, _ = screen_volume(phantom_source(seed, with_tumour=False).volume, det, threshold=0.0, stage2=not a.network_only)
        print(f"clean phantom {seed}: best {[round(f['score'], 3) for f in result['findings'][:3]]}")


if __name__ == "__main__":
    main()
