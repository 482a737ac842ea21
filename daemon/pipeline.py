"""The daemon's pipeline: ingest -> raw store (lossless), and in parallel the engine chain.

A frame's journey, by file:

1. :mod:`livescope.bridges.transport` receives and validates it (the wire protocol);
2. :mod:`.routing` gives it its image (segment) and place (t, c, z), or refuses it, counted;
3. here, it is offered to the sinks (:mod:`.sinks`): the store queue within the memory budget,
   the preview, and into its (stream, position, channel, z) engine slot; with a volume engine,
   :mod:`.assembly` first collects the planes of a stack;
4. a worker runs the newest frame of each slot through its :class:`~.chain.Chain` (:mod:`.chain`)
   and offers the products to the sinks; a frame replaced in its slot before the worker took it
   is *skipped* for every product, and recorded so;
5. the store thread (:class:`~.sinks.StoreSink`) writes and turns completed writes into "saved".

Beside it: the control commands (:mod:`.commands`, a table of handlers), live fitting
(:mod:`.fitjob`) and restoration at capture time (:mod:`.restore`).

Policies: the producer is never blocked; raw is lossless up to ``memory_budget_mb`` of queued
frames, past which each frame that cannot be kept is recorded as lost; a failing engine passes the
frame through unprocessed, flagged, and is disabled after ``max_engine_failures`` in a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import __version__
from ..bridges.files import SAMPLING_KEYS
from ..bridges.protocol import Frame
from ..bridges.store import OmeZarrStore
from ..bridges.transport import FrameReceiver, PreviewPublisher
from ..engines import FrameInfo, StreamSpec
from . import commands
from .assembly import StackAssembler
from .chain import Chain, EngineSlot, event_record
from .completion import Completer
from .config import DaemonConfig
from .fitjob import FitJob
from .restore import RestoreServer
from .routing import MAX_RECORD_CELLS, MAX_SEGMENTS, MAX_T_JUMP, Item, Rejected, Router
from .sinks import EventLog, PreviewSink, StoreSink
from .telemetry import Latency, Rate
from .tuning import Tuner

__all__ = ["MAX_RECORD_CELLS", "MAX_SEGMENTS", "MAX_T_JUMP", "Pipeline"]

log = logging.getLogger(__name__)


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
        why = (
            (
                f"{', '.join(opened)}: not a loopback address; binding it would open the microscope PC to the "
                "network, so livescope requires ZeroMQ CURVE keys. "
            )
            if opened
            else "CURVE was asked for (--curve). "
        )
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
        self._stop = threading.Event()
        self._ingest_done = threading.Event()
        self._ended = threading.Event()
        self.engine_states: dict[str, EngineSlot] = {
            name: EngineSlot(name, cfg.engine_params.get(name, {})) for name in cfg.engines
        }
        self.store: OmeZarrStore | None = None
        if cfg.out is not None:
            try:
                self.store = OmeZarrStore(
                    cfg.out,
                    overwrite=cfg.overwrite,
                    resume=cfg.resume,
                    compress_raw=cfg.compress_raw,
                    product_dtypes=cfg.stored_dtypes(),
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
                raise OSError(
                    f"--source {cfg.source} with CURVE needs an owner-only ipc socket ({exc}); run the "
                    "source as an external publisher with client keys and --source zmq"
                ) from None
        try:
            self.receiver = FrameReceiver(cfg.ingest, bind=True, hwm=256, curve=self.curve, private=private)
            self.preview = PreviewPublisher(cfg.publish, curve=self.curve) if cfg.publish else None
        except Exception:
            if getattr(self, "receiver", None) is not None:
                self.receiver.close()
            if self.curve is not None:
                self.curve.close()
            raise
        self.router = Router(
            fallback={k: getattr(cfg, k) for k in SAMPLING_KEYS},
            save_live=cfg.save_live,
            calibration=self._calibration,
            segment_base=self.store.segment_base if self.store is not None else 0,
        )
        self.sink = StoreSink(self.store, cfg.memory_budget_mb)
        self.previews = PreviewSink(self.preview, cfg.preview_hz, cfg.preview_size)
        self.event_log = EventLog()
        self.assembler = StackAssembler(on_stale=self._skip)
        saves_products = self.store is not None and cfg.save_products is not False and bool(cfg.engines)
        self.completer = Completer(
            cfg.complete if saves_products else "off",
            sink=self.sink,
            writer=lambda product, item: self.sink.find_writer(product, item.p, item.segment),
            saves=cfg.saves,
            make_chain=self._new_chain,
            live_done=self._live_done,
            engine_slots=list(self.engine_states.values()),
        )
        # with an engine that needs volumes, the whole chain runs on (z, y, x) stacks assembled here
        self._volume_mode = any(s.needs_volume and s.enabled for s in self.engine_states.values())
        self._slots: OrderedDict[tuple, Item] = OrderedDict()
        self._slot_cond = threading.Condition()
        self._chains: dict[tuple, Chain] = {}
        self._chain_lock = threading.Lock()  # held while a frame runs: control commands wait for it
        self._route_lock = threading.Lock()  # the ingest and restore threads both route frames
        self.restore_server = (
            RestoreServer(cfg.restore, self._restore_one, curve=self.curve, stop=self._stop) if cfg.restore else None
        )
        self.fit_job: FitJob | None = None
        self._newest: dict[tuple, Item] = {}  # per engine slot, the newest routed frame (for the tuner)
        self.tuner = (
            Tuner(
                newest=lambda: dict(self._newest),
                engine_params=lambda: (
                    dict(self.engine_states["deconvolve"].params) if "deconvolve" in self.engine_states else None
                ),
                apply=lambda engine, param, value: self.handle(
                    {"cmd": "set", "engine": engine, "param": param, "value": value}
                ),
                publish=self._publish_scalars,
                calibration=self._calibration,
                tune="deconvolve" in self.engine_states,
                every_s=cfg.tune_every_s,
                resolution_every_s=cfg.resolution_every_s,
                stop=self._stop,
                denoise_params=(
                    (lambda: dict(self.engine_states["denoise"].params))
                    if _denoises_before_deconvolving(list(self.engine_states))
                    else None
                ),
            )
            if cfg.tune != "off" and self.engine_states
            else None
        )
        self.changes: list[dict[str, Any]] = []  # parameter changes and model swaps, where they apply
        self.rejected: dict[str, int] = {}  # frames the daemon refused after decoding, by reason
        self.sender_stats: dict[str, dict[str, int]] = {}  # what each stream's sender says it dropped
        self._counter_lock = threading.Lock()
        self._logged: set[str] = set()
        self.scalars_last: dict[str, float] = {}
        # counters
        self.received = 0
        self.live_not_saved = 0  # frames of live-mode streams (not saved unless --save-live)
        self.skipped: dict[str, int] = {}  # per engine
        self.skipped_frames = 0  # frames the chain did not take (each counts once, whatever the engines)
        self.fps_in = Rate()
        self.fps_out = Rate()
        self.lat_chain = Latency()
        self._threads: list[threading.Thread] = []

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.event_log.events

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
        loops = [
            ("ingest", self._ingest_loop),
            ("store", self._store_loop),
            ("worker", self._worker_loop),
            ("preview", self._preview_loop),
        ]
        if self.restore_server is not None:
            loops.append(("restore", self.restore_server.run))
        if self.completer.enabled:
            loops.append(("complete", self.completer.run))
        if self.tuner is not None:
            loops.append(("tune", self.tuner.run))
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

    def _live_done(self) -> bool:
        """No more frames will reach the engine slots (so no more completion tickets)."""
        return (
            self._stop.is_set()
            and self._ingest_done.is_set()
            and not any(t.is_alive() for t in self._threads if t.name == "livescope-worker")
        )

    def _finish_completion(self, progress: bool) -> None:
        thread = next((t for t in self._threads if t.name == "livescope-complete"), None)
        if thread is None:
            return
        self.state = "completing"
        to_go = self.completer.to_go()
        bar = None
        if to_go:
            log.info("completing the saved products: %d frame(s) the live path skipped, restored in order", to_go)
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=to_go, desc="completing products", unit="frame")
        t0 = time.monotonic()
        while thread.is_alive():
            thread.join(0.25)
            if bar is not None:
                bar.n = to_go - self.completer.to_go()
                bar.refresh()
        if bar is not None:
            bar.close()
        st = self.completer.status()
        self.completion_s = time.monotonic() - t0
        if st["frames_to_go"]:
            log.warning(
                "completion stopped with %d frame(s) to go: their products stay recorded as skipped",
                st["frames_to_go"],
            )
        elif to_go:
            log.info("products complete: %d frame(s) restored after the stream in %.1f s", to_go, self.completion_s)

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

    def close(self, progress: bool = False) -> dict[str, Any]:
        """Stop receiving, let the engines finish what they hold, complete the saved products
        (:mod:`.completion`; a progress bar with ``progress``), flush and close the store."""
        self.state = "stopping"
        self._stop.set()
        self._ingest_done.wait(5)
        with self._slot_cond:
            self._slot_cond.notify_all()
        last = ("livescope-complete", "livescope-store")
        for th in self._threads:
            if th.name not in last:
                th.join(60)
        self._finish_completion(progress)
        for th in self._threads:
            if th.name in last:
                th.join(60)
        described = self._describe_engines()  # before close: what each engine ended up using
        for chain in [*self._chains.values(), *self.completer.chains()]:
            chain.close()
        if self.store is not None:
            flush = getattr(self.store, "flush", None)
            if flush is not None:  # every write and record on disk first: the summary counts them
                try:
                    flush()
                except Exception as exc:
                    log.error("store: the final flush failed: %s", exc)
            self.store.update_provenance(
                events=self.events[-1000:],
                summary=self.status()["frames"],
                engine_state=described,
                completion=self.completer.status(),
            )
            self.store.close()
        self.receiver.close()
        if self.preview is not None:
            self.preview.close()
        if self.curve is not None and self.state != "stopped":
            self.curve.release()
        self.state = "stopped"
        return self.status()

    # -- ingest ----------------------------------------------------------------------------
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
                    self.router.end(frame.stream)
                self._ended.set()
                return "exit" if self.cfg.exit_on_end else "end"
            self._route(frame)
            return "ok"
        except Rejected as exc:
            self._reject(exc.reason, str(exc))
        except Exception as exc:
            self._reject("internal_error", f"{type(exc).__name__}: {exc}")
            self._log_once(
                f"internal:{type(exc).__name__}",
                "a frame could not be routed (%r); it is counted under rejected.internal_error and ingest goes on",
                exc,
                exc_info=True,
            )
        return "rejected"

    def _reject(self, reason: str, detail: str) -> None:
        with self._counter_lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self._log_once(
            f"reject:{reason}",
            "frame refused (%s); further refusals for this reason are only "
            "counted (livescope status: frames.rejected_by_reason)",
            detail,
        )

    def _log_once(self, cause: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        if cause in self._logged:
            return
        if len(self._logged) < 1000:
            self._logged.add(cause)
        log.warning(msg, *args, exc_info=exc_info)

    def _route(self, frame: Frame, to_engines: bool = True) -> tuple[tuple, Item] | None:
        """Route one frame and offer it to the sinks and its engine slot. With ``to_engines``
        False (restore at capture time), the slot key and item are returned for the caller to
        run at once."""
        with self._route_lock:
            item = self.router.route(frame)  # raises Rejected before any state changes
            return self._accept(item, to_engines)

    def _accept(self, item: Item, to_engines: bool) -> tuple[tuple, Item] | None:
        frame, seg = item.frame, item.segment
        sender = frame.header.get("sender")
        if sender:
            self.sender_stats[frame.stream] = dict(sender)
        job = self.fit_job
        if job is not None and job.collecting:
            job.offer(item)
        self.received += 1
        self.fps_in.tick()
        if seg.saved:
            self.sink.offer_raw(item)
        else:
            self.live_not_saved += 1
        self.previews.offer("raw", item.array, item)
        if not self.engine_states:
            return None
        key = (seg.stream, item.p, item.c, item.z, seg.number)
        if self._volume_mode and item.array.ndim == 2:
            vol = self.assembler.add(item)
            if vol is None:
                return None
            item, key = vol, (seg.stream, item.p, item.c, -1, seg.number)
        if item.array.ndim == 2:
            self._newest[key] = item
        if not to_engines:
            return key, item
        completing = self.completer.enabled and seg.saved
        with self._slot_cond:
            old = self._slots.get(key)
            if completing:
                # the first frame the live path skips hands the slot's saved products to the
                # completer (before the worker can take the newer frame); later frames are its tickets
                if old is not None and not self.completer.owns(key):
                    self.completer.claim(key, old)
                if self.completer.owns(key):
                    self.completer.add(key, item)
            self._slots[key] = item
            self._slot_cond.notify()
        if old is not None:
            self._skip(old)
        return None

    def _products(self) -> tuple[str, ...]:
        out: list[str] = []
        for s in self.engine_states.values():
            if s.enabled:
                out.extend(s.image_outputs())
        return tuple(out)

    def _skip(self, item: Item) -> None:
        self.skipped_frames += 1
        for s in self.engine_states.values():
            if s.enabled:
                self.skipped[s.name] = self.skipped.get(s.name, 0) + 1
        products = tuple(p for p in self._products() if self.cfg.saves(p))
        if products and self.store is not None and item.segment.saved:
            self.sink.mark("skipped", products, item)

    def _restore_one(self, frame: Frame) -> dict[str, np.ndarray]:
        routed = self._route(frame, to_engines=False)
        if routed is None:
            raise ValueError("the frame is part of a z-stack still being assembled")
        return self._process(*routed)

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

    def _new_chain(self, item: Item, slots: list[EngineSlot] | None = None) -> Chain:
        spec = StreamSpec(
            shape=tuple(item.array.shape),
            channel=str(item.frame.header.get("channel", item.c)),
            **item.segment.spec_base,
        )
        return Chain(
            list(self.engine_states.values()) if slots is None else slots,
            spec,
            strict=False,
            max_failures=self.cfg.max_engine_failures,
            on_disable=self._disable,
        )

    def _process(self, key: tuple, item: Item) -> dict[str, np.ndarray]:
        with self._chain_lock:
            chain = self._chains.get(key)
            # a frame the worker takes before its slot is claimed is one of the in-order frames
            # (the claim names a later one, still in the slot): its products are saved from here
            in_order = not self.completer.owns(key)
            if self.completer.needs_chain(key):
                # this chain has seen every frame of the slot in order, up to the first skipped one:
                # the completer continues it from there; the live view goes on with a new one
                self.completer.adopt(key, self._chains.pop(key, None))
                chain = None
            if chain is None:
                chain = self._chains[key] = self._new_chain(item)
            info = FrameInfo(
                seq=item.frame.seq,
                timestamp=item.frame.timestamp,
                index={"p": item.p, "c": item.c, "z": item.z, "t": item.t},
                meta=item.frame.header.get("meta") or {},
            )
            t0 = time.perf_counter()
            result = chain.run(item.array, info)
            self.lat_chain.add(time.perf_counter() - t0)
        # the live chain's products are saved while it has seen every frame of the slot in order;
        # once the completer owns the slot, they are previews only
        saved = self.store is not None and item.segment.saved and in_order
        dropped_products: list[str] = []
        for name, arr in result.images.items():
            arr = np.asarray(arr)
            if saved and self.cfg.saves(name):
                if self.completer.enabled:  # in order: wait for room (ingest never waits for this)
                    self.completer.offer(name, arr, item)
                elif not self.sink.offer_product(name, arr, item):
                    dropped_products.append(name)  # recorded as skipped
            self.previews.offer(name, arr, item)
        if dropped_products:
            self.sink.products_dropped += len(dropped_products)
            self.sink.mark("skipped", tuple(dropped_products), item)
        failed = [f for f in result.failed if self.cfg.saves(f)]
        if failed and saved:
            self.sink.mark("failed", tuple(failed), item)
        if result.scalars:
            self.scalars_last.update(result.scalars)
            if saved or (item.segment.saved and not self.completer.enabled):
                self.sink.scalars(result.scalars, item)
        for ev in result.events:
            self.add_event(
                event_record(
                    ev,
                    seq=item.frame.seq,
                    p=item.p,
                    c=item.c,
                    z=item.z,
                    t=item.t,
                    time_s=item.frame.timestamp,
                    frame_shape=list(item.array.shape[-2:]),
                    pixel_size_um=item.frame.header.get("pixel_size_um"),
                    stream=item.segment.stream,
                    stamp=False,
                )
            )
        self.fps_out.tick()
        return result.images

    def _publish_scalars(self, item: Item, scalars: dict[str, float]) -> None:
        """Per-frame numbers computed beside the chain (the resolution readout): shown and stored."""
        self.scalars_last.update(scalars)
        if self.store is not None and item.segment.saved:
            self.sink.scalars(scalars, item)

    def _disable(self, state: EngineSlot, reason: str) -> None:
        state.disable(reason)

    @contextlib.contextmanager
    def between_frames(self) -> Iterator[None]:
        """Hold the chains between two frames (control commands change engines here): the live
        ones and the completer's in-order ones."""
        with self._chain_lock, self.completer.frame_lock:
            yield

    def running_engines(self, name: str) -> list[Any]:
        """The instances of engine ``name``, one per live chain (call inside between_frames); the
        completer's chains take a change at its frame (:meth:`record_change`)."""
        return [eng for chain in self._chains.values() if (eng := chain.engines.get(name)) is not None]

    def record_change(
        self,
        change: dict[str, Any],
        apply: Callable[[Any], None] | None = None,
        apply_chain: Callable[[Any], None] | None = None,
    ) -> None:
        """A change the live chains just took (call inside between_frames): the completer's chains
        take it at the same frame, and the store's provenance records where it applies from
        (per slot, after the time point the live path had reached) so that ``livescope complete``
        replays it there."""
        after = {key: chain.last_t for key, chain in self._chains.items()}

        def on_chain(chain: Any) -> None:
            if apply_chain is not None:
                apply_chain(chain)
            eng = chain.engines.get(change["engine"])
            if eng is not None and apply is not None:
                apply(eng)

        self.completer.defer(after, on_chain)
        self.changes.append(
            {
                **change,
                "time": time.time(),
                "after": {"/".join(str(k) for k in key): t for key, t in after.items()},
                "params_before": dict(self.engine_states[change["engine"]].params),
            }
        )

    def record_engine_params(self) -> None:
        if self.store is not None:
            self.store.update_provenance(
                engines={n: dict(s.params) for n, s in self.engine_states.items()}, changes=list(self.changes)
            )

    # -- events, fitting, control ------------------------------------------------------------
    def add_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Number an event and keep it for the feedback channel (``events`` on the control socket)."""
        return self.event_log.add(event)

    def events_after(self, after: int, limit: int = 500) -> list[dict[str, Any]]:
        return self.event_log.after(after, limit)

    def start_fit(self, engine: str, frames: int, steps: int, seconds: float, task: str) -> FitJob:
        def spec_base() -> dict[str, Any]:
            segments = list(self.router.segments.values())
            return dict(segments[0].spec_base) if segments else {}

        self.fit_job = FitJob(
            engine,
            frames,
            steps,
            seconds,
            task=task,
            params=self.engine_states[engine].params,
            spec_base=spec_base,
            out=self.cfg.out,
            swap=lambda path: self._swap_all(engine, path),
        )
        return self.fit_job

    def _swap_all(self, name: str, path: str) -> None:
        with self.between_frames():
            state = self.engine_states[name]
            previous = state.params.get("model")
            for eng in self.running_engines(name):
                eng.swap_model(path)  # a classical deconvolve run switches to method="net"
            self.record_change(
                {"engine": name, "cmd": "swap_model", "path": path, "previous": previous},
                lambda eng: eng.swap_model(path),
            )
            state.params["model"] = path
            if name == "deconvolve":
                state.params["method"] = "net"
        self.record_engine_params()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control command (:data:`.commands.COMMANDS`)."""
        return commands.handle(self, request)

    # -- store and previews ------------------------------------------------------------------
    def _store_loop(self) -> None:
        def finished() -> bool:
            return (
                self._stop.is_set()
                and self._ingest_done.is_set()
                and not any(t.is_alive() for t in self._threads if t.name in ("livescope-worker", "livescope-complete"))
            )

        self.sink.run(finished)

    def _preview_loop(self) -> None:
        self.previews.run(lambda: not self._stop.is_set() or not self._ingest_done.is_set(), lambda: self.scalars_last)

    def status(self) -> dict[str, Any]:
        stored = self.sink.counts()
        rx = self.receiver.stats()
        with self._counter_lock:
            rejected = dict(self.rejected)
        routing = self.router.status()
        sink = self.sink
        return {
            "state": self.state,
            "uptime_s": round(time.time() - self.started, 3),
            "source": self.cfg.source,
            "frames": {
                "received": self.received,
                "saved": stored["saved"],
                "lost": rx["lost"] + stored["lost"] + sink.store_lost,
                "lost_in_transport": rx["lost"],
                "dropped_over_budget": sink.dropped,
                "live_not_saved": self.live_not_saved,
                "rejected": rx["rejected"] + sum(rejected.values()),
                "rejected_by_reason": _merge_counts(rx["rejected_by_reason"], rejected),
                "restarts": rx["restarts"],
                "dropped_at_close": rx.get("dropped_at_close", 0),  # handed over, still queued at stop
                "skipped": dict(self.skipped),
                "skipped_frames": self.skipped_frames,
                "saturated_last": sink.saturated_last,
                "store_errors": sink.store_errors,
            },
            "fps": {
                "in": self.fps_in.per_second(),
                "saved": sink.fps_saved.per_second(),
                "processed": self.fps_out.per_second(),
            },
            "latency": {
                "store": sink.lat_store.summary(),
                "chain": self.lat_chain.summary(),
                "preview": self.previews.lat_preview.summary(),
                "preview_raw": self.previews.lat_preview_raw.summary(),
            },
            "queues": {**sink.queues(), "engine_slots": len(self._slots)},
            "engines": {
                n: {
                    "enabled": s.enabled,
                    "reason": s.reason,
                    "processed": s.processed,
                    "failures": s.failures,
                    "latency": s.latency.summary(),
                    "outputs": list(s.outputs),
                    "params": s.params,
                }
                for n, s in self.engine_states.items()
            },
            "segments": routing["segments"],
            "streams": {
                stream: {"images": tag, "sender": self.sender_stats.get(stream, {})}
                for stream, tag in routing["streams"].items()
            },
            "events": len(self.event_log),
            "restore": (
                {"served": self.restore_server.served, "errors": self.restore_server.errors}
                if self.restore_server is not None
                else None
            ),
            "curve": {"keys": str(self.curve.folder), "refused_clients": self.curve.refused} if self.curve else None,
            "fit": self.fit_job.status() if self.fit_job is not None else None,
            "completion": self.completer.status(),
            "tuning": self.tuner.status() if self.tuner is not None else None,
            "scalars": dict(self.scalars_last),
            "store": stored["info"],
        }


def _merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _denoises_before_deconvolving(engines: list[str]) -> bool:
    """The chain hands the denoised frame to the deconvolution (the tuner can then choose the raw
    one instead): denoise before deconvolve, with only registration between them."""
    if "denoise" not in engines or "deconvolve" not in engines:
        return False
    between = engines[engines.index("denoise") + 1 : engines.index("deconvolve")]
    return engines.index("denoise") < engines.index("deconvolve") and set(between) <= {"register"}


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
        raise ValueError(
            f"--calibration {path}: not a readable livescope calibration ({exc!r}); "
            "write one with `livescope calibrate MOVIE --out CAL.json`"
        ) from exc
    return data
