"""A real browser (headless Debian Chromium, driven by Playwright) uploads a tampered phantom through
the page and sees the verdict and the findings. The screenshot is kept in ``test-artifacts/``."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have it: {why}")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, *extra: str):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ctguard.cli", "serve", "-q", "--port", str(port), *extra], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/api/health", timeout=1)
            break
        except urllib.error.HTTPError:  # 401: up, and asking for a login
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read()}")
            time.sleep(0.1)
    return url, proc


@pytest.fixture
def server(tmp_path):
    url, proc = _start(tmp_path)
    yield url
    proc.terminate()
    proc.wait(10)


def test_upload_in_a_real_browser(server, tampered):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install playwright)")
    chromium = _chromium()
    _need(chromium is not None, "no chromium on PATH (apt-get install chromium)")
    root, _, _ = tampered
    files = [str(p) for p in sorted((root / "tampered").iterdir())]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(server)
            assert page.get_by_role("heading", name="Screen a scan").is_visible()
            assert page.locator("#go").is_disabled()
            page.set_input_files("#files", files)
            assert page.locator("#chosen").inner_text() == f"{len(files)} files"
            page.get_by_role("button", name="Screen").click()
            page.wait_for_selector("#result:not([hidden])", timeout=120_000)
            assert page.locator("#verdict").inner_text() == "Tampered"
            patient = pydicom.dcmread(files[0], stop_before_pixels=True).PatientID  # whom it is about, from the headers
            assert page.locator("#scan").is_visible() and page.locator("#scan").inner_text().startswith(f"Patient {patient} · ")
            rows = page.locator("#findings tbody tr")
            assert rows.count() >= 1
            assert rows.first.locator(".tag").inner_text() in ("injected", "removed")
            # A DICOM series: the SR and, tampered, the SEG are offered for download beside the JSON.
            for key in ("sr", "seg"):
                link = page.locator(f"#{key}-link")
                assert link.is_visible() and f"/dicom/ctguard-{key}.dcm" in link.get_attribute("href")
            page.wait_for_function("document.getElementById('slice').complete && document.getElementById('slice').naturalWidth === 384")
            # Keyboard: the slider moves the slice and the image follows.
            z0 = int(page.locator("#z").input_value())
            page.locator("#z").focus()
            page.keyboard.press("ArrowRight")
            assert int(page.locator("#z").input_value()) == z0 + 1
            assert f"/slices/{z0 + 1}.png" in page.locator("#slice").get_attribute("src")
            page.keyboard.press("ArrowLeft")
            page.wait_for_function("document.getElementById('slice').complete")
            page.screenshot(path=str(ARTIFACTS / "web_tampered.png"), full_page=True)
            # The results hold the patient's images: the page deletes them from the server on request.
            page.get_by_role("button", name="Delete from server").click()
            page.wait_for_selector("#result", state="hidden")
            assert page.locator("#status-text").inner_text().startswith("Deleted from the server")
        finally:
            browser.close()
    assert (ARTIFACTS / "web_tampered.png").stat().st_size > 10_000


def test_the_page_behind_a_login(tmp_path, tampered):
    """With a users file the browser gets 401 until it logs in (HTTP Basic, as a browser asks for
    it); logged in, the page screens a series as without one."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install playwright)")
    chromium = _chromium()
    _need(chromium is not None, "no chromium on PATH (apt-get install chromium)")
    from ctguard.web.auth import add_user

    add_user(tmp_path / "users.json", "radiologist", password="a good password")
    url, proc = _start(tmp_path, "--users", str(tmp_path / "users.json"))
    root, _, _ = tampered
    files = [str(p) for p in sorted((root / "tampered").iterdir())]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            try:
                def status(**credentials) -> int:
                    try:
                        return browser.new_context(**credentials).new_page().goto(url).status
                    except Exception as e:  # headless Chromium gives up on a refused login instead of showing the 401
                        assert "ERR_INVALID_AUTH_CREDENTIALS" in str(e)
                        return 401

                assert status() == 401
                assert status(http_credentials={"username": "radiologist", "password": "not it"}) == 401
                page = browser.new_context(http_credentials={"username": "radiologist", "password": "a good password"}).new_page()
                assert page.goto(url).status == 200
                page.set_input_files("#files", files)
                page.get_by_role("button", name="Screen").click()
                page.wait_for_selector("#result:not([hidden])", timeout=120_000)
                assert page.locator("#verdict").inner_text() == "Tampered"
                # The clean twin: no finding, and the page says the threshold and the highest place under it.
                from ctguard.screen import load_detector, separate_thresholds

                assert page.goto(url).status == 200
                page.set_input_files("#files", [str(f) for f in sorted((root / "clean").iterdir())])
                page.get_by_role("button", name="Screen").click()
                page.wait_for_selector("#result:not([hidden])", timeout=120_000)
                assert page.locator("#verdict").inner_text() == "Clean"
                said = page.locator("#no-findings").inner_text()
                det = load_detector()
                peak = separate_thresholds(det).get("peak_threshold")  # the bundled stage holds the lung maps' peaks to their own
                peaks = f"; the lung maps' peaks {peak:.2f}" if peak is not None else ""
                assert said.startswith(f"No place scored above the threshold ({det.threshold:.2f}{peaks}).") and "The highest under it:" in said
                assert not page.locator("#findings").is_visible()
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
