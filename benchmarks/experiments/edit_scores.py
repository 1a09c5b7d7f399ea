"""Where the held-out edits' screening scores lie, from a cross-validation report alone.

Usage:
    python benchmarks/experiments/edit_scores.py REPORT.json [REPORT.json ...]

For each edit of each fold (``benchmarks/cross_validate.py`` keeps, per edit, the highest score of
a finding of its kind near it from 0.3, and at its centre the network's and the whole detector's
probabilities): how many are found at the fold's threshold, how many have a finding of their kind
from 0.3 but under the threshold, and how many have none; of the last, how many the detector would
score over 0.9 at the edit's own centre (lost between the network's candidates and the place: the
candidate is elsewhere or the stage reads it off-centre) and how many the network scores under 0.3
there (never a candidate). And of every missed edit, how many the detector scores with its kind at
its own centre at or over the fold's threshold, and over the maps' peaks' own where the fold's
stage has one (a candidate there, held to that threshold, would find it). By edit family and
target, pooled over the folds of each report that kept their places (a cv.json, or one fold's
eval.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare_runs import folds_of  # noqa: E402


def fold_thresholds(path: str) -> dict[int, tuple[float, float]]:
    """Each fold's threshold and the maps' peaks' own (the same where its stage has none), from a
    cv.json's rows or one fold's eval.json (1.0 where the report does not say)."""
    report = json.loads(Path(path).read_text())
    rows = [(f["fold"], f["row"]) for f in report["folds"]] if "folds" in report else \
        [(report["fold"], report.get("threshold") or {})]
    out = {}
    for fold, row in rows:
        t = float(row.get("threshold") or 1.0)
        out[fold] = (t, float(row.get("peak_threshold") or t))
    return out


def edits_with_places(folds: dict[int, dict], thresholds: dict[int, tuple[float, float]] | None = None) -> list[dict]:
    """Every edit of every fold's evaluation (:func:`compare_runs.folds_of`) with its centre's
    probabilities (the places of kind injected or removed, which follow the edits' order), its
    centre's score for its own kind (0 where the detector calls the place the other kind) and the
    fold's ``thresholds`` (:func:`fold_thresholds`)."""
    out = []
    for fold, ev in folds.items():
        at = [p for p in ev["places"] if p["what"] in ("injected", "removed")]
        if len(at) != len(ev["edits"]):
            raise SystemExit(f"fold {fold}: {len(ev['edits'])} edits but {len(at)} edit places")
        net, peak = (thresholds or {}).get(fold, (1.0, 1.0))
        for e, p in zip(ev["edits"], at):
            right = (p["p_injected"] >= p["p_removed"]) == (e["kind"] == "injected")
            out.append({**e, "network": p["p_network"], "stage": p["p_tampered"], "own_kind": p["p_tampered"] if right else 0.0,
                        "threshold": net, "peak_threshold": peak})
    return out


def breakdown(edits: list[dict]) -> dict:
    """Counts by (kind, family, target) and in all."""
    groups: dict = defaultdict(lambda: defaultdict(int))
    for e in edits:
        for key in ((e["kind"], e["family"], e["target"]), ("all",)):
            g = groups[" ".join(str(k) for k in key)]
            g["edits"] += 1
            g["found"] += bool(e["found"])
            g["under the threshold"] += (not e["found"]) and e["score"] > 0
            none = e["score"] == 0
            g["no finding from 0.3"] += none
            g["  of which the detector >= 0.9 at the centre"] += none and e["stage"] >= 0.9
            g["  of which the network < 0.3 at the centre"] += none and e["network"] < 0.3
            g["missed, its kind at the centre >= the threshold"] += (not e["found"]) and e["own_kind"] >= e["threshold"]
            g["missed, the same >= the peaks' threshold"] += (not e["found"]) and e["own_kind"] >= e["peak_threshold"]
    return {k: dict(v) for k, v in sorted(groups.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    a = ap.parse_args()
    for path in a.reports:
        table = breakdown(edits_with_places(folds_of(path), fold_thresholds(path)))
        columns = list(table["all"])
        print(f"\n{path}\n| kind, family, target | " + " | ".join(columns) + " |\n| --- |" + " --- |" * len(columns))
        for key, counts in table.items():
            print(f"| {key} | " + " | ".join(str(counts.get(c, 0)) for c in columns) + " |")


if __name__ == "__main__":
    main()
