"""Training of the 2D tamper detector (``ctguard train --config configs/tamper2d.yaml``).

Its data are the axial slices of the 3D detector's training cubes (1 mm, 64 mm wide, with their
cell targets): the slices through the middle of each cube, whose target is the middle row of cells.
So it learns from the same simulated edits, real tumours, lung and hard negatives as the 3D model.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctguard.errors import InputError
from ctguard.models.patch2d import CLASSES, STRIDE, TamperNet2D, normalise

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


def train(cfg: dict, out_dir: str | Path, progress: bool = True, echo=print) -> dict:
    from tqdm import tqdm

    cfg = {**DEFAULTS, **cfg}
    if not cfg["cubes"]:
        raise InputError("no training cubes: list .npz files under `cubes:` (made by the tamper3d trainer)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(int(cfg["threads"]))
    rng = np.random.default_rng(cfg["seed"])
    t0 = time.time()
    xs, ys = [], []
    for path in cfg["cubes"]:
        if not Path(path).is_file():
            raise InputError("no such cube file", path)
        with np.load(path) as d:
            sx, sy = slices_from_cubes(d["x"], d["y"], int(cfg["slices_per_cube"]), rng)
        xs.append(sx)
        ys.append(sy)
    x, y = np.concatenate(xs), np.concatenate(ys)
    t_data = time.time() - t0
    counts = np.bincount(y.ravel(), minlength=3)
    echo(f"{len(x)} slices of 64 mm; target cells: " + ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts)))
    weights = torch.tensor((counts.sum() / np.maximum(counts, 1)) ** 0.5, dtype=torch.float32)
    weights /= weights.mean()
    model = TamperNet2D(int(cfg["width"]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    steps = cfg["epochs"] * int(np.ceil(len(x) / cfg["batch_size"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    gen = torch.Generator().manual_seed(cfg["seed"])
    xt, yt = torch.from_numpy(normalise(x))[:, None], torch.from_numpy(y)
    history = []
    for epoch in range(int(cfg["epochs"])):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        t_ep, tot, correct, cells = time.time(), 0.0, 0, 0
        bar = tqdm(range(0, len(order), cfg["batch_size"]), desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not progress)
        for i in bar:
            idx = order[i : i + cfg["batch_size"]]
            xb, yb = xt[idx], yt[idx]
            if torch.rand(1, generator=gen).item() < 0.5:
                xb, yb = xb.flip(3), yb.flip(2)
            if torch.rand(1, generator=gen).item() < 0.5:
                xb, yb = xb.flip(2), yb.flip(1)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            cells += yb.numel()
            bar.set_postfix(loss=f"{tot / (i + len(idx)):.3f}", acc=f"{correct / cells:.3f}")
        history.append({"epoch": epoch + 1, "loss": tot / len(xt), "accuracy": correct / cells, "lr": sched.get_last_lr()[0],
                        "seconds": round(time.time() - t_ep, 1)})
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    model.eval()
    torch.save({"model": model.state_dict(), "config": cfg, "classes": CLASSES, "arch": "tamper2d"}, out / "model.pt")
    summary = {"slices": len(x), "data_seconds": round(t_data, 1), "train_seconds": round(time.time() - t0 - t_data, 1), "history": history}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(f"trained in {summary['train_seconds']} s (+{summary['data_seconds']} s loading); wrote {out / 'model.pt'}")
    return summary
