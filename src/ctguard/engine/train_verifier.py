"""Fitting the second stage (:mod:`ctguard.verifier`) on a trained 3D network's candidates.

For every training source (the run's real scans and a few fresh varied phantoms) it simulates new
edits of every family with seeds the network never trained on, and makes rows:
- the edits' centres and, on the untouched scan, untouched places (random lung, dense places such
  as vessels and airway walls, every real lesion), with the network's probabilities there;
- the network's candidates on every scan (its findings at ``candidate_threshold``), each an edit's
  when it lies near one.
Each row is :func:`ctguard.verifier.place_features` (with ``verifier_recentre``, also at the two
places :func:`ctguard.verifier.recentred` finds near it) plus the network's probabilities. Gradient-
boosted trees are fitted on all rows; the operating threshold is chosen on out-of-patient scores
(each patient's rows scored by trees fitted without that patient): the lowest of a grid giving at
most ``max_false`` candidates over threshold per untouched scan.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ctguard.errors import InputError
from ctguard.patches import CHANNELS as PATCH_CHANNELS
from ctguard.patches import SIZE as PATCH_SIZE
from ctguard.patches import SLICES as PATCH_SLICES
from ctguard.patches import patches_at
from ctguard.verifier import (
    SCAN_COLUMNS,
    TRACE_MIN_FREQUENCY,
    Verifier,
    feature_names,
    finite_rows,
    network_probabilities,
    nodule_checked,
    point_rows,
    point_width,
    reads_trace,
    recentred,
    ripple_frequency,
    scan_noise,
    scan_reference,
    scan_referenced,
    scan_trace,
    stage_inputs,
    taken_candidates,
)

LABELS = {"injected": 1, "removed": 2}
GRID = tuple(np.round(np.concatenate([np.arange(0.5, 0.95, 0.05), np.arange(0.95, 0.999, 0.005), [0.996, 0.997, 0.998, 0.999]]), 3))
VERIFIER_DEFAULTS = {
    "verifier": False,  # fit the second stage after the network (ctguard.verifier)
    "verifier_phantoms": 4,  # fresh varied phantoms beside the real scans
    "verifier_fixed_phantoms": 2,  # and fresh phantoms of the one quick set-up (phantom_shape, phantom_spacing) the tests screen
    "verifier_inject": 2,  # injected copies per source (verifier_per_scan edits each, the families in turn)
    "verifier_remove": 3,  # at most this many removals of real tumours per source
    "verifier_healthy": 2,  # copies with healthy places in-painted
    "verifier_per_scan": 2,  # edits per injected or healthy-in-painted copy
    "verifier_candidate_threshold": 0.3,
    "verifier_max_candidates": 40,
    "verifier_max_false": 0.1,  # candidates over threshold per untouched scan the threshold allows
    "verifier_recentre": False,  # rows also read at each place's densest and smoothest point nearby (ctguard.verifier.recentred)
    "verifier_resampling": False,  # rows also read the place's resampling trace (ctguard.verifier.resampling_trace)
    "verifier_trace_scan": False,  # with verifier_resampling: the trace also less the scan's own (ctguard.verifier.scan_trace)
    "verifier_shape": False,  # rows also read the place's shape: Hessian eigenvalues at two scales (ctguard.verifier.shape_features)
    "verifier_trace_recentre": False,  # with verifier_resampling and verifier_recentre: rows also read at the strongest trace nearby (ctguard.verifier.trace_peak)
    "verifier_scan_columns": True,  # the trees may split on the scan's own slice and pixel size and noise (ctguard.verifier.SCAN_COLUMNS)
    "verifier_boosting": "classic",  # classic: GradientBoostingClassifier; histogram: HistGradientBoostingClassifier (same trees' depth, far faster fits)
    "verifier_trees": 300,
    "verifier_depth": 4,
    "verifier_rate": 0.05,
    "verifier_max_features": 0.5,  # the share of the columns each split of the trees may choose from
    "verifier_phantom_lesions": "some",  # genuine nodules of the stage's phantoms: some (about half have one), all (each has one), none
    "verifier_oof_folds": 5,  # the out-of-patient scores that choose the threshold: this many grouped folds, or 0: one fit per patient (or phantom) left out
    "verifier_blend": 0.0,  # the stage's score: (1 - w) x the trees' probabilities + w x the network's at the place
    "verifier_thick": [],  # also each real series with slices this many times thicker (averaged slabs), where those stay within THICK_MAX_MM
    "verifier_patches": False,  # also a small CNN on each place's native patch (ctguard.patches), averaged with the trees
    "verifier_patch_weight": 0.5,  # with verifier_patches: the CNN's share of the stage's probabilities
    "verifier_patch_epochs": 12,  # with verifier_patches: the CNN's passes over the rows
    "verifier_scan_reference": False,  # each row also less the median row of its scan's candidates (ctguard.verifier.scan_referenced)
    "verifier_nodule_check": False,  # a second look at every place's P(injected): two-class trees, genuine nodule or injected (ctguard.verifier.nodule_checked)
    "verifier_nodule_phantoms": 40,  # with verifier_nodule_check: fresh varied phantoms, each with a genuine nodule, that only the check learns from
    "verifier_trace_order": None,  # a weight w: the candidates capped in the order of the network's log-odds plus w times their resampling trace (ctguard.verifier.taken_candidates)
    "verifier_refine_from": None,  # a candidate scoring this or more is scored again at its two re-centred places, the highest kept (ctguard.screen.verify_findings)
    "verifier_trace_peaks": 0,  # n > 0: also the resampling trace's n strongest peaks over the lungs as candidates (ctguard.screen.trace_candidates)
    "verifier_smooth_peaks": 0,  # m > 0: then also the smooth map's m strongest peaks (places smoother than the lung around them; ctguard.screen.smooth_candidates)
    "verifier_blob_peaks": 0,  # k > 0: then also the blob map's k strongest peaks (small round bright blobs: nodules; ctguard.verifier.blob_map)
    "verifier_cross_fit": 0,  # 0: every row from the run's network; k >= 2: each training patient's rows from a network trained without its group of k (cross_fit_groups)
    "verifier_peak_threshold": False,  # the maps' peaks (trace, smooth, blob) get a threshold of their own, each source by the rule on half the budget (choose_thresholds)
    "verifier_blob_threshold": False,  # with verifier_peak_threshold and blob peaks: the blob map's peaks get a third of their own, each of the three sources a third of the budget
    "verifier_count_phantom_lesions": True,  # false: the threshold's rule does not count the stage phantoms' candidates at their own genuine nodules (threshold_counted)
    "verifier_bagging": 1,  # k > 1: the stage's (and its triage's) trees are k histogram fits of other seeds, averaged (AveragedTrees)
    "verifier_label_mm": None,  # r mm: a candidate labelled with an edit (near it: within 10 mm of its rim) is learnt from only within r mm of the rim (label_weights)
    "verifier_off_centre": 0,  # n > 0: also n rows at random places around each edit of the stage's copies, off its centre, where candidates fall (off_centre_rows)
    "verifier_blind": False,  # also trees that do not read the resampling trace, with thresholds of their own, for scans whose pixels leave it nothing to read (fit_blind)
    "verifier_triage": None,  # a share s: trees on each place's own columns first, the full row read only over their cut-off, the highest that loses at most s of the edits the stage finds out of patient (fit_triage)
}
TRIAGE_GRID = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2)  # the triage's cut-offs, lowest first
THICK_MAX_MM = 5.0  # a thicker-slice version of a real series is a stage source only up to this slice spacing (chest CT's range)
SEED_OFFSET = 700_000  # the verifier's edits: seeds apart from the network's training edits
PLACES_EACH = 10  # random lung places, and dense places, on each untouched copy (then every lesion)
OFF_CENTRE_MM = (1.5, 4.0)  # verifier_off_centre's places: from this far from an edit's centre to this far past its rim
NODULE_PHANTOM_SEED = 300  # the nodule check's phantoms: seed x 1000 + 300 + k, apart from the network's (0-19, 500+) and the stage's (900+)


def negatives(src, lungs: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Untouched places of a clean scan: 10 random lung places, 10 dense ones (vessels, airway walls,
    the hilum: lung voxels above -300 HU, 5 mm or more deep) and every real lesion."""
    out = []
    lung_pts = np.argwhere(depth[:, ::2, ::2] >= 3.0) * np.array([1, 2, 2])
    out += [("lung", lung_pts[j].astype(float)) for j in rng.integers(len(lung_pts), size=PLACES_EACH)]
    dense = np.argwhere((depth >= 5.0) & (src.volume.hu > -300))
    if len(dense):
        out += [("dense", dense[j].astype(float)) for j in rng.integers(len(dense), size=PLACES_EACH)]
    out += [("real lesion", np.asarray(t.voxel, float)) for t in src.tumours]
    return out


def near(voxel, centre, diameter_mm: float, spacing) -> bool:
    """Whether a finding at ``voxel`` is that of an edit or lesion at ``centre`` (within 10 mm of its rim)."""
    return rim_mm(voxel, centre, diameter_mm, spacing) <= 10


def rim_mm(voxel, centre, diameter_mm: float, spacing) -> float:
    """How far ``voxel`` lies outside the rim of an edit or lesion at ``centre`` (mm; negative inside it)."""
    return float(np.linalg.norm((np.asarray(voxel) - np.asarray(centre)) * np.asarray(spacing))) - diameter_mm / 2


ROW_KEYS = ("seed", "inject_families", "remove_families", "phantom_variety", "phantom_opacities", "phantom_shape", "phantom_spacing",
            "verifier_inject", "verifier_remove", "verifier_healthy", "verifier_per_scan", "verifier_candidate_threshold", "verifier_max_candidates")


def source_rows(job: tuple) -> dict:
    """One source's rows (a pool task), kept in the run's ``verifier_rows/`` under a key of the
    source, the settings that make its rows and the network's weights: a second fit with more
    sources computes only theirs."""
    cfg, spec, model_path = job
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    return _kept_rows(model_path, row_key(cfg, spec, model_path), lambda: _source_rows(cfg, spec, model_path))


def row_key(cfg: dict, spec: tuple, model_path: str) -> dict:
    """What a source's rows depend on: the source, the settings that make them, the network's weights."""
    import hashlib

    what = {k: cfg.get(k) for k in ROW_KEYS} | {"spec": [Path(str(v)).name if j in (1, 3) and v else v for j, v in enumerate(spec)],
                                                "network": hashlib.sha1(Path(model_path).read_bytes()).hexdigest(),
                                                "features": feature_names(*stage_features(cfg))}
    if cfg["verifier_patches"]:  # rows with their patches (rows without them keep their key)
        what["patches"] = [PATCH_SIZE, PATCH_SLICES]
    if cfg["verifier_scan_reference"]:  # rows that say which are the network's candidates (rows without it keep their key)
        what["candidate_flags"] = True
    if cfg["verifier_nodule_check"]:  # rows that say which are at genuine lesions (rows without it keep their key)
        what["lesion_flags"] = True
    if cfg["verifier_trace_order"] is not None:  # candidates in another order (rows in the network's keep their key)
        what["trace_order"] = float(cfg["verifier_trace_order"])
    return what


def _kept_rows(model_path: str, what: dict, make: Callable[[], dict]) -> dict:
    """Rows kept in ``verifier_rows/`` beside the network under the hash of ``what``, made by ``make`` once."""
    cached = _kept_path(model_path, what)
    if cached.is_file():
        return _load_kept(cached)
    rows = make()
    _keep(cached, rows)
    return rows


def _kept_path(model_path: str, what: dict) -> Path:
    """Where :func:`_kept_rows` keeps the rows of key ``what``."""
    import hashlib

    return Path(model_path).parent / "verifier_rows" / f"{hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]}.npz"


def _load_kept(cached: Path) -> dict:
    """Rows :func:`_keep` wrote (the patient and source as strings again)."""
    with np.load(cached, allow_pickle=False) as d:
        return {k: d[k] for k in d.files if k not in ("group", "source")} | {k: str(d[k]) for k in ("group", "source") if k in d.files}


def _keep(cached: Path, rows: dict) -> None:
    """Writes ``rows`` to ``cached`` whole or not at all (a temporary file renamed)."""
    cached.parent.mkdir(exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, **rows)
    tmp.replace(cached)


def too_thick(spec: tuple, src) -> bool:
    """Whether a source is a thicker-slice version of a real series past :data:`THICK_MAX_MM`
    (thicker than chest CT is read): it gives no rows."""
    return spec[0] == "series" and spec[2] > 1 and src.volume.spacing[0] > THICK_MAX_MM + 1e-6


def refine_rows(job: tuple) -> dict:
    """One source's rows at the two re-centred places (:func:`ctguard.verifier.recentred`: the
    densest and the smoothest point within 10 mm) of each candidate of its untouched copy (a pool
    task, for ``verifier_refine_from``): where screening scores such a candidate again, so that the
    threshold's rule counts the untouched training scans' candidates as screening will score them.
    ``x``: ``(candidates, 2, columns)``, in the order of the source's untouched candidate rows
    (:func:`source_rows`), kept beside them under their key."""
    cfg, spec, model_path = job
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    return _kept_rows(model_path, row_key(cfg, spec, model_path) | {"refine": "recentred"}, lambda: _refine_rows(cfg, spec, model_path))


def _refine_rows(cfg: dict, spec: tuple, model_path: str) -> dict:
    from ctguard.engine.train3d import build_source
    from ctguard.lung import lung_mask
    from ctguard.screen import finding_probabilities, load_detector, screen_volume

    src = build_source(cfg, spec)
    empty = {"x": np.zeros((0, 2, len(row_names(cfg))), np.float32)}
    if too_thick(spec, src):
        return empty
    vol, det = src.volume, load_detector(model_path)
    result, _, _ = screen_volume(vol, det, threshold=float(cfg["verifier_candidate_threshold"]), stage2=False)
    lungs = lung_mask(vol)
    noise = scan_noise(vol, lungs)
    trace_scan = stage_features(cfg)[3]
    reference = scan_trace(vol, lungs, noise[0]) if trace_scan else None
    # The untouched copy's candidates, as _source_rows takes them.
    found = taken_candidates(result["findings"], vol, lungs, int(cfg["verifier_max_candidates"]), trace_order(cfg), noise[0], reference)
    if not found:
        return empty
    alt = np.concatenate([recentred(vol, np.asarray(f["voxel"], float)) for f in found])
    x = rows_at(cfg, vol, alt, np.repeat(finding_probabilities(found), 2, axis=0), noise, reference)
    return {"x": x.reshape(len(found), 2, -1).astype(np.float32)}


def trace_order(cfg: dict) -> float | None:
    """The config's ``verifier_trace_order`` (None: the network's order; else a weight over 0), or a one-line error."""
    value = cfg["verifier_trace_order"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) <= 0):
        raise InputError(f"the config's verifier_trace_order must be a weight over 0 (or null: the network's order), not {value!r}")
    return None if value is None else float(value)


def refine_from(cfg: dict) -> float | None:
    """The config's ``verifier_refine_from`` (None: off; else a score over 0 and under 1), or a
    one-line error, also where the stage reads what the re-scored places cannot give (a scan
    reference, patches, a nodule check)."""
    value = cfg["verifier_refine_from"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise InputError(f"the config's verifier_refine_from must be a score over 0 and under 1 (or null: off), not {value!r}")
    for key in ("verifier_scan_reference", "verifier_patches", "verifier_nodule_check"):
        if config_flag(cfg, key):
            raise InputError(f"the config's verifier_refine_from cannot be used with {key}")
    return float(value)


def refined_scores(score: np.ndarray, alt_score: np.ndarray, owner: np.ndarray, start: float) -> np.ndarray:
    """Each row's score after screening's second look (``verifier_refine_from``): where a row
    scores ``start`` or more, the highest of it and its re-centred places' ``alt_score`` (row
    ``owner[j]`` owns ``alt_score[j]``)."""
    out = np.asarray(score, float).copy()
    gate = out[owner] >= start
    np.maximum.at(out, owner[gate], alt_score[gate])
    return out


def source_copies(cfg: dict, src, seed: int):
    """A source's copies the stage's rows are read on (its untouched copy first, then its edited
    ones): ``(label, vol, edits)``, the same for :func:`source_rows` and :func:`trace_rows`."""
    from ctguard.tamper.simulate import variants

    counts = {"inject": int(cfg["verifier_inject"]), "remove": min(len(src.tumours), int(cfg["verifier_remove"])),
              "healthy": int(cfg["verifier_healthy"])}
    return variants(src, seed, per_scan=int(cfg["verifier_per_scan"]), inject_families=tuple(cfg["inject_families"]),
                    remove_families=tuple(cfg["remove_families"]), **counts)


def trace_peaks_of(cfg: dict) -> int:
    """The config's ``verifier_trace_peaks`` (0: off), or a one-line error (:func:`peaks_setting`;
    the trace's peaks also need the stage to read the trace, ``verifier_resampling``)."""
    value = peaks_setting(cfg, "verifier_trace_peaks")
    if value and not cfg["verifier_resampling"]:
        raise InputError("the config's verifier_trace_peaks needs verifier_resampling (the stage must read the trace it was given the places by)")
    return value


def smooth_peaks_of(cfg: dict) -> int:
    """The config's ``verifier_smooth_peaks`` (0: off), or a one-line error (:func:`peaks_setting`)."""
    return peaks_setting(cfg, "verifier_smooth_peaks")


def blob_peaks_of(cfg: dict) -> int:
    """The config's ``verifier_blob_peaks`` (0: off), or a one-line error (:func:`peaks_setting`)."""
    return peaks_setting(cfg, "verifier_blob_peaks")


def peaks_setting(cfg: dict, key: str) -> int:
    """A number of a map's peaks the config's ``key`` asks the stage to take as candidates (0: off),
    or a one-line error: not a whole number from 0, or asked for where the stage reads what rows
    of other candidates cannot give (a scan reference, patches, a second look)."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"the config's {key} must be a whole number of peaks, 0 or more, not {value!r}")
    if value:
        for other in ("verifier_scan_reference", "verifier_patches"):
            if config_flag(cfg, other):
                raise InputError(f"the config's {key} cannot be used with {other}")
        if cfg["verifier_refine_from"] is not None:
            raise InputError(f"the config's {key} cannot be used with verifier_refine_from")
    return int(value)


def map_peaks(cfg: dict) -> bool:
    """Whether the stage also takes peaks of the lungs' maps as candidates (the trace's, the smooth map's, the blob map's)."""
    return bool(trace_peaks_of(cfg) or smooth_peaks_of(cfg) or blob_peaks_of(cfg))


def trace_rows(job: tuple) -> dict:
    """One source's rows at the resampling trace's peaks of each of its copies (a pool task, for
    ``verifier_trace_peaks``): the places screening adds to the network's candidates
    (:func:`ctguard.screen.trace_candidates`), labelled as candidates are. Kept beside the source's
    other rows under their key and the number of peaks."""
    cfg, spec, model_path = job
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    return _kept_rows(model_path, trace_key(cfg, spec, model_path), lambda: _trace_rows(cfg, spec, model_path))


def trace_key(cfg: dict, spec: tuple, model_path: str) -> dict:
    """What a source's rows at the maps' peaks depend on: its rows' key and the number of peaks of each map."""
    return row_key(cfg, spec, model_path) | {"trace_peaks": trace_peaks_of(cfg)} | \
        ({"smooth_peaks": smooth_peaks_of(cfg)} if smooth_peaks_of(cfg) else {}) | \
        ({"blob_peaks": blob_peaks_of(cfg)} if blob_peaks_of(cfg) else {})


def source_and_trace_rows(job: tuple) -> tuple[dict, dict]:
    """A source's rows (:func:`source_rows`) and its rows at the trace's peaks (:func:`trace_rows`),
    each kept under its own key (a pool task). Where neither is kept yet, both come from one pass
    over the source's copies: each copy simulated, its lungs found and the network run on it once."""
    cfg, spec, model_path = job
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    own, peaks = _kept_path(model_path, row_key(cfg, spec, model_path)), _kept_path(model_path, trace_key(cfg, spec, model_path))
    if own.is_file() or peaks.is_file():
        return source_rows(job), trace_rows(job)
    rows, peak_rows = _rows_of_copies(cfg, spec, model_path, with_peaks=True)
    _keep(own, rows)
    _keep(peaks, peak_rows)
    return rows, peak_rows


def _candidate_rows(cfg: dict, vol, noise: tuple[float, float], reference, found: list[dict], edits: list, tumours: list,
                    copy: int) -> dict:
    """Rows at candidates ``found`` of one copy (``copy``, its ``edits``; the source's real
    ``tumours``): each an edit's where it lies near one, else untouched, and on the untouched copy
    a lesion's where it lies near a real tumour."""
    from ctguard.screen import finding_probabilities

    at = np.asarray([f["voxel"] for f in found], float).reshape(-1, 3)
    x = rows_at(cfg, vol, at, finding_probabilities(found), noise, reference) if len(found) else np.zeros((0, len(row_names(cfg))), np.float32)
    y, rim = [], []
    for f in found:
        hit = next((e for e in edits if near(f["voxel"], e.voxel, e.diameter_mm, vol.spacing)), None)
        y.append(LABELS[hit.kind] if hit is not None else 0)
        rim.append(np.nan if hit is None else rim_mm(f["voxel"], hit.voxel, hit.diameter_mm, vol.spacing))
    return {"x": x, "y": y, "rim_mm": rim, "scan": [copy] * len(found), "clean": [not edits] * len(found), "candidate": [True] * len(found),
            "lesion": [not edits and any(near(f["voxel"], t.voxel, t.diameter_mm, vol.spacing) for t in tumours) for f in found],
            "blob": [f.get("source") == "blob" for f in found]}


def _as_rows(parts: list[dict], width: int, blob: bool = False) -> dict:
    """Rows of :func:`_candidate_rows` (and the like) joined, in the kept rows' dtypes; ``blob``:
    with which rows are at the blob map's peaks (the stage's rows at the maps' peaks, where it takes
    the blob map's)."""
    def joined(key: str, dtype) -> np.ndarray:
        return np.asarray([v for p in parts for v in p[key]], dtype)

    return {"x": np.concatenate([np.zeros((0, width), np.float32)] + [p["x"] for p in parts]).astype(np.float32),
            "y": joined("y", np.int8), "rim_mm": joined("rim_mm", np.float32), "scan": joined("scan", np.int16),
            **{k: joined(k, bool) for k in ("clean", "candidate", "lesion")},
            **({"blob": joined("blob", bool)} if blob else {})}


def _copy_candidates(cfg: dict, det, vol, lungs: np.ndarray, noise: tuple[float, float], reference,
                     with_peaks: bool) -> tuple[list[dict], list[dict]]:
    """One copy's candidates as screening takes them (the network's findings, capped and ordered as
    the stage does) and, ``with_peaks``, the resampling trace's peaks not among them, the smooth
    map's not among either and the blob map's not among any (else ``[]``), the first two maps from
    one pass (:func:`ctguard.verifier.lung_maps`)."""
    from ctguard.screen import peak_candidates, screen_volume
    from ctguard.verifier import blob_map, lung_extent, lung_maps

    result, heat, _ = screen_volume(vol, det, threshold=float(cfg["verifier_candidate_threshold"]), stage2=False)
    found = taken_candidates(result["findings"], vol, lungs, int(cfg["verifier_max_candidates"]), trace_order(cfg), noise[0], reference)
    if not with_peaks:
        return found, []
    n_trace, n_smooth, n_blob = trace_peaks_of(cfg), smooth_peaks_of(cfg), blob_peaks_of(cfg)
    extent = lung_extent(lungs)
    trace, smooth = lung_maps(vol, lungs, noise[0], trace=n_trace > 0, smooth=n_smooth > 0, extent=extent)
    extra = peak_candidates(heat, vol, trace, n_trace, found)
    extra += peak_candidates(heat, vol, smooth, n_smooth, found + extra, "smooth")
    return found, extra + (peak_candidates(heat, vol, blob_map(vol, lungs, extent), n_blob, found + extra, "blob") if n_blob else [])


def _trace_rows(cfg: dict, spec: tuple, model_path: str) -> dict:
    from ctguard.engine.train3d import build_source, spec_seed
    from ctguard.lung import lung_mask
    from ctguard.screen import load_detector

    src = build_source(cfg, spec)
    parts = []
    if not too_thick(spec, src):
        det = load_detector(model_path)
        lungs = lung_mask(src.volume)
        trace_scan = stage_features(cfg)[3]
        for k, (_, vol, edits) in enumerate(source_copies(cfg, src, spec_seed(cfg, spec) + SEED_OFFSET)):
            noise = scan_noise(vol, lungs)
            reference = scan_trace(vol, lungs, noise[0]) if trace_scan else None
            _, extra = _copy_candidates(cfg, det, vol, lungs, noise, reference, with_peaks=True)
            parts.append(_candidate_rows(cfg, vol, noise, reference, extra, edits, src.tumours, k))
    return _as_rows(parts, len(row_names(cfg)), blob=blob_peaks_of(cfg) > 0)


def off_centre_of(cfg: dict) -> int:
    """The config's ``verifier_off_centre`` (0: off), or a one-line error where it is not a whole
    number from 0, or where a patch CNN (which needs each row's patch) would read the stage's rows."""
    value = {**VERIFIER_DEFAULTS, **cfg}["verifier_off_centre"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"the config's verifier_off_centre must be a whole number of places an edit, 0 or more, not {value!r}")
    if value and config_flag(cfg, "verifier_patches"):
        raise InputError("the config's verifier_off_centre cannot be used with verifier_patches")
    return value


def off_centre_rows(job: tuple) -> dict:
    """One source's rows off its edits' centres (a pool task, for ``verifier_off_centre`` n): on each
    edited copy, n places around each edit (:func:`off_centre_place`), labelled with the edit, so
    that the trees learn an edit where screening's candidates fall (the network's 8 mm cells and
    the maps' peaks rarely sit on its centre), not only at its centre. Kept beside the source's
    other rows under their key and n; none is a candidate, so the threshold's rule never counts them."""
    cfg, spec, model_path = job
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    return _kept_rows(model_path, row_key(cfg, spec, model_path) | {"off_centre": off_centre_of(cfg), "off_centre_mm": list(OFF_CENTRE_MM)},
                      lambda: _off_centre_rows(cfg, spec, model_path))


def _off_centre_rows(cfg: dict, spec: tuple, model_path: str) -> dict:
    from ctguard.engine.train3d import build_source, spec_seed
    from ctguard.lung import lung_mask
    from ctguard.screen import load_detector, score_locations

    src = build_source(cfg, spec)
    width, n = len(row_names(cfg)), off_centre_of(cfg)
    if too_thick(spec, src):
        return _as_rows([], width)
    det = load_detector(model_path)
    lungs = lung_mask(src.volume)
    seed = spec_seed(cfg, spec) + SEED_OFFSET
    rng = np.random.default_rng([seed, 9])
    trace_scan = stage_features(cfg)[3]
    parts = []
    for k, (_, vol, edits) in enumerate(source_copies(cfg, src, seed)):
        if not edits:
            continue
        noise = scan_noise(vol, lungs)
        reference = scan_trace(vol, lungs, noise[0]) if trace_scan else None
        where = [(e, q) for e in edits for q in (off_centre_place(e.voxel, e.diameter_mm, vol.spacing, lungs, rng) for _ in range(n)) if q is not None]
        if not where:
            continue
        at = np.asarray([q for _, q in where], float)
        parts.append({"x": rows_at(cfg, vol, at, score_locations(vol, det, at, stage2=False), noise, reference),
                      "y": [LABELS[e.kind] for e, _ in where], "rim_mm": [rim_mm(q, e.voxel, e.diameter_mm, vol.spacing) for e, q in where],
                      "scan": [k] * len(where), "clean": [False] * len(where), "candidate": [False] * len(where), "lesion": [False] * len(where)})
    return _as_rows(parts, width)


def off_centre_place(centre, diameter_mm: float, spacing, lungs: np.ndarray, rng: np.random.Generator, tries: int = 20) -> np.ndarray | None:
    """A random lung voxel ``(z, y, x)`` around an edit at ``centre``: in a random direction, from
    :data:`OFF_CENTRE_MM`'s first distance from the centre to its second past the rim (mm), uniform
    in distance; None where ``tries`` draws all fall outside the lungs or the scan."""
    spacing, centre = np.asarray(spacing, float), np.asarray(centre, float)
    for _ in range(tries):
        u = rng.normal(size=3)
        r = rng.uniform(OFF_CENTRE_MM[0], diameter_mm / 2 + OFF_CENTRE_MM[1])
        q = centre + u / np.linalg.norm(u) * r / spacing
        v = np.rint(q).astype(int)
        if np.all(v >= 0) and np.all(v < np.asarray(lungs.shape)) and lungs[tuple(v)]:
            return q
    return None


def joined_off_centre(parts: list[dict], extra: list[dict]) -> list[dict]:
    """Each source's rows followed by its rows off its edits' centres (:func:`off_centre_rows`; the
    same sources, in order): no candidate, clean copy, lesion or map's peak among them, and each
    row's ``rim_mm`` where the source's kept rows hold it."""
    out = []
    for p, e in zip(parts, extra):
        m = len(e["y"])
        joined = {}
        for key, v in p.items():
            if not isinstance(v, np.ndarray) or len(v) != len(p["y"]):
                joined[key] = v
            elif key in e:
                joined[key] = np.concatenate([v, e[key].astype(v.dtype)])
            else:  # peak, blob: none of these rows
                joined[key] = np.concatenate([v, np.zeros(m, v.dtype)])
        out.append(joined)
    return out


def joined_peaks(parts: list[dict], peaks: list[dict]) -> list[dict]:
    """Each source's rows followed by its rows at the maps' peaks (the same sources, in order), with
    ``peak`` marking the latter (and each row's ``rim_mm`` where both kept rows hold it)."""
    return [{**{k: v for k, v in p.items() if k != "rim_mm"},
             **{k: np.concatenate([p[k], t[k].astype(p[k].dtype)]) for k in ("x", "y", "scan", "clean", "candidate", "lesion")
                + (("rim_mm",) if "rim_mm" in p and "rim_mm" in t else ())},
             "peak": np.arange(len(p["y"]) + len(t["y"])) >= len(p["y"]),
             **({"blob": np.concatenate([np.zeros(len(p["y"]), bool), t["blob"]])} if "blob" in t else {})}
            for p, t in zip(parts, peaks)]


def _source_rows(cfg: dict, spec: tuple, model_path: str) -> dict:
    """The rows of one source: ``x``, ``y`` (0 untouched, 1 injected, 2 removed), ``scan`` (which
    copy), ``clean`` (a candidate on the untouched copy), ``candidate`` (one of the network's
    candidates, as screening re-scores them), ``lesion`` (at a genuine lesion of the untouched copy:
    the lesion's centre, or a candidate near it) and ``group`` (the patient)."""
    return _rows_of_copies(cfg, spec, model_path, with_peaks=False)[0]


def _rows_of_copies(cfg: dict, spec: tuple, model_path: str, with_peaks: bool) -> tuple[dict, dict | None]:
    """:func:`_source_rows` and, ``with_peaks``, :func:`_trace_rows` (the same rows) from one pass
    over the source's copies."""
    from ctguard.engine.train3d import build_source, spec_seed
    from ctguard.lung import lung_depth, lung_mask
    from ctguard.screen import load_detector, score_locations

    src = build_source(cfg, spec)
    # Each phantom is its own patient; a real scan's patient is its PatientID (or its file's name).
    group = (src.patient or Path(str(spec[1])).name) if spec[0] == "series" else f"phantom {spec[1]}"
    width = len(row_names(cfg))
    with_patches = bool(cfg["verifier_patches"])
    about = {"group": group, "source": str(spec[1])}
    if too_thick(spec, src):
        return _as_rows([], width) | about | \
            ({"patches": np.zeros((0, PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE), np.float16)} if with_patches else {}), \
            (_as_rows([], width, blob=blob_peaks_of(cfg) > 0) if with_peaks else None)
    det = load_detector(model_path)
    seed = spec_seed(cfg, spec) + SEED_OFFSET
    lungs = lung_mask(src.volume)
    depth = lung_depth(src.volume, lungs)
    rng = np.random.default_rng([seed, 5])
    trace_scan = stage_features(cfg)[3]
    parts, peak_parts, patches = [], [], []
    for k, (_, vol, edits) in enumerate(source_copies(cfg, src, seed)):
        noise = scan_noise(vol, lungs)
        trace_reference = scan_trace(vol, lungs, noise[0]) if trace_scan else None
        if edits:
            where = [(e.kind, np.asarray(e.voxel, float)) for e in edits]
        else:
            where = negatives(src, lungs, depth, rng)
        at = np.asarray([p for _, p in where], float)
        parts.append({"x": rows_at(cfg, vol, at, score_locations(vol, det, at, stage2=False), noise, trace_reference),
                      "y": [LABELS.get(what, 0) for what, _ in where], "scan": [k] * len(where), "clean": [False] * len(where),
                      "rim_mm": [-e.diameter_mm / 2 for e in edits] if edits else [np.nan] * len(where),
                      "candidate": [False] * len(where), "lesion": [what == "real lesion" for what, _ in where]})
        if with_patches:
            patches.append(patches_at(vol, at, noise))
        found, extra = _copy_candidates(cfg, det, vol, lungs, noise, trace_reference, with_peaks)
        parts.append(_candidate_rows(cfg, vol, noise, trace_reference, found, edits, src.tumours, k))
        if found and with_patches:
            patches.append(patches_at(vol, np.asarray([f["voxel"] for f in found], float), noise))
        if with_peaks:
            peak_parts.append(_candidate_rows(cfg, vol, noise, trace_reference, extra, edits, src.tumours, k))
    rows = _as_rows(parts, width) | about | ({"patches": np.concatenate(patches)} if with_patches else {})
    return rows, (_as_rows(peak_parts, width, blob=blob_peaks_of(cfg) > 0) if with_peaks else None)


def verifier_specs(cfg: dict) -> list[tuple]:
    """The sources the second stage learns from: every real scan of the run, and fresh varied phantoms."""
    from ctguard.engine.train3d import real_scans

    base = int(cfg["seed"]) * 1000 + 900
    # The same chests whatever the setting; "all" and "none" decide whether each has its own genuine nodule
    # (drawn by the renderer of the drawn-injection family, under the scanner's blur and noise).
    own = phantom_lesions(cfg)
    return [("phantom", base + k, *own) for k in range(int(cfg["verifier_phantoms"]))] + \
           [("fixed phantom", base + 50 + k, *own) for k in range(int(cfg["verifier_fixed_phantoms"]))] + \
           [("series", p, 1, t, 0) for p, t in real_scans(cfg)] + \
           [("series", p, f, t, 0) for f in thick_factors(cfg) for p, t in real_scans(cfg)]


def nodule_specs(cfg: dict) -> list[tuple]:
    """The nodule check's own sources (``verifier_nodule_check``): fresh varied phantoms, each with a
    genuine nodule drawn under the scanner's blur and noise, that only the check learns from."""
    if not nodule_check_on(cfg):
        return []
    n = cfg["verifier_nodule_phantoms"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"the config's verifier_nodule_phantoms must be a whole number from 0, not {n!r}")
    return [("phantom", int(cfg["seed"]) * 1000 + NODULE_PHANTOM_SEED + k, True) for k in range(n)]


def nodule_check_on(cfg: dict) -> bool:
    """The config's ``verifier_nodule_check`` (:func:`config_flag`)."""
    return config_flag(cfg, "verifier_nodule_check")


def nodule_table(parts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The rows a nodule check learns from, as a mask over the sources' joined rows, and their labels:
    genuine lesions (0; their centres and the untouched copy's candidates near them) and injections
    (1; edit centres and the candidates that found them)."""
    lesion = np.concatenate([p["lesion"] for p in parts])
    y = np.concatenate([p["y"] for p in parts])
    rows = lesion | (y == 1)
    return rows, (y[rows] == 1).astype(int)


def thick_factors(cfg: dict) -> list[int]:
    """The config's ``verifier_thick`` (whole numbers from 2), or a one-line error."""
    value = cfg["verifier_thick"]
    if not isinstance(value, list) or any(isinstance(f, bool) or not isinstance(f, int) or f < 2 for f in value):
        raise InputError(f"the config's verifier_thick must be a list of whole numbers from 2 (slab factors), not {value!r}")
    return value


PHANTOM_LESIONS = {"some": (), "all": (True,), "none": (False,)}


def phantom_lesions(cfg: dict) -> tuple:
    """What the config's ``verifier_phantom_lesions`` adds to a phantom's spec, or a one-line error."""
    value = cfg["verifier_phantom_lesions"]
    if not isinstance(value, str) or value not in PHANTOM_LESIONS:
        raise InputError(f"the config's verifier_phantom_lesions must be one of {', '.join(PHANTOM_LESIONS)}, not {value!r}")
    return PHANTOM_LESIONS[value]


def boosting_classifier(cfg: dict):
    """The second stage's classifier: classic or histogram gradient boosting (``verifier_boosting``),
    300 trees of depth 4 at rate 0.05 by default, each split choosing from a share of the columns
    (``verifier_max_features``, half by default); with
    ``verifier_bagging`` k > 1 (histogram only), k such fits of other seeds averaged (:class:`AveragedTrees`)."""
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier

    kind, k, share = cfg["verifier_boosting"], bagging_of(cfg), max_features_of(cfg)
    if kind == "histogram":
        depth = int(cfg["verifier_depth"])

        def one(seed: int):
            return HistGradientBoostingClassifier(max_iter=int(cfg["verifier_trees"]), max_depth=depth, max_leaf_nodes=2**depth,
                                                  learning_rate=float(cfg["verifier_rate"]), min_samples_leaf=20, l2_regularization=1.0,
                                                  max_features=share, early_stopping=False, random_state=seed)
        return one(int(cfg["seed"])) if k == 1 else AveragedTrees([one(int(cfg["seed"]) + 1000 * j) for j in range(k)])
    if k != 1:
        raise InputError("the config's verifier_bagging needs verifier_boosting: histogram")
    if kind != "classic":
        raise InputError(f"the config's verifier_boosting must be classic or histogram, not {kind!r}")
    return GradientBoostingClassifier(n_estimators=int(cfg["verifier_trees"]), max_depth=int(cfg["verifier_depth"]),
                                      learning_rate=float(cfg["verifier_rate"]), subsample=0.8, min_samples_leaf=20, max_features=share,
                                      random_state=int(cfg["seed"]))


def max_features_of(cfg: dict) -> float:
    """The config's ``verifier_max_features``: the share of the columns each split of the stage's
    trees may choose from, over 0 and at most 1; a one-line error otherwise."""
    value = {**VERIFIER_DEFAULTS, **cfg}["verifier_max_features"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InputError(f"the config's verifier_max_features must be a share of the columns over 0 and at most 1, not {value!r}")
    return float(value)


def bagging_of(cfg: dict) -> int:
    """The config's ``verifier_bagging`` (1: one fit), or a one-line error where it is not a whole number from 1."""
    value = {**VERIFIER_DEFAULTS, **cfg}["verifier_bagging"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"the config's verifier_bagging must be a whole number of fits, 1 or more, not {value!r}")
    return value


class AveragedTrees:
    """Histogram-boosted classifiers of other seeds (each tree sees another half of the columns)
    fitted on the same rows, their raw scores averaged: one classifier to
    :meth:`ctguard.verifier.Verifier.from_sklearn`, whose trees are all of theirs with their leaves
    divided by their number, so that screening reads the average as it reads one fit."""

    def __init__(self, members: list):
        self.members = members

    def fit(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> "AveragedTrees":
        for m in self.members:
            m.fit(x, y, sample_weight=sample_weight)
        self.classes_ = self.members[0].classes_
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return np.mean([m.decision_function(x) for m in self.members], axis=0)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        d = self.decision_function(x)
        if d.ndim == 1:  # two classes: the second's raw score less the first's
            p = 1.0 / (1.0 + np.exp(-d))
            return np.column_stack([1.0 - p, p])
        e = np.exp(d - d.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    @property
    def _predictors(self) -> list:
        """Every member's trees (scikit-learn's fitted predictors, read as Verifier.from_sklearn reads
        one fit's), each leaf's value divided by the number of members."""
        from types import SimpleNamespace

        out = []
        for m in self.members:
            for step in m._predictors:
                copies = []
                for pred in step:
                    nodes = pred.nodes.copy()
                    nodes["value"] = nodes["value"] / len(self.members)
                    copies.append(SimpleNamespace(nodes=nodes))
                out.append(copies)
        return out


def blend_weight(cfg: dict) -> float:
    """The config's ``verifier_blend``, or a one-line error when it is not a weight from 0 to 1."""
    try:
        w = float(cfg["verifier_blend"])
    except (TypeError, ValueError):
        w = float("nan")
    if not 0.0 <= w <= 1.0:
        raise InputError(f"the config's verifier_blend must be a number from 0 to 1, not {cfg['verifier_blend']!r}")
    return w


def config_flag(cfg: dict, key: str) -> bool:
    """The config's ``key``, or a one-line error when it is not true or false."""
    on = cfg[key]
    if not isinstance(on, bool):
        raise InputError(f"the config's {key} must be true or false, not {on!r}")
    return on


def patch_weight(cfg: dict) -> float:
    """The patch CNN's share of the stage's probabilities: ``verifier_patch_weight`` with
    ``verifier_patches``, else 0; a one-line error for a wrong setting."""
    on, w, epochs = config_flag(cfg, "verifier_patches"), cfg["verifier_patch_weight"], cfg["verifier_patch_epochs"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < float(w) <= 1.0:
        raise InputError(f"the config's verifier_patch_weight must be a number over 0 and at most 1, not {w!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"the config's verifier_patch_epochs must be a whole number from 1, not {epochs!r}")
    return float(w) if on else 0.0


def cross_fit(cfg: dict) -> int:
    """The config's ``verifier_cross_fit`` (0, or 2 and more), or a one-line error."""
    value = cfg["verifier_cross_fit"]
    if isinstance(value, bool) or not isinstance(value, int) or value == 1 or value < 0:
        raise InputError(f"the config's verifier_cross_fit must be 0 (off) or a whole number from 2, not {value!r}")
    return value


def patient_of(entry: dict | str) -> str:
    """A training scan's patient: its ``real_scans`` entry's ``patient``, else the scan's file name."""
    if isinstance(entry, dict):
        return str(entry.get("patient") or Path(entry["scan"]).name)
    return Path(str(entry)).name


def scan_patients(cfg: dict) -> dict[str, str]:
    """Each training scan's path (as :func:`ctguard.engine.train3d.real_scans` gives it) and its
    patient (:func:`patient_of`), in the config's order."""
    entries = (cfg.get("real_series") or []) + (cfg.get("real_scans") or [])
    return {str(e["scan"] if isinstance(e, dict) else e): patient_of(e) for e in entries}


def cross_fit_groups(cfg: dict) -> list[list[str]]:
    """The training patients in ``verifier_cross_fit`` groups, dealt in turn in the config's order (so
    that a config listing patients by vendor or collection puts each on both sides); [] when off."""
    k = cross_fit(cfg)
    if not k:
        return []
    patients = list(dict.fromkeys(scan_patients(cfg).values()))
    if len(patients) < k:
        raise InputError(f"the config's verifier_cross_fit ({k}) needs at least as many training patients; it has {len(patients)}")
    return [patients[g::k] for g in range(k)]


def without_patients(cfg: dict, patients: list[str]) -> dict:
    """The run's config for a network trained without ``patients`` (a cross-fit network): no second
    stage, no cube file of its own (the per-source cache serves it)."""
    out = {**cfg, "verifier": False, "cache": None, "verifier_cross_fit": 0}
    out["real_series"] = [p for p in cfg.get("real_series") or [] if patient_of(p) not in patients]
    out["real_scans"] = [e for e in cfg.get("real_scans") or [] if patient_of(e) not in patients]
    return out


def stage_network(cfg: dict, out: Path, spec: tuple) -> str:
    """The network whose probabilities and candidates a source's rows hold: with ``verifier_cross_fit``,
    a real scan's rows come from the cross-fit network trained without its patient
    (``out/cross_fit{g}/model.pt``), so that every training patient's rows see a network that never
    saw the patient, as a held-out patient's scan does; phantoms' rows (fresh chests) and all rows
    without it come from the run's own network."""
    patient = scan_patients(cfg).get(str(spec[1])) if spec[0] == "series" else None
    for g, patients in enumerate(cross_fit_groups(cfg)):
        if patient in patients:
            return str(out / f"cross_fit{g}" / "model.pt")
    return str(out / "model.pt")


def oof_folds(cfg: dict) -> int:
    """The config's ``verifier_oof_folds`` (0, or 2 and more), or a one-line error."""
    value = cfg["verifier_oof_folds"]
    if isinstance(value, bool) or not isinstance(value, int) or value == 1 or value < 0:
        raise InputError(f"the config's verifier_oof_folds must be 0 (one fit per patient left out) or a whole number from 2, not {value!r}")
    return value


def check_stage_config(cfg: dict) -> None:
    """Refuses a wrong ``verifier_boosting``, ``verifier_blend``, ``verifier_phantom_lesions``,
    ``verifier_oof_folds``, ``verifier_cross_fit``, ``verifier_thick``, ``verifier_scan_reference``,
    ``verifier_refine_from``, ``verifier_trace_order``, ``verifier_trace_peaks``, ``verifier_smooth_peaks``,
    ``verifier_blob_peaks``, ``verifier_blob_threshold``, ``verifier_shape``, ``verifier_label_mm``, ``verifier_bagging``, ``verifier_max_features``, ``verifier_off_centre`` or
    patch setting before anything is trained."""
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    boosting_classifier(cfg)
    blend_weight(cfg)
    phantom_lesions(cfg)
    oof_folds(cfg)
    cross_fit_groups(cfg)
    thick_factors(cfg)
    patch_weight(cfg)
    scan_reference_on(cfg)
    nodule_specs(cfg)
    refine_from(cfg)
    trace_order(cfg)
    trace_peaks_of(cfg)
    smooth_peaks_of(cfg)
    blob_peaks_of(cfg)
    peak_threshold_on(cfg)
    blob_threshold_on(cfg)
    triage_share(cfg)
    blind_on(cfg)
    config_flag(cfg, "verifier_shape")
    config_flag(cfg, "verifier_count_phantom_lesions")
    label_mm(cfg)
    bagging_of(cfg)
    off_centre_of(cfg)


def triage_share(cfg: dict) -> float | None:
    """The config's ``verifier_triage`` (None: no triage), or a one-line error, also where the stage
    would blend what the triage's probabilities cannot stand for (the network's or a patch CNN's
    share, a nodule check, a scan reference) or reads no re-centred places (nothing to save)."""
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    value = cfg["verifier_triage"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InputError(f"the config's verifier_triage must be a share from 0 up to 1 of the edits the stage finds, not {value!r}")
    if not config_flag(cfg, "verifier_recentre"):
        raise InputError("the config's verifier_triage needs verifier_recentre (the triage saves reading the re-centred places)")
    for key in ("verifier_blend", "verifier_patches", "verifier_nodule_check", "verifier_scan_reference"):
        if cfg.get(key):
            raise InputError(f"the config's verifier_triage cannot be used with {key}")
    return float(value)


def blind_on(cfg: dict) -> bool:
    """The config's ``verifier_blind``, or a one-line error, also where the stage reads no trace or
    blends in what the trace-blind trees cannot stand for (the network's or a patch CNN's share, a
    nodule check, a scan reference, re-centred second looks)."""
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    if not config_flag(cfg, "verifier_blind"):
        return False
    if not cfg["verifier_resampling"]:
        raise InputError("the config's verifier_blind needs verifier_resampling (its trees are the stage's without the trace)")
    for key in ("verifier_blend", "verifier_patches", "verifier_nodule_check", "verifier_scan_reference", "verifier_refine_from"):
        if cfg.get(key):
            raise InputError(f"the config's verifier_blind cannot be used with {key}")
    return True


def rows_with_ripple(cfg: dict, x: np.ndarray) -> np.ndarray:
    """Which rows ``x`` (as made, :func:`row_names`) are of scans whose pixels leave the resampling
    trace a ripple to read (:func:`ctguard.verifier.has_ripple`, from the row's ``log_pixel_mm``)."""
    return ripple_frequency(np.exp(x[:, row_names(cfg).index("log_pixel_mm")].astype(np.float64))) >= TRACE_MIN_FREQUENCY


def rippled_counted(cfg: dict, parts: list[dict], counted: np.ndarray) -> tuple[np.ndarray, int]:
    """With trace-blind trees (``verifier_blind``) the full trees score only scans with a ripple, so
    their threshold's rule counts only the untouched candidates of the training scans with one, per
    such scan: ``counted`` less the other scans' rows, and how many untouched scans are left. A
    training scan of about 1 mm pixels still teaches both trees; its candidates hold up only the
    trace-blind trees' thresholds."""
    rippled = [rows_with_ripple(cfg, p["x"]) for p in parts]  # a source's rows are all of one scan set-up
    return counted & np.concatenate(rippled), sum(bool(r.any()) for r in rippled)


def fit_blind(cfg: dict, parts: list[dict], x: np.ndarray, y: np.ndarray, groups: np.ndarray, counted: np.ndarray, n_clean: int,
              folds: int, weight: np.ndarray | None = None) -> tuple[Verifier, np.ndarray, dict]:
    """The trace-blind trees: the stage's trees refitted on the same rows without any column that
    reads the resampling trace (:func:`ctguard.verifier.reads_trace`), for scans whose pixels lie
    within :data:`ctguard.verifier.TRACE_MIN_FREQUENCY` of a whole millimetre, where the trace reads
    nothing and the full trees, which learnt that an edit ripples, see edits as untouched. Their
    thresholds by the same out-of-patient rule on the same untouched training candidates
    (``counted``), the trace map's peaks among them, which such a scan does not have: stricter than
    needed, never laxer. No triage: every candidate of such a scan is read whole. Returns the trees,
    every row's out-of-patient score and the run's ``blind`` report."""
    names, columns = tree_columns(cfg)
    left_out = [names[k] for k in columns if reads_trace(names[k])]
    columns = np.asarray([k for k in columns if not reads_trace(names[k])])
    fit_x = finite_rows(x[:, columns])
    oof = 1.0 - out_of_patient_with(cfg, x, fit_x, y, groups, folds=folds, weight=weight)[0][:, 0]
    threshold, peak_threshold, blob_threshold, _ = stage_thresholds(cfg, parts, oof, counted, n_clean)
    meta = {"names": names, "threshold": threshold, **({"peak_threshold": peak_threshold} if peak_threshold is not None else {}),
            **({"blob_threshold": blob_threshold} if blob_threshold is not None else {})}
    blind = Verifier.from_sklearn(boosting_classifier(cfg).fit(fit_x, y, sample_weight=weight), x, meta, columns=columns)
    report = {**blind.thresholds(), "columns_left_out": len(left_out), "columns": int(len(columns)),
              **clean_candidates_report(oof, counted, groups, n_clean)}
    return blind, oof, report


def clean_candidates_report(oof: np.ndarray, counted: np.ndarray, groups: np.ndarray, n_clean: int) -> dict:
    """The untouched training candidates as a threshold's rule counts them (``counted``, over
    ``n_clean`` untouched scans), from their out-of-patient scores ``oof``: how many a scan lie over
    each threshold of the grid (``false_per_clean_scan_oof``) and the five highest, with their
    patient or phantom (``highest_clean_candidates_oof``: what sets the threshold)."""
    clean_oof, clean_groups = oof[counted], groups[counted]
    top = np.argsort(-clean_oof, kind="stable")[:5]
    return {"false_per_clean_scan_oof": {str(t): round(float((clean_oof >= t).sum() / n_clean), 3) for t in GRID},
            "highest_clean_candidates_oof": [{"group": str(clean_groups[i]), "score": round(float(clean_oof[i]), 4)} for i in top]}


def fit_triage(cfg: dict, x: np.ndarray, y: np.ndarray, groups: np.ndarray, clean: np.ndarray, oof: np.ndarray,
               threshold: float | np.ndarray, folds: int, weight: np.ndarray | None = None) -> tuple[Verifier, float, np.ndarray, dict]:
    """The triage: trees over each row's place alone (:func:`ctguard.verifier.point_rows`, the
    network's columns with them), which screening reads first at every candidate. Its cut-off is the
    highest of :data:`TRIAGE_GRID` under which its out-of-patient score puts at most the config's
    ``verifier_triage`` share of the edit rows that the stage's out-of-patient score ``oof`` finds at
    ``threshold`` (one for all, or each row's own). Returns the triage, its cut-off, every row's out-of-patient triage score and
    what the cut-off passes and loses (the run's ``triage_fit``). ``weight``: each row's weight in its
    fits (:func:`label_weights`; None: all alike); the edit rows it does not learn from do not count
    among those lost."""
    names = row_names(cfg)
    width = point_width(names)
    names = names[:width] + names[-3:]
    columns = np.asarray([k for k, n in enumerate(names) if cfg["verifier_scan_columns"] or n not in SCAN_COLUMNS])
    xp = point_rows(x, width)
    fit_x = finite_rows(xp[:, columns])
    score = 1.0 - out_of_patient_with(cfg, xp, fit_x, y, groups, folds=folds, weight=weight)[0][:, 0]
    found = (oof >= threshold) & (y > 0) & (True if weight is None else weight > 0)
    allowed = float(cfg["verifier_triage"]) * found.sum()
    cut = float(max((c for c in TRIAGE_GRID if ((score < c) & found).sum() <= allowed), default=0.0))
    triage = Verifier.from_sklearn(boosting_classifier(cfg).fit(fit_x, y, sample_weight=weight), xp, {"names": names, "triage_width": width}, columns=columns)
    fit = {"cut_off": cut, "rows_passed": round(float((score >= cut).mean()), 3),
           "untouched_candidates_passed": round(float((score[clean] >= cut).mean()), 3),
           "found_edit_rows_lost": f"{int(((score < cut) & found).sum())}/{int(found.sum())}"}
    return triage, cut, score, fit


def joined_rows(parts: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sources' rows (:func:`source_rows`) as one table: ``x``, ``y``, each row's group (its
    patient or phantom) and whether it is a candidate on an untouched copy."""
    x = np.concatenate([p["x"] for p in parts])
    y = np.concatenate([p["y"] for p in parts]).astype(int)
    groups = np.concatenate([[p["group"]] * len(p["y"]) for p in parts])
    clean = np.concatenate([p["clean"] for p in parts])
    return x, y, groups, clean


def label_weights(cfg: dict, parts: list[dict]) -> np.ndarray | None:
    """Each row's weight in the stage's fits with ``verifier_label_mm`` r (None: off, every row
    alike): 0 for a candidate labelled with an edit that lies more than r mm outside its rim, where
    its place may show nothing of the edit (the label's own reach is 10 mm, :func:`near`), else 1.
    Such rows are still scored out of patient; the threshold's rule never counts them (they are on
    edited copies). A one-line error where kept rows predate the rim's distance."""
    reach = label_mm(cfg)
    if reach is None:
        return None
    stale = next((str(p.get("source", "?")) for p in parts if "rim_mm" not in p), None)
    if stale is not None:
        raise InputError(f"verifier_label_mm needs each row's distance from its edit, which the kept rows of {stale} lack: "
                         "remove the run's verifier_rows/ to make them again")
    rim = np.concatenate([p["rim_mm"] for p in parts]).astype(float)
    y = np.concatenate([p["y"] for p in parts])
    return np.where((y > 0) & (rim > reach), 0.0, 1.0)


def label_mm(cfg: dict) -> float | None:
    """The config's ``verifier_label_mm`` (None: off), or a one-line error where it is not a distance
    from 0 to under the label's own reach of 10 mm, or where a patch CNN, which learns every row,
    would ignore it."""
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    value = cfg["verifier_label_mm"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 10.0:
        raise InputError(f"the config's verifier_label_mm must be a distance from 0 to under 10 mm (or null: off), not {value!r}")
    if config_flag(cfg, "verifier_patches"):
        raise InputError("the config's verifier_label_mm cannot be used with verifier_patches")
    return float(value)


def stage_table(cfg: dict, parts: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sources' rows as the trees are given them (:func:`joined_rows`; with
    ``verifier_scan_reference``, each copy's rows read against its candidates first)."""
    return joined_rows([with_scan_reference(p) for p in parts] if scan_reference_on(cfg) else parts)


def refine_table(parts: list[dict], refined: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The re-centred places' rows (:func:`refine_rows`) of every source as one table, and for each
    the index of the untouched candidate row it belongs to in the sources' joined rows."""
    xs, owner, start = [], [], 0
    for part, ref in zip(parts, refined):
        rows = start + np.flatnonzero(part["clean"])
        if len(rows) != len(ref["x"]):
            raise RuntimeError(f"source {part['source']}: {len(ref['x'])} candidates re-centred, {len(rows)} untouched candidate rows")
        xs.append(ref["x"].reshape(-1, ref["x"].shape[-1]))
        owner.append(np.repeat(rows, 2))
        start += len(part["y"])
    return np.concatenate(xs), np.concatenate(owner).astype(int)


def stage_rows(cfg: dict, specs: list[tuple], jobs: list[tuple], pool=None, progress: bool = False) -> tuple[list[tuple], list[dict], list[dict]]:
    """The rows of ``jobs``, the stage's sources ``specs`` first and any others (the nodule check's)
    after them: the stage's sources that gave rows, their rows (each source's followed by its rows
    at the trace's peaks where the config asks for them: :func:`source_and_trace_rows`) and the
    other sources' rows (:func:`source_rows`)."""
    from tqdm import tqdm

    peaks = map_peaks(cfg)
    run = pool.imap if pool is not None else map
    stage = list(tqdm(run(source_and_trace_rows if peaks else source_rows, jobs[: len(specs)]), total=len(specs),
                      desc="second stage: rows" + (" and trace rows" if peaks else ""), disable=not progress))
    others = list(tqdm(run(source_rows, jobs[len(specs):]), total=len(jobs) - len(specs), desc="second stage: nodule rows",
                       disable=not progress or len(jobs) == len(specs)))
    parts = [p[0] for p in stage] if peaks else stage
    kept = [k for k, p in enumerate(parts) if len(p["y"])]  # a thicker-slice version past THICK_MAX_MM gives none
    parts = [parts[k] for k in kept]
    if peaks:
        parts = joined_peaks(parts, [stage[k][1] for k in kept])
    if off_centre_of(cfg):
        extra = list(tqdm(run(off_centre_rows, [jobs[k] for k in kept]), total=len(kept), desc="second stage: rows off the edits' centres",
                          disable=not progress))
        parts = joined_off_centre(parts, extra)
    return [specs[k] for k in kept], parts, others


def run_rows(run: Path) -> tuple[dict, list[tuple], list[dict]]:
    """A trained run's resolved config, its stage's sources that gave rows and their rows (from
    ``verifier_rows/`` where kept, else made again): for studying a run's stage without fitting it."""
    cfg = {**VERIFIER_DEFAULTS, **json.loads((Path(run) / "config.json").read_text())}
    jobs = [(cfg, spec, stage_network(cfg, Path(run), spec)) for spec in verifier_specs(cfg)]
    specs, parts, _ = stage_rows(cfg, [j[1] for j in jobs], jobs)
    return cfg, specs, parts


def rows_at(cfg: dict, vol, places: np.ndarray, p_network: np.ndarray, noise: tuple[float, float], reference) -> np.ndarray:
    """The stage's rows at ``places`` of one copy (:func:`ctguard.verifier.stage_inputs` with what the
    config's :func:`stage_features` read, on one thread: each is a pool task's), the network's
    probabilities ``p_network`` there; ``reference``: the copy's :func:`ctguard.verifier.scan_trace`
    where the rows read the trace less the scan's own, else None."""
    recentre, resampling, trace_recentre, _, shape = stage_features(cfg)
    return stage_inputs(vol, places, p_network, noise, threads=1, recentre=recentre, resampling=resampling,
                        trace_recentre=trace_recentre, trace_reference=reference, shape=shape)


def stage_features(cfg: dict) -> tuple[bool, bool, bool, bool, bool]:
    """What a row reads (:func:`ctguard.verifier.features_at`): ``recentre``, ``resampling``,
    ``trace_recentre`` (which needs both), ``trace_scan`` (which needs ``resampling``) and ``shape``."""
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    recentre, resampling = bool(cfg["verifier_recentre"]), bool(cfg["verifier_resampling"])
    return (recentre, resampling, recentre and resampling and bool(cfg["verifier_trace_recentre"]),
            resampling and bool(cfg["verifier_trace_scan"]), bool(cfg["verifier_shape"]))


def row_names(cfg: dict) -> list[str]:
    """The names of a row's columns as made (:func:`ctguard.verifier.stage_inputs`)."""
    return feature_names(*stage_features(cfg)) + ["log_p_injected", "log_p_removed", "log_p_genuine"]


def tree_columns(cfg: dict) -> tuple[list[str], np.ndarray]:
    """The names of the columns the trees are given and the indices of those they read: without the
    scan's own columns (``verifier_scan_columns: false``) the trees cannot tell one training scan from
    another by its slice thickness or noise; they still read every residual as a ratio to that
    noise. With ``verifier_scan_reference`` each column comes twice: as made, then less the median
    over the scan's candidates (``NAME_vs_scan``)."""
    names = row_names(cfg)
    columns = [k for k, n in enumerate(names) if cfg["verifier_scan_columns"] or n not in SCAN_COLUMNS]
    if scan_reference_on(cfg):
        columns += [len(names) + k for k in columns]
        names = names + [f"{n}_vs_scan" for n in names]
    return names, np.asarray(columns)


def scan_reference_on(cfg: dict) -> bool:
    """The config's ``verifier_scan_reference`` (:func:`config_flag`)."""
    return config_flag(cfg, "verifier_scan_reference")


def with_scan_reference(part: dict) -> dict:
    """A source's rows (:func:`source_rows`) with each copy's rows read against that copy's
    candidates (:func:`ctguard.verifier.scan_referenced`), as screening reads a scan's candidates
    against themselves; a copy without candidates is its own reference."""
    x = np.zeros((len(part["y"]), 2 * part["x"].shape[1]), np.float32)
    for k in np.unique(part["scan"]):
        copy = part["scan"] == k
        ref_rows = copy & part["candidate"]
        x[copy] = scan_referenced(part["x"][copy], scan_reference(part["x"][ref_rows if ref_rows.any() else copy]))
    return {**part, "x": x}


def threshold_counted(cfg: dict, parts: list[dict], clean: np.ndarray) -> np.ndarray:
    """The untouched training candidates the threshold's rule counts: every one of ``clean``, or with
    ``verifier_count_phantom_lesions: false`` all but the stage phantoms' candidates at their own
    genuine nodules. Those nodules are drawn by the drawn-injection family's renderer, so nothing
    tells them from a drawn injection but their label; no clinical scan holds one, and counted they
    set the threshold where no real scan's place scores. The real patients' lesions are counted
    (``clean`` and ``parts``' rows in the order :func:`stage_table` joins them)."""
    if config_flag({**VERIFIER_DEFAULTS, **cfg}, "verifier_count_phantom_lesions"):
        return clean
    phantom_lesion = np.concatenate([np.asarray(p["lesion"], bool) & str(p["group"]).startswith("phantom ") for p in parts])
    return clean & ~phantom_lesion


def choose_threshold(scores: np.ndarray, clean: np.ndarray, n_clean_scans: int, max_false: float) -> float:
    """The lowest GRID threshold giving at most ``max_false`` candidates over it per untouched scan."""
    return lowest_within(lambda t: (scores[clean] >= t).sum() / max(n_clean_scans, 1), max_false)


def choose_thresholds(scores: np.ndarray, clean: np.ndarray, peak: np.ndarray | None, n_clean_scans: int,
                      max_false: float) -> tuple[float, float | None]:
    """The stage's threshold and, where ``peak`` marks the rows at the maps' peaks, the peaks' own
    (else None): each the lowest GRID threshold giving at most half of ``max_false`` of its own
    source's candidates over it per untouched scan, so that the two together give at most
    ``max_false``. The network's candidates and the maps' peaks are scored by the same trees but are
    not alike: the untouched places a peak lands on are where the lung is rippled or smooth, and
    one threshold for both is set by whichever source's untouched places score highest."""
    if peak is None:
        return choose_threshold(scores, clean, n_clean_scans, max_false), None
    return tuple(choose_source_thresholds(scores, clean, peak.astype(int), 2, n_clean_scans, max_false))


def choose_source_thresholds(scores: np.ndarray, clean: np.ndarray, source: np.ndarray, n_sources: int, n_clean_scans: int,
                             max_false: float) -> list[float]:
    """:func:`choose_thresholds` for ``n_sources`` sources of candidates (``source``: each row's,
    0 to ``n_sources - 1``): each source's threshold by the rule on its own untouched candidates
    with ``max_false / n_sources``, so that all together give at most ``max_false``."""
    return [choose_threshold(scores, clean & (source == k), n_clean_scans, max_false / n_sources) for k in range(n_sources)]


def peak_threshold_on(cfg: dict) -> bool:
    """The config's ``verifier_peak_threshold``, or a one-line error, also where the stage takes no
    candidates from the maps' peaks."""
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    if not config_flag(cfg, "verifier_peak_threshold"):
        return False
    if not map_peaks(cfg):
        raise InputError("the config's verifier_peak_threshold needs candidates from the maps' peaks "
                         "(verifier_trace_peaks, verifier_smooth_peaks or verifier_blob_peaks)")
    return True


def peak_rows(cfg: dict, parts: list[dict]) -> np.ndarray | None:
    """Which of the stage's rows are at the maps' peaks, where the config gives the peaks a threshold
    of their own (:func:`peak_threshold_on`); else None."""
    return np.concatenate([p["peak"] for p in parts]) if peak_threshold_on(cfg) else None


def blob_threshold_on(cfg: dict) -> bool:
    """The config's ``verifier_blob_threshold``, or a one-line error, also where the maps' peaks have
    no threshold of their own or the stage takes no blob peaks."""
    cfg = {**VERIFIER_DEFAULTS, **cfg}
    if not config_flag(cfg, "verifier_blob_threshold"):
        return False
    if not (peak_threshold_on(cfg) and blob_peaks_of(cfg)):
        raise InputError("the config's verifier_blob_threshold needs verifier_blob_peaks and verifier_peak_threshold")
    return True


def blob_rows(cfg: dict, parts: list[dict]) -> np.ndarray | None:
    """Which of the stage's rows are at the blob map's peaks, where those get a threshold of their
    own (:func:`blob_threshold_on`); else None."""
    if not blob_threshold_on(cfg):
        return None
    return np.concatenate([p.get("blob", np.zeros(len(p["y"]), bool)) for p in parts])


def stage_thresholds(cfg: dict, parts: list[dict], scores: np.ndarray, clean: np.ndarray,
                     n_clean: int) -> tuple[float, float | None, float | None, np.ndarray | float]:
    """The stage's thresholds by the out-of-patient rule (:func:`choose_thresholds`): the network's
    candidates', the maps' peaks' (None where they have none of their own) and the blob map's peaks'
    (None where they have none of their own: then the other peaks'), and each row's."""
    peak, blob = peak_rows(cfg, parts), blob_rows(cfg, parts)
    max_false = float(cfg["verifier_max_false"])
    if peak is None:
        threshold = choose_threshold(scores, clean, n_clean, max_false)
        return threshold, None, None, threshold
    source = peak.astype(int) if blob is None else np.where(blob, 2, peak.astype(int))
    each = choose_source_thresholds(scores, clean, source, 2 if blob is None else 3, n_clean, max_false)
    return each[0], each[1], each[2] if blob is not None else None, np.asarray(each)[source]


def lowest_within(false_per_scan: Callable[[float], float], max_false: float) -> float:
    """The lowest GRID threshold ``t`` with ``false_per_scan(t) <= max_false`` (the grid's top where none is)."""
    for t in GRID:
        if false_per_scan(float(t)) <= max_false:
            return float(t)
    return float(GRID[-1])


def patient_splits(groups: np.ndarray, folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` row indices that keep each patient (or phantom) on one side: ``folds``
    grouped folds, or 0: one split for each patient left out. The trees' and the patch CNN's
    out-of-patient scores use the same splits."""
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    split = LeaveOneGroupOut() if folds == 0 else GroupKFold(n_splits=min(folds, len(set(groups.tolist()))))
    return list(split.split(np.zeros(len(groups)), groups=groups))


def out_of_patient_scores(cfg: dict, x: np.ndarray, fit_x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5,
                          weight: np.ndarray | None = None) -> np.ndarray:
    """Each row's stage score, 1 - P(genuine) of :func:`out_of_patient_probabilities`."""
    return 1.0 - out_of_patient_probabilities(cfg, x, fit_x, y, groups, folds, weight)[:, 0]


def out_of_patient_probabilities(cfg: dict, x: np.ndarray, fit_x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5,
                                 weight: np.ndarray | None = None) -> np.ndarray:
    """Each row's ``(genuine, injected, removed)`` probabilities, blended with the network's as
    ``verifier_blend`` says, from trees fitted without its patient: ``folds`` grouped folds (0: one
    fit for each patient or phantom left out). ``x``: the rows (:func:`stage_table`; the network's
    probabilities in the last three of the columns as made); ``fit_x``: the columns the trees read;
    ``weight``: each row's weight in the fits (None: all alike)."""
    return out_of_patient_with(cfg, x, fit_x, y, groups, folds, weight)[0]


def out_of_patient_with(cfg: dict, x: np.ndarray, fit_x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5,
                        weight: np.ndarray | None = None, extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`out_of_patient_probabilities`, and those of ``extra`` rows ``(x, fit_x, groups)``
    that no tree learns from (a candidate's re-centred places), each from the trees fitted without
    its patient."""
    ex, efit, egroups = extra if extra is not None else (np.zeros((0, x.shape[1]), x.dtype), np.zeros((0, fit_x.shape[1]), fit_x.dtype),
                                                          np.zeros(0, groups.dtype))
    p, q = np.zeros((len(y), 3)), np.zeros((len(ex), 3))
    for tr, te in patient_splits(groups, folds):
        clf = boosting_classifier(cfg).fit(fit_x[tr], y[tr], sample_weight=None if weight is None else weight[tr])
        cls = clf.classes_.astype(int)
        p[np.ix_(te, cls)] = clf.predict_proba(fit_x[te])
        also = np.flatnonzero(np.isin(egroups, np.unique(groups[te])))
        if len(also):
            q[np.ix_(also, cls)] = clf.predict_proba(efit[also])
    w = blend_weight(cfg)
    if w:  # blended as screening blends them: with the network's probabilities at each row's place (the last three columns as made)
        made = len(row_names(cfg))
        p = (1.0 - w) * p + w * network_probabilities(x[:, made - 3:made])
        q = (1.0 - w) * q + w * network_probabilities(ex[:, made - 3:made])
    return p, q


def nodule_columns(cfg: dict) -> np.ndarray:
    """The columns a nodule check reads: the trees' (:func:`tree_columns`) less the network's
    probabilities, which call genuine nodules injected as readily as injections."""
    names, columns = tree_columns(cfg)
    return np.asarray([k for k in columns if not names[k].startswith("log_p_")])


def fit_nodule_check(cfg: dict, parts: list[dict], nodule_parts: list[dict], x: np.ndarray, groups: np.ndarray,
                     folds: int) -> tuple[Verifier, np.ndarray]:
    """The nodule check (``verifier_nodule_check``): two-class trees of the stage's kind, genuine
    nodule or injected, fitted on the training sources' genuine lesions and injections
    (:func:`nodule_table`) and on those of the check's own phantoms (:func:`nodule_specs`; their rows
    read as the stage's are, :func:`stage_table`). Returns the trees (their meta says how many rows
    they learnt from) and each stage row's P(injected rather than genuine) from trees fitted without
    its patient (the same splits as the stage's; the phantoms in every fit)."""
    columns = nodule_columns(cfg)
    own, label = nodule_table(parts)
    ph_x, ph_label = np.zeros((0, len(columns)), np.float32), np.zeros(0, int)
    if nodule_parts:
        ph_rows, ph_label = nodule_table(nodule_parts)
        ph_x = finite_rows(stage_table(cfg, nodule_parts)[0][ph_rows][:, columns])
    fit_x = finite_rows(x[:, columns])
    if len(set(label.tolist()) | set(ph_label.tolist())) < 2:
        raise InputError("the nodule check needs genuine lesions and injections among its rows; give it verifier_nodule_phantoms")
    every = np.full(len(x), -1)
    every[own] = label
    q = np.ones(len(x))
    for tr, te in patient_splits(groups, folds):
        tr = tr[own[tr]]
        trees = boosting_classifier(cfg).fit(np.concatenate([fit_x[tr], ph_x]), np.concatenate([every[tr], ph_label]))
        q[te] = trees.predict_proba(fit_x[te])[:, list(trees.classes_).index(1)] if 1 in trees.classes_ else 0.0
    all_x, all_y = np.concatenate([fit_x[own], ph_x]), np.concatenate([label, ph_label])
    trees = boosting_classifier(cfg).fit(all_x, all_y)
    meta = {"names": tree_columns(cfg)[0], "what": "genuine nodule (0) or injected (1)", "rows": int(len(all_y)),
            "genuine": int((all_y == 0).sum()), "injected": int((all_y == 1).sum()), "phantoms": len(nodule_parts)}
    return Verifier.from_sklearn(trees, x, meta, columns=columns), q


def fit_verifier(cfg: dict, out: Path, pool=None, echo=print, progress: bool = False) -> dict:
    """Fits the second stage on the run in ``out`` (its ``model.pt``); writes ``model.verifier.npz``,
    ``verifier.json`` (rows, threshold, out-of-patient counts; returned) and ``verifier_oof.npz``
    (every row's out-of-patient score, the trees' and with ``verifier_patches`` the CNN's, its
    label, patient and whether it is a clean copy's candidate)."""
    from tqdm import tqdm

    cfg = {**VERIFIER_DEFAULTS, **cfg}
    t0 = time.time()
    specs, nodule_sources = verifier_specs(cfg), nodule_specs(cfg)
    jobs = [(cfg, spec, stage_network(cfg, out, spec)) for spec in specs + nodule_sources]
    specs, parts, nodule_parts = stage_rows(cfg, specs, jobs, pool, progress)
    x, y, groups, clean = stage_table(cfg, parts)
    n_clean = len(parts)  # one untouched copy per source
    t_rows = time.time() - t0
    echo(f"second stage: {len(y)} rows from {len(parts)} sources ({int((y == 1).sum())} injected, {int((y == 2).sum())} removed; "
         f"{t_rows:.0f} s)")
    if set(np.unique(y)) != {0, 1, 2}:
        raise InputError(f"the second stage needs untouched, injected and removed rows; it has only classes {sorted(set(y.tolist()))}")
    n_groups = len(set(groups))
    if n_groups < 2:
        raise InputError("the second stage needs sources of at least two patients (or phantoms) to choose its threshold out of patient")
    names, columns = tree_columns(cfg)
    scan_columns = bool(cfg["verifier_scan_columns"])
    fit_x = finite_rows(x[:, columns])  # as Verifier.probabilities reads rows
    folds = oof_folds(cfg)
    start = refine_from(cfg)
    extra, owner = None, np.zeros(0, int)
    if start is not None:  # the untouched copies' candidates as screening will score them: also at their re-centred places
        t_ref = time.time()
        jobs = [(cfg, spec, stage_network(cfg, out, spec)) for spec in specs]
        ref = list(tqdm((pool.imap if pool is not None else map)(refine_rows, jobs), total=len(jobs), desc="second stage: re-centred rows",
                        disable=not progress))
        ex, owner = refine_table(parts, ref)
        extra = (ex, finite_rows(ex[:, columns]), groups[owner])
        echo(f"second stage: {len(ex)} rows at the re-centred places of the untouched copies' candidates ({time.time() - t_ref:.0f} s)")
    weight = label_weights(cfg, parts)
    p_oof, p_extra = out_of_patient_with(cfg, x, fit_x, y, groups, folds=folds, weight=weight, extra=extra)
    oof_trees = 1.0 - p_oof[:, 0]
    w_patch, kept, timing = patch_weight(cfg), {}, {}
    if w_patch:  # the CNN's out-of-patient probabilities on the same splits, averaged in as screening averages them
        from ctguard.engine.train3d import _device
        from ctguard.engine.train_patches import fit_patch_net, out_of_patient_patch_probabilities
        from ctguard.models.patchnet import export_onnx

        t_patch = time.time()
        patches, epochs, device = np.concatenate([p["patches"] for p in parts]), int(cfg["verifier_patch_epochs"]), _device(cfg)
        p_cnn = out_of_patient_patch_probabilities(patches, y, groups, epochs, int(cfg["seed"]), folds=folds, device=device)
        kept["cnn"] = 1.0 - p_cnn[:, 0]
        p_oof = (1.0 - w_patch) * p_oof + w_patch * p_cnn
        export_onnx(fit_patch_net(patches, y, epochs, int(cfg["seed"]), device), out / "model.patches.onnx")
        timing["patch_seconds"] = round(time.time() - t_patch, 1)
        echo(f"second stage: the patch CNN out of patient and on all rows, {timing['patch_seconds']:.0f} s; "
             f"wrote {out / 'model.patches.onnx'}")
    nodules = None
    if nodule_check_on(cfg):  # the second look at P(injected), out of patient as the trees are (on real lesions alone without phantoms)
        t_nod = time.time()
        nodules, kept["nodule_check"] = fit_nodule_check(cfg, parts, nodule_parts, x, groups, folds)
        p_oof = nodule_checked(p_oof, kept["nodule_check"])
        timing["nodule_rows"], timing["nodule_seconds"] = nodules.meta["rows"], round(time.time() - t_nod, 1)
        echo(f"second stage: the nodule check on {timing['nodule_rows']} rows ({len(nodule_parts)} phantoms with a genuine nodule "
             f"beside the training sources' lesions), {timing['nodule_seconds']:.0f} s")
    oof = 1.0 - p_oof[:, 0]
    if start is not None:
        oof = refined_scores(oof, 1.0 - p_extra[:, 0], owner, start)
    counted = threshold_counted(cfg, parts, clean)
    all_counted, all_clean = counted, n_clean  # what the trace-blind trees' rule counts
    with_blind = blind_on(cfg)
    if with_blind:  # the full trees score only scans with a ripple: their rule counts only those scans' candidates
        counted, n_clean = rippled_counted(cfg, parts, counted)
    threshold, peak_threshold, blob_threshold, each = stage_thresholds(cfg, parts, oof, counted, n_clean)
    triage, cut = None, None
    if triage_share(cfg) is not None:  # a place under the triage's cut-off keeps its score, as screening scores it
        t_tri = time.time()
        triage, cut, kept["triage"], fit = fit_triage(cfg, x, y, groups, clean, oof, each, folds, weight)
        timing["triage_fit"] = {**fit, "seconds": round(time.time() - t_tri, 1)}
        oof = np.where(kept["triage"] < cut, kept["triage"], oof)
        threshold, peak_threshold, blob_threshold, each = stage_thresholds(cfg, parts, oof, counted, n_clean)
        echo(f"second stage: triage cut-off {cut}: {timing['triage_fit']['rows_passed']:.0%} of the rows read whole, "
             f"{timing['triage_fit']['found_edit_rows_lost']} found edit rows lost out of patient")
    blind = None
    if with_blind:  # for scans the trace reads nothing on
        t_blind = time.time()
        blind, kept["blind"], timing["blind"] = fit_blind(cfg, parts, x, y, groups, all_counted, all_clean, folds, weight)
        timing["blind"]["seconds"] = round(time.time() - t_blind, 1)
        echo(f"second stage: trace-blind trees ({timing['blind']['columns']} columns), threshold {timing['blind']['threshold']}"
             + (f", the maps' peaks {timing['blind']['peak_threshold']}" if "peak_threshold" in timing["blind"] else "")
             + f" (out-of-patient), {timing['blind']['seconds']:.0f} s")
    clf = boosting_classifier(cfg).fit(fit_x, y, sample_weight=weight)
    _, resampling, trace_recentre, trace_scan, shape = stage_features(cfg)
    bagging, off_centre, share = bagging_of(cfg), off_centre_of(cfg), max_features_of(cfg)
    meta = {"names": names, "scan_columns": scan_columns, "boosting": cfg["verifier_boosting"],
            **({"bagging": bagging} if bagging > 1 else {}),
            **({"max_features": share} if share != VERIFIER_DEFAULTS["verifier_max_features"] else {}),
            "uses_network": True, "recentre": bool(cfg["verifier_recentre"]),
            "resampling": resampling, "trace_recentre": trace_recentre, "trace_scan": trace_scan,
            **({"shape": True} if shape else {}),
            "scan_reference": scan_reference_on(cfg),
            "nodule_check": nodules is not None,
            "candidate_threshold": float(cfg["verifier_candidate_threshold"]), "max_candidates": int(cfg["verifier_max_candidates"]),
            **({"refine_from": start} if start is not None else {}),
            **({"label_mm": label_mm(cfg), "rows_not_learnt": int((weight == 0).sum())} if weight is not None else {}),
            **({"off_centre": off_centre, "off_centre_mm": list(OFF_CENTRE_MM)} if off_centre else {}),
            **({"trace_order": trace_order(cfg)} if trace_order(cfg) is not None else {}),
            **({"trace_peaks": trace_peaks_of(cfg)} if trace_peaks_of(cfg) else {}),
            **({"smooth_peaks": smooth_peaks_of(cfg)} if smooth_peaks_of(cfg) else {}),
            **({"blob_peaks": blob_peaks_of(cfg)} if blob_peaks_of(cfg) else {}),
            **({"triage": cut} if triage is not None else {}),
            **({"blind": True} if blind is not None else {}),
            "threshold": threshold, **({"peak_threshold": peak_threshold} if peak_threshold is not None else {}),
            **({"blob_threshold": blob_threshold} if blob_threshold is not None else {}), "oof_folds": folds, "blend_network": blend_weight(cfg), "patch_weight": w_patch,
            "cross_fit": cross_fit_groups(cfg),
            "rows": int(len(y)), "sources": len(parts), "groups": sorted(set(groups.tolist())),
            "threshold_rule": f"lowest of a grid with at most {cfg['verifier_max_false']} candidates over it per untouched training "
                              + ("scan (the network's candidates, the trace's and smooth map's peaks and the blob map's peaks each a third of it, "
                                 "each with a threshold of its own)" if blob_threshold is not None else
                                 "scan (the network's candidates and the maps' peaks each half of it, each with a threshold of its own)"
                                 if peak_threshold is not None else "scan") + f", on out-of-patient scores ({'trees and patch CNN' if w_patch else 'trees'} fitted without the scan's patient)"
                              + (f", each candidate from {start} also scored at its re-centred places, as screening does" if start is not None else "")
                              + ("" if cfg["verifier_count_phantom_lesions"] else ", not counting the stage phantoms' candidates at their own (drawn) nodules")}
    stage = Verifier.from_sklearn(clf, x, meta, columns=columns)
    stage.nodules = nodules
    stage.triage = triage
    stage.blind = blind
    stage.save(out / "model.verifier.npz")
    report = {**meta, "seconds": round(time.time() - t0, 1), "rows_seconds": round(t_rows, 1),
              **timing, **clean_candidates_report(oof, counted, groups, n_clean)}  # as the rule counts them
    (out / "verifier.json").write_text(json.dumps(report, indent=2) + "\n")
    # Every row's out-of-patient scores, for studying the threshold's rule without fitting again.
    np.savez_compressed(out / "verifier_oof.npz", score=oof, trees=oof_trees, y=y, clean=clean, group=groups.astype(str), **kept)
    echo(f"second stage: threshold {threshold}" + (f", the maps' peaks {peak_threshold}" if peak_threshold is not None else "")
         + (f", the blob map's peaks {blob_threshold}" if blob_threshold is not None else "")
         + f" (out-of-patient), {time.time() - t0:.0f} s; wrote {out / 'model.verifier.npz'}")
    return report
