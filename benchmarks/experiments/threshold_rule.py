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
from pathlib import Path


from ctguard.engine.train_verifier import choose_threshold, joined_rows, out_of_patient_scores, run_rows, tree_columns
from ctguard.verifier import finite_rows


def threshold(run: Path, folds: int) -> float:
    cfg, _, parts = run_rows(run)
    x, y, groups, clean = joined_rows(parts)
    _, columns = tree_columns(cfg)
    oof = out_of_patient_scores(cfg, x, finite_rows(x[:, columns]), y, groups, folds=folds)
    return choose_threshold(oof, clean, len(parts), float(cfg["verifier_max_false"]))


def at(ev: dict, t: float) -> dict:
    false = [sum(s >= t for s in c["candidate_scores"]) for c in ev["clean_scans"]]
    out = {"edits_found": sum(e["score"] >= t for e in ev["edits"]), "edits": len(ev["edits"]), "false_findings": sum(false),
           "clean_flagged": sum(f > 0 for f in false), "clean_scans": len(false)}
    if all("score" in r for r in ev["real_lesions"]):  # reports that keep each lesion's highest "injected" candidate
        out |= {"lesions_called_injected": sum(r["score"] >= t for r in ev["real_lesions"]), "lesions": len(ev["real_lesions"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--folds", default="5,0")
    a = ap.parse_args()
    report = {f["fold"]: f for f in json.loads(Path(a.report).read_text())["folds"]}
    totals: dict[int, dict] = {}
    for run in map(Path, a.runs):
        k = int(re.fullmatch(r"fold(\d+)", run.name).group(1))
        for folds in (int(v) for v in a.folds.split(",")):
            t = threshold(run, folds)
            res = at(report[k]["eval"], t)
            print(json.dumps({"fold": k, "oof_folds": folds or "one per group", "threshold": t, "report_threshold": report[k]["row"]["threshold"], **res}),
                  flush=True)
            tot = totals.setdefault(folds, {})
            for key, v in res.items():
                tot[key] = tot.get(key, 0) + v
    for folds, tot in totals.items():
        print(json.dumps({"oof_folds": folds or "one per group", "pooled": tot}))


if __name__ == "__main__":
    main()
