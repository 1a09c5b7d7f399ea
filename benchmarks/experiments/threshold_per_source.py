"""A threshold for each source of candidates: the network's, and the maps' peaks (trace and smooth).

Usage:
    python benchmarks/experiments/threshold_per_source.py RUNS POOL [--budgets 0.2,0.3] [--peaks 40] [--json FILE]

RUNS holds the folds' trained runs (``RUNS/foldK``, each with ``verifier_oof.npz`` and its rows kept
in ``verifier_rows/``), POOL the same folds' candidate pool (``candidate_policies.py RUNS POOL``: every
candidate of the held-out copies scored once by the fold's stage, with its source). For each fold,
each source's threshold is chosen by the stage's rule on its own out-of-patient scores (the lowest
of the grid with at most ``budget`` of that source's untouched training candidates over it per
untouched training source), for a budget of half the stage's (the two together within it) and of
the whole; then the recipe's candidates of the held-out copies (the network's 40, the trace's 40
peaks, the smooth map's peaks) are read against their own source's threshold: edits found with
their right kind and candidates over their threshold on the clean copies, beside one threshold for
all (the stage's own rule). ``--budgets``: also the stage's rule for each source at other budgets
(false candidates a clean training scan, half of it each); ``--peaks``: how many of the trace's
peaks to read from the pool (the recipe's 40; the pool holds up to 60). Pooled over the folds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "experiments"))

from candidate_policies import taken, tally, write_report  # noqa: E402

from ctguard.engine import train_verifier as tv  # noqa: E402


def row_sources(parts: list[dict]) -> np.ndarray:
    """Each of the stage's rows (its kept rows, :func:`ctguard.engine.train_verifier.run_rows`), in
    the order they were fitted: "net" (a network candidate), "peak" (a peak of the trace's or the
    smooth map) or "place" (an edit's centre or an untouched place)."""
    peak, candidate = np.concatenate([p["peak"] for p in parts]), np.concatenate([p["candidate"] for p in parts])
    return np.where(peak, "peak", np.where(candidate, "net", "place"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs")
    ap.add_argument("pool")
    ap.add_argument("--budgets", default="", help="other budgets for the stage's per-source rule, e.g. 0.2,0.3")
    ap.add_argument("--peaks", type=int, default=40, help="the trace's peaks read from the pool")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    report = {"folds": [], "pooled": {}}
    for fold in sorted(Path(a.pool).glob("fold*.json")):
        k = int(fold.stem[4:])
        run = Path(a.runs) / f"fold{k}"
        z = np.load(run / "verifier_oof.npz")
        cfg, _, parts = tv.run_rows(run)
        src = row_sources(parts)
        if len(src) != len(z["score"]):
            raise SystemExit(f"{run}: {len(src)} rows kept, {len(z['score'])} scored out of patient")
        budget, n = float(cfg["verifier_max_false"]), len(parts)  # the rule's untouched sources: one untouched copy each
        one = tv.choose_threshold(z["score"], z["clean"], n, budget)
        rules = {"one threshold": {"net": one, "peak": one}}
        # Half the budget each is the stage's own rule (verifier_peak_threshold: train_verifier.choose_thresholds).
        rules["per source, 0.5 of the budget each"] = dict(zip(("net", "peak"), tv.choose_thresholds(z["score"], z["clean"], src == "peak", n, budget)))
        rules["per source, 1 of the budget each"] = {s: tv.choose_threshold(z["score"], z["clean"] & (src == s), n, budget) for s in ("net", "peak")}
        for other in (float(b) for b in a.budgets.split(",") if b):
            rules[f"per source, a budget of {other:g}"] = dict(zip(("net", "peak"), tv.choose_thresholds(z["score"], z["clean"], src == "peak", n, other)))
        copies = json.loads(fold.read_text())
        row = {"fold": k, "thresholds": rules}
        for name, thr in rules.items():
            def over(copy: dict) -> list[dict]:
                return [c for c in taken(copy, 0.3, 40, a.peaks) if c["score"] >= thr["net" if c["source"] == "net" else "peak"]]

            counts = tally(copies, lambda copy, j: any(j in c["at_kind"] for c in over(copy)), lambda copy: len(over(copy)))
            row[name] = counts
            pooled = report["pooled"].setdefault(name, {})
            for key, v in counts.items():
                pooled[key] = pooled.get(key, 0) + v
        report["folds"].append(row)
        print(f"fold {k}: {rules}", flush=True)
    report["how"] = (f"python benchmarks/experiments/threshold_per_source.py {a.runs} {a.pool}" + (f" --budgets {a.budgets}" if a.budgets else "")
                     + (f" --peaks {a.peaks}" if a.peaks != 40 else "") + (f" --json {a.json}" if a.json else ""))
    write_report(report, a.json)


if __name__ == "__main__":
    main()
