"""The screening report a radiologist reads: verdict, findings table, and for each finding
axial, coronal and sagittal crops in a lung window with the tamper heatmap overlaid."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from ctguard.io.dicom import scan_summary

LUNG_WINDOW = (-1350.0, 150.0)  # level -600, width 1500
CROP_MM = 70.0
MAX_FIGURES = 12  # views for the top findings; the table lists them all
SOURCES = {"network": "network", "trace": "resampling-trace map", "smooth": "smooth map", "blob": "blob map"}  # what put a place up for the second stage


def scan_line(scan: dict | None) -> str:
    """The patient, study and series a DICOM result is about (the result's ``scan``), as the
    report's first line; empty for other inputs."""
    if not scan:
        return ""
    uids = " &middot; ".join(f"{label} {html.escape(scan[k])}" for k, label in (("study_uid", "study"), ("series_uid", "series"))
                             if scan.get(k))
    return f'<p>{html.escape(scan_summary(scan))}{f"<br><small class=muted>{uids}</small>" if uids else ""}</p>\n'


def _crop_views(vol, heat_vox: np.ndarray, voxel: list[float]) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(name, image, heat, aspect) for axial, coronal and sagittal crops around ``voxel``."""
    z, y, x = (int(round(v)) for v in voxel)
    sz, sy, sx = vol.spacing
    hz, hy, hx = (max(int(CROP_MM / 2 / s), 2) for s in vol.spacing)
    zs = slice(max(z - hz, 0), z + hz + 1)
    ys = slice(max(y - hy, 0), y + hy + 1)
    xs = slice(max(x - hx, 0), x + hx + 1)
    axial = ("axial", vol.hu[z, ys, xs], heat_vox[z, ys, xs], sy / sx)
    if vol.shape[0] == 1:  # a single slice has no coronal or sagittal view
        return [axial]
    return [
        axial,
        ("coronal", vol.hu[zs, y, xs][::-1], heat_vox[zs, y, xs][::-1], sz / sx),
        ("sagittal", vol.hu[zs, ys, x][::-1], heat_vox[zs, ys, x][::-1], sz / sy),
    ]


def write_report(result: dict[str, Any], vol, heat_vox: np.ndarray, out_dir: str | Path, truth: list[dict] | None = None) -> Path:
    """Writes ``index.html``, ``result.json`` and one PNG per finding view into ``out_dir``.

    Args:
        result: the screening JSON.
        vol: the screened volume.
        heat_vox: the tamper probability on the scan's voxels.
        out_dir: the report folder (created).
        truth: optional known edits (the demo's) to show beside the findings.

    Returns:
        The path of ``index.html``.
    """
    from matplotlib.figure import Figure  # not pyplot: its global state is not safe in threads (the node, the web page)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    cards = []
    for i, f in enumerate(result["findings"][:MAX_FIGURES], start=1):
        views = _crop_views(vol, heat_vox, f["voxel"])
        fig = Figure(figsize=(3.2 * len(views), 3.4))
        axes = fig.subplots(1, len(views), squeeze=False)
        for ax, (name, img, heat, aspect) in zip(axes[0], views):
            ax.imshow(img, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect, interpolation="bilinear")
            masked = np.ma.masked_less(heat, 0.3)
            ax.imshow(masked, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.45, aspect=aspect, interpolation="bilinear")
            ax.set_title(name, fontsize=10)
            ax.set_xticks([]), ax.set_yticks([])
        fig.suptitle(f"finding {i}: {f['kind']} (score {f['score']:.3f})", fontsize=11)
        fig.tight_layout()
        png = f"finding_{i}.png"
        fig.savefig(out / png, dpi=90)
        cards.append((f, png))
    verdict = result["verdict"]
    colour = "#b00020" if verdict == "tampered" else "#1b5e20"
    thr = result["model"].get("threshold", 0.5)
    rows = "".join(
        f"<tr><td>{i}</td><td>{html.escape(f['kind'])}</td><td>{f['score']:.3f}</td><td>{f.get('threshold', thr):.2f}</td>"
        f"<td>{html.escape(SOURCES.get(f.get('source', 'network'), str(f.get('source'))))}</td>"
        f"<td>{', '.join(f'{v:.0f}' for v in f['voxel'])}</td><td>{', '.join(f'{v:.1f}' for v in f['world_mm'])}</td>"
        f"<td>{f['radius_mm']:.0f}{_reach(f, result['spacing_mm'])}</td></tr>"
        for i, f in enumerate(result["findings"], start=1)
    ) or '<tr><td colspan="8">No finding above the threshold.</td></tr>'
    peak_thr = result["model"].get("peak_threshold")
    blob_thr = result["model"].get("blob_threshold")
    thresholds = (f"threshold {thr:.2f}" + (f"; places found by the lung maps {peak_thr:.2f}" if peak_thr is not None else "")
                  + (f"; places found by the blob map {blob_thr:.2f}" if blob_thr is not None else ""))
    under = result.get("under_threshold") or []
    under_html = "" if not under else (
        "<h2>Highest places under the threshold</h2><p class=\"muted\">Not findings: the places that scored highest "
        "below the operating threshold, for a reader who wants to look further.</p><table><thead><tr><th>kind</th><th>score</th>"
        "<th>voxel z, y, x</th><th>world x, y, z (LPS mm)</th></tr></thead><tbody>"
        + "".join(f"<tr><td>{html.escape(f['kind'])}</td><td>{f['score']:.3f}</td><td>{', '.join(f'{v:.0f}' for v in f['voxel'])}</td>"
                  f"<td>{', '.join(f'{v:.1f}' for v in f['world_mm'])}</td></tr>" for f in under)
        + "</tbody></table>")
    truth_html = ""
    if truth:
        truth_rows = "".join(
            f"<tr><td>{html.escape(t['kind'])}</td><td>{', '.join(f'{v:.0f}' for v in t['voxel'])}</td><td>{t.get('diameter_mm', 0):.0f}</td></tr>"
            for t in truth
        )
        truth_html = f"<h2>Known edits (demo ground truth)</h2><table><thead><tr><th>kind</th><th>voxel z, y, x</th><th>size mm</th></tr></thead><tbody>{truth_rows}</tbody></table>"
    figures = "".join(
        f'<figure><img src="{png}" alt="Finding {i}: axial, coronal and sagittal views with the tamper heatmap">'
        f"<figcaption>Finding {i}: {html.escape(f['kind'])}, score {f['score']:.3f}, at voxel "
        f"{', '.join(f'{v:.0f}' for v in f['voxel'])}</figcaption></figure>"
        for i, (f, png) in enumerate(cards, start=1)
    )
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in result.get("warnings", []))
    cross_html = _cross_check_html(result)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ctguard report: {html.escape(verdict)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #1a1a1a; padding: 0 1rem; }}
.verdict {{ font-size: 1.6rem; font-weight: 700; color: {colour}; }}
table {{ border-collapse: collapse; margin: .5rem 0 1.5rem; }}
th, td {{ border-bottom: 1px solid #ccc; padding: .3rem .8rem; text-align: left; }}
figure {{ margin: 1rem 0; }} img {{ max-width: 100%; }}
.muted {{ color: #555; }}
</style></head><body>
<h1>ctguard screening report</h1>
<p class="verdict">Verdict: {html.escape(verdict)}</p>
{scan_line(result.get("scan"))}<p>Tamper score {result['score']:.3f} ({thresholds}) &middot; input <code>{html.escape(str(result['input']))}</code>
&middot; {result['shape'][0]}&times;{result['shape'][1]}&times;{result['shape'][2]} voxels, spacing {', '.join(f'{s:g}' for s in result['spacing_mm'])} mm
&middot; model {html.escape(result['model']['name'])} {html.escape(result['model']['version'])} &middot; {result['elapsed_s']:.1f} s</p>
{f'<ul class="muted">{warnings}</ul>' if warnings else ''}
<h2>Findings</h2>
<table><thead><tr><th>#</th><th>kind</th><th>score</th><th>threshold</th><th>found by</th><th>voxel z, y, x</th><th>world x, y, z (LPS mm)</th><th>radius mm (places merged into it)</th></tr></thead><tbody>{rows}</tbody></table>
{cross_html}
{under_html}
{truth_html}
{figures}
<p class="muted">Heatmap: probability that tissue was edited (shown above 0.3). Lung window W1500/L-600.
ctguard flags edits made by a CT-GAN-style attack; it does not diagnose disease.</p>
</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index


def _reach(finding: dict, spacing) -> str:
    """The places merged into a finding over their own thresholds, for its row: " (+7 within 28 mm)"."""
    from ctguard.screen import spread

    n, far = spread(finding, spacing)
    return f" (+{n} within {far:.0f} mm)" if n else ""


def _cross_check_html(result: dict) -> str:
    """The section on the other reconstructions of the scan's acquisition (:mod:`ctguard.crosscheck`)."""
    from ctguard.crosscheck import cross_check_lines

    lines = cross_check_lines(result)
    if not lines:
        return ""
    nested = ' style="margin-left:1.5rem"'
    items = "".join(f"<li{nested if level else ''}>{f'<strong>{html.escape(text)}</strong>' if alarm else html.escape(text)}</li>"
                    for level, text, alarm in lines)
    return ("<h2>Other reconstructions of this acquisition</h2><p class=\"muted\">Two reconstructions of one acquisition "
            "share its noise; where one was edited, the two stop correlating there.</p>"
            f"<ul>{items}</ul>")
