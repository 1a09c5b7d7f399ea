"""What other caps, orders and re-scorings of the candidates would find, read from candidate_pool.py's tables.

Usage:
    python benchmarks/experiments/candidate_rules.py POOL.npz [POOL.npz ...]

Each POOL is one fold's table (``candidate_pool.py``: every network candidate of its held-out
copies scored by the fold's stage, beside it the edits' JSON). For each rule, summed over the
given folds at each fold's own threshold: edits found with their right kind, false findings on the
untouched copies, real lesions called injected, and the rows the stage scores per copy (its cost).
"""

from __future__ import annotations

import json
import sys
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
    n_clean = int(z.get("n_clean", len(clean_copies)))
    return {"found": found, "edits": len(edits), "false": int((over & z["clean"]).sum()),
            "clean_copies": len(clean_copies), "lesions_inj": int((over & z["lesion"] & (kind == 1)).sum()),
            "rows_per_copy": round(keep.sum() / max(int(z["copies"]), 1) * (3 if refine else 1), 1)}


def main() -> None:
    pools = [load(p) for p in sys.argv[1:]]
    rules = {"cap 40 (now)": dict(cap=40), "cap 60": dict(cap=60), "cap 80": dict(cap=80), "no cap": dict(cap=None),
             "cap 40, re-scored at re-centred places": dict(cap=40, refine=True),
             "no cap, re-scored": dict(cap=None, refine=True)}
    for name, kw in rules.items():
        tot: dict = {}
        for z, edits in pools:
            r = apply(z, edits, **kw)
            tot = {k: tot.get(k, 0) + v for k, v in r.items()}
        tot["rows_per_copy"] = round(tot["rows_per_copy"] / len(pools), 1)
        print(f"{name}: {json.dumps(tot)}")
    for w in (0.5, 1.0, 2.0, 4.0):  # the network's logit plus w times the trace's excess (its largest window) as the order
        tot = {}
        for z, edits in pools:
            p_t = np.clip(1 - z["p_net"][:, 0], 1e-4, 1 - 1e-4)
            tr = np.nan_to_num(np.nanmax(z["trace"], axis=1), nan=0.0)
            r = apply(z, edits, 40, order=-(np.log(p_t / (1 - p_t)) + w * tr))
            tot = {k: tot.get(k, 0) + v for k, v in r.items()}
        print(f"cap 40 ordered by network logit + {w} x trace: {json.dumps(tot)}")


if __name__ == "__main__":
    main()
