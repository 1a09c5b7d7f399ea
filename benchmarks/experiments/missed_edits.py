"""Why each held-out edit a cross-validation missed was missed: its candidate and its own centre's score.

Usage:
    python benchmarks/experiments/missed_edits.py CV_JSON POOL.npz [POOL.npz ...] [--out FILE.json]

CV_JSON is a cross-validation report with its places (``benchmarks/cross_validate.py``; each fold's
edits and, in the same order, the stage's probabilities at their centres); each POOL the same
fold's every network candidate (``candidate_pool.py``, the same held-out copies and network), in
the folds' order. For each missed edit: whether the network gave a candidate near it within the
stage's cap of 40, only past it, or none, and whether the stage scores the edit's own centre, with
its right kind, at or over the fold's threshold (a candidate there would have found it). Counts by
edit kind and target, and the sizes of the injections found and missed.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cv")
    ap.add_argument("pools", nargs="+")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    folds = json.loads(Path(a.cv).read_text())["folds"]
    if len(folds) != len(a.pools):
        ap.error(f"{a.cv} has {len(folds)} folds, {len(a.pools)} pools given")
    counts: collections.Counter = collections.Counter()
    sizes: dict[str, list[float]] = {"found": [], "missed": []}
    for fold, pool in zip(folds, a.pools):
        thr = float(fold["row"]["threshold"])
        centres = [p for p in fold["eval"]["places"] if p["what"] in ("injected", "removed")]
        edits = fold["eval"]["edits"]
        z = dict(np.load(pool))
        pool_edits = json.loads(Path(pool).with_suffix(".json").read_text())
        if not (len(centres) == len(edits) == len(pool_edits)):
            raise SystemExit(f"fold {fold['fold']}: {len(edits)} edits in the report, {len(pool_edits)} in {pool}")
        for j, (c, e, pe) in enumerate(zip(centres, edits, pool_edits)):
            if not (c["what"] == e["kind"] == pe["kind"] and c["family"] == e["family"] == pe["family"]):
                raise SystemExit(f"fold {fold['fold']}: edit {j} is not the same edit in the report and in {pool}")
            if e["kind"] == "injected":
                sizes["found" if e["found"] else "missed"].append(round(float(pe["diameter_mm"]), 1))
            if e["found"]:
                counts[(e["kind"], e["target"], "found", "")] += 1
                continue
            ranks = z["rank"][z["edit"] == j]
            candidate = "no candidate" if not len(ranks) else "candidate past the cap" if ranks.min() >= 40 else "candidate in the cap"
            centre = c["p_injected"] if e["kind"] == "injected" else c["p_removed"]
            counts[(e["kind"], e["target"], candidate, "centre over the threshold" if centre >= thr else "centre under it")] += 1
    rows = [{"kind": k, "target": t, "candidate": cand, "centre": cen, "edits": n} for (k, t, cand, cen), n in sorted(counts.items())]
    for r in rows:
        print(f"{r['kind']:8s} {r['target']:8s} {r['candidate']:24s} {r['centre']:26s} {r['edits']}")
    print("injections found, diameters (mm):", sorted(sizes["found"]))
    print("injections missed, diameters (mm):", sorted(sizes["missed"]))
    if a.out:
        Path(a.out).write_text(json.dumps({"cv": Path(a.cv).name, "pools": a.pools, "rows": rows, "injection_diameters_mm": sizes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
