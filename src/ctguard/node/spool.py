"""The node's disk state: every received instance is on disk (fsync'd) before the sender hears
"stored"; series state and the audit log survive a crash.

Layout under the spool root::

    series/<series_uid>/<sop_uid>.dcm    received CT instances, grouped by series
    series/<series_uid>/state.json       {"status": receiving|screened|forwarding, "verdict", ...}
    passthrough/<sop_uid>.dcm            other storage classes, forwarded unscreened
    quarantine/<series_uid>/             held series: instances, result.json, report/
    recent/<series_uid>/                 forwarded CT series kept a while (``--cross-check S``): the
                                         study's later series are cross-checked against them
    decided/<series_uid>.json            each decided series' last decision (verdict, action, instances, time)
    audit.jsonl                          one JSON line per decision, append-only
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[^0-9A-Za-z.\-]")


def safe_uid(uid: str) -> str:
    """A UID usable as a file name (UIDs are digits and dots; anything else is replaced)."""
    return _SAFE.sub("_", uid.strip())[:128] or "unknown"


def write_durably(path: Path, data: bytes) -> None:
    """Writes via a temporary file, fsync, rename, and fsync of the folder: all or nothing."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no second copy on the disk, and it outlives ``src``'s
    removal), or a copy where the file system links none."""
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copy2(src, dst)


def _state_of(folder: Path) -> dict[str, Any] | None:
    """A series folder's ``state.json``, or None where it has none that reads."""
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return None


class Spool:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        for d in ("series", "passthrough", "quarantine", "decided", "recent"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._audit_lock = threading.Lock()
        self._series_locks: dict[str, threading.Lock] = {}
        self._writes: dict[str, int] = {}  # instances written per series since start
        self._locks_lock = threading.Lock()

    def series_lock(self, series_uid: str) -> threading.Lock:
        """The lock that storing an instance of the series and deciding on the series both hold:
        no instance is written into a folder that is being forwarded, deleted or moved."""
        with self._locks_lock:
            return self._series_locks.setdefault(safe_uid(series_uid), threading.Lock())

    def writes(self, series_uid: str) -> int:
        """How many instances of the series this spool has written since it started: a series
        whose count changed while it was screened was screened without them."""
        return self._writes.get(safe_uid(series_uid), 0)

    def series_dir(self, series_uid: str) -> Path:
        return self.root / "series" / safe_uid(series_uid)

    def store_instance(self, series_uid: str, sop_uid: str, data: bytes, meta: dict[str, Any]) -> Path:
        """Writes a received instance into its series' folder. While a series is being decided on
        (see :meth:`series_lock`) the write waits; once the decision is carried out the folder is
        gone and the instance starts a new batch of the series. An instance that finds its series
        screened but not yet carried out (a node stopped mid-forward) sends the series back to
        ``receiving``: it is screened again, with this instance, before anything more leaves."""
        with self.series_lock(series_uid):
            folder = self.series_dir(series_uid)
            folder.mkdir(parents=True, exist_ok=True)
            state = self.state(series_uid)
            if state.get("status") != "receiving":
                kept = {k: state[k] for k in meta if k in state}  # a new series: its first instance's meta
                self.save_state(series_uid, {"status": "receiving", "series_uid": series_uid, **meta, **kept})
            path = folder / f"{safe_uid(sop_uid)}.dcm"
            write_durably(path, data)
            self._writes[safe_uid(series_uid)] = self.writes(series_uid) + 1
            return path

    def store_passthrough(self, sop_uid: str, data: bytes) -> Path:
        path = self.root / "passthrough" / f"{safe_uid(sop_uid)}.dcm"
        write_durably(path, data)
        return path

    def instances(self, series_uid: str) -> list[Path]:
        return sorted(self.series_dir(series_uid).glob("*.dcm"))

    def state(self, series_uid: str) -> dict[str, Any]:
        p = self.series_dir(series_uid) / "state.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def save_state(self, series_uid: str, state: dict[str, Any]) -> None:
        write_durably(self.series_dir(series_uid) / "state.json", (json.dumps(state, indent=1) + "\n").encode())

    def pending(self) -> list[str]:
        """Series UIDs left in the spool (after a restart: screened or not)."""
        out = []
        for d in sorted((self.root / "series").iterdir()):
            if d.is_dir() and (d / "state.json").is_file():
                out.append(json.loads((d / "state.json").read_text())["series_uid"])
        return out

    def mark_decided(self, series_uid: str, **record: Any) -> None:
        """Remembers that the series was decided (forwarded, held or accepted): a later instance of
        it is a late part, not a series of its own."""
        before = self.decided(series_uid) or {}
        record = {"series_uid": series_uid, "time": time.time(), **record,
                  "instances": int(record.get("instances", 0)) + int(before.get("instances", 0))}
        write_durably(self.root / "decided" / f"{safe_uid(series_uid)}.json", (json.dumps(record) + "\n").encode())

    def decided(self, series_uid: str) -> dict[str, Any] | None:
        """The series' last decision (:meth:`mark_decided`; its ``instances`` summed over every
        decided part), or None."""
        p = self.root / "decided" / f"{safe_uid(series_uid)}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def keep_recent(self, series_uid: str, files: list[Path], state: dict[str, Any]) -> None:
        """Keeps a forwarded series' instances (:func:`link_or_copy`) and its state under
        ``recent/``, for the study's later series to be cross-checked against."""
        dest = self.root / "recent" / safe_uid(series_uid)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in files:
            link_or_copy(f, tmp / f.name)
        (tmp / "state.json").write_text(json.dumps({**state, "kept_at": time.time()}) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)

    def siblings(self, series_uid: str, study_uid: str, within_s: float, settled) -> list[Path]:
        """Folders of the study's other CT series the node holds: settled in the spool (``settled``:
        whether a series UID has stopped receiving), or forwarded (``recent/``), accepted or held
        less than ``within_s`` ago: what a series is cross-checked against."""
        if not study_uid:
            return []
        out = []
        now = time.time()
        for area in ("series", "recent", "accepted", "quarantine"):
            base = self.root / area
            if not base.is_dir():
                continue
            for d in sorted(base.iterdir()):
                state = _state_of(d) if d.is_dir() and not d.name.startswith(".") else None
                if state is None or state.get("series_uid") == series_uid or state.get("study_uid") != study_uid:
                    continue
                if area == "series" and not settled(state.get("series_uid")):
                    continue
                if area != "series" and now - float(state.get("kept_at") or (d / "state.json").stat().st_mtime) > within_s:
                    continue
                out.append(d)
        return out

    def sweep_recent(self, older_than_s: float) -> None:
        """Deletes the forwarded series kept longer than ``older_than_s`` (:meth:`keep_recent`)."""
        now = time.time()
        for d in (self.root / "recent").iterdir():
            if now - float((_state_of(d) or {}).get("kept_at", 0.0)) > older_than_s:
                shutil.rmtree(d, ignore_errors=True)

    def audit(self, **entry: Any) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}, sort_keys=False) + "\n"
        with self._audit_lock, open(self.root / "audit.jsonl", "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_audit(self) -> list[dict[str, Any]]:
        p = self.root / "audit.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []
