"""Two more real chest CT scans with segmented lung tumours, for training and held-out tests.

Usage: python benchmarks/fetch_extra_ct.py [--out runs/extra-ct]

PyRadiomics (BSD-3-Clause, Copyright 2017 Harvard Medical School) ships its test cases in its source
distribution on PyPI: ``data/lung1_image.nrrd`` (48 slices of 5 mm, 0.570 mm pixels) and
``data/lung2_image.nrrd`` (61 slices of 5 mm, 0.627 mm pixels), each with a label map of one
tumour (``lung1_label.nrrd``, ``lung2_label.nrrd``). The package does not say which collection the
scans come from. This script downloads that source distribution (34 MB, pyradiomics 3.1.0, checked
against its SHA-256), and writes the four files to ``--out``; nothing else is kept and nothing is
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

PACKAGE, VERSION = "pyradiomics", "3.1.0"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
SHA256 = "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4"
FILES = [f"{case}_{part}.nrrd" for case in ("lung1", "lung2") for part in ("image", "label")]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "runs" / "extra-ct"


def sdist_url() -> str:
    """The source distribution's download address, from PyPI's JSON API."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{PACKAGE}/json", timeout=60) as r:
        releases = json.load(r)["releases"]
    for f in releases.get(VERSION, []):
        if f["filename"] == SDIST:
            return f["url"]
    raise SystemExit(f"PyPI lists no {SDIST}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    out = Path(args.out)
    if all((out / name).is_file() for name in FILES):
        print(f"{out}: already there")
        return
    try:
        with urllib.request.urlopen(sdist_url(), timeout=300) as r:
            blob = r.read()
    except OSError as e:
        sys.exit(f"cannot download {SDIST} from PyPI ({e}); this needs internet access to pypi.org")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SHA256:
        sys.exit(f"{SDIST}: SHA-256 {digest}, expected {SHA256}; not extracted")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for name in FILES:
            member = tar.getmember(f"{PACKAGE}-{VERSION}/data/{name}")  # a fixed name: no path from the archive is used
            data = tar.extractfile(member).read()
            tmp = out / f".{name}.partial"
            tmp.write_bytes(data)
            tmp.replace(out / name)
            print(f"{out / name}: {len(data) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
