"""``ctguard audit-report``: the results of an audit as an HTML page (counts by verdict, a histogram
of scores, the flagged series first with their findings) and a CSV export."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

CSV_COLUMNS = ("verdict", "score", "key", "study_uid", "series_uid", "patient_id", "description", "slices", "findings", "cross_check",
               "signature_status", "model", "model_version", "pixel_hash", "seconds", "error", "source", "screened_at")


def _histogram(scores: list[float]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.6), dpi=100)
    ax = fig.subplots()
    ax.hist(scores, bins=20, range=(0, 1), color="#4a6fa5")
    ax.set_xlabel("tamper score")
    ax.set_ylabel("series")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def error_kind(reason: str) -> str:
    """An error row's reason without its particulars: "not a CT series (modality MR)" -> "not a CT
    series", "not a CT: its voxels hold only ..." -> "not a CT"."""
    return reason.split(":")[0].split("(")[0].strip() or "error"


def write(rows: list[dict[str, Any]], out_dir: str | Path, reports: dict[str, str] | None = None) -> dict[str, Path]:
    """``index.html`` and ``series.csv`` under ``out_dir``; ``reports`` maps a series key to the
    relative link of its own screening report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = reports or {}
    counts = Counter(r["verdict"] for r in rows)
    with open(out / "series.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            sig = (r.get("signatures") or {}).get("status")
            w.writerow([json.dumps(r[c]) if c in ("findings", "cross_check") and r.get(c) is not None else
                        (sig if c == "signature_status" else r.get(c)) for c in CSV_COLUMNS])
    scores = [float(r["score"]) for r in rows if r.get("score") is not None]
    figure = f'<img alt="histogram of tamper scores" src="data:image/png;base64,{_histogram(scores)}">' if scores else "<p>No scores.</p>"

    def finding_list(r) -> str:
        items = [f"{html.escape(f['kind'])} {f['score']:.2f} at voxel {', '.join(f'{v:.0f}' for v in f['voxel'])}" for f in r.get("findings") or []]
        items += [f"disagrees with {html.escape(c.get('description') or c['series_uid'])} at voxel {', '.join(f'{v:.0f}' for v in d['voxel'])} "
                  f"({d['diameter_mm']:.0f} mm, {d['hu_difference']:+d} HU)" for c in r.get("cross_check") or [] for d in c.get("disagreements") or []]
        return "<br>".join(items) or "-"

    body = []
    for r in rows:
        link = reports.get(r["key"])
        name = html.escape(r.get("description") or "(no series description)")
        cell = f'<a href="{html.escape(link)}">{name}</a>' if link else name
        score = "" if r.get("score") is None else f"{r['score']:.3f}"
        sig = html.escape((r.get("signatures") or {}).get("status") or "-")
        body.append(f'<tr class="{html.escape(r["verdict"])}"><td>{html.escape(r["verdict"])}</td><td>{score}</td><td>{cell}<br>'
                    f'<small>{html.escape(r["key"])}</small></td><td>{html.escape(r.get("patient_id") or "")}</td><td>{r.get("slices") or ""}</td>'
                    f'<td>{finding_list(r)}</td><td>{sig}</td><td>{html.escape(r.get("error") or "")}</td></tr>')
    summary = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("tampered", "clean", "error"))
    reasons = Counter(error_kind(r.get("error") or "") for r in rows if r["verdict"] == "error")
    if reasons:  # what the errors are, at a glance: in a hospital archive most are series that are not CT
        summary += " (" + ", ".join(f"{n} {html.escape(k)}" for k, n in sorted(reasons.items(), key=lambda kn: (-kn[1], kn[0]))) + ")"
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ctguard audit</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}}tr.tampered td:first-child{{color:#b00020;font-weight:bold}}
tr.error td:first-child{{color:#8a6d00}}td small{{word-break:break-all}}td:last-child{{min-width:16em}}</style></head><body>
<h1>ctguard archive audit</h1>
<p>{len(rows)} series: {summary}. Model{'s' if len({r['model_version'] for r in rows}) > 1 else ''}:
{html.escape(', '.join(sorted({f"{r['model']} {r['model_version']}" for r in rows})))}. <a href="series.csv">CSV</a></p>
{figure}
<h2>Series, flagged first</h2>
<table><thead><tr><th>verdict</th><th>score</th><th>series</th><th>patient</th><th>slices</th><th>findings</th><th>signatures</th><th>error</th></tr></thead>
<tbody>{''.join(body)}</tbody></table></body></html>
"""
    (out / "index.html").write_text(page)
    return {"html": out / "index.html", "csv": out / "series.csv"}
