#!/usr/bin/env bash
# Rebuilds the bundled detectors from their committed configs, in the order they depend on each
# other, then measures and bundles them. Run from the repository root with PyTorch installed
# (pip install -e '.[train]'), ../shared beside the repository. About 2.5 hours on 2 CPU cores.
# A stage whose runs/<name>/model.pt exists is skipped, so an interrupted run picks up where it stopped.
#
#   bash benchmarks/reproduce_detectors.sh            # train every stage, evaluate and calibrate v0.6
#   BUNDLE=1 bash benchmarks/reproduce_detectors.sh   # ... and copy the results into src/ctguard/weights
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d ../shared/data/lung-pet-ct-dx ] || { echo "needs ../shared/data/lung-pet-ct-dx beside the repository" >&2; exit 2; }
if [ -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ]; then  # 30% less kernel time (docs/benchmarks.md)
  export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
fi

stage() {  # stage CONFIG RUN_DIR: train unless the run is already there
  if [ -f "$2/model.pt" ]; then echo "= $2 exists, skipped"; return; fi
  echo "+ ctguard train --config $1 --out $2"
  ctguard train --config "$1" --out "$2"
}

# The 3D detector: v0.1 -> v0.2 -> v0.3 -> v0.4 -> v0.5 -> v0.6, each initialised from the one before.
stage configs/tamper3d.yaml runs/tamper3d
stage configs/tamper3d-hard.yaml runs/tamper3d-hard
stage configs/tamper3d-hard2.yaml runs/tamper3d-hard2
stage configs/tamper3d-varied.yaml runs/tamper3d-varied
stage configs/tamper3d-opacities.yaml runs/tamper3d-opacities
stage configs/tamper3d-thick.yaml runs/tamper3d-thick
# The 2D detector for single slices, from the 3D runs' cubes.
stage configs/tamper2d.yaml runs/tamper2d
# The other way round (trained on A0002, tested on A0001): not bundled, its numbers go in the card.
stage configs/tamper3d-swap.yaml runs/tamper3d-swap

# Held-out quality (A0002 + unseen phantoms) and the threshold, as recorded in docs/benchmarks.md.
M=runs/tamper3d-thick/model.pt
python benchmarks/calibrate_tamper3d.py --model "$M" --varied --opacities 4 > runs/calib-v06.json
python benchmarks/eval_tamper3d.py --model "$M" --threshold 0.98 --out runs/eval-v06-A0002.json
python benchmarks/eval_tamper3d.py --model "$M" --threshold 0.98 --varied --phantoms 8 --out runs/eval-v06-varied.json
python benchmarks/eval_tamper3d.py --model runs/tamper3d-swap/model.pt --holdout A0001 --varied --phantoms 8 --out runs/eval-swap-A0001-varied.json
python benchmarks/calibrate_tamper3d.py --2d --model runs/tamper2d/model.pt --max-false 0.2 > runs/calib-2d.json
python benchmarks/eval_tamper2d.py --model runs/tamper2d/model.pt --threshold 0.9 --out runs/eval-2d-A0002.json

if [ "${BUNDLE:-0}" = 1 ]; then
  python benchmarks/bundle_tamper3d.py runs/tamper3d-thick runs/eval-v06-A0002.json runs/eval-v06-varied.json runs/calib-v06.json \
    runs/eval-swap-A0001-varied.json --threshold 0.98 --version 0.6 \
    --patients "Lung-PET-CT-Dx A0001 (both series as acquired, and averaged into 10 mm slabs) + phantoms: seeds 0-9 (one scanner set-up), 2000-2015 and 2100-2109 (random set-ups, the latter with genuine hazy patches); simulated CT-GAN-style edits; hard negatives mined in 12 rounds on clean phantoms (seeds 500-919 one set-up, 1000-1607 varied) and A0001's own series"
  python benchmarks/bundle_tamper3d.py runs/tamper2d runs/eval-2d-A0002.json runs/calib-2d.json --name tamper2d --threshold 0.9 --version 0.1
fi
