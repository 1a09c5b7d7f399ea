"""Auditing a PACS through DICOMweb: a real Orthanc with its DICOMweb plugin (Debian's
orthanc-dicomweb), inside a private network namespace as in test_node_orthanc."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom

from test_node_orthanc import INSIDE, _need, _orthanc, _rest, _start_orthanc  # noqa: E402
from test_node import free_port  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def test_audit_orthanc_over_dicomweb(tmp_path):
    _need(_orthanc() is not None, "Orthanc is not installed (apt-get install orthanc)")
    _need(os.path.exists(PLUGIN), "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    try:
        import dicomweb_client  # noqa: F401
    except ImportError:
        _need(False, "dicomweb-client is not installed (pip install 'ctguard[dicomweb]')")
    if not INSIDE:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        _need(probe.returncode == 0, "cannot make a private network namespace (unshare -n needs root or user namespaces)")
        cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, "-m", "pytest", "-q", "-rA", "-x",
               "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", f"{__file__}::test_audit_orthanc_over_dicomweb"]
        r = subprocess.run(cmd, env={**os.environ, "CTGUARD_NETNS": "1"}, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent)
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
        assert "PASSED" in r.stdout and "SKIPPED" not in r.stdout, r.stdout[-2000:]
        return

    from ctguard import io
    from ctguard.cli import main
    from ctguard.data.phantom import make_chest

    http = free_port()
    orthanc = _start_orthanc(tmp_path, http, free_port(), Plugins=[PLUGIN], DicomWeb={"Enable": True, "Root": "/dicom-web/"})
    try:
        uids = []
        for seed, modality in ((81, "CT"), (82, "CT"), (83, "MR")):
            files = io.write_series(make_chest((24, 96, 96), (5.0, 3.6, 3.6), seed=seed), tmp_path / f"s{seed}", uid_seed=f"w{seed}")
            for f in files:
                if modality != "CT":
                    ds = pydicom.dcmread(f)
                    ds.Modality = modality
                    ds.save_as(f, enforce_file_format=False)
                _rest(http, "/instances", f.read_bytes())
            uids.append(str(pydicom.dcmread(files[0]).SeriesInstanceUID))
        db = tmp_path / "pacs.sqlite"
        source = f"dicomweb+http://127.0.0.1:{http}/dicom-web"
        assert main(["audit", source, "--results", str(db), "--workers", "2", "-q"]) == 0
        con = sqlite3.connect(db)
        rows = sorted(con.execute("SELECT series_uid, verdict, slices, source, length(pixel_hash) FROM series").fetchall())
        con.close()
        assert [r[0] for r in rows] == sorted(uids[:2])  # the CT series; QIDO-RS left the MR one out
        assert all(r[1] in ("clean", "tampered") and r[2] == 24 and r[3] == source and r[4] == 64 for r in rows)
        assert main(["audit", source, "--results", str(db), "-q"]) == 0  # resumed: nothing to do
        con = sqlite3.connect(db)
        assert con.execute("SELECT count(*) FROM series").fetchone()[0] == 2
        con.close()
        assert main(["audit", f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web", "--results", str(db), "-q"]) == 2  # nobody there
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- orthanc log ---\n{(tmp_path / 'orthanc.log').read_text()[-3000:]}") from None
    finally:
        orthanc.terminate()
        orthanc.wait(10)
