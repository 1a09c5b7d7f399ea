"""The second stage: a place's texture at the scan's own voxels, measured against the scan's own noise.

The network sees every scan resampled to 1 mm, which blurs the very noise texture that blending and
in-painting disturb. The second stage looks again at each candidate place on the scan's own grid:
radial profiles around the place (HU level and spread, in-plane and through-plane high-pass
residual, gradient, dense fraction), each residual as a log ratio to the scan's own noise in its
parenchyma, so that a sharp and a smooth kernel, or two vendors, read alike.

The network's cells are 8 mm wide, so its candidate often sits several millimetres off the edit,
where the profiles no longer describe it. A stage fitted with ``recentre`` therefore also reads the
profiles at two places near each candidate found on the image itself (:func:`recentred`: the
densest point, where an injected nodule's core would be, and the point of weakest fine texture,
where an in-painting would be), and how far they are, in the same row.

A stage fitted with ``resampling`` also reads each place's resampling trace
(:func:`resampling_trace`): CT-GAN, and this project's simulator, edit a cube resampled to 1 mm and
paste it back by interpolation, and linear interpolation from one grid onto another leaves the
noise's variance rising and falling with the voxel's fractional position on the other grid, a
ripple at a frequency set by the scan's own pixel spacing that no untouched place has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ctguard.errors import InputError
from ctguard.volume import Volume

BINS_MM = (0.0, 3.0, 6.0, 9.0, 12.0, 16.0, 20.0, 24.0)  # radial shells around a place
REACH_MM = BINS_MM[-1]
PER_BIN = ("hu_mean", "hu_std", "res_xy", "res_z", "grad", "dense")
RECENTRE_MM = 10.0  # how far from a candidate :func:`recentred` looks
SCAN_COLUMNS = ("log_slice_mm", "log_pixel_mm", "log_noise_xy", "log_noise_z")  # the same at every place of a scan
TRACE_RADII_MM = (5.0, 8.0, 12.0)  # the half-widths of the squares :func:`resampling_trace` reads
TRACE_CLIP = 6.0  # residuals clipped at this many times the scan's in-plane noise (edges of vessels weigh no more than noise)
TRACE_MIN_FREQUENCY = 0.04  # cycles a voxel: a pixel spacing this close to a whole number of mm leaves no ripple to read
SHAPE_SCALES_MM = (1.5, 3.0)  # the Gaussian scales (mm) of :func:`shape_features`' Hessians: a 5-12 mm nodule's
SHAPE_REACH = 3.0  # each Hessian's Gaussian is read out to this many of its sigmas


def feature_names(recentre: bool = False, resampling: bool = False, trace_recentre: bool = False, trace_scan: bool = False,
                  shape: bool = False) -> list[str]:
    """The names of :func:`place_features`' columns, in order (with ``resampling``, then those of
    :func:`resampling_trace`, and with ``trace_scan`` the same less the scan's own, :func:`scan_trace`;
    with ``shape``, then those of :func:`shape_features`); with ``recentre`` those of
    :func:`features_at`'s wider rows (with ``trace_recentre``, wider by a third place, :func:`trace_peak`)."""
    names = [f"{what}_{int(a)}_{int(b)}" for a, b in zip(BINS_MM[:-1], BINS_MM[1:]) for what in PER_BIN]
    names += list(SCAN_COLUMNS)
    inner, rim, outer = f"0-{int(BINS_MM[3])}", f"{int(BINS_MM[3])}-{int(BINS_MM[5])}", f"{int(BINS_MM[5])}-{int(BINS_MM[-1])}"
    names += [f"{what}_{a}_vs_{outer}" for a in (inner, rim) for what in PER_BIN]
    if resampling:
        names += [f"resampling_trace_{int(r)}" for r in TRACE_RADII_MM]
        if trace_scan:
            names += [f"resampling_trace_{int(r)}_vs_scan" for r in TRACE_RADII_MM]
    if shape:
        names += [f"hessian_{s:g}mm_{k}" for s in SHAPE_SCALES_MM for k in (1, 2, 3)]
    if recentre:
        own = [n for n in names if n not in SCAN_COLUMNS]
        at = ("dense", "smooth", "trace") if trace_recentre else ("dense", "smooth")
        names += [f"{n}@{a}" for a in at for n in own] + [f"{a}_offset_mm" for a in at]
    return names


def neighbourhood(vol: Volume, place: np.ndarray, radius_mm: float,
                  margin: int = 0) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """The box of voxels around ``place`` (voxel ``(z, y, x)``) that holds a ball of ``radius_mm``
    (and ``margin`` voxels more each way), the ball's mask in that box and every voxel's distance
    (mm) from the place."""
    spacing = np.asarray(vol.spacing, float)
    r = np.ceil(radius_mm / spacing).astype(int) + margin
    c = np.rint(np.asarray(place, float)).astype(int)
    lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, vol.shape)
    axes = [(np.arange(a, b) - p) * s for a, b, p, s in zip(lo, hi, place, spacing)]
    dist = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), dist <= radius_mm, dist


def recentred(vol: Volume, place: np.ndarray, radius_mm: float = RECENTRE_MM) -> np.ndarray:
    """``(2, 3)`` two voxels within ``radius_mm`` of ``place`` on the scan's own grid: the densest
    point (HU smoothed over 2.5 mm) and the point of weakest in-plane fine texture (the absolute
    high-pass residual smoothed over 3 mm)."""
    spacing = np.asarray(vol.spacing, float)
    box, ball, _ = neighbourhood(vol, place, radius_mm)
    hu = vol.hu[box].astype(np.float32)
    dense = ndimage.gaussian_filter(hu, 2.5 / spacing, mode="nearest")
    smooth = -ndimage.gaussian_filter(np.abs(hu - ndimage.gaussian_filter(hu, (0.0, 1.0, 1.0), mode="nearest")), 3.0 / spacing,
                                      mode="nearest")
    lo = np.array([b.start for b in box])
    out = []
    for m in (dense, smooth):
        m[~ball] = -np.inf
        out.append(lo + np.array(np.unravel_index(int(np.argmax(m)), m.shape)))
    return np.asarray(out, float)


def with_recentred(vol: Volume, places: np.ndarray, threads: int = 1, trace_noise: float | None = None) -> np.ndarray:
    """``(n * 3, 3)``: each place followed by its two :func:`recentred` places; with ``trace_noise``
    (the scan's in-plane noise) ``(n * 4, 3)``, each then followed by its :func:`trace_peak`."""
    places = np.asarray(places, float).reshape(-1, 3)
    if not len(places):
        return places
    if trace_noise is None:
        near = _map(lambda p: recentred(vol, p), places, threads)
    else:
        near = _map(lambda p: np.vstack([recentred(vol, p), trace_peak(vol, p, trace_noise)[None]]), places, threads)
    return np.concatenate([np.vstack([p[None], r]) for p, r in zip(places, near)])


def _map(fn, items, threads: int) -> list:
    """``[fn(x) for x in items]``, over ``threads`` threads (the filters, sorts and medians here run
    outside the GIL for much of their time)."""
    if threads > 1 and len(items) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(fn, items))
    return [fn(x) for x in items]


def _smooth_xy(hu: np.ndarray) -> np.ndarray:
    """``hu`` (z, y, x) smoothed in-plane by a Gaussian of one voxel: what the in-plane residual subtracts."""
    return ndimage.gaussian_filter(hu, (0.0, 1.0, 1.0), mode="nearest")


def _smooth_z(hu: np.ndarray) -> np.ndarray:
    """``hu`` (z, y, x) smoothed through-plane by a Gaussian of one slice: what the through-plane residual subtracts."""
    return ndimage.gaussian_filter1d(hu, 1.0, axis=0, mode="nearest")


def _residuals(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-plane and through-plane high-pass residuals (a Gaussian of one voxel subtracted)."""
    return hu - _smooth_xy(hu), hu - _smooth_z(hu) if hu.shape[0] > 2 else np.zeros_like(hu)


def lung_extent(lungs: np.ndarray) -> list[np.ndarray]:
    """The slices, rows and columns where the lungs are (each axis's indices, ascending), from
    per-axis projections (``argwhere`` on a whole scan's mask costs a second): the lungs' box."""
    return [np.flatnonzero(lungs.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]


def scan_noise(vol: Volume, lungs: np.ndarray, slices: int = 12, extent: list[np.ndarray] | None = None) -> tuple[float, float]:
    """The scan's own noise: median absolute in-plane and through-plane residual over parenchyma
    (lung voxels below -600 HU) of ``slices`` evenly spaced slabs of three slices. ``extent``: the
    lungs' :func:`lung_extent`, where the caller has it."""
    zs, ys, xs = lung_extent(lungs) if extent is None else extent
    if len(zs) < 3:
        return 1.0, 1.0
    picks = np.unique(np.linspace(zs[1], zs[-2], slices).astype(int))
    # The lungs' in-plane box and a margin wider than the Gaussian's reach (4 sigma): the residual of
    # every lung voxel is the one the whole slice gives.
    box = (slice(max(ys[0] - 6, 0), ys[-1] + 7), slice(max(xs[0] - 6, 0), xs[-1] + 7))
    xy, z = [], []
    for k in picks:
        # The slab's middle slice only: its through-plane residual sees both neighbours (the
        # in-plane one, slice by slice, is that of the middle slice alone).
        slab = vol.hu[k - 1 : k + 2, box[0], box[1]].astype(np.float32)
        where = lungs[k, box[0], box[1]] & (slab[1] < -600)
        if where.any():
            r_xy = slab[1] - _smooth_xy(slab[1:2])[0]
            r_z = slab[1] - _smooth_z(slab)[1]
            xy.append(np.abs(r_xy[where]))
            z.append(np.abs(r_z[where]))
    if not xy:
        return 1.0, 1.0
    return float(np.median(np.concatenate(xy))) + 1e-3, float(np.median(np.concatenate(z))) + 1e-3


def place_features(vol: Volume, place: np.ndarray, noise: tuple[float, float]) -> np.ndarray:
    """The radial profiles around ``place`` (voxel ``(z, y, x)``), see the module's docstring."""
    spacing = np.asarray(vol.spacing, float)
    place = np.asarray(place, float)
    shells = _shell_values_interior(vol, place, spacing)
    if shells is None:
        shells = _shell_values(vol, place, spacing)
    n_xy, n_z = noise
    out = []
    for h, ax, az, g in shells:
        out += [h.mean(), h.std(), np.log((_median_of_magnitudes(ax) + 1e-3) / n_xy), np.log((_median_of_magnitudes(az) + 1e-3) / n_z),
                np.log1p(g.mean()), (h > -400).mean()]
    out += [np.log(spacing[0]), np.log(spacing[1:].mean()), np.log(n_xy), np.log(n_z)]
    # Contrasts: the place (0-9 mm) and its rim (9-16 mm) against the surroundings (16-24 mm).
    b = np.asarray(out[: 6 * (len(BINS_MM) - 1)], np.float64).reshape(len(BINS_MM) - 1, len(PER_BIN))
    out += list(b[:3].mean(0) - b[5:].mean(0)) + list(b[3:5].mean(0) - b[5:].mean(0))
    return np.asarray(out, dtype=np.float32)


def _median_of_magnitudes(x: np.ndarray) -> np.floating:
    """``np.median`` of a 1D float32 array of magnitudes (finite, none negative, no -0.0: what
    ``np.abs`` gives), the same number, partitioning ``x`` itself (no copy, no search for NaN): the
    mean of the middle one or two order statistics. The values are partitioned by their bits as
    integers, which for such values is the same order, with cheaper comparisons."""
    h = len(x) // 2
    bits = x.view(np.int32)
    if len(x) % 2:
        bits.partition(h)
        return x[h : h + 1].mean()
    bits.partition([h - 1, h])
    return x[h - 1 : h + 1].mean()


# Per shell: HU, |in-plane residual|, |through-plane residual|, gradient (the residuals' arrays may be
# reordered in place by the caller).
Shells = list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _shell_values(vol: Volume, place: np.ndarray, spacing: np.ndarray) -> Shells:
    """The values :func:`place_features` reduces, shell by shell: filtered over the box of
    :func:`neighbourhood` (its edges as ``mode="nearest"`` sees them), every voxel within reach once,
    in the box's order within its shell."""
    box, _, dist = neighbourhood(vol, place, REACH_MM, margin=1)
    hu = vol.hu[box].astype(np.float32)
    r_xy, r_z = _residuals(hu)
    grads = np.gradient(hu, *spacing) if min(hu.shape) > 1 else [np.zeros_like(hu)] * 3
    grad = np.sqrt(sum(g**2 for g in grads))
    # Every voxel within reach once, grouped by shell.
    within = dist < BINS_MM[-1]
    h_all, a_xy, a_z, g_all = hu[within], np.abs(r_xy[within]), np.abs(r_z[within]), grad[within]
    order, ends = _by_shell(dist[within])
    out = []
    for k, b in enumerate(BINS_MM[1:]):
        idx = order[ends[k] : ends[k + 1]]
        if not len(idx):  # a shell thinner than the slices near the centre: take the nearest voxels
            m = dist <= max(b, float(dist.min()) + 1e-3)
            out.append((hu[m], np.abs(r_xy[m]), np.abs(r_z[m]), grad[m]))
        else:
            out.append((h_all[idx], a_xy[idx], a_z[idx], g_all[idx]))
    return out


# The shell of each whole millimetre within reach: the last edge at or under it (as searchsorted takes it).
_SHELL_OF_MM = (np.searchsorted(BINS_MM, np.arange(int(REACH_MM)), side="right") - 1).astype(np.int8)


def _by_shell(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxels at distances ``d`` (mm, all within reach) grouped by shell: their stable order by shell
    (a radix sort on the shell's index) and where each shell starts in it (``ends[k]:ends[k + 1]``)."""
    shell = _SHELL_OF_MM[d.astype(np.intp)]  # the edges are whole millimetres: a voxel's shell is that of its distance's floor
    order = np.argsort(shell, kind="stable")
    return order, np.searchsorted(shell[order], np.arange(len(BINS_MM)), side="left")


@lru_cache(maxsize=8)
def _ball_layout(shape: tuple[int, int, int], offset: tuple[float, float, float],
                 spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """For a place ``offset`` voxels from the centre voxel of a box of ``shape``: the flat indices
    of the box's voxels within reach, shell after shell (in the box's order within a shell: the
    grouping :func:`_shell_values` makes), and where each shell starts among them."""
    axes = [(np.arange(n) - n // 2 - o) * s for n, o, s in zip(shape, offset, spacing)]
    dist = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
    flat = np.flatnonzero(dist < BINS_MM[-1])
    order, ends = _by_shell(dist.ravel()[flat])
    return flat[order], ends


def _shell_values_interior(vol: Volume, place: np.ndarray, spacing: np.ndarray) -> Shells | None:
    """:func:`_shell_values`, bit for bit, for a place whose box lies inside the scan and has a
    voxel in every shell (None otherwise), with less work: the residuals and the gradient are read
    at the voxels within reach only (each central difference from the two neighbours' values, as
    ``np.gradient`` takes it inside an array; every voxel within reach is a voxel inside the box),
    gathered shell after shell, and the layout of the ball is shared by places with the same
    offset from their voxel (the re-centred places: all of them)."""
    r = np.ceil(REACH_MM / spacing).astype(int) + 1
    c = np.rint(place).astype(int)
    lo, hi = c - r, c + r + 1
    if np.any(lo < 0) or np.any(hi > np.asarray(vol.shape)):
        return None
    shape = tuple(int(n) for n in hi - lo)
    flat, ends = _ball_layout(shape, tuple(float(o) for o in place - c), tuple(float(s) for s in spacing))
    if np.any(np.diff(ends) == 0):  # a shell thinner than the slices: the box's rule for it
        return None
    hu = vol.hu[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32)
    values = hu.ravel()
    h_all = values.take(flat)
    a_xy = np.abs(h_all - _smooth_xy(hu).ravel().take(flat))  # _residuals' values at these voxels
    a_z = np.abs(h_all - _smooth_z(hu).ravel().take(flat))
    g2: np.ndarray | int = 0
    for stride, s in zip((shape[1] * shape[2], shape[2], 1), spacing):
        d = values.take(flat + stride) - values.take(flat - stride)
        g = (d / (2.0 * np.float64(s))).astype(np.float32)
        g2 = g2 + g**2
    g_all = np.sqrt(g2)
    return [(h_all[a:b], a_xy[a:b], a_z[a:b], g_all[a:b]) for a, b in zip(ends[:-1], ends[1:])]


def features_at(vol: Volume, places: np.ndarray, noise: tuple[float, float], threads: int = 2,
                recentre: bool = False, resampling: bool = False, trace_recentre: bool = False,
                trace_reference: np.ndarray | None = None, at_places: np.ndarray | None = None,
                shape: bool = False) -> np.ndarray:
    """:func:`place_features` at every place ``(n, 3)`` (with ``resampling``, then its
    :func:`resampling_trace`, and where the scan's own ``trace_reference`` (:func:`scan_trace`) is
    given the same less it; with ``shape``, then its :func:`shape_features`), over ``threads``
    threads (the filters and medians run outside the GIL for much of their time). With ``recentre``
    each row goes on with the same at the place's two :func:`recentred` places (with
    ``trace_recentre`` and ``resampling``, also at its :func:`trace_peak`), less
    :data:`SCAN_COLUMNS`, and their distances (mm) from it; ``at_places``: the rows at the places
    themselves (these same features without ``recentre``), where the caller has them (a triage's
    rows), so that only the re-centred places are read."""
    places = np.asarray(places, float).reshape(-1, 3)
    trace_scan = resampling and trace_reference is not None
    if recentre:
        trace_recentre = trace_recentre and resampling
        if not len(places):
            return np.zeros((0, len(feature_names(True, resampling, trace_recentre, trace_scan, shape))), np.float32)
        at = with_recentred(vol, places, threads, trace_noise=noise[0] if trace_recentre else None)
        k = 4 if trace_recentre else 3
        if at_places is None:
            f = features_at(vol, at, noise, threads, resampling=resampling, trace_reference=trace_reference, shape=shape).reshape(len(places), k, -1)
        else:
            moved = at.reshape(len(places), k, 3)[:, 1:].reshape(-1, 3)
            f_moved = features_at(vol, moved, noise, threads, resampling=resampling, trace_reference=trace_reference, shape=shape)
            f = np.concatenate([np.asarray(at_places, np.float32)[:, None], f_moved.reshape(len(places), k - 1, -1)], axis=1)
        own = [j for j, n in enumerate(feature_names(resampling=resampling, trace_scan=trace_scan, shape=shape)) if n not in SCAN_COLUMNS]
        offsets = np.linalg.norm((at.reshape(-1, k, 3)[:, 1:] - places[:, None]) * np.asarray(vol.spacing, float), axis=-1)
        return np.hstack([f[:, 0], *[f[:, j, own] for j in range(1, k)], offsets]).astype(np.float32)

    def row(p: np.ndarray) -> np.ndarray:
        parts = [place_features(vol, p, noise)]
        if resampling:
            trace = resampling_trace(vol, p, noise[0])
            parts += [trace] + ([trace - trace_reference] if trace_scan else [])
        if shape:
            parts.append(shape_features(vol, p))
        return np.concatenate(parts)

    rows = _map(row, places, threads)
    return np.stack(rows) if rows else np.zeros((0, len(feature_names(resampling=resampling, trace_scan=trace_scan, shape=shape))), np.float32)


def shape_features(vol: Volume, place: np.ndarray) -> np.ndarray:
    """The place's local shape at each of :data:`SHAPE_SCALES_MM`: the eigenvalues (lowest first)
    of the Hessian of HU smoothed by a Gaussian of that scale, at the place itself (sub-voxel, on
    the scan's own grid), times the scale squared (HU; so that scales compare). A bright blob (a
    nodule) has all three well under 0, a vessel two, a wall or fissure one: the radial profiles of
    :func:`place_features` read the same for a ball and a tube through it."""
    spacing = np.asarray(vol.spacing, float)
    place = np.asarray(place, float)
    out = []
    for s in SHAPE_SCALES_MM:
        box, _, _ = neighbourhood(vol, place, SHAPE_REACH * s)
        hu = vol.hu[box].astype(np.float64)
        smooth, first, second = [], [], []
        for b, p, h in zip(box, place, spacing):
            d = (np.arange(b.start, b.stop) - p) * h  # mm from the place along this axis
            g = np.exp(-(d**2) / (2.0 * s * s))
            g /= g.sum()
            g1 = -d / (s * s) * g
            g2 = (d**2 / s**4 - 1.0 / (s * s)) * g
            # Each derivative kernel sums to 0, however the box is cut at the scan's edge.
            smooth.append(g)
            first.append(g1 - g * g1.sum())
            second.append(g2 - g * g2.sum())
        hess = np.empty((3, 3))
        for i in range(3):
            for j in range(i, 3):
                k = list(smooth)
                if i == j:
                    k[i] = second[i]
                else:
                    k[i], k[j] = first[i], first[j]
                hess[i, j] = hess[j, i] = np.einsum("zyx,z,y,x->", hu, *k)
        out += list(np.linalg.eigvalsh(hess) * s * s)
    return np.asarray(out, np.float32)


TRACE_SCAN_PLACES = 64  # the parenchyma places :func:`scan_trace` reads


def scan_trace(vol: Volume, lungs: np.ndarray, noise_xy: float) -> np.ndarray:
    """The scan's own level of :func:`resampling_trace`: its median, window by window, at
    :data:`TRACE_SCAN_PLACES` places of parenchyma (lung voxels under -600 HU) spread evenly over
    the lungs. A kernel or pixel spacing whose untouched texture reads a higher trace (a ripple
    frequency low enough for anatomy to leak into it) raises it, so a place can be read against
    its own scan."""
    empty = np.full(len(TRACE_RADII_MM), np.nan, np.float32)
    if not has_ripple(vol):
        return empty
    sub = np.array([max(int(round(4.0 / vol.spacing[0])), 1), 8, 8])
    pts = np.argwhere(lungs[:: sub[0], :: sub[1], :: sub[2]]) * sub
    if len(pts):
        pts = pts[vol.hu[tuple(pts.T)] < -600]
    if not len(pts):
        return empty
    picks = pts[np.unique(np.linspace(0, len(pts) - 1, TRACE_SCAN_PLACES).astype(int))]
    return np.median(np.stack([resampling_trace(vol, p, noise_xy) for p in picks]), axis=0).astype(np.float32)


def ripple_frequency(spacing_mm):
    """Cycles a voxel of the noise-variance ripple that linear interpolation between a grid of
    ``spacing_mm`` and a 1 mm grid leaves: a voxel at ``x`` mm lies at the fraction ``x mod 1`` of
    a 1 mm cell, and the variance of an interpolated value, ``(1 - f)^2 + f^2`` of the noise's for
    fraction ``f``, rises and falls once a cell, so once every ``1 / spacing`` voxels (aliased into
    0-0.5). A float for one spacing, an array for an array of them."""
    f = np.mod(np.asarray(spacing_mm, np.float64), 1.0)
    out = np.minimum(f, 1.0 - f)
    return float(out) if out.ndim == 0 else out


def has_ripple(vol: Volume) -> bool:
    """Whether both in-plane pixel spacings leave a ripple to read (:data:`TRACE_MIN_FREQUENCY`)."""
    return min(ripple_frequency(s) for s in vol.spacing[1:]) >= TRACE_MIN_FREQUENCY


def resampling_trace(vol: Volume, place: np.ndarray, noise_xy: float) -> np.ndarray:
    """How strongly the in-plane fine texture around ``place`` ripples at :func:`ripple_frequency`,
    in squares of half-width :data:`TRACE_RADII_MM` (in-plane; the slices within that reach): the
    squared in-plane residual (a 3x3 mean subtracted, clipped at :data:`TRACE_CLIP` times the scan's
    noise ``noise_xy``), averaged along each in-plane axis into a profile across the other, its
    Hann-windowed Fourier power at the ripple's frequency as a multiple of what noise without a
    ripple gives, summed over the two axes; the log of one plus that. A pasted cube's grid is one
    rigid grid, so its ripple keeps one phase over every row and slice of it. NaN where the pixel
    spacing lies within :data:`TRACE_MIN_FREQUENCY` of a whole number of mm on either axis."""
    spacing = np.asarray(vol.spacing, float)
    freqs = [ripple_frequency(s) for s in spacing[1:]]
    if not has_ripple(vol):
        return np.full(len(TRACE_RADII_MM), np.nan, np.float32)
    c = np.rint(np.asarray(place, float)).astype(int)
    reach = np.array([int(np.floor(max(TRACE_RADII_MM) / spacing[0])), *np.ceil(max(TRACE_RADII_MM) / spacing[1:]).astype(int) + 1])
    lo, hi = np.maximum(c - reach, 0), np.minimum(c + reach + 1, vol.shape)
    hu = vol.hu[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32)
    clip = TRACE_CLIP * max(float(noise_xy), 1e-3)
    e = np.clip(hu - ndimage.uniform_filter(hu, (1, 3, 3), mode="nearest"), -clip, clip) ** 2
    out = []
    for radius in TRACE_RADII_MM:
        half = np.array([int(np.floor(radius / spacing[0])), *np.ceil(radius / spacing[1:]).astype(int)])
        a, b = np.maximum(c - half - lo, 0), np.minimum(c + half + 1 - lo, e.shape)
        sq = e[tuple(slice(i, j) for i, j in zip(a, b))]
        power = 0.0
        for axis, f in ((2, freqs[1]), (1, freqs[0])):
            n = sq.shape[axis]
            if n < 8:
                continue
            lines = sq.size / n
            profile = sq.mean(axis=tuple(k for k in range(3) if k != axis))
            window = np.hanning(n)
            wave = window * np.exp(-2j * np.pi * f * np.arange(n))
            p = abs(np.dot(profile - profile.mean(), wave)) ** 2
            power += p / (float(sq.var()) * float((window**2).sum()) / lines + 1e-12)
        out.append(np.log1p(power))
    return np.asarray(out, np.float32)


def taken_candidates(found: list[dict], vol: Volume, lungs: np.ndarray | None, cap: int, trace_weight: float | None = None,
                     noise_xy: float | None = None, reference: np.ndarray | None = None) -> list[dict]:
    """The network's findings ``found`` (best first) that a second stage scores, in screening and in
    its training rows alike: the first ``cap``, in the network's order or, with ``trace_weight``, in
    that of :func:`trace_ordered` (which needs the scan's ``lungs``; its noise ``noise_xy`` and
    :func:`scan_trace` ``reference`` are made here where not given)."""
    if trace_weight is not None:
        if lungs is None:
            raise ValueError("this second stage takes the candidates in the order of their resampling trace: pass the lung mask")
        found = trace_ordered(found, vol, lungs, scan_noise(vol, lungs)[0] if noise_xy is None else noise_xy, trace_weight, reference)
    return found[:cap]


def trace_ordered(found: list[dict], vol: Volume, lungs: np.ndarray, noise_xy: float, weight: float,
                  reference: np.ndarray | None = None) -> list[dict]:
    """The network's candidates ``found`` (its findings, best first) in the order a second stage
    with ``trace_order`` takes them: by the network's log-odds of tampering plus ``weight`` times
    the place's :func:`resampling_trace` over the scan's own (:func:`scan_trace`, or ``reference``
    where the caller has it; the largest of its windows), so that a place the network scores lower
    but that ripples as a pasted cube does is not left past the stage's cap. The network's order
    where the pixel spacing leaves no ripple."""
    if len(found) < 2 or not has_ripple(vol):
        return list(found)
    reference = np.nan_to_num(scan_trace(vol, lungs, noise_xy) if reference is None else reference, nan=0.0)
    key = []
    for f in found:
        p = min(max(float(f["score"]), 1e-4), 1.0 - 1e-4)
        excess = np.nan_to_num(resampling_trace(vol, np.asarray(f["voxel"], float), noise_xy) - reference, nan=0.0)
        key.append(-(np.log(p / (1.0 - p)) + weight * float(excess.max())))
    return [found[k] for k in np.argsort(key, kind="stable")]


TRACE_BLOCK_MM = 4.0  # the trace map's cells
TRACE_SLAB_MM = 2.0  # the trace map reads one slice in every this many mm (the ripple's phase is the same on every slice of a pasted cube)


def trace_map(vol: Volume, lungs: np.ndarray, noise_xy: float, radius_mm: float = 8.0) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`resampling_trace` over the whole lungs, on cells of :data:`TRACE_BLOCK_MM`: for each
    cell, the ripple's power in the square of half-width ``radius_mm`` around it (a box window, no
    Hann; the residual's mean taken out cell by cell), summed over the two in-plane axes, as the log
    of one plus its multiple of what noise gives. Returns ``(score, centres)``, ``centres`` the
    cells' voxels ``(n, 3)`` and ``score`` ``(n,)``, over the cells that are mostly lung; None where
    the pixel spacing leaves no ripple to read (:func:`resampling_trace`)."""
    return lung_maps(vol, lungs, noise_xy, trace=True, smooth=False, radius_mm=radius_mm)[0]


def smooth_map(vol: Volume, lungs: np.ndarray, noise_xy: float) -> tuple[np.ndarray, np.ndarray] | None:
    """How much smoother each cell of the lungs is than the lung around it, on the cells of
    :func:`trace_map`: the log of the clipped in-plane residual's mean energy in the ring of lung
    cells :data:`SMOOTH_INNER_MM` to :data:`SMOOTH_OUTER_MM` around it over that within
    :data:`SMOOTH_INNER_MM` (a place filled by in-painting is smoother than the lung around it).
    ``(score, centres)`` as :func:`trace_map` gives them (``-inf`` where too little lung is near to
    tell), None where the lungs have no cell."""
    return lung_maps(vol, lungs, noise_xy, trace=False, smooth=True)[1]


SMOOTH_INNER_MM = 6.0  # the smooth map's own square (half-width)
SMOOTH_OUTER_MM = 22.0  # and the ring's outer half-width


def lung_maps(vol: Volume, lungs: np.ndarray, noise_xy: float, trace: bool = True, smooth: bool = False,
              radius_mm: float = 8.0, extent: list[np.ndarray] | None = None) -> tuple[tuple[np.ndarray, np.ndarray] | None, tuple[np.ndarray, np.ndarray] | None]:
    """:func:`trace_map` (with ``trace``) and :func:`smooth_map` (with ``smooth``) from one pass over
    the lungs' slabs; each None where not asked for or not to be read. ``extent``: the lungs'
    :func:`lung_extent`, where the caller has it."""
    spacing = np.asarray(vol.spacing, float)
    freqs = [ripple_frequency(s) for s in spacing[1:]]
    ripple = trace and has_ripple(vol)
    if not (ripple or smooth):
        return None, None
    idx = lung_extent(lungs) if extent is None else extent
    if not len(idx[0]):
        return None, None
    step = max(int(round(TRACE_SLAB_MM / spacing[0])), 1)
    b = np.maximum(np.rint(TRACE_BLOCK_MM / spacing).astype(int), 1)
    bz = max(int(round(TRACE_BLOCK_MM / (spacing[0] * step))), 1)  # read slices to a cell
    zs = np.arange(idx[0][0], idx[0][-1] + 1, step)
    ny, nx = (idx[1][-1] + 1 - idx[1][0]) // b[1], (idx[2][-1] + 1 - idx[2][0]) // b[2]
    nz = len(zs) // bz
    if min(nz, ny, nx) < 1:
        return None, None
    zs = zs[: nz * bz]
    y0, x0 = int(idx[1][0]), int(idx[2][0])
    clip = TRACE_CLIP * max(float(noise_xy), 1e-3)
    oy, ox = int(y0 > 0), int(x0 > 0)
    rows, cols = slice(max(y0 - 1, 0), y0 + ny * b[1] + 1), slice(max(x0 - 1, 0), x0 + nx * b[2] + 1)
    # Cell sums taken axis by axis, one layer of cells at a time (small arrays, no whole-lung
    # temporaries): over each cell's slices first, then along y keeping x (for the ripple along x,
    # whose wave multiplies those sums) and along x keeping y (for the ripple along y).
    n_cell = float(bz * b[1] * b[2])
    sums = [(np.empty((nz, ny, nx * b[2])), np.empty((nz, ny * b[1], nx))) for _ in range(2)] if ripple else []
    total = None if ripple else np.empty((nz, ny, nx))  # each cell's sum of squared residuals (without the ripple's sums)
    in_lung = np.empty((nz, ny, nx), np.int32)  # each cell's lung voxels
    for c in range(nz):
        layer = lungs[zs[c * bz: (c + 1) * bz], y0: y0 + ny * b[1], x0: x0 + nx * b[2]]
        in_lung[c] = _sum_last(layer.reshape(bz, ny, b[1], nx * b[2]).sum(axis=(0, 2), dtype=np.int32).reshape(ny, nx, b[2]))
        hu = vol.hu[zs[c * bz: (c + 1) * bz], rows, cols].astype(np.float32)
        r = hu - ndimage.uniform_filter(hu, (1, 3, 3), mode="nearest")
        e = np.clip(r[:, oy: oy + ny * b[1], ox: ox + nx * b[2]], -clip, clip) ** 2
        if not ripple:
            total[c] = e.sum(axis=0, dtype=np.float64).reshape(ny, b[1], nx, b[2]).sum(axis=(1, 3))
            continue
        for a, (keep_x, keep_y) in zip((e, e * e), sums):
            slab = a.sum(axis=0, dtype=np.float64)
            keep_x[c] = slab.reshape(ny, b[1], nx * b[2]).sum(axis=1)
            keep_y[c] = _sum_last(slab.reshape(ny * b[1], nx, b[2]))
    keep = in_lung > 0.5 * n_cell  # cells mostly lung
    cz, cy, cx = np.nonzero(keep)
    centres = np.stack([zs[cz * bz + bz // 2], y0 + cy * b[1] + b[1] / 2.0, x0 + cx * b[2] + b[2] / 2.0], axis=1).astype(float)
    found = None
    if ripple:
        along_x, along_y = sums[0]
        total = _sum_last(along_x.reshape(nz, ny, nx, b[2]))
        squares = _sum_last(sums[1][0].reshape(nz, ny, nx, b[2]))
        mean = total / n_cell
        win = tuple(int(v) for v in np.maximum(2 * np.rint(np.array([radius_mm / (spacing[0] * step * bz), radius_mm / (spacing[1] * b[1]),
                                                                       radius_mm / (spacing[2] * b[2])]) / 2).astype(int), 1))
        power = 0.0
        var = ndimage.uniform_filter(squares - total * mean, win, mode="constant")  # the residual's spread within each cell, summed
        for axis, f, n in ((2, freqs[1], b[2] * nx), (1, freqs[0], b[1] * ny)):
            phase = 2 * np.pi * f * (np.arange(n) + (x0 if axis == 2 else y0))
            parts = []
            for wave in (np.cos(phase), np.sin(phase)):
                if axis == 2:  # the wave along x times the cells' sums over z and y, summed over each cell's x
                    s = _sum_last((along_x * wave).reshape(nz, ny, nx, b[2])) - mean * (wave.reshape(nx, b[2]).sum(1) * (n_cell / b[2]))
                else:
                    s = (along_y * wave[:, None]).reshape(nz, ny, b[1], nx).sum(axis=2) - mean * (wave.reshape(ny, b[1]).sum(1) * (n_cell / b[1]))[:, None]
                parts.append(ndimage.uniform_filter(s, win, mode="constant"))
            power = power + (parts[0] ** 2 + parts[1] ** 2) * float(np.prod(win)) / np.maximum(var, 1e-12)  # window sums squared over the window's sum of squares
        found = np.log1p(power)[keep].astype(np.float32), centres
    smoother = None
    if smooth:
        cell_mm = np.array([spacing[0] * step * bz, spacing[1] * b[1], spacing[2] * b[2]])
        smoother = _smoothness(total, keep, cell_mm)[keep].astype(np.float32), centres
    return found, smoother


def _sum_last(x: np.ndarray) -> np.ndarray:
    """``x.sum(axis=-1)``, bit for bit, several times faster for a last axis of 2-7 (a map's cell
    of voxels): numpy adds fewer than 8 values one after another, in order, and so do these slices
    (a sum over a short last axis spends its time calling the inner loop once per sum)."""
    n = x.shape[-1]
    if not 1 < n < 8:
        return x.sum(axis=-1)
    out = x[..., 0] + x[..., 1]
    for k in range(2, n):
        out += x[..., k]
    return out


def _smoothness(total: np.ndarray, keep: np.ndarray, cell_mm: np.ndarray) -> np.ndarray:
    """:func:`smooth_map`'s score on every cell from the cells' summed squared residuals ``total``
    and which cells are lung (``keep``)."""
    lung = keep.astype(np.float64)
    energy = total * lung
    sums = []
    for half in (SMOOTH_INNER_MM, SMOOTH_OUTER_MM):
        win = tuple(int(2 * round(half / c) + 1) for c in cell_mm)
        volume = float(np.prod(win))
        sums.append((ndimage.uniform_filter(energy, win, mode="constant") * volume, ndimage.uniform_filter(lung, win, mode="constant") * volume, volume))
    (e_in, n_in, v_in), (e_out, n_out, v_out) = sums
    inner = np.maximum(e_in, 0.0) / np.maximum(n_in, 1e-9)  # the filters' sums may fall a rounding error under 0
    ring = np.maximum(e_out - e_in, 0.0) / np.maximum(n_out - n_in, 1e-9)
    score = np.log((ring + 1e-6) / (inner + 1e-6))
    enough = (n_in >= 0.5 * v_in) & (n_out - n_in >= 0.3 * (v_out - v_in))
    return np.where(enough, score, -np.inf)


BLOB_GRID_MM = 2.0  # the blob map's grid (the scan's voxels taken every this many mm)
BLOB_SCALES_MM = (2.0, 3.0)  # its Gaussians: a 5-12 mm nodule's own scale
BLOB_ROUNDNESS = 1.0 / 3.0  # a blob's weakest curvature is at least this share of its strongest (a vessel's is about none)


def blob_map(vol: Volume, lungs: np.ndarray, extent: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Small bright blobs over the lungs: on a grid of about :data:`BLOB_GRID_MM` over the lungs'
    box, the scale-normalised negative Laplacian of HU smoothed by a Gaussian of each of
    :data:`BLOB_SCALES_MM` (the strongest of the scales), at its local maxima in the lungs where the
    Hessian at that scale bends down along all three axes and its weakest curvature is at least
    :data:`BLOB_ROUNDNESS` of its strongest: a nodule, drawn or real, and not a vessel's tube or a
    fissure's sheet. The network's 8 mm cells rank a small drawn nodule low; this map ranks it
    among the scan's few round blobs. ``(score, centres)`` as :func:`trace_map` gives them (score in
    HU), None where the lungs have no voxel. ``extent``: the lungs' :func:`lung_extent`, where the
    caller has it."""
    idx = lung_extent(lungs) if extent is None else extent
    if not len(idx[0]):
        return None
    spacing = np.asarray(vol.spacing, float)
    step = np.maximum(np.rint(BLOB_GRID_MM / spacing).astype(int), 1)
    box = tuple(slice(int(i[0]), int(i[-1]) + 1, int(s)) for i, s in zip(idx, step))
    hu, lung, grid = vol.hu[box].astype(np.float32), lungs[box], spacing * step
    if min(hu.shape) < 3:
        return None
    best = np.full(hu.shape, -np.inf, np.float32)
    scale = np.zeros(hu.shape, np.int8)
    smoothed = []
    inner = (slice(1, -1),) * 3
    for k, s in enumerate(BLOB_SCALES_MM):
        g = ndimage.gaussian_filter(hu, s / grid, mode="nearest")
        smoothed.append(g)
        log = np.zeros_like(g)
        for a in range(3):  # the second difference along each axis, on the grid's interior
            lo, hi = list(inner), list(inner)
            lo[a], hi[a] = slice(0, -2), slice(2, None)
            log[inner] += (g[tuple(lo)] + g[tuple(hi)] - 2.0 * g[inner]) / grid[a] ** 2
        log *= -(s * s)
        better = lung & (log > best)
        best[better] = log[better]
        scale[better] = k
    cells = np.argwhere((best == ndimage.maximum_filter(best, size=3)) & (best > 0))
    cells = cells[np.all((cells > 0) & (cells < np.asarray(hu.shape) - 1), axis=1)]
    keep = np.zeros(len(cells), bool)
    for k, g in enumerate(smoothed):  # each maximum's Hessian at its own scale, by central differences
        sel = np.flatnonzero(scale[tuple(cells.T)] == k)
        keep[sel] = _round_blob(g, cells[sel], grid)
    cells = cells[keep]
    return best[tuple(cells.T)], (cells * step + [b.start for b in box]).astype(float)


def _round_blob(g: np.ndarray, cells: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Whether the Hessian of ``g`` at each of ``cells`` (interior cells of the grid of spacing
    ``grid``) bends down along all three axes, its weakest curvature at least :data:`BLOB_ROUNDNESS`
    of its strongest."""
    def at(offset) -> np.ndarray:
        return g[tuple((cells + offset).T)].astype(np.float64)

    unit = np.eye(3, dtype=int)
    hess = np.empty((len(cells), 3, 3))
    for i in range(3):
        hess[:, i, i] = (at(unit[i]) + at(-unit[i]) - 2.0 * at(0)) / grid[i] ** 2
        for j in range(i + 1, 3):
            d = at(unit[i] + unit[j]) - at(unit[i] - unit[j]) - at(unit[j] - unit[i]) + at(-unit[i] - unit[j])
            hess[:, i, j] = hess[:, j, i] = d / (4.0 * grid[i] * grid[j])
    ev = np.linalg.eigvalsh(hess)  # lowest first: the strongest downward curvature is ev[:, 0]
    return (ev[:, 2] < 0) & (ev[:, 2] <= BLOB_ROUNDNESS * ev[:, 0])


TRACE_PEAKS_APART_MM = 12.0  # the trace map's peaks a second stage takes as candidates lie at least this far apart
TRACE_PEAK_SAME_MM = 4.0  # a peak this close to one of the network's candidates is that candidate (one cell of the map)


def trace_peaks(vol: Volume, lungs: np.ndarray, noise_xy: float, n: int, taken: np.ndarray | None = None) -> np.ndarray:
    """The ``n`` strongest local maxima of :func:`trace_map` over the lungs, strongest first,
    :data:`TRACE_PEAKS_APART_MM` apart, less those within :data:`TRACE_PEAK_SAME_MM` of a voxel of
    ``taken`` (the network's candidates): where a pasted cube's ripple is, which the network's 8 mm
    cells may have missed or put beside it. ``(k, 3)`` voxels; none where the pixel spacing leaves
    no ripple to read."""
    return strongest_peaks(trace_map(vol, lungs, noise_xy) if n > 0 else None, vol.spacing, n, taken)


def strongest_peaks(found: tuple[np.ndarray, np.ndarray] | None, spacing, n: int, taken: np.ndarray | None = None) -> np.ndarray:
    """:func:`trace_peaks` from the scan's :func:`trace_map` ``found`` (None: no ripple to read),
    where the caller has it (:meth:`Verifier.read_scan`)."""
    if found is None or n <= 0:
        return np.zeros((0, 3))
    score, centres = found
    spacing = np.asarray(spacing, float)
    mm = centres * spacing
    kept: list[int] = []
    for k in np.argsort(-score, kind="stable"):
        if len(kept) == n:
            break
        if not kept or np.min(np.linalg.norm(mm[kept] - mm[k], axis=1)) >= TRACE_PEAKS_APART_MM:
            kept.append(int(k))
    peaks = centres[kept]
    if taken is not None and len(taken) and len(peaks):
        d = np.linalg.norm((peaks[:, None, :] - np.asarray(taken, float)[None]) * spacing, axis=2)
        peaks = peaks[d.min(axis=1) >= TRACE_PEAK_SAME_MM]
    return peaks


def trace_peak(vol: Volume, place: np.ndarray, noise_xy: float, radius_mm: float = RECENTRE_MM) -> np.ndarray:
    """The voxel within ``radius_mm`` of ``place`` (in-plane, on its slice's cells of
    :func:`trace_map`) where the resampling trace is strongest: where a pasted cube's ripple is, when
    the network's 8 mm cell put its candidate beside it. ``place`` itself where the pixel spacing
    leaves no ripple to read."""
    spacing = np.asarray(vol.spacing, float)
    c = np.rint(np.asarray(place, float)).astype(int)
    reach = np.ceil((radius_mm + 8.0 + TRACE_BLOCK_MM) / spacing).astype(int)
    lo, hi = np.maximum(c - reach, 0), np.minimum(c + reach + 1, vol.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    found = trace_map(Volume(vol.hu[box], vol.spacing), np.ones(tuple(hi - lo), bool), noise_xy)
    if found is None:
        return np.asarray(place, float)
    score, centres = found
    centres = centres + lo
    near = np.linalg.norm((centres - np.asarray(place, float)) * spacing, axis=1) <= radius_mm
    if not near.any():
        return np.asarray(place, float)
    return centres[near][int(np.argmax(score[near]))]


NETWORK_EPS = 1e-4  # added to the network's probabilities before their log


def network_features(p: np.ndarray) -> np.ndarray:
    """The network's class probabilities ``(n, 3)`` at the places as the second stage reads them:
    the logs of ``injected, removed, genuine`` (the rows' last three columns)."""
    p = np.asarray(p, np.float32).reshape(-1, 3)
    return np.log(np.concatenate([p[:, 1:], p[:, :1]], axis=1) + NETWORK_EPS)


def network_probabilities(f: np.ndarray) -> np.ndarray:
    """The inverse of :func:`network_features`: ``(n, 3)`` probabilities ``genuine, injected, removed``."""
    p = np.clip(np.exp(np.asarray(f, np.float64).reshape(-1, 3)) - NETWORK_EPS, 0.0, 1.0)
    return p[:, [2, 0, 1]]


def stage_inputs(vol: Volume, places: np.ndarray, p_network: np.ndarray, noise: tuple[float, float],
                 with_network: bool = True, threads: int = 2, recentre: bool = False, resampling: bool = False,
                 trace_recentre: bool = False, trace_reference: np.ndarray | None = None,
                 at_places: np.ndarray | None = None, shape: bool = False) -> np.ndarray:
    """The second stage's rows at ``places``: :func:`features_at`, then (``with_network``) the
    network's probabilities ``p_network`` ``(n, 3)`` there; what training fits and screening scores.
    ``at_places``: :func:`features_at`'s rows at the places themselves, where the caller has them."""
    x = features_at(vol, places, noise, threads, recentre, resampling, trace_recentre, trace_reference, at_places, shape)
    return np.hstack([x, network_features(p_network)]) if with_network else x


def point_width(names: list[str]) -> int:
    """How many of a row's first columns (named ``names``, :func:`feature_names` with re-centring,
    then the network's three) read the place itself: the row of :func:`features_at` without
    re-centring, which a triage (:attr:`Verifier.triage`) reads with the network's columns."""
    return next((k for k, n in enumerate(names) if "@" in n), len(names) - 3)


def point_rows(rows: np.ndarray, width: int) -> np.ndarray:
    """A stage's full rows cut to what a triage reads: their first ``width`` columns (the place
    itself, :func:`point_width`) and the network's last three."""
    rows = np.asarray(rows)
    return np.hstack([rows[:, :width], rows[:, -3:]])


def scan_reference(rows: np.ndarray) -> np.ndarray:
    """A scan's reference row: the median, column by column, of its candidates' rows (the network's
    findings the stage re-scores), as the trees read them (:func:`finite_rows`)."""
    return np.median(finite_rows(rows), axis=0)


def scan_referenced(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``rows`` with, after their own columns, each column less the scan's ``reference``
    (:func:`scan_reference`): a place read against the scan's own candidates, so that a smooth
    kernel's or a thick slab's whole texture is not taken for an edit."""
    rows = finite_rows(rows)
    return np.hstack([rows, rows - np.asarray(reference, np.float32)[None, :]])


def blend(p: np.ndarray, q: np.ndarray, w: float) -> np.ndarray:
    """``(1 - w) * p + w * q``, both ``(n, 3)`` probabilities (``p`` itself at ``w`` 0): the trees'
    with the network's, or the stage's with the patch CNN's."""
    if not w:
        return p
    return ((1.0 - w) * np.asarray(p, np.float64) + w * np.asarray(q, np.float64).reshape(-1, 3)).astype(np.float32)


def nodule_checked(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``(n, 3)`` probabilities ``p`` after a second look at their "injected" share: a place's
    P(injected) times ``q``, its probability of being an injection rather than a genuine nodule, the
    rest of that share moved to genuine; P(removed) as it was."""
    p = np.asarray(p, np.float64).copy()
    moved = p[:, 1] * (1.0 - np.clip(np.asarray(q, np.float64), 0.0, 1.0))
    p[:, 1] -= moved
    p[:, 0] += moved
    return p.astype(np.float32)


NODULE_PREFIX = "nodule_"  # the nodule check's arrays in the stage's .npz
TRIAGE_PREFIX = "triage_"  # the triage's arrays in the stage's .npz
BLIND_PREFIX = "blind_"  # the trace-blind trees' arrays in the stage's .npz


def reads_trace(name: str) -> bool:
    """Whether a stage column (:func:`feature_names`) reads the resampling trace: the trace itself,
    less the scan's, or a place re-centred on it. What the trace-blind trees leave out."""
    return name.startswith("resampling_trace") or "@trace" in name or name.startswith("trace_")
# -- a single axial slice (the 2D detector's second stage) --------------------------------------


# What a single slice's rows read (:func:`slice_inputs`): :func:`feature_names`' (recentre,
# resampling, trace_recentre, trace_scan), the slice's own trace as the scan's.
SLICE_FEATURES = (True, True, False, True)


def slice_names() -> list[str]:
    """The columns a single slice's stage reads (:func:`slice_inputs`): :func:`features_at`'s with
    re-centring, resampling trace and the slice's own trace, less those one slice cannot give or that
    are the same at every place of a scan (the through-plane residual; :data:`SCAN_COLUMNS`)."""
    return [n for n in feature_names(*SLICE_FEATURES) if n not in SCAN_COLUMNS and not n.startswith("res_z")]


def slice_columns() -> np.ndarray:
    """Where :func:`slice_names` lie in a row of :func:`slice_inputs`."""
    names = feature_names(*SLICE_FEATURES)
    return np.asarray([names.index(n) for n in slice_names()])


def slice_noise(hu: np.ndarray, lungs: np.ndarray) -> float:
    """A single slice's own noise: the median absolute in-plane residual (a Gaussian of one pixel
    subtracted) over its parenchyma (lung pixels under -600 HU); 1.0 where it has under 100 of them."""
    hu = np.asarray(hu, np.float32)
    where = lungs & (hu < -600)
    if where.sum() < 100:
        return 1.0
    r = hu - _smooth_xy(hu[None])[0]  # the in-plane residual, as _residuals takes it
    return float(np.median(np.abs(r[where]))) + 1e-3


def axial_slice(vol: Volume, z: float) -> Volume:
    """The axial slice of ``vol`` nearest ``z`` alone, as a single DICOM slice is read (1 mm thick)."""
    k = int(np.clip(np.rint(z), 0, vol.shape[0] - 1))
    return Volume(vol.hu[k : k + 1].copy(), (1.0, *vol.spacing[1:]), meta={"kind": "dicom-file", "warnings": []})


def slice_inputs(vol: Volume, places: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Rows at ``places`` ``(n, 3)``, ``z = 0``, of a single slice ``vol`` (its lung mask ``lungs``):
    :func:`features_at` with its re-centred places and resampling trace, read against the slice's
    own noise (:func:`slice_noise`) and trace (:func:`scan_trace`): the columns of
    :func:`feature_names` ``(*SLICE_FEATURES)``; the trees read :func:`slice_columns`."""
    n_xy = slice_noise(vol.hu[0], lungs[0])
    recentre, resampling, _, _ = SLICE_FEATURES
    return features_at(vol, np.asarray(places, float).reshape(-1, 3), (n_xy, 1.0), recentre=recentre, resampling=resampling,
                       trace_reference=scan_trace(vol, lungs, n_xy))


TREE_KEYS = ("feature", "split", "left", "right", "value", "tree_class", "baseline", "rate", "meta")


@dataclass(frozen=True)
class ScanReading:
    """What a second stage reads of the whole scan, the same for every place on it
    (:meth:`Verifier.read_scan`): its noise (:func:`scan_noise`), the resampling trace's map over
    its lungs (:func:`trace_map`; empty where the pixel spacing leaves no ripple, None where the
    stage takes no trace peaks), the scan's own level of the trace (:func:`scan_trace`; None
    where the stage does not read its places against it) and the smooth map over its lungs
    (:func:`smooth_map`; empty where the lungs have no cell, None where the stage takes no smooth
    peaks) and the blob map (:func:`blob_map`; the same)."""

    noise: tuple[float, float]
    trace: tuple[np.ndarray, np.ndarray] | None = None
    reference: np.ndarray | None = None
    smooth: tuple[np.ndarray, np.ndarray] | None = None
    blob: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class Verifier:
    """Gradient-boosted trees over :func:`place_features` (and the network's probabilities) that
    re-score the network's candidates. Saved as an ``.npz`` of plain arrays (no pickle); run with
    numpy alone."""

    feature: np.ndarray  # (trees, nodes) the feature each node splits on
    split: np.ndarray  # (trees, nodes) go left where the feature is <= this
    left: np.ndarray  # (trees, nodes) child indices; -1 at a leaf
    right: np.ndarray
    value: np.ndarray  # (trees, nodes) a leaf's contribution to its class's raw score
    tree_class: np.ndarray  # (trees,) the class each tree adds to
    baseline: np.ndarray  # (3,) raw scores before any tree
    rate: float
    meta: dict = field(default_factory=dict)  # names, uses_network, recentre, resampling, trace_recentre, trace_scan, shape, candidate_threshold, max_candidates, threshold, fit details; slice (a single slice's stage)
    patches: Any = None  # the patch CNN (ctguard.patches.PatchScorer) where the meta's patch_weight is over 0
    nodules: Verifier | None = None  # two-class trees, genuine nodule or injected (``nodule_check`` in the meta), saved in the same file
    triage: Verifier | None = None  # trees over the place's own columns alone (``triage`` in the meta: their cut-off), saved in the same file
    blind: Verifier | None = None  # trees that do not read the resampling trace, with thresholds of their own, for scans it reads nothing on (``blind`` in the meta)

    def thresholds(self) -> dict[str, float]:
        """The thresholds its meta holds: ``threshold`` and, where it chose them, ``peak_threshold``
        and ``blob_threshold``."""
        return {k: self.meta[k] for k in ("threshold", "peak_threshold", "blob_threshold") if k in self.meta}

    def for_scan(self, vol: Volume) -> Verifier:
        """The trees that score ``vol``: the trace-blind ones (:attr:`blind`) where its pixels leave
        the resampling trace nothing to read (:func:`has_ripple`) and the stage has them, else these."""
        return self.blind if self.blind is not None and not has_ripple(vol) else self

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """``(n, 3)`` probabilities ``genuine, injected, removed`` of feature rows ``x`` (``(n, 2)``,
        genuine and injected, for the two-class trees of a nodule check)."""
        x = finite_rows(x)
        n = len(x)
        raw = np.tile(self.baseline.astype(np.float64), (n, 1))
        # Every row down every tree at once, a level at a time; then the leaves added tree by tree.
        trees, rows = np.arange(len(self.feature))[:, None], np.arange(n)[None, :]
        node = np.zeros((len(self.feature), n), dtype=np.intp)
        while True:
            left = self.left[trees, node]
            inner = left >= 0
            if not inner.any():
                break
            go_left = x[rows, np.maximum(self.feature[trees, node], 0)] <= self.split[trees, node]
            node = np.where(inner, np.where(go_left, left, self.right[trees, node]), node)
        leaves = self.value[trees, node]
        for t in range(len(self.feature)):
            raw[:, self.tree_class[t]] += self.rate * leaves[t]
        raw -= raw.max(axis=1, keepdims=True)
        e = np.exp(raw)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def rows(self, vol: Volume, places: np.ndarray, p_network: np.ndarray, noise: tuple[float, float],
             lungs: np.ndarray | None = None, trace_reference: np.ndarray | None = None,
             at_places: np.ndarray | None = None) -> np.ndarray:
        """The stage's rows at ``places`` (:func:`stage_inputs` as the meta says), before any scan
        reference; a stage with ``trace_scan`` in its meta needs the scan's ``lungs``, or its
        :func:`scan_trace` as ``trace_reference`` where the caller has it. ``at_places``: the rows
        at the places themselves, where the caller has them (:meth:`triage_first`)."""
        return stage_inputs(vol, places, p_network, noise, self.meta.get("uses_network", True), recentre=self.meta.get("recentre", False),
                            resampling=self.meta.get("resampling", False), trace_recentre=self.meta.get("trace_recentre", False),
                            trace_reference=self._trace_reference(vol, lungs, noise, trace_reference), at_places=at_places,
                            shape=bool(self.meta.get("shape", False)))

    def _trace_reference(self, vol: Volume, lungs: np.ndarray | None, noise: tuple[float, float],
                         trace_reference: np.ndarray | None) -> np.ndarray | None:
        """The scan's :func:`scan_trace` as this stage reads its places against it: None for a stage
        without ``trace_scan``, else ``trace_reference`` or, where not given, made from ``lungs``."""
        if not self.meta.get("trace_scan", False):
            return None
        if trace_reference is None and lungs is None:
            raise ValueError("this second stage reads each place's resampling trace against its scan's: pass the lung mask")
        return scan_trace(vol, lungs, noise[0]) if trace_reference is None else trace_reference

    def read_scan(self, vol: Volume, lungs: np.ndarray, noise: tuple[float, float] | None = None) -> ScanReading:
        """What this stage reads of the whole scan (``lungs`` its lung mask), once for every place:
        its noise, and as the meta asks the resampling trace's map (``trace_peaks``), the smooth map
        (``smooth_peaks``; both from one pass, :func:`lung_maps`), the blob map (``blob_peaks``,
        :func:`blob_map`) and the scan's own level of the trace (``trace_scan``; a single slice's
        stage reads its slice's own)."""
        extent = lung_extent(lungs)  # once for the noise and every map
        noise = scan_noise(vol, lungs, extent=extent) if noise is None else noise
        trace = smooth = blob = None
        none = (np.zeros(0, np.float32), np.zeros((0, 3)))  # no ripple (or no lung cell): no peaks
        want_trace, want_smooth = int(self.meta.get("trace_peaks", 0)) > 0, int(self.meta.get("smooth_peaks", 0)) > 0
        if want_trace or want_smooth:
            trace, smooth = lung_maps(vol, lungs, noise[0], trace=want_trace, smooth=want_smooth, extent=extent)
            trace, smooth = (trace or none) if want_trace else None, (smooth or none) if want_smooth else None
        if int(self.meta.get("blob_peaks", 0)) > 0:
            blob = blob_map(vol, lungs, extent) or none
        reference = scan_trace(vol, lungs, noise[0]) if self.meta.get("trace_scan") and not self.meta.get("slice") else None
        return ScanReading(noise, trace, reference, smooth, blob)

    def reference(self, vol: Volume, candidates: np.ndarray, p_network: np.ndarray, lungs: np.ndarray) -> np.ndarray:
        """The scan's reference row (:func:`scan_reference`) from its candidates ``candidates`` (voxels)
        where the network gave ``p_network``; what a stage with ``scan_reference`` in its meta reads
        each place against."""
        return scan_reference(self.rows(vol, candidates, p_network, scan_noise(vol, lungs), lungs))

    def score_places(self, vol: Volume, places: np.ndarray, p_network: np.ndarray, lungs: np.ndarray,
                     reference: np.ndarray | None = None, candidates: bool = False,
                     noise: tuple[float, float] | None = None, trace_reference: np.ndarray | None = None) -> np.ndarray:
        """``(n, 3)`` probabilities at ``places`` of ``vol`` (lung mask ``lungs``), where the network
        gave ``p_network``: the trees', or with ``blend_network`` w in the meta ``(1 - w)`` times the
        trees' plus ``w`` times the network's; then, with ``patch_weight`` v, ``(1 - v)`` times that
        plus ``v`` times the patch CNN's (:mod:`ctguard.patches`). A stage with ``scan_reference`` in
        its meta reads each place against the scan's candidates: ``candidates=True`` where ``places``
        are those candidates (screening), else their ``reference`` row (:meth:`reference`). A single
        slice's stage (``slice`` in its meta; ``vol`` one slice) reads :func:`slice_inputs` only.
        ``noise`` and ``trace_reference``: the scan's :func:`scan_noise` and :func:`scan_trace`,
        where the caller has them (:meth:`read_scan`)."""
        if self.meta.get("slice"):  # a single slice's stage: its own rows, no network, no reference
            return self.probabilities(slice_inputs(vol, places, lungs))
        noise = scan_noise(vol, lungs) if noise is None else noise
        if self.for_scan(vol) is not self:  # no ripple to read: every place whole, by the trees that never read the trace
            return self.blind.probabilities(self.rows(vol, places, p_network, noise, lungs, trace_reference))
        if self.triage is not None:  # the place itself first; the re-centred places and the full trees only where the triage passes it
            return self.triaged(vol, places, p_network, lungs, noise, trace_reference)
        x = self.rows(vol, places, p_network, noise, lungs, trace_reference)
        if self.meta.get("scan_reference"):
            if reference is None and not candidates:
                raise ValueError("this second stage reads each place against the scan's candidates: pass their reference row "
                                 "(ctguard.screen.stage_reference) or candidates=True")
            x = scan_referenced(x, scan_reference(x) if reference is None else reference)
        p = blend(self.probabilities(x), p_network, float(self.meta.get("blend_network", 0.0)))
        v = float(self.meta.get("patch_weight", 0.0))
        if v:
            from ctguard.patches import patches_at

            p = blend(p, self.patches.probabilities(patches_at(vol, places, noise)), v)
        if self.nodules is not None:  # a second look at the injected share: genuine nodule or injected?
            p = nodule_checked(p, self.nodules.probabilities(x)[:, 1])
        return p

    def triage_first(self, vol: Volume, places: np.ndarray, p_network: np.ndarray, lungs: np.ndarray | None,
                     noise: tuple[float, float], trace_reference: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The triage's look at ``places``: every place's own row (:func:`features_at` without its
        re-centred places), the triage's ``(n, 3)`` probabilities on it with the network's
        ``p_network``, and the indices of the places at or over its cut-off."""
        own = features_at(vol, np.asarray(places, float).reshape(-1, 3), noise, resampling=bool(self.meta.get("resampling", False)),
                          trace_reference=self._trace_reference(vol, lungs, noise, trace_reference), shape=bool(self.meta.get("shape", False)))
        p = self.triage.probabilities(np.hstack([own, network_features(p_network)]))
        return own, p, np.flatnonzero(1.0 - p[:, 0] >= float(self.meta["triage"]))

    def triaged(self, vol: Volume, places: np.ndarray, p_network: np.ndarray, lungs: np.ndarray,
                noise: tuple[float, float], trace_reference: np.ndarray | None = None) -> np.ndarray:
        """:meth:`score_places` of a stage with a triage (:meth:`triage_first`): a place under the
        triage's cut-off keeps the triage's probabilities, the others are read whole (their
        re-centred places too, their own columns not again) by the stage's trees."""
        places = np.asarray(places, float).reshape(-1, 3)
        p_network = np.asarray(p_network, np.float32).reshape(-1, 3)
        trace_reference = self._trace_reference(vol, lungs, noise, trace_reference)  # once, for both looks
        own, p, passed = self.triage_first(vol, places, p_network, lungs, noise, trace_reference)
        if len(passed):
            p[passed] = self.probabilities(self.rows(vol, places[passed], p_network[passed], noise, lungs, trace_reference, own[passed]))
        return p

    def arrays(self) -> dict[str, np.ndarray]:
        """The trees as plain arrays (what :meth:`save` writes)."""
        return {"feature": self.feature, "split": self.split, "left": self.left, "right": self.right, "value": self.value,
                "tree_class": self.tree_class, "baseline": self.baseline, "rate": np.float64(self.rate),
                "meta": np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8)}

    def save(self, path: str | Path) -> Path:
        """One ``.npz`` of plain arrays: the trees, a nodule check's trees under ``nodule_``, a
        triage's under ``triage_`` and the trace-blind trees under ``blind_``."""
        path = Path(path)
        nodules = {} if self.nodules is None else {NODULE_PREFIX + k: v for k, v in self.nodules.arrays().items()}
        triage = {} if self.triage is None else {TRIAGE_PREFIX + k: v for k, v in self.triage.arrays().items()}
        blind = {} if self.blind is None else {BLIND_PREFIX + k: v for k, v in self.blind.arrays().items()}
        np.savez_compressed(path, **self.arrays(), **nodules, **triage, **blind)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Verifier:
        """Reads a saved verifier, or a one-line error naming the file."""
        try:
            with np.load(path, allow_pickle=False) as d:
                arrays = {k: d[k] for k in TREE_KEYS}
                nodules = {k: d[NODULE_PREFIX + k] for k in TREE_KEYS} if NODULE_PREFIX + "feature" in d.files else None
                triage = {k: d[TRIAGE_PREFIX + k] for k in TREE_KEYS} if TRIAGE_PREFIX + "feature" in d.files else None
                blind = {k: d[BLIND_PREFIX + k] for k in TREE_KEYS} if BLIND_PREFIX + "feature" in d.files else None
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise InputError(f"not a ctguard verifier (.npz of trees): {e.__class__.__name__}", path) from None
        verifier = cls._from_arrays(arrays)
        if verifier.meta.get("nodule_check"):
            if nodules is None:
                raise InputError("this second stage has a nodule check but its trees are missing from the file", path)
            verifier.nodules = cls._from_arrays(nodules)
        if verifier.meta.get("triage") is not None:
            if triage is None:
                raise InputError("this second stage has a triage but its trees are missing from the file", path)
            verifier.triage = cls._from_arrays(triage)
        if verifier.meta.get("blind"):
            if blind is None:
                raise InputError("this second stage has trace-blind trees but they are missing from the file", path)
            verifier.blind = cls._from_arrays(blind)
        if float(verifier.meta.get("patch_weight", 0.0)):  # its patch CNN beside it: model.verifier.npz -> model.patches.onnx
            from ctguard.patches import PatchScorer

            cnn = Path(path).with_name(Path(path).name.removesuffix(".verifier.npz") + ".patches.onnx")
            if not cnn.is_file():
                raise InputError(f"this second stage needs its patch CNN beside it ({cnn.name}), which is missing", path)
            verifier.patches = PatchScorer(cnn)
        return verifier

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray]) -> Verifier:
        arrays = dict(arrays)
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        rate = float(arrays.pop("rate"))
        return cls(**arrays, rate=rate, meta=meta)

    @classmethod
    def from_sklearn(cls, clf, x_probe: np.ndarray, meta: dict, columns: np.ndarray | None = None) -> Verifier:
        """From a fitted three-class (or two-class) ``sklearn.ensemble.GradientBoostingClassifier``
        (its public tree arrays) or ``HistGradientBoostingClassifier`` (its fitted predictors' node
        records); the constant start is recovered from ``decision_function`` on one row. ``clf`` was
        fitted on ``x[:, columns]`` (all of a row when None); the trees read whole rows ``x``. Two
        classes: every tree adds to the second class's raw score, the first's stays 0."""
        columns = np.arange(x_probe.shape[1]) if columns is None else np.asarray(columns)
        n_classes = len(clf.classes_)
        if hasattr(clf, "estimators_"):
            trees = [(est.tree_.feature, est.tree_.threshold, est.tree_.children_left, est.tree_.children_right, est.tree_.value[:, 0, 0])
                     for stage in clf.estimators_ for est in stage]
            classes = [k + (n_classes == 2) for stage in clf.estimators_ for k in range(len(stage))]
            rate = float(clf.learning_rate)
        else:  # histogram trees (read from scikit-learn's fitted predictors, a private attribute: the test
            # test_verifier_trees_match_sklearn checks every version CI installs); leaf values already carry
            # the learning rate; no missing values reach them (rows pass through finite_rows to fit and to score)
            trees, classes = [], []
            for step in clf._predictors:
                for k, pred in enumerate(step):
                    n = pred.nodes
                    leaf = n["is_leaf"].astype(bool)
                    feature, left, right = (np.where(leaf, -1, n[key].astype(np.int64)) for key in ("feature_idx", "left", "right"))
                    trees.append((feature, n["num_threshold"], left, right, n["value"]))
                    classes.append(k + (n_classes == 2))
            rate = 1.0
        width = max(len(t[0]) for t in trees)

        def pad(i, fill, dtype, f=lambda a: a):
            out = np.full((len(trees), width), fill, dtype=dtype)
            for j, t in enumerate(trees):
                out[j, : len(t[i])] = f(np.asarray(t[i]))
            return out

        v = cls(feature=pad(0, -1, np.int16, lambda f: np.where(f >= 0, columns[np.maximum(f, 0)], -1)),
                split=pad(1, 0.0, np.float32, float32_at_or_below), left=pad(2, -1, np.int16), right=pad(3, -1, np.int16),
                value=pad(4, 0.0, np.float32), tree_class=np.asarray(classes, np.int8), baseline=np.zeros(n_classes), rate=rate, meta=meta)
        probe = np.asarray(x_probe[:1], np.float32)
        trees_only = np.log(v.probabilities(probe)[0].astype(np.float64))  # softmax of the trees' sums, up to a constant
        decision = clf.decision_function(probe[:, columns])[0]
        if n_classes == 2:  # the decision is the second class's raw score less the first's
            v.baseline = np.array([0.0, decision - (trees_only[1] - trees_only[0])])
        else:
            v.baseline = (decision - trees_only).astype(np.float64)
        v.baseline -= v.baseline.mean()
        return v


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Feature rows as the trees are fitted on and read them: float32, NaN as 0 and infinities as
    +-1e6 (so no missing value ever reaches a tree)."""
    return np.nan_to_num(np.asarray(x, np.float32), nan=0.0, posinf=1e6, neginf=-1e6)


def float32_at_or_below(split: np.ndarray) -> np.ndarray:
    """The largest float32 at or below each float64 split, so that ``x <= split`` is the same test
    for every float32 ``x`` (plain rounding may round a split up onto the next value of ``x``)."""
    s = np.asarray(split, np.float64)
    out = s.astype(np.float32)
    up = out.astype(np.float64) > s
    out[up] = np.nextafter(out[up], np.float32(-np.inf))
    return out
