"""The audit's results: one SQLite row per series, in WAL mode, one transaction per series.

A run killed at any moment loses at most the series in flight (their rows were never committed)
and duplicates none (a series is keyed by its key, pixel hash and model version: a re-run replaces
an error row and skips a screened one).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    key TEXT NOT NULL,               -- SeriesInstanceUID, or the file of a NIfTI/NRRD/MHD volume
    pixel_hash TEXT NOT NULL,        -- SHA-256 of the series' pixel data as stored ('' when unreadable)
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    study_uid TEXT, series_uid TEXT, patient_id TEXT, description TEXT,
    source TEXT,                     -- where it was read from (a folder, a file, a DICOMweb URL)
    slices INTEGER,
    verdict TEXT,                    -- clean | tampered | error
    score REAL,
    findings TEXT,                   -- JSON list, as ctguard screen writes them
    signatures TEXT,                 -- JSON: status, counts, signers, invalid instances
    cross_check TEXT,                -- JSON: the study's other reconstructions it was cross-checked against
    seconds REAL,
    error TEXT,
    screened_at TEXT,
    PRIMARY KEY (key, pixel_hash, model_version)
);
CREATE INDEX IF NOT EXISTS series_verdict ON series (verdict);
"""
COLUMNS = ("key", "pixel_hash", "model", "model_version", "study_uid", "series_uid", "patient_id", "description", "source", "slices",
           "verdict", "score", "findings", "signatures", "cross_check", "seconds", "error", "screened_at")
JSON_COLUMNS = ("findings", "signatures", "cross_check")


class Results:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed row survives a crash of the machine too
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(series)")}
        if "cross_check" not in have:  # results written before the cross-check: resumed as they are
            self.db.execute("ALTER TABLE series ADD COLUMN cross_check TEXT")
        self.db.commit()

    def put(self, row: dict[str, Any]) -> None:
        """One series' row, in its own transaction (replacing an earlier error row of the same series)."""
        values = dict(row)
        for k in JSON_COLUMNS:
            if values.get(k) is not None and not isinstance(values[k], str):
                values[k] = json.dumps(values[k])
        values.setdefault("pixel_hash", "")
        values.setdefault("screened_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        with self.db:
            if values.get("verdict") != "error":
                self.db.execute("DELETE FROM series WHERE key=? AND model_version=? AND verdict='error'", (values["key"], values["model_version"]))
            self.db.execute(f"INSERT OR REPLACE INTO series ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                            [values.get(c) for c in COLUMNS])

    def rows(self) -> list[dict[str, Any]]:
        cur = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM series ORDER BY (verdict='tampered') DESC, score DESC, key")
        out = []
        for r in cur.fetchall():
            d = dict(zip(COLUMNS, r))
            for k in JSON_COLUMNS:
                d[k] = json.loads(d[k]) if d[k] else None
            out.append(d)
        return out

    def close(self) -> None:
        self.db.close()


def already_screened(path: str | Path, key: str, pixel_hash: str, model_version: str) -> bool:
    """:meth:`Results.done`, for a worker: a read-only connection (the driver alone writes), nothing
    created; a results file not there yet holds nothing."""
    try:
        db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return False
    try:
        row = db.execute("SELECT verdict FROM series WHERE key=? AND pixel_hash=? AND model_version=?",
                         (key, pixel_hash, model_version)).fetchone()
    except sqlite3.OperationalError:  # no table yet
        return False
    finally:
        db.close()
    return row is not None and row[0] != "error"


def open_results(path: str | Path, must_exist: bool = False) -> Results:
    from ctguard.errors import InputError

    p = Path(path)
    if must_exist and not p.is_file():
        raise InputError("no such results file", p)
    try:
        res = Results(p)
        res.db.execute("SELECT count(*) FROM series").fetchone()
        return res
    except sqlite3.DatabaseError as e:
        raise InputError(f"not a ctguard audit results file ({e})", p) from None
