"""CT-GAN's cube mechanics: cut a cube around a target, resample it to 1 mm, edit, paste back.

The edit happens on a 1 mm isotropic grid centred on the target (as CT-GAN does); the result is
resampled back onto the scan's own voxels and blended in with a weight that is exactly zero
beyond the blending radius, so no voxel outside it changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from ctguard.errors import InputError
from ctguard.volume import Volume


@dataclass
class Cube:
    """A 1 mm isotropic cube cut around ``centre`` (fractional voxel index of the scan)."""

    hu: np.ndarray  # (n, n, n) at 1 mm
    offsets_mm: np.ndarray  # (n, n, n, 3): (z, y, x) mm from the centre
    centre: np.ndarray
    half_mm: int

    @property
    def radius_mm(self) -> np.ndarray:
        return np.linalg.norm(self.offsets_mm, axis=-1)


def check_inside(vol: Volume, centre: np.ndarray) -> None:
    if np.any(centre < 0) or np.any(centre > np.asarray(vol.shape) - 1):
        raise InputError(f"location {tuple(np.round(centre, 1))} (z, y, x) is outside the volume {vol.shape}")


def cut(vol: Volume, centre: np.ndarray, half_mm: int) -> Cube:
    """Samples a ``(2 * half_mm + 1)``-mm cube at 1 mm around ``centre`` (trilinear, edges clamped)."""
    axis = np.arange(-half_mm, half_mm + 1, dtype=float)
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    offsets = np.stack([zz, yy, xx], axis=-1)
    coords = centre[:, None, None, None] + np.moveaxis(offsets, -1, 0) / np.asarray(vol.spacing)[:, None, None, None]
    hu = ndimage.map_coordinates(vol.hu, coords, order=1, mode="nearest").astype(np.float32)
    return Cube(hu, offsets, np.asarray(centre, float), half_mm)


def paste(vol: Volume, cube: Cube, edited: np.ndarray, blend_radius_mm: float, brighten_only: bool = False) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Resamples an edited cube back onto the scan's voxels and blends it in.

    The weight is 1 up to 60% of ``blend_radius_mm`` and falls with a cosine to exactly 0 at
    it. With ``brighten_only`` (injection) the result is ``max(blended, original)``.

    Returns:
        ``(new_box_voxels, box)``: the new HU of the scan's sub-box and its slices.
    """
    spacing = np.asarray(vol.spacing)
    reach = np.ceil(blend_radius_mm / spacing).astype(int) + 1
    c = np.floor(cube.centre).astype(int)
    lo = np.maximum(c - reach, 0)
    hi = np.minimum(c + reach + 2, vol.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), 0).astype(float)
    mm = (idx - cube.centre[:, None, None, None]) * spacing[:, None, None, None]
    dist = np.sqrt((mm**2).sum(0))
    inner = 0.6 * blend_radius_mm
    weight = np.clip((blend_radius_mm - dist) / max(blend_radius_mm - inner, 1e-6), 0.0, 1.0)
    weight = 0.5 - 0.5 * np.cos(np.pi * weight)
    weight[dist >= blend_radius_mm] = 0.0
    back = ndimage.map_coordinates(edited, mm + cube.half_mm, order=1, mode="nearest")
    orig = vol.hu[box]
    new = weight * back + (1.0 - weight) * orig
    if brighten_only:
        new = np.maximum(new, orig)
    new = np.where(weight > 0, np.rint(new), orig)  # stored HU are integers; untouched voxels stay exact
    return new.astype(np.float32), box


def local_noise_std(cube: np.ndarray, where: np.ndarray) -> float:
    """Noise level (HU) of a region: std of the high-pass residual over ``where``."""
    residual = cube - ndimage.gaussian_filter(cube, 1.5)
    vals = residual[where]
    return float(vals.std()) if vals.size > 50 else 15.0


def correlated_noise(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.7)
    return n * (std / max(float(n.std()), 1e-6))


def apply_edit(vol: Volume, centre: np.ndarray, half_mm: int, blend_radius_mm: float,
               edit: Callable[[Cube], np.ndarray], brighten_only: bool) -> Volume:
    """Cuts, edits (at 1 mm) and pastes; returns a new Volume, the input untouched."""
    check_inside(vol, centre)
    cube = cut(vol, centre, half_mm)
    edited = edit(cube)
    new, box = paste(vol, cube, edited, blend_radius_mm, brighten_only)
    hu = vol.hu.copy()
    hu[box] = new
    return vol.with_hu(hu)
