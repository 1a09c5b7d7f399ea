"""Training of the paper's 2D image classifiers (``ctguard train`` with ``task: classifier``).

Paper defaults: 10 epochs, Adam, batch 32, optional steps per epoch; plus early stopping on the
validation loss and best-checkpoint saving. A frozen transfer backbone's features are computed once
(for the originals and ``aug_copies`` augmented copies of each training image) and only the head is
trained on them: that is what makes the five-model study practical on a CPU. Runs unchanged under
``torchrun --nproc_per_node N`` (DistributedDataParallel; gloo on CPU, nccl on GPU).

Run folder: ``config.json`` (resolved), ``history.csv``, ``best.pt`` (whole model, best validation
loss), ``last.pt`` (trainable weights, optimiser and counters, for ``--resume``), then the test-split
evaluation of ``best.pt`` (``metrics.json``, figures, ``report.md``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ctguard.data.folder import LUNG_WINDOW, load_images, scan_folder
from ctguard.errors import InputError
from ctguard.models.registry import backbone_frozen, build, spec

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "task": "classifier",
    "model": "paper-cnn",
    "data": None,  # ImageFolder-style folder (split or flat)
    "image_size": None,  # None: the model's own input size (224; 299 for inception_v3)
    "epochs": 10,
    "batch_size": 32,
    "lr": 0.001,
    "steps_per_epoch": None,  # the paper used 8
    "patience": 3,  # early stopping on validation loss; 0 turns it off
    "seed": 0,
    "test_fraction": 0.25,  # for a flat folder: the paper's 75/25 split, by patient
    "augment": True,
    "aug_copies": 2,  # frozen backbones: augmented copies of each training image whose features are computed
    "window": list(LUNG_WINDOW),  # HU window for DICOM slices
    "unfreeze": 0,  # transfer models: fine-tune the last N blocks (-1: all)
    "weights": None,  # ImageNet state-dict file for offline transfer learning
    "pretrained": True,  # try torchvision's ImageNet weights (download or cache)
    "hidden": 128,  # paper-cnn's dense layer width (the paper does not say)
    "workers": 0,
    "threads": None,
    "channels_last": True,
}

HISTORY_FIELDS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def to_input(gray_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``(n, h, w)`` -> normalised float ``(n, 3, h, w)`` (gray repeated to 3 channels)."""
    x = gray_u8.float().div_(255.0)[:, None].expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


class Augment:
    """The paper's augmentation, on the training set only: flips, small rotations, zoom and shifts."""

    def __init__(self, seed: int):
        from torchvision.transforms import v2

        self.tf = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))])
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch_u8: torch.Tensor) -> torch.Tensor:
        state = torch.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen)))
        try:
            return torch.stack([self.tf(img[None])[0] for img in batch_u8])
        finally:
            torch.set_rng_state(state)


def _write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        w.writerows(history)


def checkpoint_dict(model: nn.Module, cfg: dict, classes: list[str], size: int) -> dict:
    return {"arch": "classifier", "model_name": cfg["model"], "classes": classes, "input_size": size, "hidden": cfg["hidden"],
            "config": cfg, "state_dict": model.state_dict()}


def load_classifier(path: str | Path) -> tuple[nn.Module, dict]:
    """A classifier checkpoint written by :func:`train` (weights only, never unpickled code).

    Raises:
        InputError: unreadable, or not a classifier checkpoint, or weights that do not fit.
    """
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot load checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})", path) from None
    if not isinstance(ck, dict) or ck.get("arch") != "classifier":
        arch = ck.get("arch") if isinstance(ck, dict) else type(ck).__name__
        raise InputError(f"is not a 2D classifier checkpoint (arch {arch!r})", path)
    model = build(ck["model_name"], len(ck["classes"]), pretrained=False, input_size=ck["input_size"], hidden=ck.get("hidden", 128))
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise InputError(f"weights do not fit {ck['model_name']} ({str(e).splitlines()[0][:160]})", path) from None
    model.eval()
    return model, ck


@torch.no_grad()
def _features(backbone: nn.Module, images: torch.Tensor, mean, std, batch: int, device, augment: Augment | None = None,
              progress: bool = False, desc: str = "features") -> torch.Tensor:
    from tqdm import tqdm

    backbone.eval()
    out = []
    for i in tqdm(range(0, len(images), batch), desc=desc, disable=not progress, leave=False):
        b = images[i : i + batch]
        if augment is not None:
            b = augment(b)
        x = to_input(b, mean, std).to(device).contiguous(memory_format=torch.channels_last)
        out.append(backbone(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def train(cfg: dict, out_dir: str | Path, progress: bool = True, echo=print, resume: bool = False) -> dict:
    """Trains a registered classifier on an ImageFolder dataset; returns the test metrics."""
    from tqdm import tqdm

    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if not cfg.get("data"):
        raise InputError("no training data: set `data:` in the config or pass --data DIR")
    s = spec(cfg["model"])
    size = int(cfg["image_size"] or s.input_size)
    rank, world, local_rank = _dist_info()
    distributed = world > 1
    device = _device(local_rank)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_rank = rank == 0
    say = echo if main_rank else (lambda *a, **k: None)
    progress = progress and main_rank
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    seed_everything(int(cfg["seed"]))
    say(f"device: {'GPU ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
        f"{f', {world} processes (DistributedDataParallel)' if distributed else ''}")

    data = scan_folder(cfg["data"], cfg["test_fraction"], cfg["seed"])  # bad data fails before the run folder is made
    out = Path(out_dir)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    say(f"data: {data.root} ({data.layout}); classes {data.classes}; "
        + "; ".join(f"{k} {sum(v.values())}" for k, v in data.counts().items()))
    window = tuple(cfg["window"])
    x_train = torch.from_numpy(load_images(data.splits["train"], size, window, progress))
    y_train = torch.tensor([i.label for i in data.splits["train"]])
    x_val = torch.from_numpy(load_images(data.splits["val"], size, window, progress))
    y_val = torch.tensor([i.label for i in data.splits["val"]])

    model = build(cfg["model"], len(data.classes), pretrained=cfg["pretrained"], weights=cfg["weights"], unfreeze=int(cfg["unfreeze"]),
                  input_size=size, hidden=int(cfg["hidden"]))
    if s.transfer:
        say(f"{s.name}: {'ImageNet weights' if model.pretrained else 'RANDOM initialisation (no ImageNet weights)'}, "
            f"{'frozen backbone' if backbone_frozen(model) else 'fine-tuning'}")
    model.to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    frozen = backbone_frozen(model)
    augment = Augment(int(cfg["seed"]) + 1000 * rank) if cfg["augment"] else None

    if frozen:  # features once; the head trains on them
        t = time.time()
        feats = [_features(model.backbone, x_train, s.mean, s.std, 32, device, progress=progress, desc="features (train)")]
        labels = [y_train]
        for k in range(int(cfg["aug_copies"]) if augment else 0):
            feats.append(_features(model.backbone, x_train, s.mean, s.std, 32, device, augment, progress, f"features (augmented {k + 1})"))
            labels.append(y_train)
        train_x, train_y = torch.cat(feats), torch.cat(labels)
        val_x = _features(model.backbone, x_val, s.mean, s.std, 32, device, progress=progress, desc="features (val)")
        say(f"features of {len(train_x)} training and {len(val_x)} validation images in {time.time() - t:.1f} s")
        trainable: nn.Module = model.head
    else:
        train_x, train_y, val_x = x_train, y_train, x_val
        trainable = model

    net = trainable
    if distributed:
        net = nn.parallel.DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(cfg["lr"]))
    loss_fn = nn.CrossEntropyLoss()

    history: list[dict] = []
    best_loss, wait, start = float("inf"), 0, 0
    if resume and (out / "last.pt").is_file():
        state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        if (out / "best.pt").is_file():
            model.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True)["state_dict"])
        trainable.load_state_dict(state["trainable"])
        opt.load_state_dict(state["optimizer"])
        history, best_loss, wait, start = state["history"], state["best_loss"], state["wait"], state["epoch"]
        say(f"resumed at epoch {start} (best validation loss {best_loss:.4f})")

    n = len(train_x)
    per_rank = int(np.ceil(n / world))  # every rank gets as many (the permutation wraps), so DDP steps stay in step
    batches = int(np.ceil(per_rank / cfg["batch_size"]))
    if cfg["steps_per_epoch"]:
        batches = min(batches, int(cfg["steps_per_epoch"]))
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    for epoch in range(start, int(cfg["epochs"])):
        t_ep = time.time()
        gen.manual_seed(int(cfg["seed"]) * 100003 + epoch)
        perm = torch.randperm(n, generator=gen)  # the same permutation on every rank, dealt out
        order = torch.cat([perm, perm[: per_rank * world - n]])[rank::world]
        net.train()
        if frozen:
            model.backbone.eval()
        seen, tot, correct = 0, 0.0, 0
        bar = tqdm(range(batches), desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not progress)
        for b in bar:
            idx = order[b * cfg["batch_size"] : (b + 1) * cfg["batch_size"]]
            yb = train_y[idx].to(device)
            if frozen:
                xb = train_x[idx].to(device)
            else:
                ub = train_x[idx]
                if augment is not None:
                    ub = augment(ub)
                xb = to_input(ub, s.mean, s.std).to(device)
                if cfg["channels_last"]:
                    xb = xb.contiguous(memory_format=torch.channels_last)
            logits = net(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            tot += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            bar.set_postfix(loss=f"{tot / seen:.4f}", acc=f"{correct / seen:.3f}")
        stats = torch.tensor([tot, correct, seen], dtype=torch.float64)
        if distributed:
            dist.all_reduce(stats)
        val_loss, val_acc = _validate(model, trainable, frozen, val_x, y_val, s, device, cfg)
        row = {"epoch": epoch + 1, "loss": round(float(stats[0] / stats[2]), 6), "accuracy": round(float(stats[1] / stats[2]), 6),
               "val_loss": round(val_loss, 6), "val_accuracy": round(val_acc, 6), "lr": float(cfg["lr"]),
               "seconds": round(time.time() - t_ep, 2)}
        history.append(row)
        improved = val_loss < best_loss - 1e-6
        best_loss, wait = (val_loss, 0) if improved else (best_loss, wait + 1)
        say(f"epoch {epoch + 1}: loss {row['loss']:.4f} acc {row['accuracy']:.3f} | val_loss {val_loss:.4f} val_acc {val_acc:.3f}"
            f"{' (best)' if improved else ''}")
        if main_rank:
            if improved:
                torch.save(checkpoint_dict(model, cfg, data.classes, size), out / "best.pt")
            torch.save({"trainable": trainable.state_dict(), "optimizer": opt.state_dict(), "history": history, "best_loss": best_loss,
                        "wait": wait, "epoch": epoch + 1}, out / "last.pt")
            _write_history(out / "history.csv", history)
        if cfg["patience"] and wait >= int(cfg["patience"]):
            say(f"early stop: no better validation loss for {wait} epochs")
            break
    if distributed:
        dist.barrier()
    result: dict = {"history": history, "classes": data.classes, "out": str(out)}
    if main_rank:
        from ctguard.engine.evaluate import evaluate

        result["metrics"] = evaluate(out / "best.pt", cfg["data"], out, split="test", progress=progress, echo=say,
                                     history=out / "history.csv", seed=int(cfg["seed"]), test_fraction=cfg["test_fraction"])
    if distributed:
        dist.destroy_process_group()
    return result


@torch.no_grad()
def _validate(model, trainable, frozen, val_x, y_val, s, device, cfg) -> tuple[float, float]:
    model.eval()
    losses, correct = 0.0, 0
    for i in range(0, len(val_x), 64):
        yb = y_val[i : i + 64].to(device)
        if frozen:
            logits = trainable(val_x[i : i + 64].to(device))
        else:
            xb = to_input(val_x[i : i + 64], s.mean, s.std).to(device)
            if cfg["channels_last"]:
                xb = xb.contiguous(memory_format=torch.channels_last)
            logits = model(xb)
        losses += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    n = max(len(val_x), 1)
    return losses / n, correct / n
