"""Evaluation of a 2D classifier on a held-out split: metrics, figures and ``report.md``.

Metrics come from scikit-learn: accuracy, per-class precision/recall/F1 and support, macro averages,
ROC curve and AUC (binary: the ``fake`` class, else the second, is positive; more classes:
one-vs-rest, macro), confusion matrix in counts and normalised by true class.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from ctguard.data.folder import load_images, scan_folder
from ctguard.engine.train2d import load_classifier, to_input


@torch.no_grad()
def predict_arrays(model, images_u8: np.ndarray, mean, std, batch: int = 32) -> np.ndarray:
    """Softmax probabilities ``(n, classes)`` for uint8 gray images at the model's size."""
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch):
        x = to_input(torch.from_numpy(images_u8[i : i + batch]), mean, std)
        out.append(torch.softmax(model(x.contiguous(memory_format=torch.channels_last)), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def positive_class(classes: list[str]) -> int:
    return classes.index("fake") if "fake" in classes else 1


def compute_metrics(y_true: np.ndarray, prob: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve

    labels = list(range(len(classes)))
    y_pred = prob.argmax(1)
    p, r, f, sup = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        cm_norm = np.nan_to_num(cm / cm.sum(1, keepdims=True))
    out = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "per_class": {c: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]), "support": int(sup[k])} for k, c in enumerate(classes)},
        "macro": {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean())},
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalised": np.round(cm_norm, 4).tolist(),
        "classes": classes,
        "roc": {},
        "auc": None,
    }
    present = set(np.unique(y_true).tolist())
    if len(classes) == 2 and present == {0, 1}:
        pos = positive_class(classes)
        fpr, tpr, _ = roc_curve(y_true == pos, prob[:, pos])
        out["auc"] = float(roc_auc_score(y_true == pos, prob[:, pos]))
        out["roc"][classes[pos]] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    elif len(present) > 1:
        aucs = []
        for k, c in enumerate(classes):
            if k in present and len(present) > 1:
                fpr, tpr, _ = roc_curve(y_true == k, prob[:, k])
                out["roc"][c] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
                aucs.append(roc_auc_score(y_true == k, prob[:, k]))
        out["auc"] = float(np.mean(aucs)) if aucs else None
    return out


def read_history(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Accuracy and loss, train vs validation, per epoch (the paper's Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, name in ((axes[0], "accuracy", "accuracy"), (axes[1], "loss", "loss")):
        ax.plot(ep, [h[key] for h in history], "o-", label="train")
        ax.plot(ep, [h["val_" + key] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(f"model {name}")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path) -> None:
    """Counts, with the row-normalised fraction under each (the paper's Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.asarray(cm)
    norm = a / np.maximum(a.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(j, i, f"{a[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_roc(roc: dict, auc: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for c, curve in roc.items():
        ax.plot(curve["fpr"], curve["tpr"], label=c)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC (test){f', AUC {auc:.3f}' if auc is not None else ''}")
    if roc:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def metrics_table(m: dict) -> str:
    rows = ["| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    for c, v in m["per_class"].items():
        rows.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    rows.append(f"| macro | {m['macro']['precision']:.3f} | {m['macro']['recall']:.3f} | {m['macro']['f1']:.3f} | {m['n']} |")
    return "\n".join(rows)


def evaluate(checkpoint: str | Path, data: str | Path, out_dir: str | Path, split: str = "test", progress: bool = True, echo=print,
             history: str | Path | None = None, seed: int | None = None, test_fraction: float | None = None) -> dict:
    """Scores ``split`` of ``data`` with a checkpoint; writes ``metrics.json``, ``predictions.csv``,
    ``confusion.png``, ``roc.png``, ``curves.png`` (with a history) and ``report.md``."""
    model, ck = load_classifier(checkpoint)
    cfg = ck.get("config", {})
    seed = cfg.get("seed", 0) if seed is None else seed
    test_fraction = cfg.get("test_fraction", 0.25) if test_fraction is None else test_fraction
    folder = scan_folder(data, test_fraction, seed, classes=ck["classes"])
    items = folder.splits[split]
    images = load_images(items, ck["input_size"], tuple(cfg.get("window", (-1000, 400))), progress)
    prob = predict_arrays(model, images, model.spec.mean, model.spec.std)
    y = np.array([i.label for i in items])
    m = compute_metrics(y, prob, ck["classes"])
    m.update({"model": ck["model_name"], "checkpoint": str(checkpoint), "split": split, "data": str(data)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "true", "predicted"] + [f"p_{c}" for c in ck["classes"]])
        for it, pr in zip(items, prob):
            w.writerow([str(it.path), it.patient, ck["classes"][it.label], ck["classes"][int(pr.argmax())]] + [f"{v:.6f}" for v in pr])
    plot_confusion(m["confusion_matrix"], ck["classes"], out / "confusion.png")
    plot_roc(m["roc"], m["auc"], out / "roc.png")
    figures = ["confusion.png", "roc.png"]
    hist_rows = None
    if history and Path(history).is_file():
        hist_rows = read_history(history)
        plot_curves(hist_rows, out / "curves.png", ck["model_name"])
        figures.insert(0, "curves.png")
    lines = [f"# {ck['model_name']} on {data} ({split} split, {m['n']} images)", "",
             f"Accuracy **{m['accuracy']:.4f}**, macro F1 {m['macro']['f1']:.4f}, AUC {m['auc']:.4f}" if m["auc"] is not None
             else f"Accuracy **{m['accuracy']:.4f}**, macro F1 {m['macro']['f1']:.4f}", "", metrics_table(m), ""]
    if hist_rows:
        last = hist_rows[-1]
        lines += [f"Last epoch ({int(last['epoch'])}): loss {last['loss']:.4f}, accuracy {last['accuracy']:.4f}, "
                  f"val_loss {last['val_loss']:.4f}, val_accuracy {last['val_accuracy']:.4f}.", ""]
    lines += [f"![{f}]({f})" for f in figures]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    auc = f", AUC {m['auc']:.3f}" if m["auc"] is not None else ""
    echo(f"{ck['model_name']} on {split} ({m['n']} images): accuracy {m['accuracy']:.3f}, macro F1 {m['macro']['f1']:.3f}{auc}; "
         f"report {out / 'report.md'}")
    return m
