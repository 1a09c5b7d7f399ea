"""Training of the bundled 3D tamper detector on simulated data (``ctguard train --config configs/tamper3d.yaml``)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctguard.data.cubes import MIN_TARGET_RADIUS_MM, cubes_from_source
from ctguard.engine.train_verifier import VERIFIER_DEFAULTS, check_stage_config, cross_fit_groups, fit_verifier, without_patients
from ctguard.errors import InputError
from ctguard.models.cube3d import CLASSES, TamperNet3D, normalise

DEFAULTS: dict[str, Any] = {
    "task": "tamper3d",
    "seed": 0,
    "phantoms": 10,  # phantom chests used for training
    "phantom_shape": [80, 192, 192],
    "phantom_spacing": [2.0, 1.9, 1.9],
    "phantom_variety": False,  # each phantom under its own random scanner set-up (slices, pixels, noise, kernel)
    "phantom_opacities": 0,  # varied phantoms get up to this many genuine hazy patches (ground glass, consolidation)
    "phantom_seed_base": None,  # the training phantoms' first seed; default seed * 1000
    "fixed_phantoms": 0,  # this many more phantoms of the one set-up (phantom_shape, phantom_spacing), e.g. beside varied ones
    "real_series": [],  # DICOM folders of the training patients
    "real_thick": [],  # also each real series with slices this many times thicker (averaged), e.g. [2]
    "annotations": None,  # their tumour boxes (PASCAL-VOC XML by SOPInstanceUID)
    "real_scans": [],  # more training patients, each with its own tumours: [{scan: PATH, tumours: LABEL_MAP_OR_VOC_DIR}]
    "inject": 2,
    "remove": 2,
    "per_scan": 3,
    "inject_families": ["drawn"],  # how FM copies are made, in turn: drawn (analytic nodules), moved (a real tumour of the scan moved)
    "remove_families": ["fill"],  # how removals are in-painted, in turn: fill (normalised convolution + texture), clone (healthy lung pasted)
    "healthy": 0,  # FB copies per source that in-paint healthy places (parenchyma, vessels, pleura), per_scan each
    "cube": 64,
    "target_min_radius": MIN_TARGET_RADIUS_MM,  # mm: a cell is an edit's when its centre is within max(nodule radius, this) of the edit's centre
    "width": 16,
    "epochs": 6,
    "batch_size": 16,
    "lr": 0.002,
    "threads": 2,
    "device": "auto",  # where the network trains and mines: "cpu", "cuda", or "auto" (a GPU when there is one)
    "workers": 1,  # processes that simulate sources and make clean scans at once (each holds a scan or two in memory)
    "real_repeats": 1,  # each real series (and its thicker versions) simulated this many times, with fresh seeds
    "cache": None,  # an .npz to keep the simulated cubes in between runs
    "source_cache": None,  # a folder keeping each source's cubes apart (runs of other patient sets, e.g. cross-validation folds, reuse them)
    "extra_cubes": [],  # more cube files (.npz with x, y) to train on: an earlier run's cubes and hard negatives
    "init": None,  # start from this checkpoint's weights (e.g. to add hard-negative rounds to a trained model)
    "hard_rounds": 0,  # rounds of hard-negative mining: screen clean scans, add cubes at false findings, train on
    "hard_phantoms": 16,  # clean phantoms screened per round (seeds apart from the training phantoms')
    "hard_threshold": 0.3,  # tamper probability from which a place on a clean scan is a hard negative
    "hard_max_per_scan": 24,
    "hard_epochs": 6,
    "hard_lr": 0.001,
    "hard_round_offset": 0,  # a continuation run mines fresh phantoms: rounds are numbered from here
    **VERIFIER_DEFAULTS,  # the second stage, fitted after the network when ``verifier`` is true
}


def source_specs(cfg: dict) -> list[tuple]:
    """What the training scans are made from, in order: ``("phantom", seed)``, ``("fixed phantom",
    seed)`` (the one set-up, beside varied ones) and ``("series", path, factor, tumours)`` (a real
    scan, ``factor`` times thicker when above 1, and where its tumours are written). A source's
    place in this list seeds its edits."""
    base = cfg["seed"] * 1000 if cfg.get("phantom_seed_base") is None else int(cfg["phantom_seed_base"])
    specs: list[tuple] = [("phantom", base + k) for k in range(cfg["phantoms"])]
    # Their seeds follow the other phantoms'; without phantom_variety they are simply more phantoms.
    specs += [("fixed phantom", base + cfg["phantoms"] + k) for k in range(int(cfg.get("fixed_phantoms") or 0))]
    for rep in range(int(cfg.get("real_repeats") or 1)):
        for path, tumours in real_scans(cfg):
            specs += [("series", path, 1, tumours, rep)] + [("series", path, int(f), tumours, rep) for f in cfg.get("real_thick") or []]
    return specs


def spec_seed(cfg: dict, spec: tuple) -> int:
    """The seed of a source's edits: from the phantom's seed, or from the real scan's file name,
    slab factor and repeat, so that a source gets the same edits whichever other sources a run has."""
    if spec[0] != "series":
        return int(cfg["seed"]) * 7919 + int(spec[1])
    return int(cfg["seed"]) * 7919 + zlib.crc32(f"{Path(spec[1]).name}|{spec[2]}|{spec[4]}".encode()) % 1_000_003


def real_scans(cfg: dict) -> list[tuple[str, str | None]]:
    """The training patients' scans and where each one's tumours are written: ``real_series`` with
    the shared ``annotations``, then ``real_scans`` with their own."""
    out = [(str(p), cfg.get("annotations")) for p in cfg.get("real_series") or []]
    return out + [(str(e["scan"]), e.get("tumours")) for e in cfg.get("real_scans") or []]


def build_source(cfg: dict, spec: tuple):
    """The scan (with its known real tumours) that a :func:`source_specs` entry stands for."""
    from ctguard import io
    from ctguard.tamper.simulate import Source, thick_slice_source, tumours_from

    if spec[0] in ("phantom", "fixed phantom"):  # (kind, seed), or (kind, seed, with_tumour): the same chest with or without its own nodule
        with_tumour = None if len(spec) < 3 else bool(spec[2])
        return _phantom({**cfg, "phantom_variety": False} if spec[0] == "fixed phantom" else cfg, spec[1], with_tumour)
    vol = io.read(spec[1])
    src = Source(spec[1], vol, vol.meta.get("patient_id", ""), tumours_from(vol, spec[3]))
    return thick_slice_source(src, spec[2]) if spec[2] > 1 else src


def _phantom(cfg: dict, seed: int, with_tumour: bool | None = None):
    from ctguard.tamper.simulate import phantom_source, varied_phantom_source

    if cfg.get("phantom_variety"):
        return varied_phantom_source(seed, with_tumour=with_tumour, opacities=int(cfg.get("phantom_opacities") or 0))
    return phantom_source(seed, tuple(cfg["phantom_shape"]), tuple(cfg["phantom_spacing"]), with_tumour=with_tumour)


SIMULATION_KEYS = ("seed", "inject", "remove", "per_scan", "cube", "target_min_radius", "inject_families", "remove_families", "healthy",
                   "phantom_variety", "phantom_opacities", "phantom_shape", "phantom_spacing")


def _source_cubes(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """One source's training cubes (a pool task: module level, so worker processes can run it),
    from ``source_cache`` when a run with the same simulation settings made them already."""
    cfg, spec = job
    cached = None
    if cfg.get("source_cache"):
        key = cubes_key(cfg, [spec])
        cached = Path(cfg["source_cache"]) / f"{key}.npz"
        if cached.is_file():
            return load_cubes(cached)
    cx, cy = cubes_from_source(build_source(cfg, spec), spec_seed(cfg, spec), cfg["inject"], cfg["remove"], cfg["per_scan"], cfg["cube"],
                               float(cfg["target_min_radius"]), families=_families(cfg))
    # Whole HU in int16: half the memory of float32, and truncating the fraction is far below CT noise.
    x, y = np.stack(cx).astype(np.int16), np.stack(cy)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, x=x, y=y)
        tmp.replace(cached)
    return x, y


def cubes_key(cfg: dict, specs: list[tuple]) -> str:
    """What a set of sources' cubes depend on (the simulation settings and the sources, by file
    name), hashed: the key of a source in ``source_cache`` and of the run's whole ``cache`` file."""
    what = {k: cfg.get(k) for k in SIMULATION_KEYS} | {"spec": [[Path(str(v)).name if j in (1, 3) and v else v for j, v in enumerate(spec)]
                                                                for spec in specs]}
    if len(specs) == 1:  # one source's key as source_cache has always named it
        what["spec"] = what["spec"][0]
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _families(cfg: dict) -> dict:
    return {"inject_families": tuple(cfg["inject_families"]), "remove_families": tuple(cfg["remove_families"]), "healthy": int(cfg["healthy"])}


def make_cubes(cfg: dict, pool=None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Simulates edits on every source and cuts training cubes, in source order (the same cubes
    whatever the number of workers)."""
    from tqdm import tqdm

    specs = source_specs(cfg)
    if not specs:
        raise InputError("nothing to train on: no phantoms, no real_series and no cache file of cubes")
    jobs = [(cfg, spec) for spec in specs]
    done = (pool.imap if pool is not None else map)(_source_cubes, jobs)
    parts = list(tqdm(done, total=len(jobs), desc="simulate + cut cubes", disable=not progress))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _worker_init() -> None:
    torch.set_num_threads(1)


def _pool(cfg: dict):
    """A pool of ``workers`` processes for simulation and clean scans, or None for one process.
    Workers are spawned, not forked: the parent may hold a GPU and threads."""
    import multiprocessing

    n = int(cfg.get("workers") or 1)
    return multiprocessing.get_context("spawn").Pool(n, initializer=_worker_init) if n > 1 else None


def _device(cfg: dict) -> torch.device:
    want = str(cfg.get("device") or "auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {want!r} asked for, but PyTorch sees no GPU here")
    try:
        return torch.device(want)
    except RuntimeError:
        raise InputError(f"unknown device {want!r} (use auto, cpu or cuda)") from None


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips on each axis and an in-plane transpose, the same for input and target."""
    for axis in (2, 3, 4):
        if torch.rand(1, generator=gen).item() < 0.5:
            x, y = x.flip(axis), y.flip(axis - 1)
    if torch.rand(1, generator=gen).item() < 0.5:
        x, y = x.transpose(3, 4), y.transpose(2, 3)
    return x, y


def train(cfg: dict, out_dir: str | Path, progress: bool = True, echo=print) -> dict:
    """Trains the detector; writes ``model.pt``, ``history.csv``, ``config.json``; returns the summary."""
    cfg = {**DEFAULTS, **cfg}
    check_inputs(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if cfg.get("cache"):
        Path(cfg["cache"]).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.set_num_threads(int(cfg["threads"]))
    device = _device(cfg)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    pool = _pool(cfg)
    try:
        return _train(cfg, out, device, pool, progress, echo)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()  # reaped, so no worker (nor its semaphore) outlives the run


def check_inputs(cfg: dict) -> None:
    """Every file a run reads, checked before anything runs: simulating (or training, then mining)
    can take many minutes before it reaches a real series, an ``init`` checkpoint or extra cubes."""
    for key in ("phantom_shape", "phantom_spacing"):
        v = cfg.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(n, (int, float)) and n > 0 for n in v)):
            raise InputError(f"the config's {key} should be three positive numbers (z, y, x), not {v!r}")
    scans = cfg.get("real_scans") or []
    if not (isinstance(scans, list) and all(isinstance(e, dict) and isinstance(e.get("scan"), str) for e in scans)):
        raise InputError(f"the config's real_scans should be a list of mappings with a scan (and optionally tumours) path, not {scans!r}")
    from ctguard.tamper.families import check_families

    try:
        check_families(cfg["inject_families"], cfg["remove_families"])
    except InputError as e:
        raise InputError(f"the config's {e.problem}") from None
    if cfg.get("verifier"):
        check_stage_config(cfg)  # a wrong verifier_boosting or verifier_blend is refused before anything runs
    check_paths(cfg, ("real_series", "annotations", "init", "extra_cubes"))
    check_paths({"real_scans": [p for e in scans for p in (e["scan"], e.get("tumours")) if p]}, ("real_scans",))


def check_paths(cfg: dict, keys: tuple[str, ...]) -> None:
    """That every path under ``keys`` (a path or a list of paths) exists, or a one-line error naming it."""
    for key in keys:
        value = cfg.get(key) or []
        for path in value if isinstance(value, list) else [value]:
            if not Path(path).exists():
                raise InputError(f"does not exist (the config's {key}; in a config file, paths are relative to the project root)", path)


def _cache_key(path: Path) -> str | None:
    """The :func:`cubes_key` a run's cube cache was written with (None: an older file without one);
    a file that is not a cube file is the one-line error of :func:`load_cubes`, never overwritten."""
    try:
        with np.load(path, allow_pickle=False) as d:
            return str(d["key"]) if "key" in d.files else None
    except (OSError, ValueError, EOFError):
        load_cubes(path)  # raises the InputError that names the file and what it is not
        return None


def load_cubes(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A cube file (``.npz`` with ``x``, blocks in HU, and ``y``, their cell classes), or a clear error."""
    try:
        with np.load(path, allow_pickle=False) as d:
            x, y = d["x"], d["y"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        # numpy takes any file that is neither .npz nor .npy for a pickle, and says so: say what it is not.
        why = "not a numpy archive" if "pickled" in str(e) else f"{e.__class__.__name__}: {str(e).splitlines()[0][:120]}"
        raise InputError(f"not a cube file (.npz with x and y): {why}", path) from None
    if len(x) != len(y) or x.ndim != 4 or y.ndim != 4:
        raise InputError(f"not a cube file: x {x.shape} and y {y.shape} should be (n, d, h, w) blocks and their cells", path)
    return x, y


def _train(cfg: dict, out: Path, device: torch.device, pool, progress: bool, echo) -> dict:
    t0 = time.time()
    cache = Path(cfg["cache"]) if cfg.get("cache") else None
    key = cubes_key(cfg, source_specs(cfg)) if cache is not None else None
    if cache is not None and cache.is_file() and _cache_key(cache) == key:
        x, y = load_cubes(cache)
    else:
        if cache is not None and cache.is_file():
            echo(f"{cache} holds the cubes of other sources or simulation settings: making them again")
        x, y = make_cubes(cfg, pool, progress)
        if cache is not None:
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, x=x, y=y, key=np.asarray(key))
            tmp.replace(cache)
    # Cubes are kept as whole HU in int16 (half the memory of float32; truncating the fraction is
    # far below CT noise), and every file is added in one concatenation.
    xs, ys = [x.astype(np.int16)], [y.astype(np.int64)]
    for extra in cfg.get("extra_cubes") or []:
        ex, ey = load_cubes(extra)
        xs.append(ex.astype(np.int16))
        ys.append(ey.astype(np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    del xs, ys
    t_data = time.time() - t0
    counts = np.bincount(y.ravel(), minlength=3)
    echo(f"{len(x)} cubes of {cfg['cube']} mm; target cells: " + ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts)))
    data_hashes = {"cubes_sha256": cubes_digest(x, y)}  # so that two runs' data can be told apart from their arithmetic
    weights = class_weights(counts)
    model = TamperNet3D(cfg["width"])
    if cfg.get("init"):
        model.load_state_dict(torch.load(cfg["init"], map_location="cpu", weights_only=True)["model"])
        echo(f"starting from {cfg['init']}")
    model.to(device)
    echo(f"training on {'GPU ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    history = [{**row, "cubes": len(x)} for row in fit(model, x, y, cfg["epochs"], cfg["lr"], cfg, progress, weights)]
    for r in range(int(cfg["hard_round_offset"]), int(cfg["hard_round_offset"]) + int(cfg["hard_rounds"])):
        t_mine = time.time()
        hx, hy = mine_hard_negatives(model, cfg, r, progress, pool)
        hx = hx.astype(np.int16)  # as the cubes are kept: saved, hashed and trained on once converted
        np.savez_compressed(out / f"hard_round{r + 1}.npz", x=hx, y=hy.astype(np.int8))
        data_hashes[f"hard_round{r + 1}_sha256"] = cubes_digest(hx, hy)
        echo(f"hard negatives, round {r + 1}: {len(hx)} cubes at false findings on clean scans ({time.time() - t_mine:.0f} s)")
        if len(hx):
            x, y = np.concatenate([x, hx]), np.concatenate([y, hy])
        history += [{**row, "cubes": len(x)}
                    for row in fit(model, x, y, cfg["hard_epochs"], cfg["hard_lr"], cfg, progress, weights, first_epoch=len(history))]
    n_cubes = len(x)
    del x, y  # the second stage needs none of the cubes' memory
    summary = save_run(out, model, cfg, "tamper3d", history, {"cubes": n_cubes, **data_hashes}, t0, t_data, echo, "making data")
    if cfg.get("verifier"):
        summary["verifier"] = train_second_stage(cfg, out, pool, echo, progress)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_second_stage(cfg: dict, out: Path, pool=None, echo=print, progress: bool = False) -> dict:
    """Fits the second stage on the network in ``out`` (see :mod:`ctguard.engine.train_verifier`),
    after the cross-fit networks its rows need (``verifier_cross_fit``); the summary of it."""
    cfg = {**DEFAULTS, **cfg}
    t0 = time.time()
    train_cross_fit_networks(cfg, out, pool, echo, progress)
    t_cross = time.time() - t0
    report = fit_verifier(cfg, out, pool, echo, progress)
    summary = {k: report[k] for k in ("threshold", "rows", "sources", "seconds", "triage_fit") if k in report}
    return summary | ({"cross_fit_seconds": round(t_cross, 1)} if cross_fit_groups(cfg) else {})


def network_settings(cfg: dict) -> dict:
    """What a network depends on: a config less the second stage's settings (``verifier*``), as JSON reads it back."""
    return {k: v for k, v in json.loads(json.dumps(cfg)).items() if not k.startswith("verifier")}


def train_cross_fit_networks(cfg: dict, out: Path, pool=None, echo=print, progress: bool = False) -> None:
    """With ``verifier_cross_fit`` k: k networks of the run's recipe, each without one group of the
    training patients (:func:`ctguard.engine.train_verifier.cross_fit_groups`), in
    ``out/cross_fit{g}/``; one whose config there is the same but for the second stage's settings is
    kept, not trained again."""
    device, groups = _device(cfg), cross_fit_groups(cfg)
    for g, patients in enumerate(groups):
        sub, where = without_patients(cfg, patients), out / f"cross_fit{g}"
        if (where / "model.pt").is_file() and network_settings(json.loads((where / "config.json").read_text())) == network_settings(sub):
            echo(f"cross-fit network {g + 1} (without {', '.join(patients)}): kept from {where}")
            continue
        where.mkdir(parents=True, exist_ok=True)
        (where / "config.json").write_text(json.dumps(sub, indent=2) + "\n")
        echo(f"cross-fit network {g + 1} of {len(groups)}: the recipe without {', '.join(patients)}")
        torch.manual_seed(int(cfg["seed"]) + 1 + g)
        np.random.seed(int(cfg["seed"]) + 1 + g)
        _train(sub, where, device, pool, progress, lambda m, g=g: echo(f"  [cross-fit {g + 1}] {m}"))


def cubes_digest(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of training cubes ``x`` (whole HU, int16) and their cells' targets ``y`` (as int64),
    shapes included: the same for the same data on any machine."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(x, dtype=np.int16), np.ascontiguousarray(y, dtype=np.int64)):
        h.update(json.dumps([str(a.dtype), list(a.shape)]).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def machine_facts(device: str = "CPU") -> dict:
    """What a run was trained on, beside its numbers: the CPU's model and cores, the device, and the
    versions of the libraries whose arithmetic makes the weights (a run made again elsewhere may
    differ in its last bits; these say whether the machine, not the data, is why)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}


def save_run(out: Path, model: nn.Module, cfg: dict, arch: str, history: list[dict], sizes: dict, t0: float, t_data: float, echo,
             data_word: str) -> dict:
    """Writes a detector run: ``history.csv``, ``model.pt`` (weights, config, classes, ``arch``), its
    ONNX export ``model.onnx`` (what screening runs on, with or without PyTorch) and ``summary.json``
    (with :func:`machine_facts`); returns the summary."""
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    device = next(model.parameters()).device
    device = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model.cpu().eval()
    torch.save({"model": model.state_dict(), "config": cfg, "classes": CLASSES, "arch": arch}, out / "model.pt")
    try:
        from ctguard.screen import export_onnx

        export_onnx(model, out / "model.onnx")
    except Exception as e:  # the checkpoint is what matters; screening falls back to PyTorch without the export
        echo(f"warning: could not export {out / 'model.onnx'} ({e.__class__.__name__}: {e}); screening will use PyTorch")
    summary = {**sizes, "data_seconds": round(t_data, 1), "train_seconds": round(time.time() - t0 - t_data, 1),
               "machine": machine_facts(device), "history": history}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(f"trained in {summary['train_seconds']} s (+{summary['data_seconds']} s {data_word}); wrote {out / 'model.pt'}")
    return summary


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Rare edit cells count more: inverse frequency to the power 0.5 (0.7 gave 74 false findings per
    demo scan), normalised to a mean of 1."""
    w = torch.tensor((counts.sum() / np.maximum(counts, 1)) ** 0.5, dtype=torch.float32)
    return w / w.mean()


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, cfg: dict, progress: bool, weights: torch.Tensor,
        first_epoch: int = 0, augment=_augment) -> list[dict]:
    """Trains a dense detector in place on blocks ``x`` (HU) with cell targets ``y``: AdamW with a
    one-cycle schedule, class-weighted cross-entropy, ``augment(x, y, generator)`` on each batch.
    One history row per epoch. The 3D and the 2D detector both train with it."""
    from tqdm import tqdm

    if epochs <= 0:
        return []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(x) / cfg["batch_size"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    dev = next(model.parameters()).device
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(dev))
    gen = torch.Generator().manual_seed(cfg["seed"] + first_epoch)
    xt = torch.from_numpy(x)[:, None]  # normalised per batch: no second copy of the data
    yt = torch.from_numpy(y)
    if dev.type == "cuda":  # the blocks stay on the GPU (int16 HU: 4 GB for 8,000 cubes of 64 mm)
        xt, yt = xt.to(dev), yt.to(dev)
    history = []
    for epoch in range(first_epoch, first_epoch + epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        t_ep, tot, correct, cells = time.time(), 0.0, 0, 0
        bar = tqdm(range(0, len(order), cfg["batch_size"]), desc=f"epoch {epoch + 1}", disable=not progress)
        for i in bar:
            idx = order[i : i + cfg["batch_size"]].to(xt.device)
            xb, yb = augment(normalise(xt[idx].float()).to(dev), yt[idx].to(dev), gen)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            cells += yb.numel()
            bar.set_postfix(loss=f"{tot / (i + len(idx)):.3f}", acc=f"{correct / cells:.3f}")
        history.append({"epoch": epoch + 1, "loss": tot / len(xt), "accuracy": correct / cells, "lr": sched.get_last_lr()[0],
                        "seconds": round(time.time() - t_ep, 1)})
    model.eval()
    return history


def _clean_scan(job: tuple):
    """A clean scan for mining (a :func:`source_specs` entry, untouched) and its lung mask (a pool task)."""
    from ctguard.lung import lung_mask

    cfg, spec = job
    vol = build_source(cfg, spec).volume  # the mining specs name no tumours: none are read
    return vol, lung_mask(vol)


def mine_hard_negatives(model: nn.Module, cfg: dict, round_: int, progress: bool, pool=None) -> tuple[np.ndarray, np.ndarray]:
    """Screens clean scans (fresh phantoms, and the training patients' own untouched series) with the
    current model; every place it flags there is genuine by construction, so a cube around it (all
    cells genuine) teaches the detector what it gets wrong: vessels, hilum, pleura, real tumours.
    With ``real_thick`` the series' thicker-slice versions are screened too. ``pool`` makes the
    clean scans in worker processes while the network screens."""
    from tqdm import tqdm

    from ctguard.screen import Detector, findings_from, heatmap
    from ctguard.tamper.cube import cut

    model.eval()
    det = Detector(model, "mining", "", "")
    rng = np.random.default_rng([cfg["seed"], 77, round_])
    size, half = cfg["cube"], cfg["cube"] // 2
    n_cells = size // 8
    specs = [("phantom", cfg["seed"] * 1000 + 500 + round_ * 100 + k) for k in range(int(cfg["hard_phantoms"]))]
    paths = [p for p, _ in real_scans(cfg)]
    specs += [("series", p, 1, None) for p in paths] + [("series", p, int(f), None) for p in paths for f in cfg.get("real_thick") or []]
    scans = (pool.imap if pool is not None else map)(_clean_scan, [(cfg, spec) for spec in specs])
    xs = []
    for vol, lungs in tqdm(scans, total=len(specs), desc="mine hard negatives", disable=not progress):
        found = findings_from(heatmap(vol, det, lungs), vol, float(cfg["hard_threshold"]))[: int(cfg["hard_max_per_scan"])]
        for f in found:
            c = np.clip(np.asarray(f["voxel"]) + rng.uniform(-8, 8, 3) / np.asarray(vol.spacing), 0, np.asarray(vol.shape) - 1)
            xs.append(cut(vol, c, half).hu[:size, :size, :size])
    if not xs:
        return np.zeros((0, size, size, size), np.float32), np.zeros((0, n_cells, n_cells, n_cells), np.int64)
    return np.stack(xs).astype(np.float32), np.zeros((len(xs), n_cells, n_cells, n_cells), np.int64)
