"""What the second stage's threshold budget gives on held-out patients, over many trained folds.

Usage:
    python benchmarks/experiments/threshold_budget.py [--budgets 0.1,0.05,0] RUN,REPORT,FOLD [RUN,REPORT,FOLD ...]

Each fold's threshold is the lowest of the grid with at most ``verifier_max_false`` of its untouched
training scans' candidates over it per scan, scored out of patient (``verifier.json``'s
``false_per_clean_scan_oof`` of the fold's stage in RUN). For each budget this chooses every fold's
threshold again from those training counts alone and reads the fold's held-out evaluation (fold
FOLD of REPORT, a ``benchmarks/cross_validate.py`` report that kept every candidate's score) at it:
edits found with their right kind, false findings and clean scans flagged, real lesions called
injected, summed over all the given folds, and which folds flag a clean scan or call a lesion
injected. The folds of several variants of the recipe show how the rule itself holds up from one
trained stage to the next.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cross_validate import counts_at  # noqa: E402

from ctguard.engine.train_verifier import lowest_within  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="RUN,REPORT,FOLD: a fold's stage run, a report with its held-out evaluation, the fold")
    ap.add_argument("--budgets", default="0.1,0.05,0")
    ap.add_argument("--json", help="also write the table here")
    a = ap.parse_args()
    folds = []
    for pair in a.pairs:
        run, report, fold = pair.split(",")
        stage = json.loads((Path(run) / "verifier.json").read_text())
        ev = {f["fold"]: f["eval"] for f in json.loads(Path(report).read_text())["folds"]}[int(fold)]
        folds.append((pair, stage, ev))
    out = []
    for budget in (float(b) for b in a.budgets.split(",")):
        total: Counter = Counter()
        failing = []
        for pair, stage, ev in folds:
            t = lowest_within(lambda t: stage["false_per_clean_scan_oof"][str(t)], budget)  # the fit's rule on its own counts
            got = counts_at(ev, t)
            total.update(got)
            if got["clean_flagged"] or got.get("lesions_called_injected"):
                failing.append({"fold": pair, "threshold": t, "clean_flagged": got["clean_flagged"],
                                "lesions_called_injected": got.get("lesions_called_injected")})
        row = {"budget": budget, "folds": len(folds), **total,
               "false_per_clean_scan": round(total["false_findings"] / max(total["clean_scans"], 1), 3),
               "edits_found_share": round(total["edits_found"] / max(total["edits"], 1), 3), "failing": failing}
        out.append(row)
        print(json.dumps(row))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
