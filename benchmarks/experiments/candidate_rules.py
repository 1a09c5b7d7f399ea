"""What other caps, orders and re-scorings of the candidates would find, read from candidate_pool.py's tables.

Usage:
    python benchmarks/experiments/candidate_rules.py POOL.npz [POOL.npz ...] [--out FILE.json] [--second-look RUN ...] [--stages RUN ...]

Each POOL is one fold's table (``candidate_pool.py``: every network candidate of its held-out
copies scored by the fold's stage, beside it the edits' JSON). For each rule, summed over the
given folds at each fold's own threshold: edits found with their right kind, false findings on the
untouched copies, real lesions called injected, and the rows the stage scores per copy (its cost;
a second look scores two more for each candidate from 0.2). ``--second-look RUN ...`` (one per
pool, in order: each fold's stage refitted with ``verifier_refine_from: 0.2``, the same trees with
the threshold its rule chose counting the second look) adds the second look at those thresholds.
``--stages RUN ...`` (one per pool: each fold's stage refitted from the same network on other
settings that keep the rows' columns, e.g. ``verifier_trace_order``) reads the pools with those
stages: their trees, their thresholds and their order of candidates; with them, also a cap of 60 and
none, and slots of the cap kept for the candidates the network most calls removed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(path: str) -> tuple[dict, list[dict]]:
    z = dict(np.load(path))
    return z, json.loads(Path(path).with_suffix(".json").read_text())


def apply(z: dict, edits: list[dict], cap: int | None, order: np.ndarray | None = None, refine: bool = False) -> dict:
    """The findings under a rule: per copy the first ``cap`` candidates in ``order`` (default: the
    network's), each scored by the stage (with ``refine``: the highest of the place and its two
    re-centred places), kind by the higher of P(injected) and P(removed)."""
    thr = float(z["threshold"])
    keep = np.zeros(len(z["copy"]), bool)
    key = z["rank"].astype(float) if order is None else order
    for c in np.unique(z["copy"]):
        idx = np.flatnonzero(z["copy"] == c)
        keep[idx[np.argsort(key[idx], kind="stable")[: cap or len(idx)]]] = True
    p = z["p_stage"].copy()
    if refine:
        for alt in (z["p_dense"], z["p_smooth"]):
            better = np.isfinite(alt[:, 0]) & (1 - alt[:, 0] > 1 - p[:, 0])
            p[better] = alt[better]
    score = 1 - p[:, 0]
    kind = np.where(p[:, 1] >= p[:, 2], 1, 2)
    over = keep & (score >= thr)
    found = 0
    for j, e in enumerate(edits):
        want = 1 if e["kind"] == "injected" else 2
        found += bool(np.any(over & (z["edit"] == j) & (kind == want)))
    clean_copies = np.unique(z["copy"][z["clean"]])
    return {"found": found, "edits": len(edits), "false": int((over & z["clean"]).sum()),
            "clean_copies": len(clean_copies), "lesions_inj": int((over & z["lesion"] & (kind == 1)).sum()),
            "rows_per_copy": round((keep.sum() + (2 * (keep & np.isfinite(z["p_dense"][:, 0])).sum() if refine else 0)) / max(int(z["copies"]), 1), 1)}


def trace_order(z: dict, w: float) -> np.ndarray:
    """The key ``ctguard.verifier.trace_ordered`` sorts a copy's candidates by (ascending), read from
    a pool's kept traces: minus the network's log-odds plus ``w`` times the trace's excess over the
    scan's (its largest window)."""
    p_t = np.clip(1 - z["p_net"][:, 0], 1e-4, 1 - 1e-4)
    return -(np.log(p_t / (1 - p_t)) + w * np.nan_to_num(np.nanmax(z["trace"], axis=1), nan=0.0))


def removed_slots(z: dict, first: int) -> np.ndarray:
    """A key that takes each copy's first ``first`` candidates in the network's order, then the rest
    in the order of the network's P(removed): slots of the cap kept for in-paintings, whose
    P(tampered) a nearby vessel or nodule may outrank."""
    key = np.zeros(len(z["copy"]))
    for c in np.unique(z["copy"]):
        idx = np.flatnonzero(z["copy"] == c)
        early = z["rank"][idx] < first
        key[idx[early]] = z["rank"][idx[early]]
        rest = idx[~early]
        key[rest[np.argsort(-z["p_net"][rest, 2], kind="stable")]] = first + np.arange(len(rest))
    return key


def pooled(pools: list[tuple[dict, list[dict]]], rule) -> dict:
    """``apply``'s counts summed over the folds' pools (the rows a copy averaged), ``rule(z, edits)``
    giving each fold's."""
    tot: dict = {}
    for z, edits in pools:
        tot = {k: tot.get(k, 0) + v for k, v in rule(z, edits).items()}
    return tot | {"rows_per_copy": round(tot["rows_per_copy"] / len(pools), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pools", nargs="+")
    ap.add_argument("--out", default=None, help="also write the results here (JSON)")
    ap.add_argument("--second-look", nargs="*", default=[], help="each fold's stage refitted with verifier_refine_from (its threshold)")
    ap.add_argument("--stages", nargs="*", default=[], help="each fold's stage refitted on other settings (trees, threshold, order)")
    args = ap.parse_args()
    for runs in (args.second_look, args.stages):
        if runs and len(runs) != len(args.pools):
            ap.error("--second-look and --stages need one run for each pool")
    pools = [load(p) for p in args.pools]
    rules = {"cap 40 (the recipe)": dict(cap=40), "cap 60": dict(cap=60), "cap 80": dict(cap=80), "no cap": dict(cap=None),
             "cap 40, second look at the re-centred places from 0.2": dict(cap=40, refine=True),
             "no cap, second look": dict(cap=None, refine=True)}
    results = {}
    for name, kw in rules.items():
        results[name] = pooled(pools, lambda z, edits: apply(z, edits, **kw))
    for w in (0.5, 1.0, 2.0, 4.0):
        results[f"cap 40 in the order of network logit + {w} x trace"] = pooled(pools, lambda z, edits: apply(z, edits, 40, order=trace_order(z, w)))
    if args.second_look:
        thresholds = [float(json.loads((Path(run) / "verifier.json").read_text())["threshold"]) for run in args.second_look]
        by_fold = iter(thresholds)
        results["cap 40, second look, at the thresholds its rule chooses"] = {
            "thresholds": thresholds, **pooled(pools, lambda z, edits: apply({**z, "threshold": np.float64(next(by_fold))}, edits, 40, refine=True))}
    if args.stages:
        from ctguard.verifier import Verifier

        stages = [Verifier.load(Path(run) / "model.verifier.npz") for run in args.stages]
        # Each pool scored by its fold's stage: its trees, its threshold and its order of candidates.
        scored = [({**z, "threshold": np.float64(v.meta["threshold"]), "p_stage": v.probabilities(z["x"]), "stage_cap": int(v.meta["max_candidates"]),
                    "order": None if v.meta.get("trace_order") is None else trace_order(z, float(v.meta["trace_order"]))}, edits)
                  for (z, edits), v in zip(pools, stages)]
        thresholds = {"thresholds": [float(v.meta["threshold"]) for v in stages]}
        name = "the stages " + " ".join(args.stages)
        results[name] = thresholds | pooled(scored, lambda z, edits: apply(z, edits, z["stage_cap"], order=z["order"]))
        for cap in (60, None):
            results[f"{name}, cap {cap or 'none'}"] = thresholds | pooled(scored, lambda z, edits: apply(z, edits, cap, order=z["order"]))
        for first in (24, 30, 34):
            results[f"{name}, the network's first {first}, then the rest by P(removed) to 40"] = thresholds | pooled(
                scored, lambda z, edits: apply(z, edits, 40, order=removed_slots(z, first)))
    for name, r in results.items():
        print(f"{name}: {json.dumps(r)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"pools": args.pools, "rules": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
