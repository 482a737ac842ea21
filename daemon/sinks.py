"""Where routed frames and their products go: the store (within a memory budget), the previews,
and the event log. Each sink takes what it is offered and accounts for it; a frame a sink cannot
take is an explicit record (``lost``, ``skipped``, ``failed``), never a silent gap, as
pymmcore-plus's sinks treat a frame they could not write.

- :class:`StoreSink`: raw frames are lossless up to the memory budget of queued bytes, past
  which each frame that cannot be kept is recorded as lost; products get at most half the budget
  (raw always has room), a product that does not fit is recorded as skipped for its frame. One
  thread writes (``run``); completed writes turn into "saved".
- :class:`PreviewSink`: the newest frame of each (product, stream, p, c, z), published at
  display rate, downsampled, the longest-waiting first.
- :class:`EventLog`: numbered events for the feedback channel.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..bridges.store import OmeZarrStore, image_name, to_stored
from .routing import Item, Segment
from .telemetry import Latency, Rate

__all__ = ["EventLog", "Mark", "PreviewSink", "Product", "StoreSink"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Mark:
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
    segment: Segment

    @classmethod
    def of(cls, status: str, products: tuple[str, ...], item: Item) -> Mark:
        arr = item.frame.array
        zs = tuple(range(arr.shape[0])) if arr is not None and arr.ndim == 3 else (item.z,)
        return cls(status, products, item.p, item.c, zs, item.t, item.frame.seq, item.frame.timestamp, item.segment)


@dataclasses.dataclass
class Product:
    name: str
    array: np.ndarray
    item: Item
    saturated: int = -1  # pixels beyond the stored dtype's range (float16: 65504)


class StoreSink:
    """The store's queue and writer thread. ``store`` may be None (no ``--out``): frames are then
    taken and let go, so the budget and the counts behave as with a store."""

    def __init__(self, store: OmeZarrStore | None, budget_mb: float) -> None:
        self.store = store
        self.budget_mb = budget_mb
        self._budget = int(budget_mb * 2**20)
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.queued_bytes = 0
        self.queued_product_bytes = 0
        self.dropped = 0  # raw frames over the memory budget: recorded as lost in the store
        self.products_dropped = 0
        self.store_lost = 0  # raw frames the store refused outright (its errors are in the log)
        self.store_errors = 0
        self.saturated_last = 0
        self.saturated_total = 0
        self.lat_store = Latency()
        self.fps_saved = Rate()
        self._disk_warned = 0.0

    # -- what the pipeline offers ---------------------------------------------------------------
    def offer_raw(self, item: Item) -> bool:
        """Queue a raw frame within the budget; past it, record the frame as lost. True if queued."""
        nbytes = item.cost  # pixels and header (a sender's metadata counts against the budget too)
        with self._lock:
            fits = self.queued_bytes + nbytes <= self._budget
            if fits:
                self.queued_bytes += nbytes
        if fits:
            self._q.put(item)
            return True
        self.dropped += 1
        self._q.put(Mark.of("lost", ("raw",), item))
        if self.dropped == 1 or self.dropped % 100 == 0:
            log.error(
                "store falls behind: %d frame(s) lost over the %.0f MB memory budget", self.dropped, self.budget_mb
            )
        return False

    def stored_form(self, name: str, arr: np.ndarray) -> tuple[np.ndarray, int]:
        """A product as the store keeps it (float16 where so configured), and the pixels beyond that
        dtype's range: converted on the producer's thread (the chain's), not the store's."""
        if self.store is not None and self.store.product_dtypes.get(name) == "float16":
            return to_stored(arr, np.dtype(np.float16))
        return arr, -1

    def offer_product(self, name: str, arr: np.ndarray, item: Item, saturated: int | None = None) -> bool:
        """Queue a product within half the budget (raw always has room). True if queued.
        ``saturated``: given when ``arr`` is already in :meth:`stored_form`."""
        over = -1 if saturated is None else saturated
        if saturated is None:
            arr, over = self.stored_form(name, arr)
        with self._lock:
            fits = self.queued_product_bytes + arr.nbytes <= self._budget // 2
            if fits:
                self.queued_product_bytes += arr.nbytes
        if fits:
            self._q.put(Product(name, arr, item, over))
        return fits

    def mark(self, status: str, products: tuple[str, ...], item: Item) -> None:
        """Record that ``products`` of this frame are ``status`` (skipped, failed, lost)."""
        self._q.put(Mark.of(status, products, item))

    def scalars(self, scalars: dict[str, float], item: Item) -> None:
        self._q.put(("scalars", scalars, item))

    def pending(self) -> int:
        return self._q.qsize()

    # -- the writer thread -------------------------------------------------------------------
    def run(self, finished: Callable[[], bool]) -> None:
        """Write until ``finished()`` says nothing more will come and the queue is empty."""
        last_poll = 0.0
        while True:
            try:
                entry = self._q.get(timeout=0.05)
            except queue.Empty:
                entry = None
                if finished() and self._q.empty():
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

    def find_writer(self, product: str, position: int, seg: Segment) -> Any:
        """The image writer if the store thread has opened it, else None (any thread may ask)."""
        if self.store is None:
            return None
        tagged = {"stream": seg.tag} if seg.tag else {}
        return self.store.images.get(image_name(product, position, seg.number, **tagged))

    def writer_for(self, product: str, position: int, seg: Segment) -> Any:
        assert self.store is not None
        tagged = {"stream": seg.tag} if seg.tag else {}  # a second camera's images: raw_camB, ...
        name = image_name(product, position, seg.number, **tagged)
        writer = self.store.images.get(name)  # the common case, per frame: no new layout
        if writer is not None:
            return writer
        layout = seg.layout if product == "raw" else dataclasses.replace(seg.layout, dtype="float32")
        if layout is not seg.layout:
            seg.product_layouts.append(layout)
        writer = self.store.image(product, position, seg.number, layout, **tagged)
        if product == "raw":
            writer.set_stream({**seg.spec_base, "stream": seg.stream})
        return writer

    def _store_one(self, entry: Any) -> None:
        if isinstance(entry, Item):
            arr = entry.array
            sat_level = 2**entry.segment.bits - 1
            sat = int(np.count_nonzero(arr >= sat_level)) if arr.dtype.kind in "ui" else 0
            self.saturated_last = sat
            self.saturated_total += sat
            try:
                if self.store is not None:
                    w = self.writer_for("raw", entry.p, entry.segment)
                    try:
                        _write(w, entry, arr, saturated=sat)
                    except Exception:
                        # the store could not take it (e.g. the disk is full): a lost frame, counted
                        self.store_lost += 1
                        raise
                    meta = entry.frame.header.get("meta")
                    if meta:
                        w.write_meta(entry.t, entry.c, entry.z, entry.frame.seq, meta)
                    self.lat_store.add(time.perf_counter() - entry.received)  # received -> buffered
            finally:
                with self._lock:
                    self.queued_bytes -= entry.cost
        elif isinstance(entry, Product):
            try:
                if self.store is not None:
                    w = self.writer_for(entry.name, entry.item.p, entry.item.segment)
                    _write(w, entry.item, entry.array.astype(w.dtype, copy=False), saturated=entry.saturated)
            finally:
                with self._lock:
                    self.queued_product_bytes -= entry.array.nbytes
        elif self.store is None:
            return
        elif isinstance(entry, Mark):
            for product in entry.products:
                w = self.writer_for(product, entry.p, entry.segment)
                for z in entry.zs:
                    w.mark(entry.t, entry.c, z, entry.status, seq=entry.seq, time_s=entry.time_s)
        elif isinstance(entry, tuple) and entry[0] == "scalars":
            _, scalars, item = entry
            w = self.writer_for("raw", item.p, item.segment)
            for name, value in scalars.items():
                w.write_scalar(name, item.t, item.c, item.z, value)

    def _check_disk(self) -> None:
        now = time.monotonic()
        if self.store is None or now - self._disk_warned < 10:
            return
        free = self.store.free_bytes()
        if free < self.store.min_free_gb * 2**30:
            self._disk_warned = now
            log.warning("only %.2f GB free at %s: the store will fill the disk soon", free / 2**30, self.store.path)

    # -- what it did -------------------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        """Raw frames saved and lost in the store, and the store's own summary."""
        if self.store is None:
            return {"saved": 0, "lost": 0, "info": {}}
        images = list(self.store.images.values())
        raws = [w for w in images if w.product == "raw"]
        return {
            "saved": sum(w.saved for w in raws),
            "lost": sum(w.lost for w in raws),
            "info": {
                "path": str(self.store.path),
                "bytes_written": sum(w.bytes_written for w in images),
                "free_gb": round(self.store.free_bytes() / 2**30, 2),
                "images": sorted(self.store.images),
                "saved_by_image": {w.name: w.saved for w in images},
                "write_errors": sum(w.write_errors for w in images),
                "last_error": next((w.last_error for w in images if w.last_error), ""),
            },
        }

    def queues(self) -> dict[str, Any]:
        with self._lock:
            queued, products = self.queued_bytes, self.queued_product_bytes
        return {
            "store_items": self._q.qsize(),
            "store_mb": round(queued / 2**20, 2),
            "products_mb": round(products / 2**20, 2),
            "products_dropped": self.products_dropped,
        }


def _write(w: Any, item: Item, arr: np.ndarray, saturated: int = -1) -> None:
    if arr.ndim == 3:  # a z-stack in one message
        for z in range(arr.shape[0]):
            w.write(item.t, item.c, z, arr[z], seq=item.frame.seq, time_s=item.frame.timestamp, saturated=saturated)
    else:
        w.write(item.t, item.c, item.z, arr, seq=item.frame.seq, time_s=item.frame.timestamp, saturated=saturated)


class PreviewSink:
    """The newest frame per (product, stream tag, p, c, z), sent at ``hz``, at most ``size``
    pixels across; each header says how long since the frame was received (``latency_ms``).

    PUB/SUB drops what is sent before a subscriber has joined, so a viewer that connects after a
    short acquisition (or between two) would show nothing. When no new frame is waiting, the
    newest of each plane is sent again, marked ``repeat``, once per ``resend_s`` and a few per
    tick; a subscriber that already has that frame drops the repeat (``PreviewSubscriber``)."""

    resend_s = 2.0
    resend_per_tick = 4

    def __init__(self, publisher: Any, hz: float, size: int) -> None:
        self.publisher = publisher
        self.period = 1.0 / max(hz, 0.1)
        self.size = size
        self.latest: dict[tuple, tuple[np.ndarray, dict[str, Any]]] = {}
        self._sent: dict[tuple, int] = {}
        self._when: dict[tuple, float] = {}
        self.lat_preview = Latency()  # frame received -> restored product's preview sent
        self.lat_preview_raw = Latency()

    @staticmethod
    def header(item: Item, product: str) -> dict[str, Any]:
        h = item.frame.header
        return {
            "v": 1,
            "stream": h["stream"],
            "seq": item.frame.seq,
            "product": product,
            "_received": item.received,
            "live": bool(h.get("live")),
            "index": {"p": item.p, "c": item.c, "z": item.z, "t": item.t},
            "time": item.frame.timestamp,
            "bits": item.segment.bits,
            "channel": h.get("channel"),
            "pixel_size_um": h.get("pixel_size_um"),
        }

    def offer(self, product: str, arr: np.ndarray, item: Item) -> None:
        self.latest[(product, item.segment.tag, item.p, item.c, item.z)] = (arr, self.header(item, product))

    def run(self, running: Callable[[], bool], scalars: Callable[[], dict[str, float]]) -> None:
        while running():
            time.sleep(self.period)
            if self.publisher is None:
                continue
            # at most half the high-water mark per tick, the longest-waiting first, so every
            # product and plane gets its turn even when there are more than fit in one burst
            changed = [
                (self._when.get(k, 0.0), k) for k, (_, h) in list(self.latest.items()) if self._sent.get(k) != h["seq"]
            ]
            changed.sort(key=lambda x: x[0])
            now = time.monotonic()
            todo = [(key, False) for _, key in changed[:16]]
            if not todo:  # nothing new: the newest again, for a subscriber that joined late
                stale = sorted((w, k) for k, w in list(self._when.items()) if now - w >= self.resend_s)
                todo = [(key, True) for _, key in stale[: self.resend_per_tick] if key in self.latest]
            for key, repeat in todo:
                arr, header = self.latest[key]
                self._sent[key] = header["seq"]
                self._when[key] = now
                try:
                    small = self._downsample(arr)
                    hdr = dict(
                        header, shape=list(small.shape), dtype=small.dtype.name, frame_shape=list(np.shape(arr)[-2:])
                    )  # the viewer scales event boxes by it
                    if header.get("pixel_size_um") and small.shape != arr.shape:
                        hdr["pixel_size_um"] = header["pixel_size_um"] * arr.shape[-1] / small.shape[-1]
                    last = scalars()
                    if last:
                        hdr["scalars"] = dict(last)
                    received = hdr.pop("_received", None)
                    if repeat:
                        hdr["repeat"] = True  # its latency was measured when it was first sent
                    elif received is not None:  # frame received -> its preview (this product) on the wire
                        latency = time.perf_counter() - received
                        hdr["latency_ms"] = round(latency * 1000, 2)
                        (self.lat_preview_raw if header.get("product") == "raw" else self.lat_preview).add(latency)
                    self.publisher.send(hdr, small)
                except Exception:
                    log.exception("preview failed")

    def _downsample(self, arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.ndim == 3:
            arr = arr[arr.shape[0] // 2]
        step = max(1, math.ceil(max(arr.shape[-2:]) / self.size))
        small = arr[::step, ::step]
        if small.dtype.kind == "f" and small.dtype != np.float32:
            small = small.astype(np.float32)
        return np.ascontiguousarray(small)


class EventLog:
    """Numbered events for the feedback channel (``events`` on the control socket): clients ask
    for events after the last id they handled, so none is lost or reordered while the client
    keeps within the retention (``keep`` events)."""

    def __init__(self, keep: int = 10000) -> None:
        self.keep = keep
        self.events: list[dict[str, Any]] = []
        self.last_id = 0
        self._lock = threading.Lock()

    def add(self, event: dict[str, Any]) -> dict[str, Any]:
        event = dict(event)
        for key in ("id", "emitted"):  # the daemon numbers and times events; a producer's own are kept aside
            if key in event:
                event[f"source_{key}"] = event.pop(key)
        with self._lock:
            self.last_id += 1
            event = {"id": self.last_id, "emitted": time.time(), **event}
            self.events.append(event)
            if len(self.events) > self.keep:
                del self.events[: self.keep // 10]
        log.info("event: %s", json.dumps(event, default=str))
        return event

    def after(self, after: int, limit: int = 500) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["id"] > after][:limit]

    def __len__(self) -> int:
        return len(self.events)
