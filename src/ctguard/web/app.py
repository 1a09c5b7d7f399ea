"""The web page and REST API (``ctguard serve``): upload a scan or an image, see the verdict and
where it was edited. Everything goes through :func:`ctguard.api.screen`.

API: ``POST /api/screen`` (multipart ``files``; waits and returns the screening JSON),
``POST /api/jobs`` (202 and a job id) + ``GET /api/jobs/{id}``, ``GET /api/health``; OpenAPI docs at
``/docs``. A request over the size limit is refused with 413 as soon as that is known (from its
Content-Length, or while it streams); a full worker pool answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from ctguard import __version__
from ctguard.web.jobs import Busy, Job, JobManager
from ctguard.web.uploads import Limits, UploadError, safe_name, screening_input

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 10


@dataclass
class WebSettings:
    limits: Limits = field(default_factory=Limits)
    workers: int = 1
    queue: int = 4
    keep_jobs: int = 50
    work_dir: Path | None = None  # default: a fresh temporary folder
    model: str | None = None


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, before it is all read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, int(length))
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, seen)

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps({"detail": f"upload of {size} bytes or more is over the limit of {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(settings: WebSettings | None = None):
    from ctguard import api
    from ctguard.report.slices import render_slice

    settings = settings or WebSettings()
    work = Path(settings.work_dir) if settings.work_dir else Path(tempfile.mkdtemp(prefix="ctguard-web-"))
    jobs = JobManager(work, settings.workers, settings.queue, settings.keep_jobs)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        jobs.shutdown()

    app = FastAPI(title="ctguard", version=__version__, lifespan=lifespan,
                  description="Screens chest CT for CT-GAN deepfakes: lung nodules injected into, or removed from, a scan.")
    app.state.jobs, app.state.settings = jobs, settings

    def busy() -> JSONResponse:
        return JSONResponse({"detail": "all workers are busy; try again shortly"}, status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def receive_upload(request: Request) -> Job:
        """Saves the multipart ``files`` into a reserved job; refuses bad uploads with 4xx."""
        try:
            job = jobs.reserve()
        except Busy:
            raise _BusyResponse() from None
        try:
            try:
                form = await request.form(max_files=settings.limits.max_files, max_fields=20)
            except _TooLarge:
                raise
            except Exception as e:  # malformed multipart, too many files
                raise UploadError(400, f"cannot read the upload ({e})") from None
            uploads = [f for f in form.getlist("files") if hasattr(f, "filename")]
            if not uploads:
                raise UploadError(400, "no files: send them as multipart field 'files'")
            saved, names = [], set()
            for k, up in enumerate(uploads):
                name = safe_name(up.filename, k)
                if name in names:
                    name = f"{k:05d}_{name}"
                names.add(name)
                target = job.folder / "upload" / name
                with open(target, "wb") as out:
                    while chunk := await up.read(1 << 20):
                        out.write(chunk)
                await up.close()
                saved.append(target)
            job.name = uploads[0].filename if len(uploads) == 1 else f"{len(uploads)} files"
            job.input = screening_input(saved, job.folder / "upload", settings.limits)
            _check_kind(job.input)
            return job
        except BaseException:
            jobs.cancel(job)
            raise

    def work(job: Job) -> dict:
        def on_stage(name: str) -> None:
            job.stage = name

        on_stage("read")
        scan = api.load(job.input)
        # A DICOM series also gets its results as DICOM objects (SR; SEG when tampered) to download.
        dicom = job.out / "dicom" if scan.meta.get("kind") == "dicom-series" else None
        result = api.screen(scan, json_out=job.out / "result.json", report_dir=job.out / "report", model=settings.model,
                            on_stage=on_stage, viewer_dir=job.out / "viewer", dicom_out=dicom)
        result.pop("dicom", None)  # the server's paths: the job's links name them instead
        result["input"] = job.name  # never the server's temporary path
        (job.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        job.stage = "done"
        return result

    @app.exception_handler(UploadError)
    async def _upload_error(request, exc: UploadError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(_BusyResponse)
    async def _busy(request, exc):
        return busy()

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "queued_or_running": sum(1 for j in list(jobs.jobs.values()) if j.status in ("queued", "running"))}

    @app.post("/api/screen", summary="Screen an upload and wait for the result",
              description="Multipart field `files`: a zip of a DICOM series, many DICOM files, one DICOM file, NIfTI/NRRD/MHD, or PNG/JPG. "
                          "Returns the screening JSON of docs/DESIGN.md plus `job` and `links`.")
    async def screen(request: Request):
        job = await receive_upload(request)
        jobs.start(job, work)
        await asyncio.wrap_future(job.future)
        if job.status != "done":
            return JSONResponse({"detail": job.error, "job": job.id}, status_code=job.error_status)
        return {**job.result, "job": job.id, "links": job.public()["links"]}

    @app.post("/api/jobs", status_code=202, summary="Start screening an upload; poll GET /api/jobs/{id}")
    async def submit(request: Request):
        job = await receive_upload(request)
        jobs.start(job, work)
        return {"id": job.id, "status": job.status, "url": f"/api/jobs/{job.id}"}

    def get_job(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str) -> dict:
        return get_job(job_id).public()

    @app.get("/api/jobs/{job_id}/result.json")
    def job_json(job_id: str):
        job = get_job(job_id)
        path = job.out / "result.json"
        if job.status != "done" or not path.is_file():
            raise HTTPException(409, f"job {job_id} is {job.status}")
        return FileResponse(path, media_type="application/json", filename=f"ctguard-{job_id}.json")

    @app.get("/api/jobs/{job_id}/report/{name:path}")
    def job_report(job_id: str, name: str):
        job = get_job(job_id)
        root = (job.out / "report").resolve()
        path = (root / name).resolve()
        if root not in path.parents or not path.is_file():
            raise HTTPException(404, f"no report file {name}")
        return FileResponse(path)

    @app.get("/api/jobs/{job_id}/dicom/{name}")
    def job_dicom(job_id: str, name: str):
        job = get_job(job_id)
        path = job.out / "dicom" / name
        if job.status != "done" or name not in DICOM_RESULTS or not path.is_file():
            raise HTTPException(404, f"no DICOM result {name}")
        return FileResponse(path, media_type="application/dicom", filename=f"ctguard-{job_id}-{name.removeprefix('ctguard-')}")

    @app.get("/api/jobs/{job_id}/slices/{z}.png")
    def job_slice(job_id: str, z: int, overlay: bool = True):
        job = get_job(job_id)
        if job.status != "done":
            raise HTTPException(409, f"job {job_id} is {job.status}")
        try:
            png = render_slice(job.out / "viewer", z, overlay)
        except IndexError as e:
            raise HTTPException(404, str(e)) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    if settings.limits.max_upload_bytes:
        app.add_middleware(BodyLimit, limit=settings.limits.max_upload_bytes)
    return app


class _BusyResponse(Exception):
    pass


DICOM_RESULTS = ("ctguard-sr.dcm", "ctguard-seg.dcm")  # what screen --dicom-out writes


def _check_kind(path: Path) -> None:
    """415 for files that are neither a scan nor an image."""
    from ctguard import io
    from ctguard.errors import InputError

    if path.is_dir():
        if not any(io.is_dicom_file(p) for p in path.rglob("*") if p.is_file()):
            raise UploadError(415, "no DICOM files in the upload (send a DICOM series, NIfTI/NRRD/MHD, or PNG/JPG)")
        return
    try:
        io.sniff(path)
    except InputError as e:
        raise UploadError(415, f"{path.name}: {e.problem}") from None


def serve(host: str = "127.0.0.1", port: int = 8000, settings: WebSettings | None = None, log_level: str = "info") -> None:
    import uvicorn

    app = create_app(settings)
    print(f"ctguard web: http://{host}:{port}/  (API docs: http://{host}:{port}/docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
