"use strict";
// ctguard page: upload -> POST /api/jobs -> poll GET /api/jobs/{id} -> verdict, findings, slice viewer.
const $ = (id) => document.getElementById(id);

// The places merged into a finding over their own thresholds (one edit's reach), as the report shows them.
function reach(f, spacing) {
  const over = (f.also_at || []).filter((p) => p.score >= (p.threshold ?? f.threshold ?? 0));
  if (!over.length) return "";
  const far = Math.max(...over.map((p) => Math.hypot(...p.voxel.map((v, k) => (v - f.voxel[k]) * spacing[k]))));
  return ` (+${over.length} within ${Math.round(far)} mm)`;
}

// The cross-check's lines as the server words them (ctguard.crosscheck.cross_check_lines).
function crossCheckItems(lines) {
  return lines.map(({ level, text, alarm }) => {
    const li = document.createElement("li");
    if (level) li.style.marginLeft = "1.5rem";
    const el = alarm ? li.appendChild(document.createElement("strong")) : li;
    el.textContent = text;
    return li;
  });
}

const STAGES = { read: 10, lungs: 30, detector: 55, findings: 85, report: 92, done: 100 };
let job = null;

function show(el, on = true) { el.hidden = !on; }
function status(text, pct) {
  show($("status"));
  $("status-text").textContent = text;
  if (pct !== undefined) $("bar").value = pct;
}
function fail(msg) {
  show($("status"), false);
  $("error").textContent = msg;
  show($("error"));
  $("go").disabled = false;
}

function chosen(files) {
  const n = files.length;
  $("chosen").textContent = n === 0 ? "" : n === 1 ? files[0].name : `${n} files`;
  $("go").disabled = n === 0;
}

$("files").addEventListener("change", (e) => chosen(e.target.files));
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  $("files").files = e.dataTransfer.files;
  chosen(e.dataTransfer.files);
});

$("upload-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const files = $("files").files;
  if (!files.length) return;
  show($("error"), false);
  show($("result"), false);
  $("go").disabled = true;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/jobs");
  xhr.upload.onprogress = (ev) => {
    if (ev.lengthComputable) status(`Uploading… ${Math.round((100 * ev.loaded) / ev.total)}%`, (5 * ev.loaded) / ev.total);
  };
  xhr.onload = () => {
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
    if (xhr.status === 202) { poll(body.id); return; }
    if (xhr.status === 429) { fail(`The server is busy; try again in ${xhr.getResponseHeader("Retry-After") || "a few"} seconds.`); return; }
    fail(body.detail || `Upload refused (HTTP ${xhr.status}).`);
  };
  xhr.onerror = () => fail("The upload failed: is the server still running?");
  status("Uploading…", 0);
  xhr.send(form);
});

async function poll(id) {
  const r = await fetch(`/api/jobs/${id}`);
  if (!r.ok) { fail(`Lost the job (HTTP ${r.status}).`); return; }
  const j = await r.json();
  if (j.status === "done") { status("Done", 100); $("go").disabled = false; render(j); return; }
  if (j.status === "error") { fail(j.error || "Screening failed."); return; }
  status(j.status === "queued" ? "Waiting for a free worker…" : `Screening: ${j.stage || "starting"}…`, STAGES[j.stage] || 5);
  setTimeout(() => poll(id), 400);
}

function render(j) {
  job = j;
  const res = j.result;
  const tampered = res.verdict === "tampered";
  const v = $("verdict");
  v.textContent = tampered ? "Tampered" : "Clean";
  v.className = `verdict ${tampered ? "bad" : "good"}`;
  $("score").textContent = res.score.toFixed(3);
  $("scan").textContent = j.text.scan;  // a DICOM series: whom and what it is about
  show($("scan"), !!j.text.scan);
  $("meta").textContent = `${j.name} · ${res.shape.join(" × ")} voxels (z, y, x) · spacing ${res.spacing_mm.map((s) => s.toFixed(2)).join(" × ")} mm · model ${res.model.name} ${res.model.version} · ${res.elapsed_s.toFixed(1)} s`;
  $("json-link").href = j.links.json;
  $("report-link").href = j.links.report;
  for (const key of ["sr", "seg"]) {  // DICOM results: a DICOM series only, the SEG when tampered
    const a = $(`${key}-link`);
    if (j.links[key]) a.href = j.links[key];
    a.hidden = !j.links[key];
  }
  const warn = (res.warnings || []).join(" ");
  $("warnings").textContent = warn ? `Warnings: ${warn}` : "";
  show($("warnings"), !!warn);
  const cross = $("cross-check");
  cross.replaceChildren(...crossCheckItems(j.text.cross_check));
  show(cross, j.text.cross_check.length > 0);

  const body = $("findings").querySelector("tbody");
  body.replaceChildren();
  res.findings.forEach((f, i) => {
    const tr = document.createElement("tr");
    tr.tabIndex = 0;
    tr.className = `finding ${f.kind}`;
    tr.setAttribute("aria-label", `Finding ${i + 1}: ${f.kind}, score ${f.score.toFixed(2)}, slice ${Math.round(f.voxel[0])}; press Enter to view`);
    const cells = [i + 1, f.kind, f.score.toFixed(3), Math.round(f.voxel[0]), f.voxel.map((c) => c.toFixed(0)).join(", "),
      `${f.radius_mm.toFixed(1)} mm${reach(f, res.spacing_mm)}`];
    cells.forEach((c, k) => {
      const td = document.createElement("td");
      if (k === 1) {
        const tag = document.createElement("span");
        tag.className = `tag ${f.kind === "removed" ? "removed" : "injected"}`;
        tag.textContent = c;
        td.appendChild(tag);
      } else td.textContent = c;
      tr.appendChild(td);
    });
    const go = () => setSlice(Math.round(f.voxel[0]));
    tr.addEventListener("click", go);
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); } });
    body.appendChild(tr);
  });
  show($("findings"), res.findings.length > 0);
  // No finding: say what the threshold was and where the highest place under it is (not a finding).
  const under = res.under_threshold || [];
  const m = res.model || {};
  const peaks = (typeof m.peak_threshold === "number" ? `; the lung maps' peaks ${m.peak_threshold.toFixed(2)}` : "")
    + (typeof m.blob_threshold === "number" ? `; the blob map's peaks ${m.blob_threshold.toFixed(2)}` : "");
  const thr = typeof m.threshold === "number" ? ` (${m.threshold.toFixed(2)}${peaks})` : "";
  const own = (f) => (typeof f.threshold === "number" && peaks ? `, under its threshold ${f.threshold.toFixed(2)}` : "");
  const disagree = (res.cross_check || []).some((c) => (c.disagreements || []).length);
  $("no-findings").textContent = `No place scored above the threshold${thr}.` + (under.length
    ? ` The highest under it: ${under[0].kind}, score ${under[0].score.toFixed(2)}${own(under[0])}, slice ${Math.round(under[0].voxel[0])}.` : "")
    + (disagree ? " The verdict is the cross-check's: this series and another reconstruction of its acquisition disagree (above)." : "");
  show($("no-findings"), res.findings.length === 0);

  const z = $("z");
  z.max = res.shape[0] - 1;
  $("z-max").textContent = res.shape[0] - 1;
  show($("result"));
  const firstDisagreement = (res.cross_check || []).flatMap((c) => c.disagreements || [])[0];
  setSlice(res.findings.length ? Math.round(res.findings[0].voxel[0])
    : firstDisagreement ? Math.round(firstDisagreement.voxel[0]) : Math.floor(res.shape[0] / 2));
  $("result").scrollIntoView({ behavior: "smooth", block: "start" });
}

function setSlice(k) {
  if (!job) return;
  const z = $("z");
  z.value = k;
  $("z-out").textContent = k;
  const overlay = $("overlay").checked ? "true" : "false";
  $("slice").src = `/api/jobs/${job.id}/slices/${k}.png?overlay=${overlay}`;
  $("slice").alt = `Axial slice ${k} of ${z.max}${overlay === "true" ? ", tamper heatmap overlaid" : ""}`;
}
$("z").addEventListener("input", (e) => setSlice(Number(e.target.value)));

// The results hold the patient's images: whoever screened a scan can remove them before the retention time.
$("delete").addEventListener("click", async () => {
  if (!job) return;
  const r = await fetch(`/api/jobs/${job.id}`, { method: "DELETE" });
  if (r.status !== 204) {
    let body = {};
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    fail(body.detail || `Could not delete (HTTP ${r.status}).`);
    return;
  }
  job = null;
  show($("result"), false);
  status("Deleted from the server: its report, slices and DICOM results are gone.", 100);
});
$("overlay").addEventListener("change", () => setSlice(Number($("z").value)));
