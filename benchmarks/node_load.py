"""Load test of the DICOM node in front of a real Orthanc: S concurrent senders of N slices each.

Usage (as root, or where `unshare -n` works; Orthanc from `apt-get install orthanc`):
    python benchmarks/node_load.py [--senders 4] [--slices 200] [--workers 2] [--associations 4]

Runs itself inside a private network namespace with only loopback (Orthanc 1.10 listens on every
interface). Writes S phantom series of N 512x512 slices, starts Orthanc and `ctguard node`
(forwarding with `--on-tampered forward`, so every series travels the whole path whatever its
verdict), sends the series at once from S threads (one association each), and waits until Orthanc
has them all. Records instances per second, end-to-end latency per series (first instance sent to
last instance stored in Orthanc), and that every instance arrived exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def inside(args) -> None:
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_node import free_port
    from test_node_orthanc import _rest, _series_in_orthanc, _start_orthanc, _wait

    from ctguard import io
    from ctguard.data.phantom import make_chest

    tmp = Path(tempfile.mkdtemp(prefix="ctguard-node-load-"))
    series = []
    for k in range(args.senders):
        vol = make_chest((args.slices, 512, 512), (1.25, 0.7, 0.7), seed=100 + k)
        series.append(io.write_series(vol, tmp / f"s{k}", uid_seed=f"load-{k}"))
    uids = [str(pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID) for f in series]
    http, dicom, node_port = free_port(), free_port(), free_port()
    orthanc = _start_orthanc(tmp, http, dicom)
    node = subprocess.Popen([sys.executable, "-m", "ctguard.cli", "node", "-q", "--port", str(node_port), "--forward",
                             f"ORTHANC@127.0.0.1:{dicom}", "--spool", str(tmp / "spool"), "--settle", "2", "--study-settle", "0", "--on-tampered", "forward",
                             "--workers", str(args.workers), "--associations", str(args.associations)],
                            stdout=open(tmp / "node.log", "w"), stderr=subprocess.STDOUT)
    time.sleep(3)
    started, sent_done = {}, {}

    def sender(k: int) -> None:
        ae = AE(ae_title=f"SCANNER{k}")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node_port, ae_title="CTGUARD")
        started[k] = time.time()
        for f in series[k]:
            assert int(assoc.send_c_store(pydicom.dcmread(f)).Status) == 0
        assoc.release()
        sent_done[k] = time.time()

    t0 = time.time()
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(args.senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    arrived = {}
    try:
        def all_there():
            for k, uid in enumerate(uids):
                if k not in arrived and len(_series_in_orthanc(http, uid)) == args.slices:
                    arrived[k] = time.time()
            return len(arrived) == len(uids)

        _wait(all_there, 1800, "every series in Orthanc")
        total = len(_rest(http, "/instances"))
        audit_path = tmp / "spool" / "audit.jsonl"
        _wait(lambda: audit_path.is_file() and len(audit_path.read_text().splitlines()) >= len(uids), 60, "every audit line")
    finally:
        node.terminate()
        orthanc.terminate()
    audit = [json.loads(x) for x in (tmp / "spool" / "audit.jsonl").read_text().splitlines()]
    n = args.senders * args.slices
    out = {
        "senders": args.senders, "slices_per_series": args.slices, "instances": n,
        "node_workers": args.workers, "node_associations": args.associations,
        "instances_in_orthanc": total, "every_instance_once": total == n,
        "send_seconds": round(max(sent_done.values()) - t0, 1),
        "end_to_end_seconds": round(max(arrived.values()) - t0, 1),
        "instances_per_s_end_to_end": round(n / (max(arrived.values()) - t0), 1),
        "instances_per_s_received": round(n / (max(sent_done.values()) - t0), 1),
        "series_latency_s": [round(arrived[k] - started[k], 1) for k in range(args.senders)],
        "verdicts": [a.get("verdict") for a in audit if "series_uid" in a],
    }
    print(json.dumps(out, indent=2), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="the node's --workers")
    ap.add_argument("--associations", type=int, default=4, help="the node's --associations")
    args = ap.parse_args()
    if os.environ.get("CTGUARD_NETNS") == "1":
        return inside(args)
    cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, __file__,
           "--senders", str(args.senders), "--slices", str(args.slices),
           "--workers", str(args.workers), "--associations", str(args.associations)]
    raise SystemExit(subprocess.call(cmd, env={**os.environ, "CTGUARD_NETNS": "1"}))


if __name__ == "__main__":
    main()
