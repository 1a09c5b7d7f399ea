"""Reading a 512x512x300 DICOM series: ctguard vs SimpleITK's ImageSeriesReader, in one run.

Usage: python benchmarks/read_speed.py [--slices 300] [--repeat 3]
Writes the phantom series once (benchmarks/_work/), warms the page cache, then times each reader
in a fresh subprocess (best of --repeat) and records its peak RSS growth over the interpreter's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"

READERS = {
    "ctguard": "from ctguard import io; v = io.read(p); hu = v.hu",
    "simpleitk": ("import SimpleITK as sitk; r = sitk.ImageSeriesReader(); "
                  "r.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(p)); img = r.Execute(); "
                  "hu = sitk.GetArrayViewFromImage(img)"),
}
PROBE = """
import resource, sys, time
p = sys.argv[1]
import numpy, pydicom, SimpleITK, ctguard.io  # imports are not part of the reading time
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
{code}
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(dt, (peak - base) / 1024.0, hu.shape, hu.dtype)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    series = WORK / f"phantom_{args.slices}"
    if not series.exists():
        from ctguard import io
        from ctguard.data.phantom import make_chest

        io.write_series(make_chest((args.slices, 512, 512), (1.0, 0.7, 0.7), seed=1), series)
    for f in series.iterdir():  # warm the page cache
        f.read_bytes()
    result = {"series": str(series), "slices": args.slices}
    for name, code in READERS.items():
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, "-c", PROBE.format(code=code), str(series)], capture_output=True, text=True, check=True)
            dt, mem, *_ = out.stdout.split()
            runs.append((float(dt), float(mem)))
        best = min(runs)
        result[name] = {"seconds": round(best[0], 3), "peak_mb": round(max(m for _, m in runs), 1)}
    volume_mb = args.slices * 512 * 512 * 4 / 2**20
    result["volume_mb_float32"] = round(volume_mb, 1)
    result["time_ratio_ctguard_over_sitk"] = round(result["ctguard"]["seconds"] / result["simpleitk"]["seconds"], 2)
    result["peak_over_volume"] = round(result["ctguard"]["peak_mb"] / volume_mb, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
