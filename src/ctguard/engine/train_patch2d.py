"""Training of the 2D tamper detector (``ctguard train --config configs/tamper2d.yaml``).

Its data are the axial slices of the 3D detector's training cubes (1 mm, 64 mm wide, with their
cell targets): the slices through the middle of each cube, whose target is the middle row of cells.
So it learns from the same simulated edits, real tumours, lung and hard negatives as the 3D model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctguard.engine.train3d import check_paths, class_weights, fit, load_cubes, save_run
from ctguard.engine.train_slice_stage import SLICE_DEFAULTS, check_slice_settings, fit_slice_stage, scan_entries
from ctguard.errors import InputError
from ctguard.models.patch2d import CLASSES, STRIDE, TamperNet2D

DEFAULTS: dict[str, Any] = {
    "task": "tamper2d",
    "seed": 0,
    "cubes": [],  # .npz files of 3D training cubes (x: (n, 64, 64, 64) HU, y: (n, 8, 8, 8) classes)
    "slices_per_cube": 6,  # axial slices taken around each cube's middle
    "width": 32,
    "epochs": 12,
    "batch_size": 64,
    "lr": 0.002,
    "threads": 2,
    **SLICE_DEFAULTS,  # the single slice's second stage (ctguard.engine.train_slice_stage)
}


def slices_from_cubes(x: np.ndarray, y: np.ndarray, per_cube: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Axial slices near each cube's middle, with the targets of the cell row they fall in."""
    size = x.shape[1]
    mid = size // 2
    zs = np.arange(mid - STRIDE, mid + STRIDE)  # the two middle cell rows
    xs, ys = [], []
    for k in range(len(x)):
        for z in rng.choice(zs, size=min(per_cube, len(zs)), replace=False):
            xs.append(x[k, z])
            ys.append(y[k, z // STRIDE])
    return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int64)


def _flip2d(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-right and up-down flips, the same for input and target."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x, y = x.flip(3), y.flip(2)
    if torch.rand(1, generator=gen).item() < 0.5:
        x, y = x.flip(2), y.flip(1)
    return x, y


def train(cfg: dict, out_dir: str | Path, progress: bool = True, echo=print) -> dict:
    cfg = {**DEFAULTS, **cfg}
    if not cfg["cubes"]:
        raise InputError("no training cubes: list .npz files under `cubes:` (made by the tamper3d trainer)")
    check_paths(cfg, ("cubes",))  # all checked before the run folder is made
    if cfg["slice_stage"]:
        check_slice_settings(cfg)
        scan_entries(cfg)  # its settings, config and scans, likewise
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(int(cfg["threads"]))
    rng = np.random.default_rng(cfg["seed"])
    t0 = time.time()
    xs, ys = [], []
    for path in cfg["cubes"]:
        sx, sy = slices_from_cubes(*load_cubes(path), int(cfg["slices_per_cube"]), rng)
        xs.append(sx)
        ys.append(sy)
    x, y = np.concatenate(xs), np.concatenate(ys)
    t_data = time.time() - t0
    counts = np.bincount(y.ravel(), minlength=3)
    echo(f"{len(x)} slices of 64 mm; target cells: " + ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts)))
    model = TamperNet2D(int(cfg["width"]))
    history = fit(model, x, y, int(cfg["epochs"]), cfg["lr"], cfg, progress, class_weights(counts), augment=_flip2d)
    summary = save_run(out, model, cfg, "tamper2d", history, {"slices": len(x)}, t0, t_data, echo, "loading")
    if cfg["slice_stage"]:
        summary["slice_stage"] = fit_slice_stage(cfg, out, echo)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
