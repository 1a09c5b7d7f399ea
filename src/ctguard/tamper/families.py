"""Edit families beyond the analytic nodule: an attacker is not bound to this project's simulator.

Injection families:
- ``drawn``: an analytic nodule (:class:`ctguard.tamper.inject.NoduleInjector`), CT-GAN's blending;
- ``moved``: one of the scan's own real tumours copied, flipped at random, into healthy lung
  (:class:`MovedTumourInjector`), blended so it never darkens a voxel.

Removal families, each over a real tumour or over a healthy place (parenchyma, a vessel, the pleura;
:func:`healthy_sites`), so that "removed" means "this tissue was in-painted" wherever it is:
- ``fill``: normalised convolution of the surroundings plus shifted texture
  (:class:`ctguard.tamper.remove.LesionRemover`);
- ``clone``: a patch of the scan's own healthy lung from elsewhere pasted over the place, its level
  matched to the surroundings, like a clone stamp (:class:`CloneRemover`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ctguard.errors import InputError
from ctguard.tamper.base import Edit
from ctguard.tamper.cube import Cube, apply_edit, check_inside, cut
from ctguard.tamper.remove import MAX_REMOVAL_MM, LesionRemover, mask_extent_mm
from ctguard.volume import Volume

INJECT_FAMILIES = ("drawn", "moved")
REMOVE_FAMILIES = ("fill", "clone")
HEALTHY_RADII_MM = (4.0, 12.0)  # the in-painted ball's radius on a healthy place
MAX_MOVED_MM = 40.0  # a tumour moved whole reaches at most this far from its centre


def check_families(inject: list[str] | tuple[str, ...], remove: list[str] | tuple[str, ...]) -> None:
    """That every family named is one this module makes, or a one-line error."""
    for name, given, known in (("inject", inject, INJECT_FAMILIES), ("remove", remove, REMOVE_FAMILIES)):
        if not given or any(f not in known for f in given):
            raise InputError(f"{name} families should be a non-empty list from {list(known)}, not {list(given) if given else given!r}")


def healthy_sites(depth: np.ndarray, rng: np.random.Generator, n: int, min_depth_mm: float = 3.0,
                  avoid: list[np.ndarray] | None = None, spacing=(1.0, 1.0, 1.0), apart_mm: float = 30.0) -> list[np.ndarray]:
    """``n`` random places inside the lung at least ``min_depth_mm`` deep: parenchyma, vessels and
    the band near the pleura alike (they are drawn from every lung voxel), ``apart_mm`` from each
    other and from ``avoid``."""
    pts = np.argwhere(depth[:, ::2, ::2] >= min_depth_mm) * np.array([1, 2, 2])
    if not len(pts):
        raise InputError(f"no lung {min_depth_mm:.0f} mm deep to edit")
    taken = [np.asarray(a, float) for a in (avoid or [])]
    out: list[np.ndarray] = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        p = pts[rng.integers(len(pts))].astype(float)
        if all(np.linalg.norm((p - t) * np.asarray(spacing)) >= apart_mm for t in taken):
            out.append(p)
            taken.append(p)
    return out


def ball_mask(shape: tuple[int, ...], spacing, centre: np.ndarray, radius_mm: float) -> np.ndarray:
    """A ball of ``radius_mm`` around ``centre`` on the scan's voxel grid."""
    r = np.ceil(radius_mm / np.asarray(spacing)).astype(int) + 1
    c = np.rint(centre).astype(int)
    lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, shape)
    mask = np.zeros(shape, dtype=bool)
    grid = np.meshgrid(*[(np.arange(a, b) - cc) * s for a, b, cc, s in zip(lo, hi, centre, spacing)], indexing="ij")
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = np.sqrt(sum(g**2 for g in grid)) <= radius_mm
    return mask


@dataclass
class CloneRemover:
    """Erases the region ``mask`` by pasting over it a patch of the scan's own lung cut at ``donor``
    (a voxel of healthy parenchyma elsewhere), shifted to the surrounding parenchyma's level."""

    mask: np.ndarray
    donor: np.ndarray
    kind: str = "remove"

    def __call__(self, vol: Volume, centre: np.ndarray, rng: np.random.Generator) -> tuple[Volume, Edit]:
        centre = np.asarray(centre, dtype=float)
        check_inside(vol, centre)
        extent = mask_extent_mm(self.mask, centre, vol.spacing, "the removal mask")
        if 2 * extent > MAX_REMOVAL_MM:
            raise InputError(f"the region at {tuple(int(v) for v in centre)} (z, y, x) reaches {2 * extent:.0f} mm across; at most {MAX_REMOVAL_MM:.0f} mm can be removed")
        blend = extent + 6.0
        half = int(np.ceil(blend)) + 2
        donor = cut(vol, np.asarray(self.donor, float), half)
        flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))

        def edit(cube: Cube) -> np.ndarray:
            coords = cube.centre[:, None, None, None] + np.moveaxis(cube.offsets_mm, -1, 0) / np.asarray(vol.spacing)[:, None, None, None]
            m = ndimage.map_coordinates(self.mask.astype(np.float32), coords, order=1, mode="constant") > 0.25
            m = ndimage.binary_dilation(m, iterations=2)
            lung = (cube.hu < -600) & ~m
            patch = np.flip(donor.hu, flips) if flips else donor.hu
            donor_lung = patch < -600
            if lung.sum() < 100 or donor_lung.sum() < 100:
                raise InputError(f"no lung parenchyma around {tuple(int(v) for v in centre)} (z, y, x) to clone over it")
            patch = patch + (float(np.median(cube.hu[lung])) - float(np.median(patch[donor_lung])))
            w = np.clip(ndimage.gaussian_filter(m.astype(np.float32), 2.0) * 1.6, 0.0, 1.0)
            return w * patch + (1.0 - w) * cube.hu

        new = apply_edit(vol, centre, half, blend, edit, brighten_only=False)
        return new, Edit(kind="removed", voxel=[float(v) for v in centre], world_mm=[float(v) for v in vol.voxel_to_world(centre)],
                         radius_mm=float(blend), diameter_mm=float(2 * extent), seed=None,
                         changed_voxels=int(np.count_nonzero(new.hu != vol.hu)))


@dataclass
class MovedTumourInjector:
    """Copies a real tumour (its ``mask`` around ``source``, a voxel of the same scan) to another
    place: the tumour's voxels and a soft edge, flipped at random, blended in with
    ``max(tumour * a + orig * (1 - a), orig)`` so that no voxel darkens."""

    mask: np.ndarray
    source: np.ndarray
    kind: str = "inject"

    def __call__(self, vol: Volume, centre: np.ndarray, rng: np.random.Generator) -> tuple[Volume, Edit]:
        centre = np.asarray(centre, dtype=float)
        check_inside(vol, centre)
        src = np.asarray(self.source, float)
        extent = mask_extent_mm(self.mask, src, vol.spacing, "the tumour's mask")
        if extent > MAX_MOVED_MM:
            raise InputError(f"the tumour at {tuple(int(v) for v in src)} (z, y, x) reaches {extent:.0f} mm from its centre; at most {MAX_MOVED_MM:.0f} mm can be moved")
        blend = extent + 4.0
        half = int(np.ceil(blend)) + 2
        donor = cut(vol, src, half)
        coords = src[:, None, None, None] + np.moveaxis(donor.offsets_mm, -1, 0) / np.asarray(vol.spacing)[:, None, None, None]
        alpha = ndimage.gaussian_filter((ndimage.map_coordinates(self.mask.astype(np.float32), coords, order=1) > 0.25).astype(np.float32), 1.0)
        flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
        hu, alpha = (np.flip(donor.hu, flips), np.flip(alpha, flips)) if flips else (donor.hu, alpha)

        def edit(cube: Cube) -> np.ndarray:
            return np.maximum(hu * alpha + cube.hu * (1.0 - alpha), cube.hu)

        new = apply_edit(vol, centre, half, blend, edit, brighten_only=True)
        volume_mm3 = float(self.mask.sum() * np.prod(vol.spacing))
        return new, Edit(kind="injected", voxel=[float(v) for v in centre], world_mm=[float(v) for v in vol.voxel_to_world(centre)],
                         radius_mm=float(blend), diameter_mm=float(2 * (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)), nodule_type="moved",
                         changed_voxels=int(np.count_nonzero(new.hu != vol.hu)),
                         extra={"family": "moved", "from_voxel": [float(v) for v in src]})


def remover(family: str, vol: Volume, mask: np.ndarray, depth: np.ndarray, rng: np.random.Generator, centre: np.ndarray,
            max_radius_mm: float = 35.0):
    """The tamperer of a removal family for ``mask``; a clone's donor is a healthy place 40 mm or
    more from the region."""
    if family == "fill":
        return LesionRemover(mask=mask, max_radius_mm=max_radius_mm)
    spacing = np.asarray(vol.spacing)
    for _ in range(40):
        donor = healthy_sites(depth, rng, 1, min_depth_mm=8.0, spacing=spacing)[0]
        if np.linalg.norm((donor - centre) * spacing) >= 40.0 and vol.hu[tuple(np.rint(donor).astype(int))] < -700:
            return CloneRemover(mask=mask, donor=donor)
    raise InputError("found no healthy lung to clone from")


def remove_healthy(vol: Volume, depth: np.ndarray, rng: np.random.Generator, n: int, family: str,
                   avoid: list[np.ndarray] | None = None) -> tuple[Volume, list[Edit]]:
    """In-paints ``n`` healthy places (balls of 8-24 mm, 30 mm apart) with the removal ``family``."""
    edits: list[Edit] = []
    spacing = np.asarray(vol.spacing)
    taken = list(avoid or [])
    for _ in range(n):
        for _attempt in range(20):
            radius = float(np.round(rng.uniform(*HEALTHY_RADII_MM), 1))
            sites = healthy_sites(depth, rng, 1, min_depth_mm=3.0, avoid=taken, spacing=spacing)
            if not sites:
                continue
            site = sites[0]
            mask = ball_mask(vol.shape, spacing, site, radius)
            try:
                vol, edit = remover(family, vol, mask, depth, rng, site)(vol, site, rng)
            except InputError:
                continue
            edit.nodule_type = f"{family}:healthy"
            edit.extra = {"family": family, "target": "healthy"}
            edits.append(edit)
            taken.append(site)
            break
    if not edits:
        raise InputError(f"found no healthy place to in-paint with {family}")
    return vol, edits


def movable(tumours: list, spacing) -> list:
    """The tumours that can be moved whole: outlined, and reaching at most MAX_MOVED_MM from their centre."""
    return [t for t in tumours if t.mask is not None and t.mask.any() and mask_extent_mm(t.mask, t.voxel, spacing) <= MAX_MOVED_MM]


def inject_moved(vol: Volume, lungs: np.ndarray, depth: np.ndarray, tumours: list, rng: np.random.Generator, n: int,
                 avoid: list[np.ndarray] | None = None) -> tuple[Volume, list[Edit]]:
    """Moves ``n`` copies of the scan's real tumours (chosen at random) to healthy lung, 30 mm apart,
    each at a place deep enough for most of it to lie in the lung."""
    usable = movable(tumours, vol.spacing)
    if not usable:
        raise InputError(f"no real tumour with an outline, at most {2 * MAX_MOVED_MM:.0f} mm across, to move")
    spacing = np.asarray(vol.spacing)
    taken = [np.asarray(a, float) for a in (avoid or [])] + [np.asarray(t.voxel, float) for t in tumours]
    edits: list[Edit] = []
    for _ in range(n):
        for _attempt in range(20):
            t = usable[int(rng.integers(len(usable)))]
            reach = min(t.diameter_mm / 2.0, 20.0)
            sites = healthy_sites(depth, rng, 1, min_depth_mm=0.6 * reach + 2.0, avoid=taken, spacing=spacing)
            if not sites or not lungs[tuple(np.rint(sites[0]).astype(int))]:
                continue
            try:
                vol, edit = MovedTumourInjector(t.mask, t.voxel)(vol, sites[0], rng)
            except InputError:
                continue
            edits.append(edit)
            taken.append(sites[0])
            break
    if not edits:
        raise InputError("found no place to move a tumour to")
    return vol, edits
