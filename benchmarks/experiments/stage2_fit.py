"""Fits and measures second stages on the rows of stage2_data.py, fold by fold, like cross_validate.py.

Usage:
    python benchmarks/experiments/stage2_fit.py [--rows runs/stage2] [--models hgb,hgb+net,...]

Each fold's second stage is fitted on the "train" rows of its training patients and the phantoms
(its own network's probabilities as two more features where the model uses them), its threshold
chosen on out-of-patient scores of those same rows (grouped by patient) by cross_validate.py's rule,
and measured on the fold's held-out "eval" rows only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cross_validate import FOLDS, GRID, MAX_FALSE

LABEL = {"injected": 1, "removed": 2}
NO_THRESHOLD = False
FINE = tuple(np.round(np.concatenate([GRID, [0.996, 0.997, 0.998, 0.999]]), 3))


def load(rows_dir: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(rows_dir.glob("*.jsonl")) for line in p.open()]


CONTRAST = False


def matrix(rows: list[dict], net: str, with_net: bool, only: list[int] | None = None) -> np.ndarray:
    x = np.asarray([r["f"] for r in rows], np.float32)
    if CONTRAST:
        b = x[:, :42].reshape(len(x), 7, 6)
        x = np.hstack([x, b[:, :3].mean(1) - b[:, 5:].mean(1), b[:, 3:5].mean(1) - b[:, 5:].mean(1)])
    if only is not None:
        x = x[:, only]
    if with_net:
        p = np.asarray([r["p"][net] for r in rows], np.float32)
        x = np.hstack([x, np.log(p[:, 1:] + 1e-4), np.log(p[:, :1] + 1e-4)])
    return x


def make(model: str):
    model = model.removeprefix("avg")
    if model.startswith("hgb"):
        return HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20,
                                              l2_regularization=1.0, random_state=0)
    if model.startswith("gb"):
        d = int(model[2]) if model[2:3].isdigit() else 3
        return GradientBoostingClassifier(n_estimators=300, max_depth=d, learning_rate=0.05, subsample=0.8, min_samples_leaf=20, max_features=0.5, random_state=0)
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000))


def choose(scores: np.ndarray, clean_scan: np.ndarray, n_clean: int) -> float:
    """The lowest FINE threshold giving at most MAX_FALSE candidates per clean scan."""
    for t in FINE:
        if (scores[clean_scan] >= t).sum() / max(n_clean, 1) <= MAX_FALSE:
            return float(t)
    return FINE[-1]


def auc(pos, neg):
    return round(float(roc_auc_score([1] * len(pos) + [0] * len(neg), list(pos) + list(neg))), 4) if len(pos) and len(neg) else None


def fold_result(rows: list[dict], k: int, model: str) -> dict:
    net = f"fold{k}"
    held = set(FOLDS[k]["held_out"])
    with_net = "net" in model
    netonly = model == "net"
    train = [r for r in rows if r["split"] == "train" and r["patient"] not in held and net in r["p"]
             and (r["candidate"] is None or r["candidate"]["net"] == net)]
    test = [r for r in rows if r["split"] == "eval" and r["fold_out"] == k]
    y = np.asarray([LABEL.get(r["what"], 0) for r in train])
    groups = np.asarray([r["patient"] for r in train])

    def fit_predict(tr, te):
        if netonly:
            return np.asarray([1 - r["p"][net][0] for r in te]), np.asarray([r["p"][net][1] >= r["p"][net][2] for r in te])
        clf = make(model).fit(matrix(tr, net, with_net), np.asarray([LABEL.get(r["what"], 0) for r in tr]))
        pr = clf.predict_proba(matrix(te, net, with_net))
        return 1 - pr[:, 0], pr[:, 1] >= pr[:, 2]

    # Threshold on out-of-patient scores of the training rows' candidates on clean scans.
    oof = np.zeros(len(train))
    for tr_i, te_i in ([] if NO_THRESHOLD else GroupKFold(n_splits=min(5, len(set(groups)))).split(train, y, groups)):
        oof[te_i] = fit_predict([train[i] for i in tr_i], [train[i] for i in te_i])[0]
    clean_c = np.asarray([r["candidate"] is not None and r["label"] in ("TM", "TB") for r in train])
    n_clean = len({(r["source"], r["variant"]) for r in train if r["label"] in ("TM", "TB")})
    thr = choose(oof, clean_c, n_clean)
    s, inj = fit_predict(train, test)
    if model.startswith("avg"):
        s = (s + np.asarray([1 - r["p"][net][0] for r in test])) / 2
    places = [i for i, r in enumerate(test) if r["candidate"] is None]
    neg = [s[i] for i in places if test[i]["what"] in ("lung", "dense", "real lesion")]
    out = {"fold": k, "threshold": thr}
    for kind in ("injected", "removed"):
        out[f"auc_{kind}"] = auc([s[i] for i in places if test[i]["what"] == kind], neg)
        for fam in ("drawn", "moved", "fill", "clone"):
            a = auc([s[i] for i in places if test[i]["what"] == kind and test[i]["family"] == fam], neg)
            if a is not None:
                out[f"auc_{kind}_{fam}"] = a
    cands = [i for i, r in enumerate(test) if r["candidate"] is not None]
    clean_scans = {(test[i]["source"], test[i]["variant"]) for i in places if test[i]["label"] in ("TM", "TB")}
    false = sum(1 for i in cands if test[i]["label"] in ("TM", "TB") and s[i] >= thr)
    out["false_per_clean"] = round(false / max(len(clean_scans), 1), 3)
    out["clean_flagged"] = f"{len({(test[i]['source'], test[i]['variant']) for i in cands if test[i]['label'] in ('TM', 'TB') and s[i] >= thr})}/{len(clean_scans)}"
    # Edits found with their right kind: a candidate near the edit, over threshold, of its kind.
    edits = [i for i in places if test[i]["what"] in LABEL]
    found = 0
    for i in edits:
        e = test[i]
        hit = [j for j in cands if test[j]["source"] == e["source"] and test[j]["variant"] == e["variant"] and test[j]["what"] == e["what"]
               and s[j] >= thr and (inj[j] == (e["what"] == "injected"))
               and _nearest_edit(test, j, edits) == i]
        found += bool(hit)
    out["edits_found"] = f"{found}/{len(edits)}"
    lesions = [j for j in cands if test[j]["what"] == "real lesion" and test[j]["label"] in ("TM", "TB")]
    out["lesion_inj_calls"] = sum(1 for j in lesions if s[j] >= thr and inj[j])
    out["_counts"] = (found, len(edits), false, len(clean_scans))
    out["_pool"] = [(test[i]["what"], test[i]["family"], float(s[i])) for i in places]
    return out


def _nearest_edit(test, j, edits):
    c = test[j]
    same = [i for i in edits if test[i]["source"] == c["source"] and test[i]["variant"] == c["variant"] and test[i]["what"] == c["what"]]
    return min(same, key=lambda i: np.linalg.norm(np.subtract(test[i]["voxel"], c["voxel"])), default=None)


def pooled(pool: list) -> dict:
    """Pooled AUCs over all folds' held-out places (each scored by its own fold's stage)."""
    neg = [s for w, _, s in pool if w in ("lung", "dense", "real lesion")]
    out = {}
    for kind in ("injected", "removed"):
        out[kind] = auc([s for w, _, s in pool if w == kind], neg)
        for fam in ("drawn", "moved", "fill", "clone"):
            a = auc([s for w, f, s in pool if w == kind and f == fam], neg)
            if a is not None:
                out[f"{kind}_{fam}"] = a
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=str(ROOT / "runs/stage2"))
    ap.add_argument("--models", default="net,lr,hgb,hgb+net")
    ap.add_argument("--folds", default="0,1,2,3")
    ap.add_argument("--no-threshold", action="store_true")
    ap.add_argument("--contrast", action="store_true")
    args = ap.parse_args()
    global NO_THRESHOLD, CONTRAST
    NO_THRESHOLD, CONTRAST = args.no_threshold, args.contrast
    rows = load(Path(args.rows))
    print(f"{len(rows)} rows from {len({r['source'] for r in rows})} sources")
    for model in args.models.split(","):
        res = [fold_result(rows, int(k), model) for k in args.folds.split(",")
               if any(r["split"] == "eval" and r["fold_out"] == int(k) for r in rows)]
        tot = np.sum([r.pop("_counts") for r in res], axis=0)
        pool = [x for r in res for x in r.pop("_pool")]
        print(f"== {model}: edits found {tot[0]}/{tot[1]}, false/clean {tot[2]}/{tot[3]}; pooled AUC {json.dumps(pooled(pool))}")
        for r in res:
            print("  ", json.dumps(r))


if __name__ == "__main__":
    main()
