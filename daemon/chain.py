"""One chain of engines for one stream (position, channel, z): its engines, its failure policy
and its state. The live pipeline, the Dask job and the single-process ``livescope process`` all
run frames through :class:`Chain`; a fix here is a fix in all three.

- :class:`EngineSlot`: one engine of the chain as the daemon configures it (name, parameters,
  on/off, failure counts, latency). The live daemon shares one slot per engine between the chains
  of all its streams, so a ``set`` or a disable reaches every stream at once; offline, each chain
  has its own.
- :class:`Chain`: the engine instances (each holding its own state: a temporal window, a fitted
  normalisation) and :meth:`Chain.run`, one frame through them. What an engine passes on to the
  next is its ``passes`` output (default: its first). Its result: images, scalars, events and
  the image products an engine failed to make.
- Failure policy: ``strict=True`` (offline) raises the engine's error, since every frame of a
  saved movie must be processed; ``strict=False`` (live) passes the frame on unprocessed,
  records the products it lacks, refuses non-finite outputs and disables the engine after
  ``max_failures`` failures in a row.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..engines import EngineError, FrameInfo, StreamSpec, create_engine, engine_factory, engine_outputs
from ..engines.base import CarriesState
from .telemetry import Latency

__all__ = ["Chain", "ChainResult", "EngineSlot", "event_record", "number_events", "slots_for"]

log = logging.getLogger(__name__)


class EngineSlot:
    """One engine of a chain: how it is configured and how it has fared."""

    def __init__(self, name: str, params: dict[str, Any] | None = None) -> None:
        self.name = name
        self.params = dict(params or {})
        self.enabled = True
        self.reason = ""
        self.failures_in_row = 0
        self.failures = 0
        self.processed = 0
        self.latency = Latency()
        self.needs_volume = False
        self.outputs: tuple[str, ...] = ()
        self.scalar_names: tuple[str, ...] = ()
        try:
            self.outputs = engine_outputs(name)
            factory = engine_factory(name)
            # an engine works on (z, y, x) stacks if its class says so or it was asked to (volume=True)
            declared = getattr(factory, "needs_volume", False)  # may be a property: then it follows `volume`
            self.needs_volume = (isinstance(declared, bool) and declared) or bool(self.params.get("volume", False))
            self.scalar_names = tuple(getattr(factory, "scalar_outputs", ()))
        except EngineError as exc:
            self.enabled = False
            self.reason = str(exc)
            log.error("engine %s disabled: %s", name, exc)

    def disable(self, reason: str) -> None:
        self.enabled = False
        self.reason = reason
        log.error("engine %s disabled: %s", self.name, reason)

    def copy(self) -> EngineSlot:
        """The same configuration, on its own from here (a completer's chain: enable, disable and
        failures apply to it at its own frame), with fresh counters."""
        twin = copy.copy(self)
        twin.params = dict(self.params)
        twin.failures_in_row = twin.failures = twin.processed = 0
        twin.latency = Latency()
        return twin

    def image_outputs(self) -> list[str]:
        return [o for o in self.outputs if o not in self.scalar_names]


@functools.lru_cache(maxsize=64)
def auto_products(engines: tuple[str, ...], params_json: str = "{}") -> frozenset[str]:
    """The products saved by default (``save_products = "auto"``): the chain's last restored image
    (the image the last restoring engine passes on: intermediate steps such as ``registered`` when
    denoising follows are not kept) and what each analysis engine keeps by default
    (``saved_by_default``: the decomposition's background, slow and fast, not its residual)."""
    import json

    params = json.loads(params_json)
    keep: set[str] = set()
    last_restored: str | None = None
    for name in engines:
        try:
            factory = engine_factory(name)
        except EngineError:
            continue
        outputs = EngineSlot(name, params.get(name, {})).image_outputs()
        passes = getattr(factory, "passes", outputs[0] if outputs else None)
        if not isinstance(passes, str | type(None)):  # a property: the first output
            passes = outputs[0] if outputs else None
        declared = getattr(factory, "saved_by_default", None)
        if passes is not None:
            last_restored = passes
            # what a restoring engine keeps besides the image it passes on (a trust map)
            keep.update(o for o in (declared or ()) if o != passes and o in outputs)
        else:
            keep.update(o for o in (declared if declared is not None else outputs) if o in outputs)
    if last_restored is not None:
        keep.add(last_restored)
    return frozenset(keep)


def slots_for(engines: Sequence[str], params: dict[str, dict[str, Any]] | None = None) -> list[EngineSlot]:
    """One slot per engine name, in chain order."""
    params = params or {}
    return [EngineSlot(name, params.get(name, {})) for name in engines]


@dataclasses.dataclass
class ChainResult:
    """What one frame made: images and scalars by product name, the engines' events, and the image
    products an engine failed to make (live only; offline a failure raises)."""

    images: dict[str, Any] = dataclasses.field(default_factory=dict)
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)

    def outputs(self) -> dict[str, Any]:
        """Images and scalars in one mapping (scalars as floats)."""
        return {**self.images, **self.scalars}


class Chain:
    """The engines for one stream, in order, each instance holding its own state.

    ``slots``: the engines' configuration (shared between chains live). ``spec``: the stream the
    engines are set up for. ``state``: per engine, what another chain's first frame fixed (a
    camera offset, a normalisation; see :class:`~livescope.engines.base.CarriesState`), handed to
    chains that start later in the movie. ``strict``: the failure policy (module docstring).
    ``max_failures``: failures in a row before a live engine is disabled.
    """

    def __init__(
        self,
        slots: Sequence[EngineSlot],
        spec: StreamSpec,
        *,
        strict: bool = True,
        state: Sequence[dict[str, Any]] | None = None,
        max_failures: int = 5,
        on_disable: Callable[[EngineSlot, str], None] | None = None,
    ) -> None:
        self.slots = list(slots)
        self.spec = spec
        self.strict = strict
        self.max_failures = max_failures
        self._on_disable = on_disable
        self.engines: dict[str, Any] = {}
        self.last_t = -1  # the time point of the last frame run (a change "after t" is placed by it)
        states = list(state) if state is not None else [{}] * len(self.slots)
        for slot, st in zip(self.slots, states, strict=True):
            if slot.enabled:
                eng = self._create(slot)
                if eng is not None and st:
                    import_first_frame_state(eng, st)

    @classmethod
    def of(
        cls,
        engines: Sequence[str],
        params: dict[str, dict[str, Any]] | None,
        spec: StreamSpec,
        state: Sequence[dict[str, Any]] | None = None,
    ) -> Chain:
        """An offline chain (strict) of the named engines."""
        return cls(slots_for(engines, params), spec, strict=True, state=state)

    # -- the engines -------------------------------------------------------------------------
    def _disable(self, slot: EngineSlot, reason: str) -> None:
        if self._on_disable is not None:
            self._on_disable(slot, reason)
        else:
            slot.disable(reason)

    def _create(self, slot: EngineSlot) -> Any:
        try:
            engine = create_engine(slot.name, **slot.params)
            engine.setup(self.spec)
        except Exception as exc:
            if self.strict:
                raise
            self._disable(slot, f"setup failed: {type(exc).__name__}: {exc}")
            return None
        self.engines[slot.name] = engine
        # outputs may depend on parameters (trust's inner engine, register's volume): the instance
        # knows best
        slot.outputs = tuple(getattr(engine, "outputs", slot.outputs))
        slot.scalar_names = tuple(getattr(engine, "scalar_outputs", slot.scalar_names))
        return engine

    def set_enabled(self, name: str, on: bool, reason: str = "") -> None:
        """Turn engine ``name`` on or off in this chain (its own slots: see :meth:`EngineSlot.copy`)."""
        for slot in self.slots:
            if slot.name == name:
                slot.enabled, slot.reason, slot.failures_in_row = on, ("" if on else reason), 0

    def instances(self) -> list[Any]:
        """The engine instances, in chain order (those running)."""
        return [self.engines[s.name] for s in self.slots if s.name in self.engines]

    def first_frame_state(self) -> list[dict[str, Any]]:
        """Per engine, what it fixed on its first frame, for :class:`Chain` ``state=``."""
        return [
            dict(e.export_state()) if isinstance(e := self.engines.get(s.name), CarriesState) else {}
            for s in self.slots
        ]

    # -- one frame ---------------------------------------------------------------------------
    def run(self, frame: Any, info: FrameInfo) -> ChainResult:
        x: Any = frame
        result = ChainResult()
        self.last_t = int(info.index.get("t", self.last_t + 1))
        for slot in self.slots:
            if not slot.enabled:
                continue
            engine = self.engines.get(slot.name) or self._create(slot)
            if engine is None:
                continue
            t0 = time.perf_counter()
            try:
                out = engine.process(x, info)
                if not self.strict:
                    bad = [
                        k
                        for k, v in out.items()
                        if isinstance(v, np.ndarray)
                        and v.dtype.kind == "f"
                        and not math.isfinite(float(v.sum(dtype=np.float64)))
                    ]
                    if bad:
                        raise FloatingPointError(f"non-finite values in {', '.join(bad)}")
            except Exception as exc:
                if self.strict:
                    raise
                slot.failures += 1
                slot.failures_in_row += 1
                result.failed.extend(slot.image_outputs())
                log.warning("engine %s failed on seq %d: %s", slot.name, info.seq, exc)
                if slot.failures_in_row >= self.max_failures:
                    self._disable(slot, f"{slot.failures_in_row} failures in a row, last: {exc}")
                continue
            slot.latency.add(time.perf_counter() - t0)
            slot.failures_in_row = 0
            slot.processed += 1
            scalar_names = set(getattr(engine, "scalar_outputs", ()))
            for key, value in out.items():
                if key == "events":
                    result.events.extend(value or [])
                elif key in scalar_names or np.ndim(value) == 0:
                    result.scalars[key] = float(value)
                else:
                    result.images[key] = value
            outputs = getattr(engine, "outputs", slot.outputs)
            passes = getattr(engine, "passes", outputs[0] if outputs else None)
            if passes is not None and passes in out:
                x = out[passes]
        return result

    def close(self) -> None:
        for engine in self.engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing engine failed")


def import_first_frame_state(eng: Any, state: dict[str, Any]) -> None:
    """Hand an engine what another chain's first frame fixed."""
    if "params" in state and "offset" in state["params"]:  # job files written before export_state
        state = {**{k: v for k, v in state.items() if k != "params"}, "offset_used": state["params"]["offset"]}
    if state and isinstance(eng, CarriesState):
        eng.import_state(state)


# -- events ------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    """JSON's types for what engines put in events (numpy scalars and arrays included)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def event_record(
    ev: dict[str, Any],
    *,
    seq: int,
    p: int,
    c: int,
    z: int | None,
    t: int,
    time_s: float,
    frame_shape: list[int],
    pixel_size_um: float | None,
    stream: str | None = None,
    stamp: bool = True,
) -> dict[str, Any]:
    """An engine's event with what the chain's runner knows: which frame, where, when (live and
    offline alike). ``id`` is given by the event log (live) or when a run's events are put
    together, in frame order (offline); ``emitted`` is when it was computed (``stamp=False``:
    the live event log stamps it)."""
    rec: dict[str, Any] = {"emitted": time.time()} if stamp else {}
    rec |= {
        "seq": seq,
        "p": p,
        "c": c,
        "z": z,
        "t": t,
        "time": time_s,
        "frame_shape": frame_shape,
        "pixel_size_um": pixel_size_um,
    }
    if stream is not None:
        rec["stream"] = stream
    return _plain({**rec, **ev})


def number_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events in frame order (stable within a frame), numbered from 1 like the live feedback channel."""
    ordered = sorted(events, key=lambda e: e["_order"])
    return [{"id": i + 1, **{k: v for k, v in e.items() if k != "_order"}} for i, e in enumerate(ordered)]
