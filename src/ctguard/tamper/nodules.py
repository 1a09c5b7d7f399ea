"""Lung nodule shapes and densities, rendered analytically on any grid (mm coordinates).

Used by the phantom (genuine nodules) and by the injector (fake ones), so a nodule's look does
not by itself tell a genuine one from an injected one: a detector must find the edit's traces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

NODULE_TYPES = ("solid", "part-solid", "ground-glass", "spiculated", "lobulated", "juxta-pleural")
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 4.0, 30.0


@dataclass(frozen=True)
class NoduleSpec:
    """What to draw: type, diameter (mm) and the seed of its random shape and texture."""

    kind: str = "solid"
    diameter_mm: float = 10.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in NODULE_TYPES:
            raise ValueError(f"unknown nodule type {self.kind!r}; choose from {', '.join(NODULE_TYPES)}")
        if not MIN_DIAMETER_MM <= self.diameter_mm <= MAX_DIAMETER_MM:
            raise ValueError(f"nodule diameter {self.diameter_mm} mm is outside {MIN_DIAMETER_MM}-{MAX_DIAMETER_MM} mm")


def _soft(distance_inside: np.ndarray, softness_mm: float) -> np.ndarray:
    """0..1 membership from a signed distance (positive inside), with a smooth margin."""
    return 1.0 / (1.0 + np.exp(-distance_inside / max(softness_mm, 1e-3)))


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from points ``p`` (..., 3) to segment a-b, and the position t in [0, 1] along it."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    nearest = a + t[..., None] * ab
    return np.linalg.norm(p - nearest, axis=-1), t


def render(spec: NoduleSpec, offsets_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draws a nodule centred at the origin of ``offsets_mm``.

    Args:
        spec: the nodule.
        offsets_mm: grid positions relative to the centre, shape ``(..., 3)`` in ``(z, y, x)`` mm.

    Returns:
        ``(hu, alpha)``: the nodule's own density at each point and its opacity (0..1). Paste with
        ``alpha * hu + (1 - alpha) * background``.
    """
    rng = np.random.default_rng(spec.seed)
    radius = spec.diameter_mm / 2.0
    dist = np.linalg.norm(offsets_mm, axis=-1)
    unit = offsets_mm / np.maximum(dist, 1e-6)[..., None]
    # Irregular outline: a sum of a few random low-order lobes modulates the radius.
    lobes = _unit_vectors(rng, 6)
    bumps = rng.uniform(0.02, 0.08, size=6)
    wobble = (np.maximum(unit @ lobes.T, 0.0) ** 3 * bumps).sum(-1)
    solid_hu = rng.uniform(15.0, 60.0)
    softness = 0.45
    kind = spec.kind
    if kind in ("solid", "juxta-pleural"):
        alpha = _soft(radius * (1.0 + wobble) - dist, softness)
        hu = np.full(dist.shape, solid_hu, dtype=np.float32)
    elif kind == "lobulated":
        alpha = _soft(radius * 0.72 * (1.0 + wobble) - dist, softness)
        for centre in _unit_vectors(rng, int(rng.integers(3, 6))) * radius * 0.42:
            sub = np.linalg.norm(offsets_mm - centre, axis=-1)
            alpha = np.maximum(alpha, _soft(radius * rng.uniform(0.45, 0.6) - sub, softness))
        hu = np.full(dist.shape, solid_hu, dtype=np.float32)
    elif kind == "spiculated":
        alpha = _soft(radius * 0.8 * (1.0 + wobble) - dist, softness)
        for direction in _unit_vectors(rng, int(rng.integers(8, 18))):
            tip = direction * radius * rng.uniform(1.25, 1.9)
            d, t = _segment_distance(offsets_mm, np.zeros(3), tip)
            width = 1.1 * (1.0 - t) + 0.25  # spicules taper towards their tips
            alpha = np.maximum(alpha, 0.85 * _soft(width - d, 0.3))
        hu = np.full(dist.shape, solid_hu, dtype=np.float32)
    elif kind == "ground-glass":
        alpha = _soft(radius * (1.0 + wobble) - dist, 1.2)
        hu = np.full(dist.shape, rng.uniform(-650.0, -450.0), dtype=np.float32)
    else:  # part-solid: a ground-glass halo around a solid core
        halo = _soft(radius * (1.0 + wobble) - dist, 1.0)
        core = _soft(radius * rng.uniform(0.35, 0.55) - dist, softness)
        ggo_hu = rng.uniform(-620.0, -450.0)
        hu = (ggo_hu + (solid_hu - ggo_hu) * core).astype(np.float32)
        alpha = np.maximum(halo, core)
    # Internal texture: a smooth random field, like a real lesion's heterogeneity.
    texture = rng.normal(size=dist.shape)
    if texture.ndim == 3:
        texture = ndimage.gaussian_filter(texture, 1.0) * 3.0
    hu = hu + (18.0 if kind not in ("ground-glass", "part-solid") else 35.0) * texture
    return hu.astype(np.float32), alpha.astype(np.float32)


def extent_mm(spec: NoduleSpec) -> float:
    """Radius (mm) beyond which a nodule of this spec is transparent."""
    reach = 1.9 if spec.kind == "spiculated" else 1.25
    return spec.diameter_mm / 2.0 * reach + 2.0


def offsets_grid(shape: tuple[int, int, int], centre_index: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """``(z, y, x)`` mm offsets of every voxel of a grid from a (fractional) centre index."""
    axes = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre_index, spacing)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.stack([zz, yy, xx], axis=-1)
