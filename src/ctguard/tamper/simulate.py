"""Make CT-GAN-style labelled deepfakes from real scans (or phantoms), in the CT-GAN layout.

For each source scan the simulator writes an untouched control (TM when the scan has a known
real tumour, else TB), ``inject`` copies with fake nodules (FM) and ``remove`` copies with a real
tumour erased (FB). Every edit is recorded in ``manifest.json``; the same seed rebuilds the same
dataset bit for bit.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from scipy import ndimage

from ctguard import __version__
from ctguard import io
from ctguard.data.ctgan import KAGGLE_DIRS
from ctguard.errors import InputError
from ctguard.lung import lung_depth, lung_mask, parenchyma_sites, pleural_sites
from ctguard.tamper.base import Edit
from ctguard.tamper.inject import NoduleInjector
from ctguard.tamper.nodules import NODULE_TYPES, NoduleSpec
from ctguard.tamper.remove import LesionRemover, grow_lesion
from ctguard.volume import Volume


@dataclass
class Tumour:
    """A known real lesion: centre voxel ``(z, y, x)``, size, and its mask when known."""

    voxel: np.ndarray
    diameter_mm: float
    mask: np.ndarray | None = None


@dataclass
class Source:
    name: str
    volume: Volume
    patient: str
    tumours: list[Tumour] = field(default_factory=list)


def tumours_from_voc(vol: Volume, annotations: str | Path) -> list[Tumour]:
    """Real tumours from PASCAL-VOC boxes keyed by SOPInstanceUID (Lung-PET-CT-Dx's annotations).

    Boxes on adjacent slices that overlap are one tumour; its mask is the dense (> -500 HU) part
    of the ellipses inscribed in the boxes, its centre the mask's centroid.
    """
    uids = vol.meta.get("sop_instance_uids") or []
    index = {u: z for z, u in enumerate(uids)}
    boxes = np.zeros(vol.shape, dtype=bool)
    for xml in sorted(Path(annotations).rglob("*.xml")):
        z = index.get(xml.stem)
        if z is None:
            continue
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise InputError(f"bad annotation XML ({e})", xml) from None
        for b in root.iter("bndbox"):
            x0, y0, x1, y1 = (int(float(b.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
            # The ellipse inscribed in the box: keeps the chest wall in the box's corners out.
            yy, xx = np.ogrid[y0 : y1 + 1, x0 : x1 + 1]
            cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, max((y1 - y0) / 2, 1), max((x1 - x0) / 2, 1)
            boxes[z, y0 : y1 + 1, x0 : x1 + 1] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if not boxes.any():
        return []
    labels, n = ndimage.label(boxes)
    out = []
    for i in range(1, n + 1):
        region = labels == i
        mask = region & (vol.hu > -500)
        if mask.sum() < 10:
            continue
        lab, k = ndimage.label(mask)
        sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, k + 1))
        out.append(tumour_of(lab == (int(np.argmax(sizes)) + 1), vol.spacing))
    return out


def tumour_of(mask: np.ndarray, spacing) -> Tumour:
    """The tumour a mask outlines: its centroid, and twice the farthest voxel's distance from it."""
    pts = np.argwhere(mask)
    centre = pts.mean(0)
    return Tumour(centre, 2 * float(np.max(np.linalg.norm((pts - centre) * np.asarray(spacing), axis=1))), mask)


def tumours_from_labelmap(vol: Volume, labelmap: str | Path) -> list[Tumour]:
    """Real tumours from a segmentation label map (NRRD, NIfTI, MHD) on the scan's own voxel grid:
    every connected non-zero region of 10 voxels or more is one tumour, its mask that region.

    Raises:
        InputError: the label map cannot be read, or lies on another grid than the scan.
    """
    lab = io.read(labelmap)
    if lab.shape != vol.shape or not np.allclose(lab.spacing, vol.spacing, rtol=1e-3):
        raise InputError(f"the label map is {list(lab.shape)} voxels of {[round(s, 3) for s in lab.spacing]} mm, the scan "
                         f"{list(vol.shape)} of {[round(s, 3) for s in vol.spacing]} mm: it must lie on the scan's voxel grid", labelmap)
    labels, n = ndimage.label(lab.hu > 0, structure=np.ones((3, 3, 3), bool))
    masks = (labels == i for i in range(1, n + 1))
    return [tumour_of(m, vol.spacing) for m in masks if m.sum() >= 10]


def tumours_from(vol: Volume, annotations: str | Path | None, roi: str | None = None) -> list[Tumour]:
    """The scan's known real tumours: from a folder of PASCAL-VOC boxes (:func:`tumours_from_voc`),
    an LIDC-IDRI annotation XML (:mod:`ctguard.io.lidc`: each nodule the union of its readers'
    outlines), a DICOM RTSTRUCT (its ROIs named like ``roi``, default ``GTV*``) or SEG of the series
    (:mod:`ctguard.io.rtstruct`), a label-map file (:func:`tumours_from_labelmap`), or none without
    ``annotations``. ``roi`` with any annotation but an RTSTRUCT is an error, not left unused."""
    if not annotations:
        return []
    from ctguard.io import lidc, rtstruct

    kind = ("voc" if Path(annotations).is_dir() else "lidc" if lidc.is_lidc_xml(annotations)
            else rtstruct.dicom_kind(annotations) or "label map")
    if roi is not None and kind != "rtstruct":
        what = {"voc": "a folder of PASCAL-VOC boxes", "lidc": "an LIDC-IDRI XML", "seg": "a DICOM SEG"}.get(kind, "a label map")
        raise InputError(f"--roi {roi!r} names an RTSTRUCT's ROIs; these annotations are {what}", annotations)
    if kind == "voc":
        return tumours_from_voc(vol, annotations)
    if kind == "lidc":
        return [tumour_of(m, vol.spacing) for m in lidc.nodules(vol, annotations)]
    if kind == "rtstruct":
        return [tumour_of(m, vol.spacing) for _, m in rtstruct.rtstruct_masks(vol, annotations, roi or "GTV*")]
    if kind == "seg":
        return [tumour_of(m, vol.spacing) for _, m in rtstruct.seg_masks(vol, annotations)]
    return tumours_from_labelmap(vol, annotations)


def phantom_source(seed: int, shape=(80, 192, 192), spacing=(2.0, 1.9, 1.9), with_tumour: bool | None = None,
                   noise_hu: float = 20.0, grain: float = 0.7, opacities: int = 0) -> Source:
    """A phantom chest as a simulation source; about half have one genuine nodule (a TM control)."""
    from ctguard.data.phantom import make_chest

    rng = np.random.default_rng([seed, 99])
    if with_tumour is None:
        with_tumour = bool(rng.random() < 0.5)
    nodules = []
    if with_tumour:
        side = rng.choice([0.3, 0.7])
        nodules = [{"fraction": (rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.55), side + rng.uniform(-0.04, 0.04)),
                    "diameter_mm": float(rng.uniform(8, 22)), "kind": str(rng.choice(["solid", "lobulated", "spiculated", "part-solid"]))}]
    vol = make_chest(shape, spacing, seed=seed, nodules=nodules, noise_hu=noise_hu, grain=grain, opacities=opacities)
    tumours = []
    for n in vol.meta["phantom"]["nodules"]:
        # The phantom knows its nodule exactly: a ball a little wider than its outline.
        centre = np.asarray(n["voxel"])
        zz, yy, xx = (((np.arange(k) - c) * s) ** 2 for k, c, s in zip(vol.shape, centre, vol.spacing))
        mask = np.sqrt(zz[:, None, None] + yy[None, :, None] + xx[None, None, :]) <= n["diameter_mm"] * 0.6 + 1.0
        tumours.append(Tumour(centre, n["diameter_mm"], mask))
    return Source(f"phantom-{seed}", vol, f"phantom-{seed}", tumours)


def thick_slice_source(src: Source, factor: int) -> Source:
    """The same patient reconstructed ``factor`` times thicker: each run of ``factor`` slices
    averaged into one (a partial-volume slab, as a thick-slice reconstruction gives). Real anatomy
    at a slice thickness the source does not have; tumours and their masks follow."""
    vol = src.volume
    n = vol.shape[0] // factor
    if factor < 2 or n < 2:
        raise InputError(f"{src.name}: cannot make {factor}x thicker slices from {vol.shape[0]} slices")

    def slabs(a: np.ndarray) -> np.ndarray:  # (n, factor, y, x): the slices each thick one is made of
        return a[: n * factor].reshape(n, factor, *a.shape[1:])

    hu = slabs(vol.hu).mean(1)
    shift = (factor - 1) / 2.0 * vol.spacing[0]
    origin = tuple(float(o) for o in np.asarray(vol.origin) + np.asarray(vol.direction)[:, 2] * shift)
    meta = {k: v for k, v in vol.meta.items() if k not in ("files", "sop_instance_uids")}
    meta["slice_thickness"] = vol.spacing[0] * factor
    thick = Volume(np.rint(hu).astype(np.float32), (vol.spacing[0] * factor, *vol.spacing[1:]), origin, vol.direction, meta)
    tumours = []
    for t in src.tumours:
        voxel = np.asarray(t.voxel, float) - [(factor - 1) / 2.0, 0.0, 0.0]
        voxel[0] /= factor
        mask = None if t.mask is None else slabs(t.mask).any(1)
        if 0 <= voxel[0] <= n - 1:
            tumours.append(Tumour(voxel, t.diameter_mm, mask))
    return Source(f"{src.name} ({factor}x thicker slices)", thick, src.patient, tumours)


def coronal_reformat(vol: Volume, thickness_mm: float = 3.0) -> Volume:
    """The scan (an axial series) as a console's coronal reformat: slabs ``thickness_mm`` thick and
    as far apart, front to back, each the mean of the scan over its thickness
    (:func:`ctguard.crosscheck.onto`), rows from head to feet and columns as the scan's, both at
    its pixel size. The same frame of reference: what a scanner files beside its axial series."""
    from ctguard.crosscheck import onto

    d = np.asarray(vol.direction, float)
    dz, dy, dx = vol.spacing
    direction = np.column_stack([d[:, 0], -d[:, 2], d[:, 1]])  # columns: the scan's x; rows: down the body; slices: front to back
    shape = (int(vol.shape[1] * dy // thickness_mm), int((vol.shape[0] - 1) * dz // dx) + 1, vol.shape[2])
    origin = np.asarray(vol.origin) + (vol.shape[0] - 1) * dz * d[:, 2] + (thickness_mm - dy) / 2 * d[:, 1]
    meta = {k: v for k, v in vol.meta.items() if k not in ("files", "sop_instance_uids", "signed")}
    meta["slice_thickness"] = thickness_mm
    grid = Volume(np.zeros(shape, np.float32), (thickness_mm, dx, dx), tuple(float(o) for o in origin), direction, meta)
    hu, covered = onto(vol, grid)
    grid.hu = np.rint(np.where(covered, hu, -1024.0)).astype(np.float32)
    return grid


SLICE_MM = (1.0, 1.25, 2.0, 2.5, 3.0, 5.0, 8.0)  # slice spacings seen in chest CT (CT-GAN's data: 0.625-2.5)


def acquisition(seed: int) -> dict:
    """A random scanner set-up for a phantom: slice spacing, pixel size, field of view, noise level
    and grain (reconstruction kernel). The same seed gives the same set-up."""
    rng = np.random.default_rng([seed, 98])
    sz = float(rng.choice(SLICE_MM))
    pixel = float(np.round(rng.uniform(0.6, 1.0), 3))
    n = int(16 * np.round(rng.uniform(240.0, 330.0) / pixel / 16))
    nz = int(np.clip(np.round(rng.uniform(120.0, 200.0) / sz), 24, 12_000_000 // (n * n)))
    return {"shape": (nz, n, n), "spacing": (sz, pixel, pixel), "noise_hu": float(np.round(rng.uniform(10.0, 50.0), 1)),
            "grain": float(np.round(rng.uniform(0.4, 1.2), 2))}


def varied_phantom_source(seed: int, with_tumour: bool | None = None, opacities: int = 0) -> Source:
    """:func:`phantom_source` under a random :func:`acquisition`: detectors trained on many set-ups
    meet a new scanner better than ones trained on one. ``opacities``: at most this many genuine
    hazy patches (ground glass, consolidation), the number drawn from the seed."""
    count = int(np.random.default_rng([seed, 16]).integers(0, opacities + 1)) if opacities else 0
    return phantom_source(seed, with_tumour=with_tumour, opacities=count, **acquisition(seed))


def _sample_spec(rng: np.random.Generator, sizes: tuple[float, float]) -> NoduleSpec:
    kind = str(rng.choice(NODULE_TYPES))
    return NoduleSpec(kind, float(np.round(rng.uniform(*sizes), 1)), int(rng.integers(2**31)))


def inject_random(vol: Volume, lungs: np.ndarray, rng: np.random.Generator, n: int = 1,
                  sizes: tuple[float, float] = (6.0, 20.0), avoid: list[np.ndarray] | None = None,
                  depth: np.ndarray | None = None) -> tuple[Volume, list[Edit]]:
    """Injects ``n`` nodules of random types and sizes at sampled parenchyma sites, 30 mm apart
    (``depth``: the lungs' :func:`ctguard.lung.lung_depth`, computed here when not given)."""
    depth = lung_depth(vol, lungs) if depth is None else depth
    edits: list[Edit] = []
    taken = [np.asarray(a, float) for a in (avoid or [])]
    spacing = np.asarray(vol.spacing)
    for _ in range(n):
        for _attempt in range(30):
            spec = _sample_spec(rng, sizes)
            radius = spec.diameter_mm / 2
            sites = (pleural_sites(vol, lungs, radius, depth) if spec.kind == "juxta-pleural"
                     else parenchyma_sites(vol, lungs, radius + 3.0, depth=depth))
            if len(sites) == 0:
                continue
            site = sites[rng.integers(len(sites))].astype(float)
            if any(np.linalg.norm((site - t) * spacing) < 30.0 for t in taken):
                continue
            try:
                vol, edit = NoduleInjector(spec, lungs=lungs)(vol, site, rng)
            except InputError:
                continue
            edits.append(edit)
            taken.append(site)
            break
        else:
            raise InputError(f"found no site in the lungs for {n} nodules")
    return vol, edits


def remove_tumour(vol: Volume, tumour: Tumour, rng: np.random.Generator) -> tuple[Volume, Edit]:
    remover = LesionRemover(mask=tumour.mask, max_radius_mm=tumour.diameter_mm / 2 + 4.0)
    return remover(vol, tumour.voxel, rng)


# The demo's scanner set-up: a chest CT as hospitals reconstruct it for reading (2.5 mm slices,
# 0.78 mm pixels over a 300 mm field), where an edit pasted through a 1 mm cube leaves the
# resampling trace the detector reads (ctguard.verifier.resampling_trace); the phantoms' default
# set-up (2 mm slices, 1.9 mm pixels) is a quick one for tests.
DEMO_SHAPE = (64, 384, 384)
DEMO_SPACING = (2.5, 0.78, 0.78)


def tampered_phantom(seed: int, edit_seed: int, shape=(80, 192, 192), spacing=(2.0, 1.9, 1.9)) -> tuple[Volume, list[Edit]]:
    """A phantom chest (of the one quick set-up unless ``shape`` and ``spacing`` say otherwise) with
    one nodule of 10-16 mm injected and its own tumour removed. At :data:`DEMO_SHAPE`,
    :data:`DEMO_SPACING` it is the tests' tampered phantom (seed 4242) and the scan ``ctguard demo``
    screens (``edit_seed`` = ``seed``). Returns the volume and its edits (the injection first)."""
    src = phantom_source(seed, shape=shape, spacing=spacing, with_tumour=True)
    rng = np.random.default_rng(edit_seed)
    vol, injected = inject_random(src.volume, lung_mask(src.volume), rng, n=1, sizes=(10.0, 16.0), avoid=[t.voxel for t in src.tumours])
    vol, removed = remove_tumour(vol, src.tumours[0], rng)
    return vol, injected + [removed]


def variants(src: Source, seed: int, inject: int, remove: int, per_scan: int = 1,
             sizes: tuple[float, float] = (6.0, 20.0), inject_families: tuple[str, ...] | list[str] = ("drawn",),
             remove_families: tuple[str, ...] | list[str] = ("fill",), healthy: int = 0) -> Iterator[tuple[str, Volume, list[Edit]]]:
    """The labelled scans made from one source: ``(label, volume, edits)``; the control first.

    FM copy ``k`` is made by injection family ``inject_families[k % n]`` (``moved`` falls back to
    ``drawn`` on a scan without an outlined tumour), FB copy ``k`` of a real tumour by removal family
    ``remove_families[k % n]``, and ``healthy`` more FB copies each in-paint ``per_scan`` healthy
    places (see :mod:`ctguard.tamper.families`). The defaults make what the simulator always made."""
    from ctguard.tamper.families import check_families, inject_moved, movable, remove_healthy, remover

    check_families(inject_families, remove_families)
    yield ("TM" if src.tumours else "TB"), src.volume, []
    lungs = lung_mask(src.volume)
    if not lungs.any():
        raise InputError(f"no lungs found in {src.name}")
    depth = lung_depth(src.volume, lungs) if inject or healthy or "clone" in remove_families else None
    avoid = [t.voxel for t in src.tumours]
    for k in range(inject):
        rng = np.random.default_rng([seed, 1, k])
        family = inject_families[k % len(inject_families)]
        moved = None
        if family == "moved" and movable(src.tumours, src.volume.spacing):
            try:
                moved = inject_moved(src.volume, lungs, depth, src.tumours, rng, per_scan, avoid=avoid)
            except InputError:  # no place in this scan's lungs for its tumours: drawn nodules instead
                pass
        if moved is None:
            vol, edits = inject_random(src.volume, lungs, rng, per_scan, sizes, avoid=avoid, depth=depth)
            for e in edits:
                e.extra = {**e.extra, "family": "drawn"}
        else:
            vol, edits = moved
        yield "FM", vol, edits
    for k in range(remove if src.tumours else 0):
        rng = np.random.default_rng([seed, 2, k])
        family = remove_families[k % len(remove_families)]
        tumour = src.tumours[k % len(src.tumours)]
        if family == "fill":
            vol, edit = remove_tumour(src.volume, tumour, rng)
        else:
            mask = tumour.mask if tumour.mask is not None else grow_lesion(src.volume, np.asarray(tumour.voxel, float), tumour.diameter_mm / 2 + 4.0)
            vol, edit = remover(family, src.volume, mask, depth, rng, np.asarray(tumour.voxel, float))(src.volume, tumour.voxel, rng)
        edit.extra = {**edit.extra, "family": family, "target": "tumour"}
        yield "FB", vol, [edit]
    for k in range(healthy):
        rng = np.random.default_rng([seed, 3, k])
        vol, edits = remove_healthy(src.volume, depth, rng, per_scan, remove_families[k % len(remove_families)], avoid=avoid)
        yield "FB", vol, edits


def _write_scan(vol: Volume, folder: Path, uuid: str, seed: int) -> None:
    names = [f"{z}.dcm" for z in range(vol.shape[0])]
    if vol.meta.get("kind") == "dicom-series" and vol.meta.get("files"):
        io.write_back(vol, folder, names=names)
    else:
        io.write_series(vol, folder, patient_id=uuid, name_pattern="{index}.dcm", uid_seed=f"{seed}-{uuid}")


def check_edits(inject_families, remove_families, healthy: int) -> None:
    """That the edit families are ones :mod:`ctguard.tamper.families` makes and ``healthy`` is a
    whole number from 0, or a one-line error (before any scan is read)."""
    from ctguard.tamper.families import check_families

    check_families(inject_families, remove_families)
    if isinstance(healthy, bool) or not isinstance(healthy, int) or healthy < 0:
        raise InputError(f"healthy copies (--healthy) must be a whole number, 0 or more, not {healthy!r}")


def simulate(
    sources: list[Source],
    out_dir: str | Path,
    inject: int = 2,
    remove: int = 1,
    per_scan: int = 1,
    seed: int = 0,
    sizes: tuple[float, float] = (6.0, 20.0),
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    inject_families: tuple[str, ...] | list[str] = ("drawn",),
    remove_families: tuple[str, ...] | list[str] = ("fill",),
    healthy: int = 0,
) -> dict:
    """Writes a simulated CT-GAN dataset (Kaggle layout, experiment 1) with labels and manifest.

    Args:
        sources: the scans to tamper with.
        out_dir: a folder that does not exist yet; it appears only when complete.
        inject: FM copies per source. Defaults to 2.
        remove: FB copies per source with a known tumour. Defaults to 1.
        per_scan: nodules injected into each FM copy. Defaults to 1.
        seed: the seed; the same seed and sources give the same bytes. Defaults to 0.
        sizes: injected nodule diameters (mm), uniform in this range. Defaults to 6-20.
        progress: show a progress bar. Defaults to True.
        inject_families: how the FM copies are made, in turn (:mod:`ctguard.tamper.families`:
            ``drawn``, ``moved``). Defaults to drawn nodules.
        remove_families: how the FB copies' tumours are erased, in turn (``fill``, ``clone``).
            Defaults to fill.
        healthy: more FB copies per source, each with ``per_scan`` healthy places in-painted by the
            removal families in turn (no tumour needed). Defaults to 0.

    Returns:
        The manifest (also written to ``manifest.json``).
    """
    from tqdm import tqdm

    check_edits(inject_families, remove_families, healthy)

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise InputError("already exists; will not overwrite", out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    uuid_rng = np.random.default_rng([seed, 7])
    per_source = 1 + inject + remove + healthy
    uuids = [str(u) for u in uuid_rng.choice(np.arange(1000, 10000), size=len(sources) * per_source, replace=False)]
    scans_dir = tmp / KAGGLE_DIRS[1]
    rows: list[list] = []
    manifest = {"created_by": f"ctguard {__version__}", "seed": seed, "inject": inject, "remove": remove,
                "per_scan": per_scan, "sizes_mm": list(sizes), "layout": "kaggle",
                **({"inject_families": list(inject_families), "remove_families": list(remove_families), "healthy": healthy}
                   if (list(inject_families), list(remove_families), healthy) != (["drawn"], ["fill"], 0) else {}),
                "scans": []}
    bar = tqdm(total=len(sources) * per_source, desc="simulate", unit="scan", disable=not progress)
    try:
        for i, src in enumerate(sources):
            if remove and not src.tumours and echo:
                echo(f"note: {src.name}: no known tumour (--annotations names them), so no removal copy of it")
            for label, vol, edits in variants(src, seed * 100003 + i, inject, remove, per_scan, sizes, inject_families=tuple(inject_families),
                                              remove_families=tuple(remove_families), healthy=healthy):
                uuid = uuids.pop(0)
                _write_scan(vol, scans_dir / uuid, uuid, seed)
                if label == "TB":
                    rows.append(["TB", uuid, 0, 0, 0])
                elif label == "TM":
                    rows += [["TM", uuid, *np.rint(t.voxel).astype(int).tolist()] for t in src.tumours]
                else:
                    rows += [[label, uuid, *np.rint(e.voxel).astype(int).tolist()] for e in edits]
                manifest["scans"].append({
                    "uuid": uuid, "experiment": 1, "label": label, "patient": src.patient, "source": src.name,
                    "shape": list(vol.shape), "spacing_mm": list(vol.spacing),
                    "edits": [_rounded(e.to_dict()) for e in edits],
                    "tumours": [{"voxel": [round(float(v), 2) for v in t.voxel], "diameter_mm": round(float(t.diameter_mm), 2)}
                                for t in src.tumours],
                })
                bar.update(1)
        with open(tmp / "labels_exp1.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["type", "uuid", "slice", "x", "y"])
            for t, u, z, y, x in rows:
                w.writerow([t, u, z, x, y])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, out_dir)
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if echo:
        counts = {c: sum(1 for s in manifest["scans"] if s["label"] == c) for c in ("TB", "TM", "FB", "FM")}
        echo(f"wrote {len(manifest['scans'])} scans to {out_dir} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return manifest


def _rounded(value):
    """A manifest's record with its places and sizes to 0.01 voxel or mm."""
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value
