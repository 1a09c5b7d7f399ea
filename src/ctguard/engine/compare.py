"""The paper's model comparison: train and evaluate several models on the same split and write its
two tables side by side (Table 1: accuracy, validation accuracy, loss, validation loss; Table 2:
per-class precision, recall and F1) as Markdown and CSV, with one figure of all their curves."""

from __future__ import annotations

import csv
from pathlib import Path

from ctguard.engine.evaluate import read_history
from ctguard.models.registry import spec


def compare(models: list[str], cfg: dict, out_dir: str | Path, progress: bool = True, echo=print) -> dict:
    from ctguard.engine.train2d import train

    for name in models:
        spec(name)  # unknown names fail before any training
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in models:
        echo(f"== {name} ==")
        r = train({**cfg, "model": name}, out / name, progress=progress, echo=echo)
        results[name] = {"history": read_history(out / name / "history.csv"), "metrics": r["metrics"]}
    write_tables(results, out)
    plot_comparison(results, out / "curves.png")
    echo(f"comparison: {out / 'comparison.md'}")
    return results


def _table1(results: dict) -> list[dict]:
    rows = []
    for name, r in results.items():
        last = r["history"][-1]
        rows.append({"model": name, "epochs": int(last["epoch"]), "accuracy": last["accuracy"], "val_accuracy": last["val_accuracy"],
                     "loss": last["loss"], "val_loss": last["val_loss"], "test_accuracy": r["metrics"]["accuracy"],
                     "test_auc": r["metrics"]["auc"]})
    return rows


def _table2(results: dict) -> list[dict]:
    rows = []
    for name, r in results.items():
        for cls, v in r["metrics"]["per_class"].items():
            rows.append({"model": name, "class": cls, "precision": v["precision"], "recall": v["recall"], "f1": v["f1"], "support": v["support"]})
    return rows


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_tables(results: dict, out: Path) -> None:
    t1, t2 = _table1(results), _table2(results)
    for name, rows in (("table1_accuracy_loss.csv", t1), ("table2_precision_recall_f1.csv", t2)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    text = ["# Model comparison", "",
            "Table 1: last-epoch training and validation accuracy and loss, and the best checkpoint's test accuracy and AUC.", "",
            _markdown(t1), "", "Table 2: per-class precision, recall and F1 on the test split (best checkpoint).", "", _markdown(t2), "",
            "![curves](curves.png)", ""]
    (out / "comparison.md").write_text("\n".join(text))


def plot_comparison(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for name, r in results.items():
        ep = [h["epoch"] for h in r["history"]]
        line = axes[0].plot(ep, [h["val_accuracy"] for h in r["history"]], "o-", label=name)[0]
        axes[0].plot(ep, [h["accuracy"] for h in r["history"]], ":", color=line.get_color())
        axes[1].plot(ep, [h["val_loss"] for h in r["history"]], "o-", color=line.get_color(), label=name)
        axes[1].plot(ep, [h["loss"] for h in r["history"]], ":", color=line.get_color())
    for ax, name in zip(axes, ("accuracy", "loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(f"{name}: validation (solid), train (dotted)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
