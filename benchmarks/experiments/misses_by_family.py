"""Which held-out edits a cross-validation finds, by family and size, and what its edits' own centres score.

Usage:
    python benchmarks/experiments/misses_by_family.py CV_JSON [--json FILE]

CV_JSON is a report of ``benchmarks/cross_validate.py`` with its places (each fold's edits and, in
the same order, the stage's probabilities at their centres). It prints, pooled over the folds:

- edits found by kind, family and target (healthy lung or a real tumour), and by size;
- the edits whose own centre scores, with its right kind, at or over the fold's threshold for the
  network's candidates: what a candidate at every centre would find;
- the missed edits with no place of their kind scoring 0.3 or more anywhere near them (screening
  lists every place from 0.3), and those with one under the fold's thresholds.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

SIZES_MM = ((0, 10), (10, 14), (14, 20), (20, 1000))


def summary(report: dict) -> dict:
    """The counts the module's text lists, from a cross-validation ``report``."""
    found, total = collections.Counter(), collections.Counter()
    found_by_size, total_by_size = collections.Counter(), collections.Counter()
    at_centre = either = unplaced = under = 0
    for fold in report["folds"]:
        ev, threshold = fold["eval"], fold["row"]["threshold"]
        centres = [p for p in ev["places"] if p["family"]]  # the edits' centres, in the edits' order
        if len(centres) != len(ev["edits"]):
            raise SystemExit(f"fold {fold['fold']}: {len(centres)} centres for {len(ev['edits'])} edits; not a report with its places")
        for e, p in zip(ev["edits"], centres):
            key = (e["kind"], e["family"], e["target"])
            total[key] += 1
            found[key] += e["found"]
            band = next(f"{lo}-{hi}" if hi < 1000 else f"{lo}+" for lo, hi in SIZES_MM if lo <= e["diameter_mm"] < hi)
            total_by_size[(e["kind"], band)] += 1
            found_by_size[(e["kind"], band)] += e["found"]
            right = (p["p_injected"] >= p["p_removed"]) == (e["kind"] == "injected")
            own = p["p_injected"] if e["kind"] == "injected" else p["p_removed"]
            centre = right and own >= threshold
            at_centre += centre
            either += centre or e["found"]
            if not e["found"]:
                unplaced += e["score"] == 0.0
                under += e["score"] > 0.0
    edits = sum(total.values())
    return {
        "edits": edits, "found": sum(found.values()),
        "by_family": {" ".join(k): f"{found[k]}/{total[k]}" for k in sorted(total)},
        "by_size_mm": {f"{kind} {band}": f"{found_by_size[(kind, band)]}/{n}" for (kind, band), n in sorted(total_by_size.items())},
        "centre_over_threshold": f"{at_centre}/{edits}", "found_or_centre_over": f"{either}/{edits}",
        "missed_with_no_place_from_0.3": unplaced, "missed_under_threshold": under,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cv")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = {"cv": Path(a.cv).name, **summary(json.loads(Path(a.cv).read_text()))}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
