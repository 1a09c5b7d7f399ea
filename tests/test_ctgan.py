from __future__ import annotations

import shutil

import pytest

from ctguard.data.ctgan import class_counts, load_dataset, read_labels, scans_from_labels
from ctguard.data.splits import kfold_by_patient, split_by_patient
from ctguard.errors import InputError


def _real_scans(ctgan_labels):
    s1 = scans_from_labels(read_labels(ctgan_labels / "labels_exp1.csv"), 1)
    s2 = scans_from_labels(read_labels(ctgan_labels / "labels_exp2.csv"), 2)
    return list(s1.values()) + list(s2.values())


def test_real_label_counts(ctgan_labels):
    r1, r2 = read_labels(ctgan_labels / "labels_exp1.csv"), read_labels(ctgan_labels / "labels_exp2.csv")
    assert len(r1) == 133 and dict(class_counts(r1)) == {"FB": 61, "FM": 34, "TB": 15, "TM": 23}
    assert len(r2) == 36 and dict(class_counts(r2)) == {"FB": 11, "FM": 7, "TB": 6, "TM": 12}
    s1, s2 = scans_from_labels(r1, 1), scans_from_labels(r2, 2)
    assert len(s1) == 80 and len(s2) == 20
    assert all(s.locations == [] for s in s1.values() if s.label == "TB")
    assert s1["6031"].label == "TM" and s2["6031"].label == "FB"
    assert sorted(s1["7507"].locations) == sorted(s2["7507"].locations)  # same patient, same places


def test_z_alias_crlf_and_bad_rows(tmp_path):
    p = tmp_path / "l.csv"
    p.write_bytes(b"type,uuid,z,x,y\r\nFM,1234,10,20,30\r\nTB,5678,0,0,0\r\nTB,5678,0,0,0\r\n")
    rows = read_labels(p)
    assert [(r.type, r.uuid, r.slice, r.x, r.y) for r in rows][0] == ("FM", "1234", 10, 20, 30)
    scans = scans_from_labels(rows, 1)
    assert scans["1234"].locations == [(10, 30, 20)] and scans["5678"].locations == []
    p.write_text("type,uuid,slice,x,y\nXX,1,1,1,1\n")
    with pytest.raises(InputError, match="line 2: unknown type"):
        read_labels(p)
    p.write_text("type,uuid,x,y\n")
    with pytest.raises(InputError, match="lacks column"):
        read_labels(p)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_keeps_patients_together(ctgan_labels, seed):
    scans = _real_scans(ctgan_labels)
    splits = split_by_patient(scans, seed=seed)
    assert sum(len(v) for v in splits.values()) == 100
    where = {}
    for name, members in splits.items():
        for s in members:
            assert where.setdefault(s.patient, name) == name, f"patient {s.patient} in two splits"
    assert where["6031"] and all(s in splits[where["6031"]] for s in scans if s.uuid == "6031")
    for name in ("train", "val", "test"):  # stratified: every split has every class
        assert {s.label for s in splits[name]} == {"TB", "TM", "FB", "FM"}
    folds = kfold_by_patient(scans, k=5, seed=seed)
    tested = [s.uuid for _, test in folds for s in test]
    assert len(tested) == 100
    for train, test in folds:
        assert not {s.patient for s in train} & {s.patient for s in test}


def test_miniature_dataset_both_layouts(mini_dataset, tmp_path):
    kaggle = load_dataset(mini_dataset)
    labels = read_labels(mini_dataset / "labels_exp1.csv")
    assert len(kaggle) == len({r.uuid for r in labels}) == 8
    assert sorted(s.label for s in kaggle) == ["FB", "FB", "FM", "FM", "FM", "FM", "TB", "TM"]
    # Patients come from the manifest: each phantom's four scans are one patient.
    assert len({s.patient for s in kaggle}) == 2
    uci = tmp_path / "uci"
    shutil.copytree(mini_dataset / "CT_Scans/EXP1_blind", uci / "Tampered Scans/Experiment 1 - Blind")
    shutil.copy(mini_dataset / "labels_exp1.csv", uci / "Tampered Scans/labels_exp1.csv")
    loaded = load_dataset(uci)
    assert [(s.uuid, s.label, s.locations) for s in loaded] == [(s.uuid, s.label, s.locations) for s in kaggle]
    assert load_dataset(uci / "Tampered Scans")[0].uuid == kaggle[0].uuid


def test_loader_refuses_bad_labels(mini_dataset, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(mini_dataset, root)
    fm = next(s for s in load_dataset(root) if s.label == "FM")
    with open(root / "labels_exp1.csv", "a") as f:
        f.write("FM,4242,3,4,5\n")
    with pytest.raises(InputError, match="uuid 4242 .* has no scan folder"):
        load_dataset(root)
    assert len(load_dataset(root, ignore_missing=True)) == 8
    with open(root / "labels_exp1.csv", "a") as f:
        f.write(f"FM,{fm.uuid},999,4,5\n")
    with pytest.raises(InputError, match="outside the scan"):
        load_dataset(root, ignore_missing=True)
