"""What the second stage's threshold budget gives on held-out patients, over many trained folds.

Usage:
    python benchmarks/experiments/threshold_budget.py [--budgets 0.1,0.05,0] RUN,REPORT,FOLD [RUN,REPORT,FOLD ...]
    python benchmarks/experiments/threshold_budget.py --rules budget,real,smooth,no_lesions,clinical RUN,REPORT,FOLD [...]

Each fold's threshold is the lowest of the grid with at most ``verifier_max_false`` of its untouched
training scans' candidates over it per scan, scored out of patient (``verifier.json``'s
``false_per_clean_scan_oof`` of the fold's stage in RUN). For each budget this chooses every fold's
threshold again from those training counts alone and reads the fold's held-out evaluation (fold
FOLD of REPORT, a ``benchmarks/cross_validate.py`` report that kept every candidate's score) at it:
edits found with their right kind, false findings and clean scans flagged, real lesions called
injected, summed over all the given folds, and which folds flag a clean scan or call a lesion
injected. The folds of several variants of the recipe show how the rule itself holds up from one
trained stage to the next.

``--rules`` compares other rules at the budget ``verifier_max_false`` (0.1) on each stage's
out-of-patient scores (``verifier_oof.npz`` in RUN):
- ``budget``: the stage's own rule (candidates of every untouched training source);
- ``real``: the same on the real patients' untouched scans only (the phantoms' candidates and
  sources left out of the count);
- ``smooth``: each clean candidate counted as the chance that its score passes ``t`` under a
  logistic spread of 0.5 in logit units, so that no single candidate's score sets the threshold;
- ``no_lesions``: the stage's rule without the candidates at genuine lesions (the patients' nodules
  and tumours, the stage phantoms' own nodules): what a perfect genuine-nodule check would leave to
  it (the lesions read from the run's kept rows, ``verifier_rows/``);
- ``clinical``: the stage's rule without the phantoms of the one quick 1.9 mm set-up
  (``verifier_fixed_phantoms``), which no clinical scan resembles.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cross_validate import counts_at  # noqa: E402

import numpy as np  # noqa: E402

from scipy.special import expit, logit  # noqa: E402

from ctguard.engine import train_verifier as tv  # noqa: E402
from ctguard.engine.train_verifier import choose_threshold, lowest_within  # noqa: E402

SPREAD = 0.5  # the smooth rule's logistic spread, logit units


def rule_threshold(rule: str, oof: dict, stage: dict, budget: float, run: Path) -> float:
    """The threshold ``rule`` gives at ``budget`` on a stage's out-of-patient scores ``oof`` (its
    ``verifier_oof.npz``; ``run`` the stage's run)."""
    score, clean, group = oof["score"], oof["clean"], oof["group"].astype(str)
    phantom = np.char.startswith(group, "phantom ")
    if rule == "budget":
        return choose_threshold(score, clean, stage["sources"], budget)
    if rule == "real":  # each phantom is its own source
        return choose_threshold(score, clean & ~phantom, max(stage["sources"] - len(set(group[phantom].tolist())), 1), budget)
    if rule == "no_lesions":
        _, _, parts = tv.run_rows(run)
        lesion = np.concatenate([p["lesion"] for p in parts])
        if len(lesion) != len(score):
            raise SystemExit(f"{run}: {len(lesion)} rows kept, {len(score)} scored out of patient")
        return choose_threshold(score, clean & ~lesion, stage["sources"], budget)
    if rule == "clinical":
        cfg = {**tv.VERIFIER_DEFAULTS, **json.loads((run / "config.json").read_text())}
        quick = [f"phantom {spec[1]}" for spec in tv.verifier_specs(cfg) if spec[0] == "fixed phantom"]
        return choose_threshold(score, clean & ~np.isin(group, quick), stage["sources"] - len(quick), budget)
    if rule == "smooth":
        z = logit(np.clip(score[clean], 1e-6, 1 - 1e-6))
        return lowest_within(lambda t: float(expit((z - logit(t)) / SPREAD).sum()) / stage["sources"], budget)
    raise SystemExit(f"unknown rule {rule!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="RUN,REPORT,FOLD: a fold's stage run, a report with its held-out evaluation, the fold")
    ap.add_argument("--budgets", default="0.1,0.05,0")
    ap.add_argument("--rules", help="compare these rules (budget, real, smooth) at the budget 0.1 instead of budgets")
    ap.add_argument("--json", help="also write the table here")
    a = ap.parse_args()
    folds = []
    for pair in a.pairs:
        run, report, fold = pair.split(",")
        stage = json.loads((Path(run) / "verifier.json").read_text())
        ev = {f["fold"]: f["eval"] for f in json.loads(Path(report).read_text())["folds"]}[int(fold)]
        oof = dict(np.load(Path(run) / "verifier_oof.npz")) if a.rules else None
        folds.append((pair, stage, ev, oof))
    out = []
    settings = [("budget", float(b)) for b in a.budgets.split(",")] if not a.rules else [(r, 0.1) for r in a.rules.split(",")]
    for rule, budget in settings:
        total: Counter = Counter()
        failing, thresholds = [], []
        for pair, stage, ev, oof in folds:
            if a.rules:
                t = rule_threshold(rule, oof, stage, budget, Path(pair.split(",")[0]))
            else:
                t = lowest_within(lambda t: stage["false_per_clean_scan_oof"][str(t)], budget)  # the fit's rule on its own counts
            thresholds.append(t)
            got = counts_at(ev, t)
            total.update(got)
            if got["clean_flagged"] or got.get("lesions_called_injected"):
                failing.append({"fold": pair, "threshold": t, "clean_flagged": got["clean_flagged"],
                                "lesions_called_injected": got.get("lesions_called_injected")})
        row = {"rule": rule, "budget": budget, "folds": len(folds), "thresholds": thresholds, **total,
               "false_per_clean_scan": round(total["false_findings"] / max(total["clean_scans"], 1), 3),
               "edits_found_share": round(total["edits_found"] / max(total["edits"], 1), 3), "failing": failing}
        out.append(row)
        print(json.dumps(row))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
