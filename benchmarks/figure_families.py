"""Renders one edit of each family on a real scan, before and after (docs/img/edit_families.png).

Usage: python benchmarks/figure_families.py [SERIES LABEL_MAP_OR_ANNOTATIONS] [--out PNG]
Default: LIDC-IDRI-0003 from ../shared/data with its nodule label map.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ctguard import io
from ctguard.tamper.simulate import Source, tumours_from, variants

LIDC = Path(__file__).resolve().parents[2] / "shared/data/lidc-idri/LIDC-IDRI-0003"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("series", nargs="?", default=None)
    ap.add_argument("annotations", nargs="?", default=None)
    ap.add_argument("--out", default="docs/img/edit_families.png")
    args = ap.parse_args()
    series = args.series or str(next(LIDC.glob("*/*")))
    vol = io.read(series)
    src = Source(Path(series).name, vol, "", tumours_from(vol, args.annotations or LIDC / "nodules.nrrd"))
    shown = []
    for label, edited, edits in variants(src, 4, inject=2, remove=2, per_scan=1, inject_families=("drawn", "moved"),
                                         remove_families=("fill", "clone"), healthy=2):
        if edits:
            shown.append((edited, edits[0]))
    fig, axes = plt.subplots(2, len(shown), figsize=(2.6 * len(shown), 5.6))
    for col, (edited, e) in enumerate(shown):
        z, y, x = (int(round(v)) for v in e.voxel)
        half = int(max(e.radius_mm * 1.4, 25) / vol.spacing[1])
        ys, xs = slice(max(y - half, 0), y + half), slice(max(x - half, 0), x + half)
        for row, v in enumerate((vol, edited)):
            axes[row, col].imshow(v.hu[z, ys, xs], cmap="gray", vmin=-1000, vmax=400)
            axes[row, col].set_xticks([]), axes[row, col].set_yticks([])
        where = e.extra.get("target", "")
        axes[0, col].set_title(f"{e.kind} ({e.extra['family']}{', ' + where if where else ''})\n{e.diameter_mm:.0f} mm", fontsize=8)
        print(e.kind, e.extra, round(e.diameter_mm, 1), int(np.count_nonzero(edited.hu != vol.hu)), "voxels changed")
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("edited")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
