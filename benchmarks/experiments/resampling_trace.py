"""How well the resampling trace alone tells edits from untouched places, family by family.

Usage:
    python benchmarks/experiments/resampling_trace.py [--config configs/tamper3d.yaml] [--names A0001,0002/]

For the real scans of CONFIG (those whose path contains one of the comma-separated NAMES; all by
default): the simulator's edits with a seed no training run uses (4 injected copies of 2 nodules,
drawn and moved in turn; every real tumour removed, filled and cloned in turn; 4 copies with 3
healthy places in-painted, filled and cloned in turn), each scored at its own centre by
:func:`ctguard.verifier.resampling_trace` (no training: the ripple that interpolating a cube onto a
1 mm grid and back leaves in the noise), against the stage's untouched places of the clean scan (10
random lung places, 10 dense ones, every real lesion). Prints the location AUC of each of the three
windows by family and by kind of untouched place, and each scan's pixel spacing and ripple
frequency.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from ctguard.engine.train3d import build_source, real_scans
from ctguard.engine.train_verifier import negatives
from ctguard.lung import lung_depth, lung_mask
from ctguard.tamper.simulate import variants
from ctguard.verifier import TRACE_RADII_MM, resampling_trace, ripple_frequency, scan_noise

ROOT = Path(__file__).resolve().parents[2]
SEED = 4242


def real_sources(cfg: dict, names: str = ""):
    """Each real scan of the config ``cfg`` whose path holds one of the comma-separated ``names``
    (every one when empty): ``(path, source, lungs, depth, in-plane noise)``."""
    for path, tumours in real_scans(cfg):
        if names and not any(name in path for name in names.split(",")):
            continue
        path = str(ROOT / path) if not Path(path).is_absolute() else path
        tumours = str(ROOT / tumours) if tumours and not Path(tumours).is_absolute() else tumours
        src = build_source({}, ("series", path, 1, tumours, 0))
        lungs = lung_mask(src.volume)
        depth = lung_depth(src.volume, lungs)
        yield path, src, lungs, depth, scan_noise(src.volume, lungs)[0]


def places(src, lungs: np.ndarray, depth: np.ndarray, seed: int):
    """The stage's untouched places of the clean scan (label 0) and the simulator's edits with
    ``seed`` (label 1; 4 injected copies of 2 nodules, drawn and moved in turn; every real tumour
    removed, filled and cloned in turn; 4 copies with 3 healthy places in-painted):
    ``(label, what, volume, voxel)``."""
    for what, p in negatives(src, lungs, depth, np.random.default_rng(5)):
        yield 0, what, src.volume, np.asarray(p, float)
    for label, vol, edits in variants(src, seed, inject=4, remove=len(src.tumours), per_scan=2, inject_families=("drawn", "moved"),
                                      remove_families=("fill", "clone"), healthy=4):
        for e in edits:
            family = e.extra.get("family", "drawn")
            yield 1, (f"{family}:{e.extra.get('target', 'tumour')}" if label == "FB" else family), vol, np.asarray(e.voxel, float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    ap.add_argument("--names", default="", help="comma-separated parts of the scans' paths (all when empty)")
    a = ap.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    rows: list[tuple[int, str, np.ndarray]] = []
    for path, src, lungs, depth, noise in real_sources(cfg, a.names):
        n0 = len(rows)
        rows += [(label, what, resampling_trace(vol, at, noise)) for label, what, vol, at in places(src, lungs, depth, SEED)]
        pixel = src.volume.spacing[2]
        print(f"{Path(path).name[-24:]:>24}: pixel {pixel:.3f} mm, ripple {ripple_frequency(pixel):.3f} cycles a voxel, {len(rows) - n0} places",
              flush=True)
    untouched = [r for r in rows if r[0] == 0]
    windows = [f"{int(r)} mm" for r in TRACE_RADII_MM]
    print(f"\n{'edits':>16} {'against':<26} " + " ".join(f"{w:>6}" for w in windows))
    for family in sorted({r[1] for r in rows if r[0] == 1}) + ["all"]:
        edits = [r for r in rows if r[0] == 1 and (family == "all" or r[1] == family)]
        for against in (("lung",), ("dense",), ("real lesion",), ("lung", "dense", "real lesion")):
            neg = [r for r in untouched if r[1] in against]
            if not neg or not edits:
                continue
            y = [1] * len(edits) + [0] * len(neg)
            aucs = [roc_auc_score(y, np.nan_to_num([r[2][k] for r in edits + neg])) for k in range(len(windows))]
            print(f"{family + f' ({len(edits)})':>16} {'+'.join(against) + f' ({len(neg)})':<26} " + " ".join(f"{v:6.3f}" for v in aucs))


if __name__ == "__main__":
    main()
