"""ImageFolder-style 2D datasets (one sub-folder per class), as the paper used.

Two layouts:

- ``DIR/{train,val,test}/<class>/*`` — already split (``ctguard export-slices`` writes this);
  without ``val/`` the test split doubles as the validation set, as in the paper.
- ``DIR/<class>/*`` — split here, 75/25 train/test, by patient when file names carry one
  (``<patient>__<rest>.png``, as ``export-slices`` names them), stratified by class, seeded.

Images: 8- and 16-bit PNG, JPG, and DICOM slices (windowed, lung window by default).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctguard.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
SPLITS = ("train", "val", "test")
LUNG_WINDOW = (-1000.0, 400.0)


@dataclass(frozen=True)
class Item:
    path: Path
    label: int
    patient: str


@dataclass
class FolderData:
    root: Path
    classes: list[str]
    splits: dict[str, list[Item]]  # train, val, test
    layout: str  # "split" or "flat"

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {c: sum(1 for i in items if i.label == k) for k, c in enumerate(self.classes)} for s, items in self.splits.items()}


def patient_of(path: Path) -> str:
    """The patient id in an exported file name (``<patient>__...``), else the file's stem."""
    stem = path.stem
    return stem.split("__", 1)[0] if "__" in stem else stem


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _images(d)
        if not images:
            raise InputError("class folder has no images (PNG, JPG or DICOM)", d)
        out[d.name] = images
    return out


def split_items(items: list[Item], test_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Splits by patient, stratified by each patient's majority class, seeded."""
    by_patient: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_patient[it.patient].append(it)
    by_class: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(by_patient):
        labels = [i.label for i in by_patient[patient]]
        by_class[max(set(labels), key=labels.count)].append(patient)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in sorted(by_class):
        patients = by_class[cls]
        rng.shuffle(patients)
        n_test = int(round(len(patients) * test_fraction))
        if len(patients) > 1:
            n_test = min(max(n_test, 1), len(patients) - 1)
        for k, p in enumerate(patients):
            (test if k < n_test else train).extend(by_patient[p])
    return train, test


def scan_folder(root: str | Path, test_fraction: float = 0.25, seed: int = 0, classes: list[str] | None = None) -> FolderData:
    """Finds the classes and splits of an ImageFolder-style dataset.

    Raises:
        InputError: no such folder, fewer than two classes, an empty class folder, or a split's
        classes that the training split does not have.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("is not a folder of class sub-folders", root)
    if (root / "train").is_dir():
        per_split = {s: _class_folders(root / s) for s in SPLITS if (root / s).is_dir()}
        if "test" not in per_split and "val" not in per_split:
            raise InputError("has train/ but neither test/ nor val/", root)
        names = classes or sorted(per_split["train"])
        for s, found in per_split.items():
            extra = set(found) - set(names)
            if extra:
                raise InputError(f"{s}/ has classes the model does not know: {sorted(extra)}", root / s)
        if len(names) < 2:
            raise InputError(f"needs at least two classes, found {names}", root / "train")
        splits = {s: [Item(p, names.index(c), patient_of(p)) for c, ps in found.items() for p in ps] for s, found in per_split.items()}
        splits.setdefault("val", splits.get("test"))
        splits.setdefault("test", splits["val"])
        layout = "split"
    else:
        found = _class_folders(root)
        names = classes or sorted(found)
        if len(found) < 2:
            raise InputError(f"needs at least two class sub-folders, found {sorted(found)}", root)
        items = [Item(p, names.index(c), patient_of(p)) for c, ps in found.items() for p in ps]
        train, test = split_items(items, test_fraction, seed)
        splits = {"train": train, "val": test, "test": test}
        layout = "flat"
    if not splits["train"]:
        raise InputError("the training split is empty", root)
    return FolderData(root, list(names), splits, layout)


def read_gray01(path: str | Path, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """One image as float32 in [0, 1]: 8-bit / 255, 16-bit / 65535, DICOM in HU through ``window``.

    Raises:
        InputError: unreadable or not an image.
    """
    from ctguard import io

    path = Path(path)
    kind = io.sniff(path)
    if kind == "image":
        a = io.read_image(path)
        scale = 255.0 if a.dtype == np.uint8 else 65535.0
        return np.clip(a.astype(np.float32) / scale, 0.0, 1.0)
    if kind == "dicom-file":
        vol = io.read_dicom_file(path)
        if vol.shape[0] != 1:
            raise InputError(f"is a multi-frame DICOM ({vol.shape[0]} frames); give one slice", path)
        lo, hi = window
        return np.clip((vol.hu[0] - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    raise InputError(f"is {kind}, not a 2D image or DICOM slice", path)


def load_images(items: list[Item], size: int, window=LUNG_WINDOW, progress: bool = False) -> np.ndarray:
    """Reads and resizes every item to ``size`` x ``size``; uint8 array ``(n, size, size)``."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    out = np.empty((len(items), size, size), np.uint8)
    for k, it in enumerate(tqdm(items, desc="load images", disable=not progress, leave=False)):
        a = torch.from_numpy(read_gray01(it.path, window))[None, None]
        if a.shape[-2:] != (size, size):
            a = F.interpolate(a, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[k] = np.rint(a[0, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
    return out
