"""Second stages fitted other ways on a fold's training rows, read on its held-out candidates, in seconds.

Usage:
    python benchmarks/experiments/stage_variants.py RUN,POOL [RUN,POOL ...] [--variants recipe,no_fixed,...]
                                                    [--set KEY=VALUE ...] [--out FILE.json]

RUN is a fold's run (its stage's rows in ``verifier_rows/``, made again where missing); POOL its
held-out candidates (``candidate_pool.py``, from the same network, so the same candidates and rows).
Each variant changes which training rows the trees learn from, or which untouched training copies
the threshold's rule counts, fits the trees and chooses the threshold exactly as the stage does
(out-of-patient scores over grouped folds, the lowest threshold with at most ``verifier_max_false``
candidates over it per untouched source), then reads the held-out candidates (the first
``max_candidates`` of each copy, in the network's order): edits found with their right kind, false
findings on untouched copies, real lesions called injected. ``recipe`` must give the fold's own
numbers back.

Variants: ``recipe``; ``no_fixed``: without the phantoms of the demo's one set-up (1.9 mm pixels,
whose ripple the trace cannot read) in fit and rule; ``fixed_fit_only``: those phantoms in the fit
but not in the rule; ``no_phantoms``: real patients only; ``real_rule``: every row in the fit, the
rule counting the real patients' untouched scans only. ``--set`` changes a stage setting of
every fold's config that leaves the rows as they are (the trees': ``verifier_trees``,
``verifier_depth``, ``verifier_rate``; the rule's ``verifier_max_false``), its value read as YAML.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from candidate_rules import apply, load  # noqa: E402

from ctguard.engine.train_verifier import (  # noqa: E402
    boosting_classifier,
    choose_threshold,
    oof_folds,
    out_of_patient_probabilities,
    run_rows,
    stage_table,
    tree_columns,
)
from ctguard.verifier import finite_rows  # noqa: E402


# Stage settings that change the trees or the threshold's rule but not the rows.
ROW_KEEPING = ("verifier_trees", "verifier_depth", "verifier_rate", "verifier_max_false")


def fixed_groups(cfg: dict) -> set[str]:
    """The groups of the stage's phantoms of the one set-up (``verifier_specs``' seeds base + 50 + k)."""
    base = int(cfg["seed"]) * 1000 + 900
    return {f"phantom {base + 50 + k}" for k in range(int(cfg["verifier_fixed_phantoms"]))}


def variant_masks(name: str, groups: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(rows the trees learn from, rows the threshold's rule may count)`` of a variant."""
    fixed = np.isin(groups, sorted(fixed_groups(cfg)))
    phantom = np.char.startswith(groups.astype(str), "phantom")
    every = np.ones(len(groups), bool)
    return {"recipe": (every, every), "no_fixed": (~fixed, ~fixed), "fixed_fit_only": (every, ~fixed),
            "no_phantoms": (~phantom, ~phantom), "real_rule": (every, ~phantom)}[name]


def fold_variant(cfg: dict, parts: list[dict], pool: tuple[dict, list[dict]], name: str) -> dict:
    x, y, groups, clean = stage_table(cfg, parts)
    fit, rule = variant_masks(name, groups, cfg)
    _, columns = tree_columns(cfg)
    fx = finite_rows(x[:, columns])
    p = out_of_patient_probabilities(cfg, x[fit], fx[fit], y[fit], groups[fit], folds=oof_folds(cfg))
    oof = 1.0 - p[:, 0]
    counted = rule[fit]
    counted_groups = set(groups[fit][counted].tolist())
    n_clean = sum(1 for q in parts if q["group"] in counted_groups)  # one untouched copy per source
    thr = choose_threshold(oof[counted], clean[fit][counted], n_clean, float(cfg["verifier_max_false"]))
    trees = boosting_classifier(cfg).fit(fx[fit], y[fit])
    z, edits = pool
    hx = finite_rows(z["x"][:, columns])
    probs = np.zeros((len(hx), 3))
    probs[:, trees.classes_.astype(int)] = trees.predict_proba(hx)
    return {"threshold": thr, **apply({**z, "p_stage": probs, "threshold": np.float64(thr)}, edits, cap=int(z["cap"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folds", nargs="+", help="RUN,POOL")
    ap.add_argument("--variants", default="recipe,no_fixed,fixed_fit_only,no_phantoms")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a stage setting that keeps the rows (the trees', the rule's), for every fold")
    ap.add_argument("--out", default=None, help="also write every fold's and the pooled results here (JSON)")
    args = ap.parse_args()
    import yaml

    settings = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key not in ROW_KEEPING:
            ap.error(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(ROW_KEEPING)}")
        settings[key] = yaml.safe_load(value)
    per_fold: list[dict] = []
    names = args.variants.split(",")
    totals: dict[str, dict] = {n: {} for n in names}
    for spec in args.folds:
        run, pool_path = spec.split(",")
        cfg, _, parts = run_rows(Path(run))
        cfg.update(settings)
        pool = load(pool_path)
        for n in names:
            r = fold_variant(cfg, parts, pool, n)
            per_fold.append({"run": run, "pool": pool_path, "variant": n, **r})
            print(f"{run} {n}: {json.dumps(r)}", flush=True)
            t = totals[n]
            for k, v in r.items():
                t[k] = t.get(k, []) + [v] if k == "threshold" else t.get(k, 0) + v
    for n in names:
        print(f"pooled {n}: {json.dumps(totals[n])}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": settings, "folds": per_fold, "pooled": totals}, indent=1) + "\n")


if __name__ == "__main__":
    main()
