"""Fits the second stage again on a trained run's network, with a config's stage settings.

Usage:
    python benchmarks/experiments/refit_stage.py RUN OUT [--config configs/tamper3d.yaml]

Copies the network of RUN (``model.pt``, ``model.onnx``, its hard-negative rounds, ``config.json``,
``summary.json``) into OUT and fits the second stage there exactly as ``ctguard train`` does after
the network, with the config's ``verifier*`` settings (the network's own settings are kept from
RUN). ``summary.json`` of OUT gets the new stage's summary. RUN's rows (``verifier_rows/``) are
copied too, so settings that do not change the rows (the trees', ``verifier_blend``) fit in a minute
or two, and so are RUN's cross-fit networks (``verifier_cross_fit``): OUT trains only those its
config asks for and RUN lacks. For trying stage settings without training the network again
(about 32 of the recipe's 45 minutes here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from ctguard import api  # noqa: E402
from ctguard.engine.train3d import _pool, train_second_stage  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--config", default=str(ROOT / "configs/tamper3d.yaml"))
    a = ap.parse_args()
    run, out = Path(a.run), Path(a.out)
    if (out / "model.verifier.npz").exists():
        sys.exit(f"{out} already has a second stage")
    out.mkdir(parents=True, exist_ok=True)
    for f in ["model.pt", "model.onnx", "config.json", "summary.json", "history.csv"] + [p.name for p in run.glob("hard_round*.npz")]:
        if (run / f).is_file():
            shutil.copy(run / f, out / f)
    if (run / "verifier_rows").is_dir():  # each source's rows, keyed by the network and the settings that make them: reused where those match
        shutil.copytree(run / "verifier_rows", out / "verifier_rows", dirs_exist_ok=True)
    for net in run.glob("cross_fit[0-9]*"):  # verifier_cross_fit's networks (with their rows): kept where the config asks for the same
        shutil.copytree(net, out / net.name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("hard_round*.npz"))  # not their mined cubes
    stage = {k: v for k, v in api.load_config(a.config).items() if k.startswith("verifier")}
    cfg = {**json.loads((run / "config.json").read_text()), **stage}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    pool = _pool(cfg)
    try:
        report = train_second_stage(cfg, out, pool, lambda m: print(m, flush=True), progress=False)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    summary = json.loads((out / "summary.json").read_text())
    summary["verifier"] = report
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
