"""The cross-check of two reconstructions of one acquisition (:mod:`ctguard.crosscheck`) on the real
pairs at hand: Lung-PET-CT-Dx A0001 (Philips, kernels L and B, 5 mm slices) and A0002 (Siemens,
B70f and B40f, 8 mm slices).

For each pair and each way round, one series is edited (the edit families of the cross-validation,
with its numbers: 4 injected copies of 2 nodules each, drawn and moved in turn, one removal per
real tumour, filled and cloned in turn, 2 copies with 2 healthy places in-painted, filled and
cloned) and cross-checked against the other, untouched; and the two untouched series against each
other. An edit is found when a disagreement lies at it (within 10 mm of its rim, the
cross-validation's rule); a disagreement at no edit (farther from every edit than its blending
radius, beyond which no voxel changed) is a false one.

    python benchmarks/cross_check.py --json docs/cross_check.json

These are the only two pairs at hand, and the cross-check's settings were chosen looking at them:
a measurement of how it works, not a held-out one.
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
from ctguard.tamper.simulate import Source, tumours_from, variants

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write every edit and disagreement here")
    ap.add_argument("--seeds", type=int, default=2, help="sets of edits per series and way round (default 2)")
    args = ap.parse_args()
    edits_out, clean_out, seconds = [], [], []
    for patient, (first, second) in PAIRS.items():
        series = [io.read(DATA / "Lung-PET-CT-Dx" / s) for s in (first, second)]
        for k, (edited, other) in enumerate((series, series[::-1])):
            assert comparable(edited, other) is None, comparable(edited, other)
            lungs = lung_mask(edited)
            src = Source(patient, edited, patient, tumours_from(edited, DATA / "annotations"))
            for seed in range(args.seeds):
                for label, vol, edits in variants(src, SEED + 100 * k + seed, inject=4, remove=len(src.tumours), per_scan=2,
                                                  inject_families=("drawn", "moved"), remove_families=("fill", "clone"), healthy=2):
                    if not edits and seed:  # the untouched pair once for each way round
                        continue
                    copy = replace(edited, hu=vol.hu)  # the edited voxels, with the series' headers
                    t = time.time()
                    found = cross_check(copy, other, lungs)
                    seconds.append(time.time() - t)
                    dis = found["disagreements"]
                    ed = [e.to_dict() for e in edits]
                    false = [d for d in dis if not any(
                        np.linalg.norm((np.asarray(d["voxel"]) - e["voxel"]) * edited.spacing) <= max(e["radius_mm"], e["diameter_mm"] / 2 + 10)
                        for e in ed)]
                    if not edits:
                        clean_out.append({"patient": patient, "screened": edited.meta["identity"].get("description"),
                                          "correlation": found["correlation"], "disagreements": dis})
                        continue
                    for e in ed:
                        at = [d for d in dis if near(d["voxel"], e["voxel"], e["diameter_mm"], edited.spacing)]
                        edits_out.append({"patient": patient, "edited": edited.meta["identity"].get("description"), "label": label,
                                          "kind": e["kind"], "family": family(e), "diameter_mm": round(e["diameter_mm"], 1),
                                          "voxel": [round(v, 1) for v in e["voxel"]], "found": bool(at),
                                          "hu_difference": at[0]["hu_difference"] if at else None})
                    if false:
                        clean_out.append({"patient": patient, "copy": label, "false_disagreements": false})
    by = defaultdict(lambda: [0, 0])
    for e in edits_out:
        for key in (e["family"], "all", f"{'under' if e['diameter_mm'] < 10 else 'from'} 10 mm"):
            by[key][0] += e["found"]
            by[key][1] += 1
    clean = [c for c in clean_out if "correlation" in c]
    false = sum(len(c["disagreements"]) for c in clean) + sum(len(c.get("false_disagreements", [])) for c in clean_out if "copy" in c)
    summary = {"edits_found": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by.items())},
               "untouched_pairs": [{"patient": c["patient"], "screened": c["screened"], "correlation": c["correlation"],
                                    "disagreements": len(c["disagreements"])} for c in clean],
               "false_disagreements": false, "median_seconds": round(float(np.median(seconds)), 2)}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "edits": edits_out, "untouched": clean_out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
