"""The DICOM node: a C-STORE SCP that screens every CT series on its way to the PACS.

Received CT instances are spooled (on disk before "stored" is answered) and grouped by series; a
series is complete when nothing new has arrived for ``settle_s``. It is then screened with
:func:`ctguard.api.screen` and, by policy, forwarded (C-STORE SCU over ``associations`` parallel
associations, retried with back-off until the destination confirms every instance) or held in quarantine with
its JSON and HTML report. Other storage classes pass through unscreened. Every decision is a line
in ``audit.jsonl``. ``workers`` series are screened and forwarded at once (a series is only ever in
one worker's hands). Instances of a series that arrive after its decision was carried out (a
sender that paused longer than ``settle_s``) cannot be screened with the rest, which has left:
they are held as a late part (``on_late="hold"``) or screened on their own. With ``sign``, every instance gets a DICOM Digital Signature on arrival, before
it is spooled, so that what the PACS stores can be checked with ``ctguard verify`` ever after. On start, every series left in the spool resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from ctguard.node.spool import Spool, link_or_copy, safe_uid

log = logging.getLogger("ctguard.node")
SCREENED_CLASSES = {CTImageStorage, EnhancedCTImageStorage}


def whose(state: dict[str, Any]) -> str:
    """The patient and series description for a log line (" (patient P, description)"), where
    screening read them from the headers; else empty."""
    parts = [f"patient {state['patient_id']}" if state.get("patient_id") else "", state.get("description") or ""]
    text = ", ".join(p for p in parts if p)
    return f" ({text})" if text else ""


def held_reason(state: dict[str, Any]) -> str | None:
    """Why a series was held whatever its detector said: a late part or two versions of it
    (``error``), or a later series of its study that disagrees with it (``reason``)."""
    return state["error"] if state.get("verdict") in ("late", "conflict") else state.get("reason")


def screened_fields(state: dict[str, Any]) -> dict[str, Any]:
    """What screening found out for the audit entry, where it did: the patient ID, and the study's
    other series the series disagrees with (the cross-check)."""
    return {k: state[k] for k in ("patient_id", "disagrees_with") if state.get(k)}


@dataclass
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@HOST:PORT``."""
        from ctguard.errors import InputError

        try:
            ae, _, hostport = text.partition("@")
            host, _, port = hostport.rpartition(":")
            if not ae or not host or not port:
                raise ValueError
            return cls(ae, host, int(port))
        except ValueError:
            raise InputError(f"--forward {text!r}: expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242") from None


@dataclass
class NodeConfig:
    spool: Path
    ae_title: str = "CTGUARD"
    host: str = "127.0.0.1"
    port: int = 11112
    forward: Destination | None = None
    on_tampered: str = "hold"  # hold | forward (and alert)
    on_error: str = "forward"  # a CT series that cannot be screened (no lungs in view, ...): forward | hold
    settle_s: float = 5.0
    on_late: str = "hold"  # instances of a series already decided: hold | screen (on their own)
    allow: list[str] = field(default_factory=list)  # calling AE titles; empty: any
    model: str | None = None
    threshold: float | None = None
    retry_first_s: float = 2.0
    retry_max_s: float = 120.0
    tls: tuple[str, str, str | None] | None = None  # (cert, key, CA for client certificates)
    send_results: bool = False  # the results as DICOM (SR; SEG when tampered) follow a forwarded series; a held one keeps them
    sign: tuple[str, str] | None = None  # (key PEM, certificate PEM): sign every instance on arrival (PS3.15 Base RSA)
    workers: int = 2  # settled series screened and forwarded at once
    associations: int = 4  # parallel associations that forward one series
    cross_check_s: float = 600.0  # a decided CT series is a study's later series' cross-check for this long (0: none)
    study_settle_s: float = 30.0  # a series to forward waits until its study has had no instance this long (0: no wait)


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.last_seen: dict[str, float] = {}  # series UID -> time of the last instance
        self.study_seen: dict[str, float] = {}  # study UID -> time of its last instance
        self.series_study: dict[str, str] = {}  # series UID -> study UID, for the series received and not yet decided
        self.waiting: dict[str, tuple[str, float]] = {}  # screened series waiting for their study: UID -> (study UID, since)
        self.lock = threading.Lock()
        self.ready: queue.Queue[str] = queue.Queue()
        self.queued: set[str] = set()  # in the ready queue or in a worker's hands
        self.again: set[str] = set()  # settled again while in a worker's hands: queued once more after
        self.stop_event = threading.Event()
        self.server = None
        self.threads: list[threading.Thread] = []
        self._passthrough_next = 0.0
        self._passthrough_delay = cfg.retry_first_s
        self._passthrough_lock = threading.Lock()  # one worker forwards the pass-through folder at a time
        self._associations = threading.BoundedSemaphore(max(1, cfg.associations))  # to the destination, node-wide
        self.signer = None
        if cfg.sign:
            from ctguard.signatures import Signer

            self.signer = Signer.load(*cfg.sign)  # a bad key or certificate stops the node before it listens

    # -- receiving -------------------------------------------------------------------------
    def handle_store(self, event) -> int:
        try:
            ds = event.dataset  # decodes the header; pixel data stays raw
            sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            series_uid = str(ds.SeriesInstanceUID) if "SeriesInstanceUID" in ds else ""
        except Exception as e:  # a malformed dataset: refuse it, keep serving
            return self._refuse(event, f"malformed dataset: {e}", 0xC210)  # cannot understand
        if sop_class in SCREENED_CLASSES and (not series_uid or "PixelData" not in ds):
            return self._refuse(event, "CT instance without SeriesInstanceUID or pixel data", 0xA900)  # does not match SOP class
        buf = BytesIO()
        buf.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buf, event.file_meta, enforce_standard=True)
        buf.write(event.request.DataSet.getvalue())  # the dataset exactly as sent
        data = buf.getvalue()
        if self.signer is not None:  # signed before it is spooled, screened or forwarded: what reaches the PACS carries it
            from ctguard.errors import InputError
            from ctguard.signatures import sign_bytes

            try:
                data = sign_bytes(data, self.signer, name=sop_uid)
            except (InputError, ValueError, TypeError) as e:
                return self._refuse(event, f"cannot sign the instance: {e}", 0xC211)
        calling = event.assoc.requestor.ae_title
        if sop_class not in SCREENED_CLASSES:
            self.spool.store_passthrough(sop_uid, data)
            self.spool.audit(calling_ae=calling, sop_class=sop_class, sop_instance_uid=sop_uid, instances=1, verdict="not screened",
                             action="pass-through")
            return 0x0000
        meta = {"calling_ae": calling, "study_uid": str(ds.get("StudyInstanceUID", "")), "first_received": time.time(),
                "signed_by": self.signer.subject if self.signer is not None else None}
        self.spool.store_instance(series_uid, sop_uid, data, meta)
        with self.lock:
            now = time.time()
            self.last_seen[series_uid] = now
            if meta["study_uid"]:
                self.study_seen[meta["study_uid"]] = now
                self.series_study[series_uid] = meta["study_uid"]
        return 0x0000

    def _refuse(self, event, reason: str, status: int) -> int:
        calling = event.assoc.requestor.ae_title
        log.warning("refused an instance from %s: %s", calling, reason)
        self.spool.audit(calling_ae=calling, action="refused", reason=reason, status=f"0x{status:04X}")
        return status

    def handle_echo(self, event) -> int:
        return 0x0000

    # -- assembling, screening, forwarding --------------------------------------------------
    def _assembler(self) -> None:
        swept = 0.0
        while not self.stop_event.wait(min(0.2, self.cfg.settle_s / 4)):
            now = time.time()
            if now - swept > 5.0:  # forwarded series kept for cross-checks, past their time
                self.spool.sweep_recent(self.cfg.cross_check_s)
                swept = now
            with self.lock:
                done = [uid for uid, t in self.last_seen.items() if now - t >= self.cfg.settle_s]
                for uid in done:
                    del self.last_seen[uid]
                quiet = [uid for uid, (study, since) in self.waiting.items() if self._study_quiet(uid, study, since, now)]
                for uid in quiet:
                    del self.waiting[uid]
                for study in [s for s, t in self.study_seen.items() if now - t > self.cfg.study_settle_s + 3600]:
                    del self.study_seen[study]
            for uid in done + quiet:
                self._enqueue(uid)

    def _keeps_waiting(self, uid: str, state: dict[str, Any]) -> bool:
        """Whether a series waiting for its study (``state["status"] == "waiting"``) waits on; if so
        the assembler looks at it again (:attr:`waiting`)."""
        study, since = state.get("study_uid", ""), float(state.get("waiting_since", 0.0))
        with self.lock:
            if self._study_quiet(uid, study, since, time.time()):
                return False
            self.waiting[uid] = (study, since)
            return True

    def _study_quiet(self, uid: str, study: str, since: float, now: float) -> bool:
        """Whether a series waiting since ``since`` may leave: its study has had no instance for
        ``study_settle_s`` and none of its other series is being received or screened (the caller
        holds ``self.lock``)."""
        if now - max(since, self.study_seen.get(study, 0.0)) < self.cfg.study_settle_s:
            return False
        busy = (set(self.last_seen) | self.queued) - {uid}
        return not any(self.series_study.get(u) == study for u in busy)

    def _enqueue(self, uid: str) -> None:
        with self.lock:
            if uid in self.queued:  # in a worker's hands now: it goes back to the queue when that worker is done
                self.again.add(uid)
                return
            self.queued.add(uid)
        self.ready.put(uid)

    def _worker(self) -> None:
        while not self.stop_event.is_set():
            try:
                uid = self.ready.get(timeout=0.2)
            except queue.Empty:
                self._forward_passthrough()
                continue
            try:
                self.process(uid)
            except Exception:  # never let one series stop the node
                log.exception("series %s failed; it stays in the spool", uid)
            finally:
                with self.lock:
                    again = uid in self.again
                    self.again.discard(uid)
                    if not again:
                        self.queued.discard(uid)
                if again:
                    self.ready.put(uid)

    def process(self, uid: str) -> None:
        """Screens a complete series (if not yet screened) and carries out the policy. Instances
        that arrive while it is screened make it wait to settle and be screened again, whole;
        while the decision is carried out (forwarded, held) new instances of it wait (see
        :meth:`Spool.series_lock`)."""
        from ctguard import api
        from ctguard.errors import ConflictingImages, InputError

        with self.lock:
            if uid in self.last_seen:  # more instances arrived: wait for the series to settle again
                return
        writes = self.spool.writes(uid)
        state = self.spool.state(uid)
        folder = self.spool.series_dir(uid)
        files = self.spool.instances(uid)
        if not files:
            with self.spool.series_lock(uid):
                if not self.spool.instances(uid):
                    shutil.rmtree(folder, ignore_errors=True)
            return
        earlier = self.spool.decided(uid)
        # A part of a series cannot be screened alone (a few slices, and an attacker's edit would
        # go out as an "error" by --on-error): held for a person to look at.
        late = state.get("status") == "receiving" and earlier is not None and self.cfg.on_late == "hold"
        screened = state.get("status") == "receiving" and not late
        if late:
            state.update(status="screened", verdict="late", score=None, instances=len(files),
                         error=f"{len(files)} instance(s) arrived after the series was decided ({earlier.get('action')}, "
                               f"{earlier.get('instances')} instances); a part of a series is not screened on its own")
        if screened:
            work = folder / ".screen"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            try:
                t = time.time()
                with self._with_siblings(uid, state, folder) as target:
                    # A clean series that is forwarded leaves the spool with its report: write none for it.
                    result = api.screen(target, json_out=work / "result.json", report_dir=work / "report", model=self.cfg.model,
                                        threshold=self.cfg.threshold, dicom_out=work / "dicom" if self.cfg.send_results else None,
                                        report_tampered_only=self.cfg.forward is not None, series_uid=uid if target != folder else None)
                state.update(verdict=result["verdict"], score=result["score"], findings=len(result["findings"]),
                             screen_s=round(time.time() - t, 2),
                             **{k: v for k, v in (result.get("scan") or {}).items() if k in ("patient_id", "description")})
                disagree = [c["series_uid"] for c in result.get("cross_check") or [] if c.get("disagreements")]
                if disagree:
                    state["disagrees_with"] = disagree
                    checks = {c["series_uid"]: c for c in result["cross_check"]}
                    description = (result.get("scan") or {}).get("description")
                    stopped = [other for other in disagree if self._hold_waiting(other, uid, checks[other], description)]
                    gone = [other for other in disagree if other not in stopped]
                    news = ([f"{', '.join(stopped)} (waiting for the study) is held too"] if stopped else []) + \
                        ([f"{', '.join(gone)} was decided before it arrived (see the audit log)"] if gone else [])
                    log.warning("ALERT: series %s%s and series %s of its study disagree: one of them was edited (the cross-check, "
                                "result.json); %s", uid, whose(state), ", ".join(disagree), "; ".join(news))
            except ConflictingImages as e:  # two versions of the series: the one not screened must not pass
                state.update(verdict="conflict", score=None, error=e.problem)
            except InputError as e:
                state.update(verdict="error", score=None, error=e.problem)
            state.update(status="screened", instances=len(files))
        with self.spool.series_lock(uid):
            if self.spool.writes(uid) != writes:
                log.info("series %s: %d instance(s) arrived while it was screened; screening it again when it settles", uid,
                         self.spool.writes(uid) - writes)
                return  # its state is still "receiving"; the instance that arrived set it settling again
            if screened or late:
                self.spool.save_state(uid, state)
                log.info("series %s%s: %s (score %s, %d instances)", uid, whose(state), state["verdict"], state.get("score"), len(files))
            elif state.get("status") == "waiting":
                state = self.spool.state(uid)  # a later series of the study may have found it edited meanwhile
                if self._keeps_waiting(uid, state):
                    return
            self._carry_out(uid, state, folder, files)

    def _hold_waiting(self, uid: str, later: str, check: dict[str, Any], description: str | None) -> bool:
        """A later series of the study disagrees with series ``uid`` (``check``: the later one's
        cross-check of it; ``description``: the later one's): if ``uid`` is still waiting for its
        study (screened, not yet forwarded), it is marked tampered, to be held with the later one,
        its result and report saying where the two disagree. Returns whether it was still waiting."""
        from ctguard.crosscheck import seen_from_the_other
        from ctguard.io.dicom import read_series
        from ctguard.report.html import write_report

        with self.spool.series_lock(uid):
            state = self.spool.state(uid)
            if state.get("status") != "waiting":
                return False
            state.update(verdict="tampered", disagrees_with=sorted({*state.get("disagrees_with", []), later}),
                         reason=f"the cross-check of series {later} of its study, received after it, found that the two disagree: "
                                "one of them was edited (its result.json and report say where, and which one the detector suspects)")
            self.spool.save_state(uid, state)
            screen = self.spool.series_dir(uid) / ".screen"
            try:  # what is held with it says why, beside what its own screening found
                if (screen / "result.json").is_file():
                    vol = read_series(self.spool.series_dir(uid), files=self.spool.instances(uid))
                    data = json.loads((screen / "result.json").read_text())
                    data.update(verdict="tampered", held_because=state["reason"], disagrees_with=state["disagrees_with"],
                                cross_check=[*(data.get("cross_check") or []), seen_from_the_other(check, later, description, vol)])
                    (screen / "result.json").write_text(json.dumps(data, indent=2) + "\n")
                    if not data["findings"] and not (screen / "report").exists():  # its own screening found nothing: no report yet
                        write_report(data, vol, None, screen / "report")
            except Exception:  # the hold stands (its state is saved); only the report of why is missing
                log.exception("series %s is held, but its result and report could not be brought up to date", uid)
        return True

    @contextlib.contextmanager
    def _with_siblings(self, uid: str, state: dict[str, Any], folder: Path):
        """The folder to screen the series from: its own, or, where the node holds other CT series
        of its study (:meth:`Spool.siblings`), a folder with theirs beside its instances (hard links
        in the spool: a sibling forwarded meanwhile stays readable), so that screening cross-checks
        it against them (:mod:`ctguard.crosscheck`)."""
        siblings = [] if self.cfg.cross_check_s <= 0 else self.spool.siblings(
            uid, state.get("study_uid", ""), self.cfg.cross_check_s, settled=lambda u: u not in self.last_seen)
        if not siblings:
            yield folder
            return
        tmp = self.spool.root / f".crosscheck-{safe_uid(uid)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for j, d in enumerate([folder, *siblings]):
                for f in sorted(d.glob("*.dcm")):
                    with contextlib.suppress(FileNotFoundError):  # a sibling's instance removed meanwhile
                        link_or_copy(f, tmp / f"{j}-{f.name}")
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _carry_out(self, uid: str, state: dict[str, Any], folder: Path, files: list[Path]) -> None:
        """The policy for a screened series: held, kept, or forwarded (then removed from the spool)."""
        verdict = state["verdict"]
        hold = (verdict == "tampered" and self.cfg.on_tampered == "hold") or (verdict == "error" and self.cfg.on_error == "hold") \
            or verdict in ("late", "conflict")
        if hold or self.cfg.forward is None:
            if hold:
                self._quarantine(uid, state, action="held-late" if verdict == "late" else "held")
            else:
                self._keep(uid, state)
            return
        if self.cfg.study_settle_s > 0 and self.cfg.cross_check_s > 0 and state.get("study_uid") and state.get("status") != "waiting":
            # Its study's later series are cross-checked against it before it leaves (_hold_waiting).
            state.update(status="waiting", waiting_since=time.time())
            self.spool.save_state(uid, state)
            self._keeps_waiting(uid, state)
            log.info("series %s%s waits until its study has had no instance for %.0f s", uid, whose(state), self.cfg.study_settle_s)
            return
        action = "forwarded-alert" if verdict == "tampered" else "forwarded"
        if verdict == "tampered":
            log.warning("ALERT: series %s%s screened TAMPERED (score %s); forwarding by policy", uid, whose(state), state.get("score"))
        self._forward_until_confirmed(uid, files)
        results = sorted((folder / ".screen" / "dicom").glob("*.dcm")) if self.cfg.send_results else []
        if results:  # after the series, so that a viewer finds the images its SR and SEG refer to
            self._forward_until_confirmed(uid, results)
        self.spool.audit(calling_ae=state.get("calling_ae"), **screened_fields(state), study_uid=state.get("study_uid"), series_uid=uid,
                         instances=len(files), verdict=verdict, score=state.get("score"), action=action, destination=self.cfg.forward.ae_title,
                         results=[p.name for p in results])
        if self.cfg.cross_check_s > 0:  # the study's later series are cross-checked against it a while
            self.spool.keep_recent(uid, files, state)
        self._mark_decided(uid, verdict=verdict, action=action, instances=len(files))
        if verdict == "tampered":  # keep the evidence of a forwarded alert
            dest = self.spool.root / "quarantine" / (folder.name + ".alert")
            shutil.rmtree(dest, ignore_errors=True)
            if (folder / ".screen").is_dir():
                shutil.copytree(folder / ".screen", dest)
        shutil.rmtree(folder)

    def _quarantine(self, uid: str, state: dict[str, Any], where: str = "quarantine", action: str = "held") -> None:
        """Moves the series (instances, result.json, report/) out of the spool in one rename."""
        folder = self.spool.series_dir(uid)
        dest = self.spool.root / where / folder.name
        if dest.exists():
            dest = dest.with_name(f"{folder.name}.{int(time.time())}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        files = self.spool.instances(uid)
        folder.rename(dest)  # atomic: the series is either in the spool or here
        screen = dest / ".screen"
        for name in ("result.json", "report", "dicom"):
            if (screen / name).exists():
                (screen / name).rename(dest / name)
        shutil.rmtree(screen, ignore_errors=True)
        self.spool.audit(calling_ae=state.get("calling_ae"), **screened_fields(state), study_uid=state.get("study_uid"), series_uid=uid,
                         instances=len(files), verdict=state["verdict"], score=state.get("score"), action=action, folder=str(dest),
                         **({"reason": reason} if (reason := held_reason(state)) else {}))
        self._mark_decided(uid, verdict=state["verdict"], action=action, instances=len(files))
        if action in ("held", "held-late"):
            log.warning("series %s%s held in quarantine: %s%s", uid, whose(state), dest,
                        f" ({state['error']})" if state.get("verdict") == "conflict" else "")

    def _mark_decided(self, uid: str, **record: Any) -> None:
        self.spool.mark_decided(uid, **record)
        with self.lock:
            self.series_study.pop(uid, None)

    def _keep(self, uid: str, state: dict[str, Any]) -> None:
        """No destination configured: the node is the end point; screened series go to accepted/."""
        self._quarantine(uid, state, where="accepted", action="accepted")

    def _forward_until_confirmed(self, uid: str, files: list[Path]) -> None:
        delay = self.cfg.retry_first_s
        attempt = 0
        remaining = list(files)
        while not self.stop_event.is_set():
            attempt += 1
            remaining = self._send(remaining)
            if not remaining:
                return
            log.warning("series %s: %d instance(s) not confirmed by %s (attempt %d); retrying in %.0f s", uid, len(remaining),
                        self.cfg.forward.ae_title, attempt, delay)
            if self.stop_event.wait(delay):
                break
            delay = min(delay * 2, self.cfg.retry_max_s)
        raise RuntimeError("node stopping; series stays in the spool")

    def _send(self, files: list[Path]) -> list[Path]:
        """C-STORE of ``files`` over up to ``associations`` parallel associations (contiguous
        shares, in order); returns those not confirmed."""
        k = max(1, min(self.cfg.associations, len(files) // 16 or 1))
        if k == 1:
            return self._send_one(files)
        from concurrent.futures import ThreadPoolExecutor

        size = -(-len(files) // k)
        shares = [files[i:i + size] for i in range(0, len(files), size)]
        with ThreadPoolExecutor(len(shares), thread_name_prefix="ctguard-forward") as pool:
            left = list(pool.map(self._send_one, shares))
        return [f for share in left for f in share]

    def _send_one(self, files: list[Path]) -> list[Path]:
        """C-STORE of ``files`` on one association (one of ``associations`` node-wide); returns
        those not confirmed: an association refused, aborted or timed out fails what it had left."""
        from pydicom import dcmread
        from pynetdicom import AE

        dest = self.cfg.forward
        # Headers only, for the presentation contexts: each instance goes out as the bytes on disk
        # (pynetdicom sends a file's encoded data set as it is, without decoding and encoding it again).
        datasets = [(f, dcmread(f, stop_before_pixels=True)) for f in files]
        ae = AE(ae_title=self.cfg.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}):
            ae.add_requested_context(sop_class, syntax)
        with self._associations:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
            if not assoc.is_established:
                return files
            failed = []
            try:
                for i, (f, ds) in enumerate(datasets):
                    if not assoc.is_established:  # aborted or timed out: the rest waits for the next attempt
                        failed.extend(g for g, _ in datasets[i:])
                        break
                    try:
                        status = assoc.send_c_store(f)
                    except (RuntimeError, OSError, ValueError) as e:
                        log.warning("C-STORE of %s failed: %s", f.name, e)
                        failed.extend(g for g, _ in datasets[i:])
                        break
                    if not status or int(getattr(status, "Status", 0xFFFF)) not in (0x0000, 0xB000, 0xB007, 0xB006):
                        failed.append(f)
            finally:
                if assoc.is_established:
                    assoc.release()
        return failed

    def _forward_passthrough(self) -> None:
        if self.cfg.forward is None or not self._passthrough_lock.acquire(blocking=False):
            return
        try:
            self._forward_passthrough_locked()
        finally:
            self._passthrough_lock.release()

    def _forward_passthrough_locked(self) -> None:
        files = sorted((self.spool.root / "passthrough").glob("*.dcm"))
        if not files:
            return
        now = time.time()
        if now < self._passthrough_next:
            return
        left = self._send(files)
        for f in files:
            if f not in left:
                f.unlink()
        if left:
            self._passthrough_delay = min(self._passthrough_delay * 2, self.cfg.retry_max_s)
            self._passthrough_next = now + self._passthrough_delay
        else:
            self._passthrough_delay = self.cfg.retry_first_s

    # -- life cycle -------------------------------------------------------------------------
    def start(self, block: bool = False) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

        for uid in self.spool.pending():  # resume what a crash or stop left behind
            state = self.spool.state(uid)
            if state.get("study_uid"):
                self.series_study[uid] = state["study_uid"]
            if state.get("status") == "receiving":
                with self.lock:
                    self.last_seen[uid] = time.time()
            else:
                self._enqueue(uid)
            log.info("resuming series %s (%s)", uid, state.get("status"))
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = 16
        if self.cfg.allow:
            ae.require_calling_aet = list(self.cfg.allow)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, self.handle_echo)]
        ssl_context = None
        if self.cfg.tls:
            import ssl

            cert, key, ca = self.cfg.tls
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cert, key)
            if ca:
                ssl_context.verify_mode = ssl.CERT_REQUIRED
                ssl_context.load_verify_locations(ca)
        for i, target in enumerate([self._assembler] + [self._worker] * max(1, self.cfg.workers)):
            t = threading.Thread(target=target, daemon=True, name=f"ctguard-node-{target.__name__.strip('_')}-{i}")
            t.start()
            self.threads.append(t)
        self.server = ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers, ssl_context=ssl_context)
        if block:
            try:
                while not self.stop_event.wait(0.5):
                    pass
            finally:
                self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        for t in self.threads:
            t.join(5)
