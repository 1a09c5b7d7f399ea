"""Three more real chest CT scans from source distributions on PyPI, for training and held-out tests.

Usage: python benchmarks/fetch_extra_ct.py [--out runs/extra-ct]

- PyRadiomics (BSD-3-Clause, Copyright 2017 Harvard Medical School) ships its test cases in its
  source distribution: ``data/lung1_image.nrrd`` (48 slices of 5 mm, 0.570 mm pixels) and
  ``data/lung2_image.nrrd`` (61 slices of 5 mm, 0.627 mm pixels), each with a label map of one
  tumour (``lung1_label.nrrd``, ``lung2_label.nrrd``). The package does not say which collection
  the scans come from. (pyradiomics 3.1.0, 34 MB.)
- PlatiPy (Apache-2.0) ships one sample case in the source distribution of its 0.5.0.dev1 release:
  ``platipy/backend/sample/testcase.nii.gz``, patient LCTSC-Test-S1-101 of TCIA's Lung CT
  Segmentation Challenge 2017 (LCTSC, CC BY 3.0, doi:10.7937/K9/TCIA.2017.3r3fvz08; site S1, MD
  Anderson; the scanner is not stated): a radiotherapy planning chest CT of 130 slices of 3 mm,
  0.977 mm pixels, written here as ``lctsc_s1_101_image.nii.gz``. It has no tumour outline. (38 MB.)

Each source distribution is checked against its SHA-256 before anything is extracted; only the
named members are read from it (no path from the archive is used), and nothing else is kept or
committed to this repository. Training configs and ``eval_tamper3d.py --holdout lung1|lung2`` read
them from ``runs/extra-ct/``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

# (package, version, the sdist's SHA-256, {member inside the archive: file written})
SOURCES = [
    ("pyradiomics", "3.1.0", "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
     {f"data/{case}_{part}.nrrd": f"{case}_{part}.nrrd" for case in ("lung1", "lung2") for part in ("image", "label")}),
    ("platipy", "0.5.0.dev1", "0ab0874022e6d864d8cc6e42ecc8567149822b98bf4d834c0cd3ad09a4620dd1",
     {"platipy/backend/sample/testcase.nii.gz": "lctsc_s1_101_image.nii.gz"}),
]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "runs" / "extra-ct"


def sdist_url(package: str, version: str) -> str:
    """The source distribution's download address, from PyPI's JSON API."""
    sdist = f"{package}-{version}.tar.gz"
    with urllib.request.urlopen(f"https://pypi.org/pypi/{package}/json", timeout=60) as r:
        releases = json.load(r)["releases"]
    for f in releases.get(version, []):
        if f["filename"] == sdist:
            return f["url"]
    raise SystemExit(f"PyPI lists no {sdist}")


def fetch(package: str, version: str, sha256: str, members: dict[str, str], out: Path) -> None:
    sdist = f"{package}-{version}.tar.gz"
    try:
        with urllib.request.urlopen(sdist_url(package, version), timeout=300) as r:
            blob = r.read()
    except OSError as e:
        sys.exit(f"cannot download {sdist} from PyPI ({e}); this needs internet access to pypi.org")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        sys.exit(f"{sdist}: SHA-256 {digest}, expected {sha256}; not extracted")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for member, name in members.items():
            data = tar.extractfile(tar.getmember(f"{package}-{version}/{member}")).read()
            tmp = out / f".{name}.partial"
            tmp.write_bytes(data)
            tmp.replace(out / name)
            print(f"{out / name}: {len(data) / 1e6:.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    out = Path(args.out)
    for package, version, sha256, members in SOURCES:
        if all((out / name).is_file() for name in members.values()):
            print(f"{out}: {package}'s files already there")
            continue
        fetch(package, version, sha256, members, out)


if __name__ == "__main__":
    main()
