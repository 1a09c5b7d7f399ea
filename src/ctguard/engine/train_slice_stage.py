"""The 2D detector's second stage: trees over the texture of a single axial slice at each place.

``ctguard train --config configs/tamper2d.yaml`` fits it after the network (``slice_stage: true``):
every real scan of the config named by ``slice_stage_scans`` (the 3D recipe's ``real_scans``, so the
same patients) is copied with edits of every family (:func:`ctguard.tamper.simulate.variants`:
injections drawn and moved, removals filled and cloned over real tumours and healthy places) under
``slice_stage_copies`` sets of seeds no other run uses, and so are fresh phantoms
(``slice_stage_phantoms`` under random clinical set-ups, ``slice_stage_fixed_phantoms`` of the
quick 1.9 mm set-up, one set each); each edit's centre is a row of its kind, and
10 random lung places, 10 dense ones and every real lesion of the untouched scan are genuine rows.
Each row is read on the axial slice through the place alone, as a single slice is screened
(:func:`ctguard.verifier.slice_inputs`). The trees (the 3D stage's settings) are saved as
``model.verifier.npz`` beside the network, with ``slice: true`` in their meta; screening a single
slice then re-scores the network's candidates with them, and ``--locations`` scores places with
them (the network only proposes the candidates).

Its threshold is chosen as the 3D stage's is, out of patient: every untouched source (each real
scan and each of the stage's phantoms) gives ``slice_stage_clean_slices`` lung slices, each screened
alone by the network beside it; the candidates the stage would re-score there are scored by trees
fitted without that source's patient (the 3D stage's ``verifier_oof_folds`` grouped folds), and the
threshold is the lowest of the 3D stage's grid giving at most ``slice_stage_max_false`` of them
over it per clean slice. It is saved in the stage's meta, so a run of ``ctguard train`` carries it
and ``benchmarks/bundle_tamper3d.py`` takes it for the card.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ctguard.errors import InputError

SLICE_DEFAULTS = {
    "slice_stage": False,  # fit the single slice's second stage after the network
    "slice_stage_scans": None,  # a training config whose real_scans are the stage's sources (configs/tamper3d.yaml)
    "slice_stage_copies": 2,  # sets of copies of each scan (each: 4 injections, a removal per real tumour, 2 copies with 2 healthy places in-painted)
    "slice_stage_candidates": 20,  # candidates of a slice the stage re-scores (the network's, from 0.3)
    "slice_stage_cache": None,  # a folder keeping each scan's rows, for runs on other sets of the patients (cross-validation)
    "slice_stage_phantoms": 0,  # fresh phantoms under random clinical set-ups (one set of copies each)
    "slice_stage_fixed_phantoms": 0,  # fresh phantoms of the one quick set-up (phantom_shape: 1.9 mm pixels)
    "slice_stage_clean_slices": 6,  # lung slices of each untouched source its threshold is counted on
    "slice_stage_max_false": 0.2,  # findings per clean slice, out of patient, the threshold allows
}
PHANTOM_SEED = 7000  # the stage's phantoms: PHANTOM_SEED + k (varied), PHANTOM_SEED + 50 + k (the quick set-up)
SEED_BASE = 700_000  # seeds of the stage's copies: SEED_BASE + 1000 * set + source; no other run uses them
ROWS_VERSION = 1  # bump when the rows a seed gives change (features, places, simulator), so kept rows are made again
LABELS = {"lung": 0, "dense": 0, "real lesion": 0, "injected": 1, "removed": 2}


def scan_entries(cfg: dict) -> list[dict]:
    """The stage's sources: the ``real_scans`` of the config ``slice_stage_scans`` names (its paths
    read from its project root), each ``{scan, tumours, patient}``."""
    from ctguard.api import load_config

    path = cfg.get("slice_stage_scans")
    if not path:
        raise InputError("slice_stage needs slice_stage_scans: a training config whose real_scans it learns from (configs/tamper3d.yaml)")
    if not Path(path).is_file():
        raise InputError("no such config (slice_stage_scans)", path)
    entries = load_config(path).get("real_scans") or []
    if not entries:
        raise InputError("the config has no real_scans for the slice stage", path)
    for e in entries:
        if not Path(e["scan"]).exists():
            raise InputError("no such scan (a real_scans entry of slice_stage_scans)", e["scan"])
    return entries


def check_slice_settings(cfg: dict) -> None:
    """Refuses, with a one-line error, a ``slice_stage_clean_slices`` that is not a whole number
    from 1 or a ``slice_stage_max_false`` that is not a number from 0."""
    n, most = cfg.get("slice_stage_clean_slices", 6), cfg.get("slice_stage_max_false", 0.2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"the config's slice_stage_clean_slices must be a whole number from 1, not {n!r}")
    if isinstance(most, bool) or not isinstance(most, (int, float)) or not most >= 0:
        raise InputError(f"the config's slice_stage_max_false must be a number from 0 (findings per clean slice), not {most!r}")


def slice_rows(vol, places: list[np.ndarray]) -> np.ndarray:
    """Each place's row on the axial slice through it alone (:func:`ctguard.verifier.slice_inputs`)."""
    from ctguard.lung import lung_mask
    from ctguard.verifier import axial_slice, slice_inputs

    rows = []
    for p in places:
        one = axial_slice(vol, p[0])
        rows.append(slice_inputs(one, np.asarray([(0.0, *p[1:])]), lung_mask(one))[0])
    return np.stack(rows)


def copy_places(src, seed: int, place_rng: np.random.Generator):
    """Every copy of ``src`` with its places: ``(volume, [(kind, voxel), ...])``, the untouched scan's
    genuine places first (``place_rng`` picks them)."""
    from ctguard.engine.train_verifier import negatives
    from ctguard.lung import lung_depth, lung_mask
    from ctguard.tamper.simulate import variants

    lungs = lung_mask(src.volume)
    depth = lung_depth(src.volume, lungs)
    for _label, vol, edits in variants(src, seed, inject=4, remove=len(src.tumours), per_scan=2, inject_families=("drawn", "moved"),
                                       remove_families=("fill", "clone"), healthy=2):
        yield vol, negatives(src, lungs, depth, place_rng) if not edits else [(e.kind, np.asarray(e.voxel, float)) for e in edits]


def source_of(entry: dict):
    """A real scan entry as a :class:`ctguard.tamper.simulate.Source` with its tumours."""
    from ctguard import io
    from ctguard.tamper.simulate import Source, tumours_from

    vol = io.read(entry["scan"])
    return Source(Path(entry["scan"]).name, vol, entry.get("patient") or Path(entry["scan"]).name, tumours_from(vol, entry.get("tumours")))


def source_rows(src, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels of every place of every copy of ``src`` made with ``seed``."""
    xs, ys = [], []
    for vol, places in copy_places(src, seed, np.random.default_rng([seed, 1])):
        xs.append(slice_rows(vol, [w for _, w in places]))
        ys += [LABELS[k] for k, _ in places]
    return np.concatenate(xs), np.asarray(ys, np.int64)


def entry_rows(entries: list[dict], i: int, copies: int, cache: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows, labels and patient of the ``i``-th scan of ``entries``: ``copies`` sets of its copies,
    set ``k`` seeded ``SEED_BASE + 1000 * k + i`` (so a run on a subset of the patients, a
    cross-validation fold, gives each scan it keeps the same rows). With a ``cache`` folder each
    set's rows are kept there under a key of the scan, its tumours and the seed, and read back."""
    src = []  # read once, where a set is not kept
    xs, ys, patient = [], [], entries[i].get("patient") or Path(entries[i]["scan"]).name
    for k in range(copies):
        seed = SEED_BASE + 1000 * k + i

        def make(seed: int = seed) -> tuple[np.ndarray, np.ndarray]:
            src[:] = src or [source_of(entries[i])]
            return source_rows(src[0], seed)

        x, y = kept_rows(cache, [str(entries[i]["scan"]), str(entries[i].get("tumours")), seed], make)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys), patient


def kept_rows(cache: str | None, key: list, make) -> tuple[np.ndarray, np.ndarray]:
    """``make()``'s rows and labels, kept in the folder ``cache`` under a hash of ``key`` (and
    :data:`ROWS_VERSION`) and read back from there when they are."""
    if not cache:
        return make()
    kept = Path(cache) / f"{hashlib.sha1(json.dumps([*key, ROWS_VERSION]).encode()).hexdigest()[:16]}.npz"
    if kept.is_file():
        with np.load(kept) as d:
            return d["x"], d["y"]
    x, y = make()
    kept.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(kept, x=x, y=y)
    return x, y


def phantom_rows(cfg: dict, cache: str | None = None) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Rows, labels and group (``phantom SEED``) of the stage's phantoms (``slice_stage_phantoms``
    varied, ``slice_stage_fixed_phantoms`` of the quick set-up), one set of copies each, kept in
    ``cache`` as a scan's are."""
    out = []
    for seed, varied in phantom_specs(cfg):
        x, y = kept_rows(cache, ["phantom", seed, varied], lambda: source_rows(stage_phantom(seed, varied), SEED_BASE + 500 + seed))
        out.append((x, y, f"phantom {seed}"))
    return out


def phantom_specs(cfg: dict) -> list[tuple[int, bool]]:
    """``(seed, varied)`` of each of the stage's phantoms: ``slice_stage_phantoms`` under random
    clinical set-ups, then ``slice_stage_fixed_phantoms`` of the quick set-up."""
    return [(PHANTOM_SEED + k, True) for k in range(int(cfg.get("slice_stage_phantoms") or 0))] + \
           [(PHANTOM_SEED + 50 + k, False) for k in range(int(cfg.get("slice_stage_fixed_phantoms") or 0))]


def stage_phantom(seed: int, varied: bool):
    """One of the stage's phantoms as a :class:`ctguard.tamper.simulate.Source`."""
    from ctguard.tamper.simulate import phantom_source, varied_phantom_source

    return varied_phantom_source(seed) if varied else phantom_source(seed)


def lung_slices(vol) -> np.ndarray:
    """The axial slices of ``vol`` with at least 30% of its largest lung area, where a 2D detector's
    false findings are counted."""
    from ctguard.lung import lung_mask

    area = lung_mask(vol).sum((1, 2))
    return np.nonzero(area > 0.3 * area.max())[0]


def clean_slice_rows(det, vol, stage, n: int, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Rows of the candidates the slice stage ``stage`` re-scores on ``n`` lung slices of the
    untouched scan ``vol``, each slice screened alone by the network ``det`` (no second stage), and
    each row's slice, ``0..n-1``. The slices are spread evenly over :func:`lung_slices`, each the
    first from its place whose own lungs screening finds (it refuses a slice without)."""
    from ctguard.verifier import axial_slice

    ok = lung_slices(vol)
    xs, which, taken = [], [], set()
    for start in np.linspace(0, len(ok) - 1, n).astype(int):
        for z in (int(z) for z in ok[start:] if int(z) not in taken):
            one = axial_slice(vol, z)
            try:
                at, lungs = slice_candidates(det, stage, one)
            except InputError:  # no lungs found in this slice alone
                continue
            xs.append(candidate_rows(stage, one, at, lungs))
            which += [len(taken)] * len(at)
            taken.add(z)
            break
    if len(taken) < n:
        raise InputError(f"only {len(taken)} of its slices show lungs on their own; the slice stage's threshold counts {n}", name or None)
    return (np.concatenate(xs) if xs else candidate_rows(stage, None, np.zeros((0, 3)), None)), np.asarray(which, np.int64)


def slice_candidates(det, stage, one) -> tuple[np.ndarray, np.ndarray]:
    """The single slice ``one`` screened alone by the network ``det`` (no second stage): the places
    ``(n, 3)`` of the candidates the slice stage ``stage`` re-scores there, and the slice's lung
    mask. Raises InputError where the slice alone shows no lungs, as screening does."""
    from ctguard.screen import screen_slice, stage_candidates

    _, heat, lungs = screen_slice(one, det, threshold=1.0)
    return np.asarray([c["voxel"] for c in stage_candidates(heat, one, stage, 1.0, lungs)], float).reshape(-1, 3), lungs


def candidate_rows(stage, one, at: np.ndarray, lungs) -> np.ndarray:
    """The stage's rows at the places ``at`` of the slice ``one`` (:func:`ctguard.verifier.slice_inputs`;
    none read where there are no places)."""
    from ctguard.verifier import slice_inputs

    return slice_inputs(one, at, lungs) if len(at) else np.zeros((0, len(stage.meta["names"])))


def tree_probabilities(trees, x: np.ndarray) -> np.ndarray:
    """``(n, 3)`` probabilities (genuine, injected, removed) of the fitted trees ``trees``
    (:func:`fit_trees`) at rows ``x`` (every column)."""
    from ctguard.verifier import finite_rows, slice_columns

    p = np.zeros((len(x), 3))
    if len(x):
        p[:, trees.classes_.astype(int)] = trees.predict_proba(finite_rows(x[:, slice_columns()]))
    return p


def network_only(path: Path):
    """The 2D network of the checkpoint ``path`` without any second stage beside it, and a hash
    of the network that runs (its ONNX export where there is one) for keeping rows it proposed."""
    from dataclasses import replace

    from ctguard.screen import load_detector2d

    det = replace(load_detector2d(str(path)), verifier=None)
    runs = path.with_suffix(".onnx") if path.with_suffix(".onnx").is_file() else path
    return det, hashlib.sha256(runs.read_bytes()).hexdigest()[:16]


def clean_sources(cfg: dict, entries: list[dict]):
    """Each untouched source of the stage: ``(group, key, name, make_volume)`` for every real scan
    (its patient) and every phantom (``phantom SEED``)."""
    for e in entries:
        yield e.get("patient") or Path(e["scan"]).name, [str(e["scan"])], str(e["scan"]), lambda e=e: source_of(e).volume
    for seed, varied in phantom_specs(cfg):
        yield f"phantom {seed}", ["phantom", seed, varied], f"phantom {seed}", lambda seed=seed, varied=varied: stage_phantom(seed, varied).volume


def clean_rows(cfg: dict, entries: list[dict], det, net_hash: str, stage) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """:func:`clean_slice_rows` of every untouched source (:func:`clean_sources`): ``(rows, slice,
    group)``, the slice numbered across all sources; kept in ``slice_stage_cache`` under the network's hash."""
    n, out, first = int(cfg["slice_stage_clean_slices"]), [], 0
    for group, key, name, volume in clean_sources(cfg, entries):
        x, which = kept_rows(cfg.get("slice_stage_cache"), ["clean slices", *key, n, net_hash],
                             lambda: clean_slice_rows(det, volume(), stage, n, name))
        out.append((x, which + first, group))
        first += n
    return out


def slice_threshold(cfg: dict, x: np.ndarray, y: np.ndarray, groups: np.ndarray, clean: list[tuple[np.ndarray, np.ndarray, str]]
                    ) -> tuple[float, dict, np.ndarray]:
    """The stage's threshold (see the module's docstring) from its rows ``x, y`` (``groups``: each
    row's patient or phantom) and the untouched sources' candidate rows ``clean``
    (:func:`clean_rows`); what it rests on (findings per clean slice at a few thresholds); and each
    clean candidate's out-of-patient score."""
    from ctguard.engine.train_verifier import lowest_within, oof_folds, patient_splits

    cx = np.concatenate([r for r, _, _ in clean])
    cgroups = np.concatenate([np.full(len(r), g, dtype=object) for r, _, g in clean])
    n_slices = int(cfg["slice_stage_clean_slices"]) * len(clean)
    if len(set(groups.tolist())) < 2:
        raise InputError("the slice stage's threshold is chosen out of patient: it needs at least two patients or phantoms")
    score = np.full(len(cx), np.nan)
    for tr, te in patient_splits(groups, oof_folds(cfg)):
        at = np.isin(cgroups, np.unique(groups[te]))
        if at.any():
            score[at] = 1.0 - tree_probabilities(fit_trees(cfg, x[tr], y[tr]), cx[at])[:, 0]
    if np.isnan(score).any():
        raise InputError("the slice stage's untouched sources must all be among its training sources")

    def per_slice(t: float) -> float:
        return float((score >= t).sum() / max(n_slices, 1))

    threshold = lowest_within(per_slice, float(cfg["slice_stage_max_false"]))
    shown = sorted({0.5, 0.8, 0.9, 0.95, 0.97, 0.99, threshold})
    return threshold, {"clean_slices": n_slices, "candidates": int(len(cx)), "max_false": float(cfg["slice_stage_max_false"]),
                       "oof_folds": oof_folds(cfg), "false_per_clean_slice": {str(t): round(per_slice(t), 4) for t in shown}}, score


def stage_settings(cfg: dict) -> dict:
    """``cfg`` over the stage's defaults: its own, and the 3D stage's trees' (histogram boosting)."""
    from ctguard.engine.train_verifier import VERIFIER_DEFAULTS

    return {**VERIFIER_DEFAULTS, "verifier_boosting": "histogram", "seed": 0, **SLICE_DEFAULTS, **cfg}


def fit_trees(cfg: dict, x: np.ndarray, y: np.ndarray):
    """The stage's classifier fitted on rows ``x`` (every column; it reads :func:`ctguard.verifier.slice_columns`)."""
    from ctguard.engine.train_verifier import boosting_classifier
    from ctguard.verifier import finite_rows, slice_columns

    return boosting_classifier(stage_settings(cfg)).fit(finite_rows(x[:, slice_columns()]), y)


def fit_slice_stage(cfg: dict, out: Path, echo=print) -> dict:
    """Fits the stage (see the module's docstring) and writes ``out/model.verifier.npz``; returns its summary."""
    from ctguard.verifier import SLICE_FEATURES, Verifier, feature_names, finite_rows, slice_columns, slice_names

    cfg = stage_settings(cfg)
    check_slice_settings(cfg)
    entries = scan_entries(cfg)
    t0 = time.time()
    xs, ys, groups = [], [], []
    for i, entry in enumerate(entries):
        x, y, patient = entry_rows(entries, i, int(cfg["slice_stage_copies"]), cfg.get("slice_stage_cache"))
        xs.append(x)
        ys.append(y)
        groups += [patient] * len(y)
        echo(f"slice stage: {patient} ({Path(entry['scan']).name}), {sum(len(y) for y in ys)} rows so far ({time.time() - t0:.0f} s)")
    for x, y, group in phantom_rows(cfg, cfg.get("slice_stage_cache")):
        xs.append(x)
        ys.append(y)
        groups += [group] * len(y)
    if len(ys) > len(entries):
        echo(f"slice stage: {len(ys) - len(entries)} phantoms, {sum(len(y) for y in ys)} rows in all ({time.time() - t0:.0f} s)")
    x, y = np.concatenate(xs), np.concatenate(ys)
    clf = fit_trees(cfg, x, y)
    counts = np.bincount(y, minlength=3)
    recentre, resampling, _, trace_scan = SLICE_FEATURES  # what slice_inputs reads (the slice's own trace as the scan's)
    meta = {"slice": True, "names": feature_names(*SLICE_FEATURES), "columns": slice_names(), "uses_network": False,
            "recentre": recentre, "resampling": resampling, "trace_scan": trace_scan, "boosting": cfg["verifier_boosting"],
            "candidate_threshold": 0.3, "max_candidates": int(cfg["slice_stage_candidates"]), "rows": int(len(y)),
            "rows_by_class": {"genuine": int(counts[0]), "injected": int(counts[1]), "removed": int(counts[2])},
            "sources": len(ys), "patients": sorted({g for g in groups if not g.startswith("phantom ")}),
            "phantoms": sorted({g for g in groups if g.startswith("phantom ")}), "copies": int(cfg["slice_stage_copies"]), "seed_base": SEED_BASE,
            "threshold_rule": f"the lowest of a grid (0.5-0.999) giving at most {cfg['slice_stage_max_false']} findings per clean slice "
                              f"({cfg['slice_stage_clean_slices']} lung slices of each untouched training scan and phantom, each screened "
                              "alone), every candidate scored by trees fitted without its patient or phantom"}
    v = Verifier.from_sklearn(clf, finite_rows(x), meta, columns=slice_columns())
    t1 = time.time()
    det, net_hash = network_only(out / "model.pt")
    clean = clean_rows(cfg, entries, det, net_hash, v)
    v.meta["threshold"], fit, _ = slice_threshold(cfg, x, y, np.asarray(groups, dtype=object), clean)
    v.save(out / "model.verifier.npz")
    summary = {"rows": int(len(y)), "sources": len(ys), "threshold": v.meta["threshold"], "threshold_fit": fit,
               "threshold_seconds": round(time.time() - t1, 1), "seconds": round(time.time() - t0, 1)}
    (out / "slice_stage.json").write_text(json.dumps({**summary, "rows_by_class": meta["rows_by_class"], "patients": meta["patients"]}, indent=2) + "\n")
    echo(f"slice stage: {len(y)} rows from {len(ys)} sources ({counts[1]} injected, {counts[2]} removed); threshold "
         f"{v.meta['threshold']} ({fit['false_per_clean_slice'][str(v.meta['threshold'])]} findings per clean slice out of patient, "
         f"{fit['clean_slices']} slices), {summary['seconds']} s; wrote {out / 'model.verifier.npz'}")
    return summary
