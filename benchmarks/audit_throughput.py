"""Throughput of `ctguard audit` on an archive of phantom series of realistic size.

Usage:
    python benchmarks/audit_throughput.py [--series 40] [--slices 130] [--out runs/audit-throughput.json]

Writes an archive of ``--series`` CT series of ``--slices`` 512x512 slices (four distinct phantom
chests, each written under several sets of UIDs), then audits it three times into fresh results:
the local engine with 1 and with 2 workers, and Ray with 2 workers. Records series per minute and
the peak resident memory of any one worker process (sampled every 0.2 s over the driver's
descendants), and, on one series, where the time of a series goes (reading, pixel hash, lung mask,
the network, findings and report, the results row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def _make_archive(root: Path, n_series: int, slices: int) -> None:
    from ctguard import io
    from ctguard.data.phantom import make_chest

    vols = [make_chest((slices, 512, 512), (2.5, 0.7, 0.7), seed=500 + k) for k in range(4)]
    for i in range(n_series):
        io.write_series(vols[i % 4], root / f"patient{i // 2:03d}" / f"series{i % 2}", uid_seed=f"bench-{i}")


class PeakMemory:
    """Peak RSS of each descendant process of this one, sampled from /proc (Linux)."""

    def __init__(self):
        self.peak: dict[int, tuple[str, int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _descendants() -> list[int]:
        parent: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        out, frontier = [], [os.getpid()]
        while frontier:
            kids = [p for p, pp in parent.items() if pp in frontier]
            out += kids
            frontier = kids
        return out

    def _run(self):
        while not self.stop.wait(0.2):
            for pid in self._descendants():
                try:
                    rss = next(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
                    name = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:200]
                except (OSError, StopIteration):
                    continue
                if rss > self.peak.get(pid, ("", 0))[1]:
                    self.peak[pid] = (name, rss)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def worker_peak_mb(self, engine: str) -> float:
        def is_worker(name: str) -> bool:
            return ("ray::" in name or "default_worker" in name) if engine == "ray" else "spawn_main" in name

        sizes = [rss for name, rss in self.peak.values() if is_worker(name)]
        return round(max(sizes) / 2**20, 0) if sizes else float("nan")


def _stages(folder: Path) -> dict[str, float]:
    """Where one series' time goes, in this process (warm: the second of two runs)."""
    from ctguard import api
    from ctguard.audit.sources import folder_series
    from ctguard.audit.store import Results
    from ctguard.audit.work import pixel_hash
    from ctguard.lung import lung_mask
    from ctguard.screen import _result, heatmap, load_detector

    ref = next(r for r in folder_series(folder))
    det = load_detector(None)
    out = {}
    for _ in range(2):
        t = time.time()
        vol = api.load(folder)
        out["read_s"] = time.time() - t
        t = time.time()
        pixel_hash(ref)
        out["pixel_hash_s"] = time.time() - t
        t = time.time()
        lungs = lung_mask(vol)
        out["lung_mask_s"] = time.time() - t
        t = time.time()
        heat = heatmap(vol, det, lungs)
        out["network_s"] = time.time() - t
        t = time.time()
        result = _result(vol, det, heat, det.threshold, str(folder), [], time.time())
        api._add_signature_finding(result, vol, api.signature_status(vol.meta["files"], signed=vol.meta.get("signed")))
        out["findings_and_signatures_s"] = time.time() - t
        t = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            res = Results(Path(tmp) / "r.sqlite")
            res.put({"key": ref.key, "pixel_hash": "x", "model": det.name, "model_version": str(det.version), "verdict": result["verdict"],
                     "score": result["score"], "findings": result["findings"]})
            res.close()
        out["results_row_s"] = time.time() - t
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=40)
    ap.add_argument("--slices", type=int, default=130)
    ap.add_argument("--out", default="runs/audit-throughput.json")
    ap.add_argument("--keep", action="store_true", help="keep the archive")
    args = ap.parse_args()
    from ctguard import api

    tmp = Path(tempfile.mkdtemp(prefix="ctguard-audit-bench-"))
    archive = tmp / "archive"
    t = time.time()
    _make_archive(archive, args.series, args.slices)
    size = sum(f.stat().st_size for f in archive.rglob("*.dcm"))
    report = {"series": args.series, "slices_per_series": args.slices, "archive_gb": round(size / 1e9, 2),
              "archive_seconds": round(time.time() - t, 1), "cpus": os.cpu_count(), "runs": []}
    print(json.dumps(report), flush=True)
    for engine, workers in (("local", 1), ("local", 2), ("ray", 2)):
        with PeakMemory() as mem:
            t = time.time()
            counts = api.audit(archive, tmp / f"{engine}-{workers}.sqlite", workers=workers, engine=engine, progress=False)
            wall = time.time() - t
        if engine == "ray":
            import ray

            ray.shutdown()
        run = {"engine": engine, "workers": workers, "wall_s": round(wall, 1), "series_per_min": round(counts["screened"] / wall * 60, 2),
               "screened": counts["screened"], "errors": counts["error"], "worker_peak_mb": mem.worker_peak_mb(engine)}
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
    report["one_series_stages"] = _stages(next(archive.iterdir()) / "series0")
    print(json.dumps(report["one_series_stages"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
