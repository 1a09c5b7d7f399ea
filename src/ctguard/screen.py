"""Whole-scan screening: lungs -> one fully convolutional pass at 1 mm -> heatmap -> findings -> verdict."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from scipy import ndimage

from ctguard import __version__
from ctguard.errors import InputError
from ctguard.lung import lung_mask
from ctguard.models.grid import STRIDE, normalise_array, softmax
from ctguard.verifier import TRACE_MIN_FREQUENCY, ScanReading, blob_map, has_ripple, lung_extent, lung_maps, recentred, scan_noise, smooth_map, strongest_peaks, taken_candidates, trace_map
from ctguard.volume import Turn, Volume, plane, resample_array, resample_nearest, turned

DEFAULT_MODEL = "tamper3d"
THRESHOLD = 0.5  # a finding's tamper probability needed to report it, where a model has no card (the bundled ones carry theirs)
NMS_MM = 24.0
MARGIN_MM = 8.0
MIN_EXTENT_MM = 24.0
INSTALL_TORCH = "pip install 'ctguard[train]'"


@dataclass
class Detector:
    """A loaded detector and its identity. It runs on onnxruntime when its .onnx is at hand
    (``session``), else on PyTorch (``net``); screening needs only one of the two."""

    net: Any  # the torch network; None until :meth:`torch_net` builds it, where the ONNX export runs
    name: str
    version: str
    path: str
    threshold: float = THRESHOLD
    card: dict = field(default_factory=dict)
    session: Any = None  # an onnxruntime session of the same network
    dims: int = 3  # 3: the volume detector on 1 mm blocks; 2: the slice detector on 1 mm planes
    load_net: Callable[[], Any] | None = field(default=None, repr=False)  # builds ``net`` from its checkpoint
    verifier: Any = None  # the second stage (ctguard.verifier.Verifier) that re-scores the network's candidates, if any

    def torch_net(self):
        """The PyTorch network, read from its checkpoint on first use (screening on onnxruntime never
        needs it, so it never pays for importing torch)."""
        if self.net is None:
            if self.load_net is None:
                raise InputError("this detector was loaded from its ONNX export alone: no PyTorch network to run", self.path)
            self.net = self.load_net()
        return self.net

    def probabilities(self, hu_1mm: np.ndarray, overwrite: bool = False) -> np.ndarray:
        """Class probabilities ``(3, z/8, y/8, x/8)`` for a 1 mm block (padded with air to a multiple
        of 8); ``(3, y/8, x/8)`` for a 2D detector and a 1 mm plane. ``overwrite``: a float32 block
        already a multiple of 8 may be normalised in place (no copy of a whole scan's block)."""
        if overwrite and hu_1mm.dtype == np.float32 and hu_1mm.flags.c_contiguous and not any(n % STRIDE for n in hu_1mm.shape):
            x = hu_1mm
        else:
            x = padded_block(hu_1mm.shape)
            x[tuple(slice(0, n) for n in hu_1mm.shape)] = hu_1mm
        x = normalise_array(x, out=x)[None, None]
        if self.session is not None:
            logits = self.session.run(None, {"hu": x})[0]
        else:
            import torch

            net = self.torch_net()
            with torch.inference_mode():  # on the network's device (a GPU while training on one)
                logits = net(torch.from_numpy(x).to(next(net.parameters()).device)).cpu().numpy()
        return softmax(logits, axis=1)[0]


def padded_block(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 block of ``shape`` rounded up to a multiple of the detector's stride, air (-1000 HU)
    in the rounding; the caller fills ``block[:shape]``."""
    x = np.empty([n + (-n) % STRIDE for n in shape], dtype=np.float32)
    for axis, n in enumerate(shape):  # only the rounding is written here: a scan's block is hundreds of MB
        x[(slice(None),) * axis + (slice(n, None),)] = -1000.0
    return x


def export_onnx(net, path: str | Path) -> Path:
    """Writes a detector network (3D or 2D) as ONNX (opset 17, any block size), for onnxruntime."""
    import torch

    path = Path(path)
    if any(isinstance(m, torch.nn.Conv2d) for m in net.modules()):
        x, axes_in, axes_out = torch.zeros(1, 1, 64, 64), {2: "y", 3: "x"}, {2: "gy", 3: "gx"}
    else:
        x, axes_in, axes_out = torch.zeros(1, 1, 64, 64, 64), {2: "z", 3: "y", 4: "x"}, {2: "gz", 3: "gy", 4: "gx"}
    torch.onnx.export(net.eval(), (x,), str(path), input_names=["hu"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"hu": axes_in, "logits": axes_out})
    return path


def _onnx_session(onnx_path: Path):
    """An onnxruntime session for ``onnx_path``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("running an ONNX detector needs onnxruntime (pip install onnxruntime)", onnx_path) from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Its threads sleep between runs instead of spinning: screening reads the scan beside the network
    # in a thread of its own, which spinning threads starve (measured: the two together 0.49-0.52 s
    # instead of 0.56-0.59 on 2 cores; the same probabilities).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"not a loadable ONNX model ({e.__class__.__name__})", onnx_path) from None


def _load_onnx(path: Path, dims: int, label: str) -> Detector:
    """A detector on its ONNX export: ``path`` itself when it is the .onnx, else the .onnx beside it;
    its card from the .json beside it, where there is one."""
    onnx_path = path.with_suffix(".onnx")
    if not onnx_path.is_file():
        raise InputError(f"a PyTorch checkpoint needs PyTorch to load ({INSTALL_TORCH}), or its .onnx export beside it", path)
    session = _onnx_session(onnx_path)
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != "hu" or len(inputs[0].shape) != dims + 2:
        raise InputError(f"not a {label} tamper detector (its input is not one {dims}D block named 'hu')", onnx_path)
    card_path = path.with_suffix(".json")
    try:
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise InputError(f"the model card beside the detector is unreadable ({e.__class__.__name__})", card_path) from None
    return Detector(None, card.get("name", path.stem), card.get("version", __version__), str(path),
                    float(card.get("threshold", THRESHOLD)), card, session, dims)


def _read_checkpoint(path: Path, arch: str, build: Callable[[dict], Any], label: str) -> tuple[Any, dict]:
    """The PyTorch network in a ``ctguard train`` checkpoint, and its card."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"not a loadable checkpoint ({e.__class__.__name__})", path) from None
    if not isinstance(ckpt, dict) or ckpt.get("arch") != arch:
        raise InputError(f"not a {label} tamper detector checkpoint (arch {ckpt.get('arch') if isinstance(ckpt, dict) else '?'})", path)
    net = build(ckpt["config"])
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise InputError(f"checkpoint weights do not fit the {label} detector's architecture", path) from None
    return net.eval(), ckpt.get("card", {})


def _load(name_or_path: str | None, default: str, arch: str, build: Callable[[dict], Any], label: str) -> Detector:
    """A detector: the bundled ``default`` (for None, 'tamper3d' or ``default``), a checkpoint written
    by ``ctguard train`` or an .onnx export; ``build(config)`` makes the network the weights go into.
    A checkpoint with its .onnx beside runs on onnxruntime (its card from the .json beside it) and
    reads the checkpoint only if the PyTorch network is asked for; PyTorch runs it where
    CTGUARD_RUNTIME=torch, or where there is no .onnx or no onnxruntime."""
    det = _load_network(name_or_path, default, arch, build, label)
    verifier = Path(det.path).with_suffix(".verifier.npz")
    if verifier.is_file():
        from ctguard.verifier import Verifier

        det.verifier = Verifier.load(verifier)
        if bool(det.verifier.meta.get("slice")) != (det.dims == 2):
            raise InputError(f"this second stage is for {'a single slice' if det.verifier.meta.get('slice') else 'a whole scan'}, "
                             f"not the {label} detector beside it", verifier)
        if "threshold" not in det.card:  # a run of ctguard train: the second stage's own threshold
            det.threshold = float(det.verifier.meta.get("threshold", det.threshold))
    return det


def _load_network(name_or_path: str | None, default: str, arch: str, build: Callable[[dict], Any], label: str) -> Detector:
    dims = 2 if arch == "tamper2d" else 3
    if name_or_path in (None, DEFAULT_MODEL, default):
        path = Path(str(resources.files("ctguard") / "weights" / f"{default}.pt"))
        if not path.is_file():
            raise InputError(f"the bundled {label} detector is missing from the installation (reinstall ctguard)", path)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise InputError(f"no such model file (give a checkpoint from ctguard train, its .onnx, or '{default}')", path)
    have_torch = find_spec("torch") is not None
    onnx_wanted = (os.environ.get("CTGUARD_RUNTIME", "onnx") != "torch" and path.with_suffix(".onnx").is_file()
                   and find_spec("onnxruntime") is not None)
    if path.suffix == ".onnx" or not have_torch or onnx_wanted:
        det = _load_onnx(path, dims, label)
        if have_torch and path.suffix != ".onnx":
            det.load_net = lambda: _read_checkpoint(path, arch, build, label)[0]
        return det
    net, card = _read_checkpoint(path, arch, build, label)
    return Detector(net, card.get("name", path.stem), card.get("version", __version__), str(path),
                    float(card.get("threshold", THRESHOLD)), card, None, dims)


_LOADED: dict[tuple, Detector] = {}


def _cached(name_or_path: str | None, load: Callable[[], Detector], dims: int) -> Detector:
    """One load per process of each detector file (an archive audit screens thousands of series with
    one); a file changed on disk is loaded afresh."""
    path = Path(name_or_path) if name_or_path not in (None, DEFAULT_MODEL, "tamper2d") else None
    if path is not None and not path.is_file():
        return load()  # missing: let the loader say so
    # The checkpoint, its ONNX export and its card: a change to any of them is a new detector.
    stamp = tuple(p.stat().st_mtime_ns if p.is_file() else None
                  for p in (path, path.with_suffix(".onnx"), path.with_suffix(".json"), path.with_suffix(".verifier.npz"),
                            path.with_suffix(".patches.onnx"))) \
        if path is not None else ()
    key = (dims, str(name_or_path), stamp)
    if key not in _LOADED:
        _LOADED[key] = load()
    return _LOADED[key]


def load_detector(name_or_path: str | None = None) -> Detector:
    """Loads the bundled 3D detector (default) or a checkpoint written by ``ctguard train``.

    Raises:
        InputError: the file is missing or is not a ctguard 3D detector checkpoint.
    """
    def build(cfg: dict):
        from ctguard.models.cube3d import build as build_net

        return build_net(cfg)

    return _cached(name_or_path, lambda: _load(name_or_path, DEFAULT_MODEL, "tamper3d", build, "3D"), 3)


def _lung_box(vol: Volume, lungs: np.ndarray) -> tuple[slice, ...]:
    """The lungs' box (:func:`ctguard.verifier.lung_extent`) widened by :data:`MARGIN_MM`."""
    idx = lung_extent(lungs)
    margin = np.ceil(MARGIN_MM / np.asarray(vol.spacing)).astype(int)
    lo = np.maximum(np.array([i[0] for i in idx]) - margin, 0)
    hi = np.minimum(np.array([i[-1] for i in idx]) + margin + 1, vol.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def check_screenable(vol: Volume) -> None:
    """Refuses what cannot be screened in 3D, with the reason."""
    if vol.meta.get("kind") == "image" or vol.shape[0] == 1:
        raise InputError("a single 2D image or slice cannot be screened in 3D; give the whole series", vol.meta.get("root"))
    extent = vol.shape[0] * vol.spacing[0]
    if extent < MIN_EXTENT_MM:
        raise InputError(f"the scan covers only {extent:.0f} mm ({vol.shape[0]} slices); at least {MIN_EXTENT_MM:.0f} mm are needed to screen in 3D")


@dataclass
class Heatmap:
    """Probabilities on the detector's grid and how they map back to the scan's voxels."""

    probs: np.ndarray  # (3, gz, gy, gx), cells of STRIDE mm
    box: tuple[slice, ...]  # the scan's voxels that were screened
    spacing: tuple[float, float, float]  # the scan's voxel size

    def cell_to_voxel(self, cell: np.ndarray) -> np.ndarray:
        """Fractional cell index -> the scan's fractional voxel index ``(z, y, x)``."""
        mm = np.asarray(cell, float) * STRIDE + (STRIDE - 1) / 2.0
        lo = np.array([s.start for s in self.box], float)
        return lo + mm / np.asarray(self.spacing)

    def probabilities_at(self, voxels: np.ndarray) -> np.ndarray:
        """``(n, 3)`` the probabilities of the cells holding ``voxels`` (the scan's, ``(n, 3)``)."""
        lo = np.array([s.start for s in self.box], float)
        cell = np.floor((np.asarray(voxels, float).reshape(-1, 3) - lo) * np.asarray(self.spacing) / STRIDE).astype(int)
        cell = np.clip(cell, 0, np.asarray(self.probs.shape[1:]) - 1)
        return self.probs[:, cell[:, 0], cell[:, 1], cell[:, 2]].T.astype(float)

    def tampered_on_voxels(self, shape: tuple[int, int, int]) -> np.ndarray:
        """``1 - p(genuine)`` resampled onto the scan's voxel grid (0 outside the screened box)."""
        out = np.zeros(shape, dtype=np.float32)
        sub = tuple(s.stop - s.start for s in self.box)
        p = (1.0 - self.probs[0]).astype(np.float32)
        # Trilinear on a tensor-product grid is three 1D linear interpolations, one axis after the
        # other (the same values as map_coordinates(order=1, mode="nearest"), in less than half the time).
        for axis, (n, sp) in enumerate(zip(sub, self.spacing)):
            c = np.clip(((np.arange(n) * sp) - (STRIDE - 1) / 2.0) / STRIDE, 0, p.shape[axis] - 1)
            i0 = np.floor(c).astype(np.intp)
            i1 = np.minimum(i0 + 1, p.shape[axis] - 1)
            w = (c - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
            a, b = np.take(p, i0, axis=axis), np.take(p, i1, axis=axis)
            p = a + (b - a) * w
        out[self.box] = p
        return out


def heatmap(vol: Volume, detector: Detector, lungs: np.ndarray, box: tuple[slice, ...] | None = None) -> Heatmap:
    """The detector's probabilities over ``box`` (default: the lungs and an 8 mm margin) at 1 mm;
    cells with no lung are genuine."""
    box = _lung_box(vol, lungs) if box is None else box
    lung_1mm = resample_nearest(lungs[box], vol.spacing, (1.0, 1.0, 1.0))
    if detector.dims == 2:  # a single slice: its first 1 mm plane, one cell deep
        block = resample_array(vol.hu[box], vol.spacing, (1.0, 1.0, 1.0))
        lung_1mm = lung_1mm[:1]
        probs = detector.probabilities(block[0])[:, None]
    else:  # resampled straight into the network's padded input
        block = padded_block(lung_1mm.shape)
        resample_array(vol.hu[box], vol.spacing, (1.0, 1.0, 1.0), out=block[tuple(slice(0, n) for n in lung_1mm.shape)])
        probs = detector.probabilities(block, overwrite=True)
    # Only lung counts: cells with no lung voxel are genuine by definition.
    pad = [(0, (-n) % STRIDE) for n in lung_1mm.shape]
    lung_1mm = np.pad(lung_1mm, pad)
    g = tuple(n // STRIDE for n in lung_1mm.shape)
    # Over z and y first, where each reduced run is a whole row long, then over x (any() over a 6D
    # view whose innermost run is one cell wide is 20x slower).
    in_lung = lung_1mm.reshape(g[0], STRIDE, g[1], STRIDE, g[2] * STRIDE).any(axis=(1, 3)).reshape(*g, STRIDE).any(axis=-1)
    probs = probs[:, : g[0], : g[1], : g[2]]
    probs[1:, ~in_lung] = 0.0
    probs[0, ~in_lung] = 1.0
    return Heatmap(probs, box, vol.spacing)


def kind_of(p_injected: float, p_removed: float) -> str:
    """A tampered place's kind: the likelier of the two (a tie is an injection)."""
    return "injected" if p_injected >= p_removed else "removed"


UNDER_SHOWN = 5  # the highest places under the threshold the result lists, for a reader to review


def findings_from(heat: Heatmap, vol: Volume, threshold: float, nms_mm: float = NMS_MM) -> list[dict[str, Any]]:
    """Local maxima of the tamper probability, with non-maximum suppression over ``nms_mm``."""
    p_t = 1.0 - heat.probs[0]
    peaks = (p_t == ndimage.maximum_filter(p_t, size=3)) & (p_t >= threshold)
    cand = sorted((tuple(c) for c in np.argwhere(peaks)), key=lambda c: -p_t[c])
    kept: list[dict[str, Any]] = []
    regions: dict[float, tuple[np.ndarray, np.ndarray]] = {}  # by level: the labelled cells over it and each region's size
    # The cells closer than nms_mm to a kept candidate, marked as each is kept: a candidate is then
    # checked in one look instead of against every kept one (which took minutes for the many maxima
    # of a low threshold). Cells are whole, so the squared distances are exact.
    reach = int(np.ceil(nms_mm / STRIDE))
    offsets = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    offsets = offsets[((offsets * STRIDE) ** 2).sum(1) < nms_mm**2]
    suppressed = np.zeros(p_t.shape, dtype=bool)
    for c in cand:
        if suppressed[c]:
            continue
        c_arr = np.asarray(c)
        near = c_arr + offsets
        near = near[((near >= 0) & (near < p_t.shape)).all(1)]
        suppressed[tuple(near.T)] = True
        lo = np.maximum(c_arr - 1, 0)
        hi = np.minimum(c_arr + 2, p_t.shape)
        win = p_t[tuple(slice(a, b) for a, b in zip(lo, hi))]
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
        centroid = (grid * win[..., None]).sum((0, 1, 2)) / max(win.sum(), 1e-6)
        voxel = heat.cell_to_voxel(centroid)
        voxel = np.clip(voxel, 0, np.asarray(vol.shape) - 1)
        p_inj, p_rem = float(heat.probs[1][c]), float(heat.probs[2][c])
        # Radius: the equivalent sphere of the connected cells above half the peak.
        level = max(threshold, p_t[c] / 2)
        if float(level) not in regions:  # most candidates share the threshold as their level: labelled once
            region, _ = ndimage.label(p_t >= level)
            regions[float(level)] = region, np.bincount(region.ravel())
        region, sizes = regions[float(level)]
        n_cells = int(sizes[region[c]])
        radius = float((3 * n_cells * STRIDE**3 / (4 * np.pi)) ** (1 / 3))
        kept.append({
            "kind": kind_of(p_inj, p_rem),
            "score": round(float(p_t[c]), 4),
            "voxel": [round(float(v), 1) for v in voxel],
            "world_mm": [round(float(v), 2) for v in vol.voxel_to_world(voxel)],
            "radius_mm": round(radius, 1),
            "p_injected": round(p_inj, 4),
            "p_removed": round(p_rem, 4),
        })
    return kept


def label_map_note(vol: Volume) -> str | None:
    """What a volume with no lungs holds where it is a label map or mask, not a CT: 0 and a few more
    whole values (a CT's air is near -1000 HU); None otherwise."""
    sample = vol.hu[::2, ::4, ::4]  # a quick look first: most scans are told apart by it
    if sample.size == 0 or sample.min() < 0 or len(np.unique(sample)) > 64:
        return None
    hu = vol.hu
    if hu.min() < 0 or hu.max() > 65535 or not np.array_equal(hu, np.rint(hu)):
        return None
    values = np.flatnonzero(np.bincount(hu.astype(np.uint16).ravel()))  # whole values from 0 to 65535, checked above
    if not 2 <= len(values) <= 64 or values[0] != 0:  # a label map's background is 0
        return None
    return f"not a CT: its voxels hold only {len(values)} whole values from {values[0]} to {values[-1]} (a label map or mask)"


def screen_volume(vol: Volume, detector: Detector, input_name: str = "", progress: bool = False,
                  threshold: float | None = None, stage: Callable[[str], None] | None = None,
                  stage2: bool = True) -> tuple[dict[str, Any], Heatmap, np.ndarray]:
    """Screens a volume. Returns ``(result JSON, heatmap, lung mask)``. A detector with a second
    stage re-scores the network's candidates with it (``stage2=False``: the network alone). A
    coronal or sagittal series is screened in axial order (:func:`axial_view`), its places given
    on its own voxels."""
    view = axial_view(vol)
    if view is not None:
        axial, turn = view
        result, heat, lungs = screen_volume(axial, detector, input_name, progress, threshold, stage, stage2)
        for place in (p for key in ("findings", "under_threshold") for p in result[key]):
            _on_voxels_of(vol, place)
        result.update(shape=list(vol.shape), spacing_mm=[round(float(s), 6) for s in vol.spacing])
        result["warnings"].append(f"{input_name or 'the series'}: its slices are not axial (a reformat): screened in axial "
                                  "order, as the detector reads scans; places are given on the series' own voxels")
        return result, TurnedHeatmap(heat, turn, axial.shape), turn.back(lungs)
    t0 = time.time()
    check_screenable(vol)
    if stage:
        stage("lungs")
    lungs = lung_mask(vol)
    if lungs.sum() * np.prod(vol.spacing) < 50_000:  # < 50 ml
        raise InputError(label_map_note(vol) or "no lungs in view (is this a chest CT?)", input_name or None)
    if stage:
        stage("detector")
    verifier = getattr(detector, "verifier", None) if stage2 else None
    if verifier is None:
        heat, reading = heatmap(vol, detector, lungs), None
    else:  # what the stage reads of the whole scan, in a thread beside the network (which leaves a core partly idle)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(verifier.read_scan, vol, lungs)
            heat = heatmap(vol, detector, lungs)
            reading = reading.result()
    if stage:
        stage("findings")
    warnings = list(vol.warnings)
    if verifier is not None and verifier.meta.get("resampling") and not has_ripple(vol):
        how = ("it scores this scan with its trees that do not read the trace, at their own thresholds, and finds fewer edits on such scans"
               if verifier.blind is not None else "the detector finds fewer edits on such scans and may flag untouched lung")
        warnings.append(f"{input_name or 'the series'}: pixels of {'/'.join(f'{s:.3f}' for s in vol.spacing[1:])} mm, within "
                        f"{TRACE_MIN_FREQUENCY} mm of a whole millimetre, leave the second stage's resampling trace nothing to read: "
                        f"{how} (README, 'Where it does not hold')")
    return _result(vol, detector, heat, threshold, input_name, warnings, t0, lungs, verifier, reading), heat, lungs


def axial_view(vol: Volume) -> tuple[Volume, Turn] | None:
    """A series whose slices are not axial (a coronal or sagittal reformat), as an axial volume of
    the same voxels (:func:`ctguard.volume.turned`): the detector reads axial cubes. None for an
    axial series, a single slice, or an oblique series (screened as it is)."""
    if vol.shape[0] == 1 or plane(np.asarray(vol.direction)[:, 2]) not in ("coronal", "sagittal"):
        return None
    return turned(vol, np.eye(3))


def _on_voxels_of(vol: Volume, place: dict[str, Any]) -> None:
    """A place found on another grid of ``vol``'s voxels (its ``world_mm`` kept): its ``voxel``, and
    those of the places merged into it, on ``vol``'s grid."""
    if "world_mm" in place and "voxel" in place:
        place["voxel"] = [round(float(v), 1) for v in vol.world_to_voxel(place["world_mm"])]
    for value in place.values():
        for inner in value if isinstance(value, list) else [value]:
            if isinstance(inner, dict):
                _on_voxels_of(vol, inner)


@dataclass
class TurnedHeatmap:
    """A :class:`Heatmap` of a series screened in axial order (:func:`axial_view`), on the series'
    own voxels."""

    heat: Heatmap
    turn: Turn
    shape: tuple[int, int, int]  # the axial view's

    def tampered_on_voxels(self, shape: tuple[int, int, int]) -> np.ndarray:
        return np.ascontiguousarray(self.turn.back(self.heat.tampered_on_voxels(self.shape)))


def finding_probabilities(findings: list[dict[str, Any]]) -> np.ndarray:
    """``(n, 3)`` the network's probabilities genuine, injected, removed at its findings' peaks."""
    return np.array([[1 - f["p_injected"] - f["p_removed"], f["p_injected"], f["p_removed"]] for f in findings]).reshape(-1, 3)


def stage_candidates(heat: Heatmap, vol: Volume, verifier, threshold: float = 1.0, lungs: np.ndarray | None = None,
                     noise: tuple[float, float] | None = None,
                     trace: tuple[np.ndarray, np.ndarray] | None = None,
                     smooth: tuple[np.ndarray, np.ndarray] | None = None,
                     blob: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """The network's findings a second stage re-scores: from the stage's ``candidate_threshold``
    (or ``threshold`` where that is lower), at most its ``max_candidates``, best first; a stage
    with ``trace_order`` in its meta takes them in that order (:func:`ctguard.verifier.taken_candidates`,
    which then needs the scan's ``lungs``); one with ``trace_peaks`` n in its meta then also takes
    the resampling trace's n strongest peaks not already among them (:func:`trace_candidates`), and
    one with ``smooth_peaks`` m the smooth map's m strongest peaks not among those
    (:func:`smooth_candidates`), and one with ``blob_peaks`` k the blob map's k strongest not
    among any of those. ``noise``, ``trace``, ``smooth`` and ``blob``: the scan's
    :func:`ctguard.verifier.scan_noise`, :func:`ctguard.verifier.trace_map`,
    :func:`ctguard.verifier.smooth_map` and :func:`ctguard.verifier.blob_map`, where the caller has
    them (:class:`ScanReading`)."""
    cand_thr = min(float(verifier.meta.get("candidate_threshold", 0.3)), threshold)
    weight = verifier.meta.get("trace_order")
    noise_xy = None if noise is None else noise[0]
    taken = taken_candidates(findings_from(heat, vol, cand_thr), vol, lungs, int(verifier.meta.get("max_candidates", 40)),
                             None if weight is None else float(weight), noise_xy)
    taken = [{**f, "source": "network"} for f in taken]
    n_peaks, n_smooth, n_blob = (int(verifier.meta.get(k, 0)) for k in ("trace_peaks", "smooth_peaks", "blob_peaks"))
    if not (n_peaks or n_smooth or n_blob):
        return taken
    if lungs is None:
        raise ValueError("this second stage also takes peaks of the lungs' maps as candidates: pass the lung mask")
    want_trace, want_smooth = n_peaks > 0 and trace is None, n_smooth > 0 and smooth is None
    if want_trace or want_smooth:  # the maps the caller has not read, from one pass
        read_trace, read_smooth = lung_maps(vol, lungs, scan_noise(vol, lungs)[0] if noise_xy is None else noise_xy,
                                            trace=want_trace, smooth=want_smooth)
        trace, smooth = read_trace if want_trace else trace, read_smooth if want_smooth else smooth
    taken = taken + peak_candidates(heat, vol, trace, n_peaks, taken, "trace")
    taken = taken + peak_candidates(heat, vol, smooth, n_smooth, taken, "smooth")
    if n_blob and blob is None:
        blob = blob_map(vol, lungs)
    return taken + peak_candidates(heat, vol, blob, n_blob, taken, "blob")


TRACE_PEAK_RADIUS_MM = 8.0  # the radius a candidate from the trace's map reports (the map's window)


def trace_candidates(heat: Heatmap, vol: Volume, lungs: np.ndarray, n: int, taken: list[dict[str, Any]],
                     noise_xy: float | None = None, trace: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """The resampling trace's ``n`` strongest peaks over the lungs (:func:`ctguard.verifier.trace_peaks`)
    that are not already among the network's candidates ``taken``, as candidates of the same form,
    each with the network's probabilities of its cell: what a second stage with ``trace_peaks`` in
    its meta also scores, in screening and in its training rows alike. ``trace``: the scan's
    :func:`ctguard.verifier.trace_map`, where the caller has it (then ``noise_xy`` is not needed)."""
    if trace is None and n > 0:
        trace = trace_map(vol, lungs, scan_noise(vol, lungs)[0] if noise_xy is None else noise_xy)
    return peak_candidates(heat, vol, trace, n, taken)


def smooth_candidates(heat: Heatmap, vol: Volume, lungs: np.ndarray, n: int, taken: list[dict[str, Any]],
                      noise_xy: float | None = None, smooth: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """The smooth map's ``n`` strongest peaks over the lungs (:func:`ctguard.verifier.smooth_map`:
    where the lung is smoother than around it, as a place filled by in-painting is) not already
    among ``taken``, as :func:`trace_candidates` gives the trace's. ``smooth``: the scan's map,
    where the caller has it."""
    if smooth is None and n > 0:
        smooth = smooth_map(vol, lungs, scan_noise(vol, lungs)[0] if noise_xy is None else noise_xy)
    return peak_candidates(heat, vol, smooth, n, taken, "smooth")


def peak_candidates(heat: Heatmap, vol: Volume, found: tuple[np.ndarray, np.ndarray] | None, n: int,
                    taken: list[dict[str, Any]], source: str = "trace") -> list[dict[str, Any]]:
    """The ``n`` strongest peaks of a map over the lungs ``found`` (``(score, centres)``; None: no
    map) not within one cell of a candidate of ``taken`` (:func:`ctguard.verifier.strongest_peaks`),
    as candidates with the network's probabilities of their cells, their ``source`` the map's name."""
    at = np.asarray([f["voxel"] for f in taken], float).reshape(-1, 3)
    peaks = strongest_peaks(found, vol.spacing, n, at)
    out = []
    for v, p in zip(peaks, heat.probabilities_at(peaks)):
        out.append({"kind": kind_of(p[1], p[2]), "score": round(float(1.0 - p[0]), 4),
                    "voxel": [round(float(c), 1) for c in v], "world_mm": [round(float(c), 2) for c in vol.voxel_to_world(v)],
                    "radius_mm": TRACE_PEAK_RADIUS_MM, "p_injected": round(float(p[1]), 4), "p_removed": round(float(p[2]), 4),
                    "source": source})
    return out


def verify_findings(vol: Volume, lungs: np.ndarray, candidates: list[dict[str, Any]], verifier,
                    noise: tuple[float, float] | None = None, trace_reference: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The second stage on the network's candidates: each re-scored at the scan's own voxels
    (:mod:`ctguard.verifier`), its kind the stage's, best first. The network's own score stays in
    ``network_score``. A stage with ``refine_from`` in its meta takes a second look at each
    candidate scoring that or more: scored again at its two re-centred places
    (:func:`ctguard.verifier.recentred`, the densest and the smoothest point within 10 mm), where
    the network's 8 mm cells may have put it off an edit's centre; the highest of the three is the
    finding, at its place. ``noise`` and ``trace_reference``: the scan's
    :func:`ctguard.verifier.scan_noise` and :func:`ctguard.verifier.scan_trace`, where the caller
    has them (:class:`ScanReading`)."""
    if not candidates:
        return []
    at = np.asarray([f["voxel"] for f in candidates], float)
    p_net = finding_probabilities(candidates)
    p = verifier.score_places(vol, at, p_net, lungs, candidates=True, noise=noise, trace_reference=trace_reference)
    start = verifier.meta.get("refine_from")
    if start is not None:  # a second look: a candidate that may be an edit, scored again where its nodule or its in-painting is centred
        again = np.flatnonzero(1.0 - p[:, 0] >= float(start))
        if len(again):
            alt = np.concatenate([recentred(vol, at[k]) for k in again])
            q = verifier.score_places(vol, alt, np.repeat(p_net[again], 2, axis=0), lungs, candidates=True,
                                      noise=noise, trace_reference=trace_reference).reshape(len(again), 2, 3)
            for j, (k, qk) in enumerate(zip(again, q)):
                best = int(np.argmin(qk[:, 0]))
                if qk[best, 0] < p[k, 0]:
                    p[k], at[k] = qk[best], alt[2 * j + best]
    out = []
    for f, pv, v in zip(candidates, p, at):
        moved = {"voxel": [round(float(c), 1) for c in v], "world_mm": [round(float(c), 2) for c in vol.voxel_to_world(v)]} \
            if not np.allclose(v, f["voxel"]) else {}
        out.append({**f, **moved, "kind": kind_of(pv[1], pv[2]), "score": round(float(1.0 - pv[0]), 4),
                    "p_injected": round(float(pv[1]), 4), "p_removed": round(float(pv[2]), 4), "network_score": f["score"]})
    return sorted(out, key=lambda f: -f["score"])


def merged(scored: list[dict[str, Any]], spacing, within_mm: float = NMS_MM) -> list[dict[str, Any]]:
    """The second stage's scored places (best first), one per edit: a place closer than
    ``within_mm`` (the network's own suppression distance) to a better-scored place of the same kind
    is not listed on its own but in that place's ``also_at`` (its voxel and score). The network's
    candidates lie 24 mm apart, but the trace's and the smooth map's peaks lie 12 mm apart and up to
    4 mm from them, so one edit of 15 mm or more may hold two or three scored places."""
    if not scored:
        return []
    mm = np.asarray([f["voxel"] for f in scored], float) * np.asarray(spacing, float)
    close = np.linalg.norm(mm[:, None] - mm[None], axis=2) < within_mm
    kept: list[int] = []
    out: list[dict[str, Any]] = []
    for i, f in enumerate(scored):
        into = next((j for j, k in enumerate(kept) if close[i, k] and scored[k]["kind"] == f["kind"]), None)
        if into is None:
            kept.append(i)
            out.append(dict(f))
        else:
            out[into].setdefault("also_at", []).append({k: f[k] for k in ("voxel", "score", "source", "threshold") if k in f})
    return out


PEAK_SOURCES = ("trace", "smooth", "blob")  # candidates from the lungs' maps, held to a stage's ``peak_threshold`` where it has one


def checked_threshold(threshold: float) -> float:
    """``threshold`` as a float, or a one-line error where it is not a probability from 0 to 1: over
    1 no scan is ever tampered, under 0 every one is. The CLI's ``--threshold``, the audit and
    screening all check it here."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise InputError(f"a threshold is a probability from 0 to 1, not {threshold:g}")
    return float(threshold)


def source_thresholds(detector: Detector, threshold: float | None = None, vol: Volume | None = None) -> dict[str, float]:
    """The threshold each source of candidates is held to: ``threshold`` for all where given, else
    the detector's own for the network's candidates and, where its second stage chose one of its
    own for the maps' peaks (``peak_threshold`` in its meta), that for the maps' peaks, and for one
    that chose another for the blob map's (``blob_threshold``), that for those. On a scan ``vol``
    that the stage scores with its trace-blind trees (:meth:`ctguard.verifier.Verifier.for_scan`),
    theirs."""
    if threshold is not None:
        return dict.fromkeys(("network", *PEAK_SOURCES), checked_threshold(threshold))
    verifier = getattr(detector, "verifier", None)
    meta = verifier.meta if verifier is not None else {}
    own = float(detector.threshold)
    if verifier is not None and vol is not None and verifier.for_scan(vol) is not verifier:
        meta = verifier.blind.meta
        own = float(meta["threshold"])
    peak = float(meta.get("peak_threshold", own))
    return {"network": own, **dict.fromkeys(PEAK_SOURCES, peak), "blob": float(meta.get("blob_threshold", peak))}


def separate_thresholds(detector: Detector, threshold: float | None = None, vol: Volume | None = None) -> dict[str, float]:
    """The thresholds of :func:`source_thresholds` that a result reports beside ``model.threshold``
    (a second stage that chose them, and no caller's ``threshold`` for all): ``peak_threshold``, the
    maps' peaks', where it is not the network's candidates', and ``blob_threshold``, the blob map's
    peaks', where it is not the other maps' peaks' (on ``vol``, where given)."""
    thresholds = source_thresholds(detector, threshold, vol)
    return {**({"peak_threshold": thresholds["trace"]} if thresholds["trace"] != thresholds["network"] else {}),
            **({"blob_threshold": thresholds["blob"]} if thresholds["blob"] != thresholds["trace"] else {})}


def scored_places(findings: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every place of ``findings`` (:func:`every_place`) on its own, each with the ``kind`` of the
    finding it is listed in and none of its own ``also_at``: the stage's scored places again, as
    :func:`over_own_threshold` takes them."""
    return [{**{k: v for k, v in p.items() if k != "also_at"}, "kind": f["kind"]} for f in findings for p in every_place([f])]


def over_own_threshold(scored: Iterable[dict[str, Any]], spacing, thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """The stage's scored places (each with its ``source``) as screening lists them: each given the
    ``threshold`` of its source, those over it first (best first) and then the rest, merged
    (:func:`merged`). A place over its own threshold is never merged into one under its own."""
    held = [{**f, "threshold": thresholds[f.get("source", "network")]} for f in scored]
    return merged(sorted(held, key=lambda f: (f["score"] < f["threshold"], -f["score"])), spacing)


BRIDGE_MM = 60.0  # findings of one kind up to this far apart may be one edit (bridged)
BRIDGE_POINTS = (0.25, 0.5, 0.75)  # where between two findings the stage looks


def bridged(findings: list[dict[str, Any]], vol: Volume, lungs: np.ndarray, verifier, heat: Heatmap,
            reading: ScanReading) -> list[dict[str, Any]]:
    """``findings`` (best first, each over its threshold), one per edit: a finding of the same kind
    as a better one, farther from it than :func:`merged` joins (24 mm) but less than
    :data:`BRIDGE_MM`, is listed in that one's ``also_at`` (with its own) where the stage scores
    the way between them edited too: at each of :data:`BRIDGE_POINTS` along it, at or over the
    lower of the two thresholds, of the same kind. A large in-painting holds several of the maps'
    peaks 25-30 mm apart, each a finding, while two edits or two false findings have untouched lung
    between them."""
    kept: list[dict[str, Any]] = []
    spacing = np.asarray(vol.spacing, float)
    for f in findings:
        at = np.asarray(f["voxel"], float)
        into = None
        for g in kept:
            gap = float(np.linalg.norm((at - np.asarray(g["voxel"], float)) * spacing))
            if g["kind"] != f["kind"] or gap >= BRIDGE_MM:
                continue
            start = np.asarray(g["voxel"], float)
            way = np.asarray([start + t * (at - start) for t in BRIDGE_POINTS])
            p = verifier.score_places(vol, way, heat.probabilities_at(way), lungs, candidates=True, noise=reading.noise,
                                      trace_reference=reading.reference)
            if all(1.0 - q[0] >= min(f["threshold"], g["threshold"]) and kind_of(q[1], q[2]) == f["kind"] for q in p):
                into = g
                break
        if into is None:
            kept.append(dict(f))
        else:
            own = {k: f[k] for k in ("voxel", "score", "source", "threshold") if k in f}
            into["also_at"] = [*into.get("also_at", []), own, *f.get("also_at", [])]
    return kept


def spread(finding: dict[str, Any], spacing) -> tuple[int, float]:
    """How many places merged into ``finding`` (``also_at``) are over their own threshold, and the
    farthest of them from it in mm (0 where none): how far one edit's finding reaches."""
    over = [p for p in finding.get("also_at", []) if p["score"] >= p.get("threshold", finding.get("threshold", 0.0))]
    if not over:
        return 0, 0.0
    at = np.asarray(finding["voxel"], float)
    far = max(float(np.linalg.norm((np.asarray(p["voxel"], float) - at) * np.asarray(spacing, float))) for p in over)
    return len(over), far


def every_place(findings: Iterable[dict[str, Any]]):
    """Each finding and each place merged into it (:func:`merged`, ``also_at``): every place the
    second stage scored, for a reader who asks whether any of them lies at a given place."""
    for f in findings:
        yield f
        yield from f.get("also_at", [])


def _result(vol: Volume, detector: Detector, heat: Heatmap, threshold: float | None, input_name: str, warnings: list[str], t0: float,
            lungs: np.ndarray | None = None, verifier=None, reading: ScanReading | None = None) -> dict[str, Any]:
    """The screening JSON of docs/DESIGN.md. ``threshold``: the caller's for every place (None: the
    detector's own, :func:`source_thresholds`); ``reading``: the stage's reading of the whole scan
    (:meth:`ctguard.verifier.Verifier.read_scan`), where the caller has it."""
    staged = verifier is not None and lungs is not None
    thresholds = source_thresholds(detector, threshold, vol if staged else None)
    thr = thresholds["network"]
    blind = staged and verifier.for_scan(vol) is not verifier
    if staged:
        reading = verifier.read_scan(vol, lungs) if reading is None else reading  # once, for the candidates and their rows
        candidates = stage_candidates(heat, vol, verifier, min(thresholds.values()), lungs, reading.noise, reading.trace, reading.smooth,
                                      reading.blob)
        scored = over_own_threshold(verify_findings(vol, lungs, candidates, verifier, reading.noise, reading.reference), vol.spacing,
                                    thresholds)
        findings = bridged([f for f in scored if f["score"] >= f["threshold"]], vol, lungs, verifier, heat, reading)
        under = [f for f in scored if f["score"] < f["threshold"]]
        score = max((f["score"] for f in scored), default=0.0)
    else:
        findings = findings_from(heat, vol, thr)
        under = [f for f in findings_from(heat, vol, min(0.3, thr)) if f["score"] < thr]
        score = round(float((1.0 - heat.probs[0]).max()), 4)
    return {
        "input": input_name,
        **({"scan": dict(vol.meta["identity"])} if vol.meta.get("identity") else {}),
        "shape": list(vol.shape),
        "spacing_mm": [round(float(s), 6) for s in vol.spacing],
        "verdict": "tampered" if findings else "clean",
        "score": score,
        "findings": findings,
        "under_threshold": under[:UNDER_SHOWN],
        "model": {"name": detector.name, "version": detector.version, "threshold": thr,
                  **({"second_stage": True} if staged else {}),
                  **({"trace_blind": True} if blind else {}),
                  **(separate_thresholds(detector, threshold, vol) if staged else {})},
        "warnings": warnings,
        "elapsed_s": round(time.time() - t0, 3),
    }


LOCATION_MM = 72  # the block around a place scored with --locations: an odd number of cells, the place at the middle one's centre


def _middle_cell(block_mm: int) -> tuple[int, float]:
    """The middle cell of a block ``block_mm`` wide, and how far its centre lies from the block's
    centre voxel (``block_mm // 2``; cell ``k`` covers voxels ``k * STRIDE`` to ``k * STRIDE + STRIDE - 1``)."""
    cells = block_mm // STRIDE
    if cells * STRIDE != block_mm or cells % 2 == 0:
        raise ValueError(f"a location block must be an odd number of {STRIDE} mm cells, not {block_mm} mm")
    mid = cells // 2
    return mid, mid * STRIDE + (STRIDE - 1) / 2.0 - block_mm // 2


def score_locations(vol: Volume, detector: Detector, locations: np.ndarray, cube_mm: int = LOCATION_MM,
                    stage2: bool = True, lungs: np.ndarray | None = None) -> np.ndarray:
    """``(n, 3)`` probabilities ``p_genuine, p_injected, p_removed`` at given voxels ``(z, y, x)``:
    the network's, re-scored by the detector's second stage where it has one (``stage2=False``: the
    network's alone; ``lungs``: the scan's lung mask, made here when not given).

    Each place is scored by the detector's cell centred on it, in a ``cube_mm`` cube around it. A
    cell was trained to say "tampered" when an edit's centre lies within the edit's radius (at
    least 6 mm) of the cell's centre; a place at a corner of cells is 6.9 mm from each of theirs,
    so reading the cells around a place instead (the mean of the central 2x2x2) would miss small
    edits there.
    """
    from ctguard.tamper.cube import cut

    out = np.zeros((len(locations), 3), dtype=np.float32)
    mid, shift_mm = _middle_cell(cube_mm)
    spacing = np.asarray(vol.spacing, float)
    for i, loc in enumerate(locations):
        loc = np.asarray(loc, float)
        if np.any(loc < 0) or np.any(loc > np.asarray(vol.shape) - 1):
            raise InputError(f"location {tuple(loc)} (z, y, x) is outside the scan {vol.shape}")
        cube = cut(vol, loc - shift_mm / spacing, cube_mm // 2).hu[:cube_mm, :cube_mm, :cube_mm]
        out[i] = detector.probabilities(cube)[:, mid, mid, mid]
    verifier = getattr(detector, "verifier", None) if stage2 else None  # any object with probabilities() is a detector here
    if verifier is not None and len(locations):
        out = stage_probabilities(vol, detector, np.asarray(locations, float), out, lung_mask(vol) if lungs is None else lungs)
    return out


def stage_probabilities(vol: Volume, detector: Detector, places: np.ndarray, p_network: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """``(n, 3)`` the detector's second stage at any ``places`` where its network gave
    ``p_network``, each read against the scan's own candidates where the stage does so
    (:func:`stage_reference`)."""
    reference = stage_reference(vol, detector, lungs)
    return detector.verifier.score_places(vol, places, p_network, lungs, reference=reference, candidates=reference is None)


def stage_reference(vol: Volume, detector: Detector, lungs: np.ndarray) -> np.ndarray | None:
    """The scan's reference row for a second stage that reads places against the scan's own
    candidates (``scan_reference`` in its meta): the median row of the candidates screening gives
    it (the network's findings from the stage's ``candidate_threshold``, at most ``max_candidates``).
    None where the detector's stage reads no reference, or the scan has no candidate (then the
    places scored are their own reference, as a training copy without candidates is)."""
    verifier = getattr(detector, "verifier", None)
    if verifier is None or not verifier.meta.get("scan_reference"):
        return None
    found = stage_candidates(heatmap(vol, detector, lungs), vol, verifier, lungs=lungs)
    if not found:
        return None
    return verifier.reference(vol, np.asarray([f["voxel"] for f in found], float), finding_probabilities(found), lungs)


# -- a single slice or image: the 2D detector --------------------------------------------------
DEFAULT_MODEL_2D = "tamper2d"
IMAGE_WINDOW = (-1000.0, 400.0)  # PNG/JPG carry no HU: ctguard assumes the lung window export-slices writes
IMAGE_PIXEL_MM = 0.7  # ... and no pixel size: a 512-pixel chest field of view of 36 cm


def load_detector2d(name_or_path: str | None = None) -> Detector:
    """The bundled 2D detector (default; also for 'tamper3d') or a ``tamper2d`` checkpoint.

    Raises:
        InputError: missing, or not a 2D tamper detector checkpoint.
    """
    def build(cfg: dict):
        from ctguard.models.patch2d import TamperNet2D

        return TamperNet2D(int(cfg.get("width", 32)))

    return _cached(name_or_path, lambda: _load(name_or_path, DEFAULT_MODEL_2D, "tamper2d", build, "2D"), 2)


def as_ct_slice(vol: Volume) -> Volume:
    """A one-slice volume in HU: DICOM slices as they are; PNG/JPG grey values through the lung
    window, with an assumed pixel size (a warning says so)."""
    if vol.meta.get("kind") != "image":
        return vol
    top = 65535.0 if vol.hu.max() > 255 else 255.0
    lo, hi = IMAGE_WINDOW
    hu = (lo + vol.hu / top * (hi - lo)).astype(np.float32)
    meta = {**vol.meta, "kind": "image-hu", "warnings": list(vol.warnings) + [
        f"an image has no HU or pixel size: read as lung window {lo:.0f}..{hi:.0f} HU and {IMAGE_PIXEL_MM} mm pixels"]}
    return Volume(hu, (1.0, IMAGE_PIXEL_MM, IMAGE_PIXEL_MM), vol.origin, vol.direction, meta)


def screen_slice(vol: Volume, detector: Detector, input_name: str = "", threshold: float | None = None,
                 stage: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Heatmap, np.ndarray]:
    """Screens one slice (``shape[0] == 1``) with the 2D detector; findings have ``z = 0``."""
    t0 = time.time()
    vol = as_ct_slice(vol)
    if stage:
        stage("lungs")
    lungs = lung_mask(vol)
    if lungs.sum() * np.prod(vol.spacing[1:]) < 1000:  # < 10 cm^2 of lung in the slice
        raise InputError("no lungs in view in this slice (is this a chest CT?)", input_name or None)
    if stage:
        stage("detector")
    # The in-plane box as the 2D detector's threshold was calibrated with (whole-voxel margin, not
    # _lung_box's rounded-up one: one voxel moves the 8 mm grid, and with it a finding or two).
    pts = np.argwhere(lungs[0])
    margin = int(MARGIN_MM / vol.spacing[1])
    lo, hi = np.maximum(pts.min(0) - margin, 0), np.minimum(pts.max(0) + margin + 1, vol.shape[1:])
    heat = heatmap(vol, detector, lungs, (slice(0, 1), slice(lo[0], hi[0]), slice(lo[1], hi[1])))
    if stage:
        stage("findings")
    # One slice: findings_from clips every voxel to z = 0.
    warnings = list(vol.warnings) + ["a single slice is screened in 2D, without its neighbours: weaker than screening the series"]
    verifier = getattr(detector, "verifier", None)
    return _result(vol, detector, heat, threshold, input_name, warnings, t0, lungs, verifier), heat, lungs


def score_locations_2d(vol: Volume, detector: Detector, locations: np.ndarray, square_mm: int = LOCATION_MM,
                       stage2: bool = True, lungs: np.ndarray | None = None) -> np.ndarray:
    """``(n, 3)`` probabilities at places ``(0, y, x)`` of a single slice: the 2D detector's cell
    centred on each, in a ``square_mm`` square around it (outside the slice is air); re-scored by the
    detector's second stage where it has one (``stage2=False``: the network's; ``lungs``: the
    slice's mask where the caller has it)."""
    out = np.zeros((len(locations), 3), dtype=np.float32)
    mid, shift_mm = _middle_cell(square_mm)
    spacing = np.asarray(vol.spacing[1:], float)
    offsets = np.arange(square_mm, dtype=float) - square_mm // 2
    for i, loc in enumerate(locations):
        z, y, x = (float(v) for v in loc)
        if z != 0 or not (0 <= y <= vol.shape[1] - 1 and 0 <= x <= vol.shape[2] - 1):
            raise InputError(f"location {tuple(loc)} (z, y, x) is outside the slice {vol.shape}; a slice has z = 0")
        cy, cx = np.array([y, x]) - shift_mm / spacing
        grid = np.meshgrid(cy + offsets / spacing[0], cx + offsets / spacing[1], indexing="ij")
        block = ndimage.map_coordinates(vol.hu[0], grid, order=1, mode="constant", cval=-1000.0).astype(np.float32)
        out[i] = detector.probabilities(block)[:, mid, mid]
    verifier = getattr(detector, "verifier", None) if stage2 else None
    if verifier is not None and len(locations):
        out = verifier.score_places(vol, np.asarray(locations, float), out, lung_mask(vol) if lungs is None else lungs)
    return out
