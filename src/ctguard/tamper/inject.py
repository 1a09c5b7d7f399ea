"""Inject a nodule the way CT-GAN does: a fake filled into a 1 mm cube, blended so it never darkens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ctguard.errors import InputError
from ctguard.lung import lung_mask
from ctguard.tamper.base import Edit
from ctguard.tamper.cube import Cube, apply_edit, check_inside, correlated_noise, local_noise_std
from ctguard.tamper.nodules import NoduleSpec, extent_mm, render
from ctguard.volume import Volume


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class NoduleInjector:
    """Injects an analytic nodule (see :mod:`ctguard.tamper.nodules`) with CT-GAN's blending.

    ``out = max(fake * f + orig * (1 - f), orig)``, ``f = sigmoid((HU + 700) / 70) * gaussian``,
    then noise matched to the local parenchyma is added over the nodule and the cube is pasted
    back (see :func:`ctguard.tamper.cube.paste`).
    """

    spec: NoduleSpec
    kind: str = "inject"
    lungs: np.ndarray | None = None  # a precomputed lung mask, to skip recomputing it per edit

    def __call__(self, vol: Volume, centre: np.ndarray, rng: np.random.Generator) -> tuple[Volume, Edit]:
        centre = np.asarray(centre, dtype=float)
        check_inside(vol, centre)
        lungs = self.lungs if self.lungs is not None else lung_mask(vol)
        c = tuple(np.clip(np.rint(centre).astype(int), 0, np.asarray(vol.shape) - 1))
        if not lungs[c]:
            raise InputError(f"location {tuple(int(v) for v in c)} (z, y, x) is not inside the lungs")
        reach = extent_mm(self.spec)
        _check_fits(vol, lungs, centre, self.spec.diameter_mm / 2.0, juxta=self.spec.kind == "juxta-pleural")
        blend = reach + 4.0
        half = int(np.ceil(blend)) + 2
        noise_seed = int(rng.integers(2**31))

        def edit(cube: Cube) -> np.ndarray:
            hu_n, alpha = render(self.spec, cube.offsets_mm)
            fake = alpha * hu_n + (1.0 - alpha) * cube.hu
            gauss = np.exp(-(cube.radius_mm**2) / (2.0 * (reach / 1.5) ** 2))
            f = _sigmoid((fake + 700.0) / 70.0) * gauss
            out = np.maximum(fake * f + cube.hu * (1.0 - f), cube.hu)
            # Noise touch-up: the fake is smooth; give it the local parenchyma's grain.
            std = local_noise_std(cube.hu, cube.hu < -800)
            noise = correlated_noise(cube.hu.shape, std, np.random.default_rng(noise_seed))
            touch = ndimage.gaussian_filter(alpha, 1.0)
            return np.maximum(out + noise * touch, cube.hu)

        new = apply_edit(vol, centre, half, blend, edit, brighten_only=True)
        changed = int(np.count_nonzero(new.hu != vol.hu))
        return new, Edit(
            kind="injected",
            voxel=[float(v) for v in centre],
            world_mm=[float(v) for v in vol.voxel_to_world(centre)],
            radius_mm=float(blend),
            diameter_mm=self.spec.diameter_mm,
            nodule_type=self.spec.kind,
            seed=self.spec.seed,
            changed_voxels=changed,
        )


def _check_fits(vol: Volume, lungs: np.ndarray, centre: np.ndarray, radius_mm: float, juxta: bool) -> None:
    """Refuses a nodule that does not fit the site: most of its ball must lie inside the lungs."""
    spacing = np.asarray(vol.spacing)
    r = np.ceil(radius_mm / spacing).astype(int)
    c = np.rint(centre).astype(int)
    lo, hi = c - r, c + r + 1
    if np.any(lo < 0) or np.any(hi > np.asarray(vol.shape)):
        raise InputError(f"a {2 * radius_mm:.0f} mm nodule at {tuple(int(v) for v in c)} (z, y, x) does not fit inside the volume")
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    ball = np.linalg.norm((grid - centre) * spacing, axis=-1) <= radius_mm
    inside = lungs[tuple(slice(a, b) for a, b in zip(lo, hi))][ball].mean()
    need = 0.5 if juxta else 0.9
    if inside < need:
        raise InputError(
            f"a {2 * radius_mm:.0f} mm nodule does not fit the site at {tuple(int(v) for v in c)} (z, y, x): "
            f"only {100 * inside:.0f}% of it would be inside the lung"
        )
