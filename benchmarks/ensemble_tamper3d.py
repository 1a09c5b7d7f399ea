"""Joins trained 3D detectors into one that averages their class probabilities.

Usage: python benchmarks/ensemble_tamper3d.py RUN_DIR_OR_CHECKPOINT [...] --out RUN_DIR
Writes RUN_DIR/model.pt (arch tamper3d; its config lists the members' configs), model.onnx (one
graph: screening runs it as one network) and summary.json (the members' summed times), so that
calibrate_tamper3d.py, eval_tamper3d.py and bundle_tamper3d.py take it like any run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctguard.models.cube3d import CLASSES, build
from ctguard.screen import export_onnx


def main(members: list[str], out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs, state, summaries = [], {}, []
    for i, m in enumerate(members):
        path = Path(m) / "model.pt" if Path(m).is_dir() else Path(m)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("arch") != "tamper3d":
            raise SystemExit(f"{path}: not a 3D detector checkpoint")
        configs.append({**ckpt["config"], "checkpoint": str(path)})
        state.update({f"members.{i}.{k}": v for k, v in ckpt["model"].items()})
        s = path.parent / "summary.json"
        card = ckpt.get("card") or {}  # a bundled detector has no summary.json, its card holds the same
        summaries.append(json.loads(s.read_text()) if s.is_file() else
                         {"cubes": card.get("training_data", {}).get("examples", 0), "train_seconds": card.get("train_seconds", 0),
                          "data_seconds": card.get("data_seconds", 0)})
    cfg = {"task": "tamper3d", "members": configs}
    net = build(cfg)
    net.load_state_dict(state)
    torch.save({"model": net.state_dict(), "config": cfg, "classes": CLASSES, "arch": "tamper3d"}, out_dir / "model.pt")
    export_onnx(net, out_dir / "model.onnx")
    summary = {k: sum(s.get(k, 0) for s in summaries) for k in ("cubes", "train_seconds", "data_seconds")}
    (out_dir / "summary.json").write_text(json.dumps({**summary, "members": [c["checkpoint"] for c in configs]}, indent=2) + "\n")
    print(f"ensemble of {len(members)} -> {out_dir / 'model.pt'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("members", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    main(a.members, a.out)
