"""How the second stage's separation of edits grows with its number of training patients.

Usage:
    python benchmarks/experiments/stage_patients.py RUN [--ks 1,2,4,7] [--repeats 2] [--no-network] [--json FILE]
    python benchmarks/experiments/stage_patients.py RUN --ks 7 --no-in-patient --drop hu_mean,@smooth
    python benchmarks/experiments/stage_patients.py RUN --ks 0,7 --no-in-patient --phantoms 10

RUN is a trained run of every patient whose stage rows are kept (``verifier_rows/``, e.g. the
bundled detector's run). For each real patient held out in turn, the stage's trees (the recipe's
settings) are fitted on the stage's phantoms and on ``k`` of the other real patients, drawn at
random (``--repeats`` draws for each ``k`` from 1 to one under all the others; ``k = 0``: the
phantoms alone), and score the held-out patient's rows. The held-out
scores of all patients pooled, for each ``k``:

- the location AUC of the edits' centres (the rows at each edit, not the candidates near it)
  against the untouched copies' candidates (the network's and the maps' peaks'), for injections
  and removals;
- edits found: the share of the edits' centres that score at or over the lowest threshold of the
  stage's grid with at most 0.1 of the held-out untouched candidates over it per untouched scan,
  with their right kind. This threshold is chosen on the held-out scores themselves: it measures
  how far the rows can be told apart, not what a detector would find (that is
  ``benchmarks/cross_validate.py``'s).

And once more with the trees fitted on rows of every patient (five folds of rows drawn at random,
the held-out patients' other rows among the training rows): the same measures when the stage has
seen the patient. If edits found rises steeply with ``k`` and the in-patient rows reach far
higher, more patients are what the stage lacks; if not, its columns are.

The rows' network columns come from RUN's network, which trained on every patient; ``--no-network``
leaves them out of the trees' columns. ``--drop`` leaves out every column whose name holds one of
its comma-separated parts (``ctguard.engine.train_verifier.tree_columns`` names them): which kinds
of column the held-out patients' edits are told by, and which only tell the training patients apart.
``--phantoms N``: the trees learn from the first N of the stage's phantoms only (by seed; 0: none),
what the phantoms are worth beside the patients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from ctguard.engine import train_verifier as tv  # noqa: E402
from ctguard.verifier import finite_rows  # noqa: E402


def measures(p: np.ndarray, y: np.ndarray, centre: np.ndarray, clean: np.ndarray, n_clean_scans: int) -> dict:
    """AUCs and edits found (see the module's text) of rows with probabilities ``p`` (genuine,
    injected, removed), labels ``y``, the edit centres' rows ``centre`` and the untouched copies'
    candidates ``clean``."""
    from sklearn.metrics import roc_auc_score

    score = 1.0 - p[:, 0]
    t = tv.choose_threshold(score, clean, n_clean_scans, 0.1)
    right = np.where(p[:, 1] >= p[:, 2], 1, 2) == y
    out = {"threshold": t, "untouched_candidates": int(clean.sum()), "untouched_scans": n_clean_scans}
    for kind, label in (("injected", 1), ("removed", 2)):
        at = centre & (y == label)
        both = at | clean
        out[f"auc_{kind}"] = round(float(roc_auc_score(at[both], score[both])), 4)
        out[f"found_{kind}"] = f"{int((at & right & (score >= t)).sum())}/{int(at.sum())}"
    at = centre & (y > 0)
    out["found"] = round(float((at & right & (score >= t)).sum() / max(at.sum(), 1)), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--ks", default="1,2,4,7", help="numbers of other real patients the trees learn from")
    ap.add_argument("--repeats", type=int, default=2, help="random draws of those patients for each k under the most")
    ap.add_argument("--no-network", action="store_true", help="the trees do not read the network's probabilities")
    ap.add_argument("--drop", default="", help="leave out the columns whose names hold any of these comma-separated parts")
    ap.add_argument("--no-in-patient", action="store_true", help="skip the fits on rows of every patient")
    ap.add_argument("--phantoms", type=int, help="learn from only the first N of the stage's phantoms (by seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    cfg, specs, parts = tv.run_rows(Path(a.run))
    x, y, groups, clean = tv.stage_table(cfg, parts)
    candidate = np.concatenate([p["candidate"] for p in parts])
    names, columns = tv.tree_columns(cfg)
    if a.no_network:
        columns = np.asarray([k for k in columns if not names[k].startswith("log_p_")])
    drop = [d for d in a.drop.split(",") if d]
    columns = np.asarray([k for k in columns if not any(d in names[k] for d in drop)])
    fit_x = finite_rows(x[:, columns])
    centre = (y > 0) & ~candidate  # ``clean`` marks the untouched copies' candidates already
    is_phantom = np.char.startswith(groups.astype(str), "phantom ")
    every_phantom = sorted(set(groups[is_phantom].tolist()), key=lambda g: int(g.split()[1]))
    learnt = every_phantom if a.phantoms is None else every_phantom[: a.phantoms]
    phantom = np.isin(groups, learnt)  # the phantoms the trees learn from; the others' rows are never used
    real = sorted(set(groups[~is_phantom].tolist()))
    untouched_scans = sum(p["group"] in real for p in parts)  # one untouched copy a real series
    rng = np.random.default_rng(a.seed)
    ks = [int(k) for k in a.ks.split(",")]
    print(f"{len(y)} rows, {len(real)} real patients ({untouched_scans} untouched scans), "
          f"{len(learnt)} of its {len(every_phantom)} phantoms, {len(columns)} columns", flush=True)

    def fit(train: np.ndarray):
        return tv.boosting_classifier(cfg).fit(fit_x[train], y[train])

    def predict(trees, rows: np.ndarray) -> np.ndarray:
        q = np.zeros((len(rows), 3))
        q[:, trees.classes_.astype(int)] = trees.predict_proba(fit_x[rows])
        return q

    report: dict = {"run": Path(a.run).name, "network_columns": not a.no_network, "dropped": drop, "columns": len(columns), "phantoms": len(learnt),
                    "patients": real, "by_k": {}}
    held = np.isin(groups, real)
    for k in ks:
        draws = 1 if k == 0 or k >= len(real) - 1 else a.repeats
        results = []
        for r in range(draws):
            p = np.zeros((len(y), 3))
            for g in real:
                others = [o for o in real if o != g]
                chosen = set(rng.choice(others, size=min(k, len(others)), replace=False).tolist())
                trees = fit(np.flatnonzero(phantom | np.isin(groups, list(chosen))))
                rows = np.flatnonzero(groups == g)
                p[rows] = predict(trees, rows)
            results.append(measures(p[held], y[held], centre[held], clean[held], untouched_scans))
            print(f"k={k} draw {r}: {results[-1]}", flush=True)
        report["by_k"][str(k)] = results

    if not a.no_in_patient:
        from sklearn.model_selection import StratifiedKFold

        p = np.zeros((len(y), 3))
        used = np.flatnonzero(phantom | held)
        for train, test in StratifiedKFold(5, shuffle=True, random_state=a.seed).split(used, y[used]):
            p[used[test]] = predict(fit(used[train]), used[test])
        report["in_patient"] = measures(p[held], y[held], centre[held], clean[held], untouched_scans)
        print(f"in patient: {report['in_patient']}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
