"""The paper's 2D classifier study: registry, training, evaluation, comparison, predict, export-slices."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctguard.cli import main
from ctguard.models.registry import SPECS, build


def make_blobs(root: Path, n_patients: int = 12, per_patient: int = 4, size: int = 48, seed: int = 0, flat: bool = True) -> Path:
    """A clearly separable two-class set, like centred patches: ``fake`` images carry a bright round
    blob near the centre, ``real`` do not. File names carry the patient (``p03__k.png``) so splits
    can be by patient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for p in range(n_patients):
        cls = "fake" if p % 2 else "real"
        for k in range(per_patient):
            img = rng.normal(90, 18, (size, size))
            if cls == "fake":
                cy, cx = rng.uniform(size / 2 - 4, size / 2 + 4, 2)
                img += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2))
            folder = root / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"p{p:02d}__{k}.png")
    return root


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blobs(tmp_path_factory.mktemp("blobs") / "data", n_patients=24)


@pytest.fixture(scope="module")
def trained(blobs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "paper-cnn"
    rc = main(["train", "-q", "--data", str(blobs), "--model", "paper-cnn", "--image-size", "32", "--epochs", "8", "--batch-size", "16",
               "--out", str(out), "--patience", "0"])
    assert rc == 0
    return out


@pytest.mark.parametrize("name", list(SPECS))
def test_every_model_forward_at_its_input_size(name):
    model = build(name, 2, pretrained=False).eval()
    size = SPECS[name].input_size
    assert size == (299 if name == "inception_v3" else 224)
    with torch.no_grad():
        y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, 2)
    assert torch.isfinite(y).all()


def test_paper_cnn_is_the_papers_network():
    m = build("paper-cnn", 2, pretrained=False)
    convs = [l for l in m.modules() if isinstance(l, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(32, (3, 3), (1, 1))] * 3
    pools = [l for l in m.modules() if isinstance(l, torch.nn.MaxPool2d)]
    assert len(pools) == 1 and pools[0].kernel_size == 2 and pools[0].stride == 2
    dense = [l for l in m.modules() if isinstance(l, torch.nn.Linear)]
    assert [d.in_features for d in dense] == [32 * 112 * 112, 128] and dense[-1].out_features == 2


def test_frozen_backbone_freezes_all_but_the_head():
    m = build("resnet50", 3, pretrained=False)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    m2 = build("resnet50", 3, pretrained=False, unfreeze=1)
    assert any(n.startswith("backbone.layer4") for n, p in m2.named_parameters() if p.requires_grad)
    assert not any(n.startswith("backbone.layer3") for n, p in m2.named_parameters() if p.requires_grad)


def test_tiny_model_learns_and_its_metrics_are_sklearns(trained, blobs):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

    m = json.loads((trained / "metrics.json").read_text())
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["model"] == "paper-cnn" and cfg["image_size"] == 32 and cfg["epochs"] == 8  # the resolved config is saved
    assert m["n"] == 24  # 25% of 24 patients x 4 images, by patient
    assert m["accuracy"] >= 0.9
    with open(trained / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    train_patients = {p.stem.split("__")[0] for p in blobs.rglob("*.png")} - {r["patient"] for r in rows}
    assert len(train_patients) == 18 and not train_patients & {r["patient"] for r in rows}
    classes = m["classes"]
    y = np.array([classes.index(r["true"]) for r in rows])
    yp = np.array([classes.index(r["predicted"]) for r in rows])
    pf = np.array([float(r["p_fake"]) for r in rows])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, yp))
    fake = classes.index("fake")
    assert m["per_class"]["fake"]["precision"] == pytest.approx(precision_score(y, yp, pos_label=fake))
    assert m["per_class"]["fake"]["recall"] == pytest.approx(recall_score(y, yp, pos_label=fake))
    assert m["per_class"]["real"]["f1"] == pytest.approx(f1_score(y, yp, pos_label=1 - fake))
    assert m["auc"] == pytest.approx(roc_auc_score(y == fake, pf), abs=1e-5)
    assert m["confusion_matrix"] == confusion_matrix(y, yp).tolist()
    with open(trained / "history.csv") as f:
        hist = list(csv.DictReader(f))
    assert [h["epoch"] for h in hist] == [str(i) for i in range(1, 9)]
    assert set(hist[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
    for name, size in (("curves.png", (1000, 400)), ("confusion.png", (500, 450)), ("roc.png", (500, 500))):
        with Image.open(trained / name) as im:
            im.verify()
        with Image.open(trained / name) as im:
            assert im.format == "PNG" and im.size == size
    report = (trained / "report.md").read_text()
    assert "![curves.png](curves.png)" in report and f"{m['accuracy']:.4f}" in report


def test_resume_continues_the_run(blobs, tmp_path):
    args = ["train", "-q", "--data", str(blobs), "--model", "paper-cnn", "--image-size", "24", "--batch-size", "16", "--out",
            str(tmp_path / "r"), "--patience", "0"]
    assert main(args + ["--epochs", "2"]) == 0
    first = (tmp_path / "r" / "history.csv").read_text().splitlines()
    assert main(args + ["--epochs", "4", "--resume"]) == 0
    after = (tmp_path / "r" / "history.csv").read_text().splitlines()
    assert len(after) == 5 and after[:3] == first


def test_frozen_transfer_model_trains_its_head_on_features(blobs, tmp_path):
    out = tmp_path / "mnv2"
    assert main(["train", "-q", "--data", str(blobs), "--model", "mobilenet_v2", "--no-pretrained", "--image-size", "64", "--epochs", "3",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "mobilenet_v2" and m["n"] == 24
    with open(out / "history.csv") as f:
        hist = list(csv.DictReader(f))
    assert len(hist) == 3
    # best.pt is the epoch of lowest validation loss, and its test accuracy (the full model, images
    # through the backbone) equals that epoch's validation accuracy (the head on stored features):
    # in a flat folder the test split is the validation split.
    best = min(hist, key=lambda h: float(h["val_loss"]))
    assert m["accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=1e-6)


def test_compare_writes_both_tables(blobs, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "-q", "--data", str(blobs), "--models", "paper-cnn,mobilenet_v2", "--image-size", "32", "--epochs", "2",
                 "--no-pretrained", "--out", str(out)]) == 0
    with open(out / "table1_accuracy_loss.csv") as f:
        t1 = list(csv.DictReader(f))
    with open(out / "table2_precision_recall_f1.csv") as f:
        t2 = list(csv.DictReader(f))
    assert [r["model"] for r in t1] == ["paper-cnn", "mobilenet_v2"]
    assert {"accuracy", "val_accuracy", "loss", "val_loss"} <= set(t1[0])
    assert [(r["model"], r["class"]) for r in t2] == [("paper-cnn", "fake"), ("paper-cnn", "real"), ("mobilenet_v2", "fake"), ("mobilenet_v2", "real")]
    md = (out / "comparison.md").read_text()
    assert "| paper-cnn |" in md and "| mobilenet_v2 |" in md
    with Image.open(out / "curves.png") as im:
        assert im.size == (1100, 400)


def test_predict_gives_label_and_csv(trained, blobs, tmp_path, capsys):
    fake = sorted((blobs / "fake").glob("*.png"))[:2]
    real = sorted((blobs / "real").glob("*.png"))[:2]
    out = tmp_path / "pred.csv"
    assert main(["predict", *map(str, fake + real), "--model", str(trained / "best.pt"), "--csv", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for r in rows:
        assert float(r["p_fake"]) + float(r["p_real"]) == pytest.approx(1.0, abs=1e-5)
    assert [r["label"] for r in rows] == ["fake", "fake", "real", "real"]


def test_predict_reads_a_dicom_slice(trained, small_chest, tmp_path):
    from ctguard import api, io

    files = io.write_series(small_chest, tmp_path / "s")
    (r,) = api.predict([files[20]], model=trained / "best.pt")
    assert r["label"] in ("real", "fake") and 0.5 <= r["probability"] <= 1.0


def test_bad_inputs_exit_2(blobs, trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "real").mkdir(parents=True)
    (empty / "fake").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(empty / "real" / "a.png")
    assert main(["train", "-q", "--data", str(empty), "--model", "paper-cnn", "--out", str(tmp_path / "x")]) == 2
    assert "fake" in capsys.readouterr().err
    assert main(["train", "-q", "--data", str(blobs), "--model", "alexnet", "--out", str(tmp_path / "y")]) == 2
    assert "unknown model 'alexnet'" in capsys.readouterr().err
    # Weights that are not weights fail after the run folder was made: the folder goes with the run.
    junk = tmp_path / "junk.pth"
    junk.write_text("not a state dict")
    assert main(["train", "-q", "--data", str(blobs), "--model", "mobilenet_v2", "--weights", str(junk), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "junk.pth" in err and "cannot load weights" in err and not (tmp_path / "z").exists()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert main(["predict", str(bad), "--model", str(trained / "best.pt")]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err
    tamper3d = Path(__file__).parents[1] / "src" / "ctguard" / "weights" / "tamper3d.pt"
    assert main(["predict", str(next(blobs.rglob("*.png"))), "--model", str(tamper3d)]) == 2
    assert "not a 2D classifier checkpoint" in capsys.readouterr().err


def test_export_slices_by_patient(mini_dataset, tmp_path):
    from ctguard.data.ctgan import load_dataset

    scans = load_dataset(mini_dataset)
    out = tmp_path / "slices"
    assert main(["export-slices", "-q", str(mini_dataset), "--out", str(out)]) == 0
    with open(out / "index.csv") as f:
        rows = list(csv.DictReader(f))
    sides = {}
    for r in rows:
        sides.setdefault(r["patient"], set()).add(r["split"])
        assert (out / r["file"]).is_file()
    assert all(len(s) == 1 for s in sides.values())  # no patient in two splits
    n_fake = sum(len(s.locations) for s in scans if s.label in ("FM", "FB"))
    n_real = sum(len(s.locations) for s in scans if s.label == "TM") + sum(1 for s in scans if s.label == "TB")
    assert sum(r["class"] == "fake" for r in rows) == n_fake
    assert sum(r["class"] == "real" for r in rows) == n_real
    assert len(list(out.rglob("*.png"))) == len(rows)
    with Image.open(out / rows[0]["file"]) as im:
        assert im.size == (96, 96) and im.mode == "L"
    # Patch mode with the four CT-GAN classes: crops plus untouched-lung negatives in TB/TM scans.
    out2 = tmp_path / "patches"
    assert main(["export-slices", "-q", str(mini_dataset), "--out", str(out2), "--mode", "patch", "--classes", "ctgan",
                 "--patch", "32", "--negatives", "3"]) == 0
    with open(out2 / "index.csv") as f:
        rows2 = list(csv.DictReader(f))
    n_tb_tm = sum(1 for s in scans if s.label in ("TB", "TM"))
    assert sum(r["class"] == "FM" for r in rows2) == sum(len(s.locations) for s in scans if s.label == "FM")
    assert sum(r["class"] == "TB" for r in rows2) <= 3 * n_tb_tm and sum(r["class"] == "TB" for r in rows2) >= n_tb_tm
    with Image.open(out2 / rows2[0]["file"]) as im:
        assert im.size == (32, 32)
    assert main(["export-slices", "-q", str(mini_dataset), "--out", str(out2)]) == 2  # never overwrites


def test_torchrun_two_gloo_processes(blobs, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ctguard.cli", "train", "-q",
           "--data", str(blobs), "--model", "paper-cnn", "--image-size", "24", "--epochs", "3", "--batch-size", "8", "--out", str(out),
           "--patience", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 processes (DistributedDataParallel)" in r.stdout
    assert len((out / "history.csv").read_text().splitlines()) == 4  # rank 0 alone writes
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 24 and m["accuracy"] >= 0.75
