"""DICOM Digital Signatures (PS3.15 Annex C, Base RSA Digital Signature Profile): sign and verify.

A signature is one item of the Digital Signatures Sequence (FFFA,FFFA) and one of the MAC
Parameters Sequence (4FFE,0001), linked by their MAC ID Number. Its MAC is a hash (SHA-256 by
default) of a byte stream: every signable data element of the data set in ascending tag order,
encoded in the MAC Calculation Transfer Syntax (Explicit VR Little Endian, or the file's own
transfer syntax when its pixel data are encapsulated), then the elements of the signature's own
item except the certificate, the signature and any timestamp (PS3.3 C.12.1.1.3). Sequences and
items are encoded without their lengths and without item delimiters, each sequence closed by the
Sequence Delimitation tag; that is how DCMTK's ``dcmsign`` encodes them, and the tests check the
two against each other. Group lengths, Length to End, groups below 0008, the signature sequences
themselves, Data Set Trailing Padding and elements of VR UN are not signable.

Signing adds the two items and changes nothing else: the file is written back from the elements
as read (pydicom keeps an element it was not asked to decode as the bytes it read).
"""

from __future__ import annotations

import datetime as dt
import io
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pydicom.errors
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ctguard.errors import InputError

DIGITAL_SIGNATURES = 0xFFFAFFFA
MAC_PARAMETERS = 0x4FFE0001
PIXEL_DATA = 0x7FE00010
CERTIFICATE_TYPE = "X509_1993_SIG"
# Not part of the MAC of a signature item (PS3.3 C.12.1.1.3.1.2): the certificate, the signature, timestamps.
_NOT_IN_ITEM_MAC = {0x04000115, 0x04000120, 0x04000305, 0x04000310}
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
SIGNING_ALGORITHMS = ("SHA256", "SHA384", "SHA512")  # what ctguard signs with; it verifies any the platform hashes


def signable(tag: int) -> bool:
    group, element = tag >> 16, tag & 0xFFFF
    if element == 0 or group < 0x0008 or group == 0xFFFA:
        return False
    return tag not in (0x00080001, MAC_PARAMETERS, 0xFFFCFFFC, 0xFFFEE00D, 0xFFFEE0DD)


def _crypto_hash(name: str):
    """The ``cryptography`` hash of a MAC Algorithm defined term, or None where this platform has none."""
    from cryptography.hazmat.primitives import hashes

    from cryptography.exceptions import UnsupportedAlgorithm

    cls = {"SHA256": hashes.SHA256, "SHA384": hashes.SHA384, "SHA512": hashes.SHA512, "SHA1": hashes.SHA1, "MD5": hashes.MD5,
           "RIPEMD160": getattr(hashes, "RIPEMD160", None)}.get(name)
    if cls is None:
        return None
    try:
        hashes.Hash(cls())  # RIPEMD-160 is out of OpenSSL 3's default provider
    except UnsupportedAlgorithm:
        return None
    return cls()


# ------------------------------------------------------------------ the byte stream of the MAC


def _vr(ds: Dataset, elem: DataElement | RawDataElement) -> str:
    if elem.VR and " or " not in str(elem.VR):
        return str(elem.VR)
    if isinstance(elem, DataElement):
        return str(_resolved(ds, elem).VR)
    # Implicit VR on disk: the dictionary's VR, resolved as pydicom would, without decoding the element in ds.
    return str(_resolved(ds, convert_raw_data_element(elem, ds=ds)).VR)


def _resolved(ds: Dataset, elem: DataElement) -> DataElement:
    """An element whose dictionary VR is ambiguous ("OB or OW", "US or SS"), given its VR from the data set."""
    return correct_ambiguous_vr_element(elem, ds, True) if " or " in str(elem.VR) else elem


def _leaf_bytes(ds: Dataset, tag: int, vr: str, elem: DataElement | RawDataElement) -> bytes:
    if isinstance(elem, RawDataElement):  # as read (little endian: read_dicom refuses big-endian files)
        value = bytes(elem.value or b"")
    else:  # decoded (or changed) by someone: pydicom encodes it
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, _resolved(ds, elem if isinstance(elem, DataElement) else convert_raw_data_element(elem, ds=ds)))
        return fp.getvalue()
    group, number = tag >> 16, tag & 0xFFFF
    head = struct.pack("<HH", group, number) + vr.encode()
    head += (b"\0\0" + struct.pack("<I", len(value))) if vr in _LONG_VRS else struct.pack("<H", len(value))
    return head + value


def _encapsulated(tag: int, value: bytes) -> Iterable[bytes]:
    """Encapsulated pixel data: OB, no length; each item (offset table, fragments) as its tag and value."""
    yield struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"OB\0\0"
    stream = io.BytesIO(value)
    while True:
        head = stream.read(8)
        if len(head) < 8:
            break
        item_tag, length = struct.unpack("<II", head)
        if item_tag == 0xE0DDFFFE:  # sequence delimiter
            break
        yield head[:4] + stream.read(length)  # dcmsign: the item tag and the value, no length
    yield _SEQUENCE_END


def _dataset_stream(ds: Dataset, tags: Iterable[int] | None) -> Iterable[bytes]:
    wanted = None if tags is None else set(tags)
    for tag in sorted(int(t) for t in ds.keys()):
        if not signable(tag) or (wanted is not None and tag not in wanted):
            continue
        elem = ds.get_item(tag)
        vr = _vr(ds, elem)
        if vr == "UN":
            continue
        if vr == "SQ":
            items = (elem if isinstance(elem, DataElement) else convert_raw_data_element(elem, ds=ds)).value
            yield struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0"
            for item in items:
                yield _ITEM
                yield from _dataset_stream(item, None)
            yield _SEQUENCE_END
        elif tag == PIXEL_DATA and _is_encapsulated(elem):
            yield from _encapsulated(tag, bytes(elem.value))
        else:
            yield _leaf_bytes(ds, tag, vr, elem)


def _is_encapsulated(elem) -> bool:
    if isinstance(elem, RawDataElement):
        return elem.length == 0xFFFFFFFF
    return bool(getattr(elem, "is_undefined_length", False))


def mac_stream(ds: Dataset, signature_item: Dataset, tags: Iterable[int] | None = None) -> Iterable[bytes]:
    """The bytes a signature's MAC is computed over, in order (also what ``dcmsign --dump`` writes)."""
    yield from _dataset_stream(ds, tags)
    item_tags = [int(t) for t in signature_item.keys() if int(t) not in _NOT_IN_ITEM_MAC]
    yield from _dataset_stream(signature_item, item_tags)


def _digest(ds: Dataset, signature_item: Dataset, algorithm: str, tags: Iterable[int] | None) -> bytes:
    from cryptography.hazmat.primitives import hashes

    h = hashes.Hash(_crypto_hash(algorithm))
    for chunk in mac_stream(ds, signature_item, tags):
        h.update(chunk)
    return h.finalize()


def _mac_transfer_syntax(ds: Dataset) -> str:
    ts = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", Dataset()) else ExplicitVRLittleEndian
    return str(ts) if ts.is_encapsulated else ExplicitVRLittleEndian


# ------------------------------------------------------------------ keys and certificates


@dataclass
class Signer:
    """A private key and its certificate, loaded once (the node signs every instance with them)."""

    key: Any
    certificate: Any
    mac_algorithm: str = "SHA256"

    @classmethod
    def load(cls, key_path: str | Path, cert_path: str | Path, mac_algorithm: str = "SHA256",
             password: bytes | None = None) -> Signer:
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if mac_algorithm not in SIGNING_ALGORITHMS:
            raise InputError(f"MAC algorithm {mac_algorithm!r} is not one ctguard signs with: {', '.join(SIGNING_ALGORITHMS)}")
        try:
            key = load_pem_private_key(Path(key_path).read_bytes(), password=password)
        except FileNotFoundError:
            raise InputError("no such key file", key_path) from None
        except (ValueError, TypeError) as e:
            raise InputError(f"not a PEM private key ({e})", key_path) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise InputError("the Base RSA Digital Signature Profile needs an RSA key", key_path)
        cert = load_certificates(cert_path)[0]
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise InputError(f"the certificate is not the key's ({key_path})", cert_path)
        return cls(key, cert, mac_algorithm)

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()


def load_certificates(path: str | Path) -> list:
    """Every certificate in a PEM (or DER) file."""
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError("no such certificate file", path) from None
    try:
        certs = x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise InputError(f"not an X.509 certificate ({e})", path) from None
    if not certs:
        raise InputError("no certificate in the file", path)
    return certs


def _dicom_datetime(when: dt.datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S.%f%z")


def _parse_dicom_datetime(text: str) -> dt.datetime | None:
    text = str(text).strip()
    for fmt in ("%Y%m%d%H%M%S.%f%z", "%Y%m%d%H%M%S%z", "%Y%m%d%H%M%S.%f", "%Y%m%d%H%M%S"):
        try:
            when = dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
        return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    return None


# ------------------------------------------------------------------ signing


def _free_mac_id(ds: Dataset) -> int:
    used = set()
    for tag in (DIGITAL_SIGNATURES, MAC_PARAMETERS):
        if tag in ds:
            used |= {int(item.MACIDNumber) for item in ds[tag].value if "MACIDNumber" in item}
    return next(i for i in range(65536) if i not in used)


def sign_dataset(ds: Dataset, signer: Signer, when: dt.datetime | None = None) -> str:
    """Adds one signature over every signable element of ``ds`` (in place); returns its UID."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    when = when or dt.datetime.now(dt.timezone.utc)
    mac_id = _free_mac_id(ds)
    tags = [int(t) for t in sorted(ds.keys()) if signable(int(t)) and _vr(ds, ds.get_item(int(t))) != "UN"]
    item = Dataset()
    item.add_new(0x04000005, "US", mac_id)  # MAC ID Number
    item.add_new(0x04000100, "UI", generate_uid())  # Digital Signature UID
    item.add_new(0x04000105, "DT", _dicom_datetime(when))  # Digital Signature DateTime
    item.add_new(0x04000110, "CS", CERTIFICATE_TYPE)
    digest = _digest(ds, item, signer.mac_algorithm, tags)
    signature = signer.key.sign(digest, padding.PKCS1v15(), Prehashed(_crypto_hash(signer.mac_algorithm)))
    item.add_new(0x04000115, "OB", signer.certificate.public_bytes(serialization.Encoding.DER))  # Certificate of Signer
    item.add_new(0x04000120, "OB", signature)
    params = Dataset()
    params.add_new(0x04000005, "US", mac_id)
    params.add_new(0x04000010, "UI", _mac_transfer_syntax(ds))
    params.add_new(0x04000015, "CS", signer.mac_algorithm)
    params.add_new(0x04000020, "AT", [Tag(t) for t in tags])  # Data Elements Signed
    for tag, new in ((MAC_PARAMETERS, params), (DIGITAL_SIGNATURES, item)):
        if tag in ds:
            ds[tag].value.append(new)
        else:
            ds.add_new(tag, "SQ", Sequence([new]))
    return str(item[0x04000100].value)


def read_dicom(data: bytes | str | Path, name: str | None = None) -> Dataset:
    """A DICOM file (path or bytes) read for signing or verifying; a one-line error if it is not one."""
    label = name or (str(data) if not isinstance(data, bytes) else "instance")
    try:
        ds = pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else str(data), force=False)
    except FileNotFoundError:
        raise InputError("no such file", label) from None
    except pydicom.errors.InvalidDicomError:
        raise InputError("not a DICOM file (no DICM prefix and file meta information)", label) from None
    except Exception as e:  # pydicom raises several kinds for a truncated or corrupt file
        raise InputError(f"not a DICOM file ({e.__class__.__name__}: {e})", label) from None
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and not ts.is_little_endian:
        raise InputError("big-endian DICOM (a retired transfer syntax) cannot be signed or verified here", label)
    return ds


def signed_file(data: bytes | str | Path, signer: Signer, name: str | None = None) -> tuple[bytes, str]:
    """A DICOM file (bytes or path), signed: the same file with one more signature, and its UID."""
    ds = read_dicom(data, name)
    uid = sign_dataset(ds, signer)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue(), uid


def sign_bytes(data: bytes, signer: Signer, name: str = "instance") -> bytes:
    """A DICOM file's bytes, signed: the same file with one more signature."""
    return signed_file(data, signer, name)[0]


# ------------------------------------------------------------------ verifying


@dataclass
class SignatureCheck:
    """One signature of one instance."""

    uid: str
    status: str  # "valid" or "invalid"
    reason: str | None
    signer: str | None
    time: str | None
    mac_algorithm: str | None
    elements_signed: list[str] = field(default_factory=list)
    elements_not_covered: list[str] = field(default_factory=list)  # present now, not under this signature
    trusted: bool | None = None  # None: no trust store given

    def as_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "status": self.status, "reason": self.reason, "signer": self.signer, "time": self.time,
                "mac_algorithm": self.mac_algorithm, "trusted": self.trusted, "elements_signed": len(self.elements_signed),
                "elements_not_covered": self.elements_not_covered}


@dataclass
class InstanceCheck:
    path: str
    sop_instance_uid: str | None
    series_instance_uid: str | None
    status: str  # "unsigned", "valid" or "invalid"
    signatures: list[SignatureCheck]
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sop_instance_uid": self.sop_instance_uid, "series_instance_uid": self.series_instance_uid,
                "status": self.status, "reason": self.reason, "signatures": [s.as_dict() for s in self.signatures]}


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _unpadded_der(data: bytes) -> bytes:
    """A DER certificate as stored in OB: padded to an even length with one zero byte when odd."""
    if len(data) > 4 and data[0] == 0x30 and data[1] & 0x80:
        n = data[1] & 0x7F
        return data[: 2 + n + int.from_bytes(data[2 : 2 + n], "big")]
    return data


def _trusted(cert, trust: list) -> bool:
    for anchor in trust:
        if cert == anchor:
            return True
        try:
            cert.verify_directly_issued_by(anchor)
            return True
        except Exception:  # wrong issuer, bad signature, unsupported key: not this anchor
            continue
    return False


def verify_dataset(ds: Dataset, trust: list | None = None) -> list[SignatureCheck]:
    """Every signature of the data set's top level, each checked: MAC, certificate, trust."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    if DIGITAL_SIGNATURES not in ds:
        return []
    params = {int(p.MACIDNumber): p for p in (ds[MAC_PARAMETERS].value if MAC_PARAMETERS in ds else []) if "MACIDNumber" in p}
    present = [int(t) for t in ds.keys() if signable(int(t))]
    checks = []
    for item in ds[DIGITAL_SIGNATURES].value:
        uid = str(item.get(0x04000100).value) if 0x04000100 in item else "?"
        when_text = str(item[0x04000105].value) if 0x04000105 in item else None
        check = SignatureCheck(uid, "invalid", None, None, when_text, None)
        checks.append(check)
        try:
            cert = x509.load_der_x509_certificate(_unpadded_der(bytes(item[0x04000115].value)))
            check.signer = cert.subject.rfc4514_string()
        except (KeyError, ValueError) as e:
            check.reason = f"no readable certificate of the signer ({e.__class__.__name__})"
            continue
        mac_id = int(item.MACIDNumber) if "MACIDNumber" in item else None
        p = params.get(mac_id)
        if p is None:
            check.reason = f"no MAC parameters for MAC ID {mac_id}"
            continue
        check.mac_algorithm = str(p.get("MACAlgorithm", ""))
        tags = None
        if 0x04000020 in p:
            value = p[0x04000020].value
            tags = [int(t) for t in (value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value])]
        check.elements_signed = [_tag_text(t) for t in (tags if tags is not None else present)]
        if tags is not None:
            check.elements_not_covered = [_tag_text(t) for t in present if t not in set(tags)]
            missing = [t for t in tags if t not in ds]
            if missing:
                check.reason = f"signed element {_tag_text(missing[0])} is gone" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                continue
        if _crypto_hash(check.mac_algorithm) is None:
            check.reason = f"MAC algorithm {check.mac_algorithm!r} is not supported here"
            continue
        public = cert.public_key()
        if not isinstance(public, rsa.RSAPublicKey):
            check.reason = "the signer's key is not RSA (only the RSA profiles are verified)"
            continue
        try:
            public.verify(bytes(item[0x04000120].value), _digest(ds, item, check.mac_algorithm, tags), padding.PKCS1v15(),
                          Prehashed(_crypto_hash(check.mac_algorithm)))
        except InvalidSignature:
            check.reason = "MAC mismatch: the signed data were changed after signing"
            continue
        except KeyError:
            check.reason = "the signature item has no Signature (0400,0120)"
            continue
        when = _parse_dicom_datetime(when_text) if when_text else None
        if when is None:
            check.reason = f"unreadable signature time {when_text!r}"
            continue
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            state = "expired" if when > cert.not_valid_after_utc else "not yet valid"
            check.reason = (f"certificate {state} at signing time ({when.isoformat()}; valid {cert.not_valid_before_utc.isoformat()}"
                            f" to {cert.not_valid_after_utc.isoformat()})")
            continue
        if trust is not None:
            check.trusted = _trusted(cert, trust)
            if not check.trusted:
                check.reason = f"certificate not trusted: {check.signer} is not, and is not issued by, a --trust certificate"
                continue
        check.status = "valid"
    return checks


def verify_file(path: str | Path, trust: list | None = None) -> InstanceCheck:
    """One instance: unsigned, valid (every signature holds) or invalid (with the first reason)."""
    try:
        ds = read_dicom(path)
    except InputError as e:
        return InstanceCheck(str(path), None, None, "invalid", [], reason=e.problem)
    checks = verify_dataset(ds, trust)
    status = "unsigned" if not checks else ("valid" if all(c.status == "valid" for c in checks) else "invalid")
    reason = next((c.reason for c in checks if c.status != "valid"), None)
    return InstanceCheck(str(path), str(ds.get("SOPInstanceUID", "")) or None, str(ds.get("SeriesInstanceUID", "")) or None,
                         status, checks, reason)


def summarize(checks: list[InstanceCheck], by_series: bool = True) -> list[dict[str, Any]]:
    """Per series (or, with ``by_series=False``, over all the checks): how many instances are
    unsigned, valid, invalid; the signers; and the status: invalid when one is, valid when all are,
    unsigned when none is signed, else partly signed."""
    groups: dict[str | None, dict[str, Any]] = {}
    for c in checks:
        key = c.series_instance_uid if by_series else None
        s = groups.setdefault(key, {"series_instance_uid": key, "instances": 0, "unsigned": 0, "valid": 0, "invalid": 0, "signers": []})
        s["instances"] += 1
        s[c.status] += 1
        for sig in c.signatures:
            if sig.signer and sig.signer not in s["signers"]:
                s["signers"].append(sig.signer)
    if not groups:
        groups[None] = {"series_instance_uid": None, "instances": 0, "unsigned": 0, "valid": 0, "invalid": 0, "signers": []}
    for s in groups.values():
        if not by_series:
            del s["series_instance_uid"]
        s["status"] = "invalid" if s["invalid"] else ("valid" if s["valid"] == s["instances"] > 0 else
                                                      ("unsigned" if s["unsigned"] == s["instances"] else "partly signed"))
    return list(groups.values())
