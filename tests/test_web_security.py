"""The web page on a network: users and tokens, jobs per user, retention, the audit log, TLS, the
refusal to listen off loopback unprotected, and schemathesis against the app's own OpenAPI schema."""
from __future__ import annotations

import base64
import itertools
import io as _io
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ctguard.cli import main  # noqa: E402
from ctguard.web import auth  # noqa: E402
from ctguard.web.app import WebSettings, create_app  # noqa: E402


def _basic(name: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def png() -> bytes:
    """A chest slice as PNG (screened in 2D: the fastest upload there is)."""
    from PIL import Image

    from ctguard.data.phantom import make_chest

    hu = make_chest((3, 256, 256), (2.0, 1.4, 1.4), seed=5).hu[1]
    buf = _io.BytesIO()
    Image.fromarray(np.rint(np.clip((hu + 1000) / 1400, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    path = tmp_path_factory.mktemp("users") / "users.json"
    token = auth.add_user(path, "alice", password="alice-password", token=True)
    auth.add_user(path, "bob", password="bob-password")
    return path, token


@pytest.fixture()
def secured(users, tmp_path):
    path, token = users
    settings = WebSettings(work_dir=tmp_path / "work", users=path, audit_log=tmp_path / "audit.jsonl")
    with TestClient(create_app(settings)) as c:
        c.token, c.settings = token, settings
        yield c


def test_users_file_keeps_no_secret_and_is_private(tmp_path, capsys, monkeypatch):
    path = tmp_path / "users.json"
    monkeypatch.setattr(sys, "stdin", _io.StringIO("a long password\n"))
    assert main(["users", "add", "carol", "--users", str(path), "--password-stdin", "--token"]) == 0
    out = capsys.readouterr().out
    token = out.split("Bearer <token>'): ")[1].strip()
    text = path.read_text()
    assert "a long password" not in text and token not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = auth.Users(path)
    assert users.by_password("carol", "a long password") == "carol" and users.by_password("carol", "wrong") is None
    assert users.by_token(token) == "carol" and users.by_token(token + "x") is None
    assert main(["users", "list", "--users", str(path)]) == 0 and "carol: password, 1 token(s)" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", _io.StringIO("short\n"))
    assert main(["users", "add", "dave", "--users", str(path), "--password-stdin"]) == 2
    assert "at least 8" in capsys.readouterr().err
    assert main(["users", "remove", "carol", "--users", str(path)]) == 0
    assert auth.list_users(path) == []


def test_no_credentials_is_401_everywhere_and_a_login_works(secured):
    for path in ("/", "/app.js", "/docs", "/openapi.json", "/api/health", "/api/jobs", "/api/jobs/0123456789abcdef"):
        r = secured.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
    assert secured.get("/", headers=_basic("alice", "wrong-password")).status_code == 401
    assert secured.get("/api/health", headers={"Authorization": "Bearer nonsense"}).status_code == 401
    assert secured.get("/", headers=_basic("alice", "alice-password")).status_code == 200
    assert secured.get("/api/health", headers={"Authorization": f"Bearer {secured.token}"}).status_code == 200
    assert secured.post("/api/jobs", files={"files": ("x.png", b"1", "image/png")}).status_code == 401
    refused = [e for e in auth.AuditLog(secured.settings.audit_log).read() if e["event"] == "refused"]
    assert refused and all("password" not in json.dumps(e) for e in refused)


def test_a_job_is_its_uploaders_and_every_step_is_audited(secured, png):
    alice, bob = {"Authorization": f"Bearer {secured.token}"}, _basic("bob", "bob-password")
    r = secured.post("/api/screen", files={"files": ("slice.png", png, "image/png")}, headers=alice)
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert secured.get(f"/api/jobs/{job}", headers=alice).status_code == 200
    for path in (f"/api/jobs/{job}", f"/api/jobs/{job}/result.json", f"/api/jobs/{job}/report/index.html", f"/api/jobs/{job}/slices/0.png"):
        other = secured.get(path, headers=bob)
        assert other.status_code == 404 and job not in other.text.replace(f"no job {job}", ""), path
    assert [j["id"] for j in secured.get("/api/jobs", headers=alice).json()] == [job]
    assert secured.get("/api/jobs", headers=bob).json() == []
    assert not any((Path(secured.settings.work_dir) / d / "upload").exists() for d in os.listdir(secured.settings.work_dir)
                   if (Path(secured.settings.work_dir) / d).is_dir())  # the upload is gone once screened
    events = auth.AuditLog(secured.settings.audit_log).read()
    kinds = [(e["event"], e.get("user"), e.get("what")) for e in events if e.get("job") == job]
    assert ("upload", "alice", None) in kinds and ("view", "alice", None) in kinds and ("delete", "alice", "upload") in kinds
    assert not [e for e in events if e["event"] == "view" and e.get("user") == "bob"]  # a 404 shows nothing, logs no view
    # Its owner can delete the results now (another user cannot, nor see that they exist); then they are gone.
    assert secured.delete(f"/api/jobs/{job}", headers=bob).status_code == 404
    assert secured.delete(f"/api/jobs/{job}", headers=alice).status_code == 204
    assert secured.get(f"/api/jobs/{job}", headers=alice).status_code == 404
    assert not [d for d in os.listdir(secured.settings.work_dir) if (Path(secured.settings.work_dir) / d).is_dir()]
    assert secured.delete(f"/api/jobs/{job}", headers=alice).status_code == 404
    deleted = [e for e in auth.AuditLog(secured.settings.audit_log).read() if e["event"] == "delete" and e.get("what") == "results"]
    assert [(e["job"], e["user"], e["reason"]) for e in deleted] == [(job, "alice", "deleted by its owner")]


def test_results_are_deleted_after_the_retention_time(users, tmp_path, png):
    path, token = users
    settings = WebSettings(work_dir=tmp_path / "work", users=path, audit_log=tmp_path / "audit.jsonl", retain_hours=1.5 / 3600)
    alice = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(settings)) as c:
        job = c.post("/api/screen", files={"files": ("slice.png", png, "image/png")}, headers=alice).json()["job"]
        folder = next(p for p in (tmp_path / "work").iterdir() if p.is_dir())
        assert (folder / "out" / "result.json").is_file()
        deadline = time.time() + 20
        while folder.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert not folder.exists()
        assert c.get(f"/api/jobs/{job}", headers=alice).status_code == 404
    deleted = [e for e in auth.AuditLog(settings.audit_log).read() if e["event"] == "delete" and e.get("what") == "results"]
    assert deleted and deleted[0]["job"] == job and deleted[0]["reason"] == "retention"


def test_serve_off_loopback_needs_users_and_tls(users, tmp_path, capsys):
    path, _ = users
    for argv, words in ((["--host", "0.0.0.0"], "needs --users FILE and --tls-cert and --tls-key"),
                        (["--host", "0.0.0.0", "--users", str(path)], "needs --tls-cert and --tls-key"),
                        (["--host", "10.1.2.3", "--tls-cert", str(path), "--tls-key", str(path)], "needs --users FILE"),
                        (["--tls-cert", str(path)], "TLS needs both")):
        assert main(["serve", *argv, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_https_with_a_login(users, tmp_path):
    import httpx

    from test_signatures import _cert

    key_path, cert_path, _, _ = _cert(tmp_path, "127.0.0.1")
    path, token = users
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ctguard.cli", "serve", "--port", str(port), "--users", str(path),
                             "--tls-cert", str(cert_path), "--tls-key", str(key_path), "--audit-log", str(tmp_path / "audit.jsonl"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import ssl

        ctx = ssl.create_default_context(cafile=str(cert_path))
        ctx.check_hostname = False  # the test certificate names no host
        deadline = time.time() + 60
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/api/health", verify=ctx, timeout=5)
                break
            except httpx.HTTPError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(proc.stdout.read() if proc.poll() is not None else "no HTTPS server") from None
                time.sleep(0.3)
        assert r.status_code == 401
        ok = httpx.get(f"https://127.0.0.1:{port}/api/health", verify=ctx, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no answer
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).raise_for_status()
    finally:
        proc.terminate()
        proc.wait(10)


def test_schemathesis_finds_no_server_error_and_no_leak(users, tmp_path, png):
    """Cases generated from the app's own OpenAPI schema, each sent as alice (token), as bob (another
    user) and with no credentials: no 5xx, no server path, nothing of alice's shown to bob, 401 to nobody."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    path, token = users
    work = tmp_path / "work"
    app = create_app(WebSettings(work_dir=work, users=path, audit_log=tmp_path / "audit.jsonl"))
    alice, bob = {"Authorization": f"Bearer {token}"}, _basic("bob", "bob-password")
    with TestClient(app) as c:  # a job of alice's, whose id nobody else may learn
        alice_job = c.post("/api/screen", files={"files": ("slice.png", png, "image/png")}, headers=alice).json()["job"]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=alice)  # headers: for loading the schema only
    seen: set[str] = set()
    cases = itertools.count()

    def run(case, who: str, headers: dict[str, str]) -> None:
        response = case.call(headers=headers)
        body = response.text
        where = f"{case.method} {case.formatted_path} as {who}"
        assert response.status_code < 500, f"{where}: {response.status_code} {body[:300]}"
        assert str(work) not in body and str(tmp_path) not in body, f"{where} shows a server path"
        if who == "bob":
            assert alice_job not in body.replace(f"no job {alice_job}", ""), f"{where} shows alice's job"
        if who == "nobody":
            assert response.status_code == 401, f"{where}: {response.status_code}"
        seen.add(case.path)

    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        @given(operation.as_strategy())
        def each(case):
            if case.path.startswith("/api/jobs/{job_id}") and isinstance(case.path_parameters, dict):
                case.path_parameters["job_id"] = alice_job if next(cases) % 2 else case.path_parameters.get("job_id", "x")
            run(case, "alice", alice)
            run(case, "bob", bob)
            run(case, "nobody", {})

        each()
    assert seen >= {"/api/jobs/{job_id}", "/api/health", "/api/screen", "/api/jobs/{job_id}/result.json"}
