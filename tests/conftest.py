from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LUNG_PET_CT = SHARED / "lung-pet-ct-dx"
CTGAN_LABELS = SHARED / "ctgan-labels"
LIDC = SHARED / "lidc-idri"
SERIES = {
    "A0001-L": LUNG_PET_CT / "Lung-PET-CT-Dx/Lung_Dx-A0001/04-04-2007-NA-Chest-07990/2.000000-5mm-40805",
    "A0001-B": LUNG_PET_CT / "Lung-PET-CT-Dx/Lung_Dx-A0001/04-04-2007-NA-Chest-07990/3.000000-5mm-41315",
    "A0002-B70f": LUNG_PET_CT / "Lung-PET-CT-Dx/Lung_Dx-A0002/04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834/2.000000-ThoraxRoutine  8.0.0  B70f-62919",
    "A0002-B40f": LUNG_PET_CT / "Lung-PET-CT-Dx/Lung_Dx-A0002/04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834/3.000000-ThoraxRoutine  8.0.0  B40f-10983",
}


def _require_shared() -> None:
    if not LUNG_PET_CT.is_dir():
        msg = f"shared data not found at {SHARED} (CI always has it; a fresh clone may not)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def lung_pet_ct() -> Path:
    _require_shared()
    return LUNG_PET_CT


@pytest.fixture(scope="session")
def real_series() -> dict[str, Path]:
    _require_shared()
    return SERIES


@pytest.fixture(scope="session")
def lidc() -> Path:
    """LIDC-IDRI's four patients (JPEG 2000 series, nodule label maps, three LIDC XML files)."""
    if not LIDC.is_dir():
        _require_shared()
        pytest.skip(f"{LIDC} is not there")
    return LIDC


@pytest.fixture(scope="session")
def ctgan_labels() -> Path:
    if not CTGAN_LABELS.is_dir():
        _require_shared()
    return CTGAN_LABELS


@pytest.fixture(scope="session")
def small_chest():
    """A small phantom chest (fast) with one genuine solid nodule in the right lung."""
    from ctguard.data.phantom import make_chest

    return make_chest((40, 96, 96), (4.0, 3.6, 3.6), seed=3, nodules=[{"fraction": (0.5, 0.45, 0.3), "diameter_mm": 14, "kind": "solid"}])


@pytest.fixture(scope="session")
def mini_dataset(tmp_path_factory):
    """A miniature simulated CT-GAN dataset (Kaggle layout) from two small phantoms, one with a tumour."""
    from ctguard.tamper.simulate import phantom_source, simulate

    sources = [phantom_source(11, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6), with_tumour=True),
               phantom_source(12, shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6), with_tumour=False)]
    root = tmp_path_factory.mktemp("mini") / "ctgan"
    simulate(sources, root, inject=2, remove=2, seed=5, progress=False)
    return root


@pytest.fixture(scope="session")
def tampered(tmp_path_factory):
    """A phantom (unseen seed) with one injection and one removal, written as DICOM, and its clean
    twin, at the clinical set-up of ``ctguard demo`` (2.5 mm slices, 0.78 mm pixels): the kind of
    scan the bundled detector is built and measured for, where its verdict does not hang on one
    bundle's scores (at the quick 1.9 mm set-up the stage's resampling trace reads almost nothing)."""
    from ctguard import io
    from ctguard.tamper.simulate import DEMO_SHAPE, DEMO_SPACING, phantom_source, tampered_phantom

    root = tmp_path_factory.mktemp("screen")
    vol, edits = tampered_phantom(4242, 1, DEMO_SHAPE, DEMO_SPACING)
    io.write_series(vol, root / "tampered", uid_seed="t")
    clean = phantom_source(4343, shape=DEMO_SHAPE, spacing=DEMO_SPACING, with_tumour=False).volume
    io.write_series(clean, root / "clean", uid_seed="c")
    return root, [e.to_dict() for e in edits], vol.spacing
