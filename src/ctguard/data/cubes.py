"""Training cubes for the 3D detector: 1 mm cubes around edits, real tumours and plain lung.

Each cube comes with a dense target at the detector's stride: a cell is ``injected`` or
``removed`` when its centre lies within the edit's nodule radius (at least ``min_radius``,
:data:`MIN_TARGET_RADIUS_MM` by default) of an edit's centre, else ``genuine``. An edit centred
where eight cells meet is 6.93 mm from each of their centres, so only a ``min_radius`` of 7 mm or
more gives every edit a cell. Real untouched tumours and vessels are sampled on purpose as hard
negatives: a detector that flags every dense blob is useless.
"""

from __future__ import annotations

import numpy as np

from ctguard.lung import lung_mask
from ctguard.models.grid import CLASSES, STRIDE
from ctguard.tamper.cube import cut
from ctguard.tamper.simulate import Source, variants
from ctguard.volume import Volume

MIN_TARGET_RADIUS_MM = 6.0  # what v0.1-v0.6 were trained with; configs set 7 with target_min_radius


def cell_targets(cube_centre: np.ndarray, size: int, spacing: np.ndarray, edits: list[dict],
                 min_radius: float = MIN_TARGET_RADIUS_MM) -> np.ndarray:
    """The class of each output cell of a cube (``size`` mm wide) centred at ``cube_centre``."""
    n = size // STRIDE
    offs = (np.arange(n) * STRIDE + STRIDE / 2 - size / 2)  # cell centres in mm from the cube centre
    zz, yy, xx = np.meshgrid(offs, offs, offs, indexing="ij")
    target = np.zeros((n, n, n), dtype=np.int64)
    for e in edits:
        d_mm = (np.asarray(e["voxel"]) - cube_centre) * spacing
        r = max(e["diameter_mm"] / 2.0, min_radius)
        if e["kind"] == "removed":
            r = min(r, 20.0)
        dist = np.sqrt((zz - d_mm[0]) ** 2 + (yy - d_mm[1]) ** 2 + (xx - d_mm[2]) ** 2)
        target[dist <= r] = CLASSES.index(e["kind"])
    return target


def sample_cubes(vol: Volume, edits: list[dict], tumours: list[np.ndarray], lungs: np.ndarray,
                 rng: np.random.Generator, size: int = 64, n_random: int = 12, n_per_edit: int = 4,
                 min_radius: float = MIN_TARGET_RADIUS_MM):
    """Cubes from one scan: around each edit (jittered), around real tumours, and random lung."""
    spacing = np.asarray(vol.spacing)
    centres = []
    for e in edits:
        for _ in range(n_per_edit):
            centres.append(np.asarray(e["voxel"]) + rng.uniform(-14, 14, 3) / spacing)
    for t in tumours:
        for _ in range(2):
            centres.append(np.asarray(t) + rng.uniform(-10, 10, 3) / spacing)
    lung_pts = np.argwhere(lungs[:, ::4, ::4]) * np.array([1, 4, 4])
    if len(lung_pts):
        for i in rng.integers(len(lung_pts), size=n_random):
            centres.append(lung_pts[i].astype(float))
    xs, ys = [], []
    half = size // 2
    for c in centres:
        c = np.clip(c, 0, np.asarray(vol.shape) - 1)
        cube = cut(vol, c, half)
        xs.append(cube.hu[:size, :size, :size])
        ys.append(cell_targets(c - 0.5 / spacing, size, spacing, edits, min_radius))
    return xs, ys


def cubes_from_source(src: Source, seed: int, inject: int = 2, remove: int = 1, per_scan: int = 3,
                      size: int = 64, min_radius: float = MIN_TARGET_RADIUS_MM, families: dict | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Simulates edits on a source (in memory) and samples training cubes from every variant;
    ``families``: :func:`ctguard.tamper.simulate.variants`' family arguments."""
    rng = np.random.default_rng([seed, 5])
    lungs = lung_mask(src.volume)
    xs, ys = [], []
    tumours = [t.voxel for t in src.tumours]
    for label, vol, edits in variants(src, seed, inject, remove, per_scan, **(families or {})):
        e = [x.to_dict() for x in edits]
        # In a removal copy, the erased tumour is no longer a genuine one.
        kept = [t for t in tumours if not any(np.allclose(t, d["voxel"]) for d in e)]
        cx, cy = sample_cubes(vol, e, kept, lungs, rng, size=size, min_radius=min_radius)
        xs += cx
        ys += cy
    return xs, ys
