"""The CT-GAN dataset ("Deepfakes: Medical Image Tamper Detection"), in both published layouts.

Kaggle: ``CT_Scans/EXP1_blind/<uuid>/<slice>.dcm``, ``CT_Scans/EXP2_open/<uuid>/...`` with
``labels_exp1.csv``/``labels_exp2.csv`` at the root. UCI: ``Tampered Scans/Experiment 1 - Blind/<uuid>/...``
with ``Tampered Scans/labels_exp{1,2}.csv``. ctguard's simulator writes the Kaggle layout plus a
``manifest.json`` that names each scan's source patient.
"""

from __future__ import annotations

import csv
import io as _io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ctguard.errors import InputError

CLASSES = ("TB", "TM", "FB", "FM")
TAMPERED = {"FB": "removed", "FM": "injected"}
KAGGLE_DIRS = {1: "CT_Scans/EXP1_blind", 2: "CT_Scans/EXP2_open"}
UCI_DIRS = {1: "Tampered Scans/Experiment 1 - Blind", 2: "Tampered Scans/Experiment 2 - Open"}


@dataclass
class LabelRow:
    type: str
    uuid: str
    slice: int
    y: int
    x: int


@dataclass
class Scan:
    """One scan of the dataset: its class and labelled places ``(slice, y, x)`` (none for TB)."""

    uuid: str
    experiment: int
    label: str
    locations: list[tuple[int, int, int]]
    folder: Path | None
    patient: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tampered(self) -> bool:
        return self.label in TAMPERED


def read_labels(path: str | Path) -> list[LabelRow]:
    """Reads a CT-GAN labels CSV (``type,uuid,slice,x,y``; ``z`` accepted for ``slice``; CRLF ok).

    Raises:
        InputError: missing columns, an unknown type, or a non-integer coordinate (with its line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"cannot read labels ({e.strerror})", path) from None
    reader = csv.DictReader(_io.StringIO(text.replace("\r\n", "\n").replace("\r", "\n")))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    reader.fieldnames = fields
    if "z" in fields and "slice" not in fields:
        fields[fields.index("z")] = "slice"
    missing = {"type", "uuid", "slice", "x", "y"} - set(fields)
    if missing:
        raise InputError(f"labels file lacks column(s) {', '.join(sorted(missing))} (expected type,uuid,slice,x,y)", path)
    rows = []
    for line, rec in enumerate(reader, start=2):
        if not any((v or "").strip() for v in rec.values()):
            continue
        kind = (rec["type"] or "").strip().upper()
        if kind not in CLASSES:
            raise InputError(f"line {line}: unknown type {rec['type']!r} (expected one of {', '.join(CLASSES)})", path)
        try:
            rows.append(LabelRow(kind, str(rec["uuid"]).strip(), int(float(rec["slice"])), int(float(rec["y"])), int(float(rec["x"]))))
        except (TypeError, ValueError):
            raise InputError(f"line {line}: slice, x and y must be integers", path) from None
    return rows


def scans_from_labels(rows: list[LabelRow], experiment: int) -> dict[str, Scan]:
    """Groups label rows by uuid into scans (one class per scan; TB rows carry no place)."""
    scans: dict[str, Scan] = {}
    for r in rows:
        scan = scans.setdefault(r.uuid, Scan(r.uuid, experiment, r.type, [], None, patient=r.uuid))
        if scan.label != r.type:
            raise InputError(f"uuid {r.uuid} has rows of two classes ({scan.label} and {r.type}) in experiment {experiment}")
        if r.type != "TB":
            loc = (r.slice, r.y, r.x)
            if loc not in scan.locations:
                scan.locations.append(loc)
    return scans


def find_layout(root: str | Path) -> tuple[str, dict[int, tuple[Path, Path]]]:
    """Which layout a dataset root has: ``("kaggle" | "uci", {experiment: (scans_dir, labels_csv)})``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("is not a folder", root)
    if root.name == "Tampered Scans" and (root / UCI_DIRS[1].split("/")[1]).is_dir():
        return find_layout(root.parent)  # the UCI sub-folder given instead of its parent
    for name, dirs, labels_at in (("kaggle", KAGGLE_DIRS, root), ("uci", UCI_DIRS, root / "Tampered Scans")):
        found = {}
        for exp, rel in dirs.items():
            csv_path = labels_at / f"labels_exp{exp}.csv"
            if csv_path.is_file():
                found[exp] = (root / rel, csv_path)
        if found:
            return name, found
    raise InputError("no CT-GAN dataset here: expected labels_exp1.csv with CT_Scans/ (Kaggle) or 'Tampered Scans/' (UCI)", root)


def _scan_shape(folder: Path) -> tuple[int, int, int] | None:
    import pydicom

    files = [p for p in folder.iterdir() if p.suffix.lower() == ".dcm"]
    if not files:
        return None
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return len(files), int(ds.Rows), int(ds.Columns)


def load_dataset(root: str | Path, ignore_missing: bool = False, check_bounds: bool = True) -> list[Scan]:
    """Loads a CT-GAN-layout dataset (published or simulated).

    Args:
        root: the dataset's root folder (either layout).
        ignore_missing: skip label uuids that have no scan folder instead of failing. Defaults to False.
        check_bounds: check every labelled place against its scan's size. Defaults to True.

    Returns:
        The scans, experiment 1 first, each with its class, places, folder and patient id
        (the uuid, or the source patient named in a simulator's ``manifest.json``).

    Raises:
        InputError: a uuid without a scan folder, or a label outside its scan.
    """
    root = Path(root)
    _, found = find_layout(root)
    patients = {}
    manifest = root / "manifest.json"
    if manifest.is_file():
        for s in json.loads(manifest.read_text()).get("scans", []):
            patients[(int(s.get("experiment", 1)), str(s["uuid"]))] = str(s.get("patient", s["uuid"]))
    out: list[Scan] = []
    for exp in sorted(found):
        scans_dir, csv_path = found[exp]
        for uuid, scan in scans_from_labels(read_labels(csv_path), exp).items():
            folder = scans_dir / uuid
            if not folder.is_dir():
                if ignore_missing:
                    continue
                raise InputError(f"uuid {uuid} of {csv_path.name} has no scan folder (use --ignore-missing to skip it)", folder)
            scan.folder = folder
            scan.patient = patients.get((exp, uuid), uuid)
            if check_bounds and scan.locations:
                shape = _scan_shape(folder)
                if shape is None:
                    raise InputError("scan folder has no .dcm files", folder)
                for z, y, x in scan.locations:
                    if not (0 <= z < shape[0] and 0 <= y < shape[1] and 0 <= x < shape[2]):
                        raise InputError(f"label {scan.label} at slice {z}, y {y}, x {x} is outside the scan {shape}", csv_path)
            out.append(scan)
    return out


def class_counts(rows: list[LabelRow]) -> Counter:
    return Counter(r.type for r in rows)
