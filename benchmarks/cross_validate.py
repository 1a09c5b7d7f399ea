"""Cross-validation of the 3D detector's recipe by patient, with two trivial baselines beside it.

Usage:
    python benchmarks/cross_validate.py [--config configs/tamper3d.yaml] [--out runs/cv] [--folds 0,1,2,3] [--2d] [--md FILE] [--json FILE]
                                        [--with EARLIER.json]   (pool folds evaluated in another run)
                                        [--add-scans configs/external_patients.yaml]   (the recipe with more patients)
    python benchmarks/cross_validate.py --model M [--model2d M2] --skip PATIENTS --out DIR   (a detector trained elsewhere)
    python benchmarks/cross_validate.py --model M --config configs/external_patients.yaml --out DIR   (on patients no recipe trains on)
    python benchmarks/cross_validate.py --threshold-of RUN                                  (the folds' threshold rule on every patient)

The recipe (a training config whose ``real_scans`` entries each name their ``patient``) is trained
once per fold without the fold's held-out patients; each fold is then tested on those patients
only:
- simulated edits of every family (:mod:`ctguard.tamper.families`) with seeds no training run uses,
  scored at their centres and screened whole;
- the patients' untouched scans: false findings per clean scan at the fold's threshold;
- their real nodules and tumours, untouched: a finding "injected" on one is a real lesion called fake.
The fold's threshold is chosen on its training patients only: for a detector with a second stage,
the stage's own (the lowest of a grid with at most 0.1 candidates over it per untouched training
scan, on out-of-patient scores); without one, the lowest of a grid that gives at most 0.1 false
findings per clean scan on their untouched scans and on clean phantoms of unused seeds. Fold 0 trains without the "moved" injection family and fold 1 without the "clone" removal
family, so that their tables say how the detector does on a method it never saw.

Beside the detector, at the same places: the mean HU at the place (a 5 mm ball) and its fine
texture relative to its surroundings (:func:`texture_smoothness`), both at the scan's own voxels. A
fold where the detector does not beat them has fitted its patients rather than the edits.

A config may hold only some of the folds' patients: each fold then holds out those it has (a fold
with none is skipped).

Writes ``OUT/fold<k>/`` (the run, ``eval.json``), ``OUT/cv.json`` and ``OUT/cv.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from ctguard import api, io
from ctguard.engine.train_verifier import near, negatives
from ctguard.lung import lung_depth, lung_mask
from ctguard.screen import (
    every_place,
    load_detector,
    load_detector2d,
    over_own_threshold,
    score_locations,
    score_locations_2d,
    scored_places,
    screen_volume,
    separate_thresholds,
    source_thresholds,
    stage_probabilities,
)
from ctguard.tamper.simulate import (
    Source,
    tumours_from,
    variants,
    varied_phantom_source,
)
from ctguard.verifier import axial_slice, neighbourhood

ROOT = Path(__file__).resolve().parents[1]
# Two or three held-out patients a fold; every patient held out once; each training side keeps GE and Philips.
FOLDS = [
    {"held_out": ["Lung_Dx-A0001", "LIDC-IDRI-0001"], "unseen_family": {"inject_families": ["drawn"]}},
    {"held_out": ["Lung_Dx-A0002", "LIDC-IDRI-0002"], "unseen_family": {"remove_families": ["fill"]}},
    {"held_out": ["LIDC-IDRI-0314", "lung1", "LCTSC-Test-S1-101"], "unseen_family": {}},
    {"held_out": ["LIDC-IDRI-0003", "lung2"], "unseen_family": {}},
]
GRID = tuple(np.round(np.concatenate([np.arange(0.5, 0.95, 0.05), np.arange(0.95, 0.999, 0.005)]), 3))
MAX_FALSE = 0.1  # false findings per clean scan the threshold allows on the training patients
CALIBRATION_PHANTOMS = 6  # clean varied phantoms of seeds 6000+ beside the training patients' scans
EVAL_SEED = 900_000  # no training run seeds edits here
THRESHOLD_KEYS = ("threshold", "peak_threshold", "blob_threshold")  # a fold's thresholds: the network's candidates', the maps' peaks', the blob map's
UNTOUCHED = ("lung", "dense", "real lesion")  # the places' "what" that an edit is ranked against


def patient_scans(cfg: dict) -> dict[str, list[dict]]:
    """The config's real scans by patient, in the config's order."""
    out: dict[str, list[dict]] = {}
    for e in cfg.get("real_scans") or []:
        if not e.get("patient"):
            raise SystemExit(f"every real_scans entry needs a patient for cross-validation: {e.get('scan')}")
        out.setdefault(e["patient"], []).append(e)
    return out


def sources_of(entries: list[dict]) -> list[Source]:
    sources = []
    for e in entries:
        vol = io.read(e["scan"])
        sources.append(Source(Path(e["scan"]).name, vol, e["patient"], tumours_from(vol, e.get("tumours"))))
    return sources


def mean_hu(vol, place: np.ndarray, radius_mm: float = 5.0) -> float:
    """Mean HU of a ball around ``place`` on the scan's own voxels."""
    box, ball, _ = neighbourhood(vol, place, radius_mm)
    return float(vol.hu[box][ball].mean())


def texture_smoothness(vol, place: np.ndarray, inner_mm: float = 6.0, outer_mm: float = 20.0) -> float:
    """How much smoother the place is than its surroundings at the scan's own resolution: the log
    ratio of the in-plane high-pass residual's spread in a 10-20 mm shell to that in a 6 mm ball
    (in-painting and blending smooth the fine noise that the kernel gives every voxel)."""
    box, ball, dist = neighbourhood(vol, place, outer_mm)
    hu = vol.hu[box].astype(np.float32)
    residual = hu - ndimage.gaussian_filter(hu, (0, 1.0, 1.0))
    inner = residual[dist <= inner_mm]
    shell = residual[(dist >= 10.0) & (dist <= outer_mm)]
    return float(np.log((np.median(np.abs(shell)) + 1e-3) / (np.median(np.abs(inner)) + 1e-3)))


def choose_threshold(det, cfg: dict, training: dict[str, list[dict]]) -> dict:
    """The lowest grid threshold with at most MAX_FALSE false findings per clean scan on the
    training patients' untouched scans and clean calibration phantoms."""
    scores, names = [], []
    for src in [s for entries in training.values() for s in sources_of(entries)]:
        result, _, _ = screen_volume(src.volume, det, threshold=min(GRID))
        scores.append([f["score"] for f in result["findings"]])
        names.append(src.patient)
    for k in range(CALIBRATION_PHANTOMS):
        src = varied_phantom_source(6000 + k, opacities=int(cfg.get("phantom_opacities") or 0))
        result, _, _ = screen_volume(src.volume, det, threshold=min(GRID))
        scores.append([f["score"] for f in result["findings"]])
        names.append(src.patient)
    per_t = {t: sum(s >= t for ss in scores for s in ss) / len(scores) for t in GRID}
    chosen = next((t for t in GRID if per_t[t] <= MAX_FALSE), GRID[-1])
    return {"threshold": float(chosen), "scans": len(scores), "false_findings_per_scan": {str(t): round(v, 3) for t, v in per_t.items()}}


def split_fold(by_patient: dict[str, list[dict]], k: int) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Fold ``k``'s training patients and its held-out ones (in the fold's order, which seeds their
    test copies), each with its config entries."""
    held = [p for p in FOLDS[k]["held_out"] if p in by_patient]  # a config may have only some of the folds' patients
    return {p: e for p, e in by_patient.items() if p not in held}, {p: by_patient[p] for p in held}


def fold_run_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of an experiment on one fold's run of this script: FOLD, RUN (its folder, e.g.
    runs/cv/fold2) and ``--config`` (the recipe whose patients the folds split)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("fold", type=int)
    ap.add_argument("run")
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    return ap


def fold_of(args: argparse.Namespace) -> tuple[dict, dict[str, list[dict]], dict[str, list[dict]]]:
    """``(config, training patients, held-out patients)`` of ``args.fold`` under ``args.config``."""
    cfg = api.load_config(args.config)
    return (cfg, *split_fold(patient_scans(cfg), args.fold))


def held_out_copies(held_out: dict[str, list[dict]], fold: int):
    """Every copy the fold is tested on: for each held-out scan (``i``, its :class:`Source`), its
    untouched copy and its copies with edits of every family, seeded by the fold and the scan (seeds
    no training run uses). Yields ``(i, src, label, vol, edits)``."""
    for i, src in enumerate(s for entries in held_out.values() for s in sources_of(entries)):
        for label, vol, edits in variants(src, EVAL_SEED + 1000 * fold + i, inject=4, remove=len(src.tumours), per_scan=2,
                                          inject_families=("drawn", "moved"), remove_families=("fill", "clone"), healthy=2):
            yield i, src, label, vol, edits


def held_out_places(held_out: dict[str, list[dict]], fold: int):
    """:func:`held_out_copies`, each with the places the fold scores on it: its edits' centres, or on
    an untouched copy its untouched places (random lung, dense places, real lesions), drawn by the
    fold's and the scan's own generator. Yields ``(i, src, label, vol, edits, lungs, where)``, ``lungs``
    the scan's lung mask and ``where`` a list of ``(kind, voxel)``."""
    source = None  # the held-out scan of the copies now: its own rng, lung mask and depth
    for i, src, label, vol, edits in held_out_copies(held_out, fold):
        if source is None or source[0] != i:
            lungs = lung_mask(src.volume)
            source = (i, np.random.default_rng([EVAL_SEED, fold, i]), lungs, lung_depth(src.volume, lungs))
        _, rng, lungs, depth = source
        where = negatives(src, lungs, depth, rng) if not edits else [(e.kind, np.asarray(e.voxel, float)) for e in edits]
        yield i, src, label, vol, edits, lungs, where


def evaluate_fold(det, held_out: dict[str, list[dict]], fold: int, det2=None) -> dict:
    """Every measurement of one fold on its held-out patients (see the module's docstring); with
    ``det2`` (a 2D slice detector) each place is also scored on the single axial slice through it."""
    places, clean, edits_found, lesion_calls, times = [], [], [], [], []
    for i, src, label, vol, edits, lungs, where in held_out_places(held_out, fold):
        thresholds = source_thresholds(det, vol=vol)  # the trace-blind trees' own on a scan they score
        t0 = time.time()
        result, _, _ = screen_volume(vol, det, threshold=0.3)
        times.append(time.time() - t0)
        found = listed_findings(result["findings"], vol.spacing, thresholds)
        if not edits:
            clean.append({"patient": src.patient, "scan": src.name, "false_findings": [
                {"kind": f["kind"], "score": round(float(f["score"]), 4), "voxel": [round(float(v), 1) for v in f["voxel"]]} for f in found],
                "candidate_scores": [round(float(f["score"]), 4) for f in result["findings"]]})  # from 0.3: the curve below
            for t in src.tumours:
                # Its highest "injected" candidate from 0.3 (kept for reading the report at other thresholds).
                hit = best_at(result["findings"], "injected", t.voxel, t.diameter_mm, vol)
                lesion_calls.append({"patient": src.patient, "voxel": [round(float(v), 1) for v in t.voxel],
                                     "diameter_mm": round(t.diameter_mm, 1), "called_injected": over_at(found, "injected", t.voxel, t.diameter_mm, vol),
                                     "score": round(float(hit), 4)})
        else:
            for e in edits:
                hit = best_at(result["findings"], e.kind, e.voxel, e.diameter_mm, vol)
                edits_found.append({"kind": e.kind, "family": e.extra.get("family"), "target": e.extra.get("target", "lung"),
                                    "found": over_at(found, e.kind, e.voxel, e.diameter_mm, vol), "score": round(float(hit), 4),
                                    "patient": src.patient,
                                    "voxel": [round(float(v), 1) for v in e.voxel], "diameter_mm": round(float(e.diameter_mm), 1)})
        at = np.asarray([w for _, w in where], float)
        p_net = score_locations(vol, det, at, stage2=False)  # the network once; its second stage on those
        p = stage_probabilities(vol, det, at, p_net, lungs) if det.verifier is not None else p_net
        for (what, w), pw, pn in zip(where, p, p_net):
            family = next((e.extra.get("family") for e in edits if np.allclose(e.voxel, w)), None)
            row = {"patient": src.patient, "what": what, "family": family, "p_injected": float(pw[1]), "p_removed": float(pw[2]),
                   "p_tampered": float(pw[1] + pw[2]), "p_network": float(pn[1] + pn[2]),
                   "mean_hu": mean_hu(vol, w), "smoothness": texture_smoothness(vol, w)}
            if det2 is not None:
                one = axial_slice(vol, w[0])
                row["p2d_tampered"] = float(score_locations_2d(one, det2, np.asarray([(0.0, *w[1:])]))[0, 1:].sum())
            places.append(row)
    return {"places": places, "clean_scans": clean, "edits": edits_found, "real_lesions": lesion_calls,
            "median_screen_seconds": round(float(np.median(times)), 2)}


def listed_findings(findings: list[dict], spacing, thresholds: dict[str, float]) -> list[dict]:
    """The findings screening lists at the detector's own ``thresholds``
    (:func:`ctguard.screen.source_thresholds`), from those of a screening at a lower threshold for
    all: every place scored (:func:`ctguard.screen.scored_places`), merged again as screening
    merges them at those thresholds (:func:`ctguard.screen.over_own_threshold`), those over their
    own threshold."""
    return [f for f in over_own_threshold(scored_places(findings), spacing, thresholds) if f["score"] >= f["threshold"]]


def over_at(found: list[dict], kind: str, voxel, diameter_mm: float, vol) -> bool:
    """Whether a listed finding of the ``kind`` (:func:`listed_findings`), or a place merged into it
    that is over its own threshold, lies at an edit or lesion."""
    return any(p["score"] >= p["threshold"] and _near(p, voxel, diameter_mm, vol)
               for p in every_place(f for f in found if f["kind"] == kind))


def _near(f: dict, voxel, diameter_mm: float, vol) -> bool:
    return near(f["voxel"], voxel, diameter_mm, vol.spacing)


def best_at(findings: list[dict], kind: str, voxel, diameter_mm: float, vol) -> float:
    """The highest score of the ``kind`` findings at an edit or lesion (``near`` its centre ``voxel``,
    or one of the places merged into it, ``also_at``), or 0."""
    return max((p["score"] for p in every_place(f for f in findings if f["kind"] == kind) if _near(p, voxel, diameter_mm, vol)),
               default=0.0)


def _auc(pos: list[float], neg: list[float]) -> float | None:
    if not pos or not neg:
        return None
    return round(float(roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)), 4)


def summarise(ev: dict, thresholds: dict | None = None) -> dict:
    """The table row of one fold (or of all folds pooled: no ``thresholds``); ``thresholds``: the
    fold's (:data:`THRESHOLD_KEYS`: the network's candidates', and the maps' peaks' and the blob
    map's where the stage has one of their own; other keys are left out)."""
    places = ev["places"]
    neg = [p for p in places if p["what"] in UNTOUCHED]
    thresholds = thresholds or {}
    row: dict = {"threshold": thresholds.get("threshold"),
                 **{k: thresholds[k] for k in THRESHOLD_KEYS[1:] if thresholds.get(k) is not None}}
    for kind in ("injected", "removed"):
        pos = [p for p in places if p["what"] == kind]
        row[f"n_{kind}"] = len(pos)
        row[f"auc_{kind}"] = _auc([p["p_tampered"] for p in pos], [p["p_tampered"] for p in neg])
        if pos and all("p_network" in p for p in pos + neg):
            row[f"auc_{kind}_network"] = _auc([p["p_network"] for p in pos], [p["p_network"] for p in neg])
        row[f"auc_{kind}_mean_hu"] = _auc([p["mean_hu"] for p in pos], [p["mean_hu"] for p in neg])
        row[f"auc_{kind}_smoothness"] = _auc([p["smoothness"] for p in pos], [p["smoothness"] for p in neg])
        if pos and all("p2d_tampered" in p for p in pos + neg):
            row[f"auc_{kind}_2d"] = _auc([p["p2d_tampered"] for p in pos], [p["p2d_tampered"] for p in neg])
        for family in sorted({p["family"] for p in pos if p["family"]}):
            row[f"auc_{kind}_{family}"] = _auc([p["p_tampered"] for p in pos if p["family"] == family], [p["p_tampered"] for p in neg])
    row["n_untouched"] = len(neg)
    n_clean = len(ev["clean_scans"])
    row["clean_scans"] = n_clean
    row["false_findings_per_clean_scan"] = round(sum(len(c["false_findings"]) for c in ev["clean_scans"]) / max(n_clean, 1), 3)
    row["clean_scans_flagged"] = f"{sum(bool(c['false_findings']) for c in ev['clean_scans'])}/{n_clean}"
    found = ev["edits"]
    row["edits_found_right_kind"] = f"{sum(e['found'] for e in found)}/{len(found)}"
    row["edits_found_fraction"] = round(sum(e["found"] for e in found) / max(len(found), 1), 3)
    row["real_lesions_called_injected"] = f"{sum(r['called_injected'] for r in ev['real_lesions'])}/{len(ev['real_lesions'])}"
    curve = operating_curve(ev)
    if curve:
        row["operating_curve"] = curve
    return row


CURVE = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)


def operating_curve(ev: dict) -> list[dict] | None:
    """Edits found with their right kind and false findings per clean scan at other thresholds than
    the fold's own (on the held-out scans: for reading the trade-off, not for choosing a threshold).
    Only for evaluations that kept every candidate's score."""
    if not ev["edits"] or any("score" not in e for e in ev["edits"]) or any("candidate_scores" not in c for c in ev["clean_scans"]):
        return None
    n_clean = max(len(ev["clean_scans"]), 1)
    return [{"threshold": t, "edits_found_fraction": round(c["edits_found"] / c["edits"], 3),
             "false_findings_per_clean_scan": round(c["false_findings"] / n_clean, 3)}
            for t in CURVE for c in [counts_at(ev, t)]]


def counts_at(ev: dict, t: float) -> dict:
    """What an evaluation that kept every candidate's score would give at threshold ``t``: edits
    found with their right kind, false findings and clean scans flagged, and real lesions called
    injected where each lesion's highest "injected" candidate was kept."""
    false = [sum(s >= t for s in c["candidate_scores"]) for c in ev["clean_scans"]]
    out = {"edits_found": sum(e["score"] >= t for e in ev["edits"]), "edits": len(ev["edits"]), "false_findings": sum(false),
           "clean_flagged": sum(f > 0 for f in false), "clean_scans": len(false)}
    if all("score" in r for r in ev["real_lesions"]):
        out |= {"lesions_called_injected": sum(r["score"] >= t for r in ev["real_lesions"]), "lesions": len(ev["real_lesions"])}
    return out


def threshold_cell(row: dict) -> str:
    """A fold's threshold, and the maps' peaks' (then the blob map's) after it where the stage has one of their own."""
    return " / ".join(str(row[k]) for k in THRESHOLD_KEYS if row.get(k) is not None)


def markdown(folds: list[dict], pooled: dict) -> str:
    """The per-fold and pooled table, then location AUC by edit family (columns without values left out)."""
    cols = [("held out", None), ("threshold", "threshold"), ("AUC inj", "auc_injected"), ("network inj", "auc_injected_network"),
            ("mean-HU inj", "auc_injected_mean_hu"), ("AUC rem", "auc_removed"), ("network rem", "auc_removed_network"),
            ("smooth rem", "auc_removed_smoothness"), ("2D inj", "auc_injected_2d"), ("2D rem", "auc_removed_2d"),
            ("false/clean scan", "false_findings_per_clean_scan"), ("clean flagged", "clean_scans_flagged"),
            ("edits found", "edits_found_right_kind"), ("lesions called inj", "real_lesions_called_injected")]
    rows = folds + [pooled]
    cols = [c for c in cols if c[1] is None or c[1] == "threshold" or any(r["row"].get(c[1]) is not None for r in rows)]
    lines = ["| fold | " + " | ".join(c for c, _ in cols) + " |", "| --- " * (len(cols) + 1) + "|"]
    for r in rows:
        pooled_row = r is pooled
        held = f"folds {', '.join(str(f['fold']) for f in folds)} ({len(r['held_out'])} patients)" if pooled_row else ", ".join(r["held_out"])
        vals = [held] + ["per fold" if pooled_row and key == "threshold" else threshold_cell(r["row"]) if key == "threshold"
                         else str(r["row"].get(key)) for _, key in cols[1:]]
        lines.append(f"| {'pooled' if pooled_row else r['fold']} | " + " | ".join(vals) + " |")
    families = [("injected", "drawn"), ("injected", "moved"), ("removed", "fill"), ("removed", "clone")]
    lines += ["", "Location AUC by edit family, each against the same untouched places (* a family the fold did not train on):", "",
              "| fold | " + " | ".join(f"{k} {f}" for k, f in families) + " |", "| --- " * (len(families) + 1) + "|"]
    for r in rows:
        unseen = set(r.get("unseen", []))
        cells = [f"{r['row'].get(f'auc_{k}_{f}')}{'*' if f in unseen else ''}" for k, f in families]
        lines.append(f"| {'pooled' if r is pooled else r['fold']} | " + " | ".join(cells) + " |")
    curve = pooled["row"].get("operating_curve")
    if curve:
        lines += ["", "Pooled, at other thresholds than the folds' own (held-out scans; for reading the trade-off only):", "",
                  "| threshold | " + " | ".join(str(c["threshold"]) for c in curve) + " |", "| --- " * (len(curve) + 1) + "|",
                  "| edits found | " + " | ".join(str(c["edits_found_fraction"]) for c in curve) + " |",
                  "| false findings per clean scan | " + " | ".join(str(c["false_findings_per_clean_scan"]) for c in curve) + " |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs/cv"))
    ap.add_argument("--folds", default=",".join(str(k) for k in range(len(FOLDS))),
                    help="which folds to run (default: all); folds already evaluated in OUT are pooled either way ('none': only pool)")
    ap.add_argument("--2d", dest="with_2d", action="store_true",
                    help="also train each fold's 2D slice detector (configs/tamper2d.yaml on the fold's cubes) and score every place on its slice")
    ap.add_argument("--model", default=None, help="evaluate this detector (at its card's threshold) on each fold's held-out patients instead of training")
    ap.add_argument("--model2d", default=None, help="with --model: a 2D slice detector to score each place's slice with too")
    ap.add_argument("--skip", default="", help="with --model: patients it was trained on, left out of the test (comma-separated)")
    ap.add_argument("--add-scans", default=None, metavar="CONFIG",
                    help="also these patients (another config's real_scans, e.g. configs/external_patients.yaml): trained on in the "
                         "folds that do not hold them out")
    ap.add_argument("--threshold-of", default=None, metavar="RUN",
                    help="only choose the threshold of a run trained on every patient of the config, by the folds' rule, and print it")
    ap.add_argument("--json", default=None, help="also write the pooled results here")
    ap.add_argument("--md", default=None, help="also write the Markdown table here")
    ap.add_argument("--with", dest="earlier", action="append", default=[], metavar="JSON",
                    help="also pool the folds of an earlier report (a cv.json or its copy in docs/) that carry their places, "
                         "where --out has no eval.json of that fold")
    args = ap.parse_args()
    cfg = api.load_config(args.config)
    if args.add_scans:
        cfg["real_scans"] = list(cfg.get("real_scans") or []) + list(api.load_config(args.add_scans).get("real_scans") or [])
    by_patient = patient_scans(cfg)
    if args.threshold_of:
        calib = choose_threshold(load_detector(str(Path(args.threshold_of) / "model.pt")), cfg, by_patient)
        print(json.dumps(calib, indent=2))
        return
    missing = sorted(set(by_patient) - {p for f in FOLDS for p in f["held_out"]})
    if missing:
        raise SystemExit(f"no fold holds out {', '.join(missing)} (benchmarks/cross_validate.py's FOLDS)")
    out = Path(args.out)
    results = []
    for k in range(len(FOLDS)):
        fold_dir = out / f"fold{k}"
        fold = FOLDS[k]
        if not split_fold(by_patient, k)[1]:  # none of its patients in the config
            continue
        if str(k) in args.folds.split(",") and args.model:
            fixed_model_fold(args.model, args.model2d, by_patient, k, fold_dir, set(args.skip.split(",")))
        elif str(k) in args.folds.split(","):
            run_fold(cfg, by_patient, fold, k, fold_dir, args.with_2d)
        if (fold_dir / "eval.json").is_file():
            results.append(json.loads((fold_dir / "eval.json").read_text()))
    for path in args.earlier:
        have = {r["fold"] for r in results}
        for f in json.loads(Path(path).read_text())["folds"]:
            if f["fold"] not in have and "eval" in f:
                results.append({**{k: f.get(k) for k in ("fold", "held_out", "unseen", "train_seconds", "peak_rss_gb")},
                                "threshold": {k: f["row"][k] for k in THRESHOLD_KEYS if k in f["row"]}, "eval": f["eval"]})
    results.sort(key=lambda r: r["fold"])
    if not results:
        raise SystemExit("no fold has been evaluated yet")
    pooled_ev = {key: [x for r in results for x in r["eval"][key]] for key in ("places", "clean_scans", "edits", "real_lesions")}
    folds = [{"fold": r["fold"], "held_out": r["held_out"], "unseen": r["unseen"], "train_seconds": r["train_seconds"],
              "peak_rss_gb": r.get("peak_rss_gb"), "row": summarise(r["eval"], r["threshold"]),
              "eval": r["eval"]} for r in results]  # the places too, so that a later report can pool this fold (--with)
    pooled = {"fold": "pooled", "held_out": sorted(p for r in results for p in r["held_out"]), "unseen": [], "row": summarise(pooled_ev)}
    report = {"config": Path(args.config).name, "folds": folds, "pooled": pooled, "max_false_for_threshold": MAX_FALSE}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(folds, pooled)
    (out / "cv.md").write_text(md)
    for path, text in ((args.json, json.dumps(report, indent=2) + "\n"), (args.md, md)):
        if path:
            Path(path).write_text(text)
    print(md)


def train_2d(fold_cfg: dict, fold_dir: Path, k: int):
    """The fold's 2D slice detector, trained as configs/tamper2d.yaml trains the bundled one: on
    the axial slices of the 3D run's cubes (its sources' and its hard negatives)."""
    import yaml

    from ctguard.engine.train3d import DEFAULTS, make_cubes

    run = fold_dir / "2d"
    if not (run / "model.pt").is_file():
        cubes = fold_dir / "cubes.npz"
        x, y = make_cubes({**DEFAULTS, **fold_cfg}, progress=False)  # from the source cache the 3D run filled
        np.savez(cubes, x=x, y=y)
        del x, y
        cfg2 = yaml.safe_load((ROOT / "configs/tamper2d.yaml").read_text())
        cfg2["cubes"] = [str(cubes)] + [str(p) for p in sorted(fold_dir.glob("hard_round*.npz"))]
        try:
            api.train(cfg2, run, progress=False, echo=lambda m: print(f"fold {k} 2D: {m}", flush=True))
        finally:
            cubes.unlink()
    return load_detector2d(str(run / "model.pt"))


def fixed_model_fold(model: str, model2d: str | None, by_patient: dict, k: int, fold_dir: Path, skip: set[str]) -> None:
    """A detector trained elsewhere, at its own threshold, on the fold's held-out patients (those
    it never trained on): the same measurements, for comparison."""
    held = {p: e for p, e in split_fold(by_patient, k)[1].items() if p not in skip}
    if not held:
        return
    det = load_detector(model)
    ev = evaluate_fold(det, held, k, load_detector2d(model2d) if model2d else None)
    fold_dir.mkdir(parents=True, exist_ok=True)
    result = {"fold": k, "held_out": sorted(held), "training_patients": None, "unseen": [], "train_seconds": None, "peak_rss_gb": None,
              "threshold": {**own_thresholds(det), "from": "the model card"}, "eval": ev}
    (fold_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"fold {k} ({det.name} {det.version}): " + json.dumps(summarise(ev, result["threshold"])), flush=True)


def own_thresholds(det) -> dict:
    """The detector's threshold and, where its second stage has one for the maps' peaks (and another
    for the blob map's), those (:func:`ctguard.screen.separate_thresholds`); where it has trace-blind
    trees, theirs (``blind``)."""
    blind = getattr(det.verifier, "blind", None)
    return {"threshold": det.threshold, **separate_thresholds(det), **({"blind": blind.thresholds()} if blind is not None else {})}


def run_fold(cfg: dict, by_patient: dict, fold: dict, k: int, fold_dir: Path, with_2d: bool = False) -> None:
    import resource

    training, held = split_fold(by_patient, k)
    # The full run's cube file holds every patient's cubes: a fold makes its own (from the source cache).
    fold_cfg = {**cfg, **fold["unseen_family"], "real_scans": [e for entries in training.values() for e in entries], "cache": None}
    unseen = [f for key, fams in fold["unseen_family"].items() for f in (cfg.get(key) or []) if f not in fams]
    echo = lambda m: print(f"fold {k}: {m}", flush=True)
    if not (fold_dir / "model.pt").is_file():
        api.train(fold_cfg, fold_dir, progress=False, echo=echo)
    elif fold_cfg.get("verifier") and not (fold_dir / "model.verifier.npz").is_file():
        # A fold whose network was trained before the recipe had a second stage: fit only that.
        from ctguard.engine.train3d import _pool, train_second_stage

        pool = _pool(fold_cfg)
        try:
            train_second_stage(fold_cfg, fold_dir, pool, echo)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    det = load_detector(str(fold_dir / "model.pt"))
    det2 = train_2d(fold_cfg, fold_dir, k) if with_2d else None
    if det.verifier is not None:  # chosen by the second stage on its training patients, out of patient
        calib = {**own_thresholds(det), "from": det.verifier.meta.get("threshold_rule")}
    else:
        calib = choose_threshold(det, fold_cfg, training)
        det.threshold = calib["threshold"]
        calib["from"] = f"{calib['scans']} clean scans of its training patients and phantoms"
    print(f"fold {k}: threshold {det.threshold} ({calib['from']})", flush=True)
    ev = evaluate_fold(det, held, k, det2)
    summary = json.loads((fold_dir / "summary.json").read_text())
    result = {"fold": k, "held_out": list(held), "training_patients": sorted(training), "unseen": unseen,
              "train_seconds": round(summary["train_seconds"] + summary["data_seconds"], 1),
              "peak_rss_gb": round(max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 2**20, 2),
              "threshold": calib, "eval": ev}
    (fold_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"fold {k}: " + json.dumps(summarise(ev, calib)), flush=True)


if __name__ == "__main__":
    main()
