"""Bundles a trained detector (3D, or 2D with --name tamper2d) into the package with its model card.

Usage: python benchmarks/bundle_tamper3d.py RUN_DIR [EVAL_JSON ...] [--threshold T] [--version V] [--name tamper3d|tamper2d] [--patients TEXT] [--held-out TEXT]
       python benchmarks/bundle_tamper3d.py --metrics-only EVAL_JSON ... [--name tamper3d|tamper2d]
Writes src/ctguard/weights/NAME.pt (weights, config, card), NAME.json (the card) and NAME.onnx (the
network for onnxruntime). With --metrics-only, the bundled card's measurements are replaced by the
given evaluations (re-measured after a change to how they are measured); the network is unchanged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctguard import __version__


ARCH = {"tamper3d": "TamperNet3D: 5 Conv3d blocks (3 stride-2, 1 dilated), 3-class head at 8 mm stride, 1 mm isotropic input",
        "tamper2d": "TamperNet2D: 7 Conv2d blocks (3 stride-2, 1 dilated), 3-class head at 8 mm stride, one axial slice at 1 mm"}


HELD_OUT = "Lung-PET-CT-Dx A0002 (both series, another scanner) + unseen phantoms (seeds 5000+)"


def main(run_dir: str, evals: list[str], threshold: float, version: str, name: str = "tamper3d", patients: str | None = None,
         held_out: str = HELD_OUT) -> None:
    run = Path(run_dir)
    ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    summary = json.loads((run / "summary.json").read_text())
    card = {
        "name": name,
        "version": version,
        "package_version": __version__,
        "threshold": threshold,
        "architecture": (f"the mean of {len(ckpt['config']['members'])} networks' class probabilities, each a " + ARCH[name]
                         if ckpt["config"].get("members") else ARCH[name]),
        "training_data": {
            "config": ckpt["config"],
            "examples": summary.get("cubes", summary.get("slices")),
            "patients": patients or "Lung-PET-CT-Dx A0001 (both series) + phantoms seeds 0-9 (simulated CT-GAN-style edits)"
                        + (f"; hard negatives mined from {ckpt['config'].get('hard_rounds')} rounds of "
                           f"{ckpt['config'].get('hard_phantoms')} clean phantoms (seeds 500+) and A0001's own series"
                           if ckpt["config"].get("hard_rounds") else ""),
        },
        "held_out": held_out,
        "metrics": card_metrics(evals),
        "train_seconds": summary["train_seconds"],
        "data_seconds": summary["data_seconds"],
    }
    ckpt["card"] = card
    dst = Path(__file__).resolve().parents[1] / "src/ctguard/weights"
    dst.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst / f"{name}.pt")
    (dst / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    # The same network for onnxruntime, which screening prefers and needs where PyTorch is not installed.
    from ctguard.screen import export_onnx, load_detector, load_detector2d

    load = load_detector2d if name == "tamper2d" else load_detector
    export_onnx(load(str(dst / f"{name}.pt")).torch_net(), dst / f"{name}.onnx")
    print(f"bundled {run / 'model.pt'} -> {dst / f'{name}.pt'}")


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
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--version", default="0.1")
    ap.add_argument("--name", default="tamper3d", choices=sorted(ARCH))
    ap.add_argument("--patients", default=None, help="what the training data were, for the card")
    ap.add_argument("--held-out", default=HELD_OUT, help="what the evaluations held out, for the card")
    a = ap.parse_args()
    if a.metrics_only:
        update_metrics([a.run_dir, *a.evals], a.name)
        raise SystemExit(0)
    main(a.run_dir, a.evals, a.threshold, a.version, a.name, a.patients, a.held_out)
