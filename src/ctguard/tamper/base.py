"""The tamperer interface: a seeded edit of one place in a scan.

A learned (GAN) injector or remover only has to implement :class:`Tamperer`: take a scan, a place
and a random generator, return the edited scan and an :class:`Edit` record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from ctguard.volume import Volume


@dataclass
class Edit:
    """What one edit did (recorded in the simulator's manifest)."""

    kind: str  # "injected" | "removed"
    voxel: list[float]  # (z, y, x)
    world_mm: list[float]  # LPS (x, y, z)
    radius_mm: float  # the blending radius: no voxel farther than this changed
    diameter_mm: float  # the nodule's (injected) or the erased region's (removed) size
    nodule_type: str | None = None
    seed: int | None = None
    changed_voxels: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Tamperer(Protocol):
    """Anything that edits one place of a scan, deterministically given ``rng``."""

    kind: str

    def __call__(self, vol: Volume, centre: np.ndarray, rng: np.random.Generator) -> tuple[Volume, Edit]: ...
