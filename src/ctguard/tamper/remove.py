"""Remove a nodule or tumour: fill it with lung parenchyma that continues the surroundings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ctguard.errors import InputError
from ctguard.tamper.base import Edit
from ctguard.tamper.cube import Cube, apply_edit, check_inside, correlated_noise, local_noise_std
from ctguard.volume import Volume

MAX_REMOVAL_MM = 120.0  # real masses reach 10 cm; the cube grows with the lesion


def grow_lesion(vol: Volume, centre: np.ndarray, max_radius_mm: float = 35.0, threshold: float = -500.0) -> np.ndarray:
    """The lesion at ``centre``: voxels denser than ``threshold`` connected to it, within a ball.

    Raises:
        InputError: the centre is not on a dense lesion.
    """
    spacing = np.asarray(vol.spacing)
    c = np.rint(centre).astype(int)
    r = np.ceil(max_radius_mm / spacing).astype(int)
    lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, vol.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    ball = np.linalg.norm((grid - centre) * spacing, axis=-1) <= max_radius_mm
    dense = (ndimage.median_filter(vol.hu[box], size=3) > threshold) & ball
    # An opening of about 2.5 mm detaches the lesion from the vessels that touch it.
    radius = np.maximum(np.rint(2.5 / spacing).astype(int), 1)
    opener = np.ones(tuple(2 * radius + 1), dtype=bool)
    opened = ndimage.binary_opening(dense, structure=opener)
    if opened[tuple(np.clip(c - lo, 0, np.asarray(dense.shape) - 1))]:
        dense = opened
    labels, _ = ndimage.label(dense)
    # The lesion is the dense component nearest to the centre (within 3 mm).
    near = labels[tuple(np.clip(c - lo, 0, np.asarray(labels.shape) - 1))]
    if near == 0:
        dist = ndimage.distance_transform_edt(labels == 0, sampling=spacing)
        if dist[tuple(c - lo)] > 3.0:
            raise InputError(f"no nodule or tumour at {tuple(int(v) for v in c)} (z, y, x): nothing denser than {threshold:.0f} HU there")
        _, idx = ndimage.distance_transform_edt(labels == 0, sampling=spacing, return_indices=True)
        near = labels[tuple(idx[:, *(c - lo)])]
    mask = np.zeros(vol.shape, dtype=bool)
    mask[box] = labels == near
    return mask


def mask_extent_mm(mask: np.ndarray, centre: np.ndarray, spacing, what: str = "the mask") -> float:
    """How far (mm) the mask reaches from ``centre``, plus 1 mm for the voxel's own half-width and rounding.

    Raises:
        InputError: the mask is empty.
    """
    pts = np.argwhere(mask)
    if not len(pts):
        raise InputError(f"{what} is empty")
    return float(np.max(np.linalg.norm((pts - np.asarray(centre, float)) * np.asarray(spacing), axis=1))) + 1.0


@dataclass
class LesionRemover:
    """Erases the lesion in ``mask`` (or grown from the centre) with CT-GAN-style Gaussian blending.

    The hole is filled by normalised convolution of the surrounding parenchyma (so density
    gradients continue) plus texture copied from the cube's own lung, at its noise level.
    """

    mask: np.ndarray | None = None
    max_radius_mm: float = 35.0
    kind: str = "remove"

    def __call__(self, vol: Volume, centre: np.ndarray, rng: np.random.Generator) -> tuple[Volume, Edit]:
        centre = np.asarray(centre, dtype=float)
        check_inside(vol, centre)
        if self.mask is not None and self.mask.shape != vol.shape:
            raise InputError(f"the removal mask has shape {self.mask.shape}, the scan {vol.shape}")
        mask = self.mask if self.mask is not None else grow_lesion(vol, centre, self.max_radius_mm)
        extent = mask_extent_mm(mask, centre, vol.spacing, "the removal mask")
        if 2 * extent > MAX_REMOVAL_MM:
            raise InputError(f"the lesion at {tuple(int(v) for v in centre)} (z, y, x) reaches {2 * extent:.0f} mm across; at most {MAX_REMOVAL_MM:.0f} mm can be removed")
        blend = extent + 6.0
        half = int(np.ceil(blend)) + 2
        texture_seed = int(rng.integers(2**31))

        def edit(cube: Cube) -> np.ndarray:
            coords = cube.centre[:, None, None, None] + np.moveaxis(cube.offsets_mm, -1, 0) / np.asarray(vol.spacing)[:, None, None, None]
            m = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant") > 0.25
            m = ndimage.binary_dilation(m, iterations=2)
            lung = (cube.hu < -600) & ~m
            if lung.sum() < 100:
                raise InputError(f"no lung parenchyma around the lesion at {tuple(int(v) for v in centre)} (z, y, x) to fill it with")
            # Normalised convolution: a smooth estimate of the parenchyma density across the hole.
            bg = np.full(cube.hu.shape, float(np.median(cube.hu[lung])), np.float32)
            for sigma in (12.0, 6.0, 3.0):
                num = ndimage.gaussian_filter(np.where(lung, cube.hu, 0.0), sigma)
                den = ndimage.gaussian_filter(lung.astype(np.float32), sigma)
                bg = np.where(den > 0.05, num / np.maximum(den, 1e-6), bg)
            # Texture: the high-pass residual of the cube's own parenchyma, shifted into the hole.
            t_rng = np.random.default_rng(texture_seed)
            residual = cube.hu - ndimage.gaussian_filter(cube.hu, 1.5)
            shift = tuple(int(v) for v in t_rng.integers(-cube.half_mm, cube.half_mm, size=3))
            texture = np.roll(residual, shift, axis=(0, 1, 2))
            donor_ok = np.roll(lung, shift, axis=(0, 1, 2))
            std = local_noise_std(cube.hu, lung)
            texture = np.where(donor_ok, texture, correlated_noise(cube.hu.shape, std, t_rng))
            filled = bg + texture
            w = np.clip(ndimage.gaussian_filter(m.astype(np.float32), 2.0) * 1.6, 0.0, 1.0)
            return w * filled + (1.0 - w) * cube.hu

        new = apply_edit(vol, centre, half, blend, edit, brighten_only=False)
        return new, Edit(
            kind="removed",
            voxel=[float(v) for v in centre],
            world_mm=[float(v) for v in vol.voxel_to_world(centre)],
            radius_mm=float(blend),
            diameter_mm=float(2 * extent),
            seed=texture_seed,
            changed_voxels=int(np.count_nonzero(new.hu != vol.hu)),
        )
