"""Auditing an archive: series found in any folder layout, one SQLite row each, resumable after a
SIGKILL without a duplicate, error rows instead of a stop, a dead worker's series retried, the report."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from ctguard.cli import main


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Four small phantom CT series laid out as archives are: two in one folder, one split over two
    folders, one in a folder of its own; an MR series, a corrupt DICOM file and a NIfTI volume."""
    from ctguard import io
    from ctguard.data.phantom import make_chest

    root = tmp_path_factory.mktemp("archive") / "pacs-export"
    vols = [make_chest((24, 96, 96), (5.0, 3.6, 3.6), seed=s) for s in (71, 72, 73, 74)]
    io.write_series(vols[0], root / "mixed", uid_seed="a")
    io.write_series(vols[1], root / "mixed-b", uid_seed="b")
    for f in (root / "mixed-b").iterdir():  # two series in one folder
        f.rename(root / "mixed" / f"b-{f.name}")
    (root / "mixed-b").rmdir()
    split = io.write_series(vols[2], root / "study" / "part1", uid_seed="c")
    (root / "study" / "part2").mkdir()
    for f in split[12:]:  # one series over two folders
        f.rename(root / "study" / "part2" / f.name)
    for f in io.write_series(vols[3], root / "deep" / "er" / "still", uid_seed="d"):  # no description, as LIDC-IDRI's
        ds = pydicom.dcmread(f)
        del ds.SeriesDescription
        ds.ConvolutionKernel = "STANDARD"
        ds.save_as(f, enforce_file_format=False)
    mr = io.write_series(vols[0], root / "mr", uid_seed="mr")
    for f in mr:
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f, enforce_file_format=False)
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    io.write_itk(vols[1], root / "volumes" / "chest.nii.gz")
    (root / "notes.txt").write_text("not a scan")
    return root


def _rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT key, verdict, slices, error, model_version FROM series ORDER BY key").fetchall()
    finally:
        con.close()


def test_audit_a_folder_tree_resume_and_report(archive, tmp_path, capsys):
    db = tmp_path / "results.sqlite"
    assert main(["audit", str(archive), "--results", str(db), "--workers", "2", "-q"]) == 0
    assert "7 series: 7 screened, 0 already" in capsys.readouterr().out
    rows = _rows(db)
    assert len(rows) == 7
    by_verdict = {}
    for key, verdict, slices, error, _ in rows:
        by_verdict.setdefault(verdict, []).append((key, slices, error))
    assert len(by_verdict.get("clean", [])) + len(by_verdict.get("tampered", [])) == 5  # four DICOM series and the NIfTI
    assert sorted(s for _, s, _ in by_verdict.get("clean", []) + by_verdict.get("tampered", []) if s) == [24] * 5  # the split one whole
    errors = {Path(k).name if "/" in k else k: e for k, _, e in by_verdict["error"]}
    assert any("not a CT series (modality MR)" in e for e in errors.values())
    assert any("unreadable DICOM header" in e for e in errors.values())
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = con.execute("SELECT study_uid, series_uid, patient_id, pixel_hash, model, seconds, findings, signatures FROM series "
                      "WHERE verdict != 'error' AND series_uid IS NOT NULL LIMIT 1").fetchone()
    con.close()
    assert row[0] and row[1] and len(row[3]) == 64 and row[4] and row[5] > 0 and row[6] is not None and '"status": "unsigned"' in row[7]

    # A second run skips every screened series and tries the errors again (still errors, not duplicated).
    assert main(["audit", str(archive), "--results", str(db), "-q"]) == 0
    assert "5 already in" in capsys.readouterr().out and len(_rows(db)) == 7

    # Changed pixels are a new series to screen; the old row stays for the record.
    target = sorted((archive / "deep" / "er" / "still").glob("*.dcm"))[5]
    keep = target.read_bytes()
    try:
        ds = pydicom.dcmread(target)
        arr = ds.pixel_array.copy()
        arr[40:44, 40:44] += 300
        ds.PixelData = arr.tobytes()
        ds.save_as(target, enforce_file_format=False)
        assert main(["audit", str(archive), "--results", str(db), "-q"]) == 0
        assert "4 already in" in capsys.readouterr().out and len(_rows(db)) == 8
    finally:
        target.write_bytes(keep)

    out = tmp_path / "report"
    assert main(["audit-report", str(db), "--out", str(out), "-q"]) == 0
    page = (out / "index.html").read_text()
    assert "8 series" in page and "histogram of tamper scores" in page and "not a CT series" in page
    assert "2 error (1 not a CT series, 1 unreadable DICOM header)" in page  # the errors' reasons at a glance
    assert page.count("STANDARD kernel, 5 mm slices") == 2  # the series with no description, both of its rows
    lines = (out / "series.csv").read_text().splitlines()
    assert len(lines) == 9 and lines[0].startswith("verdict,score,key")


def test_a_killed_audit_loses_only_what_was_in_flight(archive, tmp_path):
    db = tmp_path / "results.sqlite"
    cmd = [sys.executable, "-m", "ctguard.cli", "audit", str(archive), "--results", str(db), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it as soon as a first series is committed
        if db.exists():
            try:
                if _rows(db):
                    break
            except sqlite3.Error:
                pass
        if proc.poll() is not None:
            pytest.fail(f"the audit ended before it could be killed: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    first = _rows(db)
    assert 1 <= len(first) < 7
    assert main(["audit", str(archive), "--results", str(db), "-q"]) == 0
    rows = _rows(db)
    assert len(rows) == 7 and len({r[0] for r in rows}) == 7  # every series once
    assert set(first) <= set(rows)


def test_a_series_whose_worker_dies_is_retried(archive, tmp_path, monkeypatch, capsys):
    from ctguard.audit.sources import folder_series

    victim = next(r.key for r in folder_series(archive) if r.kind == "dicom" and not r.error)
    marker = tmp_path / "died"
    monkeypatch.setenv("CTGUARD_AUDIT_DIE_ON", f"{victim}:{marker}")
    db = tmp_path / "results.sqlite"
    assert main(["audit", str(archive), "--results", str(db), "--workers", "2", "-q"]) == 0
    assert marker.exists()  # a worker did die on it
    rows = {k: v for k, v, *_ in _rows(db)}
    assert len(rows) == 7 and rows[victim] in ("clean", "tampered")


def test_audit_bad_arguments_are_one_line(archive, tmp_path, capsys):
    for argv, words in ((["--workers", "0"], "at least 1"), (["--address", "auto"], "give --engine ray"),
                        (["--model", str(tmp_path / "nope.pt")], "nope.pt")):
        assert main(["audit", str(archive), "--results", str(tmp_path / "r.sqlite"), *argv, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert main(["audit", str(tmp_path / "missing"), "--results", str(tmp_path / "r.sqlite"), "-q"]) == 2
    from ctguard import api
    from ctguard.errors import InputError

    with pytest.raises(InputError, match="a probability from 0 to 1"):  # once, before any series becomes an error row
        api.audit(archive, tmp_path / "t.sqlite", threshold=1.5)
    assert not (tmp_path / "t.sqlite").exists()
    (tmp_path / "junk.sqlite").write_text("not a database at all, " * 100)
    assert main(["audit-report", str(tmp_path / "junk.sqlite"), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "not a ctguard audit results file" in capsys.readouterr().err


def test_ray_engine_gives_the_local_rows_and_retries_a_dead_worker(archive, tmp_path, monkeypatch):
    """A local Ray cluster (2 CPUs): the same rows as the local engine, and a series whose worker
    process is killed mid-series is screened again by another."""
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI must have Ray (pip install 'ctguard[ray]')")
        pytest.skip("Ray is not installed (pip install 'ctguard[ray]')")
    local_db, ray_db = tmp_path / "local.sqlite", tmp_path / "ray.sqlite"
    assert main(["audit", str(archive), "--results", str(local_db), "-q"]) == 0
    from ctguard.audit.sources import folder_series

    victim = next(r.key for r in folder_series(archive) if r.kind == "dicom" and not r.error)
    marker = tmp_path / "died"
    monkeypatch.setenv("CTGUARD_AUDIT_DIE_ON", f"{victim}:{marker}")
    try:
        assert main(["audit", str(archive), "--results", str(ray_db), "--engine", "ray", "--workers", "2", "-q"]) == 0
    finally:
        ray.shutdown()
    assert marker.exists()

    def rows(db):
        con = sqlite3.connect(db)
        try:
            return sorted(con.execute("SELECT key, pixel_hash, verdict, round(score, 4), slices, error, model_version FROM series").fetchall())
        finally:
            con.close()

    assert rows(ray_db) == rows(local_db)


def test_a_pool_that_breaks_between_waits_loses_no_series(monkeypatch):
    """A worker that dies after the engine's last wait makes the next submit refuse (the pool is
    broken): that series and every one in flight are run again on a new pool, each reported once."""
    import concurrent.futures
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from ctguard.audit import engines

    refused = []

    class FlakyPool(ThreadPoolExecutor):  # a stand-in for the process pool: its third submit finds it broken
        submits = 0

        def __init__(self, max_workers, mp_context=None):
            super().__init__(max_workers)

        def submit(self, fn, *args):
            FlakyPool.submits += 1
            if FlakyPool.submits == 3:
                refused.append(args[0])
                raise BrokenProcessPool("A child process terminated abruptly")
            return super().submit(fn, *args)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", FlakyPool)
    rows = list(engines.local(range(6), lambda ref, hint: {"series": ref}, (None,), workers=1))
    assert refused == [2] and sorted(r["series"] for r in rows) == list(range(6))


def test_a_series_not_found_clean_is_named_on_one_line():
    """What the audit prints above its progress bar: the series, whose it is and what it is, then
    its score or the error's reason (a file's own name is not repeated as its description)."""
    from ctguard.api import audit_line

    assert audit_line({"verdict": "tampered", "key": "1.2.3", "patient_id": "LIDC-IDRI-0002", "score": 0.99912,
                       "description": "STANDARD kernel, 2.5 mm slices"}) == \
        "TAMPERED: 1.2.3 (patient LIDC-IDRI-0002, STANDARD kernel, 2.5 mm slices): score 0.999"
    assert audit_line({"verdict": "error", "key": "/pacs/LIDC-IDRI-0001/nodules.nrrd", "description": "nodules.nrrd",
                       "error": "not a CT: its voxels hold only 2 whole values from 0 to 1 (a label map or mask)"}) == \
        "ERROR: /pacs/LIDC-IDRI-0001/nodules.nrrd: not a CT: its voxels hold only 2 whole values from 0 to 1 (a label map or mask)"
