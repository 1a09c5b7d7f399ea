"""Training the patch stage's CNN (:mod:`ctguard.patches`, :mod:`ctguard.models.patchnet`) on the
second stage's rows: the same places and labels as the trees, each as its native patch."""

from __future__ import annotations

import numpy as np
import torch

from ctguard.models.patchnet import PatchNet
from ctguard.patches import CHANNELS, CROP, SIZE, SLICES, centre_crop

BATCH = 128


def augmented(patches: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``CROP`` x ``CROP`` crops of ``patches`` shifted by up to 4 pixels, flipped left-right, turned
    by quarter turns and read with the slices' order reversed, each at random: float32."""
    n, c = len(patches), (SIZE - CROP) // 2
    out = np.empty((n, CHANNELS, CROP, CROP), np.float32)
    shifts = rng.integers(0, 2 * c + 1, size=(n, 2))
    flips, turns, zflips = rng.random(n) < 0.5, rng.integers(4, size=n), rng.random(n) < 0.5
    for k in range(n):
        v = patches[k, :, shifts[k, 0]:shifts[k, 0] + CROP, shifts[k, 1]:shifts[k, 1] + CROP]
        if flips[k]:
            v = v[:, :, ::-1]
        v = np.rot90(v, int(turns[k]), axes=(1, 2))
        if zflips[k]:
            v = v.reshape(3, SLICES, CROP, CROP)[:, ::-1].reshape(CHANNELS, CROP, CROP)
        out[k] = v
    return out


def fit_patch_net(patches: np.ndarray, y: np.ndarray, epochs: int, seed: int, device: torch.device | None = None) -> PatchNet:
    """A :class:`PatchNet` trained on ``patches`` with labels ``y`` (0 genuine, 1 injected, 2
    removed; classes weighted by their inverse frequency): AdamW with a one-cycle rate, ``epochs``
    passes of augmented crops."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = PatchNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = max(1, epochs * int(np.ceil(len(y) / BATCH)))
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    counts = np.bincount(y, minlength=3).astype(float)
    weight = torch.tensor(len(y) / (3 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    labels = torch.from_numpy(np.asarray(y, np.int64))
    for _ in range(epochs):
        net.train()
        order = rng.permutation(len(y))
        for s in range(0, len(order), BATCH):
            j = order[s:s + BATCH]
            if len(j) < 2:  # batch norm needs two patches
                continue
            loss = loss_fn(net(torch.from_numpy(augmented(patches[j], rng)).to(device)), labels[j].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return net.cpu().eval()


def patch_probabilities(net: PatchNet, patches: np.ndarray) -> np.ndarray:
    """``(n, 3)`` probabilities of the trained ``net`` on the central crops of ``patches``."""
    out = []
    with torch.no_grad():
        for s in range(0, len(patches), 512):
            out.append(torch.softmax(net(torch.from_numpy(centre_crop(patches[s:s + 512]))), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 3), np.float32)


def out_of_patient_patch_probabilities(patches: np.ndarray, y: np.ndarray, groups: np.ndarray, epochs: int, seed: int, folds: int = 5,
                                       device: torch.device | None = None) -> np.ndarray:
    """Each row's CNN probabilities from a CNN trained without its patient, on the trees' splits
    (:func:`ctguard.engine.train_verifier.patient_splits`: ``folds`` grouped folds; 0: one fit for
    each patient or phantom left out)."""
    from ctguard.engine.train_verifier import patient_splits

    out = np.zeros((len(y), 3), np.float32)
    for k, (tr, te) in enumerate(patient_splits(groups, folds)):
        out[te] = patch_probabilities(fit_patch_net(patches[tr], y[tr], epochs, seed + 1 + k, device), patches[te])
    return out
