"""A learned second stage on native-resolution patches, measured against the trees on held-out patients.

Usage:
    python benchmarks/experiments/patch_stage.py collect FOLD RUN OUT   # patches of the stage's places
    python benchmarks/experiments/patch_stage.py fit OUT [--epochs 12]  # a small CNN on them; the measures

``collect`` makes the second stage's places of a fold's run (RUN, a ``benchmarks/cross_validate.py``
fold with its network and stage) exactly as ``ctguard.engine.train_verifier`` makes them (the same
edits, untouched places and network candidates, the same labels), on its training sources and, with
the fold's network, on its held-out patients' scans too (seeds of the stage, never the network's).
At every place it keeps the place's patch (:func:`ctguard.patches.patches_at`: 5 slices of 48 x 48
pixels at the scan's own voxels, as HU and as the high-pass residuals divided by the scan's own
noise) and the tree stage's row: the rows ``verifier_patches`` makes, kept in RUN's
``verifier_rows/`` (a refit of RUN with ``verifier_patches`` reuses its training sources' rows).

``fit`` trains the patch stage's CNN (:func:`ctguard.engine.train_patches.fit_patch_net`) on the
training sources' patches and scores the held-out rows with it, with the fold's trees, and with the
mean of the two (``verifier_patches`` with its default weight 0.5). Measures on the held-out rows
(edits' centres and the candidates near them against untouched places and the clean copies'
candidates): the AUC, and the share of edits' rows over the highest score of a held-out clean
scan's candidate (what a threshold with no false finding on those scans would find).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from ctguard.engine import train_verifier as tv  # noqa: E402
from ctguard.patches import SIZE  # noqa: E402

def _source(job: tuple) -> dict:
    """One source's rows with their patches (the stage's own row code with ``verifier_patches``, kept
    in the run's ``verifier_rows/`` as ``ctguard train`` keeps them) and whether it is held out."""
    cfg, spec, model, held = job
    return tv.source_rows(({**cfg, "verifier_patches": True}, spec, model)) | {"held": held}


def collect(a) -> None:
    import cross_validate as cv

    from ctguard import api

    run, out = Path(a.run), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**tv.VERIFIER_DEFAULTS, **json.loads((run / "config.json").read_text())}
    _, held = cv.split_fold(cv.patient_scans(api.load_config(a.config)), a.fold)
    held_specs = [("series", e["scan"], 1, e.get("tumours"), 0) for entries in held.values() for e in entries]
    model = str(run / "model.pt")
    jobs = [(cfg, s, model, False) for s in tv.verifier_specs(cfg)] + [(cfg, s, model, True) for s in held_specs]
    t0 = time.time()
    with get_context("fork").Pool(2) as pool:
        for k, r in enumerate(pool.imap(_source, jobs)):
            if len(r["y"]):
                np.savez(out / f"{k:03d}.npz", **{n: r[n] for n in ("x", "y", "scan", "clean", "patches", "group", "held")})
            print(f"{k + 1}/{len(jobs)} {r['group']} {len(r['y'])} rows, {time.time() - t0:.0f} s", flush=True)
    (out / "fold.json").write_text(json.dumps({"fold": a.fold, "run": str(run)}) + "\n")


def fit(a) -> None:
    from sklearn.metrics import roc_auc_score

    from ctguard.engine.train_patches import fit_patch_net, patch_probabilities
    from ctguard.verifier import Verifier

    out = Path(a.out)
    info = json.loads((out / "fold.json").read_text())
    parts = [dict(np.load(p, allow_pickle=False)) for p in sorted(out.glob("[0-9]*.npz"))]

    def joined(ps):  # (the first version kept patches as (n, 3, 5, 48, 48): read alike)
        return (np.concatenate([p["patches"].reshape(len(p["y"]), -1, SIZE, SIZE) for p in ps]), np.concatenate([p["x"] for p in ps]),
                np.concatenate([p["y"] for p in ps]).astype(int), np.concatenate([p["clean"] for p in ps]),
                np.concatenate([[f"{k}"] * len(p["y"]) for k, p in enumerate(ps)]))

    ptr, _, ytr, _, _ = joined([p for p in parts if not bool(p["held"])])
    pte, xte, yte, cte, ste = joined([p for p in parts if bool(p["held"])])
    print(f"train {len(ytr)} rows ({np.bincount(ytr)}), held out {len(yte)} ({np.bincount(yte)})", flush=True)
    t0 = time.time()
    net = fit_patch_net(ptr, ytr, a.epochs, seed=0)
    print(f"trained in {time.time() - t0:.0f} s", flush=True)
    p_cnn = patch_probabilities(net, pte)
    np.save(out / f"p_cnn_{a.tag}.npy", p_cnn)
    p_tree = Verifier.load(Path(info["run"]) / "model.verifier.npz").probabilities(xte)
    results = {}
    for name, p in [("trees", p_tree), ("cnn", p_cnn), ("mean", (p_tree + p_cnn) / 2)]:
        score = 1.0 - p[:, 0]
        pos, neg = yte > 0, yte == 0
        top_clean = float(score[cte].max(initial=0.0))

        def auc(m):
            return round(float(roc_auc_score(m[m | neg], score[m | neg])), 4)

        results[name] = {"auc_edits_vs_untouched": auc(pos), "auc_injected": auc(yte == 1), "auc_removed": auc(yte == 2),
                         "over_highest_clean_candidate": round(float((score[pos] > top_clean).mean()), 3),
                         "highest_clean_candidate": round(top_clean, 4),
                         "highest_clean_candidate_per_scan": [round(float(score[cte & (ste == g)].max(initial=0.0)), 4) for g in np.unique(ste)]}
        print(name, json.dumps(results[name]), flush=True)
    (out / f"fit_{a.tag}.json").write_text(json.dumps({"epochs": a.epochs, "rows": [len(ytr), len(yte)], **results}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("collect")
    c.add_argument("fold", type=int)
    c.add_argument("run")
    c.add_argument("out")
    c.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    f = sub.add_parser("fit")
    f.add_argument("out")
    f.add_argument("--epochs", type=int, default=12)
    f.add_argument("--tag", default="cnn")
    a = ap.parse_args()
    collect(a) if a.what == "collect" else fit(a)


if __name__ == "__main__":
    main()
