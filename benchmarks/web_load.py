"""Load test of the web API on loopback: N concurrent uploads of a small DICOM series.

Usage: python benchmarks/web_load.py [--clients 20] [--workers 1] [--queue 4]

Starts `ctguard serve` on a free port, writes a small phantom series (40x96x96, zipped), fires
--clients uploads at once at POST /api/screen, and records for each: status, latency and whether
the answer is right (200 with the phantom's shape and a verdict, or 429 with Retry-After). Prints
throughput (correct screenings per second), latency percentiles, and the status counts as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--queue", type=int, default=4)
    args = ap.parse_args()
    import httpx

    from ctguard import io as ctio
    from ctguard.data.phantom import make_chest

    tmp = Path(tempfile.mkdtemp(prefix="ctguard-load-"))
    vol = make_chest((40, 96, 96), (4.0, 3.6, 3.6), seed=3)
    files = ctio.write_series(vol, tmp / "series")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f.name)
    payload = buf.getvalue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ctguard.cli", "serve", "-q", "--port", str(port), "--workers", str(args.workers),
                               "--queue", str(args.queue)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/api/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)

        def one(i: int) -> dict:
            t = time.perf_counter()
            r = httpx.post(url + "/api/screen", files={"files": (f"s{i}.zip", payload, "application/zip")}, timeout=600)
            dt = time.perf_counter() - t
            ok = (r.status_code == 200 and r.json()["shape"] == [40, 96, 96] and r.json()["verdict"] in ("clean", "tampered")) or (
                r.status_code == 429 and r.headers.get("Retry-After") is not None)
            return {"status": r.status_code, "seconds": dt, "correct": ok}

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, range(args.clients)))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(10)
    lat = np.array([r["seconds"] for r in results if r["status"] == 200])
    out = {
        "clients": args.clients, "workers": args.workers, "queue": args.queue, "upload_bytes": len(payload),
        "status_counts": {str(k): sum(r["status"] == k for r in results) for k in sorted({r["status"] for r in results})},
        "all_correct_or_429": all(r["correct"] for r in results),
        "wall_s": round(wall, 2),
        "screened_per_s": round(len(lat) / wall, 2),
        "latency_s_200": {p: round(float(np.percentile(lat, q)), 2) for p, q in (("p50", 50), ("p90", 90), ("max", 100))} if len(lat) else {},
        "latency_s_429_max": round(max((r["seconds"] for r in results if r["status"] == 429), default=0.0), 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
