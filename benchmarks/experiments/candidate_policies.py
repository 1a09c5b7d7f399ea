"""Which candidates a fold's stage would need to find more held-out edits: every candidate a looser
policy would give, scored once, then the policies compared without screening again.

Usage:
    python benchmarks/experiments/candidate_policies.py RUNS OUT [--folds 0,1,2,3]
    python benchmarks/experiments/candidate_policies.py --summary OUT [--json FILE]

RUNS holds the folds' trained runs (``RUNS/foldK/model.pt``, as ``cross_validate.py --out RUNS``
leaves them). For each fold, on the same held-out copies as ``cross_validate.py`` (the same seeds),
it takes the network's maxima from 0.05 with no cap and the resampling trace's 60 strongest peaks
not among the network's first 40 (and, for a stage with ``smooth_peaks``, the smooth map's peaks it
takes itself, in every policy), scores each once with the fold's stage, and keeps which held-out
edit (of the candidate's kind or of any kind) each lies at, with ``near`` as the cross-validation
counts it (``OUT/foldK.json``, 4-6 min a fold). A stage reads each candidate on its own (no scan
reference), so a policy (the network's from a threshold t, at most c, and the trace's first n)
is the subset of these candidates it takes. ``--summary`` prints and writes, pooled over the folds,
edits found and false findings on the clean held-out scans for several policies at each fold's own
threshold, the stage's ceiling at lower thresholds, and how each missed edit is missed: no
candidate at it, only candidates of the other kind over the threshold, or candidates under it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cross_validate as cv  # noqa: E402

from ctguard import api  # noqa: E402
from ctguard.engine.train_verifier import near  # noqa: E402
from ctguard.screen import (findings_from, load_detector, screen_volume, smooth_candidates, stage_candidates,  # noqa: E402
                            trace_candidates, verify_findings)

RECIPE = (0.3, 40, 20)  # v0.14's recipe (the stages these policies were first read on): the network's maxima from 0.3, at most 40; the trace's first 20 peaks
POLICIES = [RECIPE, (0.3, 40, 0), (0.1, 40, 20), (0.05, 200, 20), (0.3, 60, 20), (0.3, 40, 40), (0.3, 40, 60), (0.3, 30, 30), (0.3, 20, 20),
            (0.3, 25, 40), (0.3, 30, 40), (0.3, 35, 40), (0.3, 40, 30), (0.3, 40, 35)]  # the last five: v0.15's 40 + 40 and less
CEILING = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)


def screened_copies(runs: Path, k: int):
    """Fold ``k``'s held-out copies (the cross-validation's, same seeds), each screened by the fold's
    detector (``RUNS/foldK/model.pt``) from 0.3: ``(stage, src, label, vol, edits, result, heat,
    lungs, reading)``, ``reading`` the stage's reading of the whole copy."""
    by_patient = cv.patient_scans(api.load_config(str(ROOT / "configs/tamper3d.yaml")))
    det = load_detector(str(runs / f"fold{k}" / "model.pt"))
    for _, src, label, vol, edits in cv.held_out_copies(cv.split_fold(by_patient, k)[1], k):
        result, heat, lungs = screen_volume(vol, det, threshold=0.3)
        yield det.verifier, src, label, vol, edits, result, heat, lungs, det.verifier.read_scan(vol, lungs)


def collect(runs: Path, out: Path, folds: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for k in folds:
        rows = []
        for v, src, label, vol, edits, result, heat, lungs, reading in screened_copies(runs, k):
            net = findings_from(heat, vol, 0.05)
            peaks = trace_candidates(heat, vol, lungs, 60, net[:40], reading.noise[0], reading.trace)
            smooth = own_smooth_peaks(v, heat, vol, lungs, reading)
            for source, found in (("net", net), ("trace", peaks), ("smooth", smooth)):
                for r, f in enumerate(found):
                    f["source"], f["rank"] = source, r
            cands = []
            for f in verify_findings(vol, lungs, net + peaks + smooth, v, reading.noise, reading.reference):
                at = [j for j, e in enumerate(edits) if near(f["voxel"], e.voxel, e.diameter_mm, vol.spacing)]
                cands.append({"source": f["source"], "rank": f["rank"], "network": f["network_score"], "score": f["score"], "kind": f["kind"],
                              "at": at, "at_kind": [j for j in at if edits[j].kind == f["kind"]]})
            rows.append({"patient": src.patient, "scan": src.name, "label": label, "threshold": v.meta["threshold"],
                         "edits": [{"kind": e.kind, "family": e.extra.get("family"), "target": e.extra.get("target", "lung"),
                                    "diameter_mm": round(float(e.diameter_mm), 1)} for e in edits],
                         "screened": [cv.best_at(result["findings"], e.kind, e.voxel, e.diameter_mm, vol) for e in edits],
                         "candidates": cands})
            print(f"fold {k}: {src.patient} {label}: {len(edits)} edits, {len(net)} network maxima, {len(peaks)} trace peaks", flush=True)
        (out / f"fold{k}.json").write_text(json.dumps(rows) + "\n")


def own_smooth_peaks(v, heat, vol, lungs, reading) -> list[dict]:
    """The smooth map's peaks a stage with ``smooth_peaks`` takes (after the recipe's network
    candidates and trace peaks, as screening takes them); none for a stage without."""
    if not int(v.meta.get("smooth_peaks", 0)):
        return []
    before = stage_candidates(heat, vol, replace(v, meta={**v.meta, "smooth_peaks": 0}), 1.0, lungs, reading.noise, reading.trace)
    return smooth_candidates(heat, vol, lungs, int(v.meta["smooth_peaks"]), before, reading.noise[0], reading.smooth)


def taken(copy: dict, t: float, cap: int, n_peaks: int) -> list[dict]:
    """The candidates a policy takes on a copy: the network's from ``t`` (best first, at most ``cap``),
    the trace's first ``n_peaks`` and the stage's own smooth peaks (where it takes them)."""
    net = sorted((c for c in copy["candidates"] if c["source"] == "net" and c["network"] >= t), key=lambda c: c["rank"])[:cap]
    return net + sorted((c for c in copy["candidates"] if c["source"] == "trace"), key=lambda c: c["rank"])[:n_peaks] + \
        [c for c in copy["candidates"] if c["source"] == "smooth"]


def policy(folds: dict, t: float, cap: int, n_peaks: int, threshold: float | None = None) -> dict:
    found = edits = false = clean = 0
    for rows in folds.values():
        for copy in rows:
            thr = copy["threshold"] if threshold is None else threshold
            cands = taken(copy, t, cap, n_peaks)
            if copy["edits"]:
                for j in range(len(copy["edits"])):
                    found += max((c["score"] for c in cands if j in c["at_kind"]), default=0.0) >= thr
                    edits += 1
            else:
                clean += 1
                false += sum(c["score"] >= thr for c in cands)
    return {"edits_found": found, "edits": edits, "false_findings": false, "clean_scans": clean}


def summary(out: Path, json_path: str | None) -> None:
    folds = {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("fold*.json"))}
    screened = sum(s >= copy["threshold"] for rows in folds.values() for copy in rows for s in copy["screened"])
    report = {"folds": sorted(folds), "screened_edits_found": screened,
              "policies": [{"network_from": t, "cap": c, "trace_peaks": n, **policy(folds, t, c, n)} for t, c, n in POLICIES],
              "ceiling": [{"threshold": thr, **policy(folds, *RECIPE, thr)} for thr in CEILING]}
    why = {"no candidate at it": 0, "only the other kind over the threshold": 0, "candidates at it under the threshold": 0}
    for rows in folds.values():
        for copy in rows:
            cands = taken(copy, *RECIPE)
            for j in range(len(copy["edits"])):
                thr = copy["threshold"]
                right = max((c["score"] for c in cands if j in c["at_kind"]), default=None)
                anyk = max((c["score"] for c in cands if j in c["at"]), default=None)
                if right is not None and right >= thr:
                    continue
                why["no candidate at it" if anyk is None else "only the other kind over the threshold" if anyk >= thr
                    else "candidates at it under the threshold"] += 1
    report["missed_by_the_recipes_policy"] = why
    write_report(report, json_path)


def tally(copies, hit, false) -> dict:
    """Over ``copies`` (the collected copies of the folds): edits found (``hit(copy, j)``: whether a
    copy's edit ``j`` is), of them those under 15 mm, and the false findings ``false(copy)`` of the
    clean copies."""
    out = {"edits_found": 0, "edits": 0, "small_found": 0, "small": 0, "false_findings": 0, "clean_scans": 0}
    for copy in copies:
        if not copy["edits"]:
            out["clean_scans"] += 1
            out["false_findings"] += int(false(copy))
        for j, e in enumerate(copy["edits"]):
            found = bool(hit(copy, j))
            out["edits"] += 1
            out["edits_found"] += found
            out["small"] += e["diameter_mm"] < 15
            out["small_found"] += found and e["diameter_mm"] < 15
    return out


def write_report(report: dict, json_path: str | None) -> None:
    """Prints a summary and writes it to ``json_path`` where given."""
    text = json.dumps(report, indent=2) + "\n"
    print(text)
    if json_path:
        Path(json_path).write_text(text)


def cli(doc: str, collect_folds, summarise, extra=()) -> None:
    """``RUNS OUT [--folds ...]`` collects (``collect_folds(runs, out, folds, args)``), ``--summary OUT
    [--json FILE]`` summarises (``summarise(out, json_path)``); ``extra``: more ``(flag, kwargs)``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("runs", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--folds", default="0,1,2,3")
    ap.add_argument("--summary", default=None, metavar="OUT")
    ap.add_argument("--json", default=None)
    for flag, kwargs in extra:
        ap.add_argument(flag, **kwargs)
    a = ap.parse_args()
    if a.summary:
        summarise(Path(a.summary), a.json)
    elif a.runs and a.out:
        collect_folds(Path(a.runs), Path(a.out), [int(k) for k in a.folds.split(",")], a)
    else:
        ap.error("give RUNS and OUT, or --summary OUT")


def main() -> None:
    cli(__doc__, lambda runs, out, folds, _: collect(runs, out, folds), summary)


if __name__ == "__main__":
    main()
