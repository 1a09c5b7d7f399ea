"""Screening speed and memory on a 512x512x300 chest (a phantom written as DICOM), side by side with
just reading it, in one run.

Usage: python benchmarks/screen_speed.py [--slices 300] [--repeat 2] [--model PATH] [--steps N]
Uses the series benchmarks/read_speed.py writes (benchmarks/_work/phantom_<slices>, 0.7 mm pixels,
1 mm slices), page cache warm. Each measurement runs in a fresh subprocess, a read and a screening
in turn; the ratio is the best screening over the best read (and, beside it, the median over the
turns of each screening over the read just before it); peak memory is the growth of ru_maxrss over
the interpreter's after its imports. Target (issue 7): screening <= 5x the
read time, under 20 s, peak under 3 GB. With ``--steps N`` it prints instead where the time goes:
N screenings, each in a fresh process, each step of it timed (the read, the lung mask, the
network's heatmap, the stage's reading of the whole scan in a thread beside it, the stage's
candidates, their rows and trees).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"
PROBE = """
import json, resource, sys, time
p, what, model = sys.argv[1], sys.argv[2], sys.argv[3] or None
import numpy, ctguard.api, ctguard.screen, ctguard.io
det = ctguard.screen.load_detector(model)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if what == "read":
    v = ctguard.io.read(p)
    out = {}
else:
    out = ctguard.api.screen(p, model=model)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
                  "verdict": out.get("verdict"), "findings": len(out.get("findings", [])), "runtime": "onnxruntime" if det.session is not None else "torch"}))
"""

STEPS = """
import json, sys, time
p, model = sys.argv[1], sys.argv[2] or None
import ctguard.api, ctguard.screen as S, ctguard.verifier as V
S.load_detector(model)
took = {}
def timed(mod, name, label):
    f = getattr(mod, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); took[label] = took.get(label, 0.0) + time.perf_counter() - t; return r
    setattr(mod, name, g)
for mod, name, label in ((ctguard.api, "load", "read"), (S, "lung_mask", "lungs"), (S, "heatmap", "heatmap"),
                         (V.Verifier, "read_scan", "scan reading (beside the heatmap)"),
                         (S, "stage_candidates", "candidates"), (S, "verify_findings", "stage rows and trees")):
    timed(mod, name, label)
t = time.perf_counter()
ctguard.api.screen(p, model=model)
print(json.dumps({"total": round(time.perf_counter() - t, 3), **{k: round(v, 3) for k, v in took.items()}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default="", help="a detector checkpoint or .onnx (default: the bundled one)")
    ap.add_argument("--steps", type=int, default=0, metavar="N", help="time each step of N screenings instead")
    args = ap.parse_args()
    series = WORK / f"phantom_{args.slices}"
    if not series.exists():
        from ctguard import io
        from ctguard.data.phantom import make_chest

        io.write_series(make_chest((args.slices, 512, 512), (1.0, 0.7, 0.7), seed=1), series)
    for f in series.iterdir():
        f.read_bytes()
    if args.steps:
        for _ in range(args.steps):
            print(subprocess.run([sys.executable, "-c", STEPS, str(series), args.model], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1])
        return
    # A read and a screening in turn, so that both see the machine as it is at the time.
    runs: dict[str, list[dict]] = {"read": [], "screen": []}
    for _ in range(args.repeat):
        for what in runs:
            runs[what].append(json.loads(subprocess.run([sys.executable, "-c", PROBE, str(series), what, args.model], capture_output=True,
                                                        text=True, check=True).stdout.strip().splitlines()[-1]))
    res = {}
    for what, got in runs.items():
        best = min(got, key=lambda r: r["seconds"])
        res[what] = {"seconds": round(best["seconds"], 2), "all_seconds": [round(r["seconds"], 2) for r in got],
                     "peak_mb": round(max(r["peak_mb"] for r in got)), "verdict": best["verdict"], "findings": best["findings"],
                     "runtime": best["runtime"]}
    res["ratio_screen_over_read"] = round(min(r["seconds"] for r in runs["screen"]) / min(r["seconds"] for r in runs["read"]), 2)
    res["ratio_median_of_turns"] = round(statistics.median(s["seconds"] / r["seconds"] for s, r in zip(runs["screen"], runs["read"])), 2)
    res["series"] = str(series)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
