"""Patient-level splits: a patient's scans (all experiments) always land on one side."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from ctguard.data.ctgan import Scan


def _groups(scans: Sequence[Scan]) -> dict[str, list[Scan]]:
    groups: dict[str, list[Scan]] = defaultdict(list)
    for s in scans:
        groups[s.patient or s.uuid].append(s)
    return groups


def _group_class(members: list[Scan]) -> str:
    # Stratify on the most "tampered" class a patient has: FM > FB > TM > TB.
    order = {"FM": 0, "FB": 1, "TM": 2, "TB": 3}
    return min((m.label for m in members), key=order.__getitem__)


def split_by_patient(
    scans: Sequence[Scan], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
    names: Sequence[str] = ("train", "val", "test"),
) -> dict[str, list[Scan]]:
    """Splits scans by patient, stratified by class, seeded.

    Each class's patients are shuffled and dealt to the splits by the fractions (largest
    remainder rounding), so every split gets its share of every class when there are enough.

    Returns:
        ``{name: scans}``; no patient appears in two splits.
    """
    if len(fractions) != len(names) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError("fractions must sum to 1 and match the split names")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = defaultdict(list)
    groups = _groups(scans)
    for patient in sorted(groups):
        by_class[_group_class(groups[patient])].append(patient)
    out: dict[str, list[Scan]] = {n: [] for n in names}
    for cls in sorted(by_class):
        patients = by_class[cls]
        rng.shuffle(patients)
        raw = np.asarray(fractions) * len(patients)
        counts = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - counts))[: len(patients) - counts.sum()]:
            counts[i] += 1
        start = 0
        for name, n in zip(names, counts):
            for p in patients[start : start + n]:
                out[name].extend(groups[p])
            start += n
    return out


def kfold_by_patient(scans: Sequence[Scan], k: int = 5, seed: int = 0) -> list[tuple[list[Scan], list[Scan]]]:
    """k patient-level folds, stratified by class: ``[(train, test), ...]``."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = _groups(scans)
    patients = sorted(groups)
    labels = [_group_class(groups[p]) for p in patients]
    folds = []
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for train_idx, test_idx in splitter.split(np.zeros(len(patients)), labels, groups=patients):
        folds.append(([s for i in train_idx for s in groups[patients[i]]], [s for i in test_idx for s in groups[patients[i]]]))
    return folds
