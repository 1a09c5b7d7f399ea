"""DICOM Digital Signatures: ctguard's against DCMTK's dcmsign (the field's reference tool), both ways,
on real instances (implicit VR with native pixels; JPEG 2000), and what makes a signature invalid."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from ctguard import signatures as S
from ctguard.cli import main


def _dcmsign() -> str | None:
    if shutil.which("dcmsign") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have DCMTK's dcmsign (apt-get install dcmtk)")
        return None
    return "dcmsign"


def _cert(tmp: Path, name: str, *, issuer=None, days=(-1, 30)):
    """An RSA key and certificate (self-signed, or issued by ``issuer`` = (key, cert)); returns (key path, cert path, key, cert)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    sign_key, issuer_name = (issuer[0], issuer[1].subject) if issuer else (key, subject)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now + dt.timedelta(days=days[0]))
            .not_valid_after(now + dt.timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
            .sign(sign_key, hashes.SHA256()))
    kp, cp = tmp / f"{name}.key.pem", tmp / f"{name}.cert.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp, key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pki")
    node = _cert(tmp, "ctguard node")
    other = _cert(tmp, "someone else")
    ca = _cert(tmp, "hospital CA")
    issued = _cert(tmp, "node issued by CA", issuer=(ca[2], ca[3]))
    return {"node": node, "other": other, "ca": ca, "issued": issued}


@pytest.fixture(scope="module")
def instances(real_series, lidc, tmp_path_factory):
    """Two real instances: Lung-PET-CT-Dx A0001 (implicit VR, native pixels, private elements) and
    LIDC-IDRI-0001 (JPEG 2000 lossless, encapsulated pixel data)."""
    tmp = tmp_path_factory.mktemp("instances")
    native = sorted(real_series["A0001-L"].glob("*.dcm"))[3]
    j2k = sorted(next(p for p in (lidc / "LIDC-IDRI-0001").rglob("*.dcm")).parent.glob("*.dcm"))[5]
    out = []
    for name, src in (("native.dcm", native), ("j2k.dcm", j2k)):
        (tmp / name).write_bytes(src.read_bytes())
        out.append(tmp / name)
    assert pydicom.dcmread(out[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert pydicom.dcmread(out[1]).file_meta.TransferSyntaxUID.is_encapsulated
    return out


def _raw_elements(path: Path) -> dict[int, tuple]:
    """The top-level elements of the data set as they are on disk: tag -> (VR, length, value bytes)."""
    from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble

    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        implicit = meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        # An undefined-length sequence comes as a DataElement of its items (compared by value).
        return {int(e.tag): (e.VR, getattr(e, "length", None), e.value) for e in data_element_generator(fp, implicit, True)}


def test_sign_adds_a_signature_and_changes_nothing_else(instances, pki, tmp_path):
    key, cert = pki["node"][:2]
    assert main(["sign", *map(str, instances), "--key", str(key), "--cert", str(cert), "--out", str(tmp_path / "signed"), "-q"]) == 0
    for src in instances:
        out = tmp_path / "signed" / src.name
        before, after = _raw_elements(src), _raw_elements(out)
        assert set(after) - set(before) == {S.MAC_PARAMETERS, S.DIGITAL_SIGNATURES}
        assert all(after[t] == before[t] for t in before), "an element changed"
        assert pydicom.dcmread(out).file_meta == pydicom.dcmread(src).file_meta
        ds = pydicom.dcmread(out)
        item, params = ds[S.DIGITAL_SIGNATURES].value[0], ds[S.MAC_PARAMETERS].value[0]
        assert params.MACAlgorithm == "SHA256" and item.CertificateType == "X509_1993_SIG"
        assert S.PIXEL_DATA in [int(t) for t in params.DataElementsSigned]
        assert 0x00100020 in [int(t) for t in params.DataElementsSigned]  # PatientID
        check = S.verify_file(out, S.load_certificates(cert))
        assert check.status == "valid" and check.signatures[0].signer == "CN=ctguard node" and check.signatures[0].trusted


def test_ctguard_signatures_verify_with_dcmsign_and_dcmsign_signatures_with_ctguard(instances, pki, tmp_path):
    dcmsign = _dcmsign()
    if dcmsign is None:
        pytest.skip("DCMTK's dcmsign is not installed")
    key, cert = pki["node"][:2]
    for src in instances:
        ours = tmp_path / f"ctguard-{src.name}"
        ours.write_bytes(S.sign_bytes(src.read_bytes(), S.Signer.load(key, cert)))
        run = subprocess.run([dcmsign, "--verify", "--add-cert-file", str(cert), str(ours)], capture_output=True, text=True)
        assert run.returncode == 0 and "Signature Verification : OK" in run.stderr + run.stdout, run.stderr

        theirs, dump = tmp_path / f"dcmsign-{src.name}", tmp_path / f"{src.name}.mac"
        subprocess.run([dcmsign, "--sign", str(key), str(cert), "--mac-sha256", "--dump", str(dump), str(src), str(theirs)],
                       check=True, capture_output=True)
        # The byte stream the MAC is computed over is dcmsign's, byte for byte.
        ds = pydicom.dcmread(theirs)
        tags = [int(t) for t in ds[S.MAC_PARAMETERS].value[0].DataElementsSigned]
        assert b"".join(S.mac_stream(ds, ds[S.DIGITAL_SIGNATURES].value[0], tags)) == dump.read_bytes()
        check = S.verify_file(theirs, S.load_certificates(cert))
        assert check.status == "valid", check.reason
        assert check.signatures[0].mac_algorithm == "SHA256"


def _tamper(path: Path, out: Path, what: str) -> Path:
    ds = pydicom.dcmread(path)
    if what == "pixel-bit":
        data = bytearray(ds.PixelData)
        data[len(data) // 2] ^= 0x01
        ds.PixelData = bytes(data)
    else:
        ds.PatientID = ds.PatientID + "X"
    ds.save_as(out, enforce_file_format=False)
    return out


@pytest.mark.parametrize("what", ["pixel-bit", "patient-id"])
def test_one_bit_of_pixel_data_or_a_patient_id_changed_is_invalid_for_both(instances, pki, tmp_path, what):
    key, cert = pki["node"][:2]
    dcmsign = _dcmsign()
    for src in instances:
        signed = tmp_path / f"signed-{src.name}"
        signed.write_bytes(S.sign_bytes(src.read_bytes(), S.Signer.load(key, cert)))
        bad = _tamper(signed, tmp_path / f"{what}-{src.name}", what)
        check = S.verify_file(bad, S.load_certificates(cert))
        assert check.status == "invalid" and check.reason.startswith("MAC mismatch"), check.reason
        if dcmsign:
            run = subprocess.run([dcmsign, "--verify", "--add-cert-file", str(cert), str(bad)], capture_output=True, text=True)
            assert run.returncode != 0 and "Signature Verification : OK" not in run.stderr + run.stdout


def test_trust_a_ca_an_untrusted_signer_and_an_expired_certificate(instances, pki, tmp_path):
    src = instances[0]
    signed = {}
    for who in ("issued", "other"):
        signed[who] = tmp_path / f"{who}.dcm"
        signed[who].write_bytes(S.sign_bytes(src.read_bytes(), S.Signer.load(*pki[who][:2])))
    ca = S.load_certificates(pki["ca"][1])
    assert S.verify_file(signed["issued"], ca).status == "valid"  # issued by the trusted CA
    untrusted = S.verify_file(signed["other"], ca)
    assert untrusted.status == "invalid" and untrusted.reason.startswith("certificate not trusted")
    no_store = S.verify_file(signed["other"])
    assert no_store.status == "valid" and no_store.signatures[0].trusted is None  # MAC holds, signer not judged

    ds = pydicom.dcmread(src)
    late = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=60)  # after the certificate's 30 days
    S.sign_dataset(ds, S.Signer.load(*pki["node"][:2]), when=late)
    ds.save_as(tmp_path / "expired.dcm", enforce_file_format=False)
    expired = S.verify_file(tmp_path / "expired.dcm")
    assert expired.status == "invalid" and "expired" in expired.reason


def test_verify_cli_json_and_a_second_signature(instances, pki, tmp_path, capsys):
    src = instances[1]
    once = S.sign_bytes(src.read_bytes(), S.Signer.load(*pki["node"][:2]))
    twice = tmp_path / "twice.dcm"
    twice.write_bytes(S.sign_bytes(once, S.Signer.load(*pki["issued"][:2], mac_algorithm="SHA512")))
    ds = pydicom.dcmread(twice)
    assert [int(i.MACIDNumber) for i in ds[S.DIGITAL_SIGNATURES].value] == [0, 1]
    out = tmp_path / "v.json"
    assert main(["verify", str(twice), str(src), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    statuses = {Path(i["path"]).name: i["status"] for i in result["instances"]}
    assert statuses == {"twice.dcm": "valid", src.name: "unsigned"}
    sigs = result["instances"][0]["signatures"]
    assert [s["mac_algorithm"] for s in sigs] == ["SHA256", "SHA512"] and sigs[1]["signer"] == "CN=node issued by CA"
    assert result["series"][0]["status"] == "partly signed" and result["series"][0]["instances"] == 2
    assert "VALID" in capsys.readouterr().out


def test_sign_refuses_bad_keys_and_overwriting_with_one_line_and_writes_nothing(instances, pki, tmp_path, capsys):
    key, cert = pki["node"][:2]
    out = tmp_path / "out"
    for argv, words in (
        (["--key", str(cert), "--cert", str(cert)], "not a PEM private key"),
        (["--key", str(key), "--cert", str(pki["other"][1])], "not the key's"),
        (["--key", str(key), "--cert", str(key)], "certificate"),
    ):
        assert main(["sign", str(instances[0]), *argv, "--out", str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
        assert not out.exists()
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not a scan")
    assert main(["sign", str(instances[0]), str(not_dicom), "--key", str(key), "--cert", str(cert), "--out", str(out), "-q"]) == 2
    assert "notes.txt: not a DICOM file" in capsys.readouterr().err and not out.exists()
    assert main(["sign", str(instances[0]), "--key", str(key), "--cert", str(cert), "--out", str(out), "-q"]) == 0
    first = (out / instances[0].name).read_bytes()
    assert main(["sign", str(instances[0]), "--key", str(key), "--cert", str(cert), "--out", str(out), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err and (out / instances[0].name).read_bytes() == first


def test_screen_reports_signatures_and_a_broken_one_is_a_finding(tampered, pki, tmp_path):
    from ctguard import api

    root, _, _ = tampered
    key, cert = pki["node"][:2]
    api.sign([root / "clean"], key, cert, tmp_path / "signed")
    series = tmp_path / "signed" / "clean"
    result = api.screen(series, trust=cert)
    assert result["verdict"] == "clean" and result["signatures"]["status"] == "valid"
    assert result["signatures"]["valid"] == result["signatures"]["instances"] > 0

    files = sorted(series.glob("*.dcm"))
    _tamper(files[10], files[10], "pixel-bit")
    result = api.screen(series, trust=cert, dicom_out=tmp_path / "dicom")
    assert result["verdict"] == "tampered" and result["signatures"]["status"] == "invalid"
    finding = result["findings"][0]
    assert finding["kind"] == "signature" and finding["instances"] == 1 and finding["reason"].startswith("MAC mismatch")
    assert result["signatures"]["invalid_instances"][0]["sop_instance_uid"] == pydicom.dcmread(files[10]).SOPInstanceUID

    from ctguard.report.dicom_objects import read_sr

    sr = read_sr(tmp_path / "dicom" / "ctguard-sr.dcm")
    assert sr["verdict"] == "tampered" and sr["findings"][0]["kind"] == "signature"
