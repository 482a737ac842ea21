"""Running a denoising model: camera-aware normalisation, tiling, and three backends.

Backends share one interface, ``run(x) -> y`` on float32 arrays of shape (n, c, h, w) ->
(n, 1, h, w), h and w multiples of the model's ``size_multiple``:

- ``tensorrt``: an engine built from the ONNX graph (FP16 where the GPU has fast FP16),
  serialised to a cache keyed by model hash, GPU, TensorRT version and shape profile; runs on
  device buffers;
- ``onnxruntime``: the ONNX graph, CUDA provider when present, else CPU;
- ``torch``: eager, CUDA when present, else CPU.

:func:`open_backend` walks that order from the requested backend (``auto`` = from the top),
logging why each one that fails was passed over; only when none works does it raise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import EngineError
from .modelfile import ModelFile

__all__ = [
    "BACKENDS",
    "ORDER",
    "Normalisation",
    "compile_model",
    "estimate_noise",
    "open_backend",
    "pad_multiple",
    "receptive_radius",
    "run_tiled",
    "trt_cache_key",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- normalisation


def estimate_noise(frame: np.ndarray, nbins: int = 16) -> tuple[float, float]:
    """Fit the camera's noise model ``var = a * value + b`` (Poisson-Gaussian, in ADU) from one
    frame: the variance of a pixel's difference to its neighbours, binned by local brightness.

    ``a`` is the gain (ADU per photoelectron, 0 when the noise looks signal-independent), ``b``
    absorbs read noise and the camera offset, which is why the offset need not be known.
    """
    from scipy import ndimage

    x = np.asarray(frame, dtype=np.float32)
    # 4x centre minus the 4 neighbours: white noise of variance v gives variance 20 v; smooth
    # signal nearly cancels. Edges inflate it, hence robust (MAD) variances per bin.
    resid = (4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]) / np.sqrt(20.0)
    local = ndimage.uniform_filter(x, 5)[1:-1, 1:-1]
    edges = np.quantile(local, np.linspace(0.0, 1.0, nbins + 1))
    means, varis, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (local >= lo) & (local <= hi)
        if sel.sum() < 64:
            continue
        r = resid[sel]
        mad = np.median(np.abs(r - np.median(r)))
        means.append(float(local[sel].mean()))
        varis.append(float((1.4826 * mad) ** 2))
        counts.append(float(sel.sum()))
    if len(means) < 2 or np.ptp(means) < 1e-3:  # flat frame: no slope to fit
        return 0.0, float(np.median(varis)) if varis else float(resid.var())
    a, b = np.polyfit(means, varis, 1, w=np.sqrt(counts))
    if a <= 0:
        return 0.0, float(np.median(varis))
    return float(a), float(b)


def gat_inverse(d: np.ndarray) -> np.ndarray:
    """Closed-form approximation of the exact unbiased inverse of the Anscombe transform
    (Makitalo and Foi 2011, without the -sigma^2 term, which :class:`Normalisation` applies)."""
    d = np.maximum(d, d.dtype.type(0.8) if isinstance(d, np.ndarray) else 0.8)
    s = math.sqrt(1.5)
    t = d.dtype.type if isinstance(d, np.ndarray) else float
    inv = 1.0 / d
    # 0.25 d^2 + 0.25 s/d - 1.375/d^2 + 0.625 s/d^3 - 0.125, Horner in 1/d (keeps d's dtype)
    out = inv * t(0.625 * s)
    out += t(-1.375)
    out *= inv
    out += t(0.25 * s)
    out *= inv
    d *= d
    d *= t(0.25)
    out += d
    out -= t(0.125)
    return out


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """Raw camera values -> what the network sees, and back.

    With ``gain`` (ADU per photoelectron) the generalised Anscombe transform turns
    Poisson-Gaussian noise into unit-variance Gaussian noise; robust percentiles then map the
    frame's range to about [0, 1]. Fixed per stream so that a frame and its past frames share it.
    """

    offset: float = 0.0  # camera offset (ADU), subtracted first
    gain: float = 0.0  # ADU per photoelectron; 0: no variance-stabilising transform
    read_var: float = 0.0  # variance (ADU^2) at zero signal after the offset
    low: float = 0.0
    high: float = 1.0

    @classmethod
    def estimate(
        cls,
        frame: np.ndarray,
        *,
        offset: float | None = None,
        gain: float | None = None,
        vst: bool = True,
        percentiles: Sequence[float] = (1.0, 99.8),
    ) -> Normalisation:
        """From a frame (or a (t, y, x) stack: its first frame sets the noise model).

        ``offset`` None estimates nothing: with a fitted noise model the intercept carries it;
        without VST the low percentile removes it anyway. ``gain`` None fits it from the frame.
        """
        x = np.asarray(frame, dtype=np.float32)
        first = x if x.ndim == 2 else x[0]
        off = float(offset) if offset is not None else 0.0
        a, read_var = 0.0, 0.0
        if vst:
            fit_a, fit_b = estimate_noise(first - off)
            if gain is not None and gain > 0:
                # gain known: keep it, take the read variance where the fitted line gives it
                a = float(gain)
                read_var = fit_b + (fit_a - a) * float(np.median(first - off))
            else:
                a, read_var = fit_a, fit_b
                if not a > 1e-6:  # a nearly flat frame can fit a gain of ~1e-16: the transform's
                    a = 0.0  # 2/gain then overflows float32; such noise is signal-independent
        norm = cls(offset=off, gain=a, read_var=read_var)
        y = norm._stabilise(x)
        lo, hi = np.percentile(y, list(percentiles))
        if not hi > lo:
            hi = lo + 1.0
        return dataclasses.replace(norm, low=float(lo), high=float(hi))

    def _stabilise(self, x: np.ndarray) -> np.ndarray:
        # float32 throughout and in place: one new array per call (this runs on every frame)
        y = np.subtract(np.asarray(x), np.float32(self.offset), dtype=np.float32)
        if self.gain > 0:
            a = np.float32(self.gain)
            # 2/a * sqrt(a x + 3/8 a^2 + var0): unit-variance noise whatever the brightness
            y *= a
            y += np.float32(0.375 * self.gain * self.gain + self.read_var)
            np.maximum(y, 0.0, out=y)
            np.sqrt(y, out=y)
            y *= np.float32(2.0 / a)
        return y

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = self._stabilise(x)
        y -= np.float32(self.low)
        y /= np.float32(self.high - self.low)
        return y

    def inverse(self, n: np.ndarray) -> np.ndarray:
        y = np.multiply(np.asarray(n), np.float32(self.high - self.low), dtype=np.float32)
        y += np.float32(self.low)
        if self.gain > 0:
            a = self.gain
            y = gat_inverse(y)  # float32 in, float32 out: ample for camera values
            y -= np.float32(self.read_var / a**2)
            y *= np.float32(a)
        y += np.float32(self.offset)
        return y

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- tiling


def receptive_radius(arch: dict[str, Any]) -> int:
    """Pixels on each side that reach one output pixel of livescope's U-Net (engines/unet.py): two
    3x3 convolutions per block at each level 2**l going down and again coming up, the 2x2
    pooling and up-sampling between levels, two more convolutions at the bottom. 0 when the
    architecture is not known (the engine's own overlap then rules)."""
    if arch.get("name") != "unet2d":
        return 0
    d = int(arch.get("depth", 0))
    return sum(5 * 2**level for level in range(d)) + 2 * 2**d


def pad_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad the last two axes up to multiples of ``multiple``; returns the crop size."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
        x = np.pad(x, pad, mode="reflect" if min(h, w) > max(ph, pw) else "edge")
    return x, (h, w)


def _starts(n: int, tile: int, core: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, core))
    starts.append(n - tile)
    return sorted(set(starts))


def run_tiled(
    run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *, multiple: int, tile: int | None = None, overlap: int = 32
) -> np.ndarray:
    """Apply ``run`` ((1, c, h, w) -> (1, 1, h, w)) to a (c, y, x) input, in overlapping tiles
    when the frame is larger than ``tile``.

    Each tile keeps only its centre (``overlap // 2`` dropped at every inner edge), and tiles
    start on multiples of ``multiple`` so the network's pooling grid lines up with the untiled
    one: with an overlap wider than the receptive field the result equals the untiled one.
    """
    xp, (h, w) = pad_multiple(x, multiple)
    H, W = xp.shape[-2:]
    if tile is None or tile <= 0 or (H <= tile and W <= tile):
        return run(xp[None])[0, 0, :h, :w]
    tile = max(multiple, tile - tile % multiple)
    half = (overlap // 2 + multiple - 1) // multiple * multiple  # margin dropped per inner edge
    if tile <= 2 * half:
        raise EngineError(f"tile {tile} must exceed twice the overlap margin ({2 * half}); raise tile or lower overlap")
    core = tile - 2 * half
    out = np.empty((H, W), dtype=np.float32)
    th, tw = min(tile, H), min(tile, W)
    for y0 in _starts(H, th, core):
        for x0 in _starts(W, tw, core):
            y = run(xp[None, :, y0 : y0 + th, x0 : x0 + tw])[0, 0]
            # keep the centre; at the frame's own border keep everything up to the border
            ya = 0 if y0 == 0 else half
            xa = 0 if x0 == 0 else half
            yb = th if y0 + th == H else th - half
            xb = tw if x0 + tw == W else tw - half
            out[y0 + ya : y0 + yb, x0 + xa : x0 + xb] = y[ya:yb, xa:xb]
    return out[:h, :w]


# --------------------------------------------------------------------------- backends


class TorchBackend:
    name = "torch"

    def __init__(self, model: ModelFile, *, device: str | None = None, **_: Any) -> None:
        import torch

        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.net = model.build_torch().to(self.device)

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            y = self.net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
        return y.float().cpu().numpy()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: ModelFile, *, threads: int | None = None, **_: Any) -> None:
        import onnxruntime as ort

        _require_onnx(model)
        opts = ort.SessionOptions()
        # all graph optimisations (conv + activation fusion, layout transforms), one operator
        # at a time (the graph is a chain: parallelism is inside each convolution)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            opts.intra_op_num_threads = int(threads)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(model.onnx, opts, providers=providers)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name  # "frames" in livescope's graphs

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _require_onnx(model: ModelFile) -> None:
    if not model.onnx:  # a Model Zoo package with TorchScript weights only, say
        raise EngineError("the model has no ONNX weights (the torch backend runs its other weights)")


def trt_cache_dir() -> Path:
    base = os.environ.get("LIVESCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "livescope"
    )
    return Path(base) / "tensorrt"


def trt_cache_key(model_hash: str, gpu: str, trt_version: str, shape: tuple[int, ...], fp16: bool) -> str:
    """File name of a serialised TensorRT engine: an engine is only valid for the same weights,
    GPU model, TensorRT version and shape profile, so all four (and the precision) go in."""
    text = "|".join([model_hash, gpu, trt_version, "x".join(map(str, shape)), "fp16" if fp16 else "fp32"])
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    return f"{model_hash[:12]}-{digest}.engine"


class TensorRTBackend:
    """TensorRT engine for one input shape (the stream's padded frame or tile size).

    Never run on this project's development machine (no GPU): see docs/denoising.md.
    """

    name = "tensorrt"

    def __init__(
        self,
        model: ModelFile,
        *,
        shape: tuple[int, int, int, int] | None = None,
        cache_dir: str | Path | None = None,
        **_: Any,
    ) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise EngineError(
                "TensorRT is not installed: install it on a machine with an NVIDIA GPU (see docs/denoising.md)"
            ) from exc
        import torch  # device buffers and the CUDA stream; shares torch's CUDA context

        if not torch.cuda.is_available():
            raise EngineError("TensorRT needs a CUDA GPU; none is visible")
        if shape is None:
            raise EngineError("TensorRT needs the frame shape to build its profile")
        _require_onnx(model)
        self._torch, self._trt = torch, trt
        self.shape = tuple(int(s) for s in shape)
        self.engine_path = build_trt_engine(model, self.shape, cache_dir=cache_dir)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        # the graph's own names ("frames" -> "denoised" in livescope's; a Model Zoo graph's differ)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        source, target = inputs[0], next(n for n in names if n not in inputs)
        self.context.set_input_shape(source, self.shape)
        self.stream = torch.cuda.Stream()
        self.d_in = torch.empty(self.shape, dtype=torch.float32, device="cuda")
        out_shape = tuple(int(s) for s in self.context.get_tensor_shape(target))
        self.d_out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.h_out = torch.empty(self.d_out.shape, dtype=torch.float32, pin_memory=True)
        self.context.set_tensor_address(source, self.d_in.data_ptr())
        self.context.set_tensor_address(target, self.d_out.data_ptr())

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        if tuple(x.shape) != self.shape:
            raise EngineError(f"TensorRT engine built for {self.shape}, got {tuple(x.shape)}")
        with torch.cuda.stream(self.stream):
            self.d_in.copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), non_blocking=False)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError("TensorRT execution failed")
            self.h_out.copy_(self.d_out, non_blocking=True)
        self.stream.synchronize()
        return self.h_out.numpy().copy()


def build_trt_engine(
    model: ModelFile, shape: tuple[int, ...], *, cache_dir: str | Path | None = None, fp16: bool | None = None
) -> Path:
    """Build (or find in the cache) the serialised TensorRT engine for this model and shape."""
    import tensorrt as trt
    import torch

    gpu = torch.cuda.get_device_name()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if fp16 is None:
        fp16 = bool(getattr(builder, "platform_has_fast_fp16", False))
    cache = Path(cache_dir) if cache_dir else trt_cache_dir()
    path = cache / trt_cache_key(model.hash, gpu, trt.__version__, tuple(shape), fp16)
    if path.is_file():
        return path
    log.info("building TensorRT engine for %s (%s, fp16=%s); this takes a while", shape, gpu, fp16)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse the model's ONNX graph: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, shape, shape, shape)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineError("TensorRT engine build failed (see the TensorRT log above)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(bytes(blob))
    tmp.replace(path)
    return path


BACKENDS: dict[str, Callable[..., Any]] = {
    "tensorrt": TensorRTBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "torch": TorchBackend,
}
ORDER = ("tensorrt", "onnxruntime", "torch")  # fastest first
_SAID: set[tuple[str, str]] = set()  # backends passed over, logged once per process


def open_backend(model: ModelFile, backend: str = "auto", **options: Any) -> Any:
    """The first backend that opens, from ``backend`` down the ``ORDER`` (``auto``: from the
    top); every one passed over is logged with its reason."""
    if backend != "auto" and backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose auto, {', '.join(ORDER)}")
    chain = list(ORDER) if backend == "auto" else [backend] + [b for b in ORDER if b != backend]
    reasons = []
    for name in chain:
        try:
            opened = BACKENDS[name](model, **options)
        except Exception as exc:  # any failure: fall through to the next backend
            reasons.append(f"{name}: {exc}")
            # a warning only for the backend the user asked for; the automatic chain passing over
            # a backend this machine lacks (TensorRT without a GPU) is said once per process
            if name == backend:
                log.warning("denoise backend %s unavailable (%s); trying the next", name, exc)
            elif (name, str(exc)) not in _SAID:
                _SAID.add((name, str(exc)))
                log.info("denoise backend %s unavailable (%s); trying the next", name, exc)
            continue
        log.info("denoise backend: %s (asked for %s)", name, backend)
        return opened
    raise EngineError(
        "no denoising backend could run the model: "
        + "; ".join(reasons)
        + ". Install onnxruntime or torch (`pip install livescope[ml]`)"
    )


class Runner:
    """A backend that replaces itself with the next one in the chain when it fails mid-stream."""

    def __init__(self, model: ModelFile, backend: str = "auto", **options: Any) -> None:
        self.model = model
        self.asked = backend
        self.options = options
        self.backend = open_backend(model, backend, **options)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.backend.name)

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.backend.run(x)
        except Exception as exc:
            failed = self.backend.name
            rest = [b for b in ORDER[ORDER.index(failed) + 1 :]] if failed in ORDER else []
            if not rest:
                raise
            log.warning("denoise backend %s failed (%s); falling back to %s", failed, exc, rest[0])
            with self._lock:
                self.backend = open_backend(self.model, rest[0], **self.options)
            return self.backend.run(x)


def compile_model(
    path: str | Path | None = None, shape: Sequence[int] = (512, 512), *, cache_dir: str | Path | None = None
) -> Path:
    """Ahead-of-time TensorRT build for frames of ``shape`` (y, x): the ``livescope compile``
    command. Returns the cached engine's path."""
    from .modelfile import load

    model = load(path)
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise EngineError(
            "`livescope compile` needs TensorRT: install it on a machine with an NVIDIA GPU (see docs/denoising.md)"
        ) from exc
    m = model.multiple
    y, x = (int(s) + (-int(s)) % m for s in shape[-2:])
    return build_trt_engine(model, (1, 1 + model.k, y, x), cache_dir=cache_dir)
