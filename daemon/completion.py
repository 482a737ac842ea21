"""Complete saved products: every raw frame restored in order, as ``livescope process`` would.

The live path runs the newest frame of each (stream, position, channel, z) slot and skips the
frames it has no time for; their products would stay empty in the store. The completer is a
second consumer of the raw stream that makes the saved products whole:

- While the live chain keeps up with a slot, it *is* the in-order chain: it has seen every frame,
  in order, so its products are what offline reprocessing computes, and they are saved as they
  come. Nothing is computed twice (on a GPU that keeps up, the completer never runs).
- At a slot's first skipped frame, the live chain's state is exactly the in-order state up to the
  frame before it. The worker hands that chain object over to the completer (``adopt``) before it
  runs a newer frame, and continues the live view with a fresh chain whose products are previews
  only. From then on every routed frame of the slot is a *ticket* (its coordinates, no pixels).
- The completer takes the tickets in order, waits until the raw frame is saved, reads it back from
  the store (so its memory stays bounded whatever the backlog), runs the in-order chain and saves
  the products, scalars and failures in the frame's place (a ``skipped`` record becomes
  ``saved``).

Modes (``complete`` in the configuration, ``--complete`` on the command line): ``during`` (the
default: on spare capacity during acquisition, the rest after the stream ends), ``after`` (only
once ingest has ended: the live path has the machine to itself), ``off`` (skipped frames stay
skipped, as before).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..bridges.protocol import Frame
from ..engines import FrameInfo, StreamSpec
from .chain import Chain, EngineSlot, slots_for
from .routing import Item
from .telemetry import Rate

__all__ = ["MODES", "Completer"]

log = logging.getLogger(__name__)

MODES = ("during", "after", "off")


def ticket(item: Item) -> Item:
    """The item without its pixels: the completer reads them back from the store."""
    return dataclasses.replace(item, frame=Frame(item.frame.header, None), cost=0)


@dataclasses.dataclass
class _Track:
    key: tuple
    tickets: deque = dataclasses.field(default_factory=deque)
    chain: Chain | None = None
    adopted: bool = False
    done: int = 0
    unrecoverable: int = 0  # raw frames lost: their products cannot be made
    # changes the live chains took (set, swap_model), each for this chain's first frame after t
    pending: list[tuple[int, Callable[[Chain], None]]] = dataclasses.field(default_factory=list)
    # the engines' configuration when the slot was claimed: a chain the completer makes itself
    # (the slot's first frame was skipped) starts from it, and takes later changes at their frames
    slots_at_claim: list[EngineSlot] = dataclasses.field(default_factory=list)


class Completer:
    """The in-order chains of the slots the live path fell behind on (see the module docstring).

    ``sink``: the store sink (products are offered there, waiting for room: this path may wait,
    the live one never does); ``writer``: (product, item) -> the store's image writer of that
    product (raw must exist, it was saved); ``saves``: whether a product is saved;
    ``make_chain``: (item, slots) -> a new chain for the item's stream (when the first frame of a slot
    was already skipped); ``live_done``: True once no more tickets can come.
    """

    def __init__(
        self,
        mode: str,
        *,
        sink: Any,
        writer: Callable[[str, Item], Any],
        saves: Callable[[str], bool],
        make_chain: Callable[[Item, list[EngineSlot]], Chain],
        live_done: Callable[[], bool],
        engine_slots: list[EngineSlot],
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"complete={mode!r}: choose one of {', '.join(MODES)}")
        self.mode = mode
        self.sink = sink
        self.writer = writer
        self.saves = saves
        self.make_chain = make_chain
        self.live_done = live_done
        self.engine_slots = engine_slots
        self.tracks: dict[tuple, _Track] = {}
        self._lock = threading.Lock()  # the tracks and their tickets
        self.frame_lock = threading.Lock()  # held while a frame runs: control commands wait for it
        self._abandon = threading.Event()
        self.rate = Rate()
        self.started_after: float | None = None  # when the catch-up after the stream began
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    # -- called by the pipeline (ingest thread, under its slot lock) ------------------------------
    def owns(self, key: tuple) -> bool:
        return key in self.tracks

    def claim(self, key: tuple, first_skipped: Item) -> None:
        """The live path skipped ``first_skipped``, the first frame of this slot it did not run:
        from it on, the slot's saved products are the completer's."""
        with self._lock:
            if key not in self.tracks:
                self.tracks[key] = _Track(
                    key, deque([ticket(first_skipped)]), slots_at_claim=[s.copy() for s in self.engine_slots]
                )
                log.info(
                    "the live chain fell behind on %s at t=%d: its products are completed in order",
                    key,
                    first_skipped.t,
                )

    def add(self, key: tuple, item: Item) -> None:
        with self._lock:
            self.tracks[key].tickets.append(ticket(item))

    # -- called by the worker, between frames ---------------------------------------------------
    def needs_chain(self, key: tuple) -> bool:
        track = self.tracks.get(key)
        return track is not None and not track.adopted

    def adopt(self, key: tuple, chain: Chain | None) -> None:
        """Take the live chain of a claimed slot, whose state is in order up to the frame before the
        first skipped one (None: the slot's first frame was skipped; a new chain starts there)."""
        with self._lock:
            track = self.tracks[key]
            if chain is not None:  # its own slots from here: enable/disable reach it at its frame
                chain.slots = [s.copy() for s in chain.slots]
                track.pending.clear()  # the live chain took every change made so far, at its frame
            track.chain = chain
            track.adopted = True

    def defer(self, after: dict[tuple, int], apply: Callable[[Chain], None]) -> None:
        """A change the live chains took between two frames (a parameter, a model): each of the
        completer's chains takes it before its first frame after the one the live path had reached
        on that slot (``after[key]``), so the saved product changes at the same frame as the live
        one. (A slot claimed but not yet handed over keeps them too: if its live chain is handed
        over, that chain has taken them and they are dropped; if the slot's first frame was skipped,
        the completer's own chain starts from the configuration at the claim and takes them.)"""
        with self._lock:
            for key, track in self.tracks.items():
                track.pending.append((after.get(key, -1), apply))

    # -- progress ---------------------------------------------------------------------------------
    def to_go(self) -> int:
        with self._lock:
            return sum(len(t.tickets) for t in self.tracks.values())

    def status(self) -> dict[str, Any]:
        with self._lock:
            tracks = list(self.tracks.values())
            to_go = sum(len(t.tickets) for t in tracks)
        done = sum(t.done for t in tracks)
        rate = self.rate.per_second()
        return {
            "mode": self.mode,
            "slots_behind": sum(1 for t in tracks if t.tickets),
            "frames_completed": done,
            "frames_to_go": to_go,
            "unrecoverable": sum(t.unrecoverable for t in tracks),
            "fps": rate,
            "eta_s": round(to_go / rate, 1) if rate > 0 and to_go else (0.0 if not to_go else None),
            "errors": self.errors,
        }

    def abandon(self) -> None:
        """Stop completing (a second stop request): what is left stays recorded as skipped."""
        self._abandon.set()

    # -- the thread -----------------------------------------------------------------------------
    def run(self) -> None:
        """Complete tickets until none are left and none can come (``live_done``), or abandoned."""
        while not self._abandon.is_set():
            if self.mode == "after" and not self.live_done():
                time.sleep(0.05)
                continue
            if self.live_done() and self.started_after is None and self.to_go():
                self.started_after = time.monotonic()
            progressed = False
            for track in list(self.tracks.values()):
                if self._abandon.is_set():
                    break
                progressed |= self._step(track)
            if not progressed:
                if self.live_done() and not self.to_go():
                    return
                time.sleep(0.01)

    def _step(self, track: _Track) -> bool:
        """Complete the oldest ticket of a slot if its raw frame is on disk; False if none could be."""
        if not track.adopted or not track.tickets:
            return False
        item = track.tickets[0]
        raw = self.writer("raw", item)
        if raw is None:  # the store has not opened the raw image yet
            return False
        zs = _zs(item)
        # read in this order: once no frame can come (live_done), a raw frame leaves the sink's
        # queue (queued_bytes) only after the writer took it (pending), and leaves pending only
        # after its status is final; so a status still missing after both read empty is a frame
        # the store never got (lost before it), not one on its way
        ended = self.live_done()
        on_the_way = self.sink.queued_bytes > 0 or raw.pending > 0
        states = [raw.status_at(item.t, item.c, z) for z in zs]
        if "missing" in states and (on_the_way or not ended):
            return False  # not on disk yet
        if any(s != "saved" for s in states):
            track.tickets.popleft()
            track.unrecoverable += 1
            return True
        try:
            planes = [raw.read_plane(item.t, item.c, z) for z in zs]
            arr = np.stack(planes) if len(item.frame.header.get("shape") or []) == 3 else planes[0]
            self._run(track, dataclasses.replace(item, frame=Frame(item.frame.header, arr)), arr)
        except Exception as exc:
            self.errors += 1
            if self.errors == 1:
                log.exception("completing a product failed")
            else:
                log.error("completing a product failed: %s", exc)
        track.tickets.popleft()
        track.done += 1
        self.rate.tick()
        return True

    def _run(self, track: _Track, item: Item, arr: np.ndarray) -> None:
        if track.chain is None:
            track.chain = self.make_chain(item, [s.copy() for s in track.slots_at_claim])
        while track.pending and track.pending[0][0] < item.t:
            _, apply = track.pending.pop(0)
            with self.frame_lock:
                apply(track.chain)
        info = FrameInfo(
            seq=item.frame.seq,
            timestamp=item.frame.timestamp,
            index={"p": item.p, "c": item.c, "z": item.z, "t": item.t},
            meta=item.frame.header.get("meta") or {},
        )
        with self.frame_lock:
            result = track.chain.run(arr, info)
        for name, out in result.images.items():
            if self.saves(name):
                self.offer(name, np.asarray(out), item)
        failed = tuple(f for f in result.failed if self.saves(f))
        if failed:
            self.sink.mark("failed", failed, item)
        if result.scalars:
            self.sink.scalars(result.scalars, item)

    def offer(self, name: str, arr: np.ndarray, item: Item) -> None:
        """Queue a product, waiting for room in the products' share of the budget."""
        arr, over = self.sink.stored_form(name, arr)
        while not self.sink.offer_product(name, arr, item, over):
            if self._abandon.is_set():
                return
            time.sleep(0.005)

    def chains(self) -> list[Chain]:
        return [t.chain for t in self.tracks.values() if t.chain is not None]

    def close(self) -> None:
        for track in self.tracks.values():
            if track.chain is not None:
                track.chain.close()


def _zs(item: Item) -> list[int]:
    """The z planes a ticket stands for: its own, or a whole stack (a z-stack sent in one message,
    or assembled for a volume engine: the raw store has it as planes 0..n-1)."""
    shape = item.frame.header.get("shape") or []
    if len(shape) == 3:
        return list(range(int(shape[0])))
    return [item.z]


def spec_for(item: Item) -> StreamSpec:
    return StreamSpec(
        shape=tuple(item.array.shape),
        channel=str(item.frame.header.get("channel", item.c)),
        **item.segment.spec_base,
    )


# -- a store completed later (livescope complete STORE) ----------------------------------------
def complete_store(
    path: Any,
    engines: list[str] | None = None,
    engine_params: dict[str, dict[str, Any]] | None = None,
    *,
    progress: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    processes: bool = True,
) -> dict[str, Any]:
    """Complete a daemon's store whose products are missing frames (a daemon stopped mid-completion
    or killed, or one run with ``--complete off``): per (position, channel, plane), every product
    frame from the first one not saved on (whose raw frame is saved) is restored by the in-order
    chain over the saved raw (run from the first frame, so the stateful engines' state is rebuilt
    exactly), as the daemon's completer and ``livescope process`` compute it, and written in its
    place with its record. Idempotent; a run killed midway is continued by the next.
    ``engines``/``engine_params`` default to the store's provenance. Returns frames completed per
    image.

    ``workers`` (local Dask workers, ``processes`` or threads) or ``scheduler`` (an existing Dask
    scheduler): the chain runs as ``livescope process`` runs it on Dask, in time chunks with the
    stateful engines' warm-up (bit-exact with the in-order chain), into a scratch folder in the
    store, and the missing frames are copied in. A run whose parameters changed mid-way, or an
    image with several positions, is completed in order here instead (said in the log): the
    changes apply at their frames only in order."""
    import json
    from pathlib import Path

    import zarr
    from tqdm import tqdm

    from ..bridges.movies import open_movie
    from ..bridges.store import STATUS, list_images, refresh_root
    from .distributed import chain_wants_stacks, movie_frame_info, movie_spec, plan_units

    root = Path(path)
    prov = json.loads((root / "zarr.json").read_text())["attributes"]["livescope"].get("provenance") or {}
    changes: list[dict[str, Any]] = []
    if engines is None:
        engines = list((prov.get("engines") or {}).keys())
        engine_params = {k: dict(v or {}) for k, v in (prov.get("engines") or {}).items()}
        # parameter changes and model swaps made during the run: replayed where they applied, from
        # the parameters the run started with
        changes = [c for c in prov.get("changes") or [] if c.get("engine") in engine_params]
        for c in reversed(changes):
            engine_params[c["engine"]] = dict(c.get("params_before") or {})
    engine_params = engine_params or {}
    if not engines:
        raise ValueError(f"{root}: the store names no engines; give them with --engines")
    products = [o for s in [EngineSlot(n, engine_params.get(n, {})) for n in engines] for o in s.image_outputs()]
    out: dict[str, int] = {}
    for entry in list_images(root):
        if entry.get("product") != "raw":
            continue
        raw_name = str(entry["path"])
        src = open_movie(root / raw_name)
        if not src.record_paths:
            continue
        present = {p: root / (p + raw_name[3:]) for p in products if (root / (p + raw_name[3:]) / "0").exists()}
        if not present:
            log.warning("%s: no product images to complete (run livescope process on it instead)", raw_name)
            continue
        raw_status = _read_status(root / raw_name)
        arrays = {p: zarr.open_array(str(q / "0"), mode="r+") for p, q in present.items()}
        records = {
            p: {k: zarr.open_array(str(q / "livescope" / k), mode="r+") for k in ("status", "seq", "time")}
            for p, q in present.items()
        }
        status = {p: _read_status(q) for p, q in present.items()}
        stacks = chain_wants_stacks(engines, engine_params, src)
        n_t = src.sizes["t"]
        done = 0
        todo_units = []
        for p, c, z in plan_units(src, stacks):
            zs = list(range(src.sizes["z"])) if z is None else [z]

            raw_ok = [all(_at(raw_status, _lead(src, t, c, zz)) == STATUS["saved"] for zz in zs) for t in range(n_t)]
            first = next(
                (
                    t
                    for t in range(n_t)
                    if raw_ok[t]
                    and any(_at(status[pr], _lead(src, t, c, zz)) != STATUS["saved"] for pr in present for zz in zs)
                ),
                None,
            )
            # from the first frame not saved on: a product saved after it (by a live chain that had
            # skipped it, with --complete off) came from a state that missed frames, so it is redone
            missing = [t for t in range(first, n_t) if raw_ok[t]] if first is not None else []
            if missing:
                todo_units.append((p, c, z, zs, missing))
        dask = bool(workers or scheduler) and bool(todo_units)
        if dask and changes:
            log.warning("%s: parameters changed during the run: completing in order here, not on Dask", raw_name)
        elif dask and src.sizes.get("p", 1) > 1:
            log.warning("%s: several positions in one image: completing in order here, not on Dask", raw_name)
        elif dask:
            out[raw_name] = _complete_on_dask(
                root, raw_name, src, todo_units, arrays, records, engines, engine_params,
                progress=progress, workers=workers, scheduler=scheduler, processes=processes,
            )  # fmt: skip
            for q in present.values():
                _recount(q)
            continue
        total = sum(len(u[4]) for u in todo_units)
        bar = tqdm(total=total, desc=f"completing {raw_name}", unit="frame", disable=not progress or not total)
        stream = str(src.stream.get("stream", ""))
        for p, c, z, zs, missing in todo_units:
            wanted = set(missing)
            chain = None
            position, segment = int(entry.get("position") or 0), int(entry.get("segment") or 0)
            key = f"{stream}/{position}/{c}/{-1 if z is None else z}/{segment}"  # the daemon's slot
            replay = [(int(ch.get("after", {}).get(key, -1)), ch) for ch in changes]
            for t in range(0, max(missing) + 1):  # from the first frame: the state is rebuilt exactly
                if not all(_at(raw_status, _lead(src, t, c, zz)) == STATUS["saved"] for zz in zs):
                    continue  # a lost raw frame: the daemon's chain never saw it either
                block = src.read(t, t + 1, c, z, (0, src.sizes["y"]), (0, src.sizes["x"]), p)[0]
                if chain is None:
                    dtype = np.dtype(src.dtype)
                    spec = movie_spec(src, tuple(block.shape), p, c, dtype.name, dtype.itemsize * 8)
                    chain = Chain(slots_for(engines, engine_params), spec, strict=False)
                while replay and replay[0][0] < t:
                    _apply_change(chain, replay.pop(0)[1])
                finfo = movie_frame_info(src, t, p, c, z, seq=t)
                result = chain.run(block, finfo)
                if t not in wanted:
                    continue
                for name, value in result.images.items():
                    if name not in arrays:
                        continue
                    value = np.asarray(value).reshape(len(zs), *block.shape[-2:])
                    arr, rec = arrays[name], records[name]
                    if arr.shape[0] <= t:  # trimmed by recover: grow back to the raw's length
                        arr.resize((n_t, *arr.shape[1:]))
                        for r in rec.values():
                            r.resize((n_t, *r.shape[1:]))
                    for j, zz in enumerate(zs):
                        arr[_lead(src, t, c, zz) + (slice(None), slice(None))] = value[j].astype(arr.dtype, copy=False)
                    for zz in zs:  # pixels first, then the record: a kill between leaves it unsaved
                        rec["seq"][_lead(src, t, c, zz)] = finfo.seq
                        rec["time"][_lead(src, t, c, zz)] = finfo.timestamp
                        rec["status"][_lead(src, t, c, zz)] = STATUS["saved"]
                done += 1
                bar.update(1)
            if chain is not None:
                chain.close()
        bar.close()
        for q in present.values():
            _recount(q)
        out[raw_name] = done
    refresh_root(root)
    return out


def _complete_on_dask(
    root: Any,
    raw_name: str,
    src: Any,
    todo_units: list[tuple[Any, ...]],
    arrays: dict[str, Any],
    records: dict[str, dict[str, Any]],
    engines: list[str],
    engine_params: dict[str, dict[str, Any]],
    **dask: Any,
) -> int:
    """``livescope process`` on Dask over the store's raw image into a scratch folder, then the
    missing frames (pixels, then records) copied into the store's products. Returns frames done."""
    import shutil

    import zarr

    from ..bridges.store import STATUS
    from .process import process_file

    scratch = root / f".complete-{raw_name}"
    shutil.rmtree(scratch, ignore_errors=True)  # a killed run's scratch: computed again
    last = max(max(u[4]) for u in todo_units)
    try:
        process_file(
            root / raw_name, scratch, engines, engine_params, overwrite=True, save_raw=False, frames=last + 1, **dask
        )
        for name, arr in arrays.items():
            computed = zarr.open_array(str(scratch / name / "0"), mode="r")
            seq = zarr.open_array(str(scratch / name / "livescope" / "seq"), mode="r")
            stamp = zarr.open_array(str(scratch / name / "livescope" / "time"), mode="r")
            rec = records[name]
            for _p, c, _z, zs, missing in todo_units:
                for t in missing:
                    if arr.shape[0] <= t:  # trimmed by recover: grow back to the raw's length
                        arr.resize((src.sizes["t"], *arr.shape[1:]))
                        for r in rec.values():
                            r.resize((src.sizes["t"], *r.shape[1:]))
                    for zz in zs:
                        lead = _lead(src, t, c, zz)
                        arr[lead + (slice(None), slice(None))] = np.asarray(computed[lead]).astype(
                            arr.dtype, copy=False
                        )
                        rec["seq"][lead] = seq[lead]
                        rec["time"][lead] = stamp[lead]
                        rec["status"][lead] = STATUS["saved"]
        done = sum(len(u[4]) for u in todo_units)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return done


def _apply_change(chain: Chain, change: dict[str, Any]) -> None:
    if change.get("cmd") in ("enable", "disable"):
        chain.set_enabled(change["engine"], change["cmd"] == "enable", "disabled by a control command")
        return
    eng = chain.engines.get(change["engine"])
    if eng is None:
        return
    if change.get("cmd") == "set":
        eng.set_param(change["param"], change.get("value"))
    elif change.get("cmd") == "swap_model":
        eng.swap_model(change["path"])


def _lead(src: Any, t: int, c: int, z: int) -> tuple[int, ...]:
    return (t,) + ((c,) if src.has_c else ()) + ((z,) if src.has_z else ())


def _read_status(image: Any) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(image / "livescope" / "status"), mode="r")[...])


def _at(status: np.ndarray, lead: tuple[int, ...]) -> int:
    try:
        return int(status[lead])
    except IndexError:
        return 0


def _recount(image: Any) -> None:
    """An image's saved/skipped counts in its metadata after frames were completed."""
    import json

    from ..bridges.store import STATUS, write_json_atomic

    meta_path = image / "zarr.json"
    meta = json.loads(meta_path.read_text())
    status = _read_status(image)
    own = meta["attributes"].setdefault("livescope", {})
    own["saved"] = int((status == STATUS["saved"]).sum())
    own["skipped"] = int((status == STATUS["skipped"]).sum())
    write_json_atomic(meta_path, meta)
