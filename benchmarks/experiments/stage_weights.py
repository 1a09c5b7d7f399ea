"""How weighting the hard genuine rows changes a run's second stage, measured on its training rows only.

Usage:
    python benchmarks/experiments/stage_weights.py RUN [--weights 1,5,20] [--clean-weights 1]

For a trained run (``config.json``, ``model.pt``, ``verifier_rows/``) the stage's rows are scored
out of patient as the fit does, with the untouched real lesions' rows (every real tumour or nodule
of a training scan, and a phantom's own nodule) weighted ``w`` and the untouched scans' candidates
weighted ``c`` in the trees' fits. For each setting: the threshold the rule chooses and, at it, the
share of injected and removed rows of real scans and of phantoms over it. Nothing held out is read;
this ranks settings before a fold is evaluated on its held-out patients.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ctguard.engine.train_verifier import (
    PLACES_EACH,
    choose_threshold,
    oof_folds,
    out_of_patient_scores,
    run_rows,
    stage_table,
    tree_columns,
)
from ctguard.verifier import finite_rows

def lesion_rows(part: dict) -> np.ndarray:
    """The rows of a source that are its untouched lesions: the untouched copy's places after its
    random and dense ones (:func:`ctguard.engine.train_verifier.negatives`; every source here has
    dense places: vessels)."""
    own = np.flatnonzero((part["scan"] == 0) & ~part["clean"])
    out = np.zeros(len(part["y"]), bool)
    out[own[2 * PLACES_EACH :]] = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--weights", default="1,5,20")
    ap.add_argument("--clean-weights", default="1")
    a = ap.parse_args()
    run = Path(a.run)
    cfg, _, parts = run_rows(run)
    x, y, groups, clean = stage_table(cfg, parts)
    lesion = np.concatenate([lesion_rows(p) for p in parts])
    real = ~np.char.startswith(groups.astype(str), "phantom ")
    _, columns = tree_columns(cfg)
    fit_x = finite_rows(x[:, columns])
    print(f"{len(y)} rows, {int(lesion.sum())} lesion rows ({int((lesion & real).sum())} real), {int(clean.sum())} clean candidates")
    for w in (float(v) for v in a.weights.split(",")):
        for c in (float(v) for v in a.clean_weights.split(",")):
            weight = np.where(lesion, w, 1.0) * np.where(clean, c, 1.0)
            oof = out_of_patient_scores(cfg, x, fit_x, y, groups, folds=oof_folds(cfg), weight=weight)
            t = choose_threshold(oof, clean, len(parts), float(cfg["verifier_max_false"]))
            share = {f"{kind} {where}": round(float((oof[m] >= t).mean()), 3)
                     for kind, lab in (("injected", 1), ("removed", 2)) for where, r in (("real", real), ("phantom", ~real))
                     for m in [(y == lab) & r]}
            print(json.dumps({"lesion_weight": w, "clean_weight": c, "threshold": t, "over_threshold": share,
                              "real_lesions_over_0.5": round(float((oof[lesion & real] >= 0.5).mean()), 3)}), flush=True)


if __name__ == "__main__":
    main()
