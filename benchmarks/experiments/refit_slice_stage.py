"""Fits the 2D detector's single-slice stage on a trained 2D network, without training the network.

Usage:
    python benchmarks/experiments/refit_slice_stage.py SOURCE OUT [--config configs/tamper2d.yaml]

SOURCE is a ``ctguard train`` run of ``configs/tamper2d.yaml`` (its ``model.pt``, ``model.onnx``,
``summary.json``) or ``tamper2d``, the bundled network (its card's training time kept in the
summary). The network is copied into OUT and the stage fitted there exactly as ``ctguard train``
does after the network (``ctguard.engine.train_slice_stage``, the config's ``slice_stage*``
settings), so that ``benchmarks/bundle_tamper3d.py OUT --name tamper2d`` can bundle the two.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from importlib import resources
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

from ctguard import api  # noqa: E402
from ctguard.engine.train_slice_stage import SLICE_DEFAULTS, fit_slice_stage  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--config", default=str(ROOT / "configs/tamper2d.yaml"))
    a = ap.parse_args()
    out = Path(a.out)
    if (out / "model.verifier.npz").exists():
        sys.exit(f"{out} already has a second stage")
    out.mkdir(parents=True, exist_ok=True)
    if a.source == "tamper2d":
        weights = Path(str(resources.files("ctguard") / "weights"))
        network, onnx = weights / "tamper2d.pt", weights / "tamper2d.onnx"
    else:
        network, onnx = Path(a.source) / "model.pt", Path(a.source) / "model.onnx"
    ckpt = torch.load(network, map_location="cpu", weights_only=True)
    card = ckpt.pop("card", None)  # a bundled network's card: its training times
    summary = json.loads((Path(a.source) / "summary.json").read_text()) if card is None else \
        {"slices": card.get("training_data", {}).get("examples"), "train_seconds": card.get("train_seconds"), "data_seconds": card.get("data_seconds")}
    shutil.copy(onnx, out / "model.onnx")
    cfg = api.load_config(a.config)
    stage = {k: cfg[k] for k in cfg if k.startswith("slice_stage")}
    ckpt["config"] = {**ckpt["config"], **SLICE_DEFAULTS, **stage}
    torch.save(ckpt, out / "model.pt")
    (out / "config.json").write_text(json.dumps(ckpt["config"], indent=2) + "\n")
    summary["slice_stage"] = fit_slice_stage(ckpt["config"], out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
