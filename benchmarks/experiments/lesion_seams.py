"""Whether a nodule's meeting with its surroundings tells a genuine one from an injected one, on real scans.

Usage:
    python benchmarks/experiments/lesion_seams.py [--config configs/tamper3d.yaml] [--copies 2] [--per-scan 4] [--out F.json]
    python benchmarks/experiments/lesion_seams.py --rows F.json      # the table again from saved rows

Every threshold-setting clean candidate of the second stage lies on a real lesion: out of patient
the stage cannot tell a genuine nodule from an injected one, whose inside may be a real tumour's
own voxels (the "moved" family). What differs is the seam. Both injection families paste with
``max(blended, original)``; the drawn one adds the parenchyma's grain only where its smoothed
opacity reaches, the moved one blends the tumour's own surroundings with the new place's. A genuine
nodule went through the scanner whole: its edge has the scan's own blur and its rim the scan's
own noise.

For each of the config's real scans this segments each real lesion and each injected nodule (both
families, ``--copies`` copies of ``--per-scan``) on the scan's own grid (the component above
halfway between its core and the parenchyma around it) and measures, relative to that surface: the
edge's width (its contrast over its steepest gradient), the in-plane residual's spread and
lopsidedness in bands just outside and just inside the surface against the scan's own noise, and
the parenchyma's level in those bands. It prints each measure's AUC, genuine against each injection
family (no fitting: a measure that holds across patients holds here), and a leave-one-patient-out
logistic regression over all of them.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

REACH_MM = 28.0
BANDS_MM = ((0.0, 1.5), (1.5, 3.0), (3.0, 5.0))  # outside the surface
INNER_MM = (1.0, 3.0)  # inside it


def seam_features(vol, place, noise: tuple[float, float]) -> dict | None:
    """The measures around the nodule nearest ``place`` (see the module's docstring); None where no
    nodule stands out of the parenchyma there."""
    from ctguard.verifier import _smooth_xy, neighbourhood

    spacing = np.asarray(vol.spacing, float)
    box, _, dist = neighbourhood(vol, np.asarray(place, float), REACH_MM, margin=2)
    hu = vol.hu[box].astype(np.float32)
    smooth = ndimage.gaussian_filter(hu, 1.0 / spacing, mode="nearest")
    near = dist <= 6.0
    core_at = np.unravel_index(int(np.argmax(np.where(near, smooth, -np.inf))), hu.shape)
    core = float(np.median(hu[dist_from(core_at, hu.shape, spacing) <= 2.0]))
    far = (dist > 18.0) & (smooth < -600)
    if far.sum() < 50 or core < -750:
        return None
    bg = float(np.median(hu[far]))
    level = (core + bg) / 2.0
    lab, _ = ndimage.label(smooth > level)
    comp = lab == lab[core_at]
    if not comp.any() or comp[dist > REACH_MM - 2].any() and comp.sum() > 0.3 * (dist <= REACH_MM).sum():
        return None
    outside = ndimage.distance_transform_edt(~comp, sampling=spacing)
    inside = ndimage.distance_transform_edt(comp, sampling=spacing)
    n_xy = noise[0]
    r = hu - _smooth_xy(hu)
    grad = np.sqrt(sum(g**2 for g in np.gradient(smooth, *spacing)))
    surface = (outside > 0) & (outside <= 0.75 * spacing.min() + 0.5) & (dist < REACH_MM - 2)
    contrast = core - bg
    out = {"core_hu": core, "bg_hu": bg, "contrast": contrast, "volume_ml": float(comp.sum() * spacing.prod() / 1000.0),
           "edge_width_mm": float(contrast / (np.sqrt(2 * np.pi) * (np.median(grad[surface]) + 1e-3))) if surface.any() else np.nan}
    lung = smooth < bg + 0.25 * contrast  # parenchyma around the nodule (not its vessels' cores)
    for a, b in BANDS_MM + (("in", None),):
        if a == "in":
            m, tag = (inside > INNER_MM[0]) & (inside <= INNER_MM[1]), "in"
        else:
            m, tag = (outside > a) & (outside <= b) & lung & (dist < REACH_MM - 2), f"out{a:g}-{b:g}"
        if m.sum() < 20:
            out |= {f"{tag}_res": np.nan, f"{tag}_neg": np.nan, f"{tag}_level": np.nan}
            continue
        v = r[m]
        mad = float(np.median(np.abs(v - np.median(v))))
        strong_neg, strong_pos = int((v < -1.5 * n_xy).sum()), int((v > 1.5 * n_xy).sum())
        out[f"{tag}_res"] = float(np.log((mad + 1e-3) / n_xy))
        out[f"{tag}_neg"] = (strong_neg + 1) / (strong_neg + strong_pos + 2)
        out[f"{tag}_level"] = float((np.median(hu[m]) - bg) / max(contrast, 1.0))
    far_r = r[far]
    out["far_res"] = float(np.log((np.median(np.abs(far_r - np.median(far_r))) + 1e-3) / n_xy))
    return out


def dist_from(at, shape, spacing) -> np.ndarray:
    axes = [(np.arange(n) - c) * s for n, c, s in zip(shape, at, spacing)]
    return np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)


def make_rows(cfg: dict, copies: int, per_scan: int) -> list[dict]:
    from ctguard.engine.train3d import build_source, real_scans
    from ctguard.lung import lung_mask
    from ctguard.tamper.simulate import variants
    from ctguard.verifier import scan_noise

    rows = []
    for path, tumours in real_scans(cfg):
        src = build_source(cfg, ("series", path, 1, tumours, 0))
        lungs = lung_mask(src.volume)
        name = f"{src.patient} {str(path).rstrip('/').split('/')[-1][:24]}"
        for _, vol, edits in variants(src, 24680, inject=copies, remove=0, per_scan=per_scan, inject_families=("drawn", "moved")):
            noise = scan_noise(vol, lungs)
            where = [(e.extra.get("family", "drawn"), e.voxel) for e in edits] if edits else [("genuine", t.voxel) for t in src.tumours]
            for what, p in where:
                f = seam_features(vol, np.asarray(p, float), noise)
                if f is not None:
                    rows.append({"patient": src.patient, "scan": name, "what": what, **f})
        print(name, len(rows), flush=True)
    return rows


def report(rows: list[dict]) -> None:
    what = np.asarray([r["what"] for r in rows])
    patient = np.asarray([r["patient"] for r in rows])
    names = [k for k in rows[0] if k not in ("patient", "scan", "what")]
    x = np.asarray([[r[k] for k in names] for r in rows], float)
    print({k: int((what == k).sum()) for k in sorted(set(what))})
    gen = what == "genuine"
    for j, k in enumerate(names):
        line = {"measure": k}
        for fam in ("drawn", "moved"):
            m = (gen | (what == fam)) & np.isfinite(x[:, j])
            if (what[m] == fam).any() and gen[m].any():
                line[f"AUC genuine<{fam}"] = round(float(roc_auc_score(what[m] == fam, x[m, j])), 3)
        line["median genuine / drawn / moved"] = [round(float(np.nanmedian(x[what == w, j])), 3) for w in ("genuine", "drawn", "moved")]
        print(json.dumps(line))
    # Leave one patient out: a plain logistic regression over every measure.
    keep = np.isfinite(x).all(1)
    x, what, patient = x[keep], what[keep], patient[keep]
    y = (what != "genuine").astype(int)
    score = np.full(len(y), np.nan)
    for p in sorted(set(patient)):
        test = patient == p
        if len(set(y[~test])) < 2:
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000, class_weight="balanced"))
        model.fit(x[~test], y[~test])
        score[test] = model.predict_proba(x[test])[:, 1]
    ok = np.isfinite(score)
    print(json.dumps({"leave-one-patient-out AUC, genuine vs injected": round(float(roc_auc_score(y[ok], score[ok])), 3),
                      "genuine scores": sorted(round(float(s), 3) for s in score[ok & (y == 0)]),
                      "injected above every genuine": int((score[ok & (y == 1)] > score[ok & (y == 0)].max()).sum()),
                      "injected": int((ok & (y == 1)).sum())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tamper3d.yaml")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--per-scan", type=int, default=4)
    ap.add_argument("--out", help="save the rows here (JSON)")
    ap.add_argument("--rows", help="report saved rows instead of measuring")
    a = ap.parse_args()
    if a.rows:
        rows = json.loads(open(a.rows).read())
    else:
        from ctguard import api
        from ctguard.engine.train3d import DEFAULTS

        rows = make_rows({**DEFAULTS, **api.load_config(a.config)}, a.copies, a.per_scan)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rows, f)
    report(rows)


if __name__ == "__main__":
    main()
