"""How a fold's operating threshold depends on the way its out-of-patient scores are made.

Usage:
    python benchmarks/experiments/threshold_rule.py REPORT.json RUN_FOLD0 RUN_FOLD1 ... [--folds 5,0]

For each fold run (its ``config.json``, ``model.pt``, ``verifier_rows/``, the fold number read from
its directory's name ``foldK``) the stage's training rows are scored out of patient with grouped
folds (5: as the fit does) or one fit for each patient or phantom left out (0), the threshold is
chosen by the fit's rule, and the fold's held-out results in REPORT (a ``cross_validate.py`` report
of those very runs, which keeps every edit's best score and every clean scan's candidates) are read
at it: edits found with their right kind, false findings and clean scans flagged, and real lesions
called injected where the report keeps each lesion's highest "injected" candidate. Only the
threshold changes; the trees screening the held-out scans are the same.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from ctguard.engine.train_verifier import choose_threshold, out_of_patient_scores, run_rows, stage_table, tree_columns
from ctguard.verifier import finite_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: cross_validate's reading of a report
from cross_validate import counts_at  # noqa: E402


def thresholds(run: Path, folds: list[int]) -> dict[int, float]:
    """The threshold the fit's rule chooses on the run's rows scored each way (rows read once)."""
    cfg, _, parts = run_rows(run)
    x, y, groups, clean = stage_table(cfg, parts)
    _, columns = tree_columns(cfg)
    fit_x = finite_rows(x[:, columns])
    return {f: choose_threshold(out_of_patient_scores(cfg, x, fit_x, y, groups, folds=f), clean, len(parts), float(cfg["verifier_max_false"]))
            for f in folds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--folds", default="5,0")
    a = ap.parse_args()
    report = {f["fold"]: f for f in json.loads(Path(a.report).read_text())["folds"]}
    totals: dict[int, Counter] = {}
    for run in map(Path, a.runs):
        k = int(re.fullmatch(r"fold(\d+)", run.name).group(1))
        for folds, t in thresholds(run, [int(v) for v in a.folds.split(",")]).items():
            res = counts_at(report[k]["eval"], t)
            print(json.dumps({"fold": k, "oof_folds": folds or "one per group", "threshold": t, "report_threshold": report[k]["row"]["threshold"], **res}),
                  flush=True)
            totals.setdefault(folds, Counter()).update(res)
    for folds, tot in totals.items():
        print(json.dumps({"oof_folds": folds or "one per group", "pooled": tot}))


if __name__ == "__main__":
    main()
