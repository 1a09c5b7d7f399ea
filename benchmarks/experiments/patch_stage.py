"""A learned second stage on native-resolution patches, measured against the trees on held-out patients.

Usage:
    python benchmarks/experiments/patch_stage.py collect FOLD RUN OUT   # patches of the stage's places
    python benchmarks/experiments/patch_stage.py fit OUT [--epochs 12]  # a small CNN on them; the measures

``collect`` makes the second stage's places of a fold's run (RUN, a ``benchmarks/cross_validate.py``
fold with its network and stage) exactly as ``ctguard.engine.train_verifier`` makes them (the same
edits, untouched places and network candidates, the same labels), on its training sources and, with
the fold's network, on its held-out patients' scans too (seeds of the stage, never the network's).
At every place it keeps a patch of the scan at its own voxels: 5 slices of 48 x 48 pixels, as HU
and as the in-plane and through-plane high-pass residuals divided by the scan's own noise; and the
tree stage's row (from the run's cache for the training sources, made anew for the held-out ones).

``fit`` trains a small 2D CNN (the 5 slices of the three channels as 15 input channels) on the
training sources' patches (flips, quarter turns and shifts of up to 4 pixels) and scores the held-out
rows with it, with the fold's trees, and with the mean of the two. Measures on the held-out rows
(edits' centres and the candidates near them against untouched places and the clean copies'
candidates): the AUC, and the share of edits' rows over the highest score of a held-out clean
scan's candidate (what a threshold with no false finding on those scans would find).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ctguard.engine import train_verifier as tv  # noqa: E402

SIZE, SLICES, MARGIN = 48, 5, 4
_kept: list[np.ndarray] = []
_real_inputs = tv.stage_inputs


def patches_at(vol, places: np.ndarray, noise: tuple[float, float]) -> np.ndarray:
    """``(n, 3, SLICES, SIZE, SIZE)`` float16: HU / 400 (clipped to -1100..600) and the in-plane and
    through-plane residuals / the scan's noise, around each place at the scan's own voxels."""
    out = np.zeros((len(places), 3, SLICES, SIZE, SIZE), np.float16)
    shape = np.asarray(vol.hu.shape)
    half = SIZE // 2 + MARGIN
    for k, p in enumerate(np.rint(np.asarray(places, float)).astype(int)):
        p = np.clip(p, 0, shape - 1)
        zi = np.clip(p[0] + np.arange(-(SLICES // 2) - 1, SLICES // 2 + 2), 0, shape[0] - 1)
        yi = np.clip(p[1] + np.arange(-half, half), 0, shape[1] - 1)
        xi = np.clip(p[2] + np.arange(-half, half), 0, shape[2] - 1)
        sub = vol.hu[np.ix_(zi, yi, xi)].astype(np.float32)
        r_xy = (sub - ndimage.gaussian_filter(sub, (0.0, 1.0, 1.0), mode="nearest")) / max(noise[0], 1e-3)
        r_z = (sub - ndimage.gaussian_filter1d(sub, 1.0, axis=0, mode="nearest")) / max(noise[1], 1e-3)
        crop = (slice(1, 1 + SLICES), slice(MARGIN, MARGIN + SIZE), slice(MARGIN, MARGIN + SIZE))
        out[k, 0] = np.clip(sub[crop], -1100, 600) / 400.0
        out[k, 1] = np.clip(r_xy[crop], -8, 8)
        out[k, 2] = np.clip(r_z[crop], -8, 8)
    return out


def _recording(features: bool):
    def stage_inputs(vol, places, p_network, noise, with_network=True, threads=2, recentre=False):
        _kept.append(patches_at(vol, places, noise))
        if features:
            return _real_inputs(vol, places, p_network, noise, with_network=with_network, threads=threads, recentre=recentre)
        width = len(tv.feature_names(recentre)) + (3 if with_network else 0)
        return np.zeros((len(places), width), np.float32)
    return stage_inputs


def _source(job: tuple) -> dict:
    cfg, spec, model, held = job
    _kept.clear()
    tv.stage_inputs = _recording(features=held)
    rows = tv._source_rows(cfg, spec, model)
    tv.stage_inputs = _real_inputs
    if not held:  # the tree rows of a training source: the run's own, from its cache
        cached = tv.source_rows((cfg, spec, model))
        assert np.array_equal(cached["y"], rows["y"]), f"{spec[1]}: rows differ from the run's"
        rows["x"] = cached["x"]
    return rows | {"patches": np.concatenate(_kept), "held": held}


def collect(a) -> None:
    import cross_validate as cv

    from ctguard import api

    run, out = Path(a.run), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**tv.VERIFIER_DEFAULTS, **json.loads((run / "config.json").read_text())}
    _, held = cv.split_fold(cv.patient_scans(api.load_config(a.config)), a.fold)
    held_specs = [("series", e["scan"], 1, e.get("tumours"), 0) for entries in held.values() for e in entries]
    model = str(run / "model.pt")
    jobs = [(cfg, s, model, False) for s in tv.verifier_specs(cfg)] + [(cfg, s, model, True) for s in held_specs]
    t0 = time.time()
    with get_context("fork").Pool(2) as pool:
        for k, r in enumerate(pool.imap(_source, jobs)):
            if len(r["y"]):
                np.savez(out / f"{k:03d}.npz", **{n: r[n] for n in ("x", "y", "scan", "clean", "patches", "group", "held")})
            print(f"{k + 1}/{len(jobs)} {r['group']} {len(r['y'])} rows, {time.time() - t0:.0f} s", flush=True)
    (out / "fold.json").write_text(json.dumps({"fold": a.fold, "run": str(run), "threshold": json.loads(
        (run / "verifier.json").read_text())["threshold"]}) + "\n")


def _net(channels: int, extra: int):
    import torch
    from torch import nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    class PatchNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(block(channels, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64), nn.MaxPool2d(2),
                                      block(64, 96), nn.MaxPool2d(2), block(96, 128))
            self.head = nn.Sequential(nn.Linear(256 + extra, 64), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(64, 3))

        def forward(self, x, e):
            h = self.body(x)
            return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3)), e], 1))

    return PatchNet()


CROP = 40


def _batch(p: np.ndarray, rng: np.random.Generator | None):
    """Patches ``(n, 3, S, 48, 48)`` as ``(n, 3 S, 40, 40)``; with ``rng`` flipped, turned and shifted at random."""
    n = len(p)
    x = p.reshape(n, -1, SIZE, SIZE).astype(np.float32)
    c = (SIZE - CROP) // 2
    if rng is None:
        return x[:, :, c:c + CROP, c:c + CROP]
    out = np.empty((n, x.shape[1], CROP, CROP), np.float32)
    for k in range(n):
        dy, dx = rng.integers(0, 2 * c + 1, size=2)
        v = x[k, :, dy:dy + CROP, dx:dx + CROP]
        if rng.random() < 0.5:
            v = v[:, :, ::-1]
        v = np.rot90(v, int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:  # the slices' order (z flip) within each channel
            v = v.reshape(3, SLICES, CROP, CROP)[:, ::-1].reshape(-1, CROP, CROP)
        out[k] = v
    return out


def fit(a) -> None:
    import torch
    from sklearn.metrics import roc_auc_score

    from ctguard.verifier import Verifier

    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = Path(a.out)
    info = json.loads((out / "fold.json").read_text())
    parts = [dict(np.load(p, allow_pickle=False)) for p in sorted(out.glob("[0-9]*.npz"))]
    train = [p for p in parts if not bool(p["held"])]
    test = [p for p in parts if bool(p["held"])]

    def joined(ps):
        return (np.concatenate([p["patches"] for p in ps]), np.concatenate([p["x"] for p in ps]),
                np.concatenate([p["y"] for p in ps]).astype(int), np.concatenate([p["clean"] for p in ps]),
                np.concatenate([[f"{k}"] * len(p["y"]) for k, p in enumerate(ps)]), ps)

    ptr, xtr, ytr, _, _, _ = joined(train)
    pte, xte, yte, cte, ste, _ = joined(test)
    etr, ete = xtr[:, -3:], xte[:, -3:]  # the network's log probabilities, the trees' last three columns
    print(f"train {len(ytr)} rows ({np.bincount(ytr)}), held out {len(yte)} ({np.bincount(yte)})", flush=True)
    net = _net(ptr.shape[1] * ptr.shape[2], 3 if a.with_network else 0)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = a.epochs * int(np.ceil(len(ytr) / 128))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    w = torch.tensor(len(ytr) / (3 * np.bincount(ytr, minlength=3)), dtype=torch.float32)
    lossf = torch.nn.CrossEntropyLoss(weight=w)
    rng = np.random.default_rng(0)

    def extra(e):
        return torch.from_numpy(e.astype(np.float32)) if a.with_network else torch.zeros((len(e), 0))

    def predict(p, e):
        net.eval()
        res = []
        with torch.no_grad():
            for s in range(0, len(p), 512):
                res.append(torch.softmax(net(torch.from_numpy(_batch(p[s:s + 512], None)), extra(e[s:s + 512])), 1).numpy())
        return np.concatenate(res)

    t0 = time.time()
    for ep in range(a.epochs):
        net.train()
        order = rng.permutation(len(ytr))
        total = 0.0
        for s in range(0, len(order), 128):
            j = order[s:s + 128]
            xb = torch.from_numpy(_batch(ptr[j], rng))
            loss = lossf(net(xb, extra(etr[j])), torch.from_numpy(ytr[j]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(j)
        print(f"epoch {ep + 1}: loss {total / len(ytr):.4f}, {time.time() - t0:.0f} s", flush=True)
    torch.save(net.state_dict(), out / f"cnn_{a.tag}.pt")
    p_cnn = predict(pte, ete)
    np.save(out / f"p_cnn_{a.tag}.npy", p_cnn)
    run = Path(info["run"])
    p_tree = Verifier.load(run / "model.verifier.npz").probabilities(xte)
    results = {}
    for name, p in [("trees", p_tree), ("cnn", p_cnn), ("mean", (p_tree + p_cnn) / 2)]:
        score = 1.0 - p[:, 0]
        pos = yte > 0
        neg = (yte == 0)
        top_clean = float(score[cte].max(initial=0.0))
        per_scan = {}
        for g in np.unique(ste):  # each held-out scan's clean candidates: the highest
            m = cte & (ste == g)
            per_scan[g] = float(score[m].max(initial=0.0))
        results[name] = {"auc_edits_vs_untouched": round(float(roc_auc_score(pos[pos | neg], score[pos | neg])), 4),
                         "auc_injected": round(float(roc_auc_score((yte == 1)[(yte == 1) | neg], score[(yte == 1) | neg])), 4),
                         "auc_removed": round(float(roc_auc_score((yte == 2)[(yte == 2) | neg], score[(yte == 2) | neg])), 4),
                         "over_highest_clean_candidate": round(float((score[pos] > top_clean).mean()), 3),
                         "over_fold_threshold": round(float((score[pos] >= info["threshold"]).mean()), 3),
                         "clean_candidates_over_fold_threshold": int((score[cte] >= info["threshold"]).sum()),
                         "highest_clean_candidate": round(top_clean, 4)}
        print(name, json.dumps(results[name]), flush=True)
    (out / f"fit_{a.tag}.json").write_text(json.dumps({"epochs": a.epochs, "with_network": a.with_network, **results}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("collect")
    c.add_argument("fold", type=int)
    c.add_argument("run")
    c.add_argument("out")
    c.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    f = sub.add_parser("fit")
    f.add_argument("out")
    f.add_argument("--epochs", type=int, default=12)
    f.add_argument("--with-network", action="store_true", help="the network's probabilities as three more inputs of the head")
    f.add_argument("--tag", default="cnn")
    a = ap.parse_args()
    collect(a) if a.what == "collect" else fit(a)


if __name__ == "__main__":
    main()
