"""Whether the resampling trace can be read across the slices too, as it is across the pixels.

Usage:
    python benchmarks/experiments/slice_trace.py [--config configs/tamper3d.yaml] [--names 0001/,0002/] [--json FILE]

CT-GAN, and this project's simulator after it, cut a cube at 1 mm around the edit and paste it back
by linear interpolation in all three axes. ``ctguard.verifier.resampling_trace`` reads the ripple
that this leaves in the noise's variance from pixel to pixel; across slices of ``s`` mm the same
ripple runs at ``s mod 1`` cycles a slice (folded into 0-0.5): on 2.5 mm slices every second slice
of a pasted cube is an average of two, on 1.25 mm slices one in four is untouched. Slices a whole
number of mm apart (1, 5, 8 mm) carry none.

:func:`slice_trace` reads it: the squared in-plane residual (as the trace's), averaged over each
slice's parenchyma (under -600 HU) in a square of half-width 5, 8 and 12 mm around the place into a profile along the slices
within that reach, and the Hann-windowed Fourier power of that profile at the slices' ripple
frequency as a multiple of what noise without a ripple gives (log of one plus it). For the real
scans of CONFIG whose path holds one of NAMES (by default the three LIDC-IDRI series whose slices
are 2.5, 1.25 and 2.5 mm apart), the simulator's edits with a seed no training run uses, scored at
their own centre, against the stage's untouched places of the clean scan (10 random lung places,
10 dense ones, every real lesion): the location AUC of the across-slice trace, of the in-pixel
trace and of their sum, family by family. No training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from ctguard.verifier import TRACE_CLIP, TRACE_MIN_FREQUENCY, TRACE_RADII_MM, resampling_trace, ripple_frequency

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resampling_trace import ROOT, places, real_sources  # noqa: E402

SEED = 4343
MIN_SLICES = 5  # a profile along fewer slices reads nothing
PARENCHYMA_HU = -600.0  # each slice's energy over its lung parenchyma only: a vessel's rise and fall from slice to slice is no ripple
MIN_PIXELS = 20  # a slice of the square with fewer such pixels reads nothing


def slice_trace(vol, place: np.ndarray, noise_xy: float) -> np.ndarray:
    """The ripple of the in-plane fine texture's energy from slice to slice around ``place``, in
    the windows of :data:`ctguard.verifier.TRACE_RADII_MM` (NaN where the slices are within
    :data:`ctguard.verifier.TRACE_MIN_FREQUENCY` of a whole number of mm apart, or too few)."""
    spacing = np.asarray(vol.spacing, float)
    f = ripple_frequency(spacing[0])
    out = np.full(len(TRACE_RADII_MM), np.nan, np.float32)
    if f < TRACE_MIN_FREQUENCY:
        return out
    c = np.rint(np.asarray(place, float)).astype(int)
    reach = np.ceil(max(TRACE_RADII_MM) / spacing).astype(int) + 1
    lo, hi = np.maximum(c - reach, 0), np.minimum(c + reach + 1, vol.shape)
    hu = vol.hu[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32)
    clip = TRACE_CLIP * max(float(noise_xy), 1e-3)
    e = np.clip(hu - ndimage.uniform_filter(hu, (1, 3, 3), mode="nearest"), -clip, clip) ** 2
    for k, radius in enumerate(TRACE_RADII_MM):
        half = np.floor(radius / spacing).astype(int)
        a, b = np.maximum(c - half - lo, 0), np.minimum(c + half + 1 - lo, e.shape)
        box = tuple(slice(i, j) for i, j in zip(a, b))
        sq, lung = e[box], hu[box] < PARENCHYMA_HU
        n = sq.shape[0]
        if n < MIN_SLICES or lung.sum(axis=(1, 2)).min() < MIN_PIXELS:
            continue
        lines = float(lung.sum()) / n
        profile = (sq * lung).sum(axis=(1, 2)) / lung.sum(axis=(1, 2))
        sq = sq[lung]
        window = np.hanning(n + 2)[1:-1]  # no zero at the ends: few slices
        wave = window * np.exp(-2j * np.pi * f * np.arange(n))
        p = abs(np.dot(profile - profile.mean(), wave)) ** 2
        out[k] = np.log1p(p / (float(sq.var()) * float((window**2).sum()) / lines + 1e-12))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    ap.add_argument("--names", default="179049373636438705059720603192,619372068417051974713149104919,170706757615202213033480003264",
                    help="comma-separated parts of the scans' paths")
    ap.add_argument("--json")
    a = ap.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    rows: list[tuple[int, str, str, np.ndarray, np.ndarray]] = []
    for path, src, lungs, depth, noise in real_sources(cfg, a.names):
        scan = src.patient or Path(path).name
        n0 = len(rows)
        rows += [(label, what, scan, slice_trace(vol, at, noise), resampling_trace(vol, at, noise))
                 for label, what, vol, at in places(src, lungs, depth, SEED)]
        print(f"{scan}: slices {src.volume.spacing[0]:.3f} mm, ripple {ripple_frequency(src.volume.spacing[0]):.3f} cycles a slice, "
              f"{len(rows) - n0} places", flush=True)

    untouched = [r for r in rows if r[0] == 0]
    windows = [f"{int(r)} mm" for r in TRACE_RADII_MM]
    measures = [f"slices {w}" for w in windows] + [f"pixels {w}" for w in windows] + ["slices + pixels 8 mm"]

    def values(r) -> np.ndarray:
        s, p = np.nan_to_num(r[3]), np.nan_to_num(r[4])
        return np.concatenate([s, p, [s[1] + p[1]]])

    report = {"measures": measures, "rows": {}}
    print(f"\n{'edits':>18} " + " ".join(f"{m:>14}" for m in measures))
    for family in sorted({r[1] for r in rows if r[0] == 1}) + ["all"]:
        edits = [r for r in rows if r[0] == 1 and (family == "all" or r[1] == family)]
        y = [1] * len(edits) + [0] * len(untouched)
        x = np.stack([values(r) for r in edits + untouched])
        aucs = [round(float(roc_auc_score(y, x[:, k])), 3) for k in range(x.shape[1])]
        report["rows"][family] = {"edits": len(edits), "untouched": len(untouched), "auc": dict(zip(measures, aucs))}
        print(f"{family + f' ({len(edits)})':>18} " + " ".join(f"{v:14.3f}" for v in aucs))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
