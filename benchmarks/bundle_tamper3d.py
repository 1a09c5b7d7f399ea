"""Bundles a trained detector (3D, or 2D with --name tamper2d) into the package with its model card.

Usage: python benchmarks/bundle_tamper3d.py RUN_DIR [EVAL_JSON ...] [--threshold T] [--version V] [--name tamper3d|tamper2d]
                                            [--patients TEXT] [--held-out TEXT] [--cv CV_JSON] [--threshold-rule TEXT]
                                            [--provenance TEXT]
       python benchmarks/bundle_tamper3d.py --metrics-only EVAL_JSON ... [--name tamper3d|tamper2d]
Writes src/ctguard/weights/NAME.pt (weights, config, card), NAME.json (the card), NAME.onnx (the
network for onnxruntime: the run's model.onnx where it has one, else exported from the checkpoint)
and, for a run with a second stage, NAME.verifier.npz (its trees; the
card's threshold is then the stage's own unless --threshold is given) and, where the stage has a
patch CNN (verifier_patches), NAME.patches.onnx. The card lists every training patient of the run's config (with its
collection, licence and vendor), and with --cv the cross-validation table of its recipe
(benchmarks/cross_validate.py). Paths in the card and the checkpoint are written relative to the
project root: nothing of the machine that trained it. With --metrics-only, the bundled card's
measurements are replaced by the given evaluations; the network is unchanged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctguard import __version__

ARCH = {"tamper3d": "TamperNet3D: 5 Conv3d blocks (3 stride-2, 1 dilated), 3-class head at 8 mm stride, 1 mm isotropic input",
        "tamper2d": "TamperNet2D: 7 Conv2d blocks (3 stride-2, 1 dilated), 3-class head at 8 mm stride, one axial slice at 1 mm"}


HELD_OUT = "none: trained on every patient; see cross_validation for held-out results of the same recipe"
ROOT = Path(__file__).resolve().parents[1]


def portable(value):
    """A config with every absolute path made relative to the project root (``../shared/...`` for
    the shared data beside it), so that no path of the training machine is shipped."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        for base, prefix in ((ROOT, ""), (ROOT.parent, "../")):
            if path.is_relative_to(base):
                return prefix + str(path.relative_to(base))
        return path.name
    return value


def training_patients(cfg: dict) -> list[dict]:
    """Each real training patient once, with its collection, licence and vendor and how many of its
    scans were used."""
    out: dict[str, dict] = {}
    for e in cfg.get("real_scans") or []:
        name = e.get("patient") or Path(e["scan"]).name
        row = out.setdefault(name, {"patient": name, **{k: e.get(k) for k in ("collection", "licence", "vendor")}, "scans": 0})
        row["scans"] += 1
    for path in cfg.get("real_series") or []:
        out.setdefault(Path(path).name, {"patient": Path(path).name, "scans": 1})
    return list(out.values())


def main(run_dir: str, evals: list[str], threshold: float, version: str, name: str = "tamper3d", patients: str | None = None,
         held_out: str = HELD_OUT, cv: str | None = None, threshold_rule: str | None = None, provenance: str | None = None) -> None:
    run = Path(run_dir)
    ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    if (run / "config.json").is_file():  # a stage fitted again on the network (refit_stage.py): the card shows the stage's settings as fitted
        fitted = json.loads((run / "config.json").read_text())
        ckpt["config"] = {**ckpt["config"], **{k: v for k, v in fitted.items() if k.startswith("verifier")}}
    ckpt["config"] = portable(ckpt["config"])
    summary = json.loads((run / "summary.json").read_text())
    card = {
        "name": name,
        "version": version,
        "package_version": __version__,
        "threshold": threshold,
        "architecture": (f"the mean of {len(ckpt['config']['members'])} networks' class probabilities, each a " + ARCH[name]
                         if ckpt["config"].get("members") else ARCH[name]),
        "threshold_rule": threshold_rule,
        "training_data": {
            "config": ckpt["config"],
            "examples": summary.get("cubes", summary.get("slices")),
            "patients": training_patients(ckpt["config"]) or patients,
            "description": patients,
        },
        "held_out": held_out,
        "cross_validation": _cv(cv),
        "metrics": card_metrics(evals),
        "train_seconds": summary["train_seconds"],
        "data_seconds": summary["data_seconds"],
        **{k: summary[k] for k in ("machine", "cubes_sha256") if k in summary},  # what it was trained on, where the run recorded it
        **({"provenance": provenance} if provenance else {}),
    }
    dst = Path(__file__).resolve().parents[1] / "src/ctguard/weights"
    dst.mkdir(parents=True, exist_ok=True)
    stage = run / "model.verifier.npz"
    if stage.is_file():  # the second stage goes beside the network; the card says how it was fitted
        from ctguard.verifier import Verifier

        v = Verifier.load(stage)
        where = "on the single axial slice, without the network's probabilities" if v.meta.get("slice") else "at the scan's own voxels"
        card["second_stage"] = {"what": f"gradient-boosted trees over the texture around each candidate {where} "
                                        "(ctguard.verifier), re-scoring the network's findings from "
                                        f"{v.meta['candidate_threshold']} (at most {v.meta['max_candidates']} a scan)"
                                        + (f" and the resampling trace's {v.meta['trace_peaks']} strongest peaks over the lungs not among them"
                                           if v.meta.get("trace_peaks") else "")
                                        + (f" and the smooth map's {v.meta['smooth_peaks']} strongest peaks (places smoother than the lung "
                                           "around them) not among those" if v.meta.get("smooth_peaks") else "")
                                        + (f" and the blob map's {v.meta['blob_peaks']} strongest peaks (small round blobs: nodules, "
                                           "drawn or real) not among any of those" if v.meta.get("blob_peaks") else "")
                                        + ("; each read with its shape (the Hessian's eigenvalues at 1.5 and 3 mm)" if v.meta.get("shape") else "")
                                        + (f"; each first scored by a triage (trees on the candidate's own place and the network's "
                                           f"probabilities) and read whole only from its cut-off of {v.meta['triage']}"
                                           if v.meta.get("triage") is not None else ""),
                                **({"slice": True, "patients": v.meta["patients"], "copies": v.meta["copies"]} if v.meta.get("slice") else {}),
                                "recentre": bool(v.meta.get("recentre", False)), "resampling": bool(v.meta.get("resampling", False)),
                                "trace_recentre": bool(v.meta.get("trace_recentre", False)), "trace_scan": bool(v.meta.get("trace_scan", False)),
                                "trace_order": v.meta.get("trace_order"),  # candidates capped in the order of network log-odds + w x trace
                                "refine_from": v.meta.get("refine_from"),  # a second look at each candidate's re-centred places
                                "trace_peaks": int(v.meta.get("trace_peaks", 0)),  # the trace map's strongest peaks, candidates too
                                "smooth_peaks": int(v.meta.get("smooth_peaks", 0)),  # the smooth map's strongest peaks, candidates too
                                "blob_peaks": int(v.meta.get("blob_peaks", 0)),  # the blob map's strongest peaks, candidates too
                                "shape": bool(v.meta.get("shape", False)),  # each place's Hessian eigenvalues among its columns
                                "scan_columns": bool(v.meta.get("scan_columns", True)),
                                "boosting": v.meta.get("boosting", "classic"),
                                "trees": int(len(v.feature)), "features": len(v.meta["names"]), "rows": v.meta["rows"],
                                "sources": v.meta["sources"], "threshold_rule": v.meta["threshold_rule"],
                                "seconds": summary.get("slice_stage" if v.meta.get("slice") else "verifier", {}).get("seconds"),
                                "patch_weight": float(v.meta.get("patch_weight", 0.0)),  # over 0: NAME.patches.onnx, a CNN averaged in
                                "nodule_check": bool(v.meta.get("nodule_check", False)),  # two-class trees in the same .npz
                                # trees on each candidate's own columns first; its whole row (re-centred places too) read only from this
                                "triage": v.meta.get("triage"),
                                # the maps' peaks held to a threshold of their own (screen.source_thresholds), where the stage chose one
                                **{k: v.meta[k] for k in ("peak_threshold", "blob_threshold") if k in v.meta},
                                # trees without the trace's columns, and their thresholds, for scans whose pixels leave it nothing to read
                                **({"trace_blind": {**v.blind.thresholds(),
                                                    **{k: summary["verifier"]["blind"][k] for k in ("columns", "highest_clean_candidates_oof")
                                                       if k in summary.get("verifier", {}).get("blind", {})}}}
                                   if v.blind is not None else {}),
                                **({"triage_fit": summary["verifier"]["triage_fit"]} if "triage_fit" in summary.get("verifier", {}) else {}),
                                **({"threshold_fit": summary["slice_stage"]["threshold_fit"]}
                                   if "threshold_fit" in summary.get("slice_stage", {}) else {})}
        if threshold is None:
            card["threshold"] = v.meta["threshold"]
            card["threshold_rule"] = threshold_rule or v.meta["threshold_rule"]
        for k in ("peak_threshold", "blob_threshold"):  # what screening holds the maps' peaks to, whatever the network's threshold
            if k in v.meta:
                card[k] = v.meta[k]
        (dst / f"{name}.verifier.npz").write_bytes(stage.read_bytes())
    elif (dst / f"{name}.verifier.npz").is_file():
        (dst / f"{name}.verifier.npz").unlink()  # a network without a second stage replaces one with
    cnn = run / "model.patches.onnx"
    if stage.is_file() and card["second_stage"]["patch_weight"]:
        (dst / f"{name}.patches.onnx").write_bytes(cnn.read_bytes())
    elif (dst / f"{name}.patches.onnx").is_file():
        (dst / f"{name}.patches.onnx").unlink()  # a stage without the patch CNN replaces one with
    if card["threshold"] is None:
        raise SystemExit("give --threshold: the run has no second stage whose threshold the card could take")
    card = portable(card)  # the evaluations name their model files too
    ckpt["card"] = card
    torch.save(ckpt, dst / f"{name}.pt")
    (dst / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    # The same network for onnxruntime, which screening prefers and needs where PyTorch is not installed:
    # the run's own export where it has one (the very graph its evaluations ran), else exported here.
    if (run / "model.onnx").is_file():
        (dst / f"{name}.onnx").write_bytes((run / "model.onnx").read_bytes())
    else:
        from ctguard.screen import export_onnx, load_detector, load_detector2d

        load = load_detector2d if name == "tamper2d" else load_detector
        export_onnx(load(str(dst / f"{name}.pt")).torch_net(), dst / f"{name}.onnx")
    print(f"bundled {run / 'model.pt'} -> {dst / f'{name}.pt'}")


def _cv(path: str | None) -> dict | None:
    """The cross-validation's per-fold and pooled rows (benchmarks/cross_validate.py's cv.json, or
    the slice stage's report of benchmarks/experiments/slice_stage.py)."""
    if not path:
        return None
    cv = json.loads(Path(path).read_text())
    if cv["folds"] and "row" not in cv["folds"][0]:  # the 2D detector's slice stage (benchmarks/experiments/slice_stage.py)
        return {"command": "python benchmarks/experiments/slice_stage.py", "settings": cv.get("settings"), "folds": cv["folds"],
                "pooled": cv["pooled"]}
    return {"command": "python benchmarks/cross_validate.py", **({"how": cv["how"]} if cv.get("how") else {}),  # a report put together by hand says how
            "folds": [{k: f[k] for k in ("fold", "held_out", "unseen", "train_seconds", "row")} for f in cv["folds"]], "pooled": cv["pooled"]["row"]}


def card_metrics(evals: list[str]) -> list[dict]:
    """The evaluations as the card keeps them: without the per-edit, per-place and per-scan lists."""
    lists = ("edits", "untouched_above_half", "clean_scans_findings")
    return [{k: v for k, v in json.loads(Path(e).read_text()).items() if k not in lists} for e in evals]


def update_metrics(evals: list[str], name: str = "tamper3d") -> None:
    """Replaces the bundled detector's card measurements (in NAME.json and in NAME.pt)."""
    dst = Path(__file__).resolve().parents[1] / "src/ctguard/weights"
    ckpt = torch.load(dst / f"{name}.pt", map_location="cpu", weights_only=True)
    card = json.loads((dst / f"{name}.json").read_text())
    card["metrics"] = ckpt["card"]["metrics"] = card_metrics(evals)
    if ckpt["card"] != card:
        raise SystemExit(f"{name}.json and the card inside {name}.pt differ beyond the metrics: not updating")
    torch.save(ckpt, dst / f"{name}.pt")
    (dst / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"updated the measurements of {dst / name}.json and .pt ({len(evals)} evaluations)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", help="the run to bundle (with --metrics-only: the first evaluation)")
    ap.add_argument("evals", nargs="*")
    ap.add_argument("--metrics-only", action="store_true", help="only replace the bundled card's measurements")
    ap.add_argument("--threshold", type=float, default=None, help="the operating threshold (default: the run's second stage's)")
    ap.add_argument("--version", default="0.1")
    ap.add_argument("--name", default="tamper3d", choices=sorted(ARCH))
    ap.add_argument("--patients", default=None, help="what the training data were, for the card")
    ap.add_argument("--held-out", default=HELD_OUT, help="what the evaluations held out, for the card")
    ap.add_argument("--cv", default=None, help="the recipe's cross-validation (cv.json of benchmarks/cross_validate.py), for the card")
    ap.add_argument("--threshold-rule", default=None, help="how the threshold was chosen, for the card")
    ap.add_argument("--provenance", default=None, help="how the run was made (commands, times), for the card")
    a = ap.parse_args()
    if a.metrics_only:
        update_metrics([a.run_dir, *a.evals], a.name)
        raise SystemExit(0)
    main(a.run_dir, a.evals, a.threshold, a.version, a.name, a.patients, a.held_out, a.cv, a.threshold_rule, a.provenance)
