#!/usr/bin/env bash
# Trains the detectors' recipes from their committed configs, from scratch, cross-validates the 3D
# recipe by patient, and (with BUNDLE=1) bundles the 3D detector trained on every patient with the
# threshold its second stage's rule gives it (the folds' rule). Run from the repository root with PyTorch installed
# (pip install -e '.[train]'), ../shared beside the repository and pypi.org reachable (for the
# extra CT scans). On 2 CPU cores: about 25 min for the 3D recipe, 40 min a cross-validation fold.
# A run whose runs/<name>/model.pt exists is skipped (a fold likewise), so an interrupted run picks up
# where it stopped.
#
#   bash benchmarks/reproduce_detectors.sh            # train and cross-validate
#   BUNDLE=1 bash benchmarks/reproduce_detectors.sh   # ... and copy the 3D detector into src/ctguard/weights
#
# The bundled v0.8 was made by the earlier chain of fine-tunes: its configs and this script as it
# was are in git history up to commit 099eaf3.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d ../shared/data/lung-pet-ct-dx ] && [ -d ../shared/data/lidc-idri ] || { echo "needs ../shared/data (lung-pet-ct-dx, lidc-idri) beside the repository" >&2; exit 2; }
python benchmarks/fetch_extra_ct.py  # PyRadiomics' two test chest CTs (lung1, lung2) from PyPI, into runs/extra-ct
if [ -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ]; then  # less kernel time in the allocator
  export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
fi

stage() {  # stage CONFIG RUN_DIR: train unless the run is already there
  if [ -f "$2/model.pt" ]; then echo "= $2 exists, skipped"; return; fi
  echo "+ ctguard train --config $1 --out $2"
  ctguard train --config "$1" --out "$2"
}

stage configs/tamper3d.yaml runs/tamper3d        # also writes runs/tamper3d-cubes.npz for the 2D detector
stage configs/tamper2d.yaml runs/tamper2d
python benchmarks/cross_validate.py --out runs/cv --md runs/cv.md --json runs/cv.json
python benchmarks/experiments/slice_stage.py --out runs/cv-2d-slice.json  # the 2D slice stage by patient (the bundled 2D network's candidates)
python benchmarks/calibrate_tamper3d.py --2d --model runs/tamper2d/model.pt --max-false 0.2 > runs/calib-2d.json  # fresh phantoms: for the card

if [ "${BUNDLE:-0}" = 1 ]; then
  # each threshold is its second stage's own, chosen by its out-of-patient rule, as in each fold
  python benchmarks/bundle_tamper3d.py runs/tamper3d --version 0.15 --cv runs/cv.json
  python benchmarks/bundle_tamper3d.py runs/tamper2d runs/calib-2d.json --name tamper2d --version 0.5 --cv runs/cv-2d-slice.json
fi
