"""Screens every untouched real series of a config's ``real_scans`` with a detector: its verdict,
its findings and its highest scored places.

Usage:
    python benchmarks/experiments/clean_real_series.py MODEL [--config configs/tamper3d.yaml] [--json FILE]

MODEL is ``tamper3d`` (bundled) or a run's ``model.pt``. For a detector trained on these patients
this is an in-sample check (a clean series flagged here would be flagged in the clinic too); the
cross-validation (``benchmarks/cross_validate.py``) says how it does on patients it never saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctguard import api, io
from ctguard.screen import load_detector, scored_places, screen_volume

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="tamper3d (bundled) or a run's model.pt")
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    ap.add_argument("--json", default=None, help="also write every series' result here")
    a = ap.parse_args()
    det = load_detector(a.model)
    rows = []
    for e in api.load_config(a.config).get("real_scans") or []:
        result, _, _ = screen_volume(io.read(e["scan"]), det)
        top = sorted((p["score"] for p in scored_places(result["findings"] + result["under_threshold"])), reverse=True)[:3]
        rows.append({"patient": e.get("patient"), "series": Path(e["scan"]).name, "verdict": result["verdict"],
                     "findings": [{"kind": f["kind"], "score": round(f["score"], 3)} for f in result["findings"]],
                     "highest": [round(s, 3) for s in top]})
        r = rows[-1]
        print(f"{r['patient']:<20} {r['series'][:40]:<40} {r['verdict']:<9} findings {r['findings']} highest {r['highest']}", flush=True)
    flagged = sum(r["verdict"] != "clean" for r in rows)
    print(f"{det.name} {det.version}: {flagged}/{len(rows)} untouched real series flagged; "
          f"highest score {max((s for r in rows for s in r['highest']), default=0.0):.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": f"{det.name} {det.version}", "series": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
