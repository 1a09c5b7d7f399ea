"""The web page and REST API (``ctguard serve``): upload a scan or an image, see the verdict and
where it was edited. Everything goes through :func:`ctguard.api.screen`.

API: ``POST /api/screen`` (multipart ``files``; waits and returns the screening JSON),
``POST /api/jobs`` (202 and a job id) + ``GET /api/jobs/{id}``, ``GET /api/jobs`` (yours),
``GET /api/health``; OpenAPI docs at ``/docs``. A request over the size limit is refused with 413 as
soon as that is known (from its Content-Length, or while it streams); a full worker pool answers 429
with ``Retry-After``.

With a users file (:mod:`ctguard.web.auth`) every path, the page included, needs HTTP Basic or a
Bearer token (401 otherwise); a job is its uploader's: anyone else gets 404. Uploaded scans are
deleted once screened, results ``retain_hours`` after; uploads, views, deletions and refused logins
are lines in the audit log. :func:`serve` refuses a non-loopback address without users and TLS.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from ctguard import __version__
from ctguard.io.archive import named_inside
from ctguard.web.auth import AuditLog, Users
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
    users: Path | None = None  # a users file: authentication required (ctguard users add)
    retain_hours: float = 24.0  # a finished job's results are deleted this long after
    audit_log: Path | None = None  # default: audit.jsonl in the work folder


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


CHALLENGE = {"WWW-Authenticate": 'Basic realm="ctguard", charset="UTF-8"'}


def _client(scope_or_request) -> str | None:
    client = scope_or_request.get("client") if isinstance(scope_or_request, dict) else scope_or_request.client
    return client[0] if client else None


class _Authenticator:
    """Checks an Authorization header against the users file; records refusals in the audit log."""

    def __init__(self, users: Users | None, audit: AuditLog):
        self.users, self.audit = users, audit

    def user(self, authorization: str | None, client: str | None, path: str) -> str | None:
        if self.users is None:
            return "anonymous"
        scheme, _, value = (authorization or "").partition(" ")
        who = None
        if scheme.lower() == "bearer" and value:
            who = self.users.by_token(value.strip())
        elif scheme.lower() == "basic" and value:
            try:
                name, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                name, password = "", ""
            who = self.users.by_password(name, password) if name else None
        if who is None:
            self.audit.write("refused", user=None, client=client, path=path, reason="no credentials" if not authorization else "bad credentials")
        return who


class RequireAuth:
    """ASGI middleware: the page, its files and the API docs need a user too (the API routes check
    their own, through a dependency that OpenAPI documents)."""

    def __init__(self, app, auth: _Authenticator):
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.auth.users is None or scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        if self.auth.user(authorization, _client(scope), scope["path"]) is None:
            body = b'{"detail":"authentication required"}'
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", CHALLENGE["WWW-Authenticate"].encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def create_app(settings: WebSettings | None = None):
    from ctguard import api
    from ctguard.report.slices import render_slice

    settings = settings or WebSettings()
    work = Path(settings.work_dir) if settings.work_dir else Path(tempfile.mkdtemp(prefix="ctguard-web-"))
    audit = AuditLog(settings.audit_log or work / "audit.jsonl")
    auth = _Authenticator(Users(settings.users) if settings.users else None, audit)

    def deleted(job: Job, what: str, reason: str) -> None:
        audit.write("delete", user=job.owner, job=job.id, what=what, reason=reason)

    jobs = JobManager(work, settings.workers, settings.queue, settings.keep_jobs, retain_s=settings.retain_hours * 3600, on_delete=deleted)
    basic, bearer = HTTPBasic(auto_error=False, realm="ctguard"), HTTPBearer(auto_error=False)

    def current_user(request: Request, _basic: HTTPBasicCredentials | None = Depends(basic),
                     _bearer: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        """The user of the request (``anonymous`` when the server has no users file); 401 otherwise."""
        who = auth.user(request.headers.get("authorization"), _client(request), request.url.path)
        if who is None:
            raise HTTPException(401, "authentication required", headers=CHALLENGE)
        return who

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        jobs.shutdown()

    app = FastAPI(title="ctguard", version=__version__, lifespan=lifespan,
                  description="Screens chest CT for CT-GAN deepfakes: lung nodules injected into, or removed from, a scan.")
    app.state.jobs, app.state.settings, app.state.audit = jobs, settings, audit

    def busy() -> JSONResponse:
        return JSONResponse({"detail": "all workers are busy; try again shortly"}, status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def receive_upload(request: Request, user: str) -> Job:
        """Saves the multipart ``files`` into a reserved job; refuses bad uploads with 4xx."""
        try:
            job = jobs.reserve(owner=user)
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
            saved, names, size = [], set(), 0
            for k, up in enumerate(uploads):
                name = safe_name(up.filename, k)
                if name in names:
                    name = f"{k:05d}_{name}"
                names.add(name)
                target = job.folder / "upload" / name
                with open(target, "wb") as out:
                    while chunk := await up.read(1 << 20):
                        out.write(chunk)
                        size += len(chunk)
                await up.close()
                saved.append(target)
            job.name = uploads[0].filename if len(uploads) == 1 else f"{len(uploads)} files"
            job.input = screening_input(saved, job.folder / "upload", settings.limits)
            _check_kind(job.input)
            audit.write("upload", user=user, job=job.id, name=job.name, files=len(saved), bytes=size,
                        client=_client(request))
            return job
        except BaseException:
            jobs.cancel(job)
            raise

    def work(job: Job) -> dict:
        def on_stage(name: str) -> None:
            job.stage = name

        on_stage("read")
        scan = api.load(job.input)
        scan.meta["warnings"] = [named_inside(w, job.input, job.name) for w in scan.warnings]  # the upload's name, not the server's folder
        # A DICOM series also gets its results as DICOM objects (SR; SEG when tampered) to download.
        dicom = job.out / "dicom" if scan.meta.get("kind") == "dicom-series" else None
        result = api.screen(scan, json_out=job.out / "result.json", report_dir=job.out / "report", model=settings.model,
                            on_stage=on_stage, viewer_dir=job.out / "viewer", dicom_out=dicom, name=job.name)  # never the server's temporary path
        result.pop("dicom", None)  # the server's paths: the job's links name them instead
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
    def health(user: str = Depends(current_user)) -> dict:
        return {"status": "ok", "version": __version__, "queued_or_running": sum(1 for j in list(jobs.jobs.values()) if j.status in ("queued", "running"))}

    @app.post("/api/screen", summary="Screen an upload and wait for the result",
              description="Multipart field `files`: a zip of a DICOM series, many DICOM files, one DICOM file, NIfTI/NRRD/MHD, or PNG/JPG. "
                          "Returns the screening JSON of docs/DESIGN.md plus `job` and `links`.")
    async def screen(request: Request, user: str = Depends(current_user)):
        job = await receive_upload(request, user)
        jobs.start(job, work)
        await asyncio.wrap_future(job.future)
        if job.status != "done":
            return JSONResponse({"detail": job.error, "job": job.id}, status_code=job.error_status)
        return {**job.result, "job": job.id, "links": job.public()["links"]}

    @app.post("/api/jobs", status_code=202, summary="Start screening an upload; poll GET /api/jobs/{id}")
    async def submit(request: Request, user: str = Depends(current_user)):
        job = await receive_upload(request, user)
        jobs.start(job, work)
        return {"id": job.id, "status": job.status, "url": f"/api/jobs/{job.id}"}

    def get_job(job_id: str, user: str, request: Request) -> Job:
        """The user's job (another user's is 404, as if it did not exist); the view is audited."""
        job = jobs.get(job_id, owner=user)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        audit.write("view", user=user, job=job_id, path=request.url.path, client=_client(request))
        return job

    @app.get("/api/jobs", summary="Your jobs, oldest first")
    def my_jobs(user: str = Depends(current_user)) -> list[dict]:
        return [{"id": j.id, "name": j.name, "status": j.status, "url": f"/api/jobs/{j.id}"} for j in jobs.of(user)]

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str, request: Request, user: str = Depends(current_user)) -> dict:
        return get_job(job_id, user, request).public()

    @app.delete("/api/jobs/{job_id}", status_code=204, summary="Delete a finished job's results from the server now",
                description="The report, the slices and the DICOM results of a scan go at once instead of after the retention "
                            "time (the upload itself is never kept). 409 while the job is still queued or running.")
    def delete_job(job_id: str, request: Request, user: str = Depends(current_user)):
        job = jobs.get(job_id, owner=user)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if not job.finished:
            raise HTTPException(409, f"job {job_id} is {job.status}: delete it once it has finished")
        jobs.delete(job, "deleted by its owner")
        return Response(status_code=204)

    @app.get("/api/jobs/{job_id}/result.json")
    def job_json(job_id: str, request: Request, user: str = Depends(current_user)):
        job = get_job(job_id, user, request)
        path = job.out / "result.json"
        if job.status != "done" or not path.is_file():
            raise HTTPException(409, f"job {job_id} is {job.status}")
        return FileResponse(path, media_type="application/json", filename=f"ctguard-{job_id}.json")

    @app.get("/api/jobs/{job_id}/report/{name:path}")
    def job_report(job_id: str, name: str, request: Request, user: str = Depends(current_user)):
        job = get_job(job_id, user, request)
        root = (job.out / "report").resolve()
        path = (root / name).resolve()
        if root not in path.parents or not path.is_file():
            raise HTTPException(404, f"no report file {name}")
        return FileResponse(path)

    @app.get("/api/jobs/{job_id}/dicom/{name}")
    def job_dicom(job_id: str, name: str, request: Request, user: str = Depends(current_user)):
        job = get_job(job_id, user, request)
        path = job.out / "dicom" / name
        if job.status != "done" or name not in DICOM_RESULTS or not path.is_file():
            raise HTTPException(404, f"no DICOM result {name}")
        return FileResponse(path, media_type="application/dicom", filename=f"ctguard-{job_id}-{name.removeprefix('ctguard-')}")

    @app.get("/api/jobs/{job_id}/slices/{z}.png")
    def job_slice(job_id: str, z: int, request: Request, overlay: bool = True, user: str = Depends(current_user)):
        job = get_job(job_id, user, request)
        if job.status != "done":
            raise HTTPException(409, f"job {job_id} is {job.status}")
        try:
            png = render_slice(job.out / "viewer", z, overlay)
        except IndexError as e:
            raise HTTPException(404, str(e)) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    app.add_middleware(RequireAuth, auth=auth)
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


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_network_settings(host: str, settings: WebSettings, tls: tuple[str, str] | None) -> None:
    """On anything but loopback the page needs users and TLS: a one-line reason otherwise."""
    from ctguard.errors import InputError

    if is_loopback(host):
        return
    missing = [what for what, ok in (("--users FILE", settings.users is not None), ("--tls-cert and --tls-key", tls is not None)) if not ok]
    if missing:
        raise InputError(f"--host {host} is reachable from the network: it needs {' and '.join(missing)} "
                         "(or keep the default --host 127.0.0.1)")


def serve(host: str = "127.0.0.1", port: int = 8000, settings: WebSettings | None = None, log_level: str = "info",
          tls: tuple[str, str] | None = None) -> None:
    import uvicorn

    settings = settings or WebSettings()
    check_network_settings(host, settings, tls)
    app = create_app(settings)
    scheme = "https" if tls else "http"
    who = f"users from {settings.users}" if settings.users else "no authentication (this machine only)"
    print(f"ctguard web: {scheme}://{host}:{port}/  (API docs: {scheme}://{host}:{port}/docs); {who}; "
          f"results kept {settings.retain_hours:g} h; audit log {app.state.audit.path}", flush=True)
    ssl = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}
    uvicorn.run(app, host=host, port=port, log_level=log_level, **ssl)
