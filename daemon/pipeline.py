"""The daemon's pipeline: ingest -> raw store (lossless), and in parallel the engine chain.

Threads:

- *ingest* only receives, validates (in the receiver) and enqueues: every frame goes to the store
  queue (within a memory budget) and into its (position, channel, z) engine slot;
- *store* writes raw frames and products to OME-Zarr and turns completed writes into "saved";
- *worker* runs the engine chain on the newest frame of each slot: a frame replaced in its slot
  before the worker took it is *skipped* for every product, and recorded so;
- *preview* publishes the newest frame of each product at display rate, downsampled.

Policies: the producer is never blocked; raw is lossless up to ``memory_budget_mb`` of queued
frames, past which each frame that cannot be kept is recorded as lost; a failing engine passes the
frame through unprocessed, flagged, and is disabled after ``max_engine_failures`` in a row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from .. import __version__
from ..bridges.files import SAMPLING_KEYS
from ..bridges.protocol import Frame
from ..bridges.store import ImageLayout, OmeZarrStore, image_name
from ..bridges.transport import FrameReceiver, PreviewPublisher
from ..engines import EngineError, FrameInfo, StreamSpec, create_engine, engine_factory, engine_outputs
from .config import DaemonConfig
from .telemetry import Latency, Rate

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)

MAX_SEGMENTS = 64  # images one stream and position may open in a run (shape changes, restarts)
MAX_RECORD_CELLS = 2**23  # planes one image may lay out (records: 21 bytes each, 176 MB at most)
MAX_T_JUMP = 100_000  # time points a frame may skip ahead of the segment's latest


@dataclasses.dataclass
class _Segment:
    """One image in the store: a stream's position with one frame shape, dtype and bit depth. A
    restart of the publisher, a new acquisition or an end marker starts a new one; a shape seen
    before in the same acquisition goes back to its segment (two ROIs alternating stay two images)."""

    number: int
    shape: tuple[int, ...]
    dtype: str
    bits: int
    layout: ImageLayout
    spec_base: dict[str, Any]
    t_start: int = 0
    last_seq: dict[str, int] = dataclasses.field(default_factory=dict)  # per publisher (source id)
    stream: str = ""
    tag: str = ""  # the stream's part of the store's image names ("" for the first stream)
    acquisition: int | None = None
    fresh: str = ""  # why this segment opens, until its first frame is accepted
    saved: bool = True  # False for live-mode streams unless --save-live: engines and previews only
    live: bool = False  # a live-mode stream (focusing, snaps): never takes the plain image names
    seen: _Seen = dataclasses.field(default_factory=lambda: _Seen())
    channel_names: dict[int, str] = dataclasses.field(default_factory=dict)
    product_layouts: list[ImageLayout] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.stream, self.spec_base["position"], self.number)


class _Seen:
    """Which (t, c, z) of a segment arrived: one growable bitmap over t per (c, z) (an 8-hour
    100 fps stream costs 360 kB per plane): a second frame for the same index is refused, never
    written over the first."""

    def __init__(self) -> None:
        self.by_plane: dict[tuple[int, int], bytearray] = {}
        self.t_max = -1
        self.c_max = 0
        self.z_max = 0

    def cells(self, t: int, c: int, z: int) -> int:
        """The records the store will hold for this image once (t, c, z) is in: a bound on memory."""
        return (max(self.t_max, t) + 1024) * (max(self.c_max, c) + 1) * (max(self.z_max, z) + 1)

    def add(self, t: int, c: int, z: int) -> bool:
        """Mark (t, c, z); False if it was there already."""
        bits = self.by_plane.setdefault((c, z), bytearray())
        byte, bit = divmod(t, 8)
        if byte >= len(bits):
            bits.extend(bytes(max(byte + 1 - len(bits), len(bits))))
        if bits[byte] >> bit & 1:
            return False
        bits[byte] |= 1 << bit
        self.t_max, self.c_max, self.z_max = max(self.t_max, t), max(self.c_max, c), max(self.z_max, z)
        return True


class _Rejected(Exception):
    """A frame the daemon refuses before it touches any state: counted under ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass
class _Item:
    frame: Frame
    p: int
    c: int
    z: int
    t: int
    segment: _Segment
    received: float
    cost: int = 0  # bytes counted against the memory budget while queued (pixels and header)

    @property
    def array(self) -> np.ndarray:
        return self.frame.array  # type: ignore[return-value]


@dataclasses.dataclass
class _Mark:
    """A record without pixels: a frame skipped, lost or failed for some products. It keeps only
    the frame's coordinates, not its pixels (they would sit in the queue outside the budget)."""

    status: str
    products: tuple[str, ...]
    p: int
    c: int
    zs: tuple[int, ...]
    t: int
    seq: int
    time_s: float
    segment: _Segment

    @classmethod
    def of(cls, status: str, products: tuple[str, ...], item: _Item) -> _Mark:
        arr = item.frame.array
        zs = tuple(range(arr.shape[0])) if arr is not None and arr.ndim == 3 else (item.z,)
        return cls(status, products, item.p, item.c, zs, item.t, item.frame.seq, item.frame.timestamp, item.segment)


@dataclasses.dataclass
class _Product:
    name: str
    array: np.ndarray
    item: _Item


class _EngineState:
    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.name = name
        self.params = dict(params)
        self.enabled = True
        self.reason = ""
        self.failures_in_row = 0
        self.failures = 0
        self.processed = 0
        self.latency = Latency()
        self.needs_volume = False
        try:
            self.outputs = engine_outputs(name)
            factory = engine_factory(name)
            # an engine works on (z, y, x) stacks if its class says so or it was asked to (volume=True)
            declared = getattr(factory, "needs_volume", False)  # may be a property: then it follows `volume`
            self.needs_volume = (isinstance(declared, bool) and declared) or bool(self.params.get("volume", False))
            self.scalar_names = tuple(getattr(factory, "scalar_outputs", ()))
        except EngineError as exc:
            self.outputs = ()
            self.scalar_names = ()
            self.enabled = False
            self.reason = str(exc)
            log.error("engine %s disabled: %s", name, exc)


class _Chain:
    """The engines for one (position, channel, z, segment), each instance holding its own state."""

    def __init__(self, pipeline: Pipeline, spec: StreamSpec) -> None:
        self.pipeline = pipeline
        self.spec = spec
        self.engines: dict[str, Any] = {}
        for state in pipeline.engine_states.values():
            if not state.enabled:
                continue
            self._create(state)

    def _create(self, state: _EngineState) -> Any:
        try:
            engine = create_engine(state.name, **state.params)
            engine.setup(self.spec)
        except Exception as exc:
            self.pipeline._disable(state, f"setup failed: {type(exc).__name__}: {exc}")
            return None
        self.engines[state.name] = engine
        # outputs may depend on parameters (trust's inner engine, register's volume): the instance
        # knows best
        state.outputs = tuple(getattr(engine, "outputs", state.outputs))
        state.scalar_names = tuple(getattr(engine, "scalar_outputs", state.scalar_names))
        return engine

    def run(self, item: _Item) -> tuple[dict[str, np.ndarray], dict[str, float], list[dict], list[str]]:
        x: Any = item.array
        images: dict[str, np.ndarray] = {}
        scalars: dict[str, float] = {}
        events: list[dict] = []
        failed: list[str] = []
        info = FrameInfo(
            seq=item.frame.seq,
            timestamp=item.frame.timestamp,
            index={"p": item.p, "c": item.c, "z": item.z, "t": item.t},
            meta=item.frame.header.get("meta") or {},
        )
        for state in self.pipeline.engine_states.values():
            if not state.enabled:
                continue
            engine = self.engines.get(state.name) or self._create(state)
            if engine is None:
                continue
            t0 = time.perf_counter()
            try:
                out = engine.process(x, info)
                bad = [k for k, v in out.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                       and not math.isfinite(float(v.sum(dtype=np.float64)))]
                if bad:
                    raise FloatingPointError(f"non-finite values in {', '.join(bad)}")
            except Exception as exc:
                state.failures += 1
                state.failures_in_row += 1
                failed.extend(o for o in state.outputs if o not in state.scalar_names)
                log.warning("engine %s failed on seq %d: %s", state.name, item.frame.seq, exc)
                if state.failures_in_row >= self.pipeline.cfg.max_engine_failures:
                    self.pipeline._disable(state, f"{state.failures_in_row} failures in a row, last: {exc}")
                continue
            state.latency.add(time.perf_counter() - t0)
            state.failures_in_row = 0
            state.processed += 1
            scalar_names = set(getattr(engine, "scalar_outputs", ()))
            for key, value in out.items():
                if key == "events":
                    events.extend(value or [])
                elif key in scalar_names or np.ndim(value) == 0:
                    scalars[key] = float(value)
                else:
                    images[key] = value
            passes = getattr(engine, "passes", state.outputs[0] if state.outputs else None)
            if passes is not None and passes in out:
                x = out[passes]
        return images, scalars, events, failed

    def close(self) -> None:
        for engine in self.engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing engine failed")


class _FitJob:
    """Self-supervised fitting on the live stream: collect the next N raw frames of the first
    (position, channel, z) that arrives, fit on a thread while the stream goes on, save the model
    in the output folder, and swap it into every running chain between two frames.

    ``task`` "denoise" fits the denoiser; "deconvolve" / "restore" fit the learned deconvolution
    (``engines.netdeconv``) with the running engine's PSF and classical settings as the teacher:
    those of its current model (``restore``, ``deconvolve --method net``), or of the classical
    ``deconvolve`` engine itself, which is then switched to ``method=net`` with the new model."""

    def __init__(self, pipeline: Pipeline, engine: str, frames: int, steps: int, seconds: float,
                 task: str = "denoise") -> None:
        self.pipeline = pipeline
        self.engine = engine
        self.task = task
        self.n = frames
        self.steps = steps
        self.seconds = seconds
        self.state = "collecting"
        self.key: tuple | None = None
        self.frames: list[np.ndarray] = []
        self.losses: list[float] = []
        self.step = 0
        self.error = ""
        self.path: str | None = None
        self.started = time.time()
        self.lock = threading.Lock()

    @property
    def collecting(self) -> bool:
        return self.state == "collecting"

    def offer(self, item: _Item) -> None:
        key = (item.p, item.c, item.z)
        if self.key is None:
            self.key = key
        if key != self.key or item.array.ndim != 2:
            return
        self.frames.append(np.array(item.array, dtype=np.float32))
        if len(self.frames) >= self.n:
            self.state = "fitting"
            threading.Thread(target=self._fit, name="livescope-fit", daemon=True).start()

    def _progress(self, step: int, loss: float) -> None:
        with self.lock:
            self.step = step + 1
            self.losses.append(float(loss))

    def _fit(self) -> None:
        try:
            from ..engines import modelfile

            stack = np.stack(self.frames)
            spec = next(iter(self.pipeline._segments.values())).spec_base if self.pipeline._segments else {}
            description = f"fitted live on {len(self.frames)} frames"
            if self.task == "denoise":
                from ..engines import fit as fitting

                base_model = modelfile.load(self.pipeline.engine_states[self.engine].params.get("model"))
                result = fitting.fit(stack, model=base_model, steps=self.steps, time_budget_s=self.seconds,
                                     offset=spec.get("camera_offset"), gain=spec.get("camera_gain"), progress=False,
                                     callback=self._progress, description=description)
            else:
                result = self._fit_deconvolution(stack, spec, description)
            folder = (self.pipeline.cfg.out / "models") if self.pipeline.cfg.out else None
            if folder is None:
                import tempfile

                folder = __import__("pathlib").Path(tempfile.mkdtemp(prefix="livescope-fit-"))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / time.strftime(f"{self.task}-fit-%Y%m%d-%H%M%S.lsm")
            result.model.save(path)
            self.state = "swapping"
            self.pipeline._swap_all(self.engine, str(path))
            self.path = str(path)
            self.state = "done"
            log.info("fitted model %s swapped in after %d steps (loss %.4g -> %.4g)", path, self.step,
                     self.losses[0] if self.losses else float("nan"), self.losses[-1] if self.losses else float("nan"))
        except Exception as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("live fitting failed")

    def _fit_deconvolution(self, stack: np.ndarray, spec: dict[str, Any], description: str) -> Any:
        from ..engines import modelfile
        from ..engines.netdeconv import fit_deconvolution

        params = self.pipeline.engine_states[self.engine].params
        base_model = None
        if params.get("model") and (self.engine == "restore" or params.get("method") == "net"):
            # refit from the running model: its PSF(s) and teacher, its weights as the start
            base_model = modelfile.load(params["model"])
            psf = np.asarray(base_model.metadata["psf"]["kernels"], dtype=np.float64)
            teacher = dict(base_model.metadata.get("teacher") or {})
        else:  # the classical engine: its PSF as it prepares it for this stream, its settings
            seg = next(iter(self.pipeline._segments.values()))
            engine = create_engine(self.engine, **params)
            engine.setup(StreamSpec(shape=tuple(stack.shape[1:]), **seg.spec_base))
            psf = getattr(engine, "kernel", None)
            if psf is None or np.ndim(psf) != 2:
                raise RuntimeError(f"engine {self.engine} has no 2-D PSF to teach with (volume deconvolution?); "
                                   "fit a model on planes from a file with livescope fit --task deconvolve and "
                                   "swap it in")
            teacher = {"method": engine.method, "iterations": engine.n_iterations, "alpha": engine.alpha,
                       "beta": engine.beta, "order": engine.order}
        if base_model is not None and base_model.metadata.get("field_shape") not in (None, list(stack.shape[1:])):
            base_model = None  # fitted on another field: its field coordinates do not carry over
        return fit_deconvolution(stack, psf=psf, teacher_params=teacher, task=self.task, model=base_model,
                                 steps=self.steps, time_budget_s=self.seconds, offset=spec.get("camera_offset"),
                                 gain=spec.get("camera_gain"), callback=self._progress, description=description)

    def status(self) -> dict[str, Any]:
        with self.lock:
            losses = list(self.losses)
        stride = max(1, len(losses) // 100)
        return {"state": self.state, "engine": self.engine, "task": self.task, "collected": len(self.frames),
                "frames": self.n,
                "step": self.step, "steps": self.steps, "loss_curve": losses[::stride], "model": self.path,
                "error": self.error, "elapsed_s": round(time.time() - self.started, 1)}


def _curve_server(cfg: DaemonConfig) -> Any:
    """CURVE for every socket the daemon binds, or None. A non-loopback address requires it: with
    no keys the daemon refuses to start and says how to make them."""
    if not cfg.wants_curve():
        return None
    from ..bridges.auth import CurveKeysMissing, CurveServer

    try:
        return CurveServer(cfg.curve_dir)
    except CurveKeysMissing as exc:
        opened = cfg.open_binds()
        why = (f"{', '.join(opened)}: not a loopback address; binding it would open the microscope PC to the "
               "network, so livescope requires ZeroMQ CURVE keys. ") if opened else "CURVE was asked for (--curve). "
        raise CurveKeysMissing(why + str(exc)) from None


class Pipeline:
    def __init__(self, cfg: DaemonConfig, *, provenance: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self._calibration = _read_calibration(cfg.calibration)
        self.curve = _curve_server(cfg)
        if self.curve is not None:
            self.curve.acquire()  # the pipeline's own hold: the context lives until close() and the control server
        self.started = time.time()
        self.state = "starting"
        self.engine_states: dict[str, _EngineState] = {
            name: _EngineState(name, cfg.engine_params.get(name, {})) for name in cfg.engines
        }
        self.store: OmeZarrStore | None = None
        if cfg.out is not None:
            try:
                self.store = OmeZarrStore(
                    cfg.out,
                    overwrite=cfg.overwrite,
                    resume=cfg.resume,
                    compress_raw=cfg.compress_raw,
                    float16=cfg.float16,
                    fsync=cfg.fsync,
                    provenance=self._provenance(provenance),
                    min_free_gb=cfg.min_free_gb,
                )
            except BaseException:
                if self.curve is not None:  # no authenticator thread left behind
                    self.curve.close()
                raise
        # with CURVE, the daemon's own frame sources (sim, file, mmcore) cannot hold client keys: they
        # connect to an owner-only ipc endpoint of the same ingest socket instead
        self.source_ingest = cfg.ingest
        private = None
        if self.curve is not None and cfg.source != "zmq":
            from ..bridges.auth import private_ipc_address

            try:
                private = self.source_ingest = private_ipc_address("ingest")
            except OSError as exc:
                self.curve.close()
                raise OSError(f"--source {cfg.source} with CURVE needs an owner-only ipc socket ({exc}); run the "
                              "source as an external publisher with client keys and --source zmq") from None
        try:
            self.receiver = FrameReceiver(cfg.ingest, bind=True, hwm=256, curve=self.curve, private=private)
            self.preview = PreviewPublisher(cfg.publish, curve=self.curve) if cfg.publish else None
        except Exception:
            if getattr(self, "receiver", None) is not None:
                self.receiver.close()
            if self.curve is not None:
                self.curve.close()
            raise
        self._store_q: queue.Queue = queue.Queue()
        self._queued_bytes = 0
        self._queued_product_bytes = 0
        self.products_dropped = 0
        self.store_lost = 0  # raw frames the store refused outright (its errors are in the log)
        self._budget = int(cfg.memory_budget_mb * 2**20)
        self._bytes_lock = threading.Lock()
        self._slots: OrderedDict[tuple, _Item] = OrderedDict()
        self._slot_cond = threading.Condition()
        self._chains: dict[tuple, _Chain] = {}
        self._chain_lock = threading.Lock()  # held while a frame runs: control commands wait for it
        # routing: the segment in use per (stream, position), those of the current acquisition
        # (a shape seen again goes back to its image), and the streams whose end marker came
        self._segments: dict[tuple[str, int], _Segment] = {}
        self._open_segments: dict[tuple[str, int], list[_Segment]] = {}
        self._segments_made: dict[tuple[str, int], int] = {}
        # (stream, position) -> why its next frame opens a new image (an end marker, a restart)
        self._ended_keys: dict[tuple[str, int], str] = {}
        # the last seq each publisher (stream, source id) sent, of every frame that reached routing
        self._last_seq: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._stream_tags: dict[str, str] = {}
        self._t_counter: dict[tuple, int] = {}
        self.rejected: dict[str, int] = {}  # frames the daemon refused after decoding, by reason
        self.sender_stats: dict[str, dict[str, int]] = {}  # what each stream's sender says it dropped
        self._counter_lock = threading.Lock()
        self._logged: set[str] = set()
        # with an engine that needs volumes, the whole chain runs on (z, y, x) stacks assembled here
        self._volume_mode = any(s.needs_volume and s.enabled for s in self.engine_states.values())
        self._partial_volumes: dict[tuple, dict[int, _Item]] = {}
        self._route_lock = threading.Lock()
        self._fit_job: _FitJob | None = None
        self.restored = 0
        self.restore_errors = 0
        self._preview_latest: dict[tuple, tuple[np.ndarray, dict[str, Any]]] = {}
        self._preview_sent: dict[tuple, int] = {}
        self._preview_when: dict[tuple, float] = {}
        self._stop = threading.Event()
        self._ingest_done = threading.Event()
        self._ended = threading.Event()
        self.events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        self._event_id = 0
        self.scalars_last: dict[str, float] = {}
        # counters
        self.received = 0
        self.dropped = 0  # over the memory budget: recorded as lost in the store
        self.skipped: dict[str, int] = {}  # per engine
        self.skipped_frames = 0  # frames the chain did not take (each counts once, whatever the engines)
        self.saturated_last = 0
        self.saturated_total = 0
        self.store_errors = 0
        self.fps_in = Rate()
        self.fps_out = Rate()
        self.fps_saved = Rate()
        self.lat_store = Latency()
        self.lat_chain = Latency()
        self.lat_preview = Latency()  # frame received -> restored product's preview sent
        self.lat_preview_raw = Latency()
        self.live_not_saved = 0  # frames of live-mode streams (not saved unless --save-live)
        self._threads: list[threading.Thread] = []
        self._disk_warned = 0.0

    def _provenance(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        import platform
        from importlib import metadata

        versions = {"livescope": __version__, "python": platform.python_version()}
        for dist in ("numpy", "scipy", "zarr", "tensorstore", "pyzmq", "pymmcore-plus", "torch", "onnxruntime"):
            try:  # the installed version, without importing (torch alone would cost 300 MB)
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        return {
            "source": self.cfg.source,
            "engines": {n: dict(s.params) for n, s in self.engine_states.items()},
            "versions": versions,
            "host": platform.node(),
            **(extra or {}),
        }

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.state != "starting":
            raise RuntimeError("a pipeline runs once; create a new one")
        loops = [("ingest", self._ingest_loop), ("store", self._store_loop),
                 ("worker", self._worker_loop), ("preview", self._preview_loop)]
        if self.cfg.restore:
            loops.append(("restore", self._restore_loop))
        for name, target in loops:
            th = threading.Thread(target=target, name=f"livescope-{name}", daemon=True)
            th.start()
            self._threads.append(th)
        self.state = "running"

    def request_stop(self) -> None:
        self._stop.set()
        with self._slot_cond:
            self._slot_cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the source ended (or stop was requested); True if it did within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.is_set():
            if self._ended.is_set() and self.cfg.exit_on_end:
                return True
            if self.cfg.frames is not None and self.cfg.source == "zmq" and self.received >= self.cfg.frames:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _describe_engines(self) -> dict[str, Any]:
        """Each engine's ``describe()`` per stream (position/channel/z/segment key): the model hash
        in use (after an online fit or a hot swap), the camera calibration, the time base; stored in
        the provenance so that a saved stream says what produced its products."""
        out: dict[str, dict[str, Any]] = {}
        with self._chain_lock:
            chains = list(self._chains.items())
        for key, chain in chains:
            for name, engine in chain.engines.items():
                try:
                    d = engine.describe()
                except Exception as exc:  # a broken describe must not lose the store's close
                    d = {"error": repr(exc)}
                out.setdefault(name, {})["/".join(str(k) for k in key)] = d
        return json.loads(json.dumps(out, default=str))

    def close(self) -> dict[str, Any]:
        """Stop receiving, let the engines finish what they hold, flush and close the store."""
        self.state = "stopping"
        self._stop.set()
        self._ingest_done.wait(5)
        with self._slot_cond:
            self._slot_cond.notify_all()
        for th in self._threads:
            th.join(60)
        described = self._describe_engines()  # before close: what each engine ended up using
        for chain in self._chains.values():
            chain.close()
        if self.store is not None:
            flush = getattr(self.store, "flush", None)
            if flush is not None:  # every write and record on disk first: the summary counts them
                try:
                    flush()
                except Exception as exc:
                    log.error("store: the final flush failed: %s", exc)
            self.store.update_provenance(events=self.events[-1000:], summary=self.status()["frames"],
                                         engine_state=described)
            self.store.close()
        self.receiver.close()
        if self.preview is not None:
            self.preview.close()
        if self.curve is not None and self.state != "stopped":
            self.curve.release()
        self.state = "stopped"
        return self.status()

    # -- ingest ----------------------------------------------------------------------------
    def _segment_for(self, frame: Frame, p: int) -> _Segment:
        """The segment this frame belongs to, opening a new one where the stream restarted, began
        a new acquisition, ended, or changed shape, dtype or bit depth. Refuses (``_Rejected``)
        before changing anything when the frame would open more segments or records than allowed."""
        h = frame.header
        arr = frame.array
        assert arr is not None
        stream, source, acquisition = frame.stream, str(h.get("source", "")), h.get("acquisition")
        shape, dtype, bits = tuple(arr.shape), arr.dtype.name, frame.bits
        skey = (stream, p)
        current = self._segments.get(skey)
        why = ""
        if current is not None:
            if frame.restarted or frame.seq < self._last_seq.get((stream, source), -1):
                why = "the publisher restarted"
            elif acquisition != current.acquisition:
                why = "a new acquisition"
            elif skey in self._ended_keys:
                why = self._ended_keys[skey]
        if not why:
            for seg in self._open_segments.get(skey, ()):
                if seg.shape == shape and seg.dtype == dtype and seg.bits == bits:
                    return seg
        made = self._segments_made.get(skey, 0)
        if made >= MAX_SEGMENTS:
            raise _Rejected("too_many_segments",
                            f"stream {stream!r} position {p} opened {made} images in this run (each shape, "
                            "dtype or restart opens one); keep the frame shape fixed, or restart the daemon")
        sizes = h.get("sizes") or {}
        index = h.get("index") or {}
        known = bool(sizes)  # an MDA from a generator, or a plain publisher: sizes unknown
        n_c = int(sizes.get("c") or 1)
        n_z = int(sizes.get("z") or (shape[0] if len(shape) == 3 else 1))
        if 1024 * n_c * n_z > MAX_RECORD_CELLS:
            raise _Rejected("index_out_of_range", f"sizes c={n_c} z={n_z} would lay out more than "
                                                  f"{MAX_RECORD_CELLS} planes per 1024 time points")
        base = self.store.segment_base if self.store is not None else 0
        number = base + made
        # the stream's sampling, else the daemon's fallback for streams that do not say it
        sampling = {k: h.get(k) if h.get(k) is not None else getattr(self.cfg, k)
                    for k in SAMPLING_KEYS}
        has_c = n_c > 1 or ("c" in index and not known)
        has_z = n_z > 1 or ("z" in index and not known)
        listed = (h.get("meta") or {}).get("channels")
        channel_names = ([str(x) for x in listed[:n_c]] if isinstance(listed, list)
                         and all(isinstance(x, str) for x in listed) else [])
        layout = ImageLayout(
            plane_shape=shape[-2:],  # type: ignore[arg-type]
            dtype=dtype,
            has_c=has_c,
            has_z=has_z or len(shape) == 3,
            n_c=n_c,
            n_z=n_z,
            bits=bits,
            pixel_size_um=sampling["pixel_size_um"],
            z_step_um=sampling["z_step_um"],
            interval_s=sampling["interval_s"],
            channel_names=channel_names,
        )
        cam = h.get("camera") or {}
        spec_base = {
            "dtype": dtype,
            "bits": bits,
            **sampling,
            "position": p,
            "camera_offset": cam.get("offset"),
            "camera_gain": cam.get("gain"),
            "binning": int(h.get("binning") or 1),
            "extra": {**{k: h[k] for k in ("pixel_size_affine", "sizes") if k in h},
                      "camera_read_noise": cam.get("read_noise"),  # ADU rms
                      **({"calibration": self._calibration} if self._calibration else {})},
        }
        t_start = int(index.get("t", 0)) if (made > 0 or base > 0) else 0
        seg = _Segment(number, shape, dtype, bits, layout, spec_base, t_start=t_start, stream=stream,
                       acquisition=acquisition, fresh=why or "new",
                       saved=not (h.get("live") is True and not self.cfg.save_live), live=h.get("live") is True)
        return seg

    def _use_segment(self, seg: _Segment, frame: Frame) -> None:
        """The frame was accepted: make its segment the stream's current one (registering a new
        segment now, not before, so a refused frame leaves no trace)."""
        skey = (seg.stream, seg.spec_base["position"])
        if seg.fresh:
            current = self._segments.get(skey)
            if current is not None:
                log.warning("stream %r position %d: new segment %d (%s)", seg.stream, skey[1], seg.number,
                            seg.fresh if seg.fresh != "new" else
                            f"{current.shape} {current.dtype} {current.bits}-bit -> {seg.shape} {seg.dtype} "
                            f"{seg.bits}-bit")
            if seg.fresh != "new" or current is None:
                self._open_segments[skey] = []
                self._ended_keys.pop(skey, None)
            self._open_segments[skey].append(seg)
            self._segments_made[skey] = self._segments_made.get(skey, 0) + 1
            seg.tag = self._stream_tag(seg.stream, live=seg.live)
            seg.fresh = ""
        seg.last_seq[str(frame.header.get("source", ""))] = frame.seq
        self._segments[skey] = seg

    def _note_seq(self, frame: Frame, seg: _Segment) -> None:
        """Remember how far each publisher got, whether or not this frame is accepted: a restart
        seen now (seq went back) opens new images for every position of the stream, even when
        this first frame of the new run is refused."""
        key = (frame.stream, str(frame.header.get("source", "")))
        self._last_seq[key] = frame.seq
        self._last_seq.move_to_end(key)
        if len(self._last_seq) > 4096:  # publishers tracked at once (a source id per frame costs nothing)
            self._last_seq.popitem(last=False)
        if seg.fresh == "the publisher restarted":
            self._ended_keys.update({k: "the publisher restarted" for k in self._segments if k[0] == frame.stream})

    def _stream_tag(self, stream: str, live: bool = False) -> str:
        """The stream's part of the store's image names: none for the first acquisition stream
        the daemon sees (``raw``, ``denoised``), the stream's name for every other (``raw_camB``)
        and for every live-mode stream (``raw_mmcore-live``), whichever comes first."""
        tag = self._stream_tags.get(stream)
        if tag is None:
            if not live and "" not in self._stream_tags.values():
                tag = ""
            else:
                tag = re.sub(r"[^A-Za-z0-9.-]+", "-", stream).strip("-.")[:64] or "stream"
                taken = set(self._stream_tags.values())
                base, n = tag, 2
                while tag in taken:
                    tag, n = f"{base}-{n}", n + 1
            self._stream_tags[stream] = tag
        return tag

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.receiver.recv(timeout_ms=50)
            except Exception as exc:  # the socket itself failed: say so once per cause, keep going
                self._log_once(f"recv:{type(exc).__name__}", "receiving failed: %r", exc)
                time.sleep(0.05)
                continue
            if frame is None:
                continue
            if self._ingest_one(frame) == "exit":
                break
        drain = getattr(self.receiver, "drain", None)
        if drain is not None:  # what was handed over before stop: received, not dropped uncounted
            try:
                for frame in drain(timeout_s=2.0):
                    self._ingest_one(frame)
            except Exception as exc:
                self._log_once("drain", "draining the ingest socket at stop failed: %r", exc)
        self._ingest_done.set()

    def _ingest_one(self, frame: Frame) -> str:
        """Route one received frame; no exception in one frame can stop ingest: a frame the daemon
        cannot take is refused and counted under a reason."""
        try:
            if frame.is_end:
                log.info("stream %r ended", frame.stream)
                with self._route_lock:
                    self._ended_keys.update({k: "the previous acquisition ended"
                                             for k in self._segments if k[0] == frame.stream})
                self._ended.set()
                return "exit" if self.cfg.exit_on_end else "end"
            self._route(frame)
            return "ok"
        except _Rejected as exc:
            self._reject(exc.reason, str(exc))
        except Exception as exc:
            self._reject("internal_error", f"{type(exc).__name__}: {exc}")
            self._log_once(f"internal:{type(exc).__name__}", "a frame could not be routed (%r); it is counted "
                           "under rejected.internal_error and ingest goes on", exc, exc_info=True)
        return "rejected"

    def _reject(self, reason: str, detail: str) -> None:
        with self._counter_lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self._log_once(f"reject:{reason}", "frame refused (%s); further refusals for this reason are only "
                       "counted (livescope status: frames.rejected_by_reason)", detail)

    def _log_once(self, cause: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        if cause in self._logged:
            return
        if len(self._logged) < 1000:
            self._logged.add(cause)
        log.warning(msg, *args, exc_info=exc_info)

    def _route(self, frame: Frame, to_engines: bool = True) -> tuple[tuple, _Item] | None:
        with self._route_lock:  # the ingest and restore threads both route frames
            return self._route_locked(frame, to_engines)

    def _route_locked(self, frame: Frame, to_engines: bool) -> tuple[tuple, _Item] | None:
        if frame.array is None:
            raise _Rejected("bad_parts", "a frame without pixels")
        idx = frame.header.get("index") or {}
        p, c, z = int(idx.get("p", 0)), int(idx.get("c", 0)), int(idx.get("z", 0))
        seg = self._segment_for(frame, p)
        self._note_seq(frame, seg)
        lay = seg.layout
        if c and not lay.has_c:
            raise _Rejected("index_outside_layout", f"index.c={c}, but stream {frame.stream!r} opened this image "
                            "without a channel axis: send index.c from the first frame, or sizes.c")
        if z and not lay.has_z:
            raise _Rejected("index_outside_layout", f"index.z={z}, but stream {frame.stream!r} opened this image "
                            "without a z axis: send index.z from the first frame, or sizes.z")
        count_key = (seg.stream, p, c, z, seg.number)
        if "t" in idx:
            t = int(idx["t"]) - seg.t_start
            if t < 0:
                raise _Rejected("index_out_of_range", f"index.t={idx['t']} is before this segment's first "
                                f"time point {seg.t_start}")
        else:
            t = self._t_counter.get(count_key, 0)
        z_hi = frame.array.shape[0] - 1 if frame.array.ndim == 3 else z
        if t > seg.seen.t_max + MAX_T_JUMP or seg.seen.cells(t, c, z_hi) > MAX_RECORD_CELLS:
            raise _Rejected("index_out_of_range", f"t={t} c={c} z={z_hi}: a jump of more than {MAX_T_JUMP} "
                            f"time points, or more than {MAX_RECORD_CELLS} planes in one image")
        if not seg.seen.add(t, c, z_hi if frame.array.ndim == 3 else z):
            raise _Rejected("duplicate_index", f"stream {frame.stream!r} sent t={t} c={c} z={z} twice in one "
                            "segment; the first is kept")
        self._use_segment(seg, frame)
        if "t" not in idx:
            self._t_counter[count_key] = t + 1
        name = frame.header.get("channel")
        if isinstance(name, str) and seg.channel_names.get(c) != name:
            seg.channel_names[c] = name
            names = lay.channel_names  # shared with the products' layouts: one list per segment
            while len(names) <= c:
                names.append(f"channel {len(names)}")
            names[c] = name
        for key in SAMPLING_KEYS:  # a sampling the first frame did not say (a z step known from plane 2)
            value = frame.header.get(key)
            if value and getattr(lay, key) is None:
                for layout in (lay, *seg.product_layouts):
                    setattr(layout, key, float(value))
                seg.spec_base[key] = float(value)
        sender = frame.header.get("sender")
        if sender:
            self.sender_stats[frame.stream] = dict(sender)
        item = _Item(frame, p, c, z, t, seg, frame.received_at,
                     cost=frame.array.nbytes + frame.header_nbytes)
        job = self._fit_job
        if job is not None and job.collecting:
            job.offer(item)
        self.received += 1
        self.fps_in.tick()
        nbytes = item.cost  # pixels and header (a sender's metadata counts against the budget too)
        with self._bytes_lock:
            fits = seg.saved and self._queued_bytes + nbytes <= self._budget
            if fits:
                self._queued_bytes += nbytes
        if not seg.saved:
            self.live_not_saved += 1
        elif fits:
            self._store_q.put(item)
        else:
            self.dropped += 1
            self._store_q.put(_Mark.of("lost", ("raw",), item))
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.error("store falls behind: %d frame(s) lost over the %.0f MB memory budget",
                          self.dropped, self.cfg.memory_budget_mb)
        self._preview_latest[("raw", seg.tag, p, c, z)] = (frame.array, self._preview_header(item, "raw"))
        if self.engine_states:
            key = (seg.stream, p, c, z, seg.number)
            if self._volume_mode and frame.array.ndim == 2:
                vol = self._assemble(item)
                if vol is None:
                    return None
                item, key = vol, (seg.stream, p, c, -1, seg.number)
            if not to_engines:
                return key, item
            with self._slot_cond:
                old = self._slots.get(key)
                self._slots[key] = item
                self._slot_cond.notify()
            if old is not None:
                self._skip(old)
        return None

    def _assemble(self, item: _Item) -> _Item | None:
        """Collect the z planes of one time point; a complete stack becomes one item (z = 0)."""
        lay = item.segment.layout
        n_z = lay.n_z if lay.has_z else 1
        key = (*item.segment.key, item.c, item.t)
        planes = self._partial_volumes.setdefault(key, {})
        planes[item.z] = item
        for old in [k for k in self._partial_volumes if k[:4] == key[:4] and k[4] < item.t - 1]:
            stale = self._partial_volumes.pop(old)  # planes of a stack that never completed
            for it in stale.values():
                self._skip(it)
        if len(planes) < n_z:
            return None
        del self._partial_volumes[key]
        stack = np.stack([planes[z].array for z in sorted(planes)])
        first = planes[min(planes)]
        header = dict(first.frame.header, shape=list(stack.shape))
        return _Item(Frame(header, stack), item.p, item.c, 0, item.t, item.segment, first.received, cost=0)

    def _products(self) -> tuple[str, ...]:
        out: list[str] = []
        for s in self.engine_states.values():
            if s.enabled:
                out.extend(o for o in s.outputs if o not in s.scalar_names)
        return tuple(out)

    def _skip(self, item: _Item) -> None:
        self.skipped_frames += 1
        for s in self.engine_states.values():
            if s.enabled:
                self.skipped[s.name] = self.skipped.get(s.name, 0) + 1
        products = tuple(p for p in self._products() if self.cfg.saves(p))
        if products and self.store is not None and item.segment.saved:
            self._store_q.put(_Mark.of("skipped", products, item))

    # -- restore at capture time -----------------------------------------------------------
    def _restore_loop(self) -> None:
        """Synchronous restoration for hooks that must return the restored frame to the
        acquisition (Pycro-Manager's ``restore``): the frame is saved as raw like any other, run
        through the chain at once (never skipped), and the requested product is sent back."""
        import zmq

        from ..bridges.protocol import MAX_FRAME_BYTES, ProtocolError, decode, encode

        curve = self.curve
        sock = (curve.acquire() if curve is not None else zmq.Context.instance()).socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # a message part larger than a frame can be (the protocol's limit) is dropped by libzmq, its
        # sender disconnected, before any memory is taken for it
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if curve is not None:
            curve.secure(sock)
        try:
            sock.bind(self.cfg.restore)
            from ..bridges.auth import restrict_ipc

            restrict_ipc(self.cfg.restore)
        except zmq.ZMQError as exc:
            log.error("cannot bind the restore socket to %s: %s", self.cfg.restore, exc)
            sock.close()
            if curve is not None:
                curve.release()
            return
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                parts = sock.recv_multipart(copy=False)
                ident, body = parts[0], parts[2:] if len(parts) > 2 and len(parts[1].bytes) == 0 else parts[1:]
                envelope = [ident.bytes, b""]
                try:
                    frame = decode(body)
                    routed = self._route(frame, to_engines=False)
                    if routed is None:
                        raise ValueError("the frame is part of a z-stack still being assembled")
                    images = self._process(*routed)
                    want = frame.header.get("want")
                    if want is None and images:
                        want = list(images)[-1]
                    if want not in images:
                        raise KeyError(f"no product {want!r}; the chain made {sorted(images)}")
                    out = np.ascontiguousarray(images[want], dtype=np.float32)
                    header = {"v": 1, "stream": frame.stream, "seq": frame.seq, "kind": "frame",
                              "product": want, "shape": list(out.shape), "dtype": "float32"}
                    sock.send_multipart(envelope + encode(header, out), copy=False)
                    self.restored += 1
                except Exception as exc:  # answered, counted; the loop serves the next frame
                    self.restore_errors += 1
                    if not isinstance(exc, (ProtocolError, ValueError, KeyError, RuntimeError)):
                        log.exception("restore failed on a frame")
                    err = {"v": 1, "stream": "error", "seq": 0, "kind": "end", "error": str(exc)[:1000]}
                    sock.send_multipart(envelope + encode(err, None))
        finally:
            sock.close(linger=0)
            if curve is not None:
                curve.release()

    # -- engines ---------------------------------------------------------------------------
    def _worker_loop(self) -> None:
        while True:
            with self._slot_cond:
                while not self._slots and not self._stop.is_set():
                    self._slot_cond.wait(0.1)
                if not self._slots:
                    if self._stop.is_set() and self._ingest_done.is_set():
                        return
                    continue
                key, item = self._slots.popitem(last=False)
            try:
                self._process(key, item)
            except Exception:
                log.exception("engine chain failed on seq %d", item.frame.seq)

    def _process(self, key: tuple, item: _Item) -> dict[str, np.ndarray]:
        with self._chain_lock:
            chain = self._chains.get(key)
            if chain is None:
                seg = item.segment
                spec = StreamSpec(shape=tuple(item.array.shape), channel=str(item.frame.header.get("channel", item.c)),
                                  **seg.spec_base)
                chain = self._chains[key] = _Chain(self, spec)
            t0 = time.perf_counter()
            images, scalars, events, failed = chain.run(item)
            self.lat_chain.add(time.perf_counter() - t0)
        dropped_products: list[str] = []
        for name, arr in images.items():
            arr = np.asarray(arr)
            if self.store is not None and item.segment.saved and self.cfg.saves(name):
                # products get at most half the memory budget, so raw always has room; a product
                # that does not fit is recorded as skipped for that frame
                with self._bytes_lock:
                    fits = self._queued_product_bytes + arr.nbytes <= self._budget // 2
                    if fits:
                        self._queued_product_bytes += arr.nbytes
                if fits:
                    self._store_q.put(_Product(name, arr, item))
                else:
                    dropped_products.append(name)
            self._preview_latest[(name, item.segment.tag, item.p, item.c, item.z)] = (
                arr, self._preview_header(item, name))
        if dropped_products:
            self.products_dropped += len(dropped_products)
            self._store_q.put(_Mark.of("skipped", tuple(dropped_products), item))
        failed = [f for f in failed if self.cfg.saves(f)]
        if failed and self.store is not None and item.segment.saved:
            self._store_q.put(_Mark.of("failed", tuple(failed), item))
        if scalars:
            self.scalars_last.update(scalars)
            if item.segment.saved:
                self._store_q.put(("scalars", scalars, item))
        for ev in events:
            self.add_event({"seq": item.frame.seq, "p": item.p, "c": item.c, "z": item.z, "t": item.t,
                            "time": item.frame.timestamp, "frame_shape": list(item.array.shape[-2:]),
                            "pixel_size_um": item.frame.header.get("pixel_size_um"), **ev})
        self.fps_out.tick()
        return images

    def add_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Number an event and keep it for the feedback channel (``events`` on the control socket):
        clients ask for events after the last id they handled, so none is lost or reordered while
        the client keeps within the retention (10,000 events)."""
        event = dict(event)
        for key in ("id", "emitted"):  # the daemon numbers and times events; a producer's own are kept aside
            if key in event:
                event[f"source_{key}"] = event.pop(key)
        with self._events_lock:
            self._event_id += 1
            event = {"id": self._event_id, "emitted": time.time(), **event}
            self.events.append(event)
            if len(self.events) > 10000:
                del self.events[:1000]
        log.info("event: %s", json.dumps(event, default=str))
        return event

    def events_after(self, after: int, limit: int = 500) -> list[dict[str, Any]]:
        with self._events_lock:
            return [e for e in self.events if e["id"] > after][:limit]

    def _confined(self, path: Any) -> str | None:
        """Every path a control command takes (``swap_model``, a file parameter of ``set``) must lie
        inside the output folder, or name the default (None). A refused path is refused before
        anything outside is looked at, so the reply says nothing about files there."""
        if path is None or path in ("", "default", "none", "None"):
            return None
        if not isinstance(path, str) or "\0" in path:
            raise PermissionError("a path from the control socket must be a string naming a file in the output folder")
        if self.cfg.out is None:
            raise PermissionError("this daemon has no --out folder: paths from the control socket are refused")
        import os
        from pathlib import Path

        def inside(root: str, target: str) -> bool:
            try:
                return os.path.commonpath([root, target]) == root
            except ValueError:  # another drive (Windows)
                return False

        root = os.path.abspath(self.cfg.out)
        # first by name alone: an outside path (e.g. a network share) is never touched
        if not inside(root, os.path.normpath(os.path.join(root, path))):
            raise PermissionError(f"{path!r} is outside the output folder {root}; copy the file there first")
        real_root = str(Path(root).resolve())
        target = str((Path(real_root) / path).resolve())
        if not inside(real_root, target):  # a link inside that leads outside
            raise PermissionError(f"{path!r} is outside the output folder {root}; copy the file there first")
        return target

    def _start_fit(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("engine", "denoise")
        if not isinstance(name, str):
            return {"ok": False, "error": "fit needs a string 'engine'"}
        state = self.engine_states.get(name)
        if state is None or not state.enabled:
            return {"ok": False, "error": f"engine {name!r} is not running in this daemon"}
        if self._fit_job is not None and self._fit_job.state in ("collecting", "fitting"):
            return {"ok": False, "error": "a fit is already running; see status.fit"}
        # the task follows the engine; "restore" on the deconvolve engine (or the reverse) is allowed
        tasks = {"denoise": ("denoise",), "deconvolve": ("deconvolve", "restore"), "restore": ("restore", "deconvolve")}
        if name not in tasks:
            return {"ok": False, "error": f"engine {name!r} cannot be fitted live; these can: {', '.join(tasks)}"}
        task = request.get("task") or tasks[name][0]
        if task not in tasks[name]:
            return {"ok": False, "error": f"engine {name!r} cannot run a model fitted for {task!r}; "
                                          f"it takes: {', '.join(tasks[name])}"}
        if name == "deconvolve" and state.params.get("method", "wb") not in ("wb", "rl", "net"):
            return {"ok": False, "error": "deconvolve runs an unknown method"}
        frames, steps, seconds = request.get("frames", 32), request.get("steps", 200), request.get("seconds", 120.0)

        def number(v: Any, kind: tuple[type, ...]) -> bool:
            return isinstance(v, kind) and not isinstance(v, bool)

        if not (number(frames, (int,)) and number(steps, (int,)) and number(seconds, (int, float))
                and 2 <= frames <= 1000 and 1 <= steps <= 100000 and 0 < seconds <= 36000):
            return {"ok": False, "error": "fit needs integers 2 <= frames <= 1000, 1 <= steps <= 100000 and a "
                                          "number 0 < seconds <= 36000"}
        self._fit_job = _FitJob(self, name, frames, steps, seconds, task=str(task))
        return {"ok": True, "fit": self._fit_job.status()}

    def _swap_all(self, name: str, path: str) -> None:
        with self._chain_lock:  # between frames
            state = self.engine_states[name]
            for chain in self._chains.values():
                eng = chain.engines.get(name)
                if eng is None:
                    continue
                eng.swap_model(path)  # a classical deconvolve run switches to method="net"
            state.params["model"] = path
            if name == "deconvolve":
                state.params["method"] = "net"
        if self.store is not None:
            self.store.update_provenance(engines={n: dict(s.params) for n, s in self.engine_states.items()})

    def _disable(self, state: _EngineState, reason: str) -> None:
        state.enabled = False
        state.reason = reason
        log.error("engine %s disabled: %s", state.name, reason)

    # -- store -----------------------------------------------------------------------------
    def _writer(self, product: str, item: _Item):
        return self._writer_for(product, item.p, item.segment)

    def _writer_for(self, product: str, position: int, seg: _Segment):
        assert self.store is not None
        tagged = {"stream": seg.tag} if seg.tag else {}  # a second camera's images: raw_camB, ...
        name = image_name(product, position, seg.number, **tagged)
        writer = self.store.images.get(name)  # the common case, per frame: no new layout
        if writer is not None:
            return writer
        layout = seg.layout if product == "raw" else dataclasses.replace(seg.layout, dtype="float32")
        if layout is not seg.layout:
            seg.product_layouts.append(layout)
        return self.store.image(product, position, seg.number, layout, **tagged)

    def _store_loop(self) -> None:
        last_poll = 0.0
        while True:
            try:
                entry = self._store_q.get(timeout=0.05)
            except queue.Empty:
                entry = None
                if self._stop.is_set() and self._ingest_done.is_set() and not any(
                    t.is_alive() for t in self._threads if t.name == "livescope-worker"
                ) and self._store_q.empty():
                    break
            if entry is not None:
                try:
                    self._store_one(entry)
                except Exception as exc:
                    self.store_errors += 1
                    log.error("store: %s", exc)
                    if self.store_errors == 1:
                        log.exception("first store error")
            now = time.monotonic()
            if self.store is not None and (now - last_poll > 0.02 or entry is None):
                last_poll = now
                for w in list(self.store.images.values()):
                    try:
                        w.flush_due(now)
                        n = w.poll()
                        if n and w.product == "raw":
                            for _ in range(min(n, 1000)):
                                self.fps_saved.tick(now)
                    except Exception as exc:
                        self.store_errors += 1
                        log.error("store %s: %s", w.name, exc)
                self._check_disk()

    def _store_one(self, entry: Any) -> None:
        if isinstance(entry, _Item):
            arr = entry.array
            sat_level = 2**entry.segment.bits - 1
            sat = int(np.count_nonzero(arr >= sat_level)) if arr.dtype.kind in "ui" else 0
            self.saturated_last = sat
            self.saturated_total += sat
            try:
                if self.store is not None:
                    w = self._writer("raw", entry)
                    try:
                        self._write(w, entry, arr, saturated=sat)
                    except Exception:
                        # the store could not take it (e.g. the disk is full): a lost frame, counted
                        self.store_lost += 1
                        raise
                    meta = entry.frame.header.get("meta")
                    if meta:
                        w.write_meta(entry.t, entry.c, entry.z, entry.frame.seq, meta)
                    self.lat_store.add(time.perf_counter() - entry.received)  # received -> buffered
            finally:
                with self._bytes_lock:
                    self._queued_bytes -= entry.cost
        elif self.store is None:
            return
        elif isinstance(entry, _Product):
            try:
                w = self._writer(entry.name, entry.item)
                self._write(w, entry.item, entry.array.astype(w.dtype, copy=False))
            finally:
                with self._bytes_lock:
                    self._queued_product_bytes -= entry.array.nbytes
        elif isinstance(entry, _Mark):
            for product in entry.products:
                w = self._writer_for(product, entry.p, entry.segment)
                for z in entry.zs:
                    w.mark(entry.t, entry.c, z, entry.status, seq=entry.seq, time_s=entry.time_s)
        elif isinstance(entry, tuple) and entry[0] == "scalars":
            _, scalars, item = entry
            w = self._writer("raw", item)
            for name, value in scalars.items():
                w.write_scalar(name, item.t, item.c, item.z, value)

    @staticmethod
    def _write(w: Any, item: _Item, arr: np.ndarray, saturated: int = -1) -> None:
        if arr.ndim == 3:  # a z-stack in one message
            for z in range(arr.shape[0]):
                w.write(item.t, item.c, z, arr[z], seq=item.frame.seq, time_s=item.frame.timestamp, saturated=saturated)
        else:
            w.write(item.t, item.c, item.z, arr, seq=item.frame.seq, time_s=item.frame.timestamp, saturated=saturated)

    def _check_disk(self) -> None:
        now = time.monotonic()
        if self.store is None or now - self._disk_warned < 10:
            return
        free = self.store.free_bytes()
        if free < self.store.min_free_gb * 2**30:
            self._disk_warned = now
            log.warning("only %.2f GB free at %s: the store will fill the disk soon", free / 2**30, self.store.path)

    # -- previews --------------------------------------------------------------------------
    def _preview_header(self, item: _Item, product: str) -> dict[str, Any]:
        h = item.frame.header
        return {
            "v": 1, "stream": h["stream"], "seq": item.frame.seq, "product": product, "_received": item.received,
            "live": bool(h.get("live")),
            "index": {"p": item.p, "c": item.c, "z": item.z, "t": item.t},
            "time": item.frame.timestamp, "bits": item.segment.bits,
            "channel": h.get("channel"), "pixel_size_um": h.get("pixel_size_um"),
        }

    def _preview_loop(self) -> None:
        period = 1.0 / max(self.cfg.preview_hz, 0.1)
        while not self._stop.is_set() or not self._ingest_done.is_set():
            time.sleep(period)
            if self.preview is None:
                continue
            # at most half the high-water mark per tick, the longest-waiting first, so every
            # product and plane gets its turn even when there are more than fit in one burst
            changed = [(self._preview_when.get(k, 0.0), k) for k, (_, h) in list(self._preview_latest.items())
                       if self._preview_sent.get(k) != h["seq"]]
            changed.sort(key=lambda x: x[0])
            now = time.monotonic()
            for _, key in changed[:16]:
                arr, header = self._preview_latest[key]
                self._preview_sent[key] = header["seq"]
                self._preview_when[key] = now
                try:
                    small = self._downsample(arr)
                    hdr = dict(header, shape=list(small.shape), dtype=small.dtype.name,
                               frame_shape=list(np.shape(arr)[-2:]))  # the viewer scales event boxes by it
                    if header.get("pixel_size_um") and small.shape != arr.shape:
                        hdr["pixel_size_um"] = header["pixel_size_um"] * arr.shape[-1] / small.shape[-1]
                    if self.scalars_last:
                        hdr["scalars"] = dict(self.scalars_last)
                    received = hdr.pop("_received", None)
                    if received is not None:  # frame received -> its preview (this product) on the wire
                        latency = time.perf_counter() - received
                        hdr["latency_ms"] = round(latency * 1000, 2)
                        (self.lat_preview_raw if header.get("product") == "raw" else self.lat_preview).add(latency)
                    self.preview.send(hdr, small)
                except Exception:
                    log.exception("preview failed")

    def _downsample(self, arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.ndim == 3:
            arr = arr[arr.shape[0] // 2]
        step = max(1, math.ceil(max(arr.shape[-2:]) / self.cfg.preview_size))
        small = arr[::step, ::step]
        if small.dtype.kind == "f" and small.dtype != np.float32:
            small = small.astype(np.float32)
        return np.ascontiguousarray(small)

    # -- control ---------------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "stop":
            self.request_stop()
            return {"ok": True}
        if cmd == "events":
            after = request.get("after", 0)
            if not isinstance(after, int) or isinstance(after, bool):
                return {"ok": False, "error": "events needs an integer 'after' (the last id handled)"}
            limit = request.get("limit", 500)
            if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
                return {"ok": False, "error": "events: 'limit' must be an integer from 1 to 10000"}
            evs = self.events_after(after, limit)
            return {"ok": True, "events": evs, "last": self._event_id}
        if cmd == "fit":
            return self._start_fit(request)
        if cmd == "emit":  # an external producer of events (a trust check, a user click in the viewer)
            ev = request.get("event")
            if not isinstance(ev, dict) or not all(isinstance(k, str) for k in ev):
                return {"ok": False, "error": "emit needs an 'event' object (string keys)"}
            if len(json.dumps(ev, default=str)) > 4096:  # the daemon keeps 10,000 events: each stays small
                return {"ok": False, "error": "emit: the event is over 4 kB as JSON; send a smaller one"}
            return {"ok": True, "event": self.add_event(ev)}
        if cmd in ("enable", "disable", "set", "swap_model"):
            name = request.get("engine")
            if not isinstance(name, str):
                return {"ok": False, "error": f"{cmd} needs a string 'engine'"}
            state = self.engine_states.get(name)  # type: ignore[arg-type]
            if state is None:
                return {"ok": False, "error": f"no engine {name!r} in this daemon; it runs: {list(self.engine_states)}"}
            with self._chain_lock:  # between frames
                if cmd == "enable":
                    state.enabled, state.reason, state.failures_in_row = True, "", 0
                elif cmd == "disable":
                    state.enabled, state.reason = False, "disabled by a control command"
                elif cmd == "set":
                    param, value = request.get("param"), request.get("value")
                    if not isinstance(param, str):
                        return {"ok": False, "error": "set needs a string 'param'"}
                    from ..engines import engine_parameters
                    from .config import PATH_PARAMS

                    try:
                        accepted = engine_parameters(name)
                    except EngineError:  # an engine that did not load: nothing to set
                        return {"ok": False, "error": f"engine {name} is not available: {state.reason}"}
                    if accepted is not None and param not in accepted:
                        return {"ok": False, "error": f"engine {name} has no parameter {param!r}; "
                                                      f"it takes: {', '.join(accepted)}"}
                    # a file parameter takes a path in the output folder; inline data (a PSF array, a
                    # calibration object) names no file
                    if param in PATH_PARAMS and (param, type(value)) not in (("psf", list), ("calibration", dict)):
                        value = self._confined(value)
                    for chain in self._chains.values():
                        eng = chain.engines.get(name)
                        if eng is not None:
                            setter = getattr(eng, "set_param", None)
                            if setter is None:
                                return {"ok": False, "error": f"engine {name} has no settable parameters"}
                            setter(param, value)
                    state.params[param] = value
                else:
                    path = self._confined(request.get("path"))
                    for chain in self._chains.values():
                        eng = chain.engines.get(name)
                        if eng is not None:
                            swap = getattr(eng, "swap_model", None)
                            if swap is None:
                                return {"ok": False, "error": f"engine {name} has no model to swap"}
                            swap(path)
                    state.params["model"] = path
            if self.store is not None:
                self.store.update_provenance(engines={n: dict(s.params) for n, s in self.engine_states.items()})
            return {"ok": True, "engine": name, "enabled": state.enabled}
        return {"ok": False,
                "error": f"unknown command {cmd!r}; try status, stop, set, enable, disable, swap_model, events, emit"}

    def status(self) -> dict[str, Any]:
        saved = lost_rec = 0
        store_info: dict[str, Any] = {}
        if self.store is not None:
            raws = [w for w in self.store.images.values() if w.product == "raw"]
            saved = sum(w.saved for w in raws)
            lost_rec = sum(w.lost for w in raws)
            store_info = {
                "path": str(self.store.path),
                "bytes_written": sum(w.bytes_written for w in self.store.images.values()),
                "free_gb": round(self.store.free_bytes() / 2**30, 2),
                "images": sorted(self.store.images),
                "saved_by_image": {w.name: w.saved for w in self.store.images.values()},
                "write_errors": sum(w.write_errors for w in self.store.images.values()),
                "last_error": next((w.last_error for w in self.store.images.values() if w.last_error), ""),
            }
        rx = self.receiver.stats()
        with self._counter_lock:
            rejected = dict(self.rejected)
        with self._bytes_lock:
            queued = self._queued_bytes
        return {
            "state": self.state,
            "uptime_s": round(time.time() - self.started, 3),
            "source": self.cfg.source,
            "frames": {
                "received": self.received,
                "saved": saved,
                "lost": rx["lost"] + lost_rec + self.store_lost,
                "lost_in_transport": rx["lost"],
                "dropped_over_budget": self.dropped,
                "live_not_saved": self.live_not_saved,
                "rejected": rx["rejected"] + sum(rejected.values()),
                "rejected_by_reason": _merge_counts(rx["rejected_by_reason"], rejected),
                "restarts": rx["restarts"],
                "dropped_at_close": rx.get("dropped_at_close", 0),  # handed over, still queued at stop
                "skipped": dict(self.skipped),
                "skipped_frames": self.skipped_frames,
                "saturated_last": self.saturated_last,
                "store_errors": self.store_errors,
            },
            "fps": {"in": self.fps_in.per_second(), "saved": self.fps_saved.per_second(),
                    "processed": self.fps_out.per_second()},
            "latency": {"store": self.lat_store.summary(), "chain": self.lat_chain.summary(),
                        "preview": self.lat_preview.summary(), "preview_raw": self.lat_preview_raw.summary()},
            "queues": {"store_items": self._store_q.qsize(), "store_mb": round(queued / 2**20, 2),
                       "products_mb": round(self._queued_product_bytes / 2**20, 2),
                       "products_dropped": self.products_dropped,
                       "engine_slots": len(self._slots)},
            "engines": {
                n: {"enabled": s.enabled, "reason": s.reason, "processed": s.processed, "failures": s.failures,
                    "latency": s.latency.summary(), "outputs": list(s.outputs), "params": s.params}
                for n, s in self.engine_states.items()
            },
            "segments": {(f"{k[0]}/p{k[1]}" if s.tag else str(k[1])): s.number for k, s in self._segments.items()},
            "streams": {stream: {"images": tag or "(plain names)", "sender": self.sender_stats.get(stream, {})}
                        for stream, tag in self._stream_tags.items()},
            "events": len(self.events),
            "restore": {"served": self.restored, "errors": self.restore_errors} if self.cfg.restore else None,
            "curve": {"keys": str(self.curve.folder), "refused_clients": self.curve.refused} if self.curve else None,
            "fit": self._fit_job.status() if self._fit_job is not None else None,
            "scalars": dict(self.scalars_last),
            "store": store_info,
        }


def _merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _read_calibration(path: str | None) -> dict[str, Any] | None:
    """The camera calibration file, checked now: a bad one stops the daemon before it starts."""
    if not path:
        return None
    from pathlib import Path

    from ..engines.calibrate import NoiseModel

    try:
        data = json.loads(Path(path).read_text())
        NoiseModel.from_dict(data)  # the fields the engines will read
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--calibration {path}: not a readable livescope calibration ({exc!r}); "
                         "write one with `livescope calibrate MOVIE --out CAL.json`") from exc
    return data
