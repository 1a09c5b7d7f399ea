"""Whether an injection's blend leaves the fine residual lopsided, on real scans.

Usage:
    python benchmarks/experiments/residual_asymmetry.py [--config configs/tamper3d.yaml] [--patients A,B] [--copies 2]

An injection is pasted with ``max(blended, original)`` (CT-GAN's "never darken"): where the pasted
cube is the original resampled twice, each voxel below its smoothed value is lifted to it, so the
in-plane high-pass residual around the place loses its negative tail while the positive tail stays.
For each patient's scans (the config's real scans) this makes injected copies of both families and
measures, in shells around each edit, each untouched place (random lung, dense places, real lesions)
and the scan's own noise, the share of strongly negative residuals among strong ones (|r| over 1.5
times the noise): near 0.5 where noise is symmetric. It prints the location AUC of that share
(lower = injected) per shell, injected against the untouched places, and against real lesions alone.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.metrics import roc_auc_score

from ctguard import api
from ctguard.engine.train3d import DEFAULTS, build_source, real_scans
from ctguard.engine.train_verifier import negatives
from ctguard.lung import lung_depth, lung_mask
from ctguard.tamper.simulate import variants
from ctguard.verifier import REACH_MM, _smooth_xy, neighbourhood, scan_noise

SHELLS = ((0, 6), (6, 12), (12, 18), (18, 24), (0, 12), (6, 18))


def lopsided(vol, place, noise_xy: float) -> list[float]:
    """Per shell: the share of negative residuals among those beyond 1.5 x the noise."""
    box, _, dist = neighbourhood(vol, place, REACH_MM, margin=4)
    hu = vol.hu[box].astype(np.float32)
    r = hu - _smooth_xy(hu)  # the in-plane residual the stage's profiles read
    out = []
    for a, b in SHELLS:
        m = (dist >= a) & (dist < b)
        v = r[m]
        neg, pos = int((v < -1.5 * noise_xy).sum()), int((v > 1.5 * noise_xy).sum())
        out.append((neg + 1) / (neg + pos + 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tamper3d.yaml")
    ap.add_argument("--patients", default="LIDC-IDRI-0001,LIDC-IDRI-0314,Lung_Dx-A0002")
    ap.add_argument("--copies", type=int, default=2)
    a = ap.parse_args()
    cfg = {**DEFAULTS, **api.load_config(a.config)}
    want = set(a.patients.split(","))
    rows = []
    for path, tumours in real_scans(cfg):
        src = build_source(cfg, ("series", path, 1, tumours, 0))
        if src.patient not in want:
            continue
        lungs = lung_mask(src.volume)
        depth = lung_depth(src.volume, lungs)
        noise = scan_noise(src.volume, lungs)
        rng = np.random.default_rng(7)
        for _, vol, edits in variants(src, 12345, inject=a.copies, remove=0, per_scan=3, inject_families=("drawn", "moved")):
            where = [(e.kind + " " + e.extra.get("family", ""), e.voxel) for e in edits] if edits else negatives(src, lungs, depth, rng)
            for what, p in where:
                rows.append({"patient": src.patient, "what": what, "share": lopsided(vol, np.asarray(p, float), noise[0])})
        print(src.patient, len(rows), flush=True)
    kinds = sorted({r["what"] for r in rows})
    print({k: sum(r["what"] == k for r in rows) for k in kinds})
    share = np.asarray([r["share"] for r in rows])
    what = np.asarray([r["what"] for r in rows])
    inj = np.char.startswith(what.astype(str), "injected")
    for j, (lo, hi) in enumerate(SHELLS):
        res = {"shell_mm": f"{lo}-{hi}"}
        for name, neg in (("vs untouched", ~inj), ("vs real lesions", what == "real lesion"), ("vs dense", what == "dense"), ("vs lung", what == "lung")):
            m = inj | neg
            if neg.any():
                res[name] = round(float(roc_auc_score(inj[m], -share[m, j])), 3)
        res["median share injected / untouched / lesions"] = [round(float(np.median(share[s, j])), 3) for s in (inj, ~inj, what == "real lesion") if s.any()]
        print(json.dumps(res))


if __name__ == "__main__":
    main()
