"""The one Python API that the CLI, the web app and the DICOM node call."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ctguard import io
from ctguard.errors import InputError
from ctguard.volume import Volume


def load(path: str | Path, series_uid: str | None = None, allow_modality: bool = False, progress: bool = False) -> Volume:
    """Reads a scan or image (see :func:`ctguard.io.read`)."""
    return io.read(path, series_uid=series_uid, allow_modality=allow_modality, progress=progress)


@contextlib.contextmanager
def loaded(path: str | Path, series_uid: str | None = None, allow_modality: bool = False) -> Iterator[Volume]:
    """:func:`load` as a block that also takes a zip of a series (as a PACS or TCIA exports it): the
    zip is unpacked into a temporary folder that lasts as long as the block (DICOM results and
    signature checks read the series' files again), and the volume's warnings and
    ``meta["archive"]`` name the zip, never that folder."""
    from ctguard.io.archive import is_zip, named_inside, unzipped

    if not is_zip(path):
        yield load(path, series_uid=series_uid, allow_modality=allow_modality)
        return
    with unzipped(path) as (inside, folder):
        vol = load(inside, series_uid=series_uid, allow_modality=allow_modality)
        vol.meta["warnings"] = [named_inside(w, folder, path) for w in vol.warnings]
        vol.meta["archive"] = str(path)
        yield vol


def info(path: str | Path, series_uid: str | None = None, allow_modality: bool = False) -> dict[str, Any]:
    """What a scan is: kind, modality, shape, spacing, HU range, series found and warnings.

    Returns:
        The object that ``ctguard info --json`` prints (see docs/DESIGN.md).
    """
    with loaded(path, series_uid=series_uid, allow_modality=allow_modality) as vol:
        meta = vol.meta
        series = meta.get("series") or (
            [{"uid": meta.get("series_uid", ""), "slices": vol.shape[0], "modality": meta.get("modality", "")}]
            if meta.get("kind", "").startswith("dicom")
            else []
        )
        return {
            "input": str(path),
            "kind": meta.get("kind"),
            "modality": meta.get("modality", ""),
            "shape": list(vol.shape),
            "spacing_mm": [round(float(s), 6) for s in vol.spacing],
            "origin_mm": [round(float(v), 4) for v in vol.origin],
            "hu_range": [float(np.min(vol.hu)), float(np.max(vol.hu))],
            "series_uid": meta.get("series_uid"),
            "patient_id": meta.get("patient_id"),
            "transfer_syntax": meta.get("transfer_syntax"),
            **({"scan": dict(meta["identity"])} if meta.get("identity") else {}),
            "series": series,
            "warnings": list(vol.warnings),
        }


def simulate(
    inputs: list[str | Path],
    out_dir: str | Path,
    inject: int = 2,
    remove: int = 1,
    per_scan: int = 1,
    phantoms: int = 0,
    annotations: str | Path | None = None,
    seed: int = 0,
    sizes: tuple[float, float] = (6.0, 20.0),
    progress: bool = True,
    echo=None,
    roi: str | None = None,
    inject_families: tuple[str, ...] | list[str] = ("drawn",),
    remove_families: tuple[str, ...] | list[str] = ("fill",),
    healthy: int = 0,
) -> dict:
    """Makes a labelled CT-GAN-layout dataset of deepfakes from real scans and/or phantoms.

    Args:
        inputs: scans to tamper with (DICOM folders are written back header-for-header).
        out_dir: the dataset folder to create.
        inject: FM copies per source. Defaults to 2.
        remove: FB copies per source that has a known tumour. Defaults to 1.
        per_scan: nodules per FM copy. Defaults to 1.
        phantoms: also use this many phantom chests (seeded from ``seed``). Defaults to 0.
        annotations: the sources' known real tumours (:func:`ctguard.tamper.simulate.tumours_from`):
            a folder of PASCAL-VOC XML boxes named by SOPInstanceUID, an LIDC-IDRI XML, a DICOM
            RTSTRUCT or SEG of the series, or a label-map file (NRRD/NIfTI/MHD) on the scan's voxel
            grid, whose connected non-zero regions are the tumours. Defaults to None.
        seed: random seed. Defaults to 0.
        sizes: injected nodule diameter range (mm). Defaults to (6, 20).
        roi: which RTSTRUCT ROIs are tumours, by name (a pattern, case-insensitive; only with an
            RTSTRUCT as ``annotations``). Defaults to ``GTV*``.
        inject_families: how the FM copies are made, in turn: ``drawn`` (a rendered nodule) or
            ``moved`` (a real tumour of the scan moved into healthy lung; drawn where the scan
            has none). Defaults to drawn.
        remove_families: how the FB copies' tumours are erased, in turn: ``fill`` or ``clone``
            (healthy lung copied over). Defaults to fill.
        healthy: more FB copies per source with ``per_scan`` healthy places in-painted (no tumour
            needed). Defaults to 0.

    Returns:
        The manifest written beside the labels.
    """
    from ctguard.tamper.simulate import Source, check_edits, phantom_source, simulate as _simulate, tumours_from

    check_edits(inject_families, remove_families, healthy)  # before any scan is read
    if roi is not None and not annotations:
        raise InputError("--roi names the tumours' ROIs of an RTSTRUCT: give it as --annotations")

    sources = []
    for path in inputs:
        vol = load(path, progress=progress)
        tumours = tumours_from(vol, annotations, roi=roi)
        patient = vol.meta.get("patient_id") or Path(path).name
        sources.append(Source(str(path), vol, patient, tumours))
    sources += [phantom_source(seed * 1000 + k) for k in range(phantoms)]
    if not sources:
        raise InputError("nothing to simulate from: give scans or --phantoms N")
    return _simulate(sources, out_dir, inject, remove, per_scan, seed, sizes, progress, echo,
                     inject_families=inject_families, remove_families=remove_families, healthy=healthy)


def screen(
    path: str | Path | Volume,
    json_out: str | Path | None = None,
    report_dir: str | Path | None = None,
    model: str | None = None,
    series_uid: str | None = None,
    threshold: float | None = None,
    progress: bool = False,
    truth: list[dict] | None = None,
    on_stage=None,
    viewer_dir: str | Path | None = None,
    dicom_out: str | Path | None = None,
    dicom_seg: bool = False,
    trust: str | Path | None = None,
    report_tampered_only: bool = False,
    name: str | None = None,
    cross_check: bool = True,
) -> dict[str, Any]:
    """Screens a whole scan for CT-GAN-style edits: where, and how (injected or removed).

    Args:
        path: a DICOM series folder, NIfTI/NRRD/MHD file, or an already loaded Volume.
        json_out: write the result JSON here. Defaults to None.
        report_dir: write the HTML report (and its images) here. Defaults to None.
        model: ``tamper3d`` (bundled, the default) or a checkpoint path.
        series_uid: for a folder with several series, the one to screen.
        threshold: a finding's minimum tamper probability. Defaults to the model's.
        progress: show a progress bar per stage. Defaults to False.
        truth: known edits to print in the report (the demo's ground truth).
        on_stage: called with each stage's name as it starts (``read``, ``lungs``, ...).
        viewer_dir: also write the scan and heatmap for the slice viewer here
            (:func:`ctguard.report.slices.save_viewer`).
        dicom_out: write the results as DICOM objects in the scan's study here
            (:mod:`ctguard.report.dicom_objects`): a TID 1500 SR, and for a tampered scan (or with
            ``dicom_seg``) a fractional Segmentation of the tamper probability. DICOM series only.
        dicom_seg: write the Segmentation for a clean scan too.
        trust: PEM certificates to judge the signers of a signed DICOM series by (see
            :func:`verify`). A DICOM series' signatures are always checked and reported
            (``result["signatures"]``); an invalid one is a finding of kind ``signature`` and makes
            the verdict tampered, whatever the detector says.
        report_tampered_only: write the HTML report only when the verdict is tampered (the DICOM
            node, which keeps no report of a clean series it forwards).
        name: what the result and the report call the input (the web page: the uploaded file's
            name, never the server's folder). Defaults to its path.
        cross_check: for a DICOM series read from a folder that holds other CT series, cross-check
            it against each other reconstruction of its acquisition (:mod:`ctguard.crosscheck`;
            ``result["cross_check"]``); a disagreement makes the verdict tampered. Defaults to True.

    Returns:
        The result dict documented in docs/DESIGN.md (verdict, score, findings, ...).
    """
    import json

    from tqdm import tqdm

    from ctguard.screen import load_detector, screen_volume

    held = contextlib.ExitStack()  # a zip's folder, kept while its files are read again (signatures, DICOM results)
    stages = ["read", "lungs", "detector", "findings", "report"]
    bar = tqdm(total=len(stages), desc="screen", disable=not progress, leave=False)

    def stage(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)
        if on_stage is not None and name not in ("read", "report"):  # screen_volume names stages as they start
            on_stage(name)

    try:
        if on_stage is not None:
            on_stage("read")
        vol = path if isinstance(path, Volume) else held.enter_context(loaded(path, series_uid=series_uid))
        single = vol.shape[0] == 1  # one DICOM slice or an image: the 2D detector
        if single:
            from ctguard.screen import as_ct_slice, load_detector2d, screen_slice

            detector = load_detector2d(model)
            vol = as_ct_slice(vol)
        else:
            detector = load_detector(model)
        stage("read")
        if name is None:
            name = str(path) if not isinstance(path, Volume) else vol.meta.get("archive") or vol.meta.get("root", "volume")
        if dicom_out is not None:
            from ctguard.report import dicom_objects

            sources = dicom_objects.source_datasets(vol)  # refused before screening when the input is not a DICOM series
        if single:
            result, heat, lungs = screen_slice(vol, detector, name, threshold=threshold, stage=stage)
        else:
            result, heat, lungs = screen_volume(vol, detector, name, threshold=threshold, stage=stage)
        if cross_check and not single and len(vol.meta.get("series") or []) > 1 and vol.meta.get("kind") == "dicom-series":
            _add_cross_check(result, vol, lungs, detector)
        if vol.meta.get("kind") == "dicom-series" and vol.meta.get("files"):
            _add_signature_finding(result, vol, signature_status(vol.meta["files"], trust, vol.meta.get("signed")))
        elif trust is not None:  # said, not dropped without a word
            result["warnings"].append(f"{name}: no DICOM signatures to judge by the trusted certificates: not a DICOM series")
        if on_stage is not None:
            on_stage("report")
        want_seg = dicom_out is not None and (dicom_seg or result["verdict"] == "tampered")
        if report_tampered_only and result["verdict"] != "tampered":
            report_dir = None
        # The heatmap on every voxel (a second per 50 M voxels): for the report's figures of findings, the viewer, the SEG.
        need = (report_dir is not None and result["findings"]) or viewer_dir is not None or want_seg
        overlay = heat.tampered_on_voxels(vol.shape) if need else None
        if report_dir is not None:
            from ctguard.report.html import write_report

            write_report(result, vol, overlay, report_dir, truth=truth)
        if viewer_dir is not None:
            from ctguard.report.slices import save_viewer

            save_viewer(vol, overlay, viewer_dir)
        if dicom_out is not None:
            result["dicom"] = {"sr": str(dicom_objects.write_sr(result, vol, dicom_out, sources))}
            if want_seg:
                with_pixels = dicom_objects.source_datasets(vol, with_pixels=True)
                result["dicom"]["seg"] = str(dicom_objects.write_seg(result, vol, overlay, dicom_out, with_pixels))
        stage("report")
    finally:
        bar.close()
        held.close()
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def cross_check(series: str | Path | Volume, other: str | Path | Volume) -> dict[str, Any]:
    """Where two reconstructions of one acquisition disagree (:func:`ctguard.crosscheck.cross_check`),
    each a DICOM series folder or a volume read from one: ``correlation`` and ``disagreements``
    (places of ``series``), or ``skipped`` with the reason they cannot be compared (another frame of
    reference or slice orientation, or noise that does not correlate). Series on other grids (thin
    and thick slices) are compared on the coarser one's. What ``screen`` does for every
    other CT series of the folder it reads, for one pair of your choosing."""
    from ctguard.crosscheck import cross_check as check
    from ctguard.lung import lung_mask

    a, b = (v if isinstance(v, Volume) else load(v) for v in (series, other))
    return check(a, b, lung_mask(a))


def _add_cross_check(result: dict[str, Any], vol: Volume, lungs, detector) -> None:
    """The series screened (``vol``, read from a folder of several series; ``lungs`` its lung mask)
    cross-checked against every other CT series of that folder (:mod:`ctguard.crosscheck`), into
    ``result["cross_check"]``: one entry a series, with its disagreements, or why it was not
    compared (``skipped``). Each disagreement carries the ``detector``'s scores of its place in
    both series (``scores``: ``this`` and ``other``, each ``[p_genuine, p_injected, p_removed]``),
    which tell which of the two was edited, and how (a reformat's in axial order, as the detector
    reads scans). Any disagreement makes the verdict tampered."""
    from ctguard.crosscheck import cross_check
    from ctguard.io.dicom import read_series

    checks = []
    for other in vol.meta["series"]:
        if other["uid"] == vol.meta.get("series_uid") or other["modality"].upper() != "CT" or other.get("localizer"):
            continue  # not a reconstruction of the scan: another modality, or the scout it was planned on
        entry: dict[str, Any] = {"series_uid": other["uid"], "description": other["description"] or None}
        try:  # its own files only: the first read found them
            read = read_series(vol.meta["root"], series_uid=other["uid"], files=vol.meta["series_files"][other["uid"]])
        except InputError as e:
            checks.append({**entry, "skipped": f"cannot be read ({e.problem})"})
            continue
        entry["description"] = read.meta.get("identity", {}).get("description") or entry["description"]
        entry.update(cross_check(vol, read, lungs))
        if entry["disagreements"]:
            world = np.asarray([d["world_mm"] for d in entry["disagreements"]], float)
            here, there = _scores_at(vol, detector, world, lungs), _scores_at(read, detector, world)
            for d, p, q in zip(entry["disagreements"], here, there):
                d["scores"] = {"this": [round(float(v), 4) for v in p], "other": [round(float(v), 4) for v in q]}
        checks.append(entry)
    if checks:
        result["cross_check"] = checks
        if any(c.get("disagreements") for c in checks):
            result["verdict"] = "tampered"


def _scores_at(vol: Volume, detector, world: np.ndarray, lungs: np.ndarray | None = None) -> np.ndarray:
    """The detector's ``(n, 3)`` probabilities at places given in LPS mm, on ``vol``'s own voxels
    (``lungs`` its lung mask, made where not given); a coronal or sagittal series in axial order,
    as the detector reads scans (:func:`ctguard.screen.axial_view`)."""
    from ctguard.screen import axial_view, score_locations

    view = axial_view(vol)
    if view is not None:
        vol, lungs = view[0], None if lungs is None else view[1].forward(lungs)
    return score_locations(vol, detector, vol.voxel_within(world), lungs=lungs)


def _add_signature_finding(result: dict[str, Any], vol: Volume, signatures: dict[str, Any]) -> None:
    """Signature status into a screening result; instances whose signature fails are one finding."""
    result["signatures"] = signatures
    bad = signatures["invalid_instances"]
    if not bad:
        return
    slices = sorted(b["slice"] for b in bad)
    voxel = [float(np.median(slices)), (vol.shape[1] - 1) / 2, (vol.shape[2] - 1) / 2]
    result["findings"].insert(0, {
        "kind": "signature", "score": 1.0, "voxel": [round(v, 1) for v in voxel],
        "world_mm": [round(float(v), 2) for v in vol.voxel_to_world(voxel)],
        "radius_mm": round(float((slices[-1] - slices[0] + 1) * vol.spacing[0] / 2), 1),
        "instances": len(bad), "reason": bad[0]["reason"],
    })
    result["verdict"], result["score"] = "tampered", 1.0
    result["warnings"].append(f"{len(bad)} of {signatures['instances']} instances fail their digital signature: {bad[0]['reason']}")


def score_locations(path: str | Path | Volume, locations_csv: str | Path, scores_out: str | Path, model: str | None = None,
                    series_uid: str | None = None) -> list[dict[str, Any]]:
    """Scores given places (``z,y,x`` CSV, or a CT-GAN labels file) and writes them with probabilities.

    ``path`` may be a scan already read (:func:`load`), so that one read serves this and :func:`screen`.
    Each output row repeats the input row and adds ``p_injected``, ``p_removed`` and
    ``p_tampered = p_injected + p_removed`` (``1 - p_genuine``).
    """
    import csv

    from ctguard.screen import load_detector, score_locations as _score

    with contextlib.nullcontext(path) if isinstance(path, Volume) else loaded(path, series_uid=series_uid) as vol:
        pass  # only the voxels are scored: a zip's folder is not needed after the read
    # A CT-GAN scan's uuid: its zip's name less ".zip", or its folder's name.
    if "archive" in vol.meta:
        name = Path(vol.meta["archive"]).stem
    else:
        name = Path(vol.meta.get("root", "volume") if isinstance(path, Volume) else path).name
    rows = list(csv.DictReader(Path(locations_csv).read_text().splitlines()))
    if not rows:
        raise InputError("no rows", locations_csv)
    cols = set(rows[0])
    if {"z", "y", "x"} <= cols and "type" not in cols:
        keep = rows
        locs = [(float(r["z"]), float(r["y"]), float(r["x"])) for r in keep]
    elif {"type", "uuid", "x", "y"} <= cols and ({"slice"} <= cols or {"z"} <= cols):
        uuid = vol.meta.get("patient_id") or name
        keep = [r for r in rows if str(r["uuid"]) in (uuid, name) and r["type"] != "TB"]
        locs = [(float(r.get("slice", r.get("z"))), float(r["y"]), float(r["x"])) for r in keep]
    else:
        raise InputError("expected columns z,y,x or a CT-GAN labels file (type,uuid,slice,x,y)", locations_csv)
    if vol.shape[0] == 1:  # a single slice or image: the 2D detector, z = 0
        from ctguard.screen import as_ct_slice, load_detector2d, score_locations_2d

        det2 = load_detector2d(model)
        probs = score_locations_2d(as_ct_slice(vol), det2, np.asarray(locs, float)) if locs else np.zeros((0, 3))
    else:
        probs = _score(vol, load_detector(model), np.asarray(locs, float)) if locs else np.zeros((0, 3))
    out = []
    for r, p in zip(keep, probs):
        out.append({**r, "p_injected": round(float(p[1]), 4), "p_removed": round(float(p[2]), 4), "p_tampered": round(float(p[1] + p[2]), 4)})
    Path(scores_out).parent.mkdir(parents=True, exist_ok=True)
    with open(scores_out, "w", newline="") as f:
        fields = list(keep[0]) + ["p_injected", "p_removed", "p_tampered"] if keep else ["z", "y", "x", "p_injected", "p_removed", "p_tampered"]
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(out)
    return out


def demo(out_dir: str | Path = "ctguard-demo", seed: int = 2026, progress: bool = True, echo=print) -> dict[str, Any]:
    """The main job on an embedded default: a phantom chest, one nodule injected and one removed,
    screened by the bundled detector; prints each edit beside the place that scored highest near it
    (a finding, or one of the highest places under the threshold); writes JSON and HTML report.

    Returns:
        ``{"result": screening JSON, "truth": edits, "matched": [found at the threshold with its
        kind, per edit], "nearest": [{"rank", "kind", "score", "mm"} or None, per edit], "json": path,
        "report": path}``.
    """
    import shutil
    import time

    from ctguard.engine.train_verifier import near
    from ctguard.tamper.simulate import DEMO_SHAPE, DEMO_SPACING, tampered_phantom

    t0 = time.time()
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vol, edits = tampered_phantom(seed, seed, DEMO_SHAPE, DEMO_SPACING)
    truth = [e.to_dict() for e in edits]
    echo(f"phantom chest {vol.shape} voxels at {vol.spacing} mm; tampered: "
         + "; ".join(f"{t['kind']} {t['diameter_mm']:.0f} mm at voxel {[round(v) for v in t['voxel']]}" for t in truth))
    io.write_series(vol, out / "tampered-scan", patient_id=f"DEMO-{seed}", uid_seed=f"demo-{seed}")
    result = screen(out / "tampered-scan", json_out=out / "result.json", report_dir=out / "report", progress=progress, truth=truth)
    matched = []
    places = result["findings"] + result.get("under_threshold", [])  # the findings best first, then the highest places under
    thr = result["model"]["threshold"]  # a place's own threshold where the result gives one (a second stage's places)

    def mm_to(t: dict, f: dict) -> float:
        return float(np.linalg.norm((np.asarray(f["voxel"]) - t["voxel"]) * np.asarray(vol.spacing)))

    nearest = []  # per edit: the best-scored place near it (a finding or one under the threshold), and its rank
    for t in truth:
        hits = [(rank, f) for rank, f in enumerate(places, start=1) if near(f["voxel"], t["voxel"], t["diameter_mm"], vol.spacing)]
        rank, best = hits[0] if hits else (None, None)
        own = thr if best is None else best.get("threshold", thr)
        ok = best is not None and best["score"] >= own and best["kind"] == t["kind"]
        matched.append(ok)
        nearest.append(None if best is None else {"rank": rank, "kind": best["kind"], "score": best["score"], "mm": round(mm_to(t, best), 1)})
        if best is None:
            where = "no finding, nor any of the highest places under the threshold, there"
        else:
            what = "finding" if best["score"] >= own else f"place #{rank} by score, under the threshold {own:g}"
            where = f"{what}: {best['kind']} (score {best['score']:.2f}) {mm_to(t, best):.1f} mm away"
        echo(f"  truth {t['kind']:8s} at {[round(v) for v in t['voxel']]}: {where} -> {'FOUND' if ok else 'MISSED'}")
    echo(f"verdict: {result['verdict']} (score {result['score']:.3f}), {len(result['findings'])} finding(s), "
         f"screened in {result['elapsed_s']:.1f} s; demo total {time.time() - t0:.1f} s")
    echo(f"JSON: {out / 'result.json'}")
    echo(f"HTML report: {out / 'report' / 'index.html'}")
    return {"result": result, "truth": truth, "matched": matched, "nearest": nearest, "json": str(out / "result.json"), "report": str(out / "report" / "index.html")}


def config_root(path: str | Path) -> Path:
    """What relative data paths in a config are relative to: the project root, the nearest folder
    above the config that holds a pyproject.toml (configs/x.yaml and benchmarks/experiments/x.yaml
    alike); for a config outside any project, the folder above the config's."""
    folder = Path(path).resolve().parent
    return next((d for d in (folder, *folder.parents) if (d / "pyproject.toml").is_file()), folder.parent)


# Keys of a config that hold paths (a path or a list of paths): relative ones are read from the project root.
CONFIG_PATHS = ("real_series", "annotations", "data", "init", "cache", "source_cache", "extra_cubes", "cubes", "weights", "slice_stage_scans", "slice_stage_cache")


def load_config(path: str | Path | None) -> dict[str, Any]:
    """A YAML training config, its relative paths read from the project root (:func:`config_root`)."""
    import yaml

    if not path:
        return {}
    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read config ({e.__class__.__name__}: {e})", path) from None
    if not isinstance(cfg, dict):
        raise InputError("config must be a YAML mapping", path)
    base = config_root(path)

    def resolve(p) -> str:
        return str(p) if Path(p).is_absolute() else str((base / p).resolve())

    for key in CONFIG_PATHS:
        if isinstance(cfg.get(key), list):
            cfg[key] = [resolve(p) for p in cfg[key]]
        elif cfg.get(key):
            cfg[key] = resolve(cfg[key])
    for entry in cfg["real_scans"] if isinstance(cfg.get("real_scans"), list) else []:  # [{scan: PATH, tumours: PATH}]
        for key in ("scan", "tumours"):  # the trainer checks the shape; here only paths are resolved
            if isinstance(entry, dict) and isinstance(entry.get(key), str):
                entry[key] = resolve(entry[key])
    return cfg


def train(config: dict[str, Any], out_dir: str | Path = "runs/train", progress: bool = True, echo=print, resume: bool = False) -> dict[str, Any]:
    """Trains a model from a config dict; ``task`` picks the trainer: ``classifier`` (the paper's
    2D study, :mod:`ctguard.engine.train2d`), ``tamper3d`` (the bundled 3D detector) or ``tamper2d``
    (its single-slice sibling). A run that fails removes the folder it made, if it holds only its config."""
    task = config.get("task", "classifier" if config.get("model") or config.get("data") else "tamper3d")
    out = Path(out_dir)
    created = not out.exists()
    try:
        return _train(task, config, out, progress, echo, resume)
    except BaseException:
        if created and out.is_dir():
            _forget_failed_run(out)
        raise


def _forget_failed_run(out: Path) -> None:
    """Removes the folder a failed run made, when it holds only the config it wrote: a folder with a
    config.json and no model looked like a finished run. Anything else there (a hard round's cubes,
    a classifier's last checkpoint) is kept, with the config that says how it was made."""
    if [p.name for p in out.iterdir()] == ["config.json"]:
        (out / "config.json").unlink()
        out.rmdir()


def _train(task: str, config: dict[str, Any], out_dir: Path, progress: bool, echo, resume: bool) -> dict[str, Any]:

    if task == "tamper3d":
        from ctguard.engine.train3d import train as train3d

        return train3d(config, out_dir, progress=progress, echo=echo)
    if task == "tamper2d":
        from ctguard.engine.train_patch2d import train as train_patch2d

        return train_patch2d(config, out_dir, progress=progress, echo=echo)
    if task == "classifier":
        from ctguard.engine.train2d import train as train2d

        return train2d(config, out_dir, progress=progress, echo=echo, resume=resume)
    raise InputError(f"unknown training task {task!r} (known: classifier, tamper3d, tamper2d)")


def evaluate(model: str | Path, data: str | Path, out_dir: str | Path, split: str = "test", progress: bool = True, echo=print) -> dict[str, Any]:
    """Metrics, figures and ``report.md`` of a 2D classifier checkpoint on a split of ``data``."""
    from ctguard.engine.evaluate import evaluate as _evaluate

    history = Path(model).parent / "history.csv"
    return _evaluate(model, data, out_dir, split=split, progress=progress, echo=echo, history=history if history.is_file() else None)


def compare(data: str | Path, models: list[str], out_dir: str | Path, config: dict[str, Any] | None = None, progress: bool = True,
            echo=print) -> dict[str, Any]:
    """Trains and evaluates each model on the same split; writes the paper's two tables and a figure."""
    from ctguard.engine.compare import compare as _compare

    return _compare(models, {**(config or {}), "data": str(data), "task": "classifier"}, out_dir, progress=progress, echo=echo)


def export_slices(dataset: str | Path, out_dir: str | Path, **kwargs) -> dict[str, Any]:
    """A CT-GAN-layout dataset as an ImageFolder dataset split by patient (see :mod:`ctguard.data.export`)."""
    from ctguard.data.export import export_slices as _export

    return _export(dataset, out_dir, **kwargs)


def list_models() -> list[dict[str, Any]]:
    """The registered 2D classifiers with their input specs."""
    from ctguard.models.registry import SPECS

    return [{"name": s.name, "input_size": s.input_size, "channels": s.channels, "mean": list(s.mean), "std": list(s.std),
             "transfer": s.transfer, "description": s.description} for s in SPECS.values()]


def predict(images: list[str | Path], model: str | Path | None = None) -> list[dict[str, Any]]:
    """Label and class probabilities for each image (PNG/JPG/DICOM slice) with a trained classifier.

    Raises:
        InputError: no model given (and none bundled), a bad checkpoint, or an unreadable image.
    """
    from ctguard.data.folder import Item, load_images
    from ctguard.engine.evaluate import predict_arrays
    from ctguard.engine.train2d import load_classifier

    if model is None:
        bundled = Path(__file__).parent / "weights" / "classifier.pt"
        if not bundled.is_file():
            raise InputError("no classifier given: pass --model CKPT (a best.pt from `ctguard train`)")
        model = bundled
    net, ck = load_classifier(model)
    window = tuple(ck.get("config", {}).get("window", (-1000, 400)))
    arrays = load_images([Item(Path(p), 0, "") for p in images], ck["input_size"], window)
    prob = predict_arrays(net, arrays, net.spec.mean, net.spec.std)
    return [{"image": str(p), "label": ck["classes"][int(pr.argmax())], "probability": float(pr.max()),
             "probabilities": {c: float(v) for c, v in zip(ck["classes"], pr)}, "model": ck["model_name"]} for p, pr in zip(images, prob)]


def _dicom_inputs(inputs: list[str | Path]) -> list[tuple[Path, Path]]:
    """``(file, path relative to an output folder)`` of every DICOM file among the inputs: a file as
    itself, a folder's files (any depth) under the folder's name. A named file that is not DICOM is an
    error; a folder's non-DICOM files (a DICOMDIR's siblings, notes) are left out."""
    out: list[tuple[Path, Path]] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
                if io.is_dicom_file(f):
                    out.append((f, Path(p.resolve().name) / f.relative_to(p)))
        elif p.is_file():
            if not io.is_dicom_file(p):  # a one-line error now, before anything is written
                raise InputError("not a DICOM file (no DICM prefix and file meta information)", p)
            out.append((p, Path(p.name)))
        else:
            raise InputError("no such file or folder", p)
    if not out:
        raise InputError("no DICOM files in " + ", ".join(str(i) for i in inputs))
    return out


def sign(inputs: list[str | Path], key: str | Path, cert: str | Path, out_dir: str | Path, mac: str = "SHA256",
         progress: bool = False) -> list[dict[str, Any]]:
    """Adds a DICOM Digital Signature (PS3.15 Base RSA profile) to every instance, written under ``out_dir``.

    Each instance gets one more signature over every signable element, PixelData included, with
    the signer's certificate; nothing else in it changes. Existing files in ``out_dir`` are never
    overwritten: a clash is refused before anything is written.

    Returns:
        One dict per instance: ``input``, ``output``, ``signature_uid``.
    """
    from tqdm import tqdm

    from ctguard.node.spool import write_durably
    from ctguard.signatures import Signer, signed_file

    signer = Signer.load(key, cert, mac)
    files = _dicom_inputs(inputs)
    root = Path(out_dir)
    targets = [root / rel for _, rel in files]
    clash = next((t for t in targets if t.exists()), None)
    if clash is not None:
        raise InputError("already exists (ctguard sign does not overwrite; choose another --out)", clash)
    if len(set(targets)) != len(targets):
        raise InputError("two inputs would be written to the same file under --out (inputs with the same name)", out_dir)
    rows = []
    for (src, _), dst in tqdm(list(zip(files, targets)), desc="sign", unit="file", disable=not progress):
        data, uid = signed_file(src, signer)
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_durably(dst, data)
        rows.append({"input": str(src), "output": str(dst), "signature_uid": uid})
    return rows


def verify(inputs: list[str | Path], trust: str | Path | None = None, json_out: str | Path | None = None) -> dict[str, Any]:
    """Checks the DICOM Digital Signatures of every instance: unsigned, valid or invalid (and why).

    Args:
        inputs: DICOM files or folders.
        trust: a PEM file of trusted certificates (signers or the CAs that issued them). Without
            it, a signature is valid when its MAC and certificate dates hold, and ``trusted`` is
            ``None``: who signed is reported but not judged.
        json_out: write the result JSON here.

    Returns:
        ``{"instances": [...], "series": [...]}``: per instance its status, reason and signatures
        (signer, time, MAC algorithm, elements covered, elements present but not covered); per
        series the counts.
    """
    import json

    from ctguard.signatures import load_certificates, summarize, verify_file

    anchors = load_certificates(trust) if trust is not None else None
    checks = [verify_file(f, anchors) for f, _ in _dicom_inputs(inputs)]
    result = {"trust": None if trust is None else str(trust), "instances": [c.as_dict() for c in checks], "series": summarize(checks)}
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def signature_status(files: list[str | Path], trust: str | Path | None = None, signed: list[bool] | None = None) -> dict[str, Any]:
    """The signatures of a screened series, as ``screen`` and ``audit`` report them: the status of the
    series (unsigned, valid, invalid, partly signed), the counts, the signers, and each invalid
    instance with its slice index and reason. ``signed``: which files carry a signature, when the
    reader already knows (``Volume.meta["signed"]``); only those are read again to verify."""
    from ctguard.signatures import InstanceCheck, load_certificates, summarize, verify_file

    anchors = load_certificates(trust) if trust is not None else None
    checks = [verify_file(f, anchors) if signed is None or signed[i] else InstanceCheck(str(f), None, None, "unsigned", [])
              for i, f in enumerate(files)]
    summary = summarize(checks, by_series=False)[0]
    summary["trust_checked"] = trust is not None
    summary["invalid_instances"] = [{"slice": i, "sop_instance_uid": c.sop_instance_uid, "reason": c.reason}
                                    for i, c in enumerate(checks) if c.status == "invalid"]
    return summary


def audit_line(row: dict[str, Any]) -> str:
    """A series an audit did not find clean, on one line: "TAMPERED: KEY (patient P, description):
    score 0.999", or "ERROR: KEY: reason"."""
    about = [f"patient {row['patient_id']}" if row.get("patient_id") else "",
             row.get("description") if row.get("description") not in (None, "", Path(str(row["key"])).name) else ""]
    who = ", ".join(a for a in about if a)
    what = row["error"] if row.get("error") else f"score {row['score']:.3f}"
    return f"{row['verdict'].upper()}: {row['key']}{f' ({who})' if who else ''}: {what}"


def audit(source: str | Path, results: str | Path, model: str | None = None, threshold: float | None = None, workers: int = 1,
          engine: str = "local", address: str | None = None, trust: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Screens every CT series of an archive (a folder tree of DICOM, NIfTI, NRRD, MHD, or a PACS
    through DICOMweb) into SQLite.

    One row per series (``ctguard.audit.store``): UIDs, patient, description, slices, verdict,
    score, findings, signature status, model and version, pixel hash, time taken, error. Re-running
    skips every series already screened with the same pixels and model version; a killed run loses
    at most the series in flight. A series that cannot be screened is an error row with its reason.

    Args:
        source: the folder tree, or a PACS as ``dicomweb+http://host:port/prefix`` (QIDO-RS lists
            its CT series, WADO-RS retrieves each; ``user:password@`` in the URL for HTTP Basic).
        results: the SQLite file (created, or resumed).
        workers: processes (local engine) or tasks in parallel (Ray).
        engine: ``local`` (a process pool) or ``ray`` (``address``: a running cluster; default a local one).

    Returns:
        Counts: ``series``, ``screened``, ``skipped``, ``tampered``, ``clean``, ``error``, ``seconds``.
    """
    import time

    from tqdm import tqdm

    from ctguard.audit import engines
    from ctguard.audit.sources import series_of
    from ctguard.audit.store import open_results
    from ctguard.audit.work import screen_series

    if engine not in engines.ENGINES:
        raise InputError(f"--engine {engine!r}: one of {', '.join(engines.ENGINES)}")
    if workers < 1:
        raise InputError(f"--workers {workers}: at least 1")
    if threshold is not None:  # checked once here, not as an error row of every series
        from ctguard.screen import checked_threshold

        checked_threshold(threshold)
    if address and engine != "ray":
        raise InputError("--address is the Ray cluster's: give --engine ray too")
    from ctguard.screen import load_detector

    load_detector(model)  # a bad --model is one line now, not an error row per series
    t0 = time.time()
    refs = list(series_of(source))
    store = open_results(results)
    counts = {"series": len(refs), "screened": 0, "skipped": 0, "tampered": 0, "clean": 0, "error": 0}
    args = (model, threshold, str(Path(results).resolve()), None if trust is None else str(trust))
    bar = tqdm(total=len(refs), desc="audit", unit="series", disable=not progress)
    try:
        for row in engines.ENGINES[engine](refs, screen_series, args, workers, address=address):
            bar.update(1)
            if row.get("skipped"):
                counts["skipped"] += 1
                continue
            store.put(row)  # one transaction per series, by the driver only
            counts["screened"] += 1
            counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
            if row["verdict"] != "clean" and progress:  # named as found, above the bar
                bar.write(audit_line(row))
    finally:
        bar.close()
        store.close()
    counts["seconds"] = round(time.time() - t0, 1)
    return counts


def audit_report(results: str | Path, out_dir: str | Path, reports: bool = False, model: str | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """The HTML page and CSV of an audit's results; with ``reports`` each flagged series is screened
    again from where it was read and gets its own HTML report, linked from the page."""
    from tqdm import tqdm

    from ctguard.audit import report
    from ctguard.audit.store import open_results

    store = open_results(results, must_exist=True)
    try:
        rows = store.rows()
    finally:
        store.close()
    links = {}
    if reports:
        flagged = [r for r in rows if r["verdict"] == "tampered"]
        for i, r in enumerate(tqdm(flagged, desc="reports", disable=not progress)):
            folder = Path(out_dir) / "series" / f"{i:05d}"
            try:
                if str(r["source"]).startswith("dicomweb+"):  # from the PACS again
                    import tempfile

                    from ctguard.audit.sources import SeriesRef
                    from ctguard.audit.work import _retrieve

                    with tempfile.TemporaryDirectory(prefix="ctguard-wado-") as tmp:
                        ref = SeriesRef(r["key"], "dicomweb", [], r["study_uid"], r["series_uid"], extra={"url": r["source"]})
                        screen(_retrieve(ref, Path(tmp)).files[0].rsplit("/", 1)[0], report_dir=folder, model=model)
                else:
                    screen(r["source"], report_dir=folder, model=model, series_uid=r["series_uid"])
                links[r["key"]] = f"series/{i:05d}/index.html"
            except Exception as e:  # moved, deleted or unreachable since the audit: the page says so
                r["error"] = f"no report: {e.problem if isinstance(e, InputError) else e.__class__.__name__}"
    paths = report.write(rows, out_dir, links)
    return {"series": len(rows), "reports": len(links), **{k: str(v) for k, v in paths.items()}}
