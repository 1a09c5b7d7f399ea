"""The web API (FastAPI test client): screening uploads, and every kind of bad upload."""
from __future__ import annotations

import io as _io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ctguard import api  # noqa: E402
from ctguard.web.app import WebSettings, create_app  # noqa: E402
from ctguard.web.uploads import Limits  # noqa: E402


def zip_folder(folder: Path, arcprefix: str = "series/") -> bytes:
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, arcprefix + f.name)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    work = tmp_path_factory.mktemp("web")
    app = create_app(WebSettings(limits=Limits(max_upload_bytes=40 * 1024**2, max_files=400), work_dir=work))
    with TestClient(app) as c:
        c.work = work
        yield c


def test_health_and_page(client):
    r = client.get("/api/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "Screen a scan" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no asset from the internet
    assert client.get("/app.js").status_code == 200 and client.get("/style.css").status_code == 200
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/screen", "/api/jobs", "/api/health"}


def test_zipped_series_gives_verdict_and_findings(client, tampered):
    root, truth, spacing = tampered
    packed = _io.BytesIO(zip_folder(root / "tampered"))
    with zipfile.ZipFile(packed, "a") as zf:
        zf.writestr("series/notes.txt", "not DICOM")  # skipped, with a warning
    r = client.post("/api/screen", files={"files": ("scan.zip", packed.getvalue(), "application/zip")})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["verdict"] == "tampered" and doc["input"] == "scan.zip"
    # Neither the result nor the report names the server's own folders: the warning names the upload.
    assert "scan.zip: 1 non-DICOM file skipped (e.g. notes.txt)" in doc["warnings"], doc["warnings"]
    assert str(client.work) not in r.text and str(client.work.resolve()) not in r.text
    report = client.get(doc["links"]["report"]).text
    assert "scan.zip" in report and str(client.work) not in report and str(client.work.resolve()) not in report
    assert doc["shape"] == [64, 384, 384]
    # The removal is found (both edits are, at this clinical set-up: test_bundled_detector_finds_injection).
    rem = truth[1]
    d = [np.linalg.norm((np.asarray(f["voxel"]) - rem["voxel"]) * np.asarray(spacing)) for f in doc["findings"] if f["kind"] == "removed"]
    assert d and min(d) <= 10.0 + rem["diameter_mm"] / 2
    assert doc["findings"] == api.screen(root / "tampered", progress=False)["findings"]  # the web page's findings are the API's
    # The links work: JSON, report, and a slice of the viewer as PNG.
    assert client.get(doc["links"]["json"]).json()["verdict"] == "tampered"
    report = client.get(doc["links"]["report"])
    assert report.status_code == 200 and "TAMPERED" in report.text.upper()
    z = int(round(doc["findings"][0]["voxel"][0]))
    png = client.get(doc["links"]["slice"].replace("{z}", str(z)))
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(doc["links"]["slice"].replace("{z}", "999")).status_code == 404
    assert client.get(f"/api/jobs/{doc['job']}/report/..%2F..%2Fout%2Fresult.json").status_code == 404
    # A DICOM series gets its results as DICOM objects too: the SR and, tampered, the SEG.
    import pydicom

    for key, modality in (("sr", "SR"), ("seg", "SEG")):
        got = client.get(doc["links"][key])
        assert got.status_code == 200 and got.headers["content-type"] == "application/dicom"
        assert pydicom.dcmread(_io.BytesIO(got.content)).Modality == modality
    assert "dicom" not in doc  # no server path in the result
    assert client.get(f"/api/jobs/{doc['job']}/dicom/..%2Fresult.json").status_code == 404
    # The upload itself is gone once screened; only the results stay.
    job_dir = next(p for p in client.work.iterdir() if (p / "out").is_dir() and p.name and (p / "out" / "result.json").is_file())
    assert not (job_dir / "upload").exists()


def test_many_files_and_the_jobs_api(client, tampered):
    root, _, _ = tampered
    files = [("files", (f.name, f.read_bytes(), "application/dicom")) for f in sorted((root / "clean").iterdir())]
    r = client.post("/api/jobs", files=files)
    assert r.status_code == 202
    job = r.json()["id"]
    early = client.delete(f"/api/jobs/{job}")  # still being screened (64 slices take seconds): not yet
    assert early.status_code == 409 and "delete it once it has finished" in early.json()["detail"]
    for _ in range(600):
        s = client.get(f"/api/jobs/{job}").json()
        if s["status"] in ("done", "error"):
            break
        threading.Event().wait(0.1)
    assert s["status"] == "done", s
    assert s["result"]["shape"] == [64, 384, 384] and s["name"] == "64 files"
    assert client.delete(f"/api/jobs/{job}").status_code == 204 and client.get(f"/api/jobs/{job}").status_code == 404


def test_oversized_upload_is_refused_before_it_is_read(client):
    big = b"\0" * (41 * 1024**2)
    r = client.post("/api/screen", files={"files": ("big.nii", big, "application/octet-stream")})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(60):
            yield b"\0" * 1024**2

    r = client.post("/api/screen", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("members,status,words", [
    ({"../../evil.dcm": b"x"}, 400, "unsafe member path"),
    ({"/etc/evil.dcm": b"x"}, 400, "unsafe member path"),
    ({"bomb.raw": b"\0" * (300 * 1024**2)}, 413, "zip bomb"),
    ({f"f{i}.dcm": b"x" for i in range(401)}, 413, "more than the limit"),
    ({"notes.txt": b"hello"}, 415, "not a recognised"),
])
def test_bad_zips(client, members, status, words):
    r = client.post("/api/screen", files={"files": ("x.zip", _zip(members), "application/zip")})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert not any(p.name == "evil.dcm" for p in client.work.parent.rglob("evil.dcm"))


def test_bad_files(client, tmp_path):
    r = client.post("/api/screen", files={"files": ("notes.txt", b"just text", "text/plain")})
    assert r.status_code == 415 and "notes.txt" in r.json()["detail"]
    corrupt = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 20
    r = client.post("/api/screen", files={"files": ("slice.dcm", corrupt, "application/dicom")})
    assert r.status_code == 422 and "slice.dcm" in r.json()["detail"]
    assert "/tmp" not in r.json()["detail"]  # never the server's own paths
    r = client.post("/api/screen", files={"other": ("a.dcm", b"x", "application/dicom")})
    assert r.status_code == 400
    assert client.get("/api/health").status_code == 200  # still serving


def test_full_pool_answers_429(tmp_path, tampered):
    root, _, _ = tampered
    app = create_app(WebSettings(workers=1, queue=0, work_dir=tmp_path))
    gate = threading.Event()
    with TestClient(app) as c:
        jobs = app.state.jobs
        blocker = jobs.reserve()  # one running job holds the only slot
        jobs.start(blocker, lambda job: gate.wait(30) and {})
        r = c.post("/api/jobs", files={"files": ("a.zip", zip_folder(root / "clean"), "application/zip")})
        assert r.status_code == 429 and r.headers["Retry-After"] == "10"
        gate.set()
        blocker.future.result(10)
        r = c.post("/api/jobs", files={"files": ("a.zip", zip_folder(root / "clean"), "application/zip")})
        assert r.status_code == 202


def test_png_upload_is_screened_in_2d(client, real_series):
    from PIL import Image

    from ctguard import io as ctio

    hu = ctio.read(real_series["A0002-B40f"]).hu[15]
    buf = _io.BytesIO()
    Image.fromarray(np.rint(np.clip((hu + 1000) / 1400, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    r = client.post("/api/screen", files={"files": ("slice.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["shape"] == [1, 512, 512] and doc["input"] == "slice.png"
    assert any("2D" in w for w in doc["warnings"])
    assert client.get(doc["links"]["slice"].replace("{z}", "0")).status_code == 200
