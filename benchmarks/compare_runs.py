"""Two cross-validation runs of the 3D recipe compared on the same held-out places.

Usage:
    python benchmarks/compare_runs.py A B [--boot 2000] [--json FILE]

A and B are reports of ``benchmarks/cross_validate.py`` (``cv.json``, or a fold's ``eval.json``).
Each fold evaluated in both is tested on the same copies (the evaluation's seeds depend on the fold
and the scan only), so every place is scored by both detectors: the comparison is paired. For each
such fold and for the folds pooled it prints the location AUC of A and of B (injected and removed,
each against the same untouched places), B - A with a 95% bootstrap interval (places resampled
within each class, both detectors on the same draw), the edits each finds at its own threshold
(found by both, by A only, by B only), and the clean held-out scans each flags and the real
lesions each calls injected.

The interval is the spread from which places happened to be drawn, not from training: two trainings
of the same recipe on this CPU differ by up to 0.05 AUC on a fold (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from cross_validate import UNTOUCHED  # this script's folder is on the path when it runs


def folds_of(path: str) -> dict[int, dict]:
    """``{fold: evaluation}`` of a cv.json (folds that kept their places) or of one eval.json."""
    try:
        report = json.loads(Path(path).read_text())
        if "folds" in report:
            return {f["fold"]: f["eval"] for f in report["folds"] if "eval" in f}
        return {report["fold"]: report["eval"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a report of benchmarks/cross_validate.py ({e.__class__.__name__}: {e})") from None


def _key(p: dict) -> tuple:
    return (p["patient"], p["what"], p["family"], round(p["mean_hu"], 2), round(p["smoothness"], 3))


def paired_places(a: dict, b: dict, fold: int) -> tuple[list[dict], list[dict]]:
    """The two evaluations' places in one order; a ``SystemExit`` when they are not the same places."""
    ka, kb = [_key(p) for p in a["places"]], [_key(p) for p in b["places"]]
    if sorted(ka) != sorted(kb):
        raise SystemExit(f"fold {fold}: the two runs were not tested on the same places (another config or evaluation seeds?)")
    order_b: dict[tuple, list[int]] = {}
    for i, k in enumerate(kb):
        order_b.setdefault(k, []).append(i)
    return a["places"], [b["places"][order_b[k].pop(0)] for k in ka]  # places alike by key are paired in their order


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The area under the ROC curve as the Mann-Whitney statistic (ties count half), as
    ``sklearn.metrics.roc_auc_score`` gives it, without its checks: the bootstrap calls it thousands of times."""
    ranks = rankdata(scores)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compare_auc(pa: list[dict], pb: list[dict], kind: str, rng: np.random.Generator, boot: int) -> dict | None:
    """AUC of ``kind`` against the untouched places for A and B, and B - A with its bootstrap interval."""
    use = [i for i, p in enumerate(pa) if p["what"] in (kind, *UNTOUCHED)]
    labels = np.array([pa[i]["what"] == kind for i in use], int)
    if labels.sum() == 0 or labels.sum() == len(labels):
        return None
    sa = np.array([pa[i]["p_tampered"] for i in use])
    sb = np.array([pb[i]["p_tampered"] for i in use])
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    diffs = []
    for _ in range(boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        diffs.append(auc(sb[idx], labels[idx]) - auc(sa[idx], labels[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    a_auc, b_auc = auc(sa, labels), auc(sb, labels)
    return {"n": int(labels.sum()), "a": round(a_auc, 4), "b": round(b_auc, 4), "b_minus_a": round(b_auc - a_auc, 4),
            "interval_95": [round(float(lo), 4), round(float(hi), 4)]}


def compare_edits(a: dict, b: dict) -> dict:
    """Edits found by both, by A only and by B only (the edits are listed in the same order in both)."""
    ea, eb = a["edits"], b["edits"]
    if [(e["kind"], e["family"]) for e in ea] != [(e["kind"], e["family"]) for e in eb]:
        raise SystemExit("the two runs' edits differ")
    fa, fb = np.array([e["found"] for e in ea]), np.array([e["found"] for e in eb])
    return {"edits": len(ea), "a": int(fa.sum()), "b": int(fb.sum()), "both": int((fa & fb).sum()),
            "a_only": int((fa & ~fb).sum()), "b_only": int((fb & ~fa).sum())}


def operating_point(ev: dict) -> dict:
    """Clean held-out scans flagged and real lesions called injected, at the run's own thresholds."""
    return {"clean_flagged": sum(bool(c["false_findings"]) for c in ev.get("clean_scans", [])), "clean_scans": len(ev.get("clean_scans", [])),
            "lesions_called_injected": sum(r["called_injected"] for r in ev.get("real_lesions", [])),
            "lesions": len(ev.get("real_lesions", []))}


def compare(a_path: str, b_path: str, boot: int = 2000, seed: int = 0) -> list[dict]:
    fa, fb = folds_of(a_path), folds_of(b_path)
    common = sorted(set(fa) & set(fb))
    if not common:
        raise SystemExit(f"no fold is evaluated with its places in both {a_path} and {b_path}")
    rng = np.random.default_rng(seed)
    keys = ("places", "edits", "clean_scans", "real_lesions")
    rows, pooled_a, pooled_b = [], {k: [] for k in keys}, {k: [] for k in keys}
    for k in common:
        pa, pb = paired_places(fa[k], fb[k], k)
        for pooled, ev, places in ((pooled_a, fa[k], pa), (pooled_b, fb[k], pb)):
            pooled["places"] += places
            for key in keys[1:]:
                pooled[key] += ev.get(key, [])
        rows.append(_row(k, pa, pb, fa[k], fb[k], rng, boot))
    if len(common) > 1:
        rows.append(_row("pooled", pooled_a["places"], pooled_b["places"], pooled_a, pooled_b, rng, boot))
    return rows


def _row(fold, pa: list[dict], pb: list[dict], ea: dict, eb: dict, rng: np.random.Generator, boot: int) -> dict:
    return {"fold": fold, **{kind: compare_auc(pa, pb, kind, rng, boot) for kind in ("injected", "removed")},
            "edits_found": compare_edits(ea, eb), "a": operating_point(ea), "b": operating_point(eb)}


def markdown(rows: list[dict]) -> str:
    lines = ["| fold | AUC inj A | B | B - A (95%) | AUC rem A | B | B - A (95%) | edits found A | B | A only | B only "
             "| clean flagged A | B | lesions called inj A | B |",
             "| --- " * 15 + "|"]
    for r in rows:
        cells = [str(r["fold"])]
        for kind in ("injected", "removed"):
            c = r[kind]
            cells += ["", "", ""] if c is None else [str(c["a"]), str(c["b"]),
                                                      f"{c['b_minus_a']:+.3f} ({c['interval_95'][0]:+.3f}, {c['interval_95'][1]:+.3f})"]
        e = r["edits_found"]
        cells += [f"{e['a']}/{e['edits']}", f"{e['b']}/{e['edits']}", str(e["a_only"]), str(e["b_only"])]
        cells += [f"{r[x]['clean_flagged']}/{r[x]['clean_scans']}" for x in "ab"]
        cells += [f"{r[x]['lesions_called_injected']}/{r[x]['lesions']}" for x in "ab"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="the reference run's cv.json or eval.json")
    ap.add_argument("b", help="the other run's")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap draws (default 2000)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    rows = compare(args.a, args.b, args.boot)
    if args.json:
        Path(args.json).write_text(json.dumps({"a": Path(args.a).name, "b": Path(args.b).name, "rows": rows}, indent=2) + "\n")
    print(markdown(rows), end="")


if __name__ == "__main__":
    main()
