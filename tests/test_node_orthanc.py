"""The DICOM node against a real PACS: Debian's Orthanc, node and senders together inside a private
network namespace that has only loopback (Orthanc 1.10 cannot bind to 127.0.0.1 alone).

The test re-runs itself inside ``unshare -n``; there it starts Orthanc (down at first, to test the
retries), the node as a real ``ctguard node`` process, and pynetdicom senders.
"""
from __future__ import annotations

import io as _io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("pynetdicom")
from test_node import free_port, send  # noqa: E402

INSIDE = os.environ.get("CTGUARD_NETNS") == "1"


def _orthanc() -> str | None:
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have it: {why}")
        pytest.skip(why)


def _rest(port: int, path: str, data: bytes | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return body if path.endswith(("/file", "/modify")) else json.loads(body)


def _wait(cond, timeout: float, what: str):
    t = time.time()
    while time.time() - t < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _audit(spool: Path) -> list[dict]:
    p = spool / "audit.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def _series_in_orthanc(port: int, series_uid: str) -> list[str]:
    hits = [h for h in _rest(port, "/tools/lookup", series_uid.encode()) if h["Type"] == "Series"]
    return _rest(port, f"/series/{hits[0]['ID']}")["Instances"] if hits else []


def _start_orthanc(tmp: Path, http: int, dicom: int, **extra) -> subprocess.Popen:
    """Orthanc on loopback ports, its database under ``tmp``; ``extra``: more of its configuration (plugins)."""
    cfg = {"Name": "ctguard-test", "StorageDirectory": str(tmp / "orthanc-db"), "IndexDirectory": str(tmp / "orthanc-db"),
           "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
           "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, **extra}
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([_orthanc(), str(tmp / "orthanc.json")], stdout=open(tmp / "orthanc.log", "w"), stderr=subprocess.STDOUT)

    def up():
        try:
            return _rest(http, "/system")
        except OSError:
            return None

    _wait(up, 30, "Orthanc")
    return proc


def _start_node(tmp: Path, port: int, orthanc_dicom: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ctguard.cli", "node", "--port", str(port), "--forward", f"ORTHANC@127.0.0.1:{orthanc_dicom}",
           "--spool", str(tmp / "spool"), "--settle", "1", "--study-settle", "2", "--allow", "SCANNER",
           "--send-results", *extra]
    proc = subprocess.Popen(cmd, stdout=open(tmp / "node.log", "a"), stderr=subprocess.STDOUT)

    def up():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    _wait(up, 60, "the node")
    return proc


def test_node_between_scanner_and_orthanc(tmp_path, real_series):
    _need(_orthanc() is not None, "Orthanc is not installed (apt-get install orthanc)")
    _need(shutil.which("unshare") is not None, "no unshare (util-linux)")
    if not INSIDE:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        _need(probe.returncode == 0, "cannot make a private network namespace (unshare -n needs root or user namespaces)")
        cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, "-m", "pytest", "-q", "-rA", "-x",
               "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", f"{__file__}::test_node_between_scanner_and_orthanc"]
        r = subprocess.run(cmd, env={**os.environ, "CTGUARD_NETNS": "1"}, capture_output=True, text=True, timeout=900,
                           cwd=Path(__file__).parent)
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
        assert "PASSED" in r.stdout and "SKIPPED" not in r.stdout, r.stdout[-2000:]
        return

    from ctguard import io

    from ctguard.lung import lung_mask
    from ctguard.tamper.simulate import inject_random

    # A real, untouched series (Lung-PET-CT-Dx A0001, Philips, 5 mm) and a copy of it with two
    # nodules injected, under new UIDs; the node runs with the bundled detector's own threshold.
    clean = sorted(real_series["A0001-L"].iterdir())
    vol = io.read(real_series["A0001-L"])
    fake_vol, _ = inject_random(vol, lung_mask(vol), np.random.default_rng(7), n=2, sizes=(12.0, 18.0))
    fake = io.write_series(fake_vol, tmp_path / "tampered", uid_seed="fake")
    clean_uid = str(pydicom.dcmread(clean[0]).SeriesInstanceUID)
    fake_uid = str(pydicom.dcmread(fake[0]).SeriesInstanceUID)
    http, dicom, node_port = free_port(), free_port(), free_port()
    orthanc = node = None
    try:
        # 1. Orthanc is down when the clean series arrives: the node screens it and keeps retrying.
        node = _start_node(tmp_path, node_port, dicom)
        assert send(node_port, clean) == [0] * len(clean)
        _wait(lambda: "not confirmed" in (tmp_path / "node.log").read_text(), 60, "a failed forward")
        assert not [a for a in _audit(tmp_path / "spool") if a.get("series_uid") == clean_uid]
        orthanc = _start_orthanc(tmp_path, http, dicom)
        entry = _wait(lambda: [a for a in _audit(tmp_path / "spool") if a.get("series_uid") == clean_uid], 90, "the forward")[0]
        assert entry["verdict"] == "clean" and entry["action"] == "forwarded" and entry["instances"] == len(clean)
        ids = _series_in_orthanc(http, clean_uid)
        assert len(ids) == len(clean)
        by_sop = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in clean}
        for oid in ids:  # bit-identical: every element and the pixel bytes
            got = pydicom.dcmread(_io.BytesIO(_rest(http, f"/instances/{oid}/file")))
            sent = pydicom.dcmread(by_sop[str(got.SOPInstanceUID)])
            assert got == sent and got.PixelData == sent.PixelData
        assert not list((tmp_path / "spool" / "series").iterdir())  # deleted only after Orthanc confirmed all
        # The results followed the series: Orthanc's study holds the CT series and ctguard's SR, which says "clean".
        from ctguard.report.dicom_objects import read_sr

        assert entry["results"] == ["ctguard-sr.dcm"]
        study = [h for h in _rest(http, "/tools/lookup", str(pydicom.dcmread(clean[0]).StudyInstanceUID).encode()) if h["Type"] == "Study"]
        series = [_rest(http, f"/series/{sid}") for sid in _rest(http, f"/studies/{study[0]['ID']}")["Series"]]
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "SR"]
        sr = next(s for s in series if s["MainDicomTags"]["Modality"] == "SR")
        (tmp_path / "sr.dcm").write_bytes(_rest(http, f"/instances/{sr['Instances'][0]}/file"))
        assert read_sr(tmp_path / "sr.dcm")["verdict"] == "clean"

        # 2. The tampered series is held in quarantine, with its report, and never reaches Orthanc.
        assert send(node_port, fake) == [0] * len(fake)
        entry = _wait(lambda: [a for a in _audit(tmp_path / "spool") if a.get("series_uid") == fake_uid], 90, "the hold")[0]
        assert entry["verdict"] == "tampered" and entry["action"] == "held" and entry["calling_ae"] == "SCANNER"
        held = Path(entry["folder"])
        assert len(list(held.glob("*.dcm"))) == len(fake) and (held / "report" / "index.html").is_file()
        assert json.loads((held / "result.json").read_text())["verdict"] == "tampered"
        assert sorted(p.name for p in (held / "dicom").iterdir()) == ["ctguard-seg.dcm", "ctguard-sr.dcm"]  # kept with it
        assert _series_in_orthanc(http, fake_uid) == []

        # 3. The node is killed in the middle of a series and restarted: nothing acknowledged is lost.
        third = io.write_series(vol, tmp_path / "third", uid_seed="third")
        third_uid = str(pydicom.dcmread(third[0]).SeriesInstanceUID)
        assert send(node_port, third[:40]) == [0] * 40
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        node = _start_node(tmp_path, node_port, dicom)
        assert send(node_port, third[40:]) == [0] * (len(third) - 40)
        entry = _wait(lambda: [a for a in _audit(tmp_path / "spool") if a.get("series_uid") == third_uid], 90, "the third series")[0]
        assert entry["instances"] == len(third) and entry["action"] == "forwarded"
        assert len(_series_in_orthanc(http, third_uid)) == len(third)

        # 4. A node that signs on arrival: what Orthanc stores verifies (ctguard and DCMTK's dcmsign);
        #    an instance changed in Orthanc afterwards does not.
        from test_signatures import _cert

        from ctguard.signatures import load_certificates, verify_file

        key, cert = _cert(tmp_path, "ctguard node")[:2]
        node.terminate()
        node.wait(10)
        node = _start_node(tmp_path, node_port, dicom, "--sign", str(key), str(cert))
        fourth = io.write_series(vol, tmp_path / "fourth", uid_seed="fourth")
        fourth_uid = str(pydicom.dcmread(fourth[0]).SeriesInstanceUID)
        assert send(node_port, fourth) == [0] * len(fourth)
        entry = _wait(lambda: [a for a in _audit(tmp_path / "spool") if a.get("series_uid") == fourth_uid], 90, "the signed series")[0]
        assert entry["action"] == "forwarded"
        ids = _series_in_orthanc(http, fourth_uid)
        assert len(ids) == len(fourth)
        trust = load_certificates(cert)
        for i, oid in enumerate(ids):
            stored = tmp_path / f"stored-{i}.dcm"
            stored.write_bytes(_rest(http, f"/instances/{oid}/file"))
            check = verify_file(stored, trust)
            assert check.status == "valid" and check.signatures[0].signer == "CN=ctguard node", check.reason
        if shutil.which("dcmsign"):
            run = subprocess.run(["dcmsign", "--verify", "--add-cert-file", str(cert), str(tmp_path / "stored-0.dcm")], capture_output=True, text=True)
            assert run.returncode == 0 and "Signature Verification : OK" in run.stdout + run.stderr, run.stderr
        changed = tmp_path / "changed.dcm"  # Orthanc's own modification of a stored instance
        changed.write_bytes(_rest(http, f"/instances/{ids[0]}/modify", json.dumps({"Replace": {"PatientName": "CHANGED^IN^PACS"}, "Force": True,
                                                                                      "KeepSource": True}).encode()))
        assert str(pydicom.dcmread(changed).PatientName) == "CHANGED^IN^PACS"
        check = verify_file(changed, trust)
        assert check.status == "invalid" and check.reason.startswith("MAC mismatch"), check.reason
    except AssertionError as e:
        log = (tmp_path / "node.log").read_text() if (tmp_path / "node.log").exists() else ""
        raise AssertionError(f"{e}\n--- node log ---\n{log[-3000:]}\n--- audit ---\n{_audit(tmp_path / 'spool')}") from None
    finally:
        for p in (node, orthanc):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
