"""The cross-check of two reconstructions of one acquisition (:mod:`ctguard.crosscheck`) on the real
pairs at hand, and on pairs of other grids made from real series.

One grid: Lung-PET-CT-Dx A0001 (Philips, kernels L and B, 5 mm slices) and A0002 (Siemens, B70f and
B40f, 8 mm slices). Other grids (thin and thick slices; a thick slice made as the mean of the thin
ones it spans, :func:`ctguard.tamper.simulate.thick_slice_source`): A0001's L kernel at 5 mm against
its B kernel made 10 mm thick (two kernels, two thicknesses), and each LIDC-IDRI patient's thin series
(1.25-2.5 mm, one kernel) against itself made about 5 mm thick.

For each pair and each way round, one series is edited (the edit families of the cross-validation,
with its numbers: 4 injected copies of 2 nodules each, drawn and moved in turn, one removal per
real tumour, filled and cloned in turn, 2 copies with 2 healthy places in-painted, filled and
cloned) and cross-checked against the other, untouched; and the two untouched series against each
other. An edit is found when a disagreement lies at it (within 10 mm of its rim, the
cross-validation's rule); a disagreement at no edit (farther from every edit than its blending
radius, beyond which no voxel changed) is a false one.

    python benchmarks/cross_check.py --json docs/cross_check.json

These are the only pairs at hand, and the cross-check's settings were chosen looking at the
one-grid pairs: a measurement of how it works, not a held-out one. The thick series of the other
grids are made from the thin ones, so they share one kernel's noise exactly (A0001's excepted, whose
two series have two kernels): how a scanner's own thick reconstruction differs from the mean of its
thin slices is not measured here.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from ctguard import io
from ctguard.crosscheck import comparable, cross_check
from ctguard.engine.train_verifier import near
from ctguard.lung import lung_mask
from ctguard.tamper.simulate import Source, coronal_reformat, thick_slice_source, tumours_from, variants

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lung-pet-ct-dx"
PAIRS = {
    "Lung_Dx-A0001": ("Lung_Dx-A0001/04-04-2007-NA-Chest-07990/2.000000-5mm-40805",
                      "Lung_Dx-A0001/04-04-2007-NA-Chest-07990/3.000000-5mm-41315"),
    "Lung_Dx-A0002": ("Lung_Dx-A0002/04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834/2.000000-ThoraxRoutine  8.0.0  B70f-62919",
                      "Lung_Dx-A0002/04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834/3.000000-ThoraxRoutine  8.0.0  B40f-10983"),
}
SEED = 910_000  # edits no training run or cross-validation fold makes


def family(edit: dict) -> str:
    extra = edit.get("extra") or {}
    name = extra.get("family") or ("drawn" if edit["kind"] == "injected" else "fill")
    return f"{name} (healthy lung)" if edit["kind"] == "removed" and extra.get("target") == "healthy" else name


def check_pair(patient: str, grid: str, edited: Source, other, seed: int, seeds: int, edits_out: list, clean_out: list,
               seconds: list) -> None:
    """``edited``'s scan edited by every family, ``seeds`` times, each copy cross-checked against
    ``other`` (untouched); and the untouched pair once. Rows into ``edits_out`` (each edit, found
    or not) and ``clean_out`` (the untouched pair; a copy's disagreements at no edit)."""
    assert comparable(edited.volume, other) is None, comparable(edited.volume, other)
    base = edited.volume
    lungs = lung_mask(base)
    name = base.meta.get("identity", {}).get("description") or edited.name
    for k in range(seeds):
        for label, vol, edits in variants(edited, seed + k, inject=4, remove=len(edited.tumours), per_scan=2,
                                          inject_families=("drawn", "moved"), remove_families=("fill", "clone"), healthy=2):
            if not edits and k:  # the untouched pair once
                continue
            copy = replace(base, hu=vol.hu)  # the edited voxels, with the series' headers
            t = time.time()
            found = cross_check(copy, other, lungs)
            seconds.append(time.time() - t)
            dis = found["disagreements"]
            ed = [e.to_dict() for e in edits]
            false = [d for d in dis if not any(
                np.linalg.norm((np.asarray(d["voxel"]) - e["voxel"]) * base.spacing) <= max(e["radius_mm"], e["diameter_mm"] / 2 + 10)
                for e in ed)]
            if not edits:
                clean_out.append({"patient": patient, "grid": grid, "screened": name, "correlation": found["correlation"],
                                  "disagreements": dis})
                continue
            for e in ed:
                at = [d for d in dis if near(d["voxel"], e["voxel"], e["diameter_mm"], base.spacing)]
                edits_out.append({"patient": patient, "grid": grid, "edited": name, "label": label, "kind": e["kind"],
                                  "family": family(e), "nodule_type": e.get("nodule_type"), "diameter_mm": round(e["diameter_mm"], 1),
                                  "voxel": [round(v, 1) for v in e["voxel"]], "found": bool(at),
                                  "hu_difference": at[0]["hu_difference"] if at else None})
            if false:
                clean_out.append({"patient": patient, "grid": grid, "copy": label, "false_disagreements": false})


def lidc_sources() -> dict[str, Source]:
    """The thin-slice patients of the recipe's config (LIDC-IDRI), each with its nodules."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs" / "tamper3d.yaml").read_text())
    out = {}
    for e in cfg["real_scans"]:
        if e["patient"].startswith("LIDC-IDRI"):
            vol = io.read(root / e["scan"])
            out[e["patient"]] = Source(e["patient"], vol, e["patient"], tumours_from(vol, root / e["tumours"]))
    return out


def summarise(edits_out: list, clean_out: list, seconds: list) -> dict:
    by = defaultdict(lambda: [0, 0])
    for e in edits_out:
        for key in (e["family"], "all", f"{'under' if e['diameter_mm'] < 10 else 'from'} 10 mm"):
            by[key][0] += e["found"]
            by[key][1] += 1
    clean = [c for c in clean_out if "correlation" in c]
    false = sum(len(c["disagreements"]) for c in clean) + sum(len(c.get("false_disagreements", [])) for c in clean_out if "copy" in c)
    return {"edits_found": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by.items())},
            "untouched_pairs": [{"patient": c["patient"], "screened": c["screened"], "correlation": c["correlation"],
                                 "disagreements": len(c["disagreements"])} for c in clean],
            "false_disagreements": false, "median_seconds": round(float(np.median(seconds)), 2) if seconds else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write every edit and disagreement here")
    ap.add_argument("--seeds", type=int, default=2, help="sets of edits per series and way round (default 2)")
    ap.add_argument("--pairs", default="same,other,reformat",
                    help="which pairs, comma-separated: same (the real pairs on one grid), other (thin and thick slices), "
                         "reformat (axial and coronal); default all. With --json, the sections run replace theirs in the file.")
    args = ap.parse_args()
    run = set(args.pairs.split(","))
    if not run <= {"same", "other", "reformat"}:
        ap.error(f"--pairs {args.pairs!r}: expected same, other and/or reformat")
    out: dict = {}
    lidc = lidc_sources() if run & {"other", "reformat"} else {}  # read once for both sections
    if "same" in run:
        edits_out, clean_out, seconds = [], [], []
        for patient, (first, second) in PAIRS.items():
            series = [io.read(DATA / "Lung-PET-CT-Dx" / s) for s in (first, second)]
            for k, (edited, other) in enumerate((series, series[::-1])):
                src = Source(patient, edited, patient, tumours_from(edited, DATA / "annotations"))
                check_pair(patient, "same", src, other, SEED + 100 * k, args.seeds, edits_out, clean_out, seconds)
        out["same_grid"] = {"summary": summarise(edits_out, clean_out, seconds), "edits": edits_out, "untouched": clean_out}
    if "other" in run:
        edits_out, clean_out, seconds = [], [], []
        # Two kernels, two thicknesses: A0001's L kernel (5 mm) against its B kernel made 10 mm thick.
        first, second = (io.read(DATA / "Lung-PET-CT-Dx" / s) for s in PAIRS["Lung_Dx-A0001"])
        thin = Source("Lung_Dx-A0001", first, "Lung_Dx-A0001", tumours_from(first, DATA / "annotations"))
        thick = thick_slice_source(Source("Lung_Dx-A0001", second, "Lung_Dx-A0001", tumours_from(second, DATA / "annotations")), 2)
        check_pair("Lung_Dx-A0001", "L 5 mm / B 10 mm", thin, thick.volume, SEED + 500, args.seeds, edits_out, clean_out, seconds)
        check_pair("Lung_Dx-A0001", "B 10 mm / L 5 mm", thick, first, SEED + 600, args.seeds, edits_out, clean_out, seconds)
        # One kernel, thin slices against the same made about 5 mm thick (LIDC-IDRI, 1.25-2.5 mm).
        for i, (patient, src) in enumerate(lidc.items()):
            thick = thick_slice_source(src, max(2, round(5.0 / src.volume.spacing[0])))
            mm = f"{src.volume.spacing[0]:g} mm / {thick.volume.spacing[0]:g} mm"
            check_pair(patient, f"thin {mm}", src, thick.volume, SEED + 1000 + 10 * i, args.seeds, edits_out, clean_out, seconds)
            check_pair(patient, f"thick {mm}", thick, src.volume, SEED + 2000 + 10 * i, args.seeds, edits_out, clean_out, seconds)
        out["other_grids"] = {"summary": summarise(edits_out, clean_out, seconds), "edits": edits_out, "untouched": clean_out}
    if "reformat" in run:
        edits_out, clean_out, seconds = [], [], []
        # An axial series against its coronal reformat (3 mm slabs), either one edited (LIDC-IDRI).
        for i, (patient, src) in enumerate(lidc.items()):
            coronal = coronal_reformat(src.volume)
            check_pair(patient, "axial / coronal", src, coronal, SEED + 3000 + 10 * i, args.seeds, edits_out, clean_out, seconds)
            check_pair(patient, "coronal / axial", Source(patient, coronal, patient, []), src.volume, SEED + 4000 + 10 * i,
                       args.seeds, edits_out, clean_out, seconds)
        out["reformats"] = {"summary": summarise(edits_out, clean_out, seconds), "edits": edits_out, "untouched": clean_out}
    print(json.dumps({k: v["summary"] for k, v in out.items()}, indent=1))
    if args.json:
        path = Path(args.json)
        kept = json.loads(path.read_text()) if path.is_file() and run != {"same", "other", "reformat"} else {}
        path.write_text(json.dumps({**kept, **out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
