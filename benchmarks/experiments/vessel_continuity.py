"""Whether the vessels around a place tell an in-painting of healthy lung from untouched lung.

Usage:
    python benchmarks/experiments/vessel_continuity.py CONFIG NAMES

For the real scans of CONFIG (a run's ``config.json`` or a recipe) whose path contains one of the
comma-separated NAMES: 12 healthy places in-painted on each (4 copies of 3, filled and cloned in
turn, as the simulator's healthy removals are made) against the stage's untouched places of the
clean scan (10 random lung places, 10 dense ones, every real lesion). At each place, on the scan's
own voxels smoothed over 0.7 mm, the dense tissue (over -550 HU) within 24 mm is split into
connected pieces (26-neighbours); a piece that reaches within 12 mm of the place and meets the
4 mm rim of the ball once is a dead end (a vessel that stops, as one cut by an in-painting would),
twice or more a vessel that passes through, never an island (as cloned vessels pasted into a
region would be). Prints each measure's location AUC (negative: lower at the edits), by family
and by kind of untouched place.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from ctguard.engine.train3d import build_source, real_scans
from ctguard.engine.train_verifier import negatives
from ctguard.lung import lung_depth, lung_mask
from ctguard.tamper.simulate import variants
from ctguard.verifier import neighbourhood

NEIGHBOURS = np.ones((3, 3, 3), bool)


def vessel_measures(vol, place, reach_mm: float = 24.0, inner_mm: float = 12.0) -> dict[str, float]:
    box, ball, dist = neighbourhood(vol, place, reach_mm)
    hu = ndimage.gaussian_filter(vol.hu[box].astype(np.float32), 0.7 / np.asarray(vol.spacing), mode="nearest")
    dense = (hu > -550) & ball
    lab, n = ndimage.label(dense, NEIGHBOURS)
    inner = dist <= inner_mm
    dense_inner = dense & inner
    rim = ball & (dist > reach_mm - 4.0)
    pieces_on_rim, n_pieces = ndimage.label(rim & dense, NEIGHBOURS)
    piece_of = ndimage.maximum(lab, pieces_on_rim, index=np.arange(1, n_pieces + 1)).astype(int) if n_pieces else np.zeros(0, int)
    meets = np.bincount(piece_of, minlength=n + 1)  # how many times each dense piece meets the rim
    nearest = ndimage.minimum(dist, lab, index=np.arange(1, n + 1)) if n else np.zeros(0)
    volume = np.bincount(lab.ravel(), minlength=n + 1)[1:] * float(np.prod(vol.spacing))
    near, rim_count = (nearest <= inner_mm) & (volume >= 20.0), meets[1:]
    touching = np.isin(lab, np.flatnonzero(meets[1:]) + 1)
    dead, through = float((near & (rim_count == 1)).sum()), float((near & (rim_count >= 2)).sum())
    return {"dense_within_12": dense_inner.sum() / max(inner.sum(), 1),
            "island_share_within_12": (dense_inner & ~touching).sum() / max(dense_inner.sum(), 1),
            "dead_ends": dead, "through": through, "dead_end_share": dead / max(dead + through, 1),
            "islands": float((near & (rim_count == 0)).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("names")
    a = ap.parse_args()
    rows = []
    for path, tumours in real_scans(json.loads(Path(a.config).read_text())):
        if not any(name in path for name in a.names.split(",")):
            continue
        src = build_source({}, ("series", path, 1, tumours, 0))
        lungs = lung_mask(src.volume)
        depth = lung_depth(src.volume, lungs)
        for what, p in negatives(src, lungs, depth, np.random.default_rng(5)):
            rows.append({"y": 0, "what": what, **vessel_measures(src.volume, p)})
        for _, vol, edits in variants(src, 4242, inject=0, remove=0, per_scan=3, remove_families=("fill", "clone"), healthy=4):
            rows += [{"y": 1, "what": e.extra["family"], **vessel_measures(vol, np.asarray(e.voxel))} for e in edits]
        print(f"{Path(path).name}: {len(rows)} places so far", flush=True)
    measures = [k for k in rows[0] if k not in ("y", "what")]
    for family in ("fill", "clone"):
        for against in (("lung",), ("dense",), ("lung", "dense", "real lesion")):
            use = [r for r in rows if r["what"] == family or (r["y"] == 0 and r["what"] in against)]
            y = [r["y"] for r in use]
            aucs = {k: roc_auc_score(y, [r[k] for r in use]) for k in measures}
            print(f"{family} against {' + '.join(against)}: " + ", ".join(f"{k} {max(v, 1 - v) * (1 if v >= 0.5 else -1):+.3f}" for k, v in aucs.items()))


if __name__ == "__main__":
    main()
