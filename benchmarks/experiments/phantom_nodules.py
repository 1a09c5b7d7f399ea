"""Can the second stage's columns tell a genuine nodule from an injected one, given enough of them?

Usage:
    python benchmarks/experiments/phantom_nodules.py RUN [--phantoms 40] [--apply runs/patch/f0 ...] [--out FILE.json]

A fold's trees learn from about 17 genuine lesions against about 280 injections (see
``stage_features.py``). Phantoms give as many genuine nodules as one likes: each varied phantom
here (seeds apart from every run's) carries one genuine nodule, drawn by the renderer of the
"drawn" injection family but under the scanner's blur and noise, as a real nodule is; its copies are
edited as the stage's sources are (``ctguard.engine.train_verifier.source_rows`` with RUN's network
and settings, ``verifier_phantom_lesions: all``). Measured on those rows, grouped by phantom:
- the AUC of the injected copies' edit centres against the genuine nodules, scored by RUN's own
  stage (trained on other sources), and by trees of the stage's kind fitted on these phantoms' rows
  out of phantom (five grouped folds);
- the same for a two-class fit on those two kinds of rows alone.
High AUCs out of phantom would say the columns carry what separates the two and real patients'
lesions are too few; low ones, that the columns do not.

``--apply``: the two-class fit on the texture columns alone (no network column, so that it reads
any fold's rows), trained on all these phantoms' rows, scores each given fold's held-out patients'
stage rows (``patch_stage.py collect``): AUC of their injected centres against their real lesions,
and the real lesions' scores. ``--second-look``: each fold's stage as the recipe fits it on its
training rows, its P(injected) multiplied by that two-class fit's P(injected) (phantoms only, so out
of patient for every real row); the score ``max(P(removed), P(injected) x q)``; its threshold chosen
by the stage's rule on the training rows' out-of-patient scores; the held-out rows measured as
``stage_features.py`` measures them, beside the stage alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "experiments"))

from stage_features import fold_config, held_out_measures, lesions_and_injected_centres, load_fold  # noqa: E402

from ctguard.engine import train_verifier as tv  # noqa: E402
from ctguard.verifier import Verifier, finite_rows  # noqa: E402

SEED_BASE = 880_000  # phantoms no run's network or stage saw


def second_look(folder: Path, fold: dict, nodule, texture: np.ndarray) -> dict:
    """The fold's stage alone and with the phantom-trained genuine-or-injected fit ``nodule`` as a
    second look at its injected probability, on the fold's held-out rows (``fold``: its rows, from
    ``folder``)."""
    _, cfg = fold_config(folder)
    tr, te = fold["train"], fold["test"]
    _, cols = tv.tree_columns(cfg)
    xtr, xte = finite_rows(tr["x"][:, cols]), finite_rows(te["x"][:, cols])
    oof = np.zeros((len(tr["y"]), 3))
    for a, b in tv.patient_splits(tr["group"], 5):
        oof[b] = tv.boosting_classifier(cfg).fit(xtr[a], tr["y"][a]).predict_proba(xtr[b])
    p_te = tv.boosting_classifier(cfg).fit(xtr, tr["y"]).predict_proba(xte)
    q_tr = nodule.predict_proba(finite_rows(tr["x"][:, texture]))[:, 1]
    q_te = nodule.predict_proba(finite_rows(te["x"][:, texture]))[:, 1]
    res = {"rows": str(folder)}
    for name, s_tr, s_te in (("stage", 1.0 - oof[:, 0], 1.0 - p_te[:, 0]),
                             ("second_look", np.maximum(oof[:, 2], oof[:, 1] * q_tr), np.maximum(p_te[:, 2], p_te[:, 1] * q_te))):
        res[name] = held_out_measures(s_te, tv.choose_threshold(s_tr, tr["clean"], tr["sources"], float(cfg["verifier_max_false"])), te)
    return res


def main() -> None:
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run with model.pt, its config.json and model.verifier.npz")
    ap.add_argument("--phantoms", type=int, default=40)
    ap.add_argument("--apply", nargs="*", default=[], help="folders of held-out stage rows (patch_stage.py collect) to score")
    ap.add_argument("--second-look", action="store_true", help="with --apply: the stage with the two-class fit as a second look")
    ap.add_argument("--out")
    a = ap.parse_args()
    run = Path(a.run)
    cfg = {**tv.VERIFIER_DEFAULTS, **json.loads((run / "config.json").read_text()), "verifier_phantom_lesions": "all"}
    specs = [("phantom", SEED_BASE + k, True) for k in range(a.phantoms)]
    t0 = time.time()
    with get_context("fork").Pool(2) as pool:
        parts = list(pool.imap(tv.source_rows, [(cfg, s, str(run / "model.pt")) for s in specs]))
    parts = [p for p in parts if len(p["y"])]
    print(f"{len(parts)} phantoms' rows in {time.time() - t0:.0f} s", flush=True)
    side = {"x": np.concatenate([p["x"] for p in parts]), "y": np.concatenate([p["y"] for p in parts]).astype(int),
            "clean": np.concatenate([p["clean"] for p in parts]), "scan": np.concatenate([p["scan"] for p in parts]),
            "source": np.concatenate([[k] * len(p["y"]) for k, p in enumerate(parts)])}
    lesion, centre = lesions_and_injected_centres(side)
    both = lesion | centre
    truth = centre[both]
    _, cols = tv.tree_columns(cfg)
    x = finite_rows(side["x"][:, cols])
    stage = 1.0 - Verifier.load(run / "model.verifier.npz").probabilities(side["x"])[:, 0]
    oof = tv.out_of_patient_scores({**cfg, "verifier_blend": 0.0}, side["x"], x, side["y"], side["source"], folds=5)
    two = np.zeros(len(truth))
    for tr, te in tv.patient_splits(side["source"][both], 5):
        clf = tv.boosting_classifier(cfg).fit(x[both][tr], truth[tr].astype(int))
        two[te] = clf.predict_proba(x[both][te])[:, 1]
    out = {"run": str(run), "phantoms": len(parts), "genuine_nodules": int(lesion.sum()), "injected_centres": int(centre.sum()),
           "auc_run_stage": round(float(roc_auc_score(truth, stage[both])), 4),
           "auc_stage_fitted_on_phantoms_out_of_phantom": round(float(roc_auc_score(truth, oof[both])), 4),
           "auc_two_class_out_of_phantom": round(float(roc_auc_score(truth, two)), 4),
           "genuine_scores_run_stage": np.round(np.quantile(stage[lesion], [0.25, 0.5, 0.75]), 3).tolist(),
           "injected_scores_run_stage": np.round(np.quantile(stage[centre], [0.25, 0.5, 0.75]), 3).tolist(),
           "seconds": round(time.time() - t0, 1)}
    if a.apply:
        texture = tv.nodule_columns(cfg)  # the trees' columns less the network's probabilities
        clf = tv.boosting_classifier(cfg).fit(finite_rows(side["x"][both][:, texture]), truth.astype(int))
        out["applied"], looks = [], []
        for folder in a.apply:
            fold = load_fold(Path(folder))  # read once for both measures (its patches are about 0.6 GB)
            held = fold["test"]
            les, cen = lesions_and_injected_centres(held)
            s = clf.predict_proba(finite_rows(held["x"][:, texture]))[:, 1]
            m = les | cen
            out["applied"].append({"rows": folder, "lesions": int(les.sum()), "injected_centres": int(cen.sum()),
                                   "auc_injected_vs_real_lesions": round(float(roc_auc_score(cen[m], s[m])), 4) if les.any() else None,
                                   "real_lesion_scores": sorted(round(float(v), 3) for v in s[les])})
            if a.second_look:
                looks.append(second_look(Path(folder), fold, clf, texture))
            del fold, held
        if a.second_look:
            out["second_look"] = looks
    print(json.dumps(out), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
