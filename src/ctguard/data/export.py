"""``ctguard export-slices``: a CT-GAN-layout dataset (real or simulated) -> an ImageFolder dataset.

Split by patient into ``train/``, ``val/`` and ``test/``, one sub-folder per class, PNG files named
``<patient>__<uuid>_e<experiment>_z<slice>_y<row>_x<col>.png`` (the patient prefix lets a flat
re-split stay by patient). Modes:

- ``slice``: the whole labelled slice, as the paper did; TB scans (no labelled place) give one lung
  slice chosen at random (seeded); ``negatives`` more untouched lung slices per TB/TM scan (distinct,
  more than 3 slices from any labelled place) balance the classes.
- ``patch``: a square crop around each labelled place, plus ``negatives`` crops of untouched lung per
  TB/TM scan (places in the lung mask, away from every labelled place).

Classes: ``binary`` (``real``: TB, TM and untouched lung; ``fake``: FM, FB) or ``ctgan`` (TB, TM, FB,
FM; untouched lung counts as TB). Pixels: the HU window (lung window by default) to 8-bit PNG, or
16-bit PNG with ``bits=16``. ``index.csv`` lists every file with its source; ``export.json`` the
settings and counts.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from ctguard.data.ctgan import load_dataset
from ctguard.data.splits import split_by_patient
from ctguard.errors import InputError

BINARY = {"TB": "real", "TM": "real", "FB": "fake", "FM": "fake"}


def _class(label: str, classes: str) -> str:
    return BINARY[label] if classes == "binary" else label


def _lung_places(vol, rng: np.random.Generator, n: int, avoid: list[tuple[int, int, int]], min_dist_px: int) -> list[tuple[int, int, int]]:
    from ctguard.lung import lung_mask

    mask = lung_mask(vol)
    zz, yy, xx = np.nonzero(mask)
    if len(zz) == 0:
        return []
    out: list[tuple[int, int, int]] = []
    for _ in range(50 * max(n, 1)):
        if len(out) >= n:
            break
        k = int(rng.integers(len(zz)))
        p = (int(zz[k]), int(yy[k]), int(xx[k]))
        if all(abs(p[0] - a[0]) > 3 or np.hypot(p[1] - a[1], p[2] - a[2]) > min_dist_px for a in avoid + out):
            out.append(p)
    return out


def _lung_slices(vol, rng: np.random.Generator, n: int, avoid: list[tuple[int, int, int]], gap: int = 3) -> list[tuple[int, int, int]]:
    """Up to ``n`` distinct slices with lung in view, more than ``gap`` slices from every place in ``avoid``."""
    from ctguard.lung import lung_mask

    mask = lung_mask(vol)
    area = mask.sum(axis=(1, 2))
    ok = [z for z in np.nonzero(area > 0.25 * area.max())[0] if all(abs(int(z) - a[0]) > gap for a in avoid)] if area.max() else []
    chosen = sorted(rng.choice(ok, size=min(n, len(ok)), replace=False).tolist()) if ok else []
    return [(int(z), vol.shape[1] // 2, vol.shape[2] // 2) for z in chosen]


def _to_png(hu2d: np.ndarray, window: tuple[float, float], bits: int, path: Path) -> None:
    from PIL import Image

    lo, hi = window
    a = np.clip((hu2d - lo) / (hi - lo), 0.0, 1.0)
    if bits == 16:
        Image.fromarray(np.rint(a * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray(np.rint(a * 255).astype(np.uint8)).save(path)


def _crop(hu2d: np.ndarray, y: int, x: int, size: int, fill: float = -1024.0) -> np.ndarray:
    h = size // 2
    padded = np.pad(hu2d, h, constant_values=fill)
    return padded[y : y + size, x : x + size]


def export_slices(dataset: str | Path, out_dir: str | Path, mode: str = "slice", classes: str = "binary",
                  fractions=(0.6, 0.15, 0.25), seed: int = 0, window=(-1000.0, 400.0), patch: int = 64, negatives: int = 0,
                  bits: int = 8, ignore_missing: bool = False, test_patients: list[str] | None = None, progress: bool = True,
                  echo=print) -> dict:
    """Writes the ImageFolder dataset; returns the per-split, per-class counts.

    ``test_patients`` pins those patients to the test split (e.g. another scanner's) and splits the
    rest into train/val by the remaining fractions (with one training patient val/ stays empty, and
    training then validates on test/, as the paper did).

    Raises:
        InputError: unknown mode/classes, an existing output folder, or a bad dataset.
    """
    from tqdm import tqdm

    from ctguard import io

    if mode not in ("slice", "patch"):
        raise InputError(f"unknown mode {mode!r} (slice or patch)")
    if classes not in ("binary", "ctgan"):
        raise InputError(f"unknown classes {classes!r} (binary or ctgan)")
    if bits not in (8, 16):
        raise InputError(f"bits must be 8 or 16, not {bits}")
    out = Path(out_dir)
    if out.exists():
        raise InputError("already exists; will not overwrite", out)
    scans = load_dataset(dataset, ignore_missing=ignore_missing)
    if not scans:
        raise InputError("has no labelled scans", dataset)
    if test_patients:
        pinned = [s for s in scans if s.patient in set(test_patients)]
        missing = set(test_patients) - {s.patient for s in pinned}
        if missing:
            raise InputError(f"no scans of test patient(s) {sorted(missing)}", dataset)
        rest = [s for s in scans if s.patient not in set(test_patients)]
        f_train, f_val = fractions[0], fractions[1]
        splits = split_by_patient(rest, (f_train / (f_train + f_val), f_val / (f_train + f_val)), seed, names=("train", "val"))
        splits["test"] = pinned
    else:
        splits = split_by_patient(scans, fractions, seed)
    side = {(s.experiment, s.uuid): name for name, members in splits.items() for s in members}
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    rows: list[dict] = []
    try:
        for scan in tqdm(scans, desc="export", disable=not progress):
            split = side[(scan.experiment, scan.uuid)]
            vol = io.read(scan.folder)
            places = [(z, y, x, _class(scan.label, classes)) for z, y, x in scan.locations]
            if mode == "slice" and not places:  # TB: one lung slice at random
                lung = _lung_places(vol, rng, 1, [], 0)
                places = [(z, y, x, _class(scan.label, classes)) for z, y, x in lung]
            if scan.label in ("TB", "TM") and negatives:  # untouched lung, away from every labelled place
                neg_cls = "real" if classes == "binary" else "TB"
                taken = [p[:3] for p in places]
                if mode == "slice":
                    neg = _lung_slices(vol, rng, negatives, taken)
                else:
                    neg = _lung_places(vol, rng, negatives, taken, patch)
                places += [(z, y, x, neg_cls) for z, y, x in neg]
            for z, y, x, cls in places:
                img = vol.hu[z] if mode == "slice" else _crop(vol.hu[z], y, x, patch)
                name = f"{_safe(scan.patient)}__{scan.uuid}_e{scan.experiment}_z{z}_y{y}_x{x}.png"
                folder = tmp / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                _to_png(img, tuple(window), bits, folder / name)
                rows.append({"split": split, "class": cls, "file": f"{split}/{cls}/{name}", "patient": scan.patient, "uuid": scan.uuid,
                             "experiment": scan.experiment, "label": scan.label, "z": z, "y": y, "x": x})
        counts = {s: dict(sorted(Counter(r["class"] for r in rows if r["split"] == s).items())) for s in ("train", "val", "test")}
        with open(tmp / "index.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file"])
            w.writeheader()
            w.writerows(rows)
        settings = {"dataset": str(dataset), "mode": mode, "classes": classes, "fractions": list(fractions), "seed": seed,
                    "window": list(window), "patch": patch, "negatives": negatives, "bits": bits, "counts": counts,
                    "patients": {s: sorted({m.patient for m in members}) for s, members in splits.items()}}
        (tmp / "export.json").write_text(json.dumps(settings, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(f"wrote {len(rows)} images to {out}: " + "; ".join(f"{s} {c}" for s, c in counts.items()))
    return counts


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in s) or "unknown"
