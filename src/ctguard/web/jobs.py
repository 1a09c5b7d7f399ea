"""Screening jobs in a bounded worker pool: when it is full, :class:`Busy` (the API answers 429)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ctguard.web.uploads import remove_tree


class Busy(Exception):
    """Every worker is busy and the queue is full."""


@dataclass
class Job:
    id: str
    name: str
    folder: Path  # the job's folder: upload/ (removed after screening) and out/
    status: str = "queued"  # queued, running, done, error
    stage: str = ""
    error: str | None = None
    error_status: int = 422
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    future: Future | None = None
    input: Path | None = None  # what is screened: a file or folder under upload/
    owner: str = "anonymous"  # the user who uploaded it: nobody else sees it

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def public(self) -> dict[str, Any]:
        d = {"id": self.id, "name": self.name, "status": self.status, "stage": self.stage, "error": self.error,
             "elapsed_s": round((self.finished or time.time()) - self.created, 2)}
        if self.result is not None:
            from ctguard.crosscheck import cross_check_lines
            from ctguard.io.dicom import scan_summary

            d["result"] = self.result
            # What the command line and the report say of it, for the page to show as it is.
            d["text"] = {"scan": scan_summary(self.result.get("scan")),
                         "cross_check": [{"level": level, "text": text, "alarm": alarm}
                                         for level, text, alarm in cross_check_lines(self.result)]}
            d["links"] = {"json": f"/api/jobs/{self.id}/result.json", "report": f"/api/jobs/{self.id}/report/index.html",
                          "slice": f"/api/jobs/{self.id}/slices/{{z}}.png"}
            for key, name in (("sr", "ctguard-sr.dcm"), ("seg", "ctguard-seg.dcm")):  # DICOM series only; SEG when tampered
                if (self.out / "dicom" / name).is_file():
                    d["links"][key] = f"/api/jobs/{self.id}/dicom/{name}"
        return d


class JobManager:
    """Jobs and their files. A finished job's results are deleted ``retain_s`` after it finished
    (a sweeper thread checks every few seconds), or sooner when more than ``keep`` are finished;
    ``on_delete(job, what, reason)`` hears of every deletion (the audit log)."""

    def __init__(self, root: Path, workers: int = 1, queue: int = 4, keep: int = 50, retain_s: float = 24 * 3600,
                 on_delete: Callable[[Job, str, str], None] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctguard-job")
        self.slots = threading.BoundedSemaphore(workers + queue)
        self.keep = keep
        self.retain_s = retain_s
        self.on_delete = on_delete or (lambda job, what, reason: None)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, daemon=True, name="ctguard-job-sweeper")
        self._sweeper.start()

    def _sweep(self) -> None:
        while not self._stop.wait(min(30.0, max(self.retain_s / 4, 0.2))):
            self._expire()

    def reserve(self, owner: str = "anonymous") -> Job:
        """A new job with a slot in the pool, or :class:`Busy`."""
        if not self.slots.acquire(blocking=False):
            raise Busy()
        job = Job(uuid.uuid4().hex[:16], "", self.root / uuid.uuid4().hex[:16], owner=owner)
        job.folder.mkdir(parents=True)
        (job.folder / "upload").mkdir()
        with self.lock:
            self.jobs[job.id] = job
        return job

    def cancel(self, job: Job) -> None:
        """Gives back a reserved job's slot and removes its files (a refused upload)."""
        with self.lock:
            self.jobs.pop(job.id, None)
        remove_tree(job.folder)
        self.slots.release()

    def start(self, job: Job, work: Callable[[Job], dict]) -> Future:
        def run() -> dict | None:
            job.status = "running"
            try:
                job.result = work(job)
                job.status = "done"
                return job.result
            except Exception as e:  # the job records its error; the server keeps serving
                from ctguard.errors import InputError

                job.status, job.error = "error", _describe(e, job)
                job.error_status = getattr(e, "status", 422 if isinstance(e, InputError) else 500)
                return None
            finally:
                job.finished = time.time()
                remove_tree(job.folder / "upload")  # the uploaded scan is not kept
                self.on_delete(job, "upload", "screened")
                self.slots.release()
                self._expire()

        job.future = self.pool.submit(run)
        return job.future

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, if it exists and (when ``owner`` is given) belongs to ``owner``."""
        with self.lock:
            job = self.jobs.get(job_id)
        return job if job is not None and (owner is None or job.owner == owner) else None

    def delete(self, job: Job, reason: str) -> None:
        """Removes a finished job and its results now (its owner asked), as retention would later."""
        self._remove([(job, reason)])

    def _remove(self, gone: list[tuple[Job, str]]) -> None:
        """Removes each ``(job, reason)`` and its files, and says so (``on_delete``), once: a job the
        sweeper and its owner both remove is removed and audited by whichever comes first."""
        with self.lock:
            gone = [(j, reason) for j, reason in gone if self.jobs.pop(j.id, None) is not None]
        for j, reason in gone:
            remove_tree(j.folder)
            self.on_delete(j, "results", reason)

    def of(self, owner: str) -> list[Job]:
        with self.lock:
            return sorted((j for j in self.jobs.values() if j.owner == owner), key=lambda j: j.created)

    def _expire(self) -> None:
        now = time.time()
        with self.lock:
            done = sorted((j for j in self.jobs.values() if j.finished), key=lambda j: j.finished)
            surplus = len(done) - self.keep  # the oldest beyond ``keep`` go too
            old = []
            for k, j in enumerate(done):
                if now - j.finished >= self.retain_s:
                    old.append((j, "retention"))
                elif k < surplus:
                    old.append((j, "too many jobs"))
        self._remove(old)

    def shutdown(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _describe(e: Exception, job: Job) -> str:
    """The error in one line, naming the uploaded file, never the server's own paths."""
    from ctguard.errors import InputError

    if not isinstance(e, InputError):
        return f"screening failed ({e.__class__.__name__})"
    if not e.path:
        return e.problem
    upload = (job.folder / "upload").resolve()
    p = Path(e.path).resolve()
    name = str(p.relative_to(upload)) if p == upload or upload in p.parents else p.name
    return f"{job.name if name == '.' else name}: {e.problem}"
