"""The ``ctguard`` command: thin argument parsing around :mod:`ctguard.api`.

Exit codes: 0 done (a verdict is in the output, not the exit code); 2 bad input or usage, with
one line on stderr naming the file and the problem; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

from ctguard import __version__
from ctguard.errors import InputError

log = logging.getLogger("ctguard")
TRAINING_MODULES = {"torch", "torchvision", "onnx"}


def _print_json(obj, path: str | None = None) -> None:
    text = json.dumps(obj, indent=2)
    if path in (None, "-"):
        print(text)
    else:
        Path(path).write_text(text + "\n")


def probability(text: str) -> float:
    """A ``--threshold``: a probability from 0 to 1 (:func:`ctguard.screen.checked_threshold`),
    refused before anything is read."""
    from ctguard.screen import checked_threshold

    try:
        return checked_threshold(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    except InputError as e:
        raise argparse.ArgumentTypeError(e.problem) from None


def cmd_info(args) -> int:
    from ctguard import api
    from ctguard.io.dicom import readable_date

    result = api.info(args.input, series_uid=args.series, allow_modality=args.allow_modality)
    if args.json:
        _print_json(result)
        return 0
    print(f"{result['input']}: {result['kind']}, modality {result['modality'] or '?'}")
    print(f"  shape (z, y, x)    {result['shape']}")
    print(f"  spacing mm         {[round(s, 4) for s in result['spacing_mm']]}")
    print(f"  HU range           {result['hu_range']}")
    scan = result.get("scan") or {}
    for key, label in (("patient_id", "patient"), ("study_date", "study date"), ("description", "description"), ("manufacturer", "scanner")):
        if scan.get(key):
            print(f"  {label:<18} {readable_date(scan[key]) if key == 'study_date' else scan[key]}")
    for s in result["series"]:
        print(f"  series {s['uid']}: {s['slices']} slices {s.get('description', '')}".rstrip())
    for w in result["warnings"]:
        print(f"  warning: {w}")
    return 0


def cmd_demo(args) -> int:
    from ctguard import api

    api.demo(out_dir=args.out, seed=args.seed, progress=not args.quiet, echo=print)
    return 0


def cmd_simulate(args) -> int:
    from ctguard import api

    try:
        lo, _, hi = args.sizes.partition(",")
        sizes = (float(lo), float(hi or lo))
    except ValueError:
        raise InputError(f"--sizes {args.sizes!r}: MIN,MAX in mm (e.g. 6,20)") from None
    # A family list for copies that are not made would be left unused without a word.
    if args.inject_families is not None and args.inject == 0:
        raise InputError("--inject-families says how the FM copies are made: with --inject 0 there are none")
    if args.remove_families is not None and args.remove == 0 and args.healthy == 0:
        raise InputError("--remove-families says how the FB copies are in-painted: with --remove 0 and --healthy 0 there are none")
    api.simulate(args.inputs, args.out, inject=args.inject, remove=args.remove, per_scan=args.per_scan,
                 phantoms=args.phantoms, annotations=args.annotations, seed=args.seed, roi=args.roi,
                 sizes=sizes, progress=not args.quiet, echo=print,
                 inject_families=[f for f in (args.inject_families or "drawn").split(",") if f],
                 remove_families=[f for f in (args.remove_families or "fill").split(",") if f], healthy=args.healthy)
    return 0


def cmd_screen(args) -> int:
    import contextlib

    from ctguard import api

    if args.scores_out and not args.locations:
        raise InputError("--scores-out is where --locations writes its scores: give --locations CSV too")
    if not args.locations:
        return _screen(args, args.input)
    if not args.scores_out:
        raise InputError("--locations needs --scores-out FILE")
    # With --json, --report or --threshold the whole scan is screened as well, from the same read.
    whole = args.json is not None or args.report is not None or args.threshold is not None or args.dicom_out is not None
    with api.loaded(args.input, series_uid=args.series) if whole else contextlib.nullcontext(args.input) as scan:
        rows = api.score_locations(scan, args.locations, args.scores_out, model=args.model, series_uid=args.series)
        if args.json != "-":
            print(f"scored {len(rows)} places -> {args.scores_out}")
        return _screen(args, scan) if whole else 0


def _screen(args, scan) -> int:
    """``ctguard screen``'s whole screening of ``scan`` (its path, or the volume already read) and
    what it prints."""
    from ctguard import api
    from ctguard.io.dicom import scan_summary
    from ctguard.crosscheck import cross_check_lines
    from ctguard.screen import PEAK_SOURCES, spread

    if args.dicom_seg and not args.dicom_out:
        raise InputError("--dicom-seg writes the Segmentation into --dicom-out DIR: give --dicom-out too")
    result = api.screen(scan, json_out=args.json, report_dir=args.report, model=args.model,
                        series_uid=args.series, threshold=args.threshold, progress=not args.quiet,
                        dicom_out=args.dicom_out, dicom_seg=args.dicom_seg, trust=args.trust, cross_check=not args.no_cross_check)
    if args.json == "-":
        return 0
    print(f"{args.input}: {result['verdict'].upper()} (tamper score {result['score']:.3f}, {result['elapsed_s']:.1f} s)")
    if result.get("scan"):
        print(f"  {scan_summary(result['scan'])}")
    for f in result["findings"]:
        peak = f" (a peak of the {f['source']} map, threshold {f['threshold']:g})" if f.get("source") in PEAK_SOURCES else ""
        n, far = spread(f, result["spacing_mm"])
        more = f"; {n} more place{'s' if n > 1 else ''} over {'their thresholds' if n > 1 else 'its threshold'} up to {far:.0f} mm from it" if n else ""
        print(f"  {f['kind']:8s} score {f['score']:.3f} at voxel (z, y, x) {f['voxel']}, world {f['world_mm']} mm, radius {f['radius_mm']} mm"
              + peak + more)
    for level, line, _ in cross_check_lines(result):
        print(f"  {'  ' * level}{line}")
    for w in result["warnings"]:
        print(f"  warning: {w}")
    if result.get("signatures"):
        sig = result["signatures"]
        print(f"  signatures: {sig['status']} ({sig['valid']} valid, {sig['invalid']} invalid, {sig['unsigned']} unsigned"
              f"{'; signers ' + '; '.join(sig['signers']) if sig['signers'] else ''})")
    if args.report:
        print(f"report: {Path(args.report) / 'index.html'}")
    for what, path in (result.get("dicom") or {}).items():
        print(f"DICOM {what.upper()}: {path}")
    return 0


def cmd_sign(args) -> int:
    from ctguard import api

    rows = api.sign(args.inputs, args.key, args.cert, args.out, mac=args.mac, progress=not args.quiet)
    print(f"signed {len(rows)} instance{'s' if len(rows) != 1 else ''} -> {args.out}")
    return 0


def cmd_verify(args) -> int:
    from ctguard import api

    result = api.verify(args.inputs, trust=args.trust, json_out=args.json)
    if args.json == "-":
        return 0
    for inst in result["instances"]:
        line = f"{inst['path']}: {inst['status'].upper()}"
        if inst["reason"]:
            line += f" ({inst['reason']})"
        for sig in inst["signatures"]:
            if sig["status"] == "valid":
                trust = {None: "signer not checked (no --trust)", True: "trusted", False: "not trusted"}[sig["trusted"]]
                line += f"; signed by {sig['signer']} at {sig['time']}, {sig['mac_algorithm']}, {sig['elements_signed']} elements, {trust}"
                if sig["elements_not_covered"]:
                    line += f"; not covered: {' '.join(sig['elements_not_covered'])}"
        print(line)
    for s in result["series"]:
        print(f"series {s['series_instance_uid']}: {s['status'].upper()}: {s['instances']} instances, {s['valid']} valid, "
              f"{s['invalid']} invalid, {s['unsigned']} unsigned")
    return 0


def cmd_audit(args) -> int:
    from ctguard import api

    counts = api.audit(args.source, args.results, model=args.model, threshold=args.threshold, workers=args.workers, engine=args.engine,
                       address=args.address, trust=args.trust, progress=not args.quiet)
    print(f"{counts['series']} series: {counts['screened']} screened, {counts['skipped']} already in {args.results}; "
          f"{counts['tampered']} tampered, {counts['clean']} clean, {counts['error']} errors ({counts['seconds']:.0f} s)")
    return 0


def cmd_audit_report(args) -> int:
    from ctguard import api

    out = api.audit_report(args.results, args.out, reports=args.reports, model=args.model, progress=not args.quiet)
    print(f"{out['series']} series -> {out['html']} and {out['csv']}" + (f"; {out['reports']} series reports" if args.reports else ""))
    return 0


TRAIN_FLAGS = ("epochs", "seed", "batch_size", "lr", "model", "data", "steps_per_epoch", "unfreeze", "weights", "image_size", "patience",
               "workers")


def _exit_on_sigterm() -> None:
    """A SIGTERM (``kill``, a scheduler's stop) ends the run as an exception would, so that its
    clean-up runs: without it the worker processes of a training run were left running."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def cmd_train(args) -> int:
    from ctguard import api

    _exit_on_sigterm()
    if not args.config and not (args.data and args.model):
        raise InputError("give --config FILE, or --data DIR and --model NAME")
    cfg = api.load_config(args.config)
    for key in TRAIN_FLAGS:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if args.no_pretrained:
        cfg["pretrained"] = False
    api.train(cfg, out_dir=args.out, progress=not args.quiet, echo=print, resume=args.resume)
    return 0


def cmd_evaluate(args) -> int:
    from ctguard import api

    api.evaluate(args.model, args.data, args.out or str(Path(args.model).parent / f"eval-{args.split}"), split=args.split,
                 progress=not args.quiet, echo=print)
    return 0


def cmd_compare(args) -> int:
    from ctguard import api

    cfg = api.load_config(args.config)
    for key in ("epochs", "seed", "batch_size", "lr", "steps_per_epoch", "image_size", "unfreeze", "patience"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if args.no_pretrained:
        cfg["pretrained"] = False
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    api.compare(args.data, models, args.out, cfg, progress=not args.quiet, echo=print)
    return 0


def cmd_export_slices(args) -> int:
    from ctguard import api

    lo, _, hi = args.window.partition(",")
    api.export_slices(args.dataset, args.out, mode=args.mode, classes=args.classes, seed=args.seed, window=(float(lo), float(hi)),
                      patch=args.patch, negatives=args.negatives, bits=args.bits, ignore_missing=args.ignore_missing,
                      test_patients=[p for p in (args.test_patients or "").split(",") if p] or None,
                      progress=not args.quiet, echo=print)
    return 0


def cmd_list_models(args) -> int:
    from ctguard import api

    for m in api.list_models():
        print(f"{m['name']:<14} {m['input_size']}x{m['input_size']}x{m['channels']}  {m['description']}")
    return 0


def cmd_predict(args) -> int:
    import csv

    from ctguard import api

    rows = api.predict(args.images, model=args.model)
    for r in rows:
        print(f"{r['image']}: {r['label']} ({r['probability']:.3f})")
    if args.csv:
        classes = list(rows[0]["probabilities"]) if rows else []
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "label", "probability"] + [f"p_{c}" for c in classes])
            for r in rows:
                w.writerow([r["image"], r["label"], f"{r['probability']:.6f}"] + [f"{r['probabilities'][c]:.6f}" for c in classes])
    return 0


def cmd_serve(args) -> int:
    try:
        from ctguard.web.app import WebSettings, serve
        from ctguard.web.uploads import Limits
    except ImportError as e:
        raise InputError(f"the web app needs its extras: pip install 'ctguard[web]' ({e.name} is missing)") from None
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024**2))
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputError("TLS needs both --tls-cert and --tls-key")
    for path in (args.tls_cert, args.tls_key):
        if path and not Path(path).is_file():
            raise InputError("no such file", path)
    if args.retain <= 0:
        raise InputError(f"--retain {args.retain}: results must be kept for some time (hours > 0)")
    settings = WebSettings(limits=limits, workers=args.workers, queue=args.queue, model=args.model,
                           users=Path(args.users) if args.users else None, retain_hours=args.retain,
                           audit_log=Path(args.audit_log) if args.audit_log else None)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    serve(args.host, args.port, settings, log_level="warning" if args.quiet else "info", tls=tls)
    return 0


def cmd_users(args) -> int:
    import getpass

    from ctguard.web import auth

    if args.action == "list":
        for u in auth.list_users(args.users):
            print(f"{u['name']}: {'password' if u['password'] else 'no password'}, {len(u['tokens'])} token(s) {' '.join(u['tokens'])}".rstrip())
        return 0
    if not args.name:
        raise InputError(f"users {args.action} needs a NAME")
    if args.action == "remove":
        auth.remove_user(args.users, args.name)
        print(f"removed {args.name} from {args.users}")
        return 0
    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif not args.token or args.password:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise InputError("the two passwords differ")
    token = auth.add_user(args.users, args.name, password=password, token=args.token)
    print(f"{args.name} in {args.users}" + (" (password set)" if password is not None else ""))
    if token:
        print(f"API token (shown once; send it as 'Authorization: Bearer <token>'): {token}")
    return 0


def cmd_node(args) -> int:
    try:
        from ctguard.node import Destination, Node, NodeConfig
    except ImportError as e:
        raise InputError(f"the DICOM node needs its extras: pip install 'ctguard[node]' ({e.name} is missing)") from None
    if args.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    elif not args.quiet:
        logging.getLogger("ctguard").setLevel(logging.INFO)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise InputError("TLS needs both --tls-cert and --tls-key")
        tls = (args.tls_cert, args.tls_key, args.tls_ca)
    cfg = NodeConfig(spool=Path(args.spool), ae_title=args.ae_title, host=args.host, port=args.port,
                     forward=Destination.parse(args.forward) if args.forward else None, on_tampered=args.on_tampered,
                     on_error=args.on_error, on_late=args.on_late, settle_s=args.settle, allow=[a for a in (args.allow or "").split(",") if a],
                     model=args.model, threshold=args.threshold, tls=tls, send_results=args.send_results,
                     sign=tuple(args.sign) if args.sign else None, workers=args.workers, associations=args.associations,
                     cross_check_s=args.cross_check, study_settle_s=30.0 if args.study_settle is None else args.study_settle)
    if args.cross_check < 0 or (args.study_settle or 0) < 0:
        raise InputError("--cross-check and --study-settle take seconds, 0 or more")
    if args.study_settle and not (args.forward and args.cross_check > 0):
        raise InputError("--study-settle holds forwarded series back for their study's cross-check: it needs --forward and --cross-check above 0")
    if args.workers < 1 or args.associations < 1:
        raise InputError("--workers and --associations need at least 1")
    node = Node(cfg)
    dest = f"forwarding to {cfg.forward.ae_title}@{cfg.forward.host}:{cfg.forward.port}" if cfg.forward else "no destination (keeps series)"
    print(f"ctguard node {cfg.ae_title} listening on {cfg.host}:{cfg.port}{' (TLS)' if tls else ''}; {dest}; "
          f"tampered: {cfg.on_tampered}; {'signing as ' + node.signer.subject + '; ' if node.signer else ''}spool {cfg.spool}", flush=True)
    try:
        node.start(block=True)
    except OSError as e:
        raise InputError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e})") from None
    return 0


def _add_read_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", metavar="UID", help="series to read from a folder with several (default: the largest)")
    p.add_argument("--allow-modality", action="store_true", help="read DICOM of a modality other than CT")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctguard", description="Detect CT-GAN deepfakes (injected or removed lung nodules) in chest CT.")
    parser.add_argument("--version", action="version", version=f"ctguard {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug, tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = add("info", "what a scan or image is (kind, shape, spacing, HU range, series; patient, study date and scanner of a DICOM one)")
    p.add_argument("input", help="DICOM folder or file (or a zip of them), NIfTI/NRRD/MHD, PNG/JPG")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_read_options(p)
    p.set_defaults(func=cmd_info)

    p = add("simulate", "make CT-GAN-style deepfakes (injected/removed nodules) from real scans, in the CT-GAN layout")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="scans to tamper with (DICOM folders, NIfTI, ...)")
    p.add_argument("--out", required=True, help="dataset folder to create (must not exist)")
    p.add_argument("--inject", type=int, default=2, metavar="N", help="FM copies per scan (default: 2)")
    p.add_argument("--remove", type=int, default=1, metavar="N", help="FB copies per scan with a known tumour (default: 1)")
    p.add_argument("--healthy", type=int, default=0, metavar="N", help="more FB copies per scan with healthy lung in-painted (default: 0)")
    p.add_argument("--inject-families", default=None, metavar="LIST",
                   help="how FM copies are made, in turn: drawn (a rendered nodule), moved (a real tumour of the scan moved) (default: drawn)")
    p.add_argument("--remove-families", default=None, metavar="LIST",
                   help="how FB copies are in-painted, in turn: fill, clone (healthy lung copied over) (default: fill)")
    p.add_argument("--per-scan", type=int, default=1, metavar="K", help="nodules injected into each FM copy (default: 1)")
    p.add_argument("--phantoms", type=int, default=0, metavar="N", help="also tamper with N phantom chests")
    p.add_argument("--annotations", metavar="DIR|FILE", help="known real tumours: a folder of PASCAL-VOC boxes named by SOPInstanceUID, "
                   "an LIDC-IDRI XML, a DICOM RTSTRUCT or SEG of the series, or a label map (NRRD/NIfTI) on the scan's grid")
    p.add_argument("--roi", default=None, metavar="PATTERN", help="with an RTSTRUCT as --annotations: the ROIs that are tumours, by name (default: GTV*)")
    p.add_argument("--sizes", default="6,20", metavar="MIN,MAX", help="injected nodule diameters in mm (default: 6,20)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_simulate)

    p = add("screen", "screen a whole scan: was it tampered with, where, and how")
    p.add_argument("input", help="DICOM series folder (or a zip of one, as a PACS or TCIA exports it), NIfTI/NRRD/MHD, or a single slice or image")
    p.add_argument("--json", metavar="FILE", help="write the result JSON here")
    p.add_argument("--report", metavar="DIR", help="write the HTML report here")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH", help="detector: tamper3d (bundled, default) or a checkpoint")
    p.add_argument("--threshold", type=probability, default=None, help="minimum tamper probability of a finding, for every candidate (default: the model's own; a second stage may "
                        "hold the lung maps' peaks to one of their own)")
    p.add_argument("--dicom-out", metavar="DIR", help="write the results as DICOM objects of the scan's study here: a TID 1500 SR, and a "
                   "tamper-probability Segmentation when tampered (DICOM series input)")
    p.add_argument("--dicom-seg", action="store_true", help="with --dicom-out: write the Segmentation for a clean scan too")
    p.add_argument("--locations", metavar="CSV", help="score these places (z,y,x or a CT-GAN labels file); with --json, --report or "
                   "--dicom-out the whole scan is screened too")
    p.add_argument("--scores-out", metavar="CSV", help="where --locations writes its scores")
    p.add_argument("--trust", metavar="PEM", help="judge the signers of a signed series by these certificates (signers or their CAs)")
    p.add_argument("--no-cross-check", action="store_true", help="do not cross-check the series against the folder's other "
                   "reconstructions of its acquisition (by default each is compared: their noise is one)")
    _add_read_options(p)
    p.set_defaults(func=cmd_screen)

    p = add("audit", "screen every CT series of an archive (a folder tree, or a PACS over DICOMweb) into SQLite; resumable")
    p.add_argument("source", help="a folder tree of DICOM series (any layout) and NIfTI/NRRD/MHD files, or a PACS: "
                   "dicomweb+http://host:port/prefix")
    p.add_argument("--results", required=True, metavar="FILE.sqlite", help="the results (created, or resumed: screened series are skipped)")
    p.add_argument("--workers", type=int, default=1, help="series screened at once (default: 1)")
    p.add_argument("--engine", default="local", choices=("local", "ray"), help="a local process pool (default) or Ray")
    p.add_argument("--address", metavar="ADDR", help="with --engine ray: the cluster (default: start a local one)")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH", help="detector (default: the bundled one)")
    p.add_argument("--threshold", type=probability, default=None, help="one threshold for every candidate (default: the model's own)")
    p.add_argument("--trust", metavar="PEM", help="judge the signers of signed series by these certificates")
    p.set_defaults(func=cmd_audit)

    p = add("audit-report", "an audit's results as an HTML page (flagged first, score histogram) and CSV")
    p.add_argument("results", metavar="FILE.sqlite")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--reports", action="store_true", help="screen each flagged series again for its own HTML report, linked from the page")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH", help="with --reports: the detector (default: the bundled one)")
    p.set_defaults(func=cmd_audit_report)

    p = add("sign", "add a DICOM Digital Signature (PS3.15 Base RSA profile) to each instance; nothing else in it changes")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders (any depth)")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="the signer's RSA private key (PEM, unencrypted)")
    p.add_argument("--cert", required=True, metavar="CERT.pem", help="the signer's X.509 certificate (PEM), embedded in each signature")
    p.add_argument("--out", required=True, metavar="DIR", help="where the signed files go (a folder input keeps its layout); never overwrites")
    p.add_argument("--mac", default="SHA256", choices=("SHA256", "SHA384", "SHA512"), help="MAC algorithm (default: SHA256)")
    p.set_defaults(func=cmd_sign)

    p = add("verify", "check the DICOM Digital Signatures of each instance: unsigned, valid or invalid, and why")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders (any depth)")
    p.add_argument("--trust", metavar="PEM", help="trusted certificates (the signers', or the CAs that issued them)")
    p.add_argument("--json", metavar="FILE", help="write the result JSON here (- for stdout)")
    p.set_defaults(func=cmd_verify)

    p = add("train", "train a model from a YAML config and/or flags (flags override it); the resolved config is saved")
    p.add_argument("--config", metavar="FILE", help="YAML config, e.g. configs/tamper3d.yaml or configs/paper-cnn.yaml")
    p.add_argument("--data", metavar="DIR", help="ImageFolder dataset (classifier task)")
    p.add_argument("--model", metavar="NAME", help="classifier name (see `ctguard list-models`)")
    p.add_argument("--out", default="runs/train", metavar="DIR", help="run folder (default: runs/train)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int, default=None)
    p.add_argument("--image-size", dest="image_size", type=int, default=None, help="override the model's input size")
    p.add_argument("--patience", type=int, default=None, help="early stopping patience in epochs (0: off)")
    p.add_argument("--unfreeze", type=int, default=None, metavar="N", help="fine-tune the last N backbone blocks (-1: all)")
    p.add_argument("--weights", metavar="FILE", default=None, help="ImageNet state dict for the backbone (offline transfer learning)")
    p.add_argument("--no-pretrained", action="store_true", help="do not try to fetch ImageNet weights")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.set_defaults(func=cmd_train)

    p = add("evaluate", "metrics, confusion matrix, ROC and report.md of a classifier on a held-out split")
    p.add_argument("--model", required=True, metavar="CKPT", help="best.pt of a training run")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder dataset")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None, metavar="DIR", help="default: eval-SPLIT beside the checkpoint")
    p.set_defaults(func=cmd_evaluate)

    p = add("compare", "train and evaluate several classifiers on one split; the paper's tables side by side")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder dataset")
    p.add_argument("--models", default="paper-cnn,vgg16,mobilenet_v2,inception_v3,resnet50", help="comma-separated names")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--config", metavar="FILE", help="YAML training settings shared by all models")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int, default=None)
    p.add_argument("--image-size", dest="image_size", type=int, default=None)
    p.add_argument("--unfreeze", type=int, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--no-pretrained", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = add("export-slices", "a CT-GAN-layout dataset -> an ImageFolder dataset (train/val/test by patient)")
    p.add_argument("dataset", help="CT-GAN dataset root (Kaggle or UCI layout, real or simulated)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create (must not exist)")
    p.add_argument("--mode", default="slice", choices=("slice", "patch"), help="whole labelled slices (paper) or crops")
    p.add_argument("--classes", default="binary", choices=("binary", "ctgan"), help="real/fake or TB/TM/FB/FM")
    p.add_argument("--window", default="-1000,400", metavar="LO,HI", help="HU window (default: lung, -1000,400)")
    p.add_argument("--patch", type=int, default=64, metavar="PX", help="crop size in pixels (patch mode)")
    p.add_argument("--negatives", type=int, default=0, metavar="N", help="untouched-lung slices or crops per TB/TM scan (default: 0)")
    p.add_argument("--bits", type=int, default=8, choices=(8, 16), help="PNG bit depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-missing", action="store_true", help="skip label rows whose scan folder is missing")
    p.add_argument("--test-patients", default=None, metavar="ID,...", help="put these patients in test/ (e.g. another scanner's)")
    p.set_defaults(func=cmd_export_slices)

    p = add("list-models", "the registered 2D classifiers and their input sizes")
    p.set_defaults(func=cmd_list_models)

    p = add("predict", "label and probability for each image with a trained classifier")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPG/DICOM slices")
    p.add_argument("--model", default=None, metavar="CKPT", help="best.pt of a training run")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the results as CSV")
    p.set_defaults(func=cmd_predict)

    p = add("serve", "the web page and REST API (binds to 127.0.0.1 unless told otherwise)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="scans screened at once (default: 1)")
    p.add_argument("--queue", type=int, default=4, help="uploads that may wait for a worker before 429 (default: 4)")
    p.add_argument("--max-upload-mb", type=float, default=2048, help="largest upload in MB (default: 2048)")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH", help="detector (default: the bundled one)")
    p.add_argument("--users", metavar="FILE", help="require a login: the users file of `ctguard users add` (needed off loopback)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (needed off loopback)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--retain", type=float, default=24.0, metavar="HOURS", help="delete a job's results this long after (default: 24)")
    p.add_argument("--audit-log", metavar="FILE", help="JSON lines of every upload, view, deletion and refused login "
                   "(default: audit.jsonl in the server's work folder)")
    p.set_defaults(func=cmd_serve)

    p = add("users", "manage the web page's users file: hashed passwords and API tokens")
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("name", nargs="?", help="user name (add, remove)")
    p.add_argument("--users", required=True, metavar="FILE", help="the users file (created with mode 0600)")
    p.add_argument("--token", action="store_true", help="add: make a new API token (printed once)")
    p.add_argument("--password", action="store_true", help="add with --token: set a password too (prompted)")
    p.add_argument("--password-stdin", action="store_true", help="add: read the password from the first line of stdin")
    p.set_defaults(func=cmd_users)

    p = add("node", "a DICOM node (C-STORE SCP) that screens every CT series before forwarding it to the PACS")
    p.add_argument("--ae-title", default="CTGUARD", help="this node's AE title (default: CTGUARD)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=11112, help="port (default: 11112)")
    p.add_argument("--forward", metavar="AE@HOST:PORT", help="the PACS to forward screened series to")
    p.add_argument("--on-tampered", choices=("hold", "forward"), default="hold",
                   help="hold a tampered series in quarantine (default) or forward it and alert")
    p.add_argument("--send-results", action="store_true",
                   help="forward each series' results as DICOM (its SR, and SEG when tampered) after it; a held series keeps them in quarantine")
    p.add_argument("--on-error", choices=("forward", "hold"), default="forward",
                   help="a CT series that cannot be screened (e.g. no lungs in view): forward (default) or hold")
    p.add_argument("--on-late", choices=("hold", "screen"), default="hold",
                   help="instances of a series that arrive after it was decided (the sender paused longer than --settle): "
                        "hold them in quarantine (default) or screen them on their own")
    p.add_argument("--spool", default="ctguard-spool", metavar="DIR", help="spool, quarantine and audit log (default: ./ctguard-spool)")
    p.add_argument("--settle", type=float, default=5.0, metavar="S", help="a series is complete after S seconds without a new instance")
    p.add_argument("--cross-check", type=float, default=600.0, metavar="S",
                   help="cross-check each CT series against its study's other series the node received in the last S seconds "
                        "(a forwarded series' instances are kept that long in SPOOL/recent/; 0: no cross-check, nothing kept; default 600)")
    p.add_argument("--study-settle", type=float, default=None, metavar="S",
                   help="a screened series is forwarded once its study has had no new instance for S seconds, so that the "
                        "study's later series are cross-checked against it before it leaves (0: forward at once; default 30)")
    p.add_argument("--allow", metavar="AE,...", help="accept associations only from these calling AE titles")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH", help="detector (default: the bundled one)")
    p.add_argument("--threshold", type=probability, default=None, help="one threshold for every candidate (default: the model's own)")
    p.add_argument("--workers", type=int, default=2, help="series screened and forwarded at once (default: 2)")
    p.add_argument("--associations", type=int, default=4, help="parallel associations forwarding one series (default: 4)")
    p.add_argument("--sign", nargs=2, metavar=("KEY", "CERT"), help="sign every instance on arrival (DICOM Digital Signature, "
                   "Base RSA profile) with this PEM key and certificate, before screening and forwarding")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS: this node's certificate")
    p.add_argument("--tls-key", metavar="PEM", help="TLS: its private key")
    p.add_argument("--tls-ca", metavar="PEM", help="TLS: require client certificates signed by this CA")
    p.add_argument("-d", "--debug", action="store_true", help="debug logging (pynetdicom's too)")
    p.set_defaults(func=cmd_node)

    p = add("demo", "the main job on an embedded default: a phantom scan, tampered, screened")
    p.add_argument("--out", default="ctguard-demo", help="output folder (default: ./ctguard-demo)")
    p.add_argument("--seed", type=int, default=2026, help="phantom and edit seed (default: 2026, a phantom no detector was trained on)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)], format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"ctguard {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in TRAINING_MODULES:
            raise
        # Screening runs without PyTorch (on the bundled ONNX detectors); training and the 2D study do not.
        print(f"ctguard {args.command}: error: this command needs {e.name}, which is not installed: pip install 'ctguard[train]'",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctguard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as e:
        if not stdout_closed():
            return failed(args, e)
        # The reader of our output has gone (``ctguard info scan | head -1``): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the interpreter's last flush is quiet too
        return 141  # 128 + SIGPIPE
    except Exception as e:
        return failed(args, e)


def stdout_closed() -> bool:
    """Whether standard output's reader has gone: a pipe whose read end is closed polls as an error
    (a BrokenPipeError from a socket, say to a PACS, is a failure like any other)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file behind stdout
        return False


def failed(args: argparse.Namespace, e: Exception) -> int:
    """One line for users; the traceback with -vv."""
    if args.verbose >= 2:
        raise e
    print(f"ctguard {args.command}: failed: {e.__class__.__name__}: {e} (run with -vv for details)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
