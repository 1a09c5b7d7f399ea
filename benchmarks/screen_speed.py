"""Screening speed and memory on a 512x512x300 chest (a phantom written as DICOM), side by side with
just reading it, in one run.

Usage: python benchmarks/screen_speed.py [--slices 300] [--repeat 2] [--model PATH]
Uses the series benchmarks/read_speed.py writes (benchmarks/_work/phantom_<slices>, 0.7 mm pixels,
1 mm slices), page cache warm. Each measurement runs in a fresh subprocess; peak memory is the
growth of ru_maxrss over the interpreter's after its imports. Target (issue 7): screening <= 5x the
read time, under 20 s, peak under 3 GB.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default="", help="a detector checkpoint or .onnx (default: the bundled one)")
    args = ap.parse_args()
    series = WORK / f"phantom_{args.slices}"
    if not series.exists():
        from ctguard import io
        from ctguard.data.phantom import make_chest

        io.write_series(make_chest((args.slices, 512, 512), (1.0, 0.7, 0.7), seed=1), series)
    for f in series.iterdir():
        f.read_bytes()
    res = {}
    for what in ("read", "screen"):
        runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE, str(series), what, args.model], capture_output=True, text=True,
                                          check=True).stdout.strip().splitlines()[-1]) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["seconds"])
        res[what] = {"seconds": round(best["seconds"], 2), "peak_mb": round(max(r["peak_mb"] for r in runs)),
                     "verdict": best["verdict"], "findings": best["findings"], "runtime": best["runtime"]}
    res["ratio_screen_over_read"] = round(res["screen"]["seconds"] / res["read"]["seconds"], 2)
    res["series"] = str(series)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
