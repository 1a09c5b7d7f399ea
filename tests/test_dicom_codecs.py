"""Compressed transfer syntaxes real scanners send, and multi-frame enhanced CT.

pydicom can encode RLE Lossless and (with pylibjpeg-openjpeg) JPEG 2000 Lossless itself. It cannot
encode JPEG Lossless (process 14, the syntax most CT scanners use), so this file carries a small
encoder for it, written from ITU-T T.81 Annex H; decoding then goes through pylibjpeg-libjpeg, as it
would for a real scanner's file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from ctguard import io

CODE_BITS = 5  # every difference category 0..16 gets a 5-bit Huffman code: codes 0..16


def _jpeg_lossless(frame: np.ndarray) -> bytes:
    """Encodes a 16-bit frame as JPEG Lossless, non-hierarchical, first-order prediction (SV1)."""
    rows, cols = frame.shape
    x = frame.astype(np.uint16).astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << 15
    pred[0, 1:] = x[0, :-1]  # first row: left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the one above
    pred[1:, 1:] = x[1:, :-1]  # predictor 1: left neighbour
    diff = (x - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff)  # -32767..32768
    ssss = np.where(diff == 0, 0, np.floor(np.log2(np.abs(diff).clip(1))).astype(np.int64) + 1)
    ssss = np.where(diff == 32768, 16, ssss)
    extra = np.where(diff < 0, diff - 1, diff) & ((1 << ssss) - 1)
    extra = np.where(ssss == 16, 0, extra)  # category 16 carries no extra bits
    nextra = np.where(ssss == 16, 0, ssss)
    bits = []
    for code, value, n in zip(ssss.ravel(), extra.ravel(), nextra.ravel()):
        bits.append(format(int(code), f"0{CODE_BITS}b"))
        if n:
            bits.append(format(int(value), f"0{int(n)}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad with ones
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)  # byte stuffing
    counts = [0] * 16
    counts[CODE_BITS - 1] = 17
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sof = bytes([16]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0; Ss = predictor 1; Se = 0; Ah/Al = 0

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    return b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(data) + b"\xff\xd9"


def _compress_series(src: Path, dst: Path, syntax) -> None:
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if syntax == JPEGLosslessSV1:
            ds.PixelData = encapsulate([_jpeg_lossless(ds.pixel_array.view(np.uint16))])
            ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        else:
            ds.compress(syntax)
        ds.save_as(f, enforce_file_format=True)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEG2000Lossless, RLELossless], ids=["jpeg-lossless", "jpeg2000", "rle"])
def test_compressed_series_reads_identically(small_chest, tmp_path, syntax):
    small = small_chest.resampled((8.0, 7.2, 7.2))  # quick to encode in pure Python
    io.write_series(small, tmp_path / "plain")
    _compress_series(tmp_path / "plain", tmp_path / "packed", syntax)
    assert pydicom.dcmread(next((tmp_path / "packed").glob("*.dcm"))).file_meta.TransferSyntaxUID == syntax
    plain = io.read(tmp_path / "plain")
    packed = io.read(tmp_path / "packed")
    assert packed.meta["transfer_syntax"] == str(syntax)
    assert np.array_equal(packed.hu, plain.hu)
    assert plain.hu.min() < -900 and plain.hu.max() > 300  # air and bone survive: the full signed range
    assert packed.spacing == pytest.approx(plain.spacing)


def test_real_slices_through_jpeg_lossless(real_series, tmp_path):
    """Two real Siemens slices (signed stored values), JPEG Lossless encoded, decode bit-exactly."""
    src = real_series["A0002-B40f"]
    files = sorted(src.glob("*.dcm"))[14:16]
    (tmp_path / "plain").mkdir()
    for f in files:
        shutil.copy(f, tmp_path / "plain" / f.name)
    _compress_series(tmp_path / "plain", tmp_path / "packed", JPEGLosslessSV1)
    plain, packed = io.read(tmp_path / "plain"), io.read(tmp_path / "packed")
    assert packed.shape == (2, 512, 512)
    assert np.array_equal(packed.hu, plain.hu)


@pytest.mark.parametrize("syntax,written", [(RLELossless, RLELossless), (JPEG2000Lossless, JPEG2000Lossless),
                                            (JPEGLosslessSV1, ExplicitVRLittleEndian)], ids=["rle", "jpeg2000", "jpeg-lossless"])
def test_write_back_over_a_compressed_source(small_chest, tmp_path, syntax, written):
    """A compressed source is written back with the changed pixels encoded again in its own syntax
    where pydicom encodes it losslessly, else uncompressed; the pixels read back are exactly the
    changed ones, and every other element keeps its value (the UIDs among them)."""
    small = small_chest.resampled((8.0, 7.2, 7.2))
    io.write_series(small, tmp_path / "plain")
    _compress_series(tmp_path / "plain", tmp_path / "packed", syntax)
    vol = io.read(tmp_path / "packed")
    edited = vol.hu.copy()
    edited[2:4, 5:9, 6:10] += 400.0
    paths = io.write_back(vol.with_hu(edited), tmp_path / "out")
    back = io.read(tmp_path / "out")
    assert np.array_equal(back.hu, edited) and not np.array_equal(back.hu, vol.hu)
    for src, dst in zip(vol.meta["files"], paths):
        a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
        assert b.file_meta.TransferSyntaxUID == written
        assert b.SOPInstanceUID == a.SOPInstanceUID == b.file_meta.MediaStorageSOPInstanceUID
        kept = [e.tag for e in a if e.tag != 0x7FE00010]
        assert kept and all(a[t].value == b[t].value for t in kept)


def _enhanced_ct(vol, path: Path, syntax=ExplicitVRLittleEndian, reverse: bool = True) -> None:
    """Writes ``vol`` as one Enhanced CT Image Storage file; frames in reverse z order, stored as
    unsigned values with a rescale in the shared functional groups."""
    stored = np.rint(vol.hu + 1024).astype(np.uint16)
    order = list(range(vol.shape[0]))[::-1] if reverse else list(range(vol.shape[0]))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "MF"
    ds.Rows, ds.Columns = vol.shape[1:]
    ds.NumberOfFrames = vol.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    measures = Dataset()
    measures.PixelSpacing = [vol.spacing[1], vol.spacing[2]]
    measures.SliceThickness = vol.spacing[0]
    orient = Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orient]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for z in order:
        plane = Dataset()
        plane.ImagePositionPatient = [float(v) for v in vol.voxel_to_world((z, 0, 0))]
        group = Dataset()
        group.PlanePositionSequence = [plane]
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = stored[order].tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless], ids=["plain", "rle"])
def test_enhanced_multiframe_ct(small_chest, tmp_path, syntax):
    path = tmp_path / "enhanced.dcm"
    _enhanced_ct(small_chest, path, syntax)
    vol = io.read(path)
    assert vol.meta["kind"] == "dicom-file"
    assert vol.meta["frames"] == small_chest.shape[0]
    assert vol.shape == small_chest.shape
    # Frames come back in ascending z whatever their order in the file, with the rescale applied.
    assert np.array_equal(vol.hu, np.rint(small_chest.hu + 1024) - 1024)
    assert vol.spacing == pytest.approx(small_chest.spacing)
    assert vol.origin == pytest.approx(small_chest.origin, abs=1e-4)
