"""How alike a moved tumour is to the tumour it was copied from, against pairs of distinct lesions.

Usage:
    python benchmarks/experiments/copy_move.py [--config configs/tamper3d.yaml] [--copies 2] [--out FILE]

For every real scan of the config: ``--copies`` copies with real tumours moved into healthy lung
(the ``moved`` family, seeds 950,000+), and on each the similarity (:func:`similarity`)
of every dense place pair: a moved tumour and its donor (a copy), a moved tumour and another real
lesion, two real lesions, a lesion and a random dense place (none of them copies). Needs no trained
model. Prints the distributions.

    python benchmarks/experiments/copy_move.py --model RUN/model.pt [--patients P1,P2]

The same similarity as a rule on a detector's candidates (:func:`find_copies`): every candidate pair
on each scan's clean copy and on a copy with two tumours moved. Measured so (what did not help):
moved tumours and their donors correlate 0.68-0.95, pairs of distinct structures among a clean
scan's candidates up to 0.80, and the pairwise search costs tens of seconds a scan.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cross_validate as cv  # noqa: E402

from scipy import ndimage  # noqa: E402

from ctguard import api  # noqa: E402
from ctguard.lung import lung_depth, lung_mask  # noqa: E402
from ctguard.screen import load_detector  # noqa: E402
from ctguard.tamper.cube import cut  # noqa: E402
from ctguard.tamper.families import inject_moved, movable  # noqa: E402
from ctguard.verifier import _smooth_xy, neighbourhood  # noqa: E402
from ctguard.volume import Volume  # noqa: E402


DENSE_HU = -400.0  # the core: voxels denser than this (smoothed over 1 mm), connected to the densest point
FLIPS = [tuple(a for a in range(3) if bits >> a & 1) for bits in range(8)]


def core_centre(vol: Volume, place: np.ndarray, search_mm: float = 10.0, reach_mm: float = 20.0) -> np.ndarray:
    """The centroid (fractional voxel) of the dense core nearest ``place`` (:func:`dense_core`)."""
    return dense_core(vol, place, search_mm, reach_mm)[0]


def dense_core(vol: Volume, place: np.ndarray, search_mm: float = 10.0, reach_mm: float = 20.0) -> tuple[np.ndarray, float]:
    """``(centroid, volume_mm3)`` of the dense core nearest ``place``: the region denser than
    DENSE_HU connected to the densest point within ``search_mm``, cut at ``reach_mm`` from it (the
    densest point and 0 where even that is not dense)."""
    spacing = np.asarray(vol.spacing, float)
    box, ball, _ = neighbourhood(vol, place, search_mm)
    hu = ndimage.gaussian_filter(vol.hu[box].astype(np.float32), 1.0 / spacing, mode="nearest")
    hu[~ball] = -np.inf
    peak = np.array([b.start for b in box]) + np.array(np.unravel_index(int(np.argmax(hu)), hu.shape))
    box, ball, _ = neighbourhood(vol, peak.astype(float), reach_mm)
    dense = (ndimage.gaussian_filter(vol.hu[box].astype(np.float32), 1.0 / spacing, mode="nearest") > DENSE_HU) & ball
    labels, _ = ndimage.label(dense)
    lo = np.array([b.start for b in box])
    own = labels[tuple(peak - lo)]
    if own == 0:
        return peak.astype(float), 0.0
    voxels = np.argwhere(labels == own)
    return lo + voxels.mean(axis=0), float(len(voxels) * np.prod(spacing))


def _texture(cube: np.ndarray) -> np.ndarray:
    return cube - ndimage.gaussian_filter(cube, 1.0, mode="nearest")


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    d = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else 0.0


def _masked_ncc(window: np.ndarray, template: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Normalised correlation of ``template`` (over ``mask``) with every placement inside ``window``
    ("valid" placements: an array of ``window.shape - template.shape + 1``)."""
    from scipy.signal import fftconvolve

    m = mask.astype(np.float64)
    t = np.where(mask, template - template[mask].mean(), 0.0)
    flip = (slice(None, None, -1),) * 3
    num = fftconvolve(window, t[flip], mode="valid")
    s1 = fftconvolve(window, m[flip], mode="valid")
    s2 = fftconvolve(window * window, m[flip], mode="valid")
    var = np.maximum(s2 - s1 * s1 / m.sum(), 1e-6)
    return num / np.sqrt(var * (t * t).sum())


def similarity(vol: Volume, a: np.ndarray, b: np.ndarray, half_mm: int = 10, search_mm: int = 12, step_mm: float = 0.5) -> dict:
    """How alike the places ``a`` and ``b`` (fractional voxels) are. ``a``'s dense core (and 2 mm
    around it, within ``half_mm``) on a 1 mm grid is searched for around ``b`` under the eight flips
    and whole-mm shifts up to ``search_mm`` (best normalised correlation of HU, ``raw``), then
    aligned to ``step_mm`` there; ``texture`` is the correlation of the two places' fine texture
    (the residual of a 1 mm Gaussian) at that alignment. Returns also the flip and the shift (mm)."""
    ca = cut(vol, np.asarray(a, float), half_mm).hu.astype(np.float64)
    core = ndimage.binary_dilation(ndimage.gaussian_filter(ca, 1.0) > DENSE_HU, iterations=2)
    core &= np.linalg.norm(np.indices(ca.shape) - half_mm, axis=0) <= half_mm
    none = {"texture": 0.0, "raw": 0.0, "flip": [], "shift_mm": [0.0, 0.0, 0.0]}
    if core.sum() < 20:
        return none
    spacing = np.asarray(vol.spacing, float)
    cb = cut(vol, np.asarray(b, float), half_mm + search_mm).hu.astype(np.float64)
    raw, flip, shift = -1.0, (), np.zeros(3)
    for f in FLIPS:
        # b's cube flipped about its centre: a's template placed at offset o of the flipped window
        # lies at b + (o - search_mm) mirrored back along the flipped axes.
        score = _masked_ncc(np.flip(cb, f) if f else cb, ca, core)
        k = np.unravel_index(int(np.argmax(score)), score.shape)
        if score[k] > raw:
            off = np.asarray(k, float) - search_mm
            off[list(f)] *= -1
            raw, flip, shift = float(score[k]), f, off
    ta = _texture(ca)[core]
    steps = (-step_mm, 0.0, step_mm)
    best = -1.0, shift
    for fine in itertools.product(steps, repeat=3):
        s = shift + np.asarray(fine)
        tb = _texture(cut(vol, np.asarray(b, float) + s / spacing, half_mm).hu.astype(np.float64))
        t = _ncc(ta, (np.flip(tb, flip) if flip else tb)[core])
        if t > best[0]:
            best = t, s
    return {"texture": round(best[0], 4), "raw": round(raw, 4), "flip": list(flip), "shift_mm": [float(v) for v in best[1]]}


def fine_texture(vol: Volume, place: np.ndarray, radius_mm: float = 4.0) -> float:
    """The median absolute in-plane fine texture (the residual of a 1-voxel Gaussian on the scan's
    own voxels) in a ball around ``place``: a copy resampled onto the scan keeps less of it."""
    box, _, dist = neighbourhood(vol, np.asarray(place, float), radius_mm + 3.0)
    hu = vol.hu[box].astype(np.float32)
    return float(np.median(np.abs((hu - _smooth_xy(hu))[dist <= radius_mm])))


COPY_TEXTURE = 0.6  # fine-texture correlation over which two places are one copied from the other
COPY_APART_MM = 10.0  # the copy and its source at least this far apart (else it is one structure)
COPY_MIN_MM3 = 30.0  # dense cores smaller than this are not compared (a vessel's cross-section)


def find_copies(vol: Volume, candidates: list[dict], min_texture: float = COPY_TEXTURE) -> list[dict]:
    """Pairs of ``candidates`` (screening findings, best first) whose dense cores are copies of one
    another: similar volume (within a factor 2) and fine texture correlating over COPY_TEXTURE at
    their best alignment, at least COPY_APART_MM apart. Each pair ``{"copy": i, "source": j,
    "similarity": ..., "flip": ...}``: the copy is the member the second stage finds the more likely
    injected."""
    spacing = np.asarray(vol.spacing, float)
    cores = [dense_core(vol, np.asarray(f["voxel"], float)) for f in candidates]
    pairs = []
    for i, (ci, vi) in enumerate(cores):
        for j in range(i + 1, len(cores)):
            cj, vj = cores[j]
            if min(vi, vj) < COPY_MIN_MM3 or max(vi, vj) > 2.0 * min(vi, vj):
                continue
            if np.linalg.norm((ci - cj) * spacing) < COPY_APART_MM:
                continue
            sim = similarity(vol, ci, cj)
            matched = cj + np.asarray(sim["shift_mm"]) / spacing
            if sim["texture"] < min_texture or np.linalg.norm((ci - matched) * spacing) < COPY_APART_MM:
                continue
            copy, source = (i, j) if candidates[i]["p_injected"] >= candidates[j]["p_injected"] else (j, i)
            pairs.append({"copy": copy, "source": source, "similarity": sim["texture"], "flip": sim["flip"]})
    return pairs


def candidate_pairs(cfg: dict, a) -> None:
    """The copy rule (:func:`find_copies`) on a detector's candidates (network at 0.3, at most 40,
    re-scored by its second stage): every pair's similarity, on each scan's clean copy and on a copy
    with two tumours moved (a pair is a true copy when it joins a moved tumour and its donor)."""
    from ctguard.engine.train_verifier import near
    from ctguard.screen import findings_from, heatmap, verify_findings

    det = load_detector(a.model)
    cand_thr = float(det.verifier.meta.get("candidate_threshold", 0.3))  # the candidates screening gives the stage
    cap = int(det.verifier.meta.get("max_candidates", 40))
    keep = set(filter(None, a.patients.split(",")))
    rows = []
    for i, entry in enumerate(cfg["real_scans"]):
        if keep and entry["patient"] not in keep:
            continue
        src = cv.sources_of([entry])[0]
        if not movable(src.tumours, src.volume.spacing):
            continue
        lungs = lung_mask(src.volume)
        depth = lung_depth(src.volume, lungs)
        moved_vol, edits = inject_moved(src.volume, lungs, depth, src.tumours, np.random.default_rng([950_000, i, 9]), 2,
                                        avoid=[t.voxel for t in src.tumours])
        for label, vol, vol_lungs, vol_edits in [("clean", src.volume, lungs, []), ("moved", moved_vol, lung_mask(moved_vol), edits)]:
            scored = verify_findings(vol, vol_lungs, findings_from(heatmap(vol, det, vol_lungs), vol, cand_thr)[:cap], det.verifier)
            for pair in find_copies(vol, scored, min_texture=-1.0):
                ends = [scored[pair[k]]["voxel"] for k in ("copy", "source")]
                true = any(any(near(p, e.voxel, e.diameter_mm, vol.spacing) for p in ends) and
                           any(near(p, e.extra["from_voxel"], e.diameter_mm, vol.spacing) for p in ends) for e in vol_edits)
                rows.append({"patient": src.patient, "scan": label, "true_copy": bool(true), "similarity": pair["similarity"]})
        print(src.patient, [r for r in rows if r["patient"] == src.patient and (r["true_copy"] or r["similarity"] >= COPY_TEXTURE)], flush=True)
    for true in (True, False):
        v = np.array([r["similarity"] for r in rows if r["true_copy"] == true])
        if len(v):
            print(f"{'copies' if true else 'other pairs'}: n={len(v)} median {np.median(v):.3f} max {v.max():.3f}, "
                  f"over {COPY_TEXTURE}: {int((v >= COPY_TEXTURE).sum())}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default=None, help="instead: every pair of this detector's candidates on the clean and a moved copy of each scan")
    ap.add_argument("--patients", default="", help="with --model: only these patients (comma-separated)")
    a = ap.parse_args()
    cfg = api.load_config(a.config)
    if a.model:
        return candidate_pairs(cfg, a)
    rows = []
    for i, entry in enumerate(cfg["real_scans"]):
        src = cv.sources_of([entry])[0]
        if not movable(src.tumours, src.volume.spacing):
            continue
        lungs = lung_mask(src.volume)
        depth = lung_depth(src.volume, lungs)
        dense = np.argwhere((depth >= 5.0) & (src.volume.hu > -300))
        for k in range(a.copies):
            rng = np.random.default_rng([950_000, i, k])
            vol, edits = inject_moved(src.volume, lungs, depth, src.tumours, rng, 2, avoid=[t.voxel for t in src.tumours])
            lesions = [np.asarray(t.voxel, float) for t in src.tumours]
            others = [dense[j].astype(float) for j in rng.integers(len(dense), size=4)]
            for e in edits:
                donor = np.asarray(e.extra["from_voxel"])
                at = core_centre(vol, np.asarray(e.voxel))
                for what, b in [("copy-donor", donor)] + [("copy-lesion", q) for q in lesions if np.linalg.norm(q - donor) > 1]:
                    bc = core_centre(vol, b, reach_mm=12.0)
                    rows.append({"scan": src.name[-12:], "pair": what, **similarity(vol, at, bc),
                                 "fine_ratio": round(fine_texture(vol, at) / max(fine_texture(vol, bc), 1e-6), 3)})
            if k == 0:
                for u in range(len(lesions)):
                    for v in range(u + 1, len(lesions)):
                        rows.append({"scan": src.name[-12:], "pair": "lesion-lesion",
                                     **similarity(vol, core_centre(vol, lesions[u]), core_centre(vol, lesions[v]))})
                    for q in others:
                        a_c, q_c = core_centre(vol, lesions[u]), core_centre(vol, q)
                        if np.linalg.norm((a_c - q_c) * vol.spacing) >= COPY_APART_MM:  # else the dense place lies in the lesion itself
                            rows.append({"scan": src.name[-12:], "pair": "lesion-dense", **similarity(vol, a_c, q_c)})
        print(f"{src.name[-12:]}: {sum(r['scan'] == src.name[-12:] for r in rows)} pairs", flush=True)
    for pair in ("copy-donor", "copy-lesion", "lesion-lesion", "lesion-dense"):
        sel = [r for r in rows if r["pair"] == pair]
        if sel:
            for key in ("texture", "raw"):
                v = np.array([r[key] for r in sel])
                print(f"{pair:14s} {key:8s} n={len(v):3d} min {v.min():.3f} p10 {np.percentile(v, 10):.3f} median {np.median(v):.3f} max {v.max():.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
