"""A fold's network without its second stage, tested as the fold is.

Usage:
    python benchmarks/experiments/network_alone.py FOLD RUN [--config configs/tamper3d.yaml] [--out FILE]

RUN is the fold's run of benchmarks/cross_validate.py (e.g. runs/cv/fold2). Its network alone gets
the threshold the folds give a detector without a second stage (``cross_validate.choose_threshold``:
the lowest grid threshold with at most 0.1 findings per clean scan of the fold's training patients
and the calibration phantoms), then the fold's held-out tests (the same copies and edits as
cross_validate.py). Prints the threshold and the fold's summary row; beside the fold's own row (the
network and its stage), it says what the second stage gains or loses at the operating point.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cross_validate as cv  # noqa: E402

from ctguard.screen import load_detector  # noqa: E402


def main() -> None:
    ap = cv.fold_run_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the threshold's calibration and the evaluation here (JSON)")
    args = ap.parse_args()
    cfg, training, held = cv.fold_of(args)
    det = dataclasses.replace(load_detector(str(Path(args.run) / "model.pt")), verifier=None)  # a copy: the loaded one stays cached as is
    calib = cv.choose_threshold(det, cfg, training)
    det.threshold = calib["threshold"]
    ev = cv.evaluate_fold(det, held, args.fold)
    row = cv.summarise(ev, calib)
    print(json.dumps({"fold": args.fold, "threshold": calib, "row": row}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"fold": args.fold, "threshold": calib, "eval": ev, "row": row}, indent=1) + "\n")


if __name__ == "__main__":
    main()
