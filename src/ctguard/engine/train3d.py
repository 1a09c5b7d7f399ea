"""Training of the bundled 3D tamper detector on simulated data (``ctguard train --config configs/tamper3d.yaml``)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctguard.models.cube3d import CLASSES, TamperNet3D, normalise

DEFAULTS: dict[str, Any] = {
    "task": "tamper3d",
    "seed": 0,
    "phantoms": 10,  # phantom chests used for training
    "phantom_shape": [80, 192, 192],
    "phantom_spacing": [2.0, 1.9, 1.9],
    "real_series": [],  # DICOM folders of the training patients
    "annotations": None,  # their tumour boxes (PASCAL-VOC XML by SOPInstanceUID)
    "inject": 2,
    "remove": 2,
    "per_scan": 3,
    "cube": 64,
    "width": 16,
    "epochs": 6,
    "batch_size": 16,
    "lr": 0.002,
    "threads": 2,
    "cache": None,  # an .npz to keep the simulated cubes in between runs
}


def build_sources(cfg: dict, progress: bool = True):
    from ctguard import io
    from ctguard.tamper.simulate import Source, phantom_source, tumours_from_voc

    sources = [phantom_source(cfg["seed"] * 1000 + k, tuple(cfg["phantom_shape"]), tuple(cfg["phantom_spacing"]))
               for k in range(cfg["phantoms"])]
    for path in cfg["real_series"]:
        vol = io.read(path)
        tumours = tumours_from_voc(vol, cfg["annotations"]) if cfg.get("annotations") else []
        sources.append(Source(str(path), vol, vol.meta.get("patient_id", ""), tumours))
    return sources


def make_cubes(sources, cfg: dict, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    from ctguard.data.cubes import cubes_from_source

    xs, ys = [], []
    for i, src in enumerate(tqdm(sources, desc="simulate + cut cubes", disable=not progress)):
        cx, cy = cubes_from_source(src, cfg["seed"] * 7919 + i, cfg["inject"], cfg["remove"], cfg["per_scan"], cfg["cube"])
        xs += cx
        ys += cy
    return np.stack(xs).astype(np.float32), np.stack(ys)


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips on each axis and an in-plane transpose, the same for input and target."""
    for axis in (2, 3, 4):
        if torch.rand(1, generator=gen).item() < 0.5:
            x, y = x.flip(axis), y.flip(axis - 1)
    if torch.rand(1, generator=gen).item() < 0.5:
        x, y = x.transpose(3, 4), y.transpose(2, 3)
    return x, y


def train(cfg: dict, out_dir: str | Path, progress: bool = True, echo=print) -> dict:
    """Trains the detector; writes ``model.pt``, ``history.csv``, ``config.json``; returns the summary."""
    from tqdm import tqdm

    cfg = {**DEFAULTS, **cfg}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.set_num_threads(int(cfg["threads"]))
    t0 = time.time()
    cache = Path(cfg["cache"]) if cfg.get("cache") else None
    if cache is not None and cache.is_file():
        with np.load(cache) as d:
            x, y = d["x"], d["y"]
    else:
        x, y = make_cubes(build_sources(cfg, progress), cfg, progress)
        if cache is not None:
            np.savez(cache, x=x, y=y)
    t_data = time.time() - t0
    counts = np.bincount(y.ravel(), minlength=3)
    echo(f"{len(x)} cubes of {cfg['cube']} mm; target cells: " + ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts)))
    weights = torch.tensor((counts.sum() / np.maximum(counts, 1)) ** 0.5, dtype=torch.float32)  # rare edit cells count more (0.7 gave 74 false findings per demo scan)
    weights /= weights.mean()
    model = TamperNet3D(cfg["width"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    steps = cfg["epochs"] * int(np.ceil(len(x) / cfg["batch_size"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    gen = torch.Generator().manual_seed(cfg["seed"])
    xt = torch.from_numpy(normalise(x))[:, None]
    yt = torch.from_numpy(y)
    history = []
    for epoch in range(cfg["epochs"]):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        t_ep, tot, correct, cells = time.time(), 0.0, 0, 0
        bar = tqdm(range(0, len(order), cfg["batch_size"]), desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not progress)
        for i in bar:
            idx = order[i : i + cfg["batch_size"]]
            xb, yb = _augment(xt[idx], yt[idx], gen)
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
        history.append({"epoch": epoch + 1, "loss": tot / len(xt), "accuracy": correct / cells,
                        "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t_ep, 1)})
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    model.eval()
    torch.save({"model": model.state_dict(), "config": cfg, "classes": CLASSES, "arch": "tamper3d"}, out / "model.pt")
    summary = {"cubes": len(x), "data_seconds": round(t_data, 1), "train_seconds": round(time.time() - t0 - t_data, 1), "history": history}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(f"trained in {summary['train_seconds']} s (+{summary['data_seconds']} s making data); wrote {out / 'model.pt'}")
    return summary
