"""Screening results as DICOM objects in the screened study, for the PACS and its viewers.

- A Comprehensive 3D SR following TID 1500 (Measurement Report): one image-level group with the
  verdict and the scan's tamper score, then one group per finding with its kind, its tamper
  probability, its centre as a 3D point in the series' frame of reference and the source image
  (the slice) it lies on. It references every screened instance.
- A fractional (probability) DICOM Segmentation of the tamper probability on the series' own
  grid, for a viewer to overlay.

Both are made by highdicom, in the source study (patient and study attributes copied), each in a
new series. The kinds and measurements use a private coding scheme, ``99CTGUARD``:

| code | meaning |
| --- | --- |
| ``TAMPER-VERDICT`` | Tamper verdict (a scan's qualitative evaluation) |
| ``CLEAN`` / ``TAMPERED`` | the verdict's values |
| ``TAMPER-KIND`` | Kind of edit (a finding's qualitative evaluation) |
| ``INJECTED`` / ``REMOVED`` | Injected lesion / Removed lesion (in-painted tissue) |
| ``SIGNATURE-INVALID`` | Instances whose DICOM digital signature fails (a finding's kind) |
| ``TAMPER-PROB`` | Tamper probability (a finding's, or the scan's highest) |
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctguard import __version__
from ctguard.errors import InputError
from ctguard.volume import Volume

SCHEME = "99CTGUARD"
SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9902


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, SCHEME, meaning)


CODES = {
    "verdict": ("TAMPER-VERDICT", "Tamper verdict"),
    "clean": ("CLEAN", "Clean"),
    "tampered": ("TAMPERED", "Tampered"),
    "kind": ("TAMPER-KIND", "Kind of edit"),
    "injected": ("INJECTED", "Injected lesion"),
    "removed": ("REMOVED", "Removed lesion (in-painted tissue)"),
    "signature": ("SIGNATURE-INVALID", "Instances whose digital signature fails"),
    "probability": ("TAMPER-PROB", "Tamper probability"),
}


def code(name: str):
    return _code(*CODES[name])


def source_datasets(vol: Volume, with_pixels: bool = False) -> list:
    """The screened series' instances, in the volume's slice order.

    Raises:
        InputError: the volume was not read from a DICOM series.
    """
    import pydicom

    files = vol.meta.get("files") or []
    if vol.meta.get("kind") != "dicom-series" or len(files) != vol.shape[0]:
        raise InputError("DICOM results need a DICOM series as input (this is not one)", vol.meta.get("root"))
    return [pydicom.dcmread(f, stop_before_pixels=not with_pixels) for f in files]


def write_sr(result: dict, vol: Volume, out_dir: str | Path, sources: list | None = None) -> Path:
    """The TID 1500 SR of a screening result; returns its path."""
    import highdicom as hd
    from highdicom.sr import (AlgorithmIdentification, CodedConcept, CoordinatesForMeasurement3D, DeviceObserverIdentifyingAttributes,
                              Measurement, MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
                              QualitativeEvaluation, SourceImageForMeasurement, SourceImageForMeasurementGroup, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    sources = sources or source_datasets(vol)
    first = sources[0]
    model = result["model"]
    algorithm = AlgorithmIdentification(name=f"ctguard {model['name']}", version=str(model["version"]))
    unit = CodedConcept("1", "UCUM", "no units")
    observer = ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name="ctguard", manufacturer_name="ctguard", model_name=f"{model['name']} {model['version']}"))
    scan = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="scan"),
        algorithm_id=algorithm,
        qualitative_evaluations=[QualitativeEvaluation(code("verdict"), code(result["verdict"]))],
        measurements=[Measurement(code("probability"), float(result["score"]), unit, algorithm_id=algorithm)],
    )
    groups = [scan]
    for i, f in enumerate(result["findings"]):
        z = int(np.clip(np.rint(f["voxel"][0]), 0, len(sources) - 1))
        image = sources[z]
        point = CoordinatesForMeasurement3D("POINT", np.asarray([f["world_mm"]], dtype=float), str(first.FrameOfReferenceUID))
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"finding {i + 1}"),
            finding_type=code(f["kind"]),
            algorithm_id=algorithm,
            qualitative_evaluations=[QualitativeEvaluation(code("kind"), code(f["kind"]))],
            measurements=[Measurement(code("probability"), float(f["score"]), unit, algorithm_id=algorithm, referenced_coordinates=[point],
                                      referenced_images=[SourceImageForMeasurement(image.SOPClassUID, image.SOPInstanceUID)])],
            source_images=[SourceImageForMeasurementGroup.from_source_image(image)],
        ))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CodedConcept("25045-6", "LN", "CT unspecified body region"),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources, content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="ctguard", is_complete=True, series_description="ctguard tamper screening",
        software_versions=__version__,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ctguard-sr.dcm"
    sr.save_as(path)
    return path


def write_seg(result: dict, vol: Volume, probability: np.ndarray, out_dir: str | Path, sources: list | None = None) -> Path:
    """A fractional Segmentation of the tamper probability (``probability``, on the series' voxels),
    RLE Lossless (the map is zero outside the lungs and the places scored: LIDC-IDRI-0001's is 4.8 MB
    instead of 35 MB, and every PACS decodes it); returns its path."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import RLELossless

    sources = sources or source_datasets(vol, with_pixels=True)
    if probability.shape != vol.shape:
        raise ValueError(f"the probability map is {probability.shape}, the series {vol.shape}")
    model = result["model"]
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="tamper probability", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=code("tampered"), algorithm_type="AUTOMATIC",
        algorithm_identification=hd.AlgorithmIdentificationSequence(name=f"ctguard {model['name']}", family=codes.DCM.ArtificialIntelligence,
                                                                    version=str(model["version"])),
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.clip(probability, 0.0, 1.0).astype(np.float32), segmentation_type="FRACTIONAL",
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="ctguard", manufacturer_model_name=f"{model['name']} {model['version']}", software_versions=__version__,
        device_serial_number="0", series_description="ctguard tamper probability", omit_empty_frames=False,
        transfer_syntax_uid=RLELossless,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ctguard-seg.dcm"
    seg.save_as(path)
    return path


def read_sr(path: str | Path) -> dict:
    """A ctguard SR read back: its verdict, score and findings (kind, probability, world point, source image)."""
    import highdicom as hd

    sr = hd.sr.srread(str(path))
    groups = sr.content.get_image_measurement_groups()  # TID 1501 groups, in order
    out = {"verdict": None, "score": None, "findings": []}
    meaning = {v[0]: k for k, v in CODES.items()}
    for g in groups:
        kind = next((meaning.get(q.value.value) for q in g.get_qualitative_evaluations()), None)
        m = g.get_measurements()[0]
        if g.tracking_identifier == "scan":
            out["verdict"], out["score"] = kind, float(m.value)
            continue
        coords = m.referenced_coordinates or []
        images = m.referenced_images or []
        out["findings"].append({"kind": kind, "score": float(m.value),
                                "world_mm": [float(v) for v in coords[0].value[0]] if coords else None,
                                "source_sop_instance_uid": str(images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) if images else None})
    return out
