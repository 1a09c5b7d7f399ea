"""Renders before/after slices of simulated injections and removals (docs/img/tamper_examples.png).

Usage: python benchmarks/figure_tamper.py SIMULATED_DATASET
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ctguard import io


def main(root: str, out: str = "docs/img/tamper_examples.png") -> None:
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    controls = {s["source"]: s for s in manifest["scans"] if s["label"] in ("TB", "TM")}
    edited = [s for s in manifest["scans"] if s["label"] in ("FM", "FB")][:6]
    fig, axes = plt.subplots(2, len(edited), figsize=(3 * len(edited), 6.4))
    for col, scan in enumerate(edited):
        ctrl = controls[scan["source"]]
        before = io.read(root / "CT_Scans/EXP1_blind" / ctrl["uuid"])
        after = io.read(root / "CT_Scans/EXP1_blind" / scan["uuid"])
        e = scan["edits"][0]
        z, y, x = (int(round(v)) for v in e["voxel"])
        half = int(max(e["radius_mm"] * 1.6, 30) / before.spacing[1])
        ys, xs = slice(max(y - half, 0), y + half), slice(max(x - half, 0), x + half)
        for row, vol in enumerate((before, after)):
            ax = axes[row, col]
            ax.imshow(vol.hu[z, ys, xs], cmap="gray", vmin=-1000, vmax=400)
            ax.set_xticks([]), ax.set_yticks([])
        kind = f"{e['kind']} {e.get('nodule_type') or ''}".strip()
        axes[0, col].set_title(f"{scan['source'][-14:]}\n{kind}, {e['diameter_mm']:.0f} mm", fontsize=8)
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("tampered")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
