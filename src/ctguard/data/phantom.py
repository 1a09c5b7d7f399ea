"""A seeded synthetic chest CT phantom of any size and spacing.

Body outline, subcutaneous fat, muscle, mediastinum with heart and aorta, spine and ribs, two
lungs with a branching vessel tree and airways, optional nodules, then a scanner blur and
correlated noise. Geometry is defined in millimetres and scaled to the field of view, so a small
test phantom and a 512x512x300 benchmark phantom are the same chest at different resolutions.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from scipy import ndimage
from scipy.special import expit

from ctguard.tamper.nodules import NoduleSpec, extent_mm, render
from ctguard.volume import Volume

AIR, FAT, MUSCLE, BLOOD, LUNG = -1000.0, -95.0, 45.0, 40.0, -860.0
CORTICAL, CANCELLOUS = 750.0, 230.0


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Signed 'radius' <1 inside an ellipse (normalised distance)."""
    return np.sqrt(((xx - cx) / max(ax, 1e-6)) ** 2 + ((yy - cy) / max(ay, 1e-6)) ** 2)


def _tree(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float, radius: float,
          depth: int, out: list[tuple[np.ndarray, np.ndarray, float]]) -> None:
    """A recursive bifurcating tree of segments (start, end, radius), in mm."""
    end = start + direction * length
    out.append((start, end, radius))
    if depth == 0 or radius < 0.6:
        return
    for sign in (-1.0, 1.0):
        axis = np.cross(direction, rng.normal(size=3))
        axis /= np.linalg.norm(axis) + 1e-9
        angle = sign * rng.uniform(0.35, 0.7)
        # Rodrigues rotation of the parent direction about a random perpendicular axis.
        d = direction * np.cos(angle) + np.cross(axis, direction) * np.sin(angle)
        d += rng.normal(scale=0.08, size=3)
        d /= np.linalg.norm(d)
        _tree(rng, end, d, length * rng.uniform(0.72, 0.88), radius * rng.uniform(0.68, 0.8), depth - 1, out)


def _paint_tubes(shape, spacing, origin_mm, segments, hu_inside, volume, allowed, wall_hu=None, wall_mm=0.0):
    """Paints tubes (segments with radii) into ``volume`` where ``allowed`` is True.

    Rasterises centre lines, then one Euclidean distance transform (with the nearest centre-line
    voxel's index) gives every voxel its distance to the tree and that branch's radius.
    """
    radius_map = np.zeros(shape, dtype=np.float32)
    sp = np.asarray(spacing)
    for a, b, r in segments:
        n = int(np.ceil(np.linalg.norm(b - a) / (0.5 * sp.min()))) + 1
        pts = a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)
        idx = np.rint((pts - origin_mm) / sp).astype(int)
        ok = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
        idx = idx[ok]
        cur = radius_map[idx[:, 0], idx[:, 1], idx[:, 2]]
        radius_map[idx[:, 0], idx[:, 1], idx[:, 2]] = np.maximum(cur, r)
    if not radius_map.any():
        return
    # Only the box the tubes can paint: every centre-line voxel and a reach past the widest tube at
    # which the edge's weight (a logistic of 0.35 voxel) has fallen under 0.02; the distances there
    # are those of the whole volume, since every centre-line voxel lies inside the box.
    reach = float(radius_map.max()) + wall_mm + 2.0 * float(sp.max())
    pts = np.argwhere(radius_map > 0)
    pad = np.ceil(reach / sp).astype(int) + 1
    lo, hi = np.maximum(pts.min(0) - pad, 0), np.minimum(pts.max(0) + pad + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    radius_map, sub, allowed = radius_map[box], volume[box], allowed[box]
    dist, nearest = ndimage.distance_transform_edt(radius_map == 0, sampling=spacing, return_indices=True)
    r = radius_map[tuple(nearest)]
    inside = expit((r - dist) / (0.35 * sp.min()))
    if wall_hu is not None:
        wall = expit((r + wall_mm - dist) / (0.35 * sp.min()))
        np.copyto(sub, (wall * wall_hu + (1 - wall) * sub).astype(np.float32), where=allowed & (wall > 0.02))
    np.copyto(sub, (inside * hu_inside + (1 - inside) * sub).astype(np.float32), where=allowed & (inside > 0.02))


def _draw_opacities(hu: np.ndarray, lung: np.ndarray, spacing, rng: np.random.Generator, count: int) -> None:
    """Ground-glass and consolidation patches inside the lungs, in place: each a soft ellipsoid with
    a noisy edge and patchy inner density that raises lung HU towards -750..-450 and leaves the
    denser vessels as they are."""
    sp = np.asarray(spacing, float)
    pts = np.argwhere(lung[:, ::4, ::4]) * np.array([1, 4, 4])
    for _ in range(count if len(pts) else 0):
        c = pts[rng.integers(len(pts))]
        radii = rng.uniform(10.0, 30.0) * rng.uniform(0.6, 1.4, size=3)
        reach = np.ceil(1.5 * radii / sp).astype(int)
        lo, hi = np.maximum(c - reach, 0), np.minimum(c + reach + 1, lung.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.meshgrid(*[(np.arange(a, b) - ci) * si / ri for a, b, ci, si, ri in zip(lo, hi, c, sp, radii)], indexing="ij", sparse=True)
        dist = np.sqrt(sum(g**2 for g in grids))
        field = ndimage.gaussian_filter(rng.standard_normal(dist.shape).astype(np.float32), 3.0 / sp)
        field /= max(float(field.std()), 1e-6)
        weight = 1.0 / (1.0 + np.exp(-(4.0 * (1.0 - dist) + 1.2 * field)))
        target = rng.uniform(-750.0, -450.0) + 40.0 * field
        sub = hu[box]
        raise_ = np.where(lung[box] & (sub < target), weight * (target - sub), 0.0)
        hu[box] = sub + raise_.astype(np.float32)


def make_chest(
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing: tuple[float, float, float] = (2.5, 2.7, 2.7),
    seed: int = 0,
    nodules: list[dict] | None = None,
    noise_hu: float = 20.0,
    pad_value: float | None = None,
    grain: float = 0.7,
    opacities: int = 0,
) -> Volume:
    """Builds a chest CT phantom.

    Args:
        shape: ``(z, y, x)`` voxels. Defaults to ``(64, 128, 128)``.
        spacing: voxel size in mm ``(z, y, x)``. Defaults to ``(2.5, 2.7, 2.7)``.
        seed: the random seed; the same seed gives the same voxels. Defaults to 0.
        nodules: genuine nodules to draw: dicts with ``voxel`` ``(z, y, x)`` (or ``fraction``,
            a place given as fractions of the shape), ``diameter_mm`` and ``kind``. Defaults to none.
        noise_hu: standard deviation of the noise in water. Defaults to 20.
        pad_value: if set, voxels outside the scanner's circular field of view get this value
            (real scanners use -1024, -2048 or -3024). Defaults to None.
        grain: in-plane correlation of the noise (Gaussian sigma in voxels): small for a sharp
            reconstruction kernel, large for a smooth one. Defaults to 0.7.
        opacities: genuine hazy patches to draw in the lungs (ground glass to near consolidation,
            10-30 mm, irregular edges), the benign density a real lung has besides nodules.
            Defaults to none; with none the phantom is the same as without the option.

    Returns:
        A Volume (``meta["kind"] == "phantom"``). ``meta["phantom"]`` has the seed, the nodules
        drawn (with voxel centres) and ``meta["lung_mask"]`` the true lung mask.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sz, sy, sx = spacing
    fov_x, fov_y, fov_z = nx * sx, ny * sy, nz * sz
    scale = min(fov_x / 380.0, fov_y / 380.0)  # a chest 330 mm wide fills a 380 mm field of view
    body_ax, body_ay = 165.0 * scale * rng.uniform(0.95, 1.05), 115.0 * scale * rng.uniform(0.95, 1.05)
    ys = (np.arange(ny) - (ny - 1) / 2) * sy
    xs = (np.arange(nx) - (nx - 1) / 2) * sx
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    hu = np.full(shape, AIR, dtype=np.float32)
    lung = np.zeros(shape, dtype=bool)
    lung_dx = 78.0 * scale
    lung_ax, lung_ay = 54.0 * scale, 84.0 * scale
    zs = (np.arange(nz) - (nz - 1) / 2) * sz
    half_z = fov_z / 2.0
    rib_period = 24.0 * scale * 1.6
    rib_phase = rng.uniform(0, rib_period)
    for k, z in enumerate(zs):
        t = (z + half_z) / max(fov_z, 1e-6)  # 0 at the bottom (feet), 1 at the top (head)
        body = _ellipse(xx, yy, 0.0, 8.0 * scale, body_ax * (0.93 + 0.07 * np.sin(np.pi * t)), body_ay)
        sl = hu[k]
        sl[body < 1.0] = FAT
        sl[body < 0.92] = MUSCLE
        # Lungs: widest at the base, tapering to the apices; a diaphragm dome cuts the base.
        taper = np.clip(np.sin(np.pi * np.clip(0.08 + 0.92 * t, 0, 1)) ** 0.55, 0.0, 1.0) if nz > 1 else 1.0
        for side in (-1.0, 1.0):
            cx = side * lung_dx
            e = _ellipse(xx, yy, cx, -2.0 * scale, lung_ax * taper, lung_ay * taper)
            dome = t < 0.18 and ((xx - cx) ** 2 / (lung_ax**2) + (yy / lung_ay) ** 2) < (0.18 - t) * 4.0
            inside = (e < 1.0) & ~dome
            lung[k] |= inside
        heart = _ellipse(xx, yy, 14.0 * scale, -28.0 * scale, 50.0 * scale, 44.0 * scale)
        if t < 0.62:
            lung[k] &= heart > 1.12  # the heart indents the lungs
        # Dependent lung is denser (posterior, +y in LPS), as in a supine patient.
        lung_hu = LUNG + 45.0 * (yy / (lung_ay + 1e-6))
        sl[lung[k]] = lung_hu[lung[k]]
        # Mediastinum: heart (lower), aorta, fat around them.
        if t < 0.62:
            sl[(heart < 1.15) & ~lung[k]] = FAT * 0.6
            sl[(heart < 1.0) & ~lung[k]] = BLOOD
        aorta = _ellipse(xx, yy, 18.0 * scale, 42.0 * scale if t < 0.75 else 10.0 * scale, 13.0 * scale, 13.0 * scale)
        sl[(aorta < 1.0) & ~lung[k]] = BLOOD + 5.0
        # Spine: vertebral body (cortical shell, cancellous core), canal, posterior elements.
        vb = _ellipse(xx, yy, 0.0, 80.0 * scale, 19.0 * scale, 17.0 * scale)
        sl[vb < 1.0] = CORTICAL
        sl[vb < 0.82] = CANCELLOUS
        canal = _ellipse(xx, yy, 0.0, 104.0 * scale, 8.0 * scale, 7.0 * scale)
        lamina = _ellipse(xx, yy, 0.0, 110.0 * scale, 20.0 * scale, 7.0 * scale)
        sl[(lamina < 1.0)] = CORTICAL * 0.7
        sl[canal < 1.0] = 15.0
        # Ribs: oval cross-sections around the chest wall, at levels that shift along z.
        phase = ((z + rib_phase) % rib_period) / rib_period
        for j, ang in enumerate(np.linspace(0.35, np.pi - 0.35, 7)):
            for side in (-1.0, 1.0):
                if abs(((phase + 0.11 * j) % 1.0) - 0.5) > 0.22:
                    continue
                rx = side * np.cos(ang) * body_ax * 0.88
                ry = 8.0 * scale - np.sin(ang) * body_ay * 0.86 * (1 if j % 2 else -1) * (1 if ang < np.pi / 2 else 1)
                rib = _ellipse(xx, yy, rx, ry, 6.5 * scale + 1.0, 4.5 * scale + 0.8)
                sl[(rib < 1.0) & ~lung[k]] = CORTICAL * 0.85
                sl[(rib < 0.6) & ~lung[k]] = CANCELLOUS
    origin_mm = np.array([zs[0], ys[0], xs[0]])  # (z, y, x) mm of voxel 0, centred grid

    # Vessel tree and airways from each hilum, drawn only inside the lungs (plus hilar stems).
    if lung.any():
        segs = []
        airways = []
        for side in (-1.0, 1.0):
            hilum = np.array([0.0, -4.0 * scale, side * 28.0 * scale])
            for _ in range(9):
                d = np.array([rng.uniform(-1, 1), rng.uniform(-0.7, 0.7), side * rng.uniform(0.5, 1.0)])
                d /= np.linalg.norm(d)
                _tree(rng, hilum, d, 24.0 * scale, 3.8 * max(scale, 0.5), 7, segs)
            for _ in range(2):
                d = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.5, 0.3), side * rng.uniform(0.7, 1.0)])
                d /= np.linalg.norm(d)
                _tree(rng, hilum + np.array([0.0, -8.0 * scale, 0.0]), d, 26.0 * scale, 3.6 * max(scale, 0.5), 3, airways)
        near_hilum = ndimage.binary_dilation(lung, iterations=max(1, int(round(6.0 / min(spacing)))))
        _paint_tubes(shape, spacing, origin_mm, segs, BLOOD, hu, near_hilum)
        trachea = [(np.array([half_z, -6.0 * scale, 0.0]), np.array([0.0, -10.0 * scale, 0.0]), 8.0 * max(scale, 0.5))]
        trachea += [(np.array([0.0, -10.0 * scale, 0.0]), np.array([-10.0 * scale, -4.0 * scale, s * 28.0 * scale]), 5.5 * max(scale, 0.5)) for s in (-1, 1)]
        _paint_tubes(shape, spacing, origin_mm, trachea + airways, AIR, hu, np.ones(shape, bool), wall_hu=MUSCLE, wall_mm=1.6)

    _draw_opacities(hu, lung, spacing, np.random.default_rng([seed, 17]), opacities)

    drawn = []
    for i, nod in enumerate(nodules or []):
        spec = NoduleSpec(nod.get("kind", "solid"), float(nod.get("diameter_mm", 10.0)), int(nod.get("seed", seed * 1000 + i)))
        centre = np.asarray(nod["voxel"], float) if "voxel" in nod else np.asarray(nod["fraction"]) * (np.asarray(shape) - 1)
        reach = np.ceil(extent_mm(spec) / np.asarray(spacing)).astype(int)
        lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
        hi = np.minimum(np.floor(centre).astype(int) + reach + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        offsets = (np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1) - centre) * np.asarray(spacing)
        n_hu, alpha = render(spec, offsets)
        hu[box] = alpha * n_hu + (1.0 - alpha) * hu[box]
        drawn.append({**asdict(spec), "voxel": [float(c) for c in centre]})

    # Scanner: a point-spread blur, then noise with CT's fine-grained correlation.
    hu = ndimage.gaussian_filter(hu, sigma=[max(0.6 / s, 0.3) for s in spacing]).astype(np.float32)
    noise = rng.standard_normal(size=shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=[0.0, grain, grain])
    noise *= noise_hu / max(float(noise.std()), 1e-6)
    hu += noise
    if pad_value is not None:
        circle = _ellipse(xx, yy, 0.0, 0.0, fov_x / 2, fov_y / 2) > 1.0
        hu[:, circle] = pad_value
    if pad_value is None:
        np.clip(hu, -1024.0, 3071.0, out=hu)
    np.rint(hu, out=hu)
    origin = (float(xs[0]), float(ys[0]), float(zs[0]))
    meta = {
        "kind": "phantom",
        "modality": "CT",
        "warnings": [],
        "phantom": {"seed": seed, "nodules": drawn},
        "lung_mask": lung,
    }
    return Volume(hu, tuple(float(s) for s in spacing), origin, np.eye(3), meta)
